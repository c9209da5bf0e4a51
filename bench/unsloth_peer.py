"""Unsloth as ``train_speed.py``'s peer: the same random-weight checkpoint, the same prepared rows, timed the same way.

It runs in its own process because Unsloth pins its own stack (transformers <= 5.17, trl <= 1.15, datasets < 5),
which ``offline_gpu_host.sh pack`` carries as a second site folder put before ours on ``PYTHONPATH``;
``train_speed.py run --peers ...`` starts it after our cases and appends its row to the same JSONL.

    python bench/unsloth_peer.py --ckpt /dev/shm/bench-ckpt/llama3-8b-32 --data DATA/alpaca --mode packed \
        --steps 10 --out rows.jsonl

Modes: ``packed`` (issue 19's comparison) concatenates every row's tokens (prompt + completion + EOS) and cuts
rows of ``--length`` tokens, ``--rows`` per step: documents are not kept apart, so attention does more work than
ours; ``padfree`` gives TRL's packing (``packing=True``: best-fit rows of up to ``--length``, padding-free with
per-document position ids) to Unsloth's patched SFTTrainer. Both: QLoRA nf4 (no double quantization, as ours),
LoRA r=16 alpha=16 dropout 0 on all seven projections, Unsloth's offloaded gradient checkpointing, AdamW,
lr 2e-4, bf16, seed 3407. The row: useful tokens/s over the steps after ``--warmup``, and the peak allocated.
``--rows 1 --length L`` on a dataset of long documents is ``train_speed.py run --context``'s peer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_speed import WARMUP, append_row, step_timer  # the same timer as our cases

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def texts(data: Path) -> list[str]:
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines() if line.strip()]
    return [r["prompt"] + r["completion"] for r in rows]


def packed_rows(docs: list[str], tokenizer, length: int) -> list[list[int]]:
    """Every document's tokens and an EOS, end to end, cut into rows of ``length`` (the last partial row dropped)."""
    stream: list[int] = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    return [stream[i:i + length] for i in range(0, len(stream) - length + 1, length)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data", required=True, help="a prepared dataset folder (train.jsonl: prompt, completion)")
    parser.add_argument("--mode", choices=["packed", "padfree"], required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--out", required=True)
    parser.add_argument("--case", default="", help="the row's name (default unsloth-MODE)")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="steps left out of the timing")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")

    import unsloth  # noqa: I001 -- before transformers and trl: it patches them
    from unsloth import FastLanguageModel

    import datasets
    import torch
    import transformers
    import trl
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=args.ckpt, max_seq_length=args.length, dtype=torch.bfloat16, load_in_4bit=True,
        quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
            bnb_4bit_compute_dtype=torch.bfloat16))
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                             target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                             random_state=3407)
    docs = texts(Path(args.data))
    if args.mode == "packed":
        dataset = datasets.Dataset.from_dict({"input_ids": packed_rows(docs, tokenizer, args.length)})
        extra = {"packing": False, "dataset_kwargs": {"skip_prepare_dataset": True}}
    else:
        dataset = datasets.Dataset.from_dict({"text": [d + tokenizer.eos_token for d in docs]})
        extra = {"packing": True, "dataset_text_field": "text"}
    config = SFTConfig(output_dir="/tmp/unsloth-peer", per_device_train_batch_size=args.rows,
                       gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=2e-4,
                       lr_scheduler_type="linear", optim="adamw_torch", bf16=True, logging_steps=1, seed=3407,
                       max_length=args.length, report_to=[], save_strategy="no",
                       include_num_input_tokens_seen=True, **extra)
    timer = step_timer()
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=config,
                         callbacks=[timer])
    trainer.train()
    timed = timer.steps[args.warmup:]
    seconds, tokens = sum(s["seconds"] for s in timed), sum(s["tokens"] for s in timed)
    append_row(Path(args.out), {
        "case": args.case or f"unsloth-{args.mode}", "length": args.length, "useful_tok_s": round(tokens / seconds, 1),
        "step_s_median": round(statistics.median(s["seconds"] for s in timed), 4),
        "tokens_per_step": round(tokens / len(timed), 1), "steps": len(timer.steps), "timed_steps": len(timed),
        "peak_alloc_gib": round(timer.peak_allocated, 2), "peak_reserved_gib": round(timer.peak_reserved, 2),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "step_seconds": [round(s["seconds"], 4) for s in timer.steps],
        "versions": {"unsloth": unsloth.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__, "torch": torch.__version__},
    })


if __name__ == "__main__":
    main()
