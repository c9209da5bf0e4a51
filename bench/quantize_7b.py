"""Quantize stage at Llama-2-7B shape: conversion, quantization and every check, timed.

Random weights (no model weights on the GPU host), SmolLM2's tokenizer (vocab 49152) on a
Llama-2-7B-shaped body (hidden 4096, 32 layers, 32 heads, MLP 11008). The HF side of the checks
runs on the GPU in float32; llama.cpp (CPU build) loads the GGUF files.

    python bench/quantize_7b.py --tokenizer DIR --out DIR [--layers 32]

Prints one JSON line per GGUF type (the stage's own metrics) and the stage's wall time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def build(tokenizer_dir: str, out: Path, layers: int) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    from finetune.core.outputs import write_jsonl
    from finetune.core.recipe import QuantizeSpec
    from finetune.stages.quantize import quantize

    out = Path(args.out)
    start = time.perf_counter()
    build(args.tokenizer, out / "merged", args.layers)
    print(json.dumps({"build_seconds": round(time.perf_counter() - start, 1)}), flush=True)
    prompts = [f"<|im_start|>user\nWhat is {i} + {2 * i}? Answer with the result only.<|im_end|>\n"
               "<|im_start|>assistant\n" for i in range(8)]
    write_jsonl(out / "prepared" / "test.jsonl",
                [{"prompt": p, "completion": str(3 * i)} for i, p in enumerate(prompts)])
    spec = QuantizeSpec(types=["f16", "q8_0", "q4_k_m"], verify_prompts=8, verify_tokens=32, ppl_rows=8,
                        threads=args.threads)
    start = time.perf_counter()
    metrics = quantize("llama2-7b-shape", spec, out / "merged", out / "prepared", out / "models", out / "metrics")
    for qtype, m in metrics.items():
        print(json.dumps({"type": qtype} | m), flush=True)
    print(json.dumps({"stage_seconds": round(time.perf_counter() - start, 1),
                      "gpu": torch.cuda.get_device_name(0)}), flush=True)


if __name__ == "__main__":
    main()
