"""Stage ``prepare``: reading local files, splitting, formatting, stats, and the whole stage."""

from __future__ import annotations

import csv
import gzip
import json
from collections import Counter

import pytest

from conftest import recipe_dict, shared
from finetune.core.errors import FinetuneError
from finetune.core.outputs import read_jsonl
from finetune.core.recipe import DataSpec, parse_recipe
from finetune.data.sources import read_local
from finetune.stages.prepare import format_rows, length_stats, prepare, split_rows

ROWS = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def spec(fmt: str = "alpaca", **kw) -> DataSpec:
    return DataSpec(local_path="x", format=fmt, **kw)


# --------------------------------------------------------------------------------------------
# read_local


def test_read_json_array(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert read_local(path) == ROWS


def test_read_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(jsonl(ROWS[:2]) + "\n  \n" + jsonl(ROWS[2:]), encoding="utf-8")
    assert read_local(path) == ROWS


def test_read_jsonl_gz(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(jsonl(ROWS))
    assert read_local(path) == ROWS


def test_read_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    rows = [{"instruction": "a\u2028b\u0085c\x1cd", "output": "x"}, {"instruction": "q", "output": "y"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert read_local(path) == rows


def test_read_json_gz_array(tmp_path):
    path = tmp_path / "rows.json.gz"
    path.write_bytes(gzip.compress(json.dumps(ROWS).encode()))
    assert read_local(path) == ROWS


def test_read_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert read_local(path) == ROWS


def test_read_csv_and_tsv(tmp_path):
    for name, delim in (("rows.csv", ","), ("rows.tsv", "\t")):
        path = tmp_path / name
        with open(path, "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["instruction", "output"], delimiter=delim)
            writer.writeheader()
            writer.writerows([*ROWS, {"instruction": "a, b\tc", "output": 'say "hi"'}])
        rows = read_local(path)
        assert rows[:5] == ROWS, name
        assert rows[5] == {"instruction": "a, b\tc", "output": 'say "hi"'}, name


def test_read_folder_sorted_and_recursive(tmp_path):
    (tmp_path / "b.jsonl").write_text(jsonl(ROWS[2:4]), encoding="utf-8")
    (tmp_path / "a.json").write_text(json.dumps(ROWS[:2]), encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text(jsonl(ROWS[4:]), encoding="utf-8")
    (tmp_path / "README.md").write_text("not data", encoding="utf-8")
    assert read_local(tmp_path) == ROWS


def test_read_folder_without_data_files(tmp_path):
    (tmp_path / "README.md").write_text("x", encoding="utf-8")
    with pytest.raises(FinetuneError, match="no data files"):
        read_local(tmp_path)


def test_read_missing_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FinetuneError) as info:
        read_local(missing)
    assert str(missing) in str(info.value)
    assert "does not exist" in str(info.value)


@pytest.mark.parametrize("name", ["latin1.jsonl", "latin1.csv"])
def test_read_non_utf8_names_file(tmp_path, name):
    path = tmp_path / name
    jsonl = name.endswith("jsonl")
    body = '{"instruction": "caf\xe9", "output": "x"}\n' if jsonl else "instruction,output\ncaf\xe9,x\n"
    path.write_bytes(body.encode("latin-1"))
    with pytest.raises(FinetuneError) as info:
        read_local(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "not UTF-8" in msg


def test_read_invalid_json_line_names_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(jsonl(ROWS[:2]) + '{"instruction": "q", \n' + jsonl(ROWS[2:]), encoding="utf-8")
    with pytest.raises(FinetuneError) as info:
        read_local(path)
    assert str(path) in str(info.value)
    assert "line 3 is not valid JSON" in str(info.value)


def test_read_invalid_json_array_names_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"a": 1},\n  {"a": 2,}\n]\n', encoding="utf-8")
    with pytest.raises(FinetuneError, match="invalid JSON at line 3"):
        read_local(path)


# --------------------------------------------------------------------------------------------
# split_rows

ROWS100 = [{"i": i} for i in range(100)]


def _ids(parts):
    return {name: [r["i"] for r in rows] for name, rows in parts.items()}


def test_split_is_deterministic_for_a_seed():
    a = _ids(split_rows(ROWS100, spec(test_size=0.1, eval_size=0.1, seed=1), False))
    b = _ids(split_rows(list(ROWS100), spec(test_size=0.1, eval_size=0.1, seed=1), False))
    c = _ids(split_rows(ROWS100, spec(test_size=0.1, eval_size=0.1, seed=2), False))
    assert a == b
    assert a != c
    assert a["train"] != list(range(10, 100))  # shuffled, not cut in order


def test_split_partitions_all_rows():
    parts = _ids(split_rows(ROWS100, spec(test_size=0.1, eval_size=0.2, seed=3), False))
    assert sorted(parts["train"] + parts["eval"] + parts["test"]) == list(range(100))


@pytest.mark.parametrize(
    ("test_size", "eval_size", "has_test_file", "sizes"),
    [
        (0.1, 0.2, False, (10, 18, 72)),  # eval fraction of what is left after the test cut
        (5, 7, False, (5, 7, 88)),  # counts
        (0.1, 7, False, (10, 7, 83)),
        (0.5, 0.0, True, (0, 0, 100)),  # a separate test file: no test split
        (0, 40, True, (0, 40, 60)),
        (0, 500, False, (0, 100, 0)),  # a count larger than the data takes all of it
        (0, 0, False, (0, 0, 100)),
    ],
)
def test_split_sizes(test_size, eval_size, has_test_file, sizes):
    parts = split_rows(ROWS100, spec(test_size=test_size, eval_size=eval_size), has_test_file)
    assert (len(parts["test"]), len(parts["eval"]), len(parts["train"])) == sizes


# --------------------------------------------------------------------------------------------
# format_rows and length_stats


BAD = [
    {"instruction": "q0", "output": "a0"},
    {"instruction": "q1", "output": "a1"},
    {"instruction": "q2"},
    {"instruction": "", "output": "a3"},
    {"instruction": "q4", "output": ""},
    {"instruction": "q5", "output": "a5"},
]


def test_format_rows_fail_names_count_and_first_row():
    with pytest.raises(FinetuneError) as info:
        format_rows(BAD, spec(on_bad_row="fail"), None, 2, "src.jsonl")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("src.jsonl: ")
    assert "2 row(s) with missing field 'output', first at row 2" in msg
    assert "on_bad_row: skip" in msg


def test_format_rows_skip_counts_reasons():
    kept, dropped = format_rows(BAD, spec(on_bad_row="skip"), None, 2, "src.jsonl")
    assert [r["completion"] for r in kept] == ["a0", "a1", "a5"]
    assert dropped == Counter({"missing field 'output'": 2, "missing field 'instruction'": 1})


def test_format_rows_all_good_fail_mode():
    kept, dropped = format_rows(BAD[:2], spec(on_bad_row="fail"), None, 2, "src.jsonl")
    assert len(kept) == 2 and not dropped


def test_length_stats_percentiles():
    stats = length_stats(list(range(1, 101)))
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p95"] == pytest.approx(95.05)
    assert stats["p99"] == pytest.approx(99.01)
    assert stats["mean"] == 50.5
    assert stats["max"] == 100
    assert stats["total"] == 5050


def test_length_stats_small_and_empty():
    assert length_stats([7]) == {"p50": 7.0, "p90": 7.0, "p95": 7.0, "p99": 7.0, "mean": 7.0, "max": 7, "total": 7}
    assert length_stats([]) == {}


# --------------------------------------------------------------------------------------------
# the whole stage


def _recipe(tok_dir, train_path, test_path=None, **data):
    raw = recipe_dict(
        "quickstart",
        model={"id": str(tok_dir), "gguf_file": None},
        data={"local_path": str(train_path), "test_path": str(test_path) if test_path else None, **data},
    )
    return parse_recipe(raw, "test-recipe")


def test_prepare_end_to_end(tmp_path, smollm_tokenizer_dir):
    train_rows = [{"instruction": f"What is {i} + 1?", "output": str(i + 1)} for i in range(20)]
    train_rows.insert(7, {"instruction": "broken"})
    test_rows = [{"instruction": f"What is {i} + 2?", "output": str(i + 2)} for i in range(4)]
    test_rows.append({"instruction": "", "output": "x"})
    (tmp_path / "train.jsonl").write_text(jsonl(train_rows), encoding="utf-8")
    (tmp_path / "test.jsonl").write_text(jsonl(test_rows), encoding="utf-8")
    recipe = _recipe(smollm_tokenizer_dir, tmp_path / "train.jsonl", tmp_path / "test.jsonl",
                     eval_size=3, on_bad_row="skip")
    out, metrics_path = tmp_path / "prepared", tmp_path / "metrics" / "prepare.json"

    metrics = prepare(recipe, out, metrics_path)

    assert sorted(p.name for p in out.iterdir()) == ["eval.jsonl", "test.jsonl", "train.jsonl"]
    train, evals, test = (read_jsonl(out / f"{n}.jsonl") for n in ("train", "eval", "test"))
    assert (len(train), len(evals), len(test)) == (17, 3, 4)
    assert json.loads(metrics_path.read_text()) == metrics
    assert metrics["rows_raw"] == 21
    assert metrics["rows_kept"] == 20
    assert metrics["rows_dropped"] == 2
    assert metrics["dropped"] == {"missing field 'output'": 1, "test: missing field 'instruction'": 1}
    assert metrics["splits"] == {"train": 17, "eval": 3, "test": 4}
    tokens = metrics["train_tokens"]
    assert {"p50", "p90", "p99"} <= set(tokens)
    assert 0 < tokens["p50"] <= tokens["p90"] <= tokens["p99"] <= tokens["max"]
    # the chat template and system prompt went into the prompts; test rows keep their order
    assert all(r["prompt"].startswith("<|im_start|>system\nYou are a helpful assistant.") for r in train)
    assert [r["completion"] for r in test] == ["2", "3", "4", "5"]
    train_eval = {r["completion"] for r in train + evals}
    assert train_eval == {str(i + 1) for i in range(20)}


def test_prepare_is_deterministic_and_replaces_output(tmp_path, smollm_tokenizer_dir):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(12)]
    (tmp_path / "train.jsonl").write_text(jsonl(rows), encoding="utf-8")
    recipe = _recipe(smollm_tokenizer_dir, tmp_path / "train.jsonl", test_size=2, eval_size=2, max_rows=10)
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "stale.jsonl").write_text("old\n")
    first = prepare(recipe, out, tmp_path / "m.json")
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "stale.jsonl" not in snapshot
    assert first["rows_raw"] == 10  # max_rows
    assert first["splits"] == {"test": 2, "eval": 2, "train": 6}
    prepare(recipe, out, tmp_path / "m.json")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


def test_prepare_bad_rows_fail_by_default(tmp_path, smollm_tokenizer_dir):
    (tmp_path / "train.jsonl").write_text(jsonl([*ROWS, {"instruction": "q"}]), encoding="utf-8")
    recipe = _recipe(smollm_tokenizer_dir, tmp_path / "train.jsonl", eval_size=1)
    with pytest.raises(FinetuneError, match="first at row 5"):
        prepare(recipe, tmp_path / "out", tmp_path / "m.json")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "m.json").exists()


def test_prepare_empty_dataset(tmp_path, smollm_tokenizer_dir):
    (tmp_path / "train.jsonl").write_text("\n", encoding="utf-8")
    recipe = _recipe(smollm_tokenizer_dir, tmp_path / "train.jsonl")
    with pytest.raises(FinetuneError, match="the dataset is empty"):
        prepare(recipe, tmp_path / "out", tmp_path / "m.json")
    assert not (tmp_path / "out").exists()


def test_prepare_nothing_left_for_training(tmp_path, smollm_tokenizer_dir):
    (tmp_path / "train.jsonl").write_text(jsonl(ROWS), encoding="utf-8")
    recipe = _recipe(smollm_tokenizer_dir, tmp_path / "train.jsonl", eval_size=40)  # quickstart's 40 > 5 rows
    with pytest.raises(FinetuneError, match="no training rows left"):
        prepare(recipe, tmp_path / "out", tmp_path / "m.json")


# --------------------------------------------------------------------------------------------
# real data


def test_guanaco_llama2_rows_format():
    path = shared("guanaco-llama2-1k/train-00000-of-00001.parquet")
    rows = read_local(path)
    assert len(rows) == 1000
    kept, dropped = format_rows(rows, spec("llama2_inst", on_bad_row="skip"), None, 2, str(path))
    assert len(kept) + sum(dropped.values()) == 1000
    assert len(kept) >= 990, dropped
    assert all(r["prompt"].endswith("[/INST]") and r["completion"].startswith(" ") for r in kept)
    assert not any(r["completion"].rstrip().endswith("</s>") for r in kept)


LONG = [{"instruction": "hi", "output": "yo"}, {"instruction": "hi", "output": "word " * 60},
        {"instruction": "word " * 60, "output": "x"}]


@pytest.mark.parametrize("mode", ["truncate", "drop"])
def test_rows_over_max_length_are_truncated_or_dropped_and_counted(smollm_tokenizer_dir, mode):
    from finetune.core.models import load_tokenizer
    from finetune.core.recipe import ModelSpec
    from finetune.data.formats import TRUNCATED

    tok = load_tokenizer(ModelSpec(id=str(smollm_tokenizer_dir)))
    s = spec("alpaca", max_length=64, on_too_long=mode)
    kept, dropped = format_rows(LONG, s, tok, 2, "src.jsonl")
    assert dropped["prompt alone fills data.max_length 64 tokens" if mode == "truncate"
                   else "longer than data.max_length 64 tokens"] == (1 if mode == "truncate" else 2)
    assert all(len(tok(r["prompt"] + r["completion"])["input_ids"]) <= 64 + 1 for r in kept)
    if mode == "truncate":
        assert dropped[TRUNCATED] == 1 and len(kept) == 2 and kept[1]["completion"].startswith("word word")
    else:
        assert len(kept) == 1 and TRUNCATED not in dropped
