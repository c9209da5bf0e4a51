"""Stage ``prepare``: raw data -> formatted, split JSONL + stats.

Reads the ``data`` and ``model`` sections (the tokenizer renders chat templates and counts tokens).
Writes ``<out>/{train,eval,test}.jsonl`` and a metrics file: rows kept, rows dropped and why, token
length percentiles.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finetune.core.errors import FinetuneError
from finetune.core.models import load_tokenizer
from finetune.core.outputs import atomic_dir, write_json, write_jsonl
from finetune.core.recipe import DataSpec, Recipe
from finetune.data.formats import TRUNCATED, BadRow, TooLong, fit_length, format_row
from finetune.data.sources import load_raw, read_local


def _count(size: float, n: int) -> int:
    return int(round(size * n)) if size < 1 else min(int(size), n)


def split_rows(rows: list[dict], spec: DataSpec, has_test_file: bool) -> dict[str, list[dict]]:
    """Deterministic shuffle by ``spec.seed``, then test and eval parts cut off the front."""
    order = list(range(len(rows)))
    random.Random(spec.seed).shuffle(order)
    shuffled = [rows[i] for i in order]
    n_test = 0 if has_test_file else _count(spec.test_size, len(rows))
    n_eval = _count(spec.eval_size, len(rows) - n_test)
    return {
        "test": shuffled[:n_test],
        "eval": shuffled[n_test : n_test + n_eval],
        "train": shuffled[n_test + n_eval :],
    }


def format_rows(
    rows: list[dict], spec: DataSpec, tokenizer: Any, num_labels: int, source: str
) -> tuple[list[dict], Counter]:
    """Format every row; bad rows fail the stage or are skipped and counted (``data.on_bad_row``).

    Rows over ``data.max_length`` tokens fail, are truncated or dropped (``data.on_too_long``); the
    returned counter has the drop reasons and, under :data:`TRUNCATED`, how many were cut.
    """
    kept, dropped = [], Counter()
    first_bad: dict[str, int] = {}
    too_long: Counter = Counter()
    for index, row in enumerate(rows):
        try:
            formatted, cut = fit_length(format_row(row, spec, tokenizer, num_labels), spec, tokenizer)
            kept.append(formatted)
            dropped[TRUNCATED] += cut
        except TooLong as err:
            dropped[str(err)] += 1
            too_long[str(err)] += 1
            first_bad.setdefault(str(err), index)
        except BadRow as err:
            dropped[str(err)] += 1
            first_bad.setdefault(str(err), index)
    if not dropped[TRUNCATED]:
        del dropped[TRUNCATED]
    if too_long and spec.on_too_long == "fail":
        reason, count = too_long.most_common(1)[0]
        raise FinetuneError(
            f"{source}: {count} row(s) {reason}, first at row {first_bad[reason]}; set data.on_too_long: "
            "truncate or drop, or raise data.max_length"
        )
    bad = Counter({k: v for k, v in dropped.items() if k != TRUNCATED and k not in too_long})
    if bad and spec.on_bad_row == "fail":
        reason, count = bad.most_common(1)[0]
        raise FinetuneError(
            f"{source}: {count} row(s) with {reason}, first at row {first_bad[reason]}; "
            "fix the data or set data.on_bad_row: skip"
        )
    return kept, dropped


def _reasons(dropped: Counter) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in dropped.most_common(3))


def token_lengths(rows: list[dict], tokenizer: Any) -> list[int]:
    texts = [r["text"] if "text" in r else r["prompt"] + r["completion"] for r in rows]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]] if texts else []


def length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    arr = np.asarray(lengths)
    stats = {f"p{q}": float(np.percentile(arr, q)) for q in (50, 90, 95, 99)}
    return stats | {"mean": round(float(arr.mean()), 2), "max": int(arr.max()), "total": int(arr.sum())}


@dataclass(frozen=True)
class PreparePlan:
    """Where the rows come from and how the held-out split is made."""

    source: str  # what error lines call the data: data.local_path, or <data.id>@<revision>
    test_file: str | None  # data.test_path: the held-out rows come from it, not from a cut of the data

    @classmethod
    def resolve(cls, recipe: Recipe) -> PreparePlan:
        spec = recipe.data
        return cls(source=spec.local_path or f"{spec.id}@{spec.revision or 'main'}", test_file=spec.test_path)


def prepare(recipe: Recipe, out_dir: str | Path, metrics_path: str | Path) -> dict[str, Any]:
    """Run the stage; return the metrics written."""
    plan = PreparePlan.resolve(recipe)
    raw = load_rows(recipe.data, plan)
    tokenizer = load_tokenizer(recipe.model)
    parts, kept, dropped, truncated = format_and_split(recipe, plan, raw, tokenizer)
    metrics = {
        "rows_raw": len(raw),
        "rows_kept": kept,
        "rows_dropped": sum(dropped.values()),
        "dropped": dict(sorted(dropped.items())),
        **({"truncated": truncated} if recipe.data.max_length else {}),
        "splits": {name: len(rows) for name, rows in parts.items()},
        "train_tokens": length_stats(token_lengths(parts["train"], tokenizer)),
    }
    with atomic_dir(out_dir) as tmp:
        for name, rows in parts.items():
            write_jsonl(tmp / f"{name}.jsonl", rows)
    write_json(metrics_path, metrics)
    return metrics


def load_rows(spec: DataSpec, plan: PreparePlan) -> list[dict[str, Any]]:
    """The raw rows (the first ``data.max_rows``); none is an error."""
    raw = load_raw(spec)
    if spec.max_rows:
        raw = raw[: spec.max_rows]
    if not raw:
        raise FinetuneError(f"{plan.source}: the dataset is empty; point data.local_path/data.id at rows")
    return raw


def format_and_split(recipe: Recipe, plan: PreparePlan, raw: list[dict], tokenizer: Any
                     ) -> tuple[dict[str, list[dict]], int, Counter, int]:
    """(splits, rows kept, drop reasons, rows truncated): every row formatted, then split (the test split from
    ``data.test_path`` when there is one)."""
    spec, labels = recipe.data, recipe.model.num_labels
    kept, dropped = format_rows(raw, spec, tokenizer, labels, plan.source)
    truncated = dropped.pop(TRUNCATED, 0)
    if not kept:
        raise FinetuneError(f"{plan.source}: all {len(raw)} rows were dropped ({_reasons(dropped)}); " + (
            "raise data.max_length or set data.on_too_long: truncate" if any("data.max_length" in r for r in dropped)
            else "fix the data"))
    parts = split_rows(kept, spec, has_test_file=bool(plan.test_file))
    if plan.test_file:
        parts["test"], test_dropped = format_rows(read_local(plan.test_file), spec, tokenizer, labels, plan.test_file)
        truncated += test_dropped.pop(TRUNCATED, 0)
        dropped.update({f"test: {k}": v for k, v in test_dropped.items()})
    if not parts["train"]:
        kept_note = f" ({len(kept)} of {len(raw)} rows kept: {_reasons(dropped)})" if dropped else ""
        raise FinetuneError(f"{plan.source}: no training rows left after the split{kept_note}; "
                            "lower data.test_size/eval_size")
    return parts, len(kept), dropped, truncated
