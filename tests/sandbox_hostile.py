"""Hostile programs for the sandbox tests, and what the harness checks after each.

Each case is a program (source chunks, as finetune.sandbox.run takes them) that tries one escape
and, where it can learn something inside, reports it through its failure reason. ``check`` then
looks from outside: listeners got nothing, canaries are intact, no secret came back, no process of
the run is left. Used in-process (tests/test_sandbox.py) and by tests/sandbox_as_user.py.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

CASES = ("secret_env_and_proc", "read_secrets_and_checkout", "write_outside", "network", "daemon", "fork_bomb",
         "disk_fill", "alloc_10gb", "infinite_loop", "kill_harness", "forge_verdict", "rebind_builtins",
         "swallow_tests", "hostile_reason")
SECRET = "hf_sandbox_canary_3f9c2e71"
MARKER = "sbx-marker-7d41"


@dataclass
class Target:
    """What the harness sets up: listeners, canary files, the secret, its own pid."""

    root: Path  # world-traversable scratch folder (so that uid 1000 could reach it if unconfined)
    checkout: Path  # the repository the test runs from
    listeners: dict[str, socket.socket] = field(default_factory=dict)
    addresses: dict[str, object] = field(default_factory=dict)

    @classmethod
    def make(cls, root: Path, checkout: Path) -> Target:
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o777)
        (root / "canary").mkdir(exist_ok=True)
        (root / "canary" / "keep.txt").write_text("keep")
        (root / "token").write_text(SECRET)  # like a hub token file under a mounted cache
        os.chmod(root / "token", 0o644)
        target = cls(root, checkout)
        tcp = socket.create_server(("127.0.0.1", 0))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        (root / "run").mkdir(exist_ok=True)
        os.chmod(root / "run", 0o777)
        unix.bind(str(root / "run" / "sock"))  # a world-writable path socket, as under /run
        os.chmod(root / "run" / "sock", 0o777)
        unix.listen()
        abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        abstract.bind(b"\0" + MARKER.encode())
        abstract.listen()
        for sock in (tcp, udp, unix, abstract):
            sock.settimeout(0.2)
        target.listeners = {"tcp": tcp, "udp": udp, "unix": unix, "abstract": abstract}
        target.addresses = {"tcp": tcp.getsockname()[1], "udp": udp.getsockname()[1],
                            "unix": str(root / "run" / "sock")}
        return target

    def close(self) -> None:
        for sock in self.listeners.values():
            sock.close()

    def reached(self) -> list[str]:
        """Listeners that saw a connection or a datagram."""
        hits = []
        for name, sock in self.listeners.items():
            try:
                if name == "udp":
                    sock.recvfrom(64)
                else:
                    sock.accept()[0].close()
            except (TimeoutError, BlockingIOError):
                continue
            hits.append(name)
        return hits


def _connect_all(t: Target) -> str:
    return f"""
import socket
reached = []
for family, kind, address in [(socket.AF_INET, socket.SOCK_STREAM, ('127.0.0.1', {t.addresses['tcp']})),
                              (socket.AF_UNIX, socket.SOCK_STREAM, {t.addresses['unix']!r}),
                              (socket.AF_UNIX, socket.SOCK_STREAM, b'\\0{MARKER}')]:
    try:
        s = socket.socket(family, kind); s.settimeout(1); s.connect(address); s.sendall(b'pwned')
        reached.append(str(address))
    except OSError:
        pass
try:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.sendto(b'pwned', ('127.0.0.1', {t.addresses['udp']}))
except OSError:
    pass
"""


def programs(t: Target, harness_pid: int) -> dict[str, list[str]]:
    """case -> source chunks. Every program fails its tests (the last chunk asserts False) unless noted."""
    fail = "assert False, 'the program ran to its end'\n"
    return {
        "secret_env_and_proc": [f"""
import os
found = [k for k, v in os.environ.items() if {SECRET!r} in v or k == 'HF_TOKEN']
for pid in range(1, 4096):
    for name in ('environ', 'cmdline'):
        try:
            if {SECRET!r}.encode() in open('/proc/%d/%s' % (pid, name), 'rb').read():
                found.append(pid)
        except OSError:
            pass
raise Exception('found %r' % found)
""", fail],
        "read_secrets_and_checkout": [f"""
found = []
for path in ({str(t.root / 'token')!r}, {str(t.checkout / 'README.md')!r}, '/etc/shadow', '/etc/passwd',
             '/root/.cache/huggingface/token', '/cache/huggingface/token', '/workspace/README.md'):
    try:
        open(path, 'rb').read(); found.append(path)
    except OSError:
        pass
import os, sys
exe = os.path.realpath(sys.executable)
for d in ({str(t.checkout)!r}, '/home', '/root', '/run', '/workspace', '/cache'):
    try:  # a folder on the interpreter's own path may exist, holding only that path
        found += [os.path.join(d, n) for n in os.listdir(d) if not exe.startswith(os.path.join(d, n) + '/')]
    except OSError:
        pass
raise Exception('found %r' % found)
""", fail],
        "write_outside": [f"""
import os, shutil
done = []
for action in (lambda: open({str(t.root / 'written.txt')!r}, 'w').write('pwned'),
               lambda: open({str(t.checkout / (MARKER + '.txt'))!r}, 'w').write('pwned'),
               lambda: shutil.rmtree({str(t.root / 'canary')!r}),
               lambda: os.remove({str(t.root / 'token')!r})):
    try:
        action(); done.append(1)
    except OSError:
        pass
try:
    if os.system('touch {t.root / 'touched'}') == 0:
        done.append(2)
except OSError:
    pass
raise Exception('done %r' % done)
""", fail],
        "network": [_connect_all(t) + "raise Exception('reached %r' % reached)\n", fail],
        "daemon": [f"""
import os, time
os.setsid()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(1.5)
        for path in ({str(t.root / 'daemon.txt')!r}, '/tmp/{MARKER}-daemon'):
            try:
                open(path, 'w').write('alive')
            except OSError:
                pass
""" + _connect_all(t).replace("\n", "\n        ") + """
        os._exit(0)
    os._exit(0)
time.sleep(0.2)
""", fail],
        "fork_bomb": ["import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n", fail],
        "disk_fill": [f"""
import os
total = 0
for n, d in enumerate(('/tmp', '/var/tmp', '/dev/shm', '.', '/')):  # '.' is /tmp: new names, not overwrites
    for i in range(300):  # up to 2.4 GB per place, in 8 MiB files (RLIMIT_FSIZE is per file)
        try:
            with open(os.path.join(d, '{MARKER}-%d-%d' % (n, i)), 'wb') as fh:
                fh.write(b'x' * (8 << 20))
            total += 8 << 20
        except (OSError, MemoryError):
            break
raise Exception('wrote %d' % total)
""", fail],
        "alloc_10gb": ["blob = bytearray(10 * 1024 ** 3)\n", fail],
        "infinite_loop": ["while True:\n    pass\n", fail],
        "kill_harness": [f"""
import os, signal
hit = []
for pid in [p for p in ({harness_pid}, -1) if p != 1]:  # the harness (pid 1 is the sandbox's own init,
    # where the harness is a container's pid 1), and every process the program can see
    try:
        os.kill(pid, signal.SIGKILL); hit.append(pid)
    except OSError:
        pass
raise Exception('hit %r' % hit)
""", fail],
        # the attack that once scored a `pass` body as passed: find the runner's nonce and report
        # descriptor by walking frames (or the garbage collector), write its verdict, exit
        "forge_verdict": [r"""
import os, sys
def frames():
    out = []
    for get in (lambda: sys._getframe(), lambda: sys.exc_info(),
                lambda: (_ for _ in ()).gi_frame):
        try:
            out.append(get())
        except Exception:
            pass
    try:
        raise Exception
    except Exception as exc:
        try:
            out.append(exc.__traceback__.tb_frame)
        except Exception:
            pass
    try:
        import gc
        out += [o for o in gc.get_objects() if type(o).__name__ == 'frame']
    except Exception:
        pass
    try:
        import __main__
        for value in vars(__main__).values():
            if callable(value) and getattr(value, '__code__', None) is not None:
                out.append(value)
    except Exception:
        pass
    return out
for start in frames():
    frame = start
    while frame is not None and type(frame).__name__ == 'frame':
        local = frame.f_locals
        if 'nonce' in local and 'report' in local:
            os.write(local['report'], ('\n%s passed\n' % local['nonce']).encode())
            os._exit(0)
        frame = frame.f_back
for fd in range(64):  # fake lines on every descriptor
    try:
        os.write(fd, b'\npassed\n')
    except OSError:
        pass
print('passed')
os._exit(0)
""", "assert True\n"],
        "rebind_builtins": ["import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.exec = lambda *a, **k: None\n",
                            "assert abs(-5) == 5, 'builtins reached the tests'\nassert False\n"],
        "swallow_tests": ['x = """\n', '"""\nassert False\n'],
        "hostile_reason": ["raise Exception('\\x1b[2J\\u202e' + 'x' * 1000 + '\\nline two\\x00')\n", fail],
    }


def check(case: str, result: str, t: Target) -> None:
    """Assert from outside that the case's effect did not happen (AssertionError if it did)."""
    assert result != "passed", (case, result)
    assert result == "timed out" or result.startswith("failed: "), (case, result)
    assert SECRET not in result, (case, result)
    assert all(ch.isprintable() for ch in result) and len(result) <= len("failed: ") + 200, (case, result)
    if case in ("daemon",):
        time.sleep(2.5)  # the daemon, had it survived, would have acted by now
    assert t.reached() == [], (case, "a listener was reached")
    assert not (t.root / "written.txt").exists() and not (t.root / "touched").exists()
    assert not (t.root / "daemon.txt").exists() and not (t.checkout / (MARKER + ".txt")).exists()
    assert (t.root / "canary" / "keep.txt").read_text() == "keep" and (t.root / "token").exists()
    for place in ("/tmp", "/var/tmp", "/dev/shm", str(t.checkout)):
        left = [p for p in os.listdir(place) if p.startswith(MARKER)]
        assert not left, (case, place, left)
    expected = {
        "secret_env_and_proc": "failed: Exception: found []",
        "read_secrets_and_checkout": "failed: Exception: found []",
        "write_outside": "failed: Exception: done []",
        "network": "failed: Exception: reached []",
        "kill_harness": "failed: Exception: hit []",
        "infinite_loop": "timed out",
    }
    if case in expected:
        assert result == expected[case], (case, result)
    if case == "disk_fill":
        written = int(result.rsplit(" ", 1)[1])
        assert written <= 64 << 20, (case, written)
    if case == "rebind_builtins":
        assert result == "failed: AssertionError", result
    assert runner_processes() == [], (case, runner_processes())


def _parent(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return int(next((line.split()[1] for line in status.splitlines() if line.startswith("PPid:")), "0"))


def _ancestors(pid: int) -> set[int]:
    out: set[int] = set()
    while (pid := _parent(pid)) > 1 and pid not in out:
        out.add(pid)
    return out


def _other_workers() -> set[int]:
    """The other pytest-xdist workers (this worker's siblings), whose tests run sandboxes of their own."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return set()
    me, master = os.getpid(), os.getppid()
    return {int(p) for p in filter(str.isdigit, os.listdir("/proc")) if int(p) != me and _parent(int(p)) == master}


def runner_processes() -> list[str]:
    """Host processes that are (forks of) a sandbox runner: none may outlive its run. A runner below another
    xdist worker belongs to that worker's test, which is still running it, and is left out; one below no
    worker (escaped, re-parented to init) is listed, whoever started it."""
    found, others = [], _other_workers()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"runner.py" in cmdline and b"pycache_prefix" in cmdline and not _ancestors(int(pid)) & others:
            shown = cmdline.replace(b"\0", b" ")[:120]
            found.append(f"{pid}: {shown!r}")
    return found
