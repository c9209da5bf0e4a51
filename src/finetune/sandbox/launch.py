"""Run one program at a level and read its verdict: the harness side of :mod:`finetune.sandbox.runner`."""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from finetune.sandbox import view

ADDRESS_SPACE_BYTES = 1 << 30  # RLIMIT_AS
FILE_SIZE_BYTES = 10 << 20  # RLIMIT_FSIZE (the tmpfs caps the total)
MAX_PROCESSES = 8  # RLIMIT_NPROC: per throwaway uid (root) or user namespace; x RLIMIT_AS bounds a run's memory (8 GiB)
MAX_OPEN_FILES = 64  # RLIMIT_NOFILE
REASON_MAX = 200  # characters of a failure reason kept in result rows
# Throwaway uids for root callers: not in /etc/passwd; each running program holds its own, so
# RLIMIT_NPROC counts only its processes. Offset by our pid so two harnesses rarely share one.
SANDBOX_UID_BASE = 1_600_000_000
_UID_BLOCK = 64
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


class _UidPool:
    def __init__(self, base: int, size: int) -> None:
        self._free = list(range(base + size - 1, base - 1, -1))
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def lease(self):
        with self._cond:
            while not self._free:
                self._cond.wait()
            uid = self._free.pop()
        try:
            yield uid
        finally:
            with self._cond:
                self._free.append(uid)
                self._cond.notify()


_UIDS = _UidPool(SANDBOX_UID_BASE + (os.getpid() % 4096) * _UID_BLOCK, _UID_BLOCK)


def rlimits(timeout: float) -> dict[str, int]:
    return {
        "RLIMIT_CPU": math.ceil(timeout) + 1,
        "RLIMIT_AS": ADDRESS_SPACE_BYTES,
        "RLIMIT_NPROC": MAX_PROCESSES,
        "RLIMIT_FSIZE": FILE_SIZE_BYTES,
        "RLIMIT_NOFILE": MAX_OPEN_FILES,
        "RLIMIT_CORE": 0,
    }


def bwrap_command(bwrap: str, as_root: bool, extra: Sequence[str] = ()) -> list[str]:
    """bubblewrap with every namespace and the allowlist view; the runner is the command.

    A normal user gets a user namespace (``extra`` = ``--disable-userns`` where the kernel lets
    bubblewrap forbid a nested one; a container's read-only ``/proc/sys`` does not); root keeps
    the host's user namespace so that the runner can drop to a throwaway uid that is a real,
    unprivileged uid on the host (in a user namespace made by root, every uid inside is root outside).
    """
    command = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
               "--unshare-cgroup-try", "--die-with-parent", "--new-session",
               "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", view.WORKDIR,
               "--setenv", "TMPDIR", view.WORKDIR, "--setenv", "LANG", "C.UTF-8"]
    if as_root:
        command += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        command += ["--unshare-user", "--cap-drop", "ALL"]
    return command + list(extra) + list(view.mounts())


def clean_reason(text: str) -> str:
    """A failure reason fit for a result row: printable characters only, at most REASON_MAX."""
    return "".join(ch if ch.isprintable() else " " for ch in text).strip()[:REASON_MAX]


def _outcome(report: str, stderr: str, nonce: str, returncode: int, timed_out: bool) -> str:
    lines = report.splitlines()
    if f"{nonce} passed" in lines:
        return "passed"
    if timed_out:
        return "timed out"
    claimed = next((line for line in reversed(lines) if line.startswith("failed: ")), None)
    if claimed is not None:  # the runner's line, or the program's: either way a failure
        return "failed: " + clean_reason(claimed[len("failed: "):])
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    if last.startswith(("sandbox error:", "bwrap:")):
        return "failed: " + clean_reason(last)
    if returncode < 0 or returncode > 128:
        sig = -returncode if returncode < 0 else returncode - 128
        return "failed: " + {
            signal.SIGXCPU: "CPU time limit exceeded",
            signal.SIGXFSZ: "file size limit exceeded",
            signal.SIGKILL: "killed (SIGKILL: CPU time or memory limit)",
        }.get(sig, f"killed by signal {sig}")
    return "failed: exited before the tests finished" + (f" (status {returncode})" if returncode else "")


def _tail(path: Path, size: int = 4096) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - size))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _wait_no_reap(pid: int, timeout: float) -> bool:
    """Wait for ``pid`` to exit without reaping it (its process group id stays ours); False on timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.025)


def _stop(proc: subprocess.Popen) -> None:
    """SIGKILL what is left: bubblewrap's pid 1 dies with the outer bwrap (--die-with-parent) and
    takes every process of the pid namespace along; the process group covers rlimits-only."""
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)  # proc is not reaped yet, so the group is still ours
    proc.wait()


def run_program(sources: Sequence[str], timeout: float, bwrap: str | None, as_root: bool,
                extra: Sequence[str] = ()) -> str:
    """Run ``sources`` (chunks executed in order; the last one is the tests) in the sandbox.

    ``bwrap`` None runs the runner unconfined but for rlimits (the opt-in ``rlimits-only`` level).
    Returns ``passed``, ``timed out`` or ``failed: <reason>``.
    """
    with contextlib.ExitStack() as stack:
        uid = stack.enter_context(_UIDS.lease()) if bwrap and as_root else None
        host = Path(tempfile.mkdtemp(prefix="sandbox-"))
        stack.callback(shutil.rmtree, host, True)
        nonce = secrets.token_hex(16)
        workdir = view.WORKDIR if bwrap else str(host / "work")
        if not bwrap:
            os.mkdir(workdir, 0o700)
        config = {"nonce": nonce, "sources": list(sources), "uid": uid, "rlimits": rlimits(timeout),
                  "workdir": workdir}
        (host / "config").write_text(json.dumps(config), encoding="utf-8")
        config_fd = os.open(host / "config", os.O_RDONLY)
        stack.callback(os.close, config_fd)
        (host / "config").unlink()  # the open descriptor is the runner's only way to it
        runner = view.RUNNER_IN_SANDBOX if bwrap else str(view.RUNNER)
        # imports compile from source: .pyc files would need marshal.loads, which the runner refuses
        # (crafted code objects read memory); no directory can be made below /dev/null
        command = [view.interpreter(), "-I", "-S", "-X", "pycache_prefix=/dev/null", runner, str(config_fd)]
        if bwrap:
            command = bwrap_command(bwrap, as_root, extra) + ["--", *command]
        env = _ENV if bwrap else {**_ENV, "HOME": workdir, "TMPDIR": workdir}
        report_path, stderr_path = host / "report", host / "stderr"
        with report_path.open("wb") as report, stderr_path.open("wb") as stderr:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=report, stderr=stderr,
                                    cwd=workdir if not bwrap else host, env=env, close_fds=True,
                                    pass_fds=(config_fd,), start_new_session=True)
        try:
            timed_out = not _wait_no_reap(proc.pid, timeout)
        finally:
            _stop(proc)
        return _outcome(_tail(report_path), _tail(stderr_path), nonce, proc.returncode, timed_out)

