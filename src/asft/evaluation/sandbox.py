"""Run model-written programs in a sandbox: one fresh child process per program, never in our own process.

Every program gets, always:
  - its own `python -I -B` process (isolated mode: no user site, no PYTHON* variables, no script dir on sys.path)
    in its own session, killed as a whole process group when its wall-clock timeout expires;
  - resource limits set inside the child (resource.setrlimit): CPU seconds, address space, number of processes,
    file size, no core dumps;
  - a fresh temporary working directory (also its HOME and TMPDIR), removed afterwards;
  - a minimal environment: PATH, LANG and the thread counts, nothing inherited (no tokens, no keys);
  - destructive calls switched off inside the child (os.kill, os.system, fork, remove, subprocess, ...), as
    defence in depth only.
And, where the machine allows unprivileged namespaces (util-linux `unshare` present, user namespaces enabled):
  - a user + PID namespace: the program is PID 1 of its own tree, cannot see or signal any process of ours
    (not its parent, not `kill(-1)`; `kill(0)` signals its own process group, whose one other member is its
    `unshare` wrapper, whose death kills the program: a self-kill, as it is without namespaces), and the whole
    tree dies with it; RLIMIT_NPROC then counts its own
    processes only, so a fork bomb stops at the limit;
  - a network namespace with no interface but a down loopback: no network at all;
  - a mount namespace where the working directory is a fresh tmpfs of `max_disk_mb` (a program cannot fill the
    disk) and everything else is read-only, locked by a nested user
    namespace so the program cannot remount it writable, and where the usual credential paths of the home
    directory are covered by empty ones: the whole home when the interpreter, asft and the temp dir lie outside
    it, else ~/.ssh, ~/.aws, ~/.cache/huggingface, ~/.netrc, ... (and $HF_HOME wherever it is).
Which of these were active is measured once, from inside a probe child, and reported (`Sandbox.protections`):
never assumed. `isolation="required"` refuses to run without the namespaces; "off" never uses them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import EvalError

CHILD = Path(__file__).with_name("sandbox_child.py")
ISOLATIONS = ("auto", "required", "off")
UNSHARE_FLAGS = ["--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child"]
STATUS_BYTES = 4096
# Where tokens and keys usually live in a home directory that cannot be hidden whole.
CREDENTIALS = (
    ".ssh",
    ".aws",
    ".azure",
    ".config/gcloud",
    ".config/gh",
    ".cache/huggingface",
    ".huggingface",
    ".netrc",
    ".git-credentials",
    ".pypirc",
    ".docker",
    ".kube",
    ".gnupg",
    ".password-store",
    ".npmrc",
)
PASSED = "passed"


@dataclass(frozen=True)
class Limits:
    timeout: float = 5.0  # wall-clock seconds per program
    memory_mb: int = 2048  # address space
    max_processes: int = 64  # RLIMIT_NPROC (a fork bomb's ceiling where a user namespace counts them)
    max_file_mb: int = 16  # largest file the program may write
    max_disk_mb: int = 64  # isolated: the size of the tmpfs that is its working directory


@dataclass(frozen=True)
class Outcome:
    status: str  # passed | failed | error | syntax_error | timeout | memory | killed | exited | sandbox_error
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.status == PASSED


def _environment(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _under(path: str, folder: str) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(folder).rstrip("/") + "/")


def credential_paths() -> list[str]:
    """A home directory wholly, when nothing the child needs (the interpreter, asft, the temp dir) lies in it;
    else its usual credential paths."""
    needed = [sys.prefix, sys.base_prefix, sys.executable, str(CHILD), tempfile.gettempdir()]
    paths = []
    for home in sorted({str(Path.home()), os.path.expanduser("~root")}):
        if not os.path.isdir(home) or home == "/":
            continue
        if any(_under(p, home) for p in needed):
            paths += [os.path.join(home, name) for name in CREDENTIALS]
        else:
            paths.append(home)
    paths += [
        os.environ[v]
        for v in ("HF_HOME", "HF_TOKEN_PATH")
        if os.environ.get(v) and not any(_under(p, os.environ[v]) for p in needed)
    ]
    return [os.path.realpath(p) for p in paths if os.path.lexists(p)]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Sandbox:
    def __init__(self, limits: Limits = Limits(), isolation: str = "auto", python: str | None = None):
        if isolation not in ISOLATIONS:
            raise EvalError(f"sandbox isolation: unknown value {isolation!r}; expected {', '.join(ISOLATIONS)}")
        self.limits, self.python = limits, python or sys.executable
        self.unshare = shutil.which("unshare") if isolation != "off" else None
        self.isolate, self.facts, self.why_not = False, {}, "turned off (isolation off)"
        self.hidden = credential_paths() if isolation != "off" else []
        if isolation != "off":
            self._probe()
        if isolation == "required" and not self.isolate:
            raise EvalError(
                f"code sandbox: namespaces are required but unavailable here ({self.why_not}); run on "
                "a machine that allows unprivileged user namespaces, or pass --code_isolation auto"
            )

    # ------------------------------------------------------------------------------------------------- probing

    def _probe(self) -> None:
        """Start one isolated child that measures what it got; use namespaces only if all of them hold."""
        if self.unshare is None:
            self.why_not = "util-linux `unshare` not found"
            return
        self.isolate = True
        raw = self._spawn("", probe=True, timeout=max(self.limits.timeout, 10.0))
        if raw.get("status") != "probe":
            self.isolate = False
            self.why_not = f"`unshare {' '.join(UNSHARE_FLAGS)}` does not work here ({raw.get('reason')})"
            return
        if raw.get("setup_error") or not raw.get("facts"):
            self.isolate, self.why_not = False, f"namespace setup failed: {raw.get('setup_error')}"
            return
        facts = raw["facts"]
        self.facts, self.why_not = facts, ""
        missing = [name for name, ok in facts.items() if not ok]
        if missing:
            self.isolate, self.why_not = False, f"probe found no {', '.join(missing)}"

    @property
    def protections(self) -> dict:
        """What every program run by this sandbox gets: reported in the output and in results.json."""
        iso = self.isolate
        return {
            "child_process": True,
            "process_group_kill_on_timeout": True,
            "rlimits": asdict(self.limits),
            "temporary_workdir": True,
            "clean_environment": True,
            "destructive_calls_disabled": True,
            "pid_namespace": iso,
            "network_namespace": iso,
            "read_only_filesystem": iso,
            "hidden_credential_paths": self.hidden if iso else [],
            "fork_bomb_bounded": iso or (os.geteuid() != 0),
            "namespaces": "active" if iso else f"inactive: {self.why_not}",
        }

    def describe(self) -> str:
        if self.isolate:
            return (
                "code sandbox: child process per program with rlimits, temp dir, clean env; namespaces active "
                "(own PID tree, no network, read-only filesystem outside its directory)"
            )
        return (
            f"code sandbox: child process per program with rlimits, temp dir, clean env; namespaces INACTIVE "
            f"({self.why_not}): programs can read and write your files and reach the network"
        )

    # ---------------------------------------------------------------------------------------------- running

    def _command(self, workdir: str, status_fd: int, probe: bool, timeout: float) -> list[str]:
        lim = self.limits
        cfg = {
            "isolate": self.isolate,
            "probe": probe,
            "hide": self.hidden,
            "cpu_seconds": max(1, math.ceil(timeout)),
            "memory_mb": lim.memory_mb,
            "max_processes": lim.max_processes,
            "max_file_mb": lim.max_file_mb,
            "max_disk_mb": lim.max_disk_mb,
        }
        cmd = [self.python, "-I", "-B", str(CHILD), str(status_fd), workdir, json.dumps(cfg)]
        return [self.unshare, *UNSHARE_FLAGS, *cmd] if self.isolate else cmd

    def _spawn(self, program: str, *, probe: bool = False, timeout: float | None = None) -> dict:
        """Run one program; the child's verdict as a dict, or the parent's when the child gave none."""
        timeout = self.limits.timeout if timeout is None else timeout
        workdir = tempfile.mkdtemp(prefix="asft-sandbox-")
        try:
            # realpath: the child compares it with /proc/self/mountinfo, which shows resolved paths
            workdir = os.path.realpath(workdir)
            Path(workdir, "program.py").write_text(program, encoding="utf-8")
            read_fd, write_fd = os.pipe()
            try:
                proc = subprocess.Popen(
                    self._command(workdir, write_fd, probe, timeout),
                    cwd=workdir,
                    env=_environment(workdir),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    pass_fds=(write_fd,),
                    start_new_session=True,
                )
            finally:
                os.close(write_fd)
            try:
                timed_out = self._wait(proc, timeout)
                return self._verdict(proc.returncode, timed_out, self._read(read_fd), timeout)
            finally:
                os.close(read_fd)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    @staticmethod
    def _wait(proc: subprocess.Popen, timeout: float) -> bool:
        try:
            proc.wait(timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        # Always: whatever the program left behind in its group (or, isolated, its PID namespace) dies now.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        return timed_out

    @staticmethod
    def _read(fd: int) -> bytes:
        os.set_blocking(fd, False)
        try:
            return os.read(fd, STATUS_BYTES)
        except BlockingIOError:
            return b""

    @staticmethod
    def _verdict(returncode: int, timed_out: bool, raw: bytes, timeout: float) -> dict:
        try:
            reported = json.loads(raw.decode()) if raw else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            reported = None
        if isinstance(reported, dict) and isinstance(reported.get("status"), str):
            return reported
        if timed_out:
            return {"status": "timeout", "reason": f"no result within {timeout:g} s (killed)"}
        if returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
            return {"status": "timeout", "reason": "CPU-time limit reached (SIGXCPU)"}
        if returncode < 0 or returncode > 128:
            number = -returncode if returncode < 0 else returncode - 128
            return {"status": "killed", "reason": f"killed by {_signal_name(number)}"}
        return {"status": "exited", "reason": f"exited with code {returncode} before its tests finished"}

    def run(self, program: str, timeout: float | None = None) -> Outcome:
        """Run one program (`timeout` overrides the limits' wall-clock seconds, and the CPU seconds with it)."""
        raw = self._spawn(program, timeout=timeout)
        return Outcome(str(raw["status"]), str(raw.get("reason", "")))

    def run_many(
        self,
        programs: Iterable[str | tuple[str, float]],
        workers: int,
        on_done: Callable[[int, Outcome], None] | None = None,
    ) -> list[Outcome]:
        """Run programs (or (program, timeout) pairs) in parallel; each worker thread waits on one child at a
        time. Results in input order."""
        jobs = [p if isinstance(p, tuple) else (p, None) for p in programs]
        results: list[Outcome | None] = [None] * len(jobs)
        lock = threading.Lock()

        def one(i: int) -> None:
            outcome = self.run(*jobs[i])
            with lock:
                results[i] = outcome
                if on_done is not None:
                    on_done(i, outcome)

        with ThreadPoolExecutor(max(1, workers)) as pool:
            list(pool.map(one, range(len(jobs))))
        return results  # type: ignore[return-value]
