"""eval/data: the shipped benchmark files match eval/data/SOURCES.md (sha256, rows), none is unlisted, and
every file an offline task YAML reads is among them (so the quickstart's eval needs nothing beside the repo)."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from conftest import ROOT
from finetune.benchmarks import lmeval
from finetune.core.recipe import EvalSpec

DATA = ROOT / "eval" / "data"
HEADER = "| file | rows | sha256 | source repo @ commit : path | licence |"


def listed() -> dict[str, dict[str, str]]:
    """SOURCES.md's file table: path -> {rows, sha256, source, licence}."""
    lines = (DATA / "SOURCES.md").read_text(encoding="utf-8").splitlines()
    start = lines.index(HEADER) + 2  # skip the |---| row
    out = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        path, rows, sha, source, licence = (cell.strip() for cell in line.strip("|").split("|"))
        out[path] = {"rows": rows, "sha256": sha, "source": source, "licence": licence}
    return out


def count_rows(path: Path) -> str:
    if path.suffix in (".json", ".jsonl"):
        return str(sum(1 for line in path.open(encoding="utf-8") if line.strip()))
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            return str(sum(1 for _ in csv.DictReader(fh)))
    return "-"


def test_every_shipped_file_is_listed_with_its_sha256_and_rows():
    table = listed()
    on_disk = sorted(p.relative_to(DATA).as_posix() for p in DATA.rglob("*") if p.is_file() and p.name != "SOURCES.md")
    assert on_disk == sorted(table), "eval/data and its SOURCES.md table list different files"
    for rel, row in table.items():
        path = DATA / rel
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row["sha256"], f"{rel}: sha256 differs from SOURCES.md"
        assert count_rows(path) == row["rows"], f"{rel}: row count differs from SOURCES.md"
        assert " @" in row["source"] and " : " in row["source"] and row["licence"], rel


def test_every_offline_task_reads_only_shipped_files(tmp_path):
    rendered = lmeval.render_tasks(DATA, tmp_path / "prepared", tmp_path / "tasks")
    tm = lmeval.task_manager(rendered)
    names = [p.stem for p in lmeval.shipped_task_files() if p.stem != "ft_quickstart_heldout"]
    lmeval.check_data_files(tm, names)  # raises on a missing file
    table = listed()
    read = {Path(f).relative_to(DATA.resolve()).as_posix()
            for name in names for cfg in lmeval.leaf_configs(tm, name)
            for f in cfg["dataset_kwargs"]["data_files"].values()}
    assert read <= set(table)
    assert {"nutcracker-db/db/arc-easy/dev.json", "nutcracker-db/db/arc-easy/test.json", "gsm8k/train.jsonl",
            "truthfulqa/TruthfulQA.csv", "mbpp/mbpp.jsonl"} <= read
    assert sum(1 for f in read if f.startswith("nutcracker-db/db/mmlu-")) == 57 * 2


def test_default_data_dir_is_inside_the_repo():
    assert EvalSpec().data_dir == "eval/data"
    assert (ROOT / EvalSpec().data_dir).resolve() == lmeval.DEFAULT_DATA_DIR.resolve() == DATA.resolve()
    for folder in {Path(f).parts[0] for f in listed()}:
        licences = {row["licence"] for rel, row in listed().items() if rel.startswith(folder + "/")}
        assert licences and not any("NC" in lic for lic in licences), f"{folder}: a non-commercial licence may not ship"
