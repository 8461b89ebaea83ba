"""One results folder, one workflow run: a lock file inside the results folder itself.

Snakemake's own lock lives in the working directory's ``.snakemake``, so two checkouts (or two
working directories) writing one results folder never see each other. This lock lives in
``<results>/.ctvlp/lock``: a small JSON file with the holder's host, PID, start time, user,
working directory, checkout and command, and a random token.

- The workflow takes it in ``onstart`` (before any job runs) and releases it in ``onsuccess`` and
  ``onerror`` (and at interpreter exit). It exports the token as ``CTVLP_RUN_LOCK`` to its jobs:
  local jobs inherit the environment, and the SLURM executor submits with ``--export=ALL``.
- Every ``ctvlp`` stage command checks it (``check``): a stage whose output lies in a locked
  results folder stops at once naming the holder, unless it carries the holder's token (it is a
  job of the holding run). Stages run by hand do not take the lock, so several may run at once.
- A lock is stale when its holder is gone: same host and the PID is not alive (or the PID was
  reused by a process started later). A stale lock is taken over with a message. A holder on
  another host cannot be checked from here: its lock holds until ``ctvlp unlock --results DIR``.
- The lock file is created with O_CREAT|O_EXCL; a stale one is first renamed aside, so two runs
  that find the same stale lock do not both take over.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import secrets
import shlex
import socket
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "CTVLP_RUN_LOCK"  # the holding run's token, exported to its jobs
LOCK = Path(".ctvlp") / "lock"
# a lock file without readable content (a writer killed between create and write) younger than this
# is taken to be being written; older, it is stale
_DAMAGED_GRACE_S = 5.0


class RunLockedError(RuntimeError):
    """The results folder is held by another live workflow run."""


def lock_path(results) -> Path:
    return Path(results) / LOCK


def _pid_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]  # field 22 of stat; the name may hold spaces


def _redact(text: str) -> str:
    """Credentials in a URL (scheme://user:password@host) replaced by ***."""
    return re.sub(r"(://)[^/\s@]+@", r"\1***@", text)


def holder_info(results, command: str | None = None, checkout=None) -> dict:
    """What a new lock records about this process."""
    return {
        "token": secrets.token_hex(16),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _pid_start(os.getpid()),
        "started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "user": _user(),
        "cwd": os.getcwd(),
        "checkout": str(checkout) if checkout is not None else None,
        "command": _redact(command if command is not None else shlex.join(sys.argv)),
        "results": str(Path(results).resolve()),
    }


def _user() -> str | None:
    with contextlib.suppress(Exception):
        import getpass

        return getpass.getuser()
    return None


def read(results) -> dict | None:
    """The lock's content; None when there is no lock; {} when it cannot be read as a lock."""
    path = lock_path(results)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) and "token" in info and "pid" in info else {}


def state(info: dict, path: Path | None = None) -> str:
    """'alive', 'dead' (the holder is gone: the lock is stale), 'remote' (held from another host,
    which cannot be checked from here) or 'damaged' (unreadable and older than a few seconds)."""
    if not info:
        with contextlib.suppress(OSError):
            if path is not None and time.time() - path.stat().st_mtime < _DAMAGED_GRACE_S:
                return "alive"  # being written right now
        return "damaged"
    if info.get("host") != socket.gethostname():
        return "remote"
    try:
        pid = int(info["pid"])
        if pid <= 0:  # os.kill would signal a process group
            return "dead"
        os.kill(pid, 0)
    except (ValueError, TypeError, OverflowError, ProcessLookupError):
        return "dead"
    except PermissionError:
        pass  # alive, another user's process
    except OSError:
        return "dead"
    recorded, now = info.get("pid_start"), _pid_start(pid)
    if recorded is not None and now is not None and recorded != now:
        return "dead"  # the PID was reused by a later process
    return "alive"


def describe(info: dict, results=None) -> str:
    """The holder in words (host, PID, start time, where from)."""
    if not info:
        return f"an unreadable lock file ({lock_path(results) if results is not None else LOCK})"
    parts = [f"host {info.get('host')}", f"PID {info.get('pid')}", f"started {info.get('started')}"]
    if info.get("user"):
        parts.append(f"user {info['user']}")
    if info.get("cwd"):
        parts.append(f"working directory {info['cwd']}")
    if info.get("checkout") and info.get("checkout") != info.get("cwd"):
        parts.append(f"checkout {info['checkout']}")
    if info.get("command"):
        parts.append(f"command: {info['command']}")
    return ", ".join(parts)


def _held_message(results, info: dict, what: str, st: str) -> str:
    path = lock_path(results)
    msg = (f"results folder {Path(results).resolve()} is in use by another ctvlp workflow run ({describe(info, results)}); "
           f"{what}. Lock file: {path}.")
    if st == "remote":
        msg += (f" That run is on another host, so whether it still runs cannot be checked from here: if it is gone, "
                f"run `ctvlp unlock --results {shlex.quote(str(results))}`, then try again.")
    else:
        msg += " Wait for it to finish (or stop it), or use another results folder."
    return msg


def _create(path: Path, info: dict) -> bool:
    """Write ``info`` to a new lock file; False when one exists already."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, (json.dumps(info, indent=1) + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _set_aside(path: Path, seen: dict, token: str) -> dict | None:
    """Rename the stale lock at ``path`` aside; what was renamed, or None when another process
    changed the lock since it was read (the change is put back)."""
    aside = path.with_name(f"lock.stale-{token}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return None
    renamed = read_file(aside)
    if renamed.get("token") != seen.get("token"):
        with contextlib.suppress(OSError):
            os.link(aside, path)  # someone else's fresh lock: put it back unless yet another exists
        aside.unlink(missing_ok=True)
        return None
    aside.unlink(missing_ok=True)
    return renamed


def read_file(path: Path) -> dict:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def acquire(results, command: str | None = None, checkout=None) -> dict:
    """Take the lock of ``results`` (an existing folder) for this process: its record (with the
    token). RunLockedError naming the holder when another live run holds it; a stale lock (its
    holder gone) is taken over with a warning."""
    path = lock_path(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = holder_info(results, command, checkout)
    deadline = time.monotonic() + _DAMAGED_GRACE_S + 2
    while time.monotonic() < deadline:
        if _create(path, info):
            return info
        held = read(results)
        if held is None:
            continue  # released in between
        st = state(held, path)
        if st == "alive" and not held:
            time.sleep(0.2)  # being written by another process: read it again
            continue
        if st in ("alive", "remote"):
            raise RunLockedError(_held_message(results, held, "this run stops before any job", st))
        if _set_aside(path, held, info["token"]) is not None:
            why = "its holder is gone" if st == "dead" else "its lock file was unreadable"
            print(f"ctvlp: taking over the stale lock of results folder {Path(results).resolve()} ({why}): "
                  f"{describe(held, results)}", file=sys.stderr)
    raise RunLockedError(f"results folder {Path(results).resolve()}: could not take its lock {path} "
                         "(other processes keep changing it)")


def release(results, token: str) -> bool:
    """Remove the lock of ``results`` if ``token`` holds it; True when removed."""
    held = read(results)
    if not held or held.get("token") != token:
        return False
    lock_path(results).unlink(missing_ok=True)
    return True


def unlock(results) -> dict | None:
    """Remove the lock of ``results`` whoever holds it, except a live process on this host
    (RunLockedError: stop it first). The removed lock's record, or None when there was none."""
    path = lock_path(results)
    held = read(results)
    if held is None:
        return None
    if held and state(held, path) == "alive":
        raise RunLockedError(_held_message(results, held, "it is alive on this host: stop it (or wait) instead of "
                                           "unlocking", "alive"))
    path.unlink(missing_ok=True)
    return held


# ---- the workflow's side (Snakefile onstart/onsuccess/onerror) ---------------------------------------------


_taken: dict[str, str] = {}  # results folder -> token, taken by this process


def acquire_for_workflow(results, checkout=None) -> dict:
    """onstart: take the lock, export its token to the jobs (``CTVLP_RUN_LOCK``), release it at exit
    should onsuccess/onerror not run (an exception, Ctrl-C)."""
    import atexit

    info = acquire(results, checkout=checkout)
    os.environ[ENV] = info["token"]
    _taken[str(Path(results).resolve())] = info["token"]
    atexit.register(release_for_workflow, results)
    return info


def release_for_workflow(results) -> bool:
    """onsuccess/onerror: release the lock this process took (no-op when it holds none)."""
    token = _taken.pop(str(Path(results).resolve()), None)
    return release(results, token) if token else False


def warning_if_held(results) -> str | None:
    """At parse time (also under -n, --report, --unlock, which take no lock): a warning when another
    live run holds ``results``; None when free, stale or held by the run this process is a job of."""
    held = read(results)
    if held is None or (held and held.get("token") == os.environ.get(ENV)):
        return None
    st = state(held, lock_path(results))
    if st in ("dead", "damaged"):
        return None
    return _held_message(results, held, "a run (not a dry run, report or unlock) on it stops at start", st)


# ---- the stages' side (ctvlp <stage>) ------------------------------------------------------------------------


def check(paths, token: str | None = None) -> None:
    """Before a stage writes ``paths``: RunLockedError when one lies in a results folder held by a
    live workflow run whose token is not ``token`` (default: ``CTVLP_RUN_LOCK``). A stale lock is
    only reported (the next workflow run takes it over)."""
    from .workspace import find_results_root

    token = os.environ.get(ENV) if token is None else token
    roots = {root for p in paths if p and (root := find_results_root(Path(p))) is not None}
    for root in sorted(roots):
        held = read(root)
        if held is None:
            continue
        if held and token and held.get("token") == token:
            log.info("results folder %s: held by this workflow run (PID %s on %s)", root, held.get("pid"),
                     held.get("host"))
            continue
        st = state(held, lock_path(root))
        if st in ("dead", "damaged"):
            log.warning("results folder %s has a stale lock (%s); going on", root, describe(held, root))
            continue
        raise RunLockedError(_held_message(root, held, "a stage run by hand must not write into it now", st))
