"""Stage ``eval``: score the base model, the merged fine-tuned model and every GGUF side by side.

Benchmarks: lm-eval tasks (``eval.tasks``, offline YAMLs in ``eval/tasks/``) and HumanEval
(``eval.humaneval_limit`` problems; generated code runs in :mod:`finetune.sandbox` at ``eval.sandbox``'s level).
Backends: HF weights through transformers; a GGUF through llama.cpp for HumanEval and through
transformers' GGUF dequantization for lm-eval (token log-probs are needed there). Each model is loaded
once for both. Each score is written with the settings that produced it (batch size, dtype, few-shot,
chat template, seeds).
Reads the ``model`` and ``eval`` sections.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune import sandbox
from finetune.benchmarks import humaneval, lmeval
from finetune.core import gguf_process, inference
from finetune.core.gguf import ggml_dequantize
from finetune.core.models import load_tokenizer, reading, resolve_source
from finetune.core.outputs import atomic_dir, write_json, write_json_files, write_jsonl
from finetune.core.provenance import provenance
from finetune.core.recipe import EvalSpec, Recipe
from finetune.core.targets import Target, stage_targets

progress = logging.getLogger("finetune.progress").info


@dataclass(frozen=True)
class EvalPlan:
    """The models to score and the settings every score is run with, decided once."""

    targets: tuple[Target, ...]  # base, finetuned, one per GGUF file (eval.gguf_types of them)
    prepared_dir: Path  # the held-out split lm-eval's ft_quickstart_heldout reads
    runs_code: bool  # HumanEval or MBPP: model-written code runs, in the sandbox
    batch_size: int | str  # lm-eval's: a number, or "auto" (its own search, on a GPU)
    device: str
    dtype: str
    hub_tasks: bool  # a task outside eval/tasks: lm-eval's own (online runs only)

    @classmethod
    def resolve(cls, recipe: Recipe, merged_dir: str | Path, gguf_dir: str | Path,
                prepared_dir: str | Path) -> EvalPlan:
        spec = recipe.eval
        return cls(targets=tuple(stage_targets(recipe, merged_dir, gguf_dir)), prepared_dir=Path(prepared_dir),
                   runs_code=spec.humaneval_limit != 0 or "ft_mbpp" in spec.tasks,
                   batch_size=inference.batch_size(spec.batch_size), device=inference.device(),
                   dtype=inference.dtype_name(), hub_tasks=any(not t.startswith("ft_") for t in spec.tasks))


def evaluate(recipe: Recipe, merged_dir: str | Path, gguf_dir: str | Path, prepared_dir: str | Path,
             metrics_dir: str | Path, samples_dir: str | Path) -> dict[str, Any]:
    """Run the stage; return {variant: metrics}."""
    if recipe.model.task != "causal_lm":
        note = {"skipped": "lm-eval and HumanEval score causal LMs; this classifier's accuracy is in "
                           "metrics/train.json"}
        with atomic_dir(samples_dir), atomic_dir(metrics_dir) as tmp:
            write_json(tmp / "skipped.json", note)
        return note
    plan = EvalPlan.resolve(recipe, merged_dir, gguf_dir, prepared_dir)
    if plan.runs_code:  # fail closed now, not after an hour of generation
        sandbox.configure(recipe.eval.sandbox)
        sandbox.level()
    torch.manual_seed(recipe.eval.seed)
    tokenizer = load_tokenizer(recipe.model)
    results: dict[str, Any] = {}
    with atomic_dir(samples_dir) as samples_tmp:
        for target in plan.targets:
            results[target.name] = score(recipe, plan, target, tokenizer, samples_tmp)
    write_json_files(metrics_dir, results)
    return results


def score(recipe: Recipe, plan: EvalPlan, target: Target, tokenizer: Any, samples_dir: Path) -> dict[str, Any]:
    """One model's entry: lm-eval and HumanEval on one load of it; their samples go to ``samples_dir``."""
    spec = recipe.eval
    entry: dict[str, Any] = {"recipe": recipe.name, "variant": target.name, "provenance": provenance()}
    if plan.runs_code:
        entry["sandbox"] = sandbox.isolation()
    seconds, start = {}, time.perf_counter()
    with reading(target.spec(recipe.model)):  # a GGUF's header parsed once for the model and lm-eval's tokenizer
        model = load_hf(recipe, target)
        seconds["load"] = time.perf_counter() - start
        if spec.tasks:
            progress("eval: %s: lm-eval %s", target.name, ", ".join(spec.tasks))
            start = time.perf_counter()
            scored = run_lmeval(recipe, plan, target, model)
            write_jsonl(samples_dir / f"{target.name}-lm_eval.jsonl", scored.pop("samples"))
            entry["lm_eval"] = scored
            seconds["lm_eval"] = time.perf_counter() - start
    if target.backend == "gguf":  # llama.cpp takes the memory next
        model = None
        inference.release()
    if spec.humaneval_limit != 0:
        start = time.perf_counter()
        entry["humaneval"], rows = run_humaneval(target, spec, tokenizer, model)
        write_jsonl(samples_dir / f"{target.name}-humaneval.jsonl", rows)
        seconds["humaneval"] = time.perf_counter() - start  # generation and the sandboxed runs
    model = None
    inference.release()
    entry["seconds"] = {k: round(v, 2) for k, v in seconds.items()}  # where this variant's time went
    return entry


def load_hf(recipe: Recipe, target: Target) -> Any:
    """The target as an HF model, loaded once for lm-eval and (HF targets) HumanEval; None if neither needs it.

    A GGUF is dequantized by transformers (through llama.cpp's code on every core); its HumanEval runs
    in llama.cpp, so it is needed for lm-eval only.
    """
    spec = recipe.eval
    if not spec.tasks and (target.backend == "gguf" or spec.humaneval_limit == 0):
        return None
    if target.backend == "hf":
        return inference.load(target.spec(recipe.model))
    with ggml_dequantize():
        return inference.load(target.spec(recipe.model))


def run_lmeval(recipe: Recipe, plan: EvalPlan, target: Target, model: Any) -> dict[str, Any]:
    """lm-eval's scores of the loaded ``model``; its tokenizer comes from where the target's weights are."""
    spec, source = recipe.eval, target.spec(recipe.model)
    return lmeval.run(
        resolve_source(source.id), list(spec.tasks), gguf_file=source.gguf_file, data_dir=spec.data_dir,
        prepared_dir=str(plan.prepared_dir), num_fewshot=spec.num_fewshot, batch_size=plan.batch_size,
        limit=spec.task_limit, task_limits=dict(spec.task_limits), seed=spec.seed, device=plan.device,
        dtype=plan.dtype, allow_code_execution="ft_mbpp" in spec.tasks, include_defaults=plan.hub_tasks,
        model=model,
    )


def run_humaneval(target: Target, spec: EvalSpec, tokenizer: Any, model: Any = None) -> tuple[dict, list[dict]]:
    """pass@k on the first ``humaneval_limit`` problems for one model: greedy with one sample per problem
    (pass@1), sampled at ``humaneval_temperature`` with more. ``model``: the loaded HF model (a GGUF
    target generates through llama.cpp instead)."""
    problems = humaneval.load_problems(limit=spec.humaneval_limit)
    n = spec.humaneval_samples
    temperature = spec.humaneval_temperature if n > 1 else 0.0
    task_ids = [tid for tid in problems for _ in range(n)]
    prompts = [humaneval.prompt(problems[tid], tokenizer, spec.humaneval_prompt) for tid in task_ids]
    start = time.perf_counter()
    progress("eval: %s: HumanEval, %d completions of up to %d tokens", target.name, len(prompts),
             spec.humaneval_max_new_tokens)
    if target.backend == "gguf":
        texts, device = gguf_process.generate(target.path, prompts, spec.humaneval_max_new_tokens, spec.cpu_threads,
                                              temperature, spec.seed)
    else:
        texts = inference.generate(model, tokenizer, prompts, spec.humaneval_max_new_tokens, spec.batch_size,
                                   temperature)
        device = str(model.device.type)
    generation_seconds = time.perf_counter() - start
    samples = [{"task_id": tid, "completion": humaneval.extract_completion(t, problems[tid], spec.humaneval_prompt)}
               for tid, t in zip(task_ids, texts, strict=True)]
    ks = tuple(k for k in (1, 10, 100) if k <= n)
    metrics, results = humaneval.evaluate(problems, samples, k=ks, timeout=spec.humaneval_timeout,
                                          workers=spec.cpu_threads)
    metrics |= {"generation_seconds": round(generation_seconds, 2), "device": device,
                "samples_per_problem": n,
                "prompt_style": spec.humaneval_prompt, "max_new_tokens": spec.humaneval_max_new_tokens,
                "decoding": "greedy" if temperature == 0 else f"sampled (temperature {temperature}, top_p 0.95)",
                "seed": spec.seed, "backend": "llama.cpp" if target.backend == "gguf" else "transformers"}
    rows = [s | {"raw": t} | {k: r[k] for k in ("passed", "result")}
            for s, t, r in zip(samples, texts, results, strict=True)]
    return metrics, rows
