"""Stage ``heldout``: score the base and the merged model on the held-out test split.

Causal LMs: greedy generation from each prompt, exact match of the stripped answer. Classifiers:
accuracy. Writes a metrics file with both scores side by side and every sample's output.
Reads the ``model`` and ``eval`` sections.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from finetune import inference
from finetune.errors import FinetuneError
from finetune.models import load_tokenizer
from finetune.outputs import atomic_dir, read_jsonl, write_json, write_jsonl
from finetune.recipe import EvalSpec, ModelSpec, Recipe

progress = logging.getLogger("finetune.progress").info


def normalize(text: str) -> str:
    """Compare answers ignoring surrounding space and a trailing full stop."""
    return " ".join(text.strip().rstrip(".").split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], spec: EvalSpec) -> list[str]:
    """Greedy completions, batched with left padding, stopping at EOS."""
    tokenizer.padding_side = "left"

    def run(chunk: list[str]) -> list[str]:
        batch = tokenizer(list(chunk), return_tensors="pt", padding=True)
        ids = model.generate(
            **batch.to(model.device),
            max_new_tokens=spec.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=model.generation_config.eos_token_id,
        )
        return tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    return inference.in_batches(prompts, spec.batch_size, run)


@torch.inference_mode()
def classify(model, tokenizer, texts: list[str], spec: EvalSpec, max_length: int = 512) -> list[int]:
    def run(chunk: list[str]) -> list[int]:
        batch = tokenizer(list(chunk), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        return model(**batch.to(model.device)).logits.argmax(-1).tolist()

    return inference.in_batches(texts, spec.batch_size, run)


def score(model_spec: ModelSpec, rows: list[dict], spec: EvalSpec) -> tuple[float, list[Any]]:
    """(score, per-row predictions) for one model."""
    progress("heldout: %s, %d rows", model_spec.id, len(rows))
    tokenizer = load_tokenizer(model_spec)
    model = inference.load(model_spec)
    if model_spec.task == "sequence_classification":
        preds = classify(model, tokenizer, [r["text"] for r in rows], spec)
        result = sum(p == r["label"] for p, r in zip(preds, rows, strict=True)) / len(rows)
    else:
        preds = generate(model, tokenizer, [r["prompt"] for r in rows], spec)
        result = sum(exact_match(p, r["completion"]) for p, r in zip(preds, rows, strict=True)) / len(rows)
    del model
    inference.release()  # the next model gets the GPU memory
    return result, preds


def heldout(recipe: Recipe, data_dir: str | Path, merged_dir: str | Path, metrics_path: str | Path,
            samples_dir: str | Path) -> dict[str, Any]:
    """Run the stage; return the metrics written."""
    test_path = Path(data_dir) / "test.jsonl"
    rows = read_jsonl(test_path) if test_path.is_file() else []
    if not rows:
        raise FinetuneError(f"{test_path}: no held-out rows; set data.test_size or data.test_path")
    rows = rows[: recipe.eval.limit] if recipe.eval.limit else rows
    merged = ModelSpec(id=str(merged_dir), task=recipe.model.task, num_labels=recipe.model.num_labels)
    metric = "accuracy" if recipe.model.task == "sequence_classification" else "exact_match"
    torch.manual_seed(0)
    base_score, base_preds = score(recipe.model, rows, recipe.eval)
    tuned_score, tuned_preds = score(merged, rows, recipe.eval)
    metrics = {
        "metric": metric,
        "n": len(rows),
        "base": round(base_score, 4),
        "finetuned": round(tuned_score, 4),
        "delta": round(tuned_score - base_score, 4),
    }
    reference = "label" if metric == "accuracy" else "completion"
    samples = [
        {"index": i, "reference": r[reference], "base": b, "finetuned": t}
        for i, (r, b, t) in enumerate(zip(rows, base_preds, tuned_preds, strict=True))
    ]
    with atomic_dir(samples_dir) as tmp:
        write_jsonl(tmp / "samples.jsonl", samples)
    write_json(metrics_path, metrics)
    return metrics
