"""The child side of the code sandbox: run by `python -I -B` in a fresh process, never imported by asft.

argv: STATUS_FD WORKDIR CONFIG_JSON. The program to run is WORKDIR/program.py. In order:

1. with "isolate" (we run inside `unshare --user --map-root-user --net --mount --pid --fork --mount-proc`): cover
   the credential paths listed in "hide" (empty tmpfs over a folder, /dev/null over a file), cover WORKDIR with a
   fresh size-limited tmpfs (its program read first), remount every other mount read-only, then enter a second
   user + mount namespace, whose copy of the
   mounts the kernel locks (a less privileged namespace cannot clear their read-only flag), so the program,
   root-looking as it is, cannot remount them writable again;
2. resource limits (CPU seconds, address space, processes, file size, no core dumps);
3. compile the program (a syntax error is a verdict of its own);
4. switch destructive calls off (defence in depth only: the limits and namespaces are the sandbox);
5. run it, and write one JSON verdict to STATUS_FD: {"status": passed | failed | error | memory | syntax_error |
   exited, "reason": ...}. A process that dies without writing one is judged by the parent (timeout, signal).

Standard library only: this file runs in a bare interpreter.
"""

import builtins
import ctypes
import json
import os
import resource
import signal
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE = 1024, 2048, 4096, 16384, 1 << 18
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
# A remount must repeat the flags the kernel locked on an inherited mount, or it is refused (EPERM).
KEEP_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
REASON_CHARS = 500


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _mount(libc, source, target: str, flags: int, fstype: str | None = None, data: str | None = None) -> None:
    src = source.encode() if source else None
    kind = fstype.encode() if fstype else None
    if libc.mount(src, target.encode(), kind, ctypes.c_ulong(flags), data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _unescape(path: str) -> str:
    """/proc/self/mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, char)
    return path


def _mounts() -> list[tuple[str, list[str]]]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            out.append((_unescape(fields[4]), fields[5].split(",")))
    return out


def hide(libc, paths: list[str], workdir: str) -> None:
    """Cover credential folders with an empty tmpfs and credential files with /dev/null: the program could
    otherwise read a token and print it into the results (it has no network to send it anywhere)."""
    for path in paths:
        if workdir.startswith(path.rstrip("/") + "/") or os.path.islink(path):
            continue
        if os.path.isdir(path):
            _mount(libc, "tmpfs", path, MS_NOSUID | MS_NODEV | MS_NOEXEC, "tmpfs")
        elif os.path.isfile(path):
            _mount(libc, "/dev/null", path, MS_BIND)


def make_read_only(workdir: str, hidden: list[str], disk_mb: int) -> None:
    """Credentials hidden, WORKDIR replaced by a fresh tmpfs of `disk_mb` (a program cannot fill the real disk),
    everything else read-only, locked by a nested user namespace (see the module's docstring)."""
    libc = _libc()
    _mount(libc, None, "/", MS_REC | MS_PRIVATE)
    hide(libc, hidden, workdir)
    _mount(libc, "tmpfs", workdir, MS_NOSUID | MS_NODEV, "tmpfs", f"size={int(disk_mb)}m,mode=700")
    for target, options in _mounts():
        if target == workdir or "ro" in options:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in options:
            flags |= KEEP_FLAGS.get(option, 0)
        _mount(libc, None, target, flags)
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"nested unshare: {os.strerror(err)}")


def set_limits(cfg: dict) -> None:
    cpu = int(cfg["cpu_seconds"])
    memory = int(cfg["memory_mb"]) * 1024 * 1024
    for which, value in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (memory, memory)),
        (resource.RLIMIT_NPROC, (cfg["max_processes"],) * 2),
        (resource.RLIMIT_FSIZE, (int(cfg["max_file_mb"]) * 1024 * 1024,) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        resource.setrlimit(which, value)
    # Writing past the file-size limit then fails with an OSError the program sees, instead of a silent kill.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def disable_destructive_calls() -> None:
    """Remove what a careless program could use to harm the machine or the harness. A determined program can get
    around this (ctypes); it is a second line behind the limits and namespaces, never the sandbox itself."""
    import shutil
    import subprocess

    for module in (os, sys.modules.get("posix")):
        for name in (
            "kill",
            "killpg",
            "system",
            "popen",
            "fork",
            "forkpty",
            "vfork",
            "execv",
            "execve",
            "execvp",
            "execvpe",
            "execl",
            "execle",
            "execlp",
            "execlpe",
            "spawnv",
            "spawnve",
            "spawnvp",
            "spawnvpe",
            "posix_spawn",
            "posix_spawnp",
            "putenv",
            "unsetenv",
            "remove",
            "unlink",
            "rmdir",
            "removedirs",
            "rename",
            "renames",
            "replace",
            "truncate",
            "ftruncate",
            "chmod",
            "fchmod",
            "lchmod",
            "chown",
            "fchown",
            "lchown",
            "chroot",
            "fchdir",
            "link",
            "symlink",
            "setuid",
            "setgid",
            "seteuid",
            "setegid",
            "setreuid",
            "setregid",
            "setresuid",
            "setresgid",
            "setsid",
            "setpgid",
            "setpgrp",
            "sched_setaffinity",
            "nice",
            "plock",
            "_exit",
            "abort",
        ):
            if module is not None and hasattr(module, name):
                setattr(module, name, None)
    for name in ("rmtree", "move", "chown", "copytree"):
        setattr(shutil, name, None)
    subprocess.Popen = None
    signal.pthread_kill = None
    builtins.help = None
    for name in ("ipdb", "joblib", "psutil", "resource", "tkinter", "multiprocessing", "_posixsubprocess"):
        sys.modules[name] = None


def probe_facts(workdir: str, hidden: list[str]) -> dict:
    """What the sandbox actually achieved, measured from inside (the parent reports these, never assumes them)."""
    import socket

    outside = os.path.join(os.path.dirname(workdir.rstrip("/")), f".asft-probe-{os.getpid()}-{id(workdir)}")
    try:
        open(outside, "w").close()
        os.unlink(outside)
        read_only = False
    except OSError:
        read_only = True
    visible = [
        p
        for p in hidden
        if (os.path.isdir(p) and not os.path.islink(p) and os.listdir(p))
        or (os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) > 0)
    ]
    try:
        with open("probe.txt", "w") as f:
            f.write("ok")
        writable = True
    except OSError:
        writable = False
    return {
        "pid_namespace": os.getpid() == 1,
        "read_only_outside_workdir": read_only,
        "workdir_writable": writable,
        "credentials_hidden": not visible,
        "no_network": {name for _, name in socket.if_nameindex()} <= {"lo"},
    }


def main() -> None:
    status_fd, workdir, cfg = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    write, exit_now = os.write, os._exit

    def verdict(status: str, reason: str = "", **extra) -> None:
        write(status_fd, json.dumps({"status": status, "reason": reason[:REASON_CHARS], **extra}).encode())
        exit_now(0)

    with open(os.path.join(workdir, "program.py"), encoding="utf-8") as f:
        source = f.read()  # before WORKDIR is covered by its tmpfs
    setup_error = None
    if cfg.get("isolate"):
        try:
            make_read_only(workdir, cfg.get("hide", []), cfg["max_disk_mb"])
        except OSError as e:
            setup_error = str(e)
    os.chdir(workdir)
    set_limits(cfg)
    if cfg.get("probe"):
        verdict("probe", setup_error or "", facts=probe_facts(workdir, cfg.get("hide", [])), setup_error=setup_error)
    if setup_error:
        verdict("sandbox_error", setup_error)
    try:
        code = compile(source, "program.py", "exec")
    except (SyntaxError, ValueError) as e:
        verdict("syntax_error", f"{type(e).__name__}: {e}")
    disable_destructive_calls()
    sys.argv = ["program.py"]
    try:
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
    except MemoryError:
        verdict("memory", "MemoryError (address-space limit reached)")
    except AssertionError as e:
        verdict("failed", f"AssertionError: {e}".rstrip(": "))
    except SystemExit as e:
        verdict("exited", f"the program called exit({e.code!r}) before its tests finished")
    except BaseException as e:  # noqa: BLE001 - every exception of the program is a verdict, not our crash
        verdict("error", f"{type(e).__name__}: {e}".rstrip(": "))
    verdict("passed")


if __name__ == "__main__":
    main()
