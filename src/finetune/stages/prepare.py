"""Stage ``prepare``: raw data -> formatted, split JSONL + stats.

Reads the ``data`` and ``model`` sections (the tokenizer renders chat templates and counts tokens).
Writes ``<out>/{train,eval,test}.jsonl`` and a metrics file: rows kept, rows dropped and why, token
length percentiles.
"""

from __future__ import annotations

import gzip
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from finetune.core.errors import FinetuneError
from finetune.core.models import load_tokenizer
from finetune.core.outputs import atomic_dir, write_json, write_jsonl
from finetune.core.recipe import DataSpec, Recipe
from finetune.data.formats import TRUNCATED, BadRow, TooLong, fit_length, format_row

SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet", ".csv", ".tsv")


def _read_json_file(path: Path) -> list[Any]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        text = fh.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise FinetuneError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    rows = []
    # split on "\n" only: str.splitlines() also breaks at U+2028 inside JSON strings
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise FinetuneError(f"{path}: line {lineno} is not valid JSON ({err.msg})") from None
    return rows


def read_local(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local file, or of every data file in a folder (sorted by name)."""
    path = Path(path)
    if not path.exists():
        raise FinetuneError(f"data.local_path: {path} does not exist; check the path or unset it to use data.id")
    files = sorted(p for p in path.rglob("*") if p.name.endswith(SUFFIXES)) if path.is_dir() else [path]
    if not files:
        raise FinetuneError(f"data.local_path: no data files ({', '.join(SUFFIXES)}) in {path}")
    rows: list[dict[str, Any]] = []
    for file in files:
        try:
            if file.name.endswith(".parquet"):
                import pyarrow.parquet as pq

                rows.extend(pq.read_table(file).to_pylist())
            elif file.name.endswith((".csv", ".tsv")):
                import csv

                with open(file, encoding="utf-8", newline="") as fh:
                    rows.extend(csv.DictReader(fh, delimiter="\t" if file.suffix == ".tsv" else ","))
            elif file.name.endswith(SUFFIXES):
                rows.extend(_read_json_file(file))
            else:
                raise FinetuneError(f"data.local_path: {file} is not one of {', '.join(SUFFIXES)}")
        except UnicodeDecodeError as err:
            raise FinetuneError(f"{file}: not UTF-8 text (byte {err.start}); re-encode it as UTF-8") from None
    return rows


def read_hub(spec: DataSpec) -> list[dict[str, Any]]:
    """Rows of a hub dataset at a pinned revision."""
    import datasets

    try:
        ds = datasets.load_dataset(spec.id, revision=spec.revision, split=spec.split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types for "not reachable"
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FinetuneError(
            f"data.id '{spec.id}': could not load from the hub ({first}); offline, set data.local_path "
            "to a local copy"
        ) from None
    return ds.to_list()


def load_raw(spec: DataSpec) -> list[dict[str, Any]]:
    return read_local(spec.local_path) if spec.local_path else read_hub(spec)


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


def prepare(recipe: Recipe, out_dir: str | Path, metrics_path: str | Path) -> dict[str, Any]:
    """Run the stage; return the metrics written."""
    spec = recipe.data
    source = spec.local_path or f"{spec.id}@{spec.revision or 'main'}"
    raw = load_raw(spec)
    if spec.max_rows:
        raw = raw[: spec.max_rows]
    if not raw:
        raise FinetuneError(f"{source}: the dataset is empty; point data.local_path/data.id at rows")
    tokenizer = load_tokenizer(recipe.model)
    kept, dropped = format_rows(raw, spec, tokenizer, recipe.model.num_labels, source)
    truncated = dropped.pop(TRUNCATED, 0)
    if not kept:
        raise FinetuneError(f"{source}: all {len(raw)} rows were dropped ({_reasons(dropped)}); " + (
            "raise data.max_length or set data.on_too_long: truncate" if any("data.max_length" in r for r in dropped)
            else "fix the data"))
    parts = split_rows(kept, spec, has_test_file=bool(spec.test_path))
    if spec.test_path:
        test_raw = read_local(spec.test_path)
        parts["test"], test_dropped = format_rows(test_raw, spec, tokenizer, recipe.model.num_labels, spec.test_path)
        truncated += test_dropped.pop(TRUNCATED, 0)
        dropped.update({f"test: {k}": v for k, v in test_dropped.items()})
    if not parts["train"]:
        kept_note = f" ({len(kept)} of {len(raw)} rows kept: {_reasons(dropped)})" if dropped else ""
        raise FinetuneError(f"{source}: no training rows left after the split{kept_note}; "
                            "lower data.test_size/eval_size")
    lengths = token_lengths(parts["train"], tokenizer)
    metrics = {
        "rows_raw": len(raw),
        "rows_kept": len(kept),
        "rows_dropped": sum(dropped.values()),
        "dropped": dict(sorted(dropped.items())),
        **({"truncated": truncated} if spec.max_length else {}),
        "splits": {name: len(rows) for name, rows in parts.items()},
        "train_tokens": length_stats(lengths),
    }
    with atomic_dir(out_dir) as tmp:
        for name, rows in parts.items():
            write_jsonl(tmp / f"{name}.jsonl", rows)
    write_json(metrics_path, metrics)
    return metrics
