"""eval stage pieces: HumanEval prompts and code extraction, the report table."""

from __future__ import annotations

import pytest

from finetune.benchmarks.humaneval import (
    evaluate as score,
    extract_completion,
    load_problems,
    prompt as humaneval_prompt,
)
from finetune.use.report import markdown, rows_from

PROBLEM = {"task_id": "t/0", "prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n", "entry_point": "add",
           "test": "def check(f):\n    assert f(1, 2) == 3\n", "canonical_solution": "    return a + b\n"}


def test_completion_style_cuts_at_the_next_top_level_statement():
    text = "    return a + b\n\ndef other():\n    pass\n"
    assert extract_completion(text, PROBLEM, "completion") == "    return a + b\n"


@pytest.mark.parametrize("reply", [
    "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.",
    "```\ndef add(a, b):\n    return a + b\n```",
    "def add(a, b):\n    return a + b\n",
])
def test_chat_style_takes_the_code_block_and_it_passes(reply):
    completion = extract_completion(reply, PROBLEM, "chat")
    metrics, _ = score({"t/0": PROBLEM}, [{"task_id": "t/0", "completion": completion}], timeout=5)
    assert metrics["pass@1"] == 1.0


def test_chat_prompt_uses_the_chat_template(smollm_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    problem = next(iter(load_problems(limit=1).values()))
    prompt = humaneval_prompt(problem, tok, "chat")
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    assert problem["prompt"] in prompt
    assert humaneval_prompt(problem, tok, "completion") == problem["prompt"]


def test_report_rows_and_markdown():
    metrics = {
        "metrics/timing/train.json": {"train_seconds": 10.0, "tokens_per_second": 100.0, "peak_memory_gib": 1.5},
        "metrics/quantize/q4_k_m.json": {"size_mib": 100.57},
        "eval/metrics/base.json": {"recipe": "quickstart", "variant": "base",
                                   "lm_eval": {"results": {"ft_arc_easy": {"acc": 0.25, "acc_stderr": 0.1}}},
                                   "humaneval": {"pass@1": 0.0}},
        "eval/metrics/gguf-q4_k_m.json": {"recipe": "quickstart", "variant": "gguf-q4_k_m",
                                          "provenance": {"git_commit": "0123456789abcdef", "git_dirty": False,
                                                         "experiment": "exp-1", "image": None,
                                                         "hardware": "2 x Some CPU", "versions": {"torch": "2.13.0"}},
                                          "lm_eval": {"results": {"ft_arc_easy": {"acc": 0.3}}},
                                          "humaneval": {"pass@1": 0.1}},
    }
    metrics["eval/metrics/finetuned.json"] = {  # as at 8B: a group with subtasks, stderr by filter
        "recipe": "quickstart", "variant": "finetuned",
        "lm_eval": {"config": {"tasks": ["ft_mmlu", "ft_gsm8k"]},
                    "results": {"ft_mmlu": {"acc": 0.25, "acc_stderr": 0.004, "n": 14042},
                                "ft_mmlu_anatomy": {"acc": 0.3, "n": 135},
                                "ft_gsm8k": {"exact_match_strict_match": 0.01,
                                             "exact_match_stderr_strict_match": 0.002}}}}
    rows = rows_from("exp-1", metrics)
    tuned = rows.pop(1)
    shown = {k for k in tuned if k.startswith("ft_")}
    assert shown == {"ft_mmlu acc", "ft_mmlu n", "ft_gsm8k exact_match_strict_match"}
    assert [r["model"] for r in rows] == ["base", "gguf-q4_k_m"]
    assert rows[1]["GGUF MiB"] == 100.57 and rows[0]["ft_arc_easy acc"] == 0.25
    assert rows[0]["train s"] is None and rows[1]["train s"] == 10.0  # the base model was not trained
    assert "ft_arc_easy acc_stderr" not in rows[0]
    table = markdown(rows)
    assert table.splitlines()[0].startswith("| experiment | recipe | model | ft_arc_easy acc | humaneval pass@1")
    assert "| exp-1 | quickstart | gguf-q4_k_m | 0.3 | 0.1 | 10 | 100 | 1.5 | 100.6 |" in table
    assert "lm-eval backend" not in table  # no config in these entries
    assert "provenance" not in table.splitlines()[0]
    assert "- exp-1 (quickstart): commit 0123456; experiment exp-1; no container; 2 x Some CPU; torch 2.13.0" in table


def test_humaneval_sampling_for_pass_at_k(tiny_llama):
    from finetune.core import inference
    from finetune.core.models import load_tokenizer
    from finetune.core.recipe import EvalSpec, ModelSpec
    from finetune.core.targets import Target
    from finetune.stages.eval import run_humaneval

    spec = EvalSpec(humaneval_limit=2, humaneval_samples=3, humaneval_max_new_tokens=8, batch_size=6,
                    humaneval_prompt="completion", humaneval_timeout=5)
    model = ModelSpec(id=str(tiny_llama))
    metrics, rows = run_humaneval(Target("base", "base"), spec, load_tokenizer(model), inference.load(model))
    assert metrics["samples_per_problem"] == 3 and metrics["decoding"].startswith("sampled")
    assert metrics["n_samples"] == 6 and len(rows) == 6 and metrics["pass@1"] == 0.0
    by_task = {}
    for row in rows:
        by_task.setdefault(row["task_id"], []).append(row["raw"])
    assert all(len(set(texts)) > 1 for texts in by_task.values()), "samples of one problem differ"
