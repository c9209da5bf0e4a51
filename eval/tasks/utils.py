"""Python helpers of the finetune lm-eval tasks (loaded by lm-eval through `!function utils.*`)."""

from __future__ import annotations


def _split_answers(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(";") if part.strip()]


def process_truthfulqa_mc1(dataset):
    """TruthfulQA.csv rows -> {question, choices, label=0}: best answer, then the incorrect ones."""

    def to_mc1(row):
        best = (row["Best Answer"] or "").strip()
        wrong = [a for a in dict.fromkeys(_split_answers(row["Incorrect Answers"])) if a != best]
        return {"question": row["Question"].strip(), "choices": [best, *wrong], "label": 0}

    return dataset.map(to_mc1, remove_columns=dataset.column_names)


def process_heldout(doc, results):
    """Exact match as the ``heldout`` stage scores it (surrounding whitespace and trailing '.' ignored)."""
    from finetune.benchmarks.heldout import exact_match

    prediction = results[0] if results else ""
    return {"exact_match": float(exact_match(prediction, doc["completion"]))}


MBPP_TEST_IDS = range(11, 511)
MBPP_FEWSHOT_IDS = (2, 3, 4)  # lm-eval's mbpp examples


def process_mbpp_test(dataset):
    return dataset.filter(lambda row: row["task_id"] in MBPP_TEST_IDS)


def process_mbpp_fewshot(dataset):
    rows = dataset.filter(lambda row: row["task_id"] in MBPP_FEWSHOT_IDS)  # file order: 2, 3, 4
    return rows.map(lambda row: {"is_fewshot": True})


def mbpp_problem(doc) -> dict:
    """An MBPP row as a finetune.benchmarks.humaneval problem: setup, completion, then the asserts."""
    asserts = "".join(f"    {line}\n" for line in doc["test_list"])
    return {
        "task_id": f"mbpp/{doc['task_id']}",
        "prompt": (doc.get("test_setup_code") or "") + "\n",
        "test": "def check(candidate):\n" + (asserts or "    pass\n"),
        "entry_point": "None",
    }


def process_mbpp(doc, results):
    from finetune.benchmarks.humaneval import check

    completion = results[0] if results else ""
    outcome = check(mbpp_problem(doc), completion)
    return {"pass_at_1": float(outcome["passed"])}
