"""Stage ``heldout``: score the base and the merged model on the whole held-out test split.

Causal LMs: greedy generation from each prompt (:func:`finetune.core.inference.generate`, the eval
stage's HumanEval generation), exact match of the answer (:func:`finetune.benchmarks.heldout.exact_match`,
the comparison of eval's ``ft_quickstart_heldout`` task too, which scores eval's limited rows with
lm-eval's stop strings on every model variant). Classifiers: accuracy. Writes a metrics file with both
scores side by side and every sample's output.
Reads the ``model`` and ``eval`` sections.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.benchmarks.heldout import accuracy, exact_match_rate
from finetune.core import inference
from finetune.core.errors import FinetuneError
from finetune.core.models import load_tokenizer, reading
from finetune.core.outputs import atomic_dir, read_jsonl, write_json, write_jsonl
from finetune.core.recipe import Recipe
from finetune.core.targets import Target, stage_targets

progress = logging.getLogger("finetune.progress").info


@dataclass(frozen=True)
class HeldoutPlan:
    """The rows to score, against what, and the two models."""

    rows: tuple[dict, ...]  # the test split, the first eval.limit of it
    metric: str  # exact_match (causal LMs) or accuracy (classifiers)
    reference: str  # the row's key the output is scored against: completion or label
    targets: tuple[Target, ...]  # base and finetuned

    @classmethod
    def resolve(cls, recipe: Recipe, data_dir: str | Path, merged_dir: str | Path) -> HeldoutPlan:
        test_path = Path(data_dir) / "test.jsonl"
        rows = read_jsonl(test_path) if test_path.is_file() else []
        if not rows:
            raise FinetuneError(f"{test_path}: no held-out rows; set data.test_size or data.test_path")
        classify = recipe.model.task == "sequence_classification"
        return cls(rows=tuple(rows[: recipe.eval.limit] if recipe.eval.limit else rows),
                   metric="accuracy" if classify else "exact_match", reference="label" if classify else "completion",
                   targets=tuple(stage_targets(recipe, merged_dir)))


def heldout(recipe: Recipe, data_dir: str | Path, merged_dir: str | Path, metrics_path: str | Path,
            samples_dir: str | Path) -> dict[str, Any]:
    """Run the stage; return the metrics written."""
    plan = HeldoutPlan.resolve(recipe, data_dir, merged_dir)
    torch.manual_seed(0)
    scores, outputs = {}, {}
    for target in plan.targets:
        scores[target.name], outputs[target.name] = score(recipe, plan, target)
    metrics = {
        "metric": plan.metric,
        "n": len(plan.rows),
        "base": round(scores["base"], 4),
        "finetuned": round(scores["finetuned"], 4),
        "delta": round(scores["finetuned"] - scores["base"], 4),
    }
    samples = [
        {"index": i, "reference": r[plan.reference], "base": b, "finetuned": t}
        for i, (r, b, t) in enumerate(zip(plan.rows, outputs["base"], outputs["finetuned"], strict=True))
    ]
    with atomic_dir(samples_dir) as tmp:
        write_jsonl(tmp / "samples.jsonl", samples)
    write_json(metrics_path, metrics)
    return metrics


def score(recipe: Recipe, plan: HeldoutPlan, target: Target) -> tuple[float, list[Any]]:
    """(score, per-row outputs) of one model."""
    spec = target.spec(recipe.model)
    progress("heldout: %s, %d rows", spec.id, len(plan.rows))
    with reading(spec):  # a GGUF's header parsed once for both
        tokenizer = load_tokenizer(spec)
        model = inference.load(spec)
    references = [r[plan.reference] for r in plan.rows]
    if plan.metric == "accuracy":
        outputs = inference.classify(model, tokenizer, [r["text"] for r in plan.rows], recipe.eval.batch_size)
        result = accuracy(outputs, references)
    else:
        outputs = inference.generate(model, tokenizer, [r["prompt"] for r in plan.rows], recipe.eval.max_new_tokens,
                                     recipe.eval.batch_size)
        result = exact_match_rate(outputs, references)
    del model
    inference.release()  # the next model gets the GPU memory
    return result, outputs
