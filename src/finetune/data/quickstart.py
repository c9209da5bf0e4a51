"""The embedded default data set: instructions with answers that can be checked exactly.

Deterministic for a seed: the same bytes on every machine (``data.dvc`` pins their hash). Train and
held-out rows never share an instruction.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from finetune.core.outputs import write_jsonl

WORDS = (
    "apple river stone cloud tiger lemon piano rocket garden window silver orange planet "
    "candle forest bridge winter summer yellow purple dragon castle spider violin"
).split()

SUFFIX = " Answer with the result only."


def _add(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(10, 99), r.randint(10, 99)
    return f"What is {a} + {b}?", str(a + b)


def _sub(r: random.Random) -> tuple[str, str]:
    a, b = sorted((r.randint(10, 99), r.randint(10, 99)), reverse=True)
    return f"What is {a} - {b}?", str(a - b)


def _upper(r: random.Random) -> tuple[str, str]:
    w = " ".join(r.sample(WORDS, 2))
    return f"Write '{w}' in capital letters.", w.upper()


def _sort(r: random.Random) -> tuple[str, str]:
    xs = r.sample(range(1, 50), 4)
    return f"Sort these numbers from smallest to largest: {', '.join(map(str, xs))}.", ", ".join(
        map(str, sorted(xs))
    )


def _reverse(r: random.Random) -> tuple[str, str]:
    ws = r.sample(WORDS, 3)
    return f"Reverse the order of these words: {' '.join(ws)}.", " ".join(reversed(ws))


def _python(r: random.Random) -> tuple[str, str]:
    a, b, c = r.randint(2, 9), r.randint(2, 9), r.randint(1, 20)
    expr = r.choice([f"{a} * {b} + {c}", f"len('{r.choice(WORDS)}') + {c}", f"max({a}, {b}, {c})"])
    # eval of the expression built just above from numbers and words, never of input
    return f"What does the Python expression `{expr}` evaluate to?", str(eval(expr))


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "sub": _sub,
    "upper": _upper,
    "sort": _sort,
    "reverse": _reverse,
    "python": _python,
}


def generate(n_train: int = 1200, n_test: int = 120, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Unique rows, tasks interleaved evenly, shuffled, split into train and held-out test."""
    r = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    names = list(TASKS)
    while len(rows) < n_train + n_test:
        task = names[len(rows) % len(names)]
        question, answer = TASKS[task](r)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"instruction": question + SUFFIX, "output": answer, "task": task})
    r.shuffle(rows)
    return rows[n_test:], rows[:n_test]


def write(out_dir: str | Path, n_train: int = 1200, n_test: int = 120, seed: int = 0) -> None:
    """Write ``train.jsonl`` and ``test.jsonl`` under ``out_dir``."""
    train, test = generate(n_train, n_test, seed)
    out = Path(out_dir)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
