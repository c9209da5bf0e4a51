"""HF models for inference (eval, heldout, the quantize check): where they run, in which dtype, in what
batches, which ids end a generation, and the batched generation every stage uses.

On a CUDA GPU: bf16 weights on the GPU (an 8B model takes 16 GB, which fits a 24 GB card), batches
sized to the free memory. On the CPU: float32, the reference the quickstart's numbers come from.
The quantize check compares a GGUF with the merged model; there the HF side keeps the weights in
the dtype they were saved in and computes in float32 (:func:`reference_model`), so the reference is
at least as precise as the f16 file it checks, on a GPU as well as on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from finetune.core.recipe import ModelSpec

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

CPU_BATCH = 16  # batch_size "auto" on the CPU (the schema's old default)
GPU_BATCH = 256  # batch_size "auto" on a GPU starts here (or at the number of items) and halves on OOM


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def dtype_name() -> str:
    return str(dtype()).removeprefix("torch.")


def load(spec: ModelSpec):
    """The model of ``spec`` for inference: bf16 straight onto the GPU, or float32 on the CPU."""
    from finetune.core.models import load_model

    if device() == "cuda" and not spec.gguf_file:  # load shards onto the GPU, not through host RAM
        return load_model(spec, dtype(), device_map={"": 0}).eval()
    return load_model(spec, dtype(), plain=False).to(device()).eval()


def batch_size(value: int | str) -> int | str:
    """A fixed size as given; ``auto``: lm-eval's own search on a GPU (pass "auto"), CPU_BATCH on the CPU."""
    if value != "auto":
        return int(value)
    return "auto" if device() == "cuda" else CPU_BATCH


def in_batches(items: Sequence[T], size: int | str, run: Callable[[Sequence[T]], list[R]]) -> list[R]:
    """``run`` over consecutive batches of ``items``. ``auto`` on a GPU: the largest batch (at most
    GPU_BATCH) that fits, halved after an out-of-memory error and kept for the remaining batches."""
    size = batch_size(size)
    if size == "auto":
        size = min(len(items), GPU_BATCH) or 1
    out: list[R] = []
    start = 0
    while start < len(items):
        try:
            out.extend(run(items[start:start + size]))
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            torch.cuda.empty_cache()
            size //= 2
            log.warning("out of GPU memory: batch size now %d", size)
            continue
        start += size
    return out


def eos_ids(generation_eos: int | list[int] | None, tokenizer_eos: int | None) -> list[int]:
    """Every id that ends a generation: the tokenizer's EOS first, then the generation config's others."""
    existing = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    first = [tokenizer_eos] if tokenizer_eos is not None else []
    return first + [i for i in existing if i not in first]


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int | str,
             temperature: float = 0.0) -> list[str]:
    """Completions of ``prompts``: greedy (temperature 0) or sampled (top-p 0.95), batched with left padding
    (``auto``: :func:`in_batches`), each ending at an EOS of the model's generation config."""
    tokenizer.padding_side = "left"
    sampling: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.95}

    def run(chunk: list[str]) -> list[str]:
        batch = tokenizer(list(chunk), return_tensors="pt", padding=True).to(model.device)
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             **sampling)
        return tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    return in_batches(prompts, batch_size, run)


@torch.inference_mode()
def classify(model, tokenizer, texts: list[str], batch_size: int | str, max_length: int = 512) -> list[int]:
    """A sequence classifier's label for each of ``texts`` (truncated to ``max_length`` tokens), batched."""
    def run(chunk: list[str]) -> list[int]:
        batch = tokenizer(list(chunk), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        return model(**batch.to(model.device)).logits.argmax(-1).tolist()

    return in_batches(texts, batch_size, run)


def _fp32_linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if module.bias is None else module.bias.float()
    return torch.nn.functional.linear(x, module.weight.float(), bias)


def fp32_compute(model):
    """Compute in float32 while the linear weights stay as stored: each linear layer casts its weight
    for its own product only (one layer at a time), everything else (embeddings, norms) is float32."""
    import types

    kept = set()  # linear weights stay stored as they are, unless an embedding shares them (tied)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = types.MethodType(_fp32_linear, module)
            kept.add(id(module.weight))
    kept -= {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for param in model.parameters():
        if id(param) not in kept:
            param.data = param.data.float()
    for buf in model.buffers():
        if buf.is_floating_point():
            buf.data = buf.data.float()
    return model


def reference_model(merged_dir: str | Path) -> Any:
    """The merged model as the quantize check's reference: float32 arithmetic on the GPU or the CPU.

    CPU: loaded in float32, as before. GPU: weights kept in their saved 16-bit dtype (16 GB at 8B,
    not 32) and :func:`fp32_compute` does the arithmetic in float32 (no TF32).
    """
    from transformers import AutoModelForCausalLM

    if device() == "cpu":
        return AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    torch.backends.cuda.matmul.allow_tf32 = False
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype="auto", device_map={"": 0})
    return fp32_compute(model).eval()


def release() -> None:
    """Give the memory of models no longer referenced back (GPU memory to the next model or llama.cpp)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
