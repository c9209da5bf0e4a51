"""Stage ``eval``: score the base model, the merged fine-tuned model and every GGUF side by side.

Benchmarks: lm-eval tasks (``eval.tasks``, offline YAMLs in ``eval/tasks/``) and HumanEval
(``eval.humaneval_limit`` problems; generated code runs in :mod:`finetune.sandbox` at ``eval.sandbox``'s level).
Backends: HF weights through transformers; a GGUF through llama.cpp for HumanEval and through
transformers' GGUF dequantization for lm-eval (token log-probs are needed there). Each score is
written with the settings that produced it (batch size, dtype, few-shot, chat template, seeds).
Reads the ``model`` and ``eval`` sections.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import torch

from finetune import gguf_process, humaneval, inference, lmeval, sandbox
from finetune.gguf import ggml_dequantize
from finetune.models import load_tokenizer, resolve_source
from finetune.outputs import atomic_dir, write_json, write_jsonl
from finetune.provenance import provenance
from finetune.recipe import EvalSpec, ModelSpec, Recipe

progress = logging.getLogger("finetune.progress").info
CHAT_INSTRUCTION = "Complete the following Python function. Reply with the whole function in a ```python block.\n\n"
STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]


def humaneval_prompt(problem: dict, tokenizer: Any, style: str) -> str:
    """Base models continue the code; chat models get the function inside their chat template."""
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


@torch.inference_mode()
def generate_hf(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int | str,
                temperature: float = 0.0) -> list[str]:
    """Greedy (temperature 0) or sampled completions, batched with left padding (``auto``: see
    :func:`finetune.inference.in_batches`)."""
    tokenizer.padding_side = "left"
    greedy = {"do_sample": False}
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.95} if temperature > 0 else greedy

    def run(chunk: list[str]) -> list[str]:
        batch = tokenizer(list(chunk), return_tensors="pt", padding=True).to(model.device)
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             **sampling)
        return tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    return inference.in_batches(prompts, batch_size, run)


def generate_gguf(path: Path, prompts: list[str], max_new_tokens: int, threads: int,
                  temperature: float = 0.0, seed: int = 0) -> tuple[list[str], str]:
    """Completions through llama.cpp, in its own process (finetune.gguf_process): all layers on a GPU when
    there is one, prompts decoded side by side. Returns the texts and where they ran (cuda or cpu)."""
    out = gguf_process.call("generate", {"path": str(path), "n_ctx": 2048, "prompts": prompts,
                                         "max_tokens": max_new_tokens, "temperature": temperature,
                                         "seed": seed, "threads": threads})
    return out["texts"], out["device"]


def run_humaneval(variant: dict, spec: EvalSpec, tokenizer: Any, model: Any = None) -> tuple[dict, list[dict]]:
    """pass@k on the first ``humaneval_limit`` problems for one model variant: greedy with one
    sample per problem (pass@1), sampled at ``humaneval_temperature`` with more. An HF variant's
    ``model`` is loaded here unless given (loaded once for lm-eval and HumanEval)."""
    problems = humaneval.load_problems(limit=spec.humaneval_limit)
    n = spec.humaneval_samples
    temperature = spec.humaneval_temperature if n > 1 else 0.0
    task_ids = [tid for tid in problems for _ in range(n)]
    prompts = [humaneval_prompt(problems[tid], tokenizer, spec.humaneval_prompt) for tid in task_ids]
    start = time.perf_counter()
    progress("eval: %s: HumanEval, %d completions of up to %d tokens", variant["name"], len(prompts),
             spec.humaneval_max_new_tokens)
    if variant["kind"] == "gguf":
        texts, device = generate_gguf(variant["path"], prompts, spec.humaneval_max_new_tokens, spec.cpu_threads,
                                      temperature, spec.seed)
    else:
        model = inference.load(variant["spec"]) if model is None else model
        texts = generate_hf(model, tokenizer, prompts, spec.humaneval_max_new_tokens, spec.batch_size, temperature)
        device = str(model.device.type)
    generation_seconds = time.perf_counter() - start
    samples = [{"task_id": tid, "completion": extract_completion(t, problems[tid], spec.humaneval_prompt)}
               for tid, t in zip(task_ids, texts, strict=True)]
    ks = tuple(k for k in (1, 10, 100) if k <= n)
    metrics, results = humaneval.evaluate(problems, samples, k=ks, timeout=spec.humaneval_timeout,
                                          workers=spec.cpu_threads)
    metrics |= {"generation_seconds": round(generation_seconds, 2), "device": device,
                "samples_per_problem": n,
                "prompt_style": spec.humaneval_prompt, "max_new_tokens": spec.humaneval_max_new_tokens,
                "decoding": "greedy" if temperature == 0 else f"sampled (temperature {temperature}, top_p 0.95)",
                "seed": spec.seed, "backend": "llama.cpp" if variant["kind"] == "gguf" else "transformers"}
    rows = [s | {"raw": t} | {k: r[k] for k in ("passed", "result")}
            for s, t, r in zip(samples, texts, results, strict=True)]
    return metrics, rows


def variants(recipe: Recipe, merged_dir: Path, gguf_dir: Path) -> list[dict]:
    """base, finetuned, and one entry per GGUF file the quantize stage wrote."""
    merged = ModelSpec(id=str(merged_dir), task=recipe.model.task, num_labels=recipe.model.num_labels)
    out = [{"name": "base", "kind": "hf", "spec": recipe.model},
           {"name": "finetuned", "kind": "hf", "spec": merged}]
    for path in sorted(gguf_dir.glob("*.gguf")):
        qtype = path.stem.rsplit("-", 1)[-1]
        if recipe.eval.gguf_types is None or qtype in recipe.eval.gguf_types:
            out.append({"name": f"gguf-{qtype}", "kind": "gguf", "path": path})
    return out


def _lmeval_target(variant: dict) -> tuple[str, str | None]:
    if variant["kind"] == "gguf":
        return str(variant["path"].parent), variant["path"].name
    spec: ModelSpec = variant["spec"]
    return resolve_source(spec.id), spec.gguf_file


def load_hf(variant: dict, spec: EvalSpec) -> Any:
    """The variant as an HF model, loaded once for lm-eval and (HF variants) HumanEval; None if neither needs it.

    A GGUF is dequantized by transformers (through llama.cpp's code on every core); its HumanEval runs
    in llama.cpp, so it is needed for lm-eval only.
    """
    if not spec.tasks and (variant["kind"] == "gguf" or spec.humaneval_limit == 0):
        return None
    if variant["kind"] == "hf":
        return inference.load(variant["spec"])
    path = variant["path"]
    with ggml_dequantize():
        return inference.load(ModelSpec(id=str(path.parent), gguf_file=path.name))


def evaluate(recipe: Recipe, merged_dir: str | Path, gguf_dir: str | Path, prepared_dir: str | Path,
             metrics_dir: str | Path, samples_dir: str | Path) -> dict[str, Any]:
    """Run the stage; return {variant: metrics}."""
    if recipe.model.task != "causal_lm":
        note = {"skipped": "lm-eval and HumanEval score causal LMs; "
                           "this classifier's accuracy is in metrics/train.json"}
        with atomic_dir(samples_dir), atomic_dir(metrics_dir) as tmp:
            write_json(tmp / "skipped.json", note)
        return note
    spec = recipe.eval
    runs_code = spec.humaneval_limit != 0 or "ft_mbpp" in spec.tasks
    if runs_code:  # fail closed now, not after an hour of generation
        sandbox.configure(spec.sandbox)
        sandbox.level()
    torch.manual_seed(spec.seed)
    tokenizer = load_tokenizer(recipe.model)
    results: dict[str, Any] = {}
    with atomic_dir(samples_dir) as samples_tmp:
        for variant in variants(recipe, Path(merged_dir), Path(gguf_dir)):
            name = variant["name"]
            entry: dict[str, Any] = {"recipe": recipe.name, "variant": name, "provenance": provenance()}
            if runs_code:
                entry["sandbox"] = sandbox.isolation()
            model = load_hf(variant, spec)
            if spec.tasks:
                progress("eval: %s: lm-eval %s", name, ", ".join(spec.tasks))
                path, gguf_file = _lmeval_target(variant)
                scored = lmeval.run(
                    path, list(spec.tasks), gguf_file=gguf_file, data_dir=spec.data_dir,
                    prepared_dir=str(prepared_dir), num_fewshot=spec.num_fewshot,
                    batch_size=inference.batch_size(spec.batch_size), limit=spec.task_limit,
                    task_limits=dict(spec.task_limits), seed=spec.seed,
                    device=inference.device(), dtype=inference.dtype_name(),
                    allow_code_execution="ft_mbpp" in spec.tasks,
                    # names outside eval/tasks are lm-eval's own (hub) tasks: online runs only
                    include_defaults=any(not t.startswith("ft_") for t in spec.tasks),
                    model=model,
                )
                write_jsonl(samples_tmp / f"{name}-lm_eval.jsonl", scored.pop("samples"))
                entry["lm_eval"] = scored
            if variant["kind"] == "gguf":  # llama.cpp takes the memory next
                model = None
                inference.release()
            if spec.humaneval_limit != 0:
                entry["humaneval"], rows = run_humaneval(variant, spec, tokenizer, model)
                write_jsonl(samples_tmp / f"{name}-humaneval.jsonl", rows)
            model = None
            inference.release()
            results[name] = entry
    with atomic_dir(metrics_dir) as tmp:
        for name, entry in results.items():
            write_json(tmp / f"{name}.json", entry)
    return results
