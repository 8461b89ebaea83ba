"""A real, private, one-node SLURM cluster for the workflow tests (not a test module).

Debian's ``slurm-wlm`` (22.05) and ``munge`` (installed by .ci/slurm_setup.sh) run here without
systemd: this helper starts its own ``munged``, ``slurmctld`` and ``slurmd`` as root, in the
foreground under ``subprocess.Popen``, with every key, socket, pid file, spool, state and log file
inside the folder it is given, and free TCP ports, so it never touches a system munged/slurm
and two runs (or a stale leftover) cannot collide. On exit it cancels the jobs still queued and
ends only the processes it started, by PID (SIGTERM, then SIGKILL).

    with SlurmCluster(tmp_path / "slurm") as cluster:
        subprocess.run(["sbatch", "--wrap", "hostname"], env=cluster.env, check=True)

``cluster.env`` is a full environment for subprocesses (``os.environ`` without inherited
``SLURM_*`` variables, plus ``SLURM_CONF`` and a PATH with an ``srun`` shim, see
_write_srun_shim); ``cluster.partition`` is "debug"; ``cluster.snakemake_args()`` the snakemake
options that work against it.

No accounting daemon (slurmdbd) runs, so ``sacct``/``sacctmgr``/``sshare`` fail: snakemake's slurm
executor must be told ``--slurm-status-command squeue``; accounts are not enforced. MinJobAge
is long (see __init__) so a job finished between two status polls is still listed by
``squeue --states=all``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scancel")
# AF_UNIX socket paths are limited to 107 bytes; slurmd puts per-step sockets
# "<node>_<jobid>.<step>" (up to ~30 bytes) into its spool folder.
_MAX_BASE_LEN = 60


class SlurmUnavailable(pytest.skip.Exception):
    """SLURM cannot run here (binaries missing, not root). A pytest skip: raised in a test or
    fixture it skips that test with ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason, allow_module_level=True)
        self.reason = reason


def missing_requirements() -> str | None:
    """Why a private cluster cannot run here (None when it can)."""
    missing = [b for b in DAEMONS if shutil.which(b, path=_sbin_path()) is None]
    if missing:
        return f"SLURM/munge binaries not found: {', '.join(missing)} (run .ci/slurm_setup.sh)"
    if os.geteuid() != 0:
        return "a private SLURM cluster needs root (slurmd runs jobs as their user; munged as root)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin_path() -> str:
    # the daemons live in /usr/sbin, which a non-login shell's PATH may lack
    path = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return os.pathsep.join(path + [p for p in ("/usr/sbin", "/sbin") if p not in path])


def _mem_total_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


class SlurmCluster:
    """munged + slurmctld + slurmd for one node (this host), all private to ``root``.

    Attributes after start(): ``env`` (environment for subprocesses), ``partition`` ("debug"),
    ``conf`` (the slurm.conf path), ``node`` (the node name), ``root`` (the folder given).
    """

    partition = "debug"

    def __init__(self, root: Path, *, start_timeout_s: float = 60.0, min_job_age_s: int = 600):
        self.root = Path(root).resolve()
        self.start_timeout_s = start_timeout_s
        # Completed jobs stay visible to squeue for MinJobAge seconds. The slurm executor
        # needs the final state from squeue (its polls drift apart by 10 s each), and it
        # falls back to the (broken here) sacct when MinJobAge is below
        # 3 * --slurm-init-seconds-before-status-checks.
        self.min_job_age_s = min_job_age_s
        self.node = socket.gethostname().split(".")[0]
        self.env: dict[str, str] = {}
        self.conf = Path()
        self._procs: dict[str, subprocess.Popen] = {}
        self._alias: Path | None = None  # short symlink to root, when root's path is too long

    # ---- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> SlurmCluster:
        reason = missing_requirements()
        if reason:
            raise SlurmUnavailable(reason)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        base = self.root
        if len(str(base)) > _MAX_BASE_LEN:
            # keep every file inside root, but name it through a short path for the sockets
            self._alias = Path(tempfile.mkdtemp(prefix="slurm-"))
            (self._alias / "c").symlink_to(self.root)
            base = self._alias / "c"
        self._refuse_live_leftover(base)
        for sub in ("munge", "ctld", "spool", "log", "bin"):
            (base / sub).mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)  # munged refuses a key/socket under a group/world-writable dir
        self.conf = base / "slurm.conf"
        # what every daemon and client needs; inherited SLURM_* (a test run inside a SLURM job)
        # would point sbatch/srun at the wrong cluster or job
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env.update(SLURM_CONF=str(self.conf), PATH=os.pathsep.join([str(base / "bin"), _sbin_path()]))
        self._write_srun_shim(base / "bin" / "srun")

        munge_socket = base / "munge" / "munge.socket"
        self._start_munged(base / "munge", munge_socket)

        self.conf.write_text(self._slurm_conf(base, munge_socket, free_port(), free_port()))

        # -D: stay in the foreground, so the Popen PID is the daemon's PID;
        # -c: ignore any job state a previous run left in this folder
        log = base / "log"
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)], log)
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node], log)
        self._wait_idle()

    @staticmethod
    def _refuse_live_leftover(base: Path) -> None:
        # A new slurmctld would SIGTERM the one named in its pid file, and munged --force
        # would take over its socket: never reuse a folder whose daemons still run.
        for pid_file in (base / "slurmctld.pid", base / "slurmd.pid", base / "munge" / "munged.pid"):
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if Path(f"/proc/{pid}").exists():
                raise RuntimeError(f"{pid_file} names a running process ({pid}): "
                                   "a cluster from an earlier run still uses this folder")

    def _write_srun_shim(self, path: Path) -> None:
        # snakemake-executor-plugin-slurm-jobstep 0.6.1 runs the job's inner `srun` with every
        # SLURM_* variable but a few job ids removed, SLURM_CONF included, so srun falls back to
        # /etc/slurm/slurm.conf, then to DNS SRV records, and fails ("Could not establish a
        # configuration source"). PATH survives (sbatch --export=ALL), so this srun, first on
        # PATH, puts our SLURM_CONF back before running the real one.
        real = shutil.which("srun", path=_sbin_path())
        path.write_text(
            "#!/bin/sh\n"
            f'[ -n "$SLURM_CONF" ] || {{ SLURM_CONF={shlex.quote(str(self.conf))}; export SLURM_CONF; }}\n'
            f'exec {shlex.quote(real)} "$@"\n'
        )
        path.chmod(0o755)

    def _start_munged(self, folder: Path, sock: Path) -> None:
        key = folder / "munge.key"
        if not key.exists():
            # a fresh random key: only our own munged and slurm daemons read it
            subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True,
                           capture_output=True, env=self.env)
        os.chmod(key, 0o400)
        self._spawn("munged", [
            "munged", "--foreground", "--force",
            f"--key-file={key}", f"--socket={sock}", f"--pid-file={folder / 'munged.pid'}",
            f"--log-file={folder / 'munged.log'}", f"--seed-file={folder / 'munged.seed'}",
        ], folder)
        deadline = time.monotonic() + 15
        while not sock.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged made no socket within 15 s:\n{self.log_tail()}")
            time.sleep(0.1)

    def _slurm_conf(self, base: Path, munge_socket: Path, ctld_port: int, slurmd_port: int) -> str:
        cpus = os.cpu_count() or 1
        mem = max(256, int(_mem_total_mb() * 0.9))  # below MemTotal, or slurmd drains the node
        log = base / "log"
        return f"""\
# private one-node test cluster written by tests/slurm_cluster.py
ClusterName=ctvlptest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={base / 'ctld'}
SlurmdSpoolDir={base / 'spool'}
SlurmctldPidFile={base / 'slurmctld.pid'}
SlurmdPidFile={base / 'slurmd.pid'}
SlurmctldLogFile={log / 'slurmctld.log'}
SlurmdLogFile={log / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups, no accounting daemon: nothing outside this folder is needed
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# trust the CPUs/RealMemory below even if the hardware topology reports more detail
SlurmdParameters=config_overrides
ReturnToService=2
# start a submitted job at the next 1 s scheduler tick rather than after up to 2-3 s
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
MinJobAge={self.min_job_age_s}
KillWait=5
InactiveLimit=0
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def _spawn(self, name: str, cmd: list[str], log_dir: Path) -> None:
        with open(log_dir / f"{name}.out", "ab") as out:
            # own session: a Ctrl-C aimed at pytest does not kill the daemons half-way;
            # stop() ends them in order
            self._procs[name] = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True, executable=shutil.which(cmd[0], path=_sbin_path()),
            )

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{self.log_tail()}")

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        state = ""
        while time.monotonic() < deadline:
            self._check_alive()
            r = self.run(["sinfo", "-h", "-o", "%t"], check=False)
            state = r.stdout.strip()
            if r.returncode == 0 and state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(
            f"node not idle within {self.start_timeout_s:.0f} s (sinfo: {state!r}):\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Cancel our jobs, then end the daemons this object started, by PID, newest first."""
        if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
            self.run(["scancel", "--partition", self.partition], check=False)
            self._wait_queue_empty(15)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._alias is not None:
            shutil.rmtree(self._alias, ignore_errors=True)  # the link and its folder, not root
            self._alias = None

    def _wait_queue_empty(self, timeout_s: float) -> None:
        # the jobs' slurmstepd processes are not our children; let slurmd end them
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            r = self.run(["squeue", "-h", "-o", "%i"], check=False)  # default: unfinished jobs
            if r.returncode != 0 or not r.stdout.strip():
                return
            time.sleep(0.5)

    # ---- helpers for tests -----------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        """Run a SLURM client command (sbatch, squeue, ...) against this cluster."""
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check,
                              timeout=kw.pop("timeout", 30), **kw)

    def snakemake_args(self, status_interval_s: int = 7) -> list[str]:
        """Options for ``snakemake`` (snakemake-executor-plugin-slurm 2.8) to run on this cluster.

        The executor polls first after ``status_interval_s``, then 10 s later than last time
        for every poll that finds no job finished (back to ``status_interval_s`` when one has).
        A trivial rule takes ~5 s as a job here (scheduling ~1 s, then snakemake starts twice:
        in the batch job and in its srun step), so 7 s usually catches it at the first poll.
        No slurm_account needed: without one the executor warns ("Unable to guess SLURM
        account") and submits without -A; a given one (e.g. slurm_account=none) passes too, as
        sacctmgr/sshare answer empty without slurmdbd and sbatch does not enforce -A here.
        No slurm_partition either: the executor finds the default one with sinfo, and a
        --default-resources here would be replaced by the caller's own (the last one wins).
        """
        return [
            "--executor", "slurm",
            "--slurm-status-command", "squeue",
            "--slurm-init-seconds-before-status-checks", str(status_interval_s),
            "--seconds-between-status-checks", str(status_interval_s),
        ]

    # pending reasons that no amount of waiting resolves on this one-node cluster
    NEVER_RUNS = ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints",
                  "ReqNodeNotAvail", "Resources_Unavailable", "InvalidAccount", "InvalidQOS")

    def unschedulable(self) -> list[str]:
        """Pending jobs this cluster can never start (e.g. more CPUs than the node has), as
        ``squeue`` lines: a caller fails at once rather than waiting out its timeout."""
        r = self.run(["squeue", "-h", "-t", "PD", "-o", "%i %j %r cpus=%C mem=%m time=%l"], check=False)
        return [line for line in r.stdout.splitlines() if any(f" {reason} " in line for reason in self.NEVER_RUNS)]

    def run_client(self, cmd: list[str], env: dict, timeout_s: float, poll_s: float = 5.0) -> subprocess.CompletedProcess:
        """Run ``cmd`` (snakemake submitting to this cluster) to its end, or stop it as soon as one
        of its jobs is unschedulable (failing the test with that job) or ``timeout_s`` passes."""
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
            deadline = time.monotonic() + timeout_s
            stuck = []
            try:
                while proc.poll() is None:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{cmd[:4]}... still running after {timeout_s:.0f} s")
                    stuck = self.unschedulable()
                    if stuck:
                        raise AssertionError("a job this cluster can never run (its request exceeds the node):\n"
                                             + "\n".join(stuck))
                    time.sleep(poll_s)
            finally:
                if proc.poll() is None:
                    proc.kill()  # our own child; its submitted jobs end with the cluster
                    proc.wait()
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self._procs.items() if p.poll() is None}

    def log_tail(self, n: int = 20) -> str:
        parts = []
        for f in sorted(self.root.glob("log/*")) + sorted(self.root.glob("munge/*.log")):
            lines = f.read_text(errors="replace").splitlines()[-n:]
            if lines:
                parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)
