"""What the sandboxed program sees: an allowlist of files, built with bubblewrap's mount options.

Inside the sandbox there is only

* the base interpreter's binary, the shared libraries it and its stdlib extension modules link
  (from ``ldd``), ``/etc/ld.so.cache`` (so the loader finds them where the host's does), and the
  stdlib directory, all read-only; ``site-packages`` under the stdlib is covered by an empty
  directory, and the extension modules that would give raw memory access (``_ctypes``, the
  ``_test*`` C-API test modules, the ``_xx*`` experiments) are covered by ``/dev/null``;
* the runner (``/sandbox/runner.py``, read-only);
* ``/dev/null``, ``zero``, ``full``, ``random``, ``urandom``, ``tty`` (bubblewrap's ``--dev``);
* a private tmpfs of :data:`TMPFS_BYTES` on ``/tmp``, the working directory and the only writable
  place: everything else, ``/`` and ``/dev`` included, is remounted read-only.

No ``/proc`` is mounted: the program cannot read its own memory (``/proc/self/mem``) or re-open
descriptors (``/proc/self/fd``), and sees no other process. No checkout, venv, home, cache, ``/run``
or ``/etc`` beyond the loader cache. The venv is not needed: the base interpreter runs with ``-I -S``
(stdlib only), so where the checkout, the venv or the interpreter live does not matter.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

TMPFS_BYTES = 64 << 20
RUNNER = Path(__file__).with_name("runner.py")
RUNNER_IN_SANDBOX = "/sandbox/runner.py"
WORKDIR = "/tmp"
# extension modules that hand a program raw memory or a fresh interpreter state
MASKED_MODULE_PREFIXES = ("_ctypes", "_test", "_xx")


@functools.lru_cache(maxsize=1)
def interpreter() -> str:
    """The base interpreter's real path (not the venv's symlink: the venv is never mounted)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def stdlib_dir() -> Path:
    """The interpreter's standard library folder (mounted read-only in the sandbox)."""
    return Path(sysconfig.get_path("stdlib")).resolve()


def _lib_dynload(stdlib: Path) -> Path | None:
    for candidate in (stdlib / "lib-dynload", sysconfig.get_config_var("DESTSHARED")):
        if candidate and Path(candidate).is_dir():
            return Path(candidate).resolve()
    return None


def _linked_libraries(files: list[str]) -> set[str]:
    """Shared libraries the files link, by ldd (paths as the loader resolves them)."""
    ldd = shutil.which("ldd") or "/usr/bin/ldd"
    found: set[str] = set()
    for start in range(0, len(files), 64):
        try:
            out = subprocess.run([ldd, *files[start : start + 64]], capture_output=True, text=True,
                                 timeout=60, stdin=subprocess.DEVNULL).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        for line in out.splitlines():
            for word in line.split():
                if word.startswith("/") and os.path.exists(word):
                    found.add(word)
    return found


@functools.lru_cache(maxsize=1)
def mounts() -> tuple[str, ...]:
    """bubblewrap's mount options for the allowlist view (computed once per process)."""
    exe, stdlib = interpreter(), stdlib_dir()
    dynload = _lib_dynload(stdlib)
    modules = sorted(str(p) for p in dynload.glob("*.so")) if dynload else []
    masked = [m for m in modules if os.path.basename(m).startswith(MASKED_MODULE_PREFIXES)]
    libraries = _linked_libraries([exe] + [m for m in modules if m not in masked])
    binds = sorted(libraries | {exe}) + [str(stdlib)]
    if os.path.isfile("/etc/ld.so.cache"):
        binds.append("/etc/ld.so.cache")
    if dynload and not dynload.is_relative_to(stdlib):
        binds.append(str(dynload))
    args: list[str] = []
    # bubblewrap creates missing parents 0700 (as root): the throwaway uid could not traverse them
    dests = binds + [RUNNER_IN_SANDBOX]
    for parent in sorted({str(a) for b in dests for a in Path(b).parents if str(a) != "/"}, key=len):
        args += ["--perms", "0755", "--dir", parent]
    for path in binds:
        args += ["--ro-bind", path, path]
    for name in ("site-packages", "dist-packages"):
        if (stdlib / name).is_dir():
            args += ["--tmpfs", str(stdlib / name), "--remount-ro", str(stdlib / name)]
    for module in masked:
        args += ["--ro-bind", "/dev/null", module]
    args += ["--ro-bind", str(RUNNER), RUNNER_IN_SANDBOX, "--dev", "/dev",
             "--perms", "1777", "--size", str(TMPFS_BYTES), "--tmpfs", WORKDIR,
             "--remount-ro", "/dev", "--remount-ro", "/"]
    return tuple(args)
