"""Stage ``quantize``: merged model -> GGUF files for llama.cpp / LM Studio / Ollama, verified.

Converts with llama.cpp's own ``convert_hf_to_gguf.py`` (to f16), quantizes with
``llama_cpp.llama_model_quantize`` (:mod:`finetune.export.convert`), then loads every file with llama.cpp
and checks it (:mod:`finetune.export.checks`):
- the tokenizer round-trips: BOS/EOS and chat-template markers are single ids equal to the HF
  tokenizer's, and prompts tokenize identically;
- f16: greedy generation matches the merged HF model token for token on held-out prompts;
- every type: perplexity on held-out text next to the HF model's, and a generation stops at EOS.
A mismatch fails the stage naming the prompt and the first differing token. llama.cpp runs in a
process of its own (:mod:`finetune.core.gguf_process`: its CUDA build and torch crash in one process).

The HF side runs first and is freed before llama.cpp loads a file (its greedy tokens and every
step's logits are kept), so the two never share the GPU: at 8B the stage fits a 24 GB card. On a GPU
the files are written on the CPU beside that GPU work (:func:`write_and_check`). On a
GPU both sides compute in float32: the HF model through :func:`finetune.core.inference.reference_model`,
llama.cpp's cuBLAS products through ``GGML_CUDA_CUBLAS_COMPUTE_TYPE=f32`` (its f16 default rounds
sums of 4096-14336 products to 11 bits, more than the checks' tolerances). Beside the files: an Ollama
Modelfile each and a note on LM Studio (:mod:`finetune.use.handoff`), with ``data.system_prompt`` as SYSTEM.
Reads the ``name``, ``quantize`` and ``data.system_prompt`` sections (``name`` names the files).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.core import inference
from finetune.core.errors import FinetuneError
from finetune.core.gguf import gguf_name
from finetune.core.models import open_tokenizer
from finetune.core.outputs import atomic_dir, read_jsonl, require_free, write_json, write_json_files
from finetune.core.recipe import QuantizeSpec
from finetune.export import checks, convert

progress = logging.getLogger("finetune.progress").info


@dataclass(frozen=True)
class QuantizePlan:
    """The files to write and what checks them, decided before anything loads."""

    name: str  # the recipe's: files are <name>-<type>.gguf
    types: tuple[str, ...]  # in the order written and checked: f16 (always converted first), then the others
    keep_f16: bool  # f16 is one of quantize.types (else it is removed once the others are made)
    threads: int  # llama.cpp's
    prompts: tuple[str, ...]  # held-out prompts of the greedy checks
    texts: tuple[str, ...]  # held-out rows (prompt + completion) scored for perplexity
    verify_tokens: int
    tie_tolerance: float

    def file(self, qtype: str) -> str:
        return gguf_name(self.name, qtype)

    @classmethod
    def resolve(cls, name: str, spec: QuantizeSpec, data_dir: str | Path) -> QuantizePlan:
        rows = read_jsonl(Path(data_dir) / "test.jsonl")
        if not rows or "prompt" not in rows[0]:
            raise FinetuneError(f"{data_dir}/test.jsonl: quantize needs held-out prompt/completion rows")
        return cls(name=name, types=("f16", *[t for t in spec.types if t != "f16"]), keep_f16="f16" in spec.types,
                   threads=spec.cpu_threads, prompts=tuple(r["prompt"] for r in rows[: spec.verify_prompts]),
                   texts=tuple(r["prompt"] + r["completion"] for r in rows[: spec.ppl_rows]),
                   verify_tokens=spec.verify_tokens, tie_tolerance=spec.tie_tolerance)


def quantize(name: str, spec: QuantizeSpec, merged_dir: str | Path, data_dir: str | Path,
             out_dir: str | Path, metrics_dir: str | Path, system_prompt: str | None = None) -> dict[str, Any]:
    """Run the stage; return the metrics written (one file per type under ``metrics_dir``).

    ``system_prompt`` (the recipe's data.system_prompt) is the Modelfiles' SYSTEM.
    """
    from finetune.use.handoff import write_handoff

    merged_dir = Path(merged_dir)
    if not (merged_dir / "config.json").is_file():
        raise FinetuneError(f"{merged_dir}/config.json: missing; run the merge stage first")
    architectures = json.loads((merged_dir / "config.json").read_text()).get("architectures") or [""]
    if not architectures[0].endswith("ForCausalLM"):
        note = {"skipped": f"{architectures[0]} is not a causal LM; llama.cpp serves generative models"}
        with atomic_dir(out_dir), atomic_dir(metrics_dir) as mtmp:
            write_json(mtmp / "skipped.json", note)
        return note
    plan = QuantizePlan.resolve(name, spec, data_dir)
    tokenizer = open_tokenizer(merged_dir)
    require_free(out_dir, convert.disk_needed(merged_dir, list(spec.types)), f"GGUF {', '.join(spec.types)}")
    # float32 sums in llama.cpp's cuBLAS products too (the module docstring says why); the CPU build ignores it
    os.environ.setdefault("GGML_CUDA_CUBLAS_COMPUTE_TYPE", "f32")

    def reference() -> checks.Reference:
        progress("quantize: the merged model's perplexity and greedy tokens (the reference, on %s)",
                 inference.device())
        return checks.reference(merged_dir, tokenizer, list(plan.prompts), list(plan.texts), plan.verify_tokens)

    with atomic_dir(out_dir) as tmp:
        results = write_and_check(plan, merged_dir, tmp, reference, beside=inference.device() == "cuda")
        if not plan.keep_f16:
            (tmp / plan.file("f16")).unlink()
        write_handoff(tmp, name, [results[t]["file"] for t in spec.types], merged_dir, system_prompt)
    kept = {k: v for k, v in results.items() if k in spec.types}
    write_json_files(metrics_dir, kept)
    return kept


def write_and_check(plan: QuantizePlan, merged_dir: Path, out_dir: Path, reference: Callable[[], checks.Reference],
                    beside: bool) -> dict[str, dict[str, Any]]:
    """Write f16 with llama.cpp's converter and every other type from it, check each file; their metrics.

    The files are written one after another on the CPU, the HF reference and llama.cpp's checks run on the
    GPU. ``beside``: the two go side by side (the reference while f16 is converted, each file's checks while
    the next is quantized), which takes ~100 s off an 8B run on one H200; on the CPU they would share the same
    cores, so each waits for the other. The files and every number are the same either way.
    """
    cpu = ThreadPoolExecutor(max_workers=1)  # one writer: the files come out in plan.types order
    try:
        f16 = cpu.submit(_convert, merged_dir, out_dir / plan.file("f16"))
        if not beside:
            f16.result()
        ref = reference()  # the HF side is freed before llama.cpp loads a file: they never share the GPU
        seconds = {"f16": f16.result()}
        made = {qtype: cpu.submit(_quantize, plan, out_dir, qtype) for qtype in plan.types[1:]}
        if not beside:
            wait(made.values())
        results = {}
        for qtype in plan.types:
            if qtype in made:
                seconds[qtype] = made[qtype].result()
            results[qtype] = check_file(plan, ref, out_dir, qtype, seconds)
        return results
    finally:
        cpu.shutdown(wait=True, cancel_futures=True)  # a failed check stops the writing of the files after it


def _convert(merged_dir: Path, out_file: Path) -> float:
    progress("quantize: converting to f16 (llama.cpp's converter)")
    return convert.convert_f16(merged_dir, out_file)


def _quantize(plan: QuantizePlan, out_dir: Path, qtype: str) -> float:
    progress("quantize: f16 -> %s (%d threads)", qtype, plan.threads)
    return convert.quantize_file(out_dir / plan.file("f16"), out_dir / plan.file(qtype), qtype, plan.threads)


def check_file(plan: QuantizePlan, ref: checks.Reference, out_dir: Path, qtype: str,
               seconds: dict[str, float]) -> dict[str, Any]:
    """The checks of one file and its metrics (size, bits per weight, perplexity beside the HF model's)."""
    label = plan.file(qtype)
    path = out_dir / label
    progress("quantize: checking %s", label)
    found = checks.check_gguf(path, label, ref, plan.threads, qtype == "f16", plan.tie_tolerance)
    ppl = found.pop("perplexity")
    types, n_params = convert.tensor_types(path)
    size = path.stat().st_size
    return {
        "file": label,
        "size_bytes": size,
        "size_mib": round(size / 2**20, 2),
        "bits_per_weight": round(size * 8 / n_params, 3),
        "seconds": round(seconds[qtype], 2) if qtype == "f16" else round(seconds[qtype] + seconds["f16"], 2),
        "perplexity": round(ppl, 4),
        "hf_perplexity": round(ref.perplexity, 4),
        "perplexity_ratio": round(ppl / ref.perplexity, 4),
        "tensor_types": types,
        "verify_prompts": len(plan.prompts),
        **found,  # greedy_matched, greedy_ties (f16) and stopped_at_eos
    }
