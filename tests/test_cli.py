"""The command line a user meets: help on every option, internal flags hidden but accepted, a
version, an example per subcommand; and the progress lines it sends to the workflow's terminal."""

import argparse
import logging
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from ctvlp import cli, progress

INTERNAL = ("--sections", "--threads", "--progress-fd")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_subcommand_has_help():
    subs = subcommands()
    assert len(subs) >= 15
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in subs.items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and a.help is not argparse.SUPPRESS
               and not (a.help and a.help.strip())]
    assert missing == []
    top = [a for a in cli._parser()._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert top and all(a.help for a in top)


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_internal_flags_are_hidden_from_help_but_parse(name):
    p = subcommands()[name]
    text = p.format_help()
    for flag in INTERNAL:
        assert flag not in text
    # the example in the epilog, kept as written (RawDescriptionHelpFormatter): one line, starting `ctvlp NAME`
    assert f"example:\n  ctvlp {name}" in text
    required = [a.option_strings[0] for a in p._actions if a.required and a.option_strings]
    positional = [a.dest for a in p._actions if not a.option_strings and not isinstance(a, argparse._HelpAction)]
    argv = [name, *positional, "--sections", "train,seed", "--threads", "3", "--progress-fd", "3"]
    for flag in required:
        argv += [flag, "x=y" if flag == "--variant" else "x"]
    args = cli._parser().parse_args(argv)
    assert (args.sections, args.threads, args.progress_fd) == ("train,seed", 3, 3)


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli._parser().parse_args(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"ctvlp {metadata.version('ctvlp')}"


def test_version_from_the_installed_command():
    out = subprocess.run([str(Path(sys.executable).parent / "ctvlp"), "--version"], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0 and out.stdout.strip() == f"ctvlp {metadata.version('ctvlp')}"


# ---- progress ----------------------------------------------------------------------------------


@pytest.fixture
def pipe():
    read, write = os.pipe()
    yield read, write
    for fd in (read, write):
        try:
            os.close(fd)
        except OSError:
            pass


def test_attach_terminal_sends_only_progress_records(pipe):
    read, write = pipe
    package = logging.getLogger("ctvlp")  # both records below reach it
    level = package.level
    handler = progress.attach_terminal(write, "segment", package)
    assert handler is not None
    try:
        package.setLevel(logging.INFO)
        progress.log.info("segment shard %d done: %d cases", 3, 8)
        logging.getLogger("ctvlp.imaging").info("a detail for the log file only")
        handler.flush()
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
    os.close(write)
    text = os.read(read, 65536).decode()
    assert text.endswith("ctvlp segment: segment shard 3 done: 8 cases\n")
    assert "detail" not in text and text.count("\n") == 1


def test_attach_terminal_to_a_closed_descriptor_is_a_no_op(pipe):
    _, write = pipe
    os.close(write)
    logger = logging.getLogger("test_cli.closed")
    assert progress.attach_terminal(write, "train", logger) is None
    assert logger.handlers == []


def test_lines_logs_a_line_per_tenth_without_carriage_returns(caplog, monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda stream=None: False)
    with caplog.at_level(logging.INFO, logger=progress.PROGRESS):
        items = list(progress.lines(range(25), 25, "reports", "report"))
    assert items == list(range(25))
    messages = [r.getMessage() for r in caplog.records if r.name == progress.PROGRESS]
    assert [m.split(" (")[0] for m in messages] == [f"reports: {n}/25 reports" for n in (3, 6, 9, 12, 15, 18, 21, 24, 25)]
    assert not any("\r" in m for m in messages)


def test_lines_says_when_an_iterable_ends_early(caplog, monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda stream=None: False)
    with caplog.at_level(logging.INFO, logger=progress.PROGRESS):
        list(progress.lines(iter(range(4)), 10, "embed", "case"))
    assert caplog.records[-1].getMessage() == "embed: 4/10 cases (ended early)"


def test_counter_logs_out_of_order_work_per_tenth_with_its_postfix(caplog, monkeypatch):
    """The LLM backend's thread pool finishes reports in any order: a line per tenth, the last with
    the numbers set_postfix gave, and a closing line when the run stopped early."""
    monkeypatch.setattr(progress, "interactive", lambda stream=None: False)
    with caplog.at_level(logging.INFO, logger=progress.PROGRESS):
        done = progress.counter(20, "reports (llm)", "report")
        for i in range(20):
            done.set_postfix(unparsed=i // 10, refresh=False)
            done.update(1)
        done.close()
        stopped = progress.counter(10, "reports (llm)", "report")
        stopped.update(3)
        stopped.close()
    messages = [r.getMessage() for r in caplog.records if r.name == progress.PROGRESS]
    assert len(messages) == 12
    assert [m.split(" (")[1].split(")")[0] for m in messages[:10]] == ["llm"] * 10
    assert [m.split(": ")[1].split(" ")[0] for m in messages[:10]] == [f"{n}/20" for n in range(2, 21, 2)]
    assert messages[9].startswith("reports (llm): 20/20 reports") and messages[9].endswith("; unparsed 1")
    assert messages[-1] == "reports (llm): 3/10 reports (stopped)" and not any("\r" in m for m in messages)


def test_bar_is_disabled_off_a_terminal(monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda stream=None: False)
    assert progress.bar(range(3)).disable
    monkeypatch.setattr(progress, "interactive", lambda stream=None: True)
    assert not progress.bar(range(3), disable=False).disable
    assert progress.bar(range(3), disable=True).disable


def test_a_stage_sends_progress_lines_to_the_descriptor_and_everything_to_its_log(tmp_path, pipe):
    """As a workflow rule runs it: `ctvlp ... --progress-fd 3 3>&2 > log 2>&1`."""
    read, write = pipe
    log = tmp_path / "example.log"
    with open(log, "w") as fh:
        out = subprocess.run([str(Path(sys.executable).parent / "ctvlp"), "example", str(tmp_path / "ex"),
                              "--n-cases", "3", "--progress-fd", str(write)], stdout=fh, stderr=subprocess.STDOUT,
                             pass_fds=(write,), timeout=300, check=False)
    os.close(write)
    terminal = os.read(read, 65536).decode()
    assert out.returncode == 0, log.read_text()
    assert [line.split(": ", 1)[1].split(" (")[0] for line in terminal.splitlines()] == [
        f"demo cohort: {n}/3 cases" for n in (1, 2, 3)]
    assert all(" ctvlp example: " in line for line in terminal.splitlines())
    logged = log.read_text()
    assert "ctvlp.progress: demo cohort: 3/3 cases" in logged and "ctvlp example on" in logged
    assert "\r" not in logged


def test_train_seed_varies_training_alone():
    """train.seed: training randomness only; unset, training follows the global seed (which also
    draws the cohort and the split, so that seed alone cannot vary training on the same cases)."""
    from ctvlp import config
    from ctvlp.cli import training_seed

    default = config.validate({"seed": 3})
    assert default["train"]["seed"] is None and training_seed(default) == 3
    own = config.validate({"seed": 3, "train": {"seed": 11}})
    assert training_seed(own) == 11 and own["seed"] == 3
    with pytest.raises(config.ConfigError):
        config.validate({"train": {"seed": -1}})
