"""Stage ``quantize``: merged model -> GGUF files for llama.cpp / LM Studio / Ollama, verified.

Converts with llama.cpp's own ``convert_hf_to_gguf.py`` (to f16), quantizes with
``llama_cpp.llama_model_quantize``, then loads every file with llama.cpp and checks it:
- the tokenizer round-trips: BOS/EOS and chat-template markers are single ids equal to the HF
  tokenizer's, and prompts tokenize identically;
- f16: greedy generation matches the merged HF model token for token on held-out prompts;
- every type: perplexity on held-out text next to the HF model's, and a generation stops at EOS.
A mismatch fails the stage naming the prompt and the first differing token. llama.cpp runs in a
process of its own (:mod:`finetune.gguf_process`: its CUDA build and torch crash in one process).

The HF side runs first and is freed before llama.cpp loads a file (its greedy tokens and every
step's logits are kept), so the two never share the GPU: at 8B the stage fits a 24 GB card. On a
GPU both sides compute in float32: the HF model through :func:`finetune.inference.reference_model`,
llama.cpp's cuBLAS products through ``GGML_CUDA_CUBLAS_COMPUTE_TYPE=f32`` (its f16 default rounds
sums of 4096-14336 products to 11 bits, more than the checks' tolerances).
Reads the ``quantize`` section (and ``name`` for file names).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune import gguf_process, inference
from finetune.errors import FinetuneError, one_line
from finetune.outputs import atomic_dir, read_jsonl, require_free, write_json
from finetune.recipe import QuantizeSpec

# llama.cpp file types; f16/bf16 come straight from the converter
FTYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
progress = logging.getLogger("finetune.progress").info
F16_PPL_TOLERANCE = 0.02  # f16 perplexity may differ from the HF model's by at most 2%
# file bits per weight (llama.cpp's tables, rounded up) to know the disk a stage needs before writing
BITS_PER_WEIGHT = {"f16": 16.0, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q5_0": 5.5, "q4_k_m": 4.9,
                   "q4_k_s": 4.6, "q4_0": 4.5, "q3_k_m": 3.9, "q2_k": 3.4}


def converter_path() -> Path:
    """llama.cpp's converter, unpacked from the pinned llama-cpp-python sdist by ``make install``."""
    path = Path(os.environ.get("LLAMA_CPP_CONVERTER", Path(sys.prefix) / "llama.cpp" / "convert_hf_to_gguf.py"))
    if not path.is_file():
        raise FinetuneError(f"{path}: llama.cpp's converter is missing; run `make install` "
                            "(or set LLAMA_CPP_CONVERTER)")
    return path


def convert_f16(merged_dir: Path, out_file: Path) -> float:
    """HF folder -> f16 GGUF with llama.cpp's converter; returns seconds."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(converter_path()), str(merged_dir), "--outtype", "f16", "--outfile", str(out_file)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        need = sum(f.stat().st_size for f in merged_dir.glob("*.safetensors"))  # f16 is about bf16's size
        out_file.unlink(missing_ok=True)  # the free space without the partial file
        if "No space left on device" in proc.stderr or "[Errno 28]" in proc.stderr or _free(out_file) < need:
            raise _disk_full(out_file, need)
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise FinetuneError(f"{merged_dir}: llama.cpp's converter failed ({one_line(last, 200)})")
    return time.perf_counter() - start


def _free(path: Path) -> int:
    return shutil.disk_usage(path.parent).free


def _disk_full(path: Path, need: int) -> FinetuneError:
    return FinetuneError(
        f"{path}: no space left on device ({_free(path) / 2**20:.0f} MiB free on that disk, the file needs up to "
        f"{need / 2**20:.0f} MiB); free disk space and rerun (finished outputs are kept)"
    )


def quantize_file(src: Path, dst: Path, qtype: str, threads: int) -> float:
    """f16 GGUF -> ``qtype`` GGUF through llama.cpp (in its own process); returns seconds."""
    if qtype not in FTYPES:
        raise FinetuneError(f"quantize.types: '{qtype}' is not a llama.cpp type; use one of f16, {', '.join(FTYPES)}")
    request = {"src": str(src), "dst": str(dst), "qtype": qtype, "ftype": FTYPES[qtype], "threads": threads}
    try:
        return gguf_process.call("quantize", request)["seconds"]
    except FinetuneError:
        dst.unlink(missing_ok=True)
        if _free(dst) < src.stat().st_size:  # llama.cpp reports a failed write as a code only
            raise _disk_full(dst, src.stat().st_size) from None
        raise


def tensor_types(path: Path) -> tuple[dict[str, int], int]:
    """How many tensors of each GGML type the file holds, and the total parameter count."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    n_params = 0
    for tensor in GGUFReader(str(path)).tensors:
        name = tensor.tensor_type.name.lower()
        counts[name] = counts.get(name, 0) + 1
        n_params += int(tensor.n_elements)
    return dict(sorted(counts.items())), n_params


def disk_needed(merged_dir: Path, types: list[str]) -> float:
    """Bytes the GGUF files will take: the f16 file (always written first) and every other type."""
    config = json.loads((merged_dir / "config.json").read_text())
    saved = {"float32": 4, "float16": 2, "bfloat16": 2}.get(config.get("dtype") or config.get("torch_dtype"), 2)
    weights = sum(p.stat().st_size for p in merged_dir.glob("*.safetensors")) or \
        sum(p.stat().st_size for p in merged_dir.glob("*.bin"))
    params = weights / saved
    return 1.02 * params / 8 * sum(BITS_PER_WEIGHT[t] for t in {"f16", *types})


# ---------------------------------------------------------------------------------------------
# checks


def specials(tokenizer) -> list[str]:
    return sorted({t for t in [tokenizer.bos_token, tokenizer.eos_token, *tokenizer.all_special_tokens] if t})


def check_tokenizer(cpp: dict, tokenizer, prompts: list[str], name: str) -> None:
    """Special tokens are single, equal ids on both sides; prompts tokenize identically (``cpp``: what
    llama.cpp made of them, from gguf_process's ``inspect``)."""
    for token in specials(tokenizer):
        hf_ids = tokenizer.convert_tokens_to_ids([token])
        cpp_ids = cpp["specials"][token]
        if len(cpp_ids) != 1 or cpp_ids != hf_ids:
            raise FinetuneError(f"{name}: special token {token!r} is {cpp_ids} in the GGUF "
                                f"but {hf_ids} in the HF tokenizer")
    if tokenizer.eos_token_id is not None and cpp["eos"] != tokenizer.eos_token_id:
        raise FinetuneError(
            f"{name}: EOS id is {cpp['eos']} in the GGUF but {tokenizer.eos_token_id} "
            f"({tokenizer.eos_token!r}) in the HF tokenizer; generations would not stop"
        )
    for index, (prompt, cpp_ids) in enumerate(zip(prompts, cpp["prompts"], strict=True)):
        hf_ids = tokenizer(prompt)["input_ids"]
        if cpp_ids != hf_ids:
            # the first differing position, or the shorter length if one is a prefix of the other
            pairs = zip(hf_ids, cpp_ids, strict=False)
            at = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(hf_ids), len(cpp_ids)))
            raise FinetuneError(
                f"{name}: prompt {index} tokenizes differently at token {at} "
                f"(HF {hf_ids[at:at + 3]} vs GGUF {cpp_ids[at:at + 3]})"
            )


@dataclass
class Greedy:
    """The merged model's greedy continuation of one prompt and its logits at every step (on the CPU)."""

    prompt: list[int]
    tokens: list[int]
    logits: list[torch.Tensor]

    def gap(self, at: int, got: int) -> float:
        """How far the HF model's own pick at step ``at`` leads ``got``."""
        step = self.logits[at]
        return float(step[self.tokens[at]] - step[got])


@torch.inference_mode()
def greedy_hf(model, prompt_ids: list[int], max_new: int, eos: set[int]) -> Greedy:
    ids = torch.tensor([prompt_ids], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=sorted(eos), pad_token_id=sorted(eos)[0], output_logits=True,
                         return_dict_in_generate=True)
    return Greedy(prompt_ids, out.sequences[0, len(prompt_ids):].tolist(), [s[0].float().cpu() for s in out.logits])


def check_generation(cpp_greedy: list[list[int]], finish: dict[str, str], reference: list[Greedy], tokenizer,
                     eos: set[int], name: str, prompts: list[str], tie_tolerance: float = 0.0) -> dict[str, int]:
    """Greedy tokens from llama.cpp (``cpp_greedy``, one list per prompt) equal the HF model's (``reference``).

    Where they part, the HF model's logit for its own token must lead the GGUF's token by no more
    than ``tie_tolerance`` (a numerical tie between f16 and f32 arithmetic); then that prompt's
    comparison ends there. Anything larger fails the stage. Where the HF model stopped at EOS,
    llama.cpp's own completion loop must stop there too (``finish``: its finish reason per prompt
    index). Returns counts: matched, ties, stopped.
    """
    counts = {"matched": 0, "ties": 0, "stopped": 0}
    for index, (prompt, ref, cpp) in enumerate(zip(prompts, reference, cpp_greedy, strict=True)):
        hf = ref.tokens
        if hf != cpp:
            at = next((i for i, (a, b) in enumerate(zip(hf, cpp, strict=False)) if a != b), min(len(hf), len(cpp)))
            both = at < len(hf) and at < len(cpp)
            gap = ref.gap(at, cpp[at]) if both else float("inf")
            if gap <= tie_tolerance:
                counts["ties"] += 1
                continue
            got = tokenizer.decode(cpp[at:at + 1]) if at < len(cpp) else "<end>"
            want = tokenizer.decode(hf[at:at + 1]) if at < len(hf) else "<end>"
            raise FinetuneError(
                f"{name}: greedy output differs from the merged model on prompt {index} "
                f"({prompt[-60:]!r}) at new token {at}: GGUF {got!r} vs HF {want!r} "
                f"(HF logit gap {gap:.4g} > quantize.tie_tolerance {tie_tolerance})"
            )
        counts["matched"] += 1
        if hf and hf[-1] in eos:
            if finish.get(str(index)) != "stop":
                raise FinetuneError(f"{name}: llama.cpp does not stop at EOS on prompt {index} "
                                    f"(finish: {finish.get(str(index))})")
            counts["stopped"] += 1
    return counts


def eos_set(model, tokenizer) -> set[int]:
    gen = model.generation_config.eos_token_id
    ids = set(gen if isinstance(gen, list) else [gen] if gen is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


@torch.inference_mode()
def perplexity_hf(model, sequences: list[list[int]]) -> float:
    total, count = 0.0, 0
    for ids in sequences:
        logits = model(torch.tensor([ids], device=model.device)).logits[0, :-1].float().cpu().numpy()
        total += gguf_process.nll(logits, ids[1:])
        count += len(ids) - 1
    return math.exp(total / count)


# ---------------------------------------------------------------------------------------------
# the stage


def quantize(name: str, spec: QuantizeSpec, merged_dir: str | Path, data_dir: str | Path,
             out_dir: str | Path, metrics_dir: str | Path, system_prompt: str | None = None) -> dict[str, Any]:
    """Run the stage; return the metrics written (one file per type under ``metrics_dir``).

    The output folder also gets an Ollama Modelfile per GGUF and a README on LM Studio's layout
    (finetune.handoff), with ``system_prompt`` (the recipe's data.system_prompt) as SYSTEM.
    """
    from transformers import AutoTokenizer

    from finetune.handoff import write_handoff

    merged_dir = Path(merged_dir)
    if not (merged_dir / "config.json").is_file():
        raise FinetuneError(f"{merged_dir}/config.json: missing; run the merge stage first")
    architectures = json.loads((merged_dir / "config.json").read_text()).get("architectures") or [""]
    if not architectures[0].endswith("ForCausalLM"):
        note = {"skipped": f"{architectures[0]} is not a causal LM; llama.cpp serves generative models"}
        with atomic_dir(out_dir) as tmp, atomic_dir(metrics_dir) as mtmp:
            write_json(mtmp / "skipped.json", note)
        return note
    rows = read_jsonl(Path(data_dir) / "test.jsonl")
    if not rows or "prompt" not in rows[0]:
        raise FinetuneError(f"{data_dir}/test.jsonl: quantize needs held-out prompt/completion rows")
    prompts = [r["prompt"] for r in rows[: spec.verify_prompts]]
    texts = [r["prompt"] + r["completion"] for r in rows[: spec.ppl_rows]]
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    require_free(out_dir, disk_needed(merged_dir, list(spec.types)), f"GGUF {', '.join(spec.types)}")
    sequences = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    n_ctx = max(len(s) for s in [*sequences, *prompt_ids]) + spec.verify_tokens + 8
    # the HF side first, then its memory goes back: llama.cpp gets the whole GPU
    progress("quantize: the merged model's perplexity and greedy tokens (the reference, on %s)", inference.device())
    model = inference.reference_model(merged_dir)
    eos = eos_set(model, tokenizer)
    hf_ppl = perplexity_hf(model, sequences)
    reference = [greedy_hf(model, ids, spec.verify_tokens, eos) for ids in prompt_ids]
    del model
    inference.release()
    # float32 sums in llama.cpp's cuBLAS products too (the module docstring says why); the CPU build ignores it
    os.environ.setdefault("GGML_CUDA_CUBLAS_COMPUTE_TYPE", "f32")

    results: dict[str, dict[str, Any]] = {}
    with atomic_dir(out_dir) as tmp:
        f16 = tmp / f"{name}-f16.gguf"
        progress("quantize: converting to f16 (llama.cpp's converter)")
        seconds = {"f16": convert_f16(merged_dir, f16)}
        for qtype in spec.types:
            if qtype != "f16":
                progress("quantize: f16 -> %s (%d threads)", qtype, spec.cpu_threads)
                seconds[qtype] = quantize_file(f16, tmp / f"{name}-{qtype}.gguf", qtype, spec.cpu_threads)
        for qtype in ["f16", *[t for t in spec.types if t != "f16"]]:
            path = tmp / f"{name}-{qtype}.gguf"
            label = f"{name}-{qtype}.gguf"
            progress("quantize: checking %s", label)
            cpp = gguf_process.call("inspect", {
                "path": str(path), "n_ctx": n_ctx, "threads": spec.cpu_threads, "specials": specials(tokenizer),
                "prompts": prompts, "prompt_ids": prompt_ids, "max_new": spec.verify_tokens, "eos": sorted(eos),
                "stop_check": [i for i, r in enumerate(reference)
                               if qtype == "f16" and r.tokens and r.tokens[-1] in eos],
                "sequences": sequences})
            check_tokenizer(cpp, tokenizer, prompts, label)
            if qtype == "f16":
                gen = check_generation(cpp["greedy"], cpp["finish"], reference, tokenizer, eos, label, prompts,
                                       spec.tie_tolerance)
                stopped = gen["stopped"]
            else:
                stopped = sum(bool(o) and o[-1] in eos for o in cpp["greedy"])
            ppl = cpp["perplexity"]
            if not math.isfinite(ppl):
                raise FinetuneError(f"{label}: perplexity is {ppl}; the file is broken")
            if qtype == "f16" and abs(ppl / hf_ppl - 1) > F16_PPL_TOLERANCE:
                raise FinetuneError(f"{label}: perplexity {ppl:.4f} vs {hf_ppl:.4f} for the merged model "
                                    f"(more than {F16_PPL_TOLERANCE:.0%} apart); the conversion is wrong")
            types, n_params = tensor_types(path)
            size = path.stat().st_size
            results[qtype] = {
                "file": label,
                "size_bytes": size,
                "size_mib": round(size / 2**20, 2),
                "bits_per_weight": round(size * 8 / n_params, 3),
                "seconds": round(seconds[qtype], 2) if qtype == "f16" else round(seconds[qtype] + seconds["f16"], 2),
                "perplexity": round(ppl, 4),
                "hf_perplexity": round(hf_ppl, 4),
                "perplexity_ratio": round(ppl / hf_ppl, 4),
                "tensor_types": types,
                "verify_prompts": len(prompts),
                **({"greedy_matched": gen["matched"], "greedy_ties": gen["ties"]} if qtype == "f16" else {}),
                "stopped_at_eos": stopped,
            }
        if "f16" not in spec.types:
            f16.unlink()
        write_handoff(tmp, name, [results[t]["file"] for t in spec.types], merged_dir, system_prompt)
    kept = {k: v for k, v in results.items() if k in spec.types}
    with atomic_dir(metrics_dir) as tmp:
        for qtype, metrics in kept.items():
            write_json(tmp / f"{qtype}.json", metrics)
    return kept
