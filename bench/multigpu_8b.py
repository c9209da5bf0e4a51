"""Train stage on 1 GPU vs 2 GPUs (FSDP) at Llama-3-8B shape, LoRA and QLoRA: tokens/s per GPU, peak memory, loss.

Random bf16 weights on a Llama-3-8B-shaped body (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336,
vocabulary 128256) with SmolLM2's tokenizer (no Llama tokenizer offline; it uses ids < 49152 of the
128256-row embedding). Data: synthetic prompt/completion rows (sort 60 numbers), ~350 tokens each.
Each run is the real train stage, ``python -m finetune --params P train ...``, so the 2-GPU runs go
through ``accelerate launch`` with ``recipes/accelerate/fsdp.yaml`` / ``fsdp_qlora.yaml``.

Same per-GPU micro-batch in every run; the 1-GPU run uses grad_accum 2 so its global batch (and so
its optimizer trajectory) equals the 2-GPU run's: the loss curves should overlap, and
scaling efficiency = (2-GPU tokens/s / 2) / (1-GPU tokens/s).

    python bench/multigpu_8b.py --tokenizer DIR --out /tmp/mg [--steps 30] [--layers 32]
    python bench/multigpu_8b.py --tokenizer DIR --out /tmp/mg --tiny   # CPU smoke test of the plumbing (DDP, gloo)

Prints one JSON line per run (the stage's metrics + the loss curve) and a summary line per method.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch
import yaml


def build(tokenizer_dir: str, out: Path, layers: int, tiny: bool) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = (dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2) if tiny else
             dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                  num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0))
    config = LlamaConfig(**shape, max_position_embeddings=8192, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def write_data(out: Path, rows: int) -> None:
    from finetune.core.outputs import write_jsonl

    rng = random.Random(0)
    data = []
    for _ in range(rows):
        nums = [rng.randrange(1000) for _ in range(60)]
        prompt = f"<|im_start|>user\nSort: {' '.join(map(str, nums))}<|im_end|>\n<|im_start|>assistant\n"
        data.append({"prompt": prompt, "completion": " ".join(map(str, sorted(nums)))})
    write_jsonl(out / "train.jsonl", data)


def params(model_dir: Path, method: str, gpus: int, args: argparse.Namespace) -> dict:
    qlora = method == "qlora"
    return {
        "name": f"bench-{method}-{gpus}gpu",
        "model": {"id": str(model_dir)},
        "data": {"local_path": "unused", "format": "prompt_completion"},
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
        "quant": ({"mode": "4bit", "quant_type": "nf4", "compute_dtype": "bfloat16", "quant_storage": "bfloat16"}
                  if qlora else {"mode": "none"}),
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "grad_accum": 2 if gpus == 1 else 1,
                  "max_length": 512, "learning_rate": 2e-4, "warmup_steps": 2, "logging_steps": 1,
                  "gradient_checkpointing": not args.tiny, "precision": "fp32" if args.tiny else "bf16",
                  "seed": 42, "threads": 1 if args.tiny else None},
        "distributed": ({"mode": "none", "num_processes": 1} if gpus == 1 else
                        {"mode": "ddp" if args.tiny else "fsdp", "num_processes": gpus}),
    }


def run(name: str, raw: dict, data: Path, out: Path) -> dict:
    run_dir = out / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    cmd = [sys.executable, "-m", "finetune", "--params", str(run_dir / "params.yaml"), "train", "--data", str(data),
           "--out", str(run_dir / "adapter"), "--metrics", str(run_dir / "train.json"),
           "--live-dir", str(run_dir / "live")]
    subprocess.run(cmd, check=True, env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
    metrics = json.loads((run_dir / "train.json").read_text(encoding="utf-8"))
    with open(run_dir / "live" / "plots" / "metrics" / "loss.tsv", encoding="utf-8") as fh:
        metrics["loss_curve"] = [round(float(r["loss"]), 4) for r in csv.DictReader(fh, delimiter="\t")]
    return {"run": name} | metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=4, help="per GPU")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--tiny", action="store_true", help="2-layer model on CPU, DDP over gloo, LoRA only")
    args = parser.parse_args()
    out = Path(args.out)
    model_dir, data = out / "model", out / "prepared"
    build(args.tokenizer, model_dir, args.layers, args.tiny)
    write_data(data, rows=args.steps * args.batch_size * 2 + 8)
    methods = ["lora"] if args.tiny else args.methods.split(",")
    for method in methods:
        one = run(f"{method}-1gpu", params(model_dir, method, 1, args), data, out)
        print(json.dumps(one), flush=True)
        two = run(f"{method}-2gpu", params(model_dir, method, 2, args), data, out)
        print(json.dumps(two), flush=True)
        per_gpu = two["tokens_per_second"] / two["num_processes"]
        diffs = [abs(a - b) for a, b in zip(one["loss_curve"], two["loss_curve"], strict=False)]
        print(json.dumps({
            "method": method,
            "tokens_per_second_per_gpu": {"1gpu": one["tokens_per_second"], "2gpu": round(per_gpu, 2)},
            "scaling_efficiency": round(per_gpu / one["tokens_per_second"], 4),
            "peak_memory_gib_per_gpu": {"1gpu": one["peak_memory_gib"], "2gpu": two["peak_memory_gib"]},
            "loss_curve_max_abs_diff": round(max(diffs), 4) if diffs else None,
            "tokens_seen": {"1gpu": one["tokens_seen"], "2gpu": two["tokens_seen"]},
        }), flush=True)


if __name__ == "__main__":
    main()
