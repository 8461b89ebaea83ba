"""The results folder's run lock (ctvlp.runlock): one live holder, named when refused; a stale lock
(dead PID, reused PID, unreadable file) taken over with a message; another host's lock held until
`ctvlp unlock`; stage commands refused unless they carry the holder's token."""

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time

import pytest

from ctvlp import cli, runlock, workspace


@pytest.fixture
def results(tmp_path):
    return workspace.prepare_results(tmp_path / "results")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(results, **fields):
    info = {"token": "t" * 32, "host": socket.gethostname(), "pid": os.getpid(), "pid_start": None,
            "started": "2026-01-01 00:00:00 UTC", "cwd": "/elsewhere/wd", "command": "snakemake --cores 2", **fields}
    path = runlock.lock_path(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info))
    return info


def test_a_second_acquire_is_refused_naming_the_holder(results):
    info = runlock.acquire(results, command="snakemake --cores 2", checkout="/repo")
    on_disk = json.loads(runlock.lock_path(results).read_text())
    assert on_disk["token"] == info["token"] and on_disk["pid"] == os.getpid()
    assert on_disk["host"] == socket.gethostname() and on_disk["checkout"] == "/repo"
    with pytest.raises(runlock.RunLockedError) as e:
        runlock.acquire(results)
    msg = str(e.value)
    assert f"PID {os.getpid()}" in msg and f"host {socket.gethostname()}" in msg and info["started"] in msg
    assert "stops before any job" in msg
    assert json.loads(runlock.lock_path(results).read_text())["token"] == info["token"]  # untouched


def test_release_needs_the_token(results):
    info = runlock.acquire(results)
    assert not runlock.release(results, "not-the-token")
    assert runlock.lock_path(results).is_file()
    assert runlock.release(results, info["token"])
    assert not runlock.lock_path(results).exists()
    assert runlock.acquire(results)["token"] != info["token"]


def test_a_lock_of_a_dead_process_is_taken_over_with_a_message(results, capsys):
    dead = _dead_pid()
    _write_lock(results, pid=dead)
    assert runlock.state(runlock.read(results)) == "dead"
    for bogus in (0, -1, "x", None):
        assert runlock.state({**runlock.read(results), "pid": bogus}) == "dead"
    info = runlock.acquire(results)
    assert info["pid"] == os.getpid()
    assert json.loads(runlock.lock_path(results).read_text())["token"] == info["token"]
    err = capsys.readouterr().err
    assert "taking over the stale lock" in err and f"PID {dead}" in err and "holder is gone" in err
    assert not list(runlock.lock_path(results).parent.glob("lock.stale-*"))  # nothing left aside


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="PID start times come from /proc")
def test_a_reused_pid_counts_as_dead(results):
    _write_lock(results, pid=os.getpid(), pid_start="1")  # our PID, but a process started at another time
    assert runlock.state(runlock.read(results)) == "dead"
    assert runlock.acquire(results)["pid_start"] == runlock._pid_start(os.getpid())


def test_an_unreadable_old_lock_is_taken_over_a_fresh_one_is_waited_for(results, capsys):
    path = runlock.lock_path(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{trunc")
    assert runlock.read(results) == {}
    assert runlock.state({}, path) == "alive"  # may be being written right now
    old = time.time() - 60
    os.utime(path, (old, old))
    assert runlock.state({}, path) == "damaged"
    assert runlock.acquire(results)["pid"] == os.getpid()
    assert "unreadable" in capsys.readouterr().err


def test_another_hosts_lock_holds_until_ctvlp_unlock(results, capsys):
    _write_lock(results, host="node-that-is-not-here", pid=1)
    assert runlock.state(runlock.read(results)) == "remote"
    with pytest.raises(runlock.RunLockedError) as e:
        runlock.acquire(results)
    assert "node-that-is-not-here" in str(e.value) and "ctvlp unlock --results" in str(e.value)
    cli.main(["unlock", "--results", str(results)])
    assert "removed the lock" in capsys.readouterr().out
    assert not runlock.lock_path(results).exists()
    cli.main(["unlock", "--results", str(results)])
    assert "holds no lock" in capsys.readouterr().out


def test_unlock_refuses_a_live_holder_on_this_host(results):
    runlock.acquire(results)
    with pytest.raises(SystemExit) as e:
        cli.main(["unlock", "--results", str(results)])
    assert f"PID {os.getpid()}" in str(e.value.code) and "stop it" in str(e.value.code)
    assert runlock.lock_path(results).is_file()


def test_credentials_in_the_command_are_not_recorded(results):
    info = runlock.acquire(results, command="snakemake --config reports.llm.base_url=https://me:s3cret@llm.example/v1")
    text = runlock.lock_path(results).read_text()
    assert "s3cret" not in text and "https://***@llm.example/v1" in info["command"]


def test_stage_check_refuses_other_runs_and_passes_the_holders_jobs(results, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(runlock.ENV, raising=False)
    out = results / "qc"
    runlock.check([str(out)])  # no lock: fine
    info = _write_lock(results)  # a live holder (this process's PID), another token
    with pytest.raises(runlock.RunLockedError) as e:
        runlock.check([None, str(out)])
    assert f"PID {os.getpid()}" in str(e.value) and "by hand" in str(e.value)
    runlock.check([str(tmp_path / "elsewhere")])  # outside the locked folder: fine
    monkeypatch.setenv(runlock.ENV, info["token"])
    with caplog.at_level("INFO", logger="ctvlp.runlock"):
        runlock.check([str(out)])  # a job of the holding run
    assert "held by this workflow run" in caplog.text
    monkeypatch.setenv(runlock.ENV, "another-runs-token")
    with pytest.raises(runlock.RunLockedError):
        runlock.check([str(out)])
    _write_lock(results, pid=_dead_pid())
    runlock.check([str(out)])  # stale: reported, not refused
    assert runlock.lock_path(results).is_file()  # and not removed by a stage


def test_a_stage_by_hand_stops_at_once_naming_the_holder(results, monkeypatch):
    monkeypatch.delenv(runlock.ENV, raising=False)
    _write_lock(results, cwd="/other/checkout")
    with pytest.raises(SystemExit) as e:
        cli.main(["qc", "--manifest", "m.parquet", "--segment-root", "s", "--preprocessed-root", "p",
                  "--out", str(results / "qc")])
    msg = str(e.value.code)
    assert msg.startswith("ctvlp qc: results folder") and f"PID {os.getpid()}" in msg and "/other/checkout" in msg
    assert not (results / "qc").exists()


def test_warning_if_held(results, monkeypatch):
    monkeypatch.delenv(runlock.ENV, raising=False)
    assert runlock.warning_if_held(results) is None
    info = _write_lock(results)
    assert f"PID {os.getpid()}" in runlock.warning_if_held(results)
    monkeypatch.setenv(runlock.ENV, info["token"])
    assert runlock.warning_if_held(results) is None  # a job of the holding run
    _write_lock(results, pid=_dead_pid())
    assert runlock.warning_if_held(results) is None  # stale: the next run takes it over


def _contend(results, barrier, done, queue):
    barrier.wait()
    try:
        runlock.acquire(results)
        queue.put("won")
    except runlock.RunLockedError:
        queue.put("refused")
    done.wait(30)  # stay alive (a live holder) until every contender has tried


@pytest.mark.parametrize("stale", [False, True])
def test_exactly_one_of_many_concurrent_runs_gets_the_lock(results, stale):
    if stale:
        _write_lock(results, pid=_dead_pid())
    ctx = mp.get_context("spawn")
    n = 6
    barrier, done, queue = ctx.Barrier(n), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(results), barrier, done, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        outcomes = sorted(queue.get(timeout=60) for _ in range(n))
    finally:
        done.set()
        for p in procs:
            p.join(30)
    assert outcomes == ["refused"] * (n - 1) + ["won"]
    assert runlock.read(results)["pid"] in {p.pid for p in procs}


def test_a_lock_that_changed_since_it_was_judged_stale_is_put_back(results):
    stale = _write_lock(results, pid=_dead_pid(), token="s" * 32)
    fresh = _write_lock(results, token="f" * 32)  # another run took it over in between
    assert runlock._set_aside(runlock.lock_path(results), stale, "mine") is None
    assert runlock.read(results)["token"] == fresh["token"]
    assert not list(runlock.lock_path(results).parent.glob("lock.stale-*"))
