"""The trusted side of one sandboxed run: it starts inside the sandbox, then runs untrusted code.

Started as ``python -I -S runner.py <fd>`` (isolated mode, no site, the stdlib only) by
:mod:`finetune.sandbox.launch`, inside bubblewrap or, at the opt-in ``rlimits-only`` level, as a plain
child. ``<fd>`` is an open file holding a JSON config: the source chunks to execute, the rlimits,
the throwaway uid to drop to (root callers only) and a per-run nonce.

Order matters, and each step gives a reason:

1. read the config from the fd, then close it: the nonce now exists only in this function's
   local variables (no file, no environment variable, no descriptor);
2. compile every chunk (a syntax error fails the run before anything executes);
3. drop to the throwaway uid (root callers: bubblewrap kept only CAP_SETUID/CAP_SETGID for this)
   and lower the rlimits, hard == soft, so the program cannot raise them again;
4. clear this module's globals and point the program's stdout/stderr at ``/dev/null``, keeping a
   private duplicate of the report channel (stdout as the harness opened it);
5. install an audit hook (PEP 578: it cannot be removed from Python) that refuses what would let
   the program reach this frame: frame objects (``sys._getframe``, ``tb_frame``, ``gi_frame`` ...),
   trace/profile hooks, the garbage collector's object walks, code-object construction and
   ``marshal``; ``ctypes`` is not in the sandbox at all (its extension module is masked);
6. execute the chunks in order (as upstream: ``exec(code, {})``), each compiled on its own so that
   a completion cannot swallow the tests into a string literal; the last chunk (the tests) runs in
   a copy of that namespace with a copy of the builtins taken before the program ran, so neither a
   rebound builtin (``abs = lambda x: 0``) nor a thread that rebinds ``check`` reaches the tests;
7. only if every chunk returned normally, write ``<nonce> passed``; any exception (``SystemExit``
   included) writes ``failed: <name>: <first line>``, which the harness shows but does not trust.
   Then ``os._exit``: no atexit handler, finalizer or thread of the program runs after the verdict.

The nonce is written nowhere before the tests pass, so a program that finds the report
descriptor (by trying numbers) can only write lines without it, which score failed.
"""


def main() -> None:
    import builtins
    import json
    import os
    import resource
    import sys

    # Everything used after the program starts is bound here: the program may rebind module
    # attributes and builtins, not these locals.
    exit_, write, dup, dup2, close, open_ = os._exit, os.write, os.dup, os.dup2, os.close, os.open
    run, copy = exec, dict
    pristine_builtins = copy(vars(builtins))

    def die(message: str) -> None:
        write(2, f"sandbox error: {message}\n".encode("utf-8", "replace"))
        exit_(125)

    try:
        fd = int(sys.argv[1])
        with os.fdopen(fd, "rb") as fh:
            config = json.loads(fh.read())
        nonce, sources, uid = config["nonce"], config["sources"], config["uid"]
        codes = [compile(source, "program.py", "exec") for source in sources]
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid) or os.getgroups():
                die("could not drop privileges")
        for name, value in config["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (value, value))
        os.chdir(config["workdir"])
        os.environ.pop("PWD", None)  # bubblewrap sets it; the program's environment is the harness's four
    except SyntaxError as exc:
        write(1, f"\nfailed: SyntaxError: {exc.msg}\n".encode("utf-8", "replace"))
        exit_(1)
    except BaseException as exc:  # noqa: BLE001 -- a broken launch is the harness's problem: say what broke
        die(f"{type(exc).__name__}: {exc}")
    del config, fd

    report = dup(1)
    null = open_(os.devnull, os.O_RDWR)
    dup2(null, 1)
    dup2(null, 2)
    close(null)
    module = globals()  # `import __main__` must not find this function or its helpers
    for name in [name for name in module if not (name.startswith("__") and name.endswith("__"))]:
        del module[name]
    del module

    frame_attrs = frozenset(("tb_frame", "gi_frame", "cr_frame", "ag_frame"))
    refused = frozenset((
        "sys._current_frames", "sys._current_exceptions", "sys.settrace", "sys.setprofile",
        "sys.monitoring.register_callback", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "code.__new__", "marshal.load", "marshal.loads", "sys.addaudithook", "os.unshare", "os.setns",
    ))

    def audit(event: str, args: tuple) -> None:
        if event == "sys._getframe":
            raise ValueError("frame objects are not available in the sandbox")  # stdlib callers expect it
        if event in refused or event.startswith("ctypes."):
            raise RuntimeError(f"{event} is not available in the sandbox")
        if event == "object.__getattr__" and args[1] in frame_attrs:
            raise RuntimeError("frame objects are not available in the sandbox")

    sys.addaudithook(audit)
    namespace: dict = {}
    try:
        for code in codes[:-1]:
            run(code, namespace)
        tests = copy(namespace)
        tests["__builtins__"] = copy(pristine_builtins)
        run(codes[-1], tests)
    except BaseException as exc:  # noqa: BLE001 - every exception of the program is its failure
        try:
            detail = str(exc).strip().splitlines()
        except BaseException:  # noqa: BLE001 - a hostile __str__
            detail = []
        name = type(exc).__name__
        line = f"failed: {name}: {detail[0]}" if detail else f"failed: {name}"
        write(report, f"\n{line}\n".encode("utf-8", "replace"))
        exit_(1)
    write(report, f"\n{nonce} passed\n".encode())
    exit_(0)


if __name__ == "__main__":
    main()
