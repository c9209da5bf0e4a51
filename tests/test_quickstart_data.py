"""The embedded quickstart data: deterministic, disjoint splits, correct answers, pinned by data.dvc."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from finetune.core.outputs import read_jsonl
from finetune.data import quickstart
from finetune.data.quickstart import SUFFIX, TASKS, generate, write


@pytest.fixture(scope="module")
def default_rows():
    return generate()


def test_same_seed_same_rows(default_rows):
    assert generate() == default_rows
    assert generate(60, 12, seed=5) == generate(60, 12, seed=5)


def test_other_seed_other_rows(default_rows):
    train, test = generate(seed=1)
    assert (train, test) != default_rows
    assert {r["instruction"] for r in test} != {r["instruction"] for r in default_rows[1]}


def test_sizes(default_rows):
    train, test = default_rows
    assert (len(train), len(test)) == (1200, 120)
    assert tuple(map(len, generate(30, 7, seed=3))) == (30, 7)


def test_train_and_test_instructions_are_disjoint(default_rows):
    train, test = default_rows
    train_q = [r["instruction"] for r in train]
    test_q = [r["instruction"] for r in test]
    assert len(set(train_q)) == len(train_q)
    assert len(set(test_q)) == len(test_q)
    assert not set(train_q) & set(test_q)


def test_tasks_are_balanced(default_rows):
    train, test = default_rows
    counts = Counter(r["task"] for r in train + test)
    assert set(counts) == set(TASKS)
    assert set(counts.values()) == {(1200 + 120) // len(TASKS)}
    test_counts = Counter(r["task"] for r in test)
    assert set(test_counts) == set(TASKS)  # every task is held out too


def _expected(task: str, question: str) -> str:
    """Solve the question from its text alone."""
    if task == "add":
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", question).groups())
        return str(a + b)
    if task == "sub":
        a, b = map(int, re.fullmatch(r"What is (\d+) - (\d+)\?", question).groups())
        assert a >= b
        return str(a - b)
    if task == "upper":
        return re.fullmatch(r"Write '([a-z ]+)' in capital letters\.", question).group(1).upper()
    if task == "sort":
        nums = re.fullmatch(r"Sort these numbers from smallest to largest: ([\d, ]+)\.", question).group(1)
        return ", ".join(str(n) for n in sorted(int(x) for x in nums.split(", ")))
    if task == "reverse":
        words = re.fullmatch(r"Reverse the order of these words: ([a-z ]+)\.", question).group(1).split()
        return " ".join(words[::-1])
    if task == "python":
        expr = re.fullmatch(r"What does the Python expression `([^`]+)` evaluate to\?", question).group(1)
        assert re.fullmatch(r"[\w\s'(),*+]+", expr), expr  # only the generator's harmless shapes
        return str(eval(expr, {"__builtins__": {"len": len, "max": max}}))  # no other builtins
    raise AssertionError(f"unknown task {task}")


def test_every_answer_is_right(default_rows):
    train, test = default_rows
    for row in train + test:
        assert row["instruction"].endswith(SUFFIX)
        question = row["instruction"].removesuffix(SUFFIX)
        assert row["output"] == _expected(row["task"], question), row


def test_write_creates_jsonl(tmp_path):
    write(tmp_path / "qs", 12, 6, seed=2)
    train, test = generate(12, 6, seed=2)
    assert read_jsonl(tmp_path / "qs" / "train.jsonl") == train
    assert read_jsonl(tmp_path / "qs" / "test.jsonl") == test


# --------------------------------------------------------------------------------------------
# data.dvc pins the default data set


def dvc_dir_md5(folder: Path) -> str:
    """DVC's directory hash: md5 of the sorted {md5, relpath} list as JSON."""
    entries = [
        {"md5": hashlib.md5(p.read_bytes()).hexdigest(), "relpath": p.relative_to(folder).as_posix()}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def pinned() -> dict:
    out = yaml.safe_load((ROOT / "data.dvc").read_text(encoding="utf-8"))["outs"][0]
    assert out["path"] == "data"
    assert out["md5"].endswith(".dir")
    return out


def test_dir_hash_matches_dvc_data(tmp_path):
    """Our reimplementation agrees with DVC's own hashing of a folder."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee\n")
    (folder / "sub" / "a.txt").write_text("ay\n")
    fs = LocalFileSystem()
    odb = HashFileDB(fs, str(tmp_path / "cache"))
    _, _, obj = build(odb, str(folder), fs, "md5")
    assert obj.hash_info.value == dvc_dir_md5(folder) + ".dir"


def test_repo_data_folder_matches_data_dvc():
    folder = ROOT / "data"
    if not (folder / "quickstart" / "train.jsonl").is_file():
        pytest.skip("data/ is not checked out (run `make data` or `dvc pull`)")
    assert dvc_dir_md5(folder) + ".dir" == pinned()["md5"]


def test_write_defaults_reproduce_data_dvc(tmp_path):
    out = pinned()
    data = tmp_path / "data"
    quickstart.write(data / "quickstart")
    files = sorted(p for p in data.rglob("*") if p.is_file())
    assert [p.relative_to(data).as_posix() for p in files] == ["quickstart/test.jsonl", "quickstart/train.jsonl"]
    assert len(files) == out["nfiles"]
    assert sum(p.stat().st_size for p in files) == out["size"]
    assert dvc_dir_md5(data) + ".dir" == out["md5"]
