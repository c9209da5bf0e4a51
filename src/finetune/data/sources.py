"""Where the raw rows come from: a local file or folder (JSON, JSONL, gzip, Parquet, CSV/TSV), or a hub
dataset at a pinned revision. A file that cannot be read is one line naming it."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from finetune.core.errors import FinetuneError
from finetune.core.recipe import DataSpec

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
