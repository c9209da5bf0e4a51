"""Train stage speed on the GPU: our levers vs the tutorials' stack, Llama-2-7B / Llama-3-8B shapes.

Runs ``finetune.stages.train.train`` -- the DVC stage itself -- on random-weight models built from the
configs below (no weights, no internet on the GPU host), on the recipes' real data prepared by
``finetune.stages.prepare.prepare`` with the real Llama-2 / Llama-3 tokenizers (rebuilt offline from
llama.cpp's vocab GGUFs). A Trainer callback times every optimizer step (CUDA-synchronized) and
counts its non-pad input tokens.

    # here (CPU): prepare data + tokenizers into a folder that travels to the GPU host
    python bench/train_speed.py prepare --vocab-dir DIR_WITH_ggml-vocab-llama-*.gguf --out .dev7/data
    # GPU host
    python bench/train_speed.py run --data .dev7/data --out train_speed.jsonl [--cases a,b] [--layers 32]
    # the longest context at batch 1, ours then Unsloth's, each up to its first failure
    python bench/train_speed.py run --data .dev7/data --out ctx.jsonl --cases "" --context 16384,65536 --peers packed

Per case one JSON line: useful tok/s (non-pad tokens / time, steps after the warm-up), median step
time, peak GPU memory (allocated, and reserved by the caching allocator), MFU against the bf16
matmul rate measured first, and every step's loss.

FLOPs per useful token (model FLOPs; recomputation by checkpointing is not counted):
  4 * N_frozen + 6 * N_lora + 3 * A,   A = 4 * n_layers * d_model * mean_ctx
N_frozen: parameters of every linear layer incl. lm_head (embedding lookups are free); forward
2 FLOPs/param, backward 2 more (input gradients only: the base is frozen); LoRA matrices 6
(weight gradients too). A: causal attention forward per token (QK^T and PV) over the tokens the
token really attends to (its own document: mean_ctx = sum s(s+1)/2 / sum s over documents s),
backward twice the forward.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

SHAPES = {  # the published configs' shapes
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001),
}
TOKENIZER = {"llama2-7b": "spm", "llama3-8b": "bpe"}
DATASETS = {  # name: (recipe, raw file under ../shared/data, tokenizer)
    "alpaca": ("llama3-alpaca", "alpaca/alpaca_data_1k.json", "bpe"),
    "guanaco": ("llama2-guanaco", "guanaco-llama2-1k/train-00000-of-00001.parquet", "spm"),
    "evol": ("codellama-evol-instruct", "evol-instruct-code/evol-codealpaca-2k-1.json", "spm"),
}
# The tutorials' stack: QLoRA nf4 + gradient checkpointing, batch 4, group_by_length, pad to longest.
TUTORIAL = dict(packing=False, group_by_length=True, gradient_checkpointing=True, batch_size=4, grad_accum=1,
                liger="off", fused_lora=False, optimizer="paged_adamw_32bit")
LEVERS = ("packing", "group_by_length", "gradient_checkpointing", "checkpoint_layers", "fused_lora",
          "fused_lora_groups", "batch_size",
          "grad_accum", "liger", "optimizer", "attention", "max_steps", "epochs", "warmup_steps", "warmup_ratio",
          "logging_steps", "offload_activations", "compile", "memory_budget_gib", "speed")
QLORA = {"mode": "4bit", "quant_type": "nf4", "double_quant": False, "compute_dtype": "bfloat16"}
NO_QUANT = {"mode": "none"}
# name: (shape, dataset, quant, train overrides on top of the schema defaults, steps)
CASES = {
    "l3-alpaca-tutorial": ("llama3-8b", "alpaca", QLORA, TUTORIAL, 12),
    "l3-alpaca-qlora": ("llama3-8b", "alpaca", QLORA, {}, 10),
    "l3-alpaca-qlora-ckpt": ("llama3-8b", "alpaca", QLORA, {"gradient_checkpointing": True}, 10),
    "l3-alpaca-qlora-ckpt-b8": ("llama3-8b", "alpaca", QLORA, {"gradient_checkpointing": True, "batch_size": 8}, 10),
    "l3-alpaca-qlora-lowmem": ("llama3-8b", "alpaca", QLORA, {"gradient_checkpointing": True, "batch_size": 2}, 10),
    "l3-alpaca-bf16": ("llama3-8b", "alpaca", NO_QUANT, {}, 10),
    "l3-alpaca-bf16-flex": ("llama3-8b", "alpaca", NO_QUANT, {"attention": "flex_attention"}, 10),
    "l3-alpaca-tutorial-b16": ("llama3-8b", "alpaca", QLORA, TUTORIAL | {"batch_size": 16}, 10),
    "l2-guanaco-tutorial": ("llama2-7b", "guanaco", QLORA, TUTORIAL, 10),
    "l2-guanaco-qlora": ("llama2-7b", "guanaco", QLORA, {"batch_size": 8}, 10),
    "l2-guanaco-qlora-ckpt": ("llama2-7b", "guanaco", QLORA, {"batch_size": 16, "gradient_checkpointing": True}, 10),
    "l2-guanaco-bf16": ("llama2-7b", "guanaco", NO_QUANT, {"batch_size": 8}, 10),
    "l2-evol-tutorial": ("llama2-7b", "evol", QLORA, TUTORIAL, 10),
    "l2-evol-qlora": ("llama2-7b", "evol", QLORA, {}, 10),
    # varlen attention (finetune.training.varlen): document-local flash attention instead of sdpa's dense packed mask
    "l3-alpaca-qlora-varlen": ("llama3-8b", "alpaca", QLORA, {"attention": "varlen"}, 10),
    "l3-alpaca-qlora-ckpt-varlen": ("llama3-8b", "alpaca", QLORA,
                                    {"attention": "varlen", "gradient_checkpointing": True}, 10),
    "l3-alpaca-qlora-ckpt-b8-varlen": ("llama3-8b", "alpaca", QLORA,
                                       {"attention": "varlen", "gradient_checkpointing": True, "batch_size": 8}, 10),
    "l3-alpaca-qlora-ckpt-b16-varlen": ("llama3-8b", "alpaca", QLORA,
                                        {"attention": "varlen", "gradient_checkpointing": True, "batch_size": 16}, 10),
    "l3-alpaca-bf16-varlen": ("llama3-8b", "alpaca", NO_QUANT, {"attention": "varlen"}, 10),
    "l3-alpaca-qlora-varlen-b2": ("llama3-8b", "alpaca", QLORA, {"attention": "varlen", "batch_size": 2}, 12),
    "l3-alpaca-qlora-varlen-b3": ("llama3-8b", "alpaca", QLORA, {"attention": "varlen", "batch_size": 3}, 12),
    "l3-alpaca-bf16-varlen-b2": ("llama3-8b", "alpaca", NO_QUANT, {"attention": "varlen", "batch_size": 2}, 12),
    "l3-alpaca-bf16-varlen-b3": ("llama3-8b", "alpaca", NO_QUANT, {"attention": "varlen", "batch_size": 3}, 12),
    "l3-alpaca-bf16-ckpt-b16-varlen": ("llama3-8b", "alpaca", NO_QUANT,
                                       {"attention": "varlen", "gradient_checkpointing": True, "batch_size": 16}, 10),
    # third session: LoRA fused into addmm (train.fused_lora, on unless said), no PEFT fp32 input copies,
    # expandable segments, and gradient checkpointing on only `checkpoint_layers` of the 32 layers
    "l3-alpaca-bf16-unfused": ("llama3-8b", "alpaca", NO_QUANT, {"fused_lora": False}, 10),
    "l3-alpaca-bf16-b6": ("llama3-8b", "alpaca", NO_QUANT, {"batch_size": 6}, 10),
    "l3-alpaca-qlora-unfused": ("llama3-8b", "alpaca", QLORA, {"fused_lora": False}, 10),
    **{f"l3-alpaca-qlora-ck{k}-b{b}": ("llama3-8b", "alpaca", QLORA,
                                       {"gradient_checkpointing": True, "checkpoint_layers": k, "batch_size": b}, 10)
       for k in (12, 16, 18, 20, 24) for b in (3, 4)},
    **{f"l3-alpaca-qlora-ck{k}-b8": ("llama3-8b", "alpaca", QLORA,
                                     {"gradient_checkpointing": True, "checkpoint_layers": k, "batch_size": 8}, 10)
       for k in (24, 26, 28)},
    # fourth session (H200): checkpointed layers' inputs offloaded to host memory, regional compile, and what
    # train.memory_budget_gib picks at each budget (its choice in the row's memory_plan)
    "l3-alpaca-qlora-ckpt-offload": ("llama3-8b", "alpaca", QLORA,
                                     {"attention": "varlen", "gradient_checkpointing": True,
                                      "offload_activations": True}, 10),
    "l3-alpaca-qlora-ckpt-offload-b8": ("llama3-8b", "alpaca", QLORA,
                                        {"attention": "varlen", "gradient_checkpointing": True,
                                         "offload_activations": True, "batch_size": 8}, 10),
    "l3-alpaca-qlora-compile": ("llama3-8b", "alpaca", QLORA, {"attention": "varlen", "compile": True}, 10),
    # fifth session: which lever the compiled layer fails with (Liger's kernels, or varlen attention)
    "l3-alpaca-qlora-compile-noliger": ("llama3-8b", "alpaca", QLORA,
                                        {"attention": "varlen", "compile": True, "liger": "off"}, 10),
    "l3-alpaca-qlora-compile-sdpa": ("llama3-8b", "alpaca", QLORA, {"attention": "sdpa", "compile": True}, 10),
    **{f"l3-alpaca-qlora-budget{b}": ("llama3-8b", "alpaca", QLORA, {"attention": "varlen", "memory_budget_gib": b}, 10)
       for b in (8, 16, 24, 40, 80, 140)},
    # eighth session: `-S train.speed=max` on the tutorials' stack (issue 19 item 5), as many tutorial steps as fill
    # ~12 packed steps (Alpaca: 240 x 4 rows of ~104 tokens; guanaco: 120 x 4 of ~461), beside the tutorial itself
    "l3-alpaca-tutorial-max": ("llama3-8b", "alpaca", QLORA, TUTORIAL | {"speed": "max"}, 240),
    "l2-guanaco-tutorial-max": ("llama2-7b", "guanaco", QLORA, TUTORIAL | {"speed": "max"}, 120),
    # loss curves on identical batches (random order, batch 4, seed 3407): tutorial levers vs ours
    "curve-tutorial": ("llama3-8b", "alpaca", QLORA, TUTORIAL | {"group_by_length": False}, 50),
    "curve-ours": ("llama3-8b", "alpaca", QLORA, {"packing": False, "optimizer": "adamw_torch_fused"}, 50),
}


def _variants(suffix: str, extra: dict, names: tuple[str, ...]) -> dict:
    """``<name>-<suffix>``: each named case with ``extra`` on top of its train overrides."""
    return {f"{n}-{suffix}": (*CASES[n][:3], CASES[n][3] | extra, CASES[n][4]) for n in names}


# eighth session: the 4-bit down projections of recomputed layers in the addmm order, so the recompute runs their base
# matmul again (fused_lora.BASE_LAST off; a bench-only key), beside the default cases, which skip it; and q/k/v and
# gate/up run as one node each (train.fused_lora_groups), beside the same settings without
CASES |= _variants("addmm", {"base_last": False},
                   ("l3-alpaca-qlora-budget8", "l3-alpaca-qlora-budget24", "l3-alpaca-qlora-ckpt-varlen"))
CASES |= _variants("groups", {"fused_lora_groups": True},
                   ("l3-alpaca-qlora-budget8", "l3-alpaca-qlora-budget24", "l3-alpaca-qlora-varlen",
                    "l3-alpaca-bf16-b6"))
WARMUP = 3
# the longest context at batch 1 (issue 19): one document of L tokens a step (``run --context L1,L2``), every layer
# recomputed from its input offloaded to host memory (Unsloth's setting for long rows), beside Unsloth's offloaded
# checkpointing on the same text (``--peers packed``)
CONTEXT = {"batch_size": 1, "grad_accum": 1, "packing": True, "attention": "varlen",
           "gradient_checkpointing": True, "offload_activations": True}


# ------------------------------------------------------------------------------------------
# CPU side: tokenizers and prepared data


def save_tokenizers(vocab_dir: Path, out: Path) -> None:
    """The real Llama-2 (spm) and Llama-3 (bpe) tokenizers rebuilt from llama.cpp's vocab GGUFs, saved
    gzipped under ``out/tokenizers/<bpe|spm>`` (the Llama-3 tokenizer.json is 17 MB, the carry limit 64 MiB)."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    for short, gguf in (("bpe", "ggml-vocab-llama-bpe.gguf"), ("spm", "ggml-vocab-llama-spm.gguf")):
        tok_dir = out / "tmp-tok" / short
        AutoTokenizer.from_pretrained(vocab_dir, gguf_file=gguf).save_pretrained(tok_dir)
        fields = GGUFReader(str(vocab_dir / gguf)).fields
        _drop_tokens_from(tok_dir / "tokenizer.json", len(fields["tokenizer.ggml.tokens"].data))
        if short == "spm":  # the Hub's Llama-2 folders carry tokenizer.model; llama.cpp's converter needs it
            (tok_dir / "tokenizer.model").write_bytes(sentencepiece_model(*(
                [_field_value(fields[f"tokenizer.ggml.{k}"], i) for i in fields[f"tokenizer.ggml.{k}"].data]
                for k in ("tokens", "scores", "token_type"))))
        (out / "tokenizers" / short).mkdir(parents=True, exist_ok=True)
        for f in tok_dir.iterdir():
            with f.open("rb") as src, gzip.open(out / "tokenizers" / short / (f.name + ".gz"), "wb") as dst:
                shutil.copyfileobj(src, dst)


def _field_value(field, index: int):
    part = field.parts[index]
    return bytes(part).decode() if field.types[-1].name == "STRING" else part[0].item()


def sentencepiece_model(pieces: list[str], scores: list[float], types: list[int]) -> bytes:
    """A SentencePiece ``ModelProto`` (Llama-2's settings: BPE, byte fallback, identity normalizer with the
    dummy prefix; unk 0, bos 1, eos 2, no pad) for these pieces, in protobuf's wire format written by hand
    (protobuf is not installed). llama.cpp's token types are SentencePiece's (1 normal ... 6 byte).
    tests/test_quantize.py checks that sentencepiece reads it back as the model it came from."""
    def varint(n: int) -> bytes:
        n &= (1 << 64) - 1  # a negative int32 is a ten-byte varint
        out = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)

    def field(number: int, wire: int, payload: bytes) -> bytes:
        return varint(number << 3 | wire) + payload

    def message(number: int, data: bytes) -> bytes:
        return field(number, 2, varint(len(data)) + data)

    def integer(number: int, value: int) -> bytes:
        return field(number, 0, varint(value))

    body = b"".join(message(1, message(1, p.encode()) + field(2, 5, struct.pack("<f", s)) + integer(3, t))
                    for p, s, t in zip(pieces, scores, types, strict=True))
    # TrainerSpec: model_type BPE, vocab_size, byte_fallback, unk/bos/eos/pad ids
    settings = ((3, 2), (4, len(pieces)), (35, 1), (40, 0), (41, 1), (42, 2), (43, -1))
    trainer = b"".join(integer(k, v) for k, v in settings)
    normalizer = message(1, b"identity") + integer(3, 1) + integer(4, 0) + integer(5, 1)
    return body + message(2, trainer) + message(3, normalizer)


def _drop_tokens_from(path: Path, n_vocab: int) -> None:
    """Remove tokens with ids >= ``n_vocab``: transformers' GGUF conversion adds an ``<|endoftext|>`` at
    128256 to the Llama-3 vocabulary, which the model (128256 rows) lacks and llama.cpp's converter refuses."""
    data = json.loads(path.read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < n_vocab]
    vocab = data["model"]["vocab"]
    if isinstance(vocab, dict):
        data["model"]["vocab"] = {k: v for k, v in vocab.items() if v < n_vocab}
    path.write_text(json.dumps(data, ensure_ascii=False))


def prepare_data(vocab_dir: Path, shared: Path, out: Path) -> None:
    """Rebuild the Llama tokenizers from llama.cpp vocab GGUFs, run the prepare stage per dataset."""
    from finetune.core.recipe import Recipe, read_yaml
    from finetune.stages.prepare import prepare

    out.mkdir(parents=True, exist_ok=True)
    save_tokenizers(vocab_dir, out)
    for name, (recipe_name, raw, tok) in DATASETS.items():
        raw_recipe = read_yaml(Path("recipes/recipe") / f"{recipe_name}.yaml")
        raw_recipe["model"] = {"id": str(out / "tmp-tok" / tok)}
        raw_recipe["data"] |= {"id": None, "local_path": str(shared / raw), "eval_size": 0, "test_size": 0}
        recipe = Recipe.model_validate(raw_recipe)
        metrics = prepare(recipe, out / name, out / f"{name}.prepare.json")
        print(name, json.dumps(metrics["train_tokens"]), flush=True)
        fill = packing_fill(out / name / "train.jsonl", out / "tmp-tok" / tok, recipe.train.max_length)
        (out / f"{name}.packing.json").write_text(json.dumps(fill) + "\n")
        print(name, "packed", json.dumps(fill), flush=True)
    shutil.rmtree(out / "tmp-tok")


def packing_fill(train: Path, tokenizer_dir: Path, seq: int) -> dict:
    """How full TRL's best-fit-decreasing packing (the SFTTrainer's) fills rows of ``seq`` tokens with this split:
    the bins, the tokens of the fullest and the emptiest, and the fill of all but the emptiest (each epoch's one
    short step). Each row is tokenized as the SFTTrainer tokenizes it: prompt + completion (or the text) with the
    EOS appended unless it ends with one."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.data_utils import pack_dataset

    from finetune.core.outputs import read_jsonl
    from finetune.stages.prepare import token_lengths

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = read_jsonl(train)
    for row in rows:  # as TRL's add_eos: on the text, or on the completion
        key = "text" if "text" in row else "completion"
        row[key] += "" if row[key].endswith(tokenizer.eos_token) else tokenizer.eos_token
    lengths = token_lengths(rows, tokenizer)
    packed = pack_dataset(Dataset.from_dict({"input_ids": [[0] * n for n in lengths]}), seq, strategy="bfd")
    bins = sorted((len(ids) for ids in packed["input_ids"]), reverse=True)
    full = bins[:-1] or bins
    return {"seq": seq, "tokens": sum(lengths), "bins": len(bins), "most": bins[0], "least": bins[-1],
            "fill_but_least": round(sum(full) / (len(full) * seq), 4)}


# ------------------------------------------------------------------------------------------
# GPU side


def matmul_peak_tflops() -> float:
    """Median bf16 8192^3 matmul rate on random data, event-timed."""
    import torch

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def build_checkpoint(shape: str, data: Path, dest: Path, layers: int, device: str = "cuda",
                     overrides: dict | None = None) -> Path:
    """A random bf16 Llama of ``shape`` (``overrides`` on its config) saved with its tokenizer
    (RAM disk: fast to reload)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (dest / "config.json").is_file():
        return dest
    tok_src = data / "tokenizers" / TOKENIZER[shape]
    dest.mkdir(parents=True, exist_ok=True)
    for f in tok_src.iterdir():
        with gzip.open(f, "rb") as src, (dest / f.name.removesuffix(".gz")).open("wb") as dst:
            shutil.copyfileobj(src, dst)
    config = LlamaConfig(**(SHAPES[shape] | {"num_hidden_layers": layers} | (overrides or {})),
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(dest)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return dest


def step_timer():
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """CUDA-synchronized wall time and non-pad input tokens of every optimizer step."""

        def __init__(self):
            self.steps: list[dict] = []
            self._t = self._tokens = 0.0

        def on_train_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._t, self._tokens = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            now = time.perf_counter()
            self.steps.append({"seconds": now - self._t, "tokens": state.num_input_tokens_seen - self._tokens})
            self._t, self._tokens = now, state.num_input_tokens_seen

        def on_train_end(self, args, state, control, **kw):
            self.peak_allocated = torch.cuda.max_memory_allocated() / 2**30
            self.peak_reserved = torch.cuda.max_memory_reserved() / 2**30

    return StepTimer()


def doc_lengths(data_dir: Path, tokenizer) -> list[int]:
    from finetune.core.outputs import read_jsonl
    from finetune.stages.prepare import token_lengths

    return token_lengths(read_jsonl(data_dir / "train.jsonl"), tokenizer)


def flops_per_token(model, lengths: list[int]) -> tuple[float, dict]:
    """Model FLOPs per useful token, the formula in the module docstring."""
    import torch

    cfg = model.config
    frozen = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Linear4bit":
            n = module.in_features * module.out_features
            if "lora_" in name:
                lora += n
            elif not hasattr(module, "base_layer"):
                frozen += n
    mean_ctx = sum(s * (s + 1) / 2 for s in lengths) / sum(lengths)
    attn = 4 * cfg.num_hidden_layers * cfg.hidden_size * mean_ctx
    return 4 * frozen + 6 * lora + 3 * attn, {"n_frozen": frozen, "n_lora": lora, "mean_ctx": round(mean_ctx, 1)}


def context_case(data: Path, tokenizer, length: int) -> str:
    """Register case ``ctx-<length>`` and write its dataset: two documents of ``length`` + 256 tokens (the Alpaca
    rows end to end, repeated) that both sides cut to ``length`` -- ours trains on the first, Unsloth's packed
    stream starts with it."""
    from finetune.core.outputs import read_jsonl

    name = f"ctx{length}"
    out = data / name
    if not (out / "train.jsonl").is_file():
        text = "".join(r["prompt"] + r["completion"] + "\n\n" for r in read_jsonl(data / "alpaca" / "train.jsonl"))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = (ids * ((length + 256) // len(ids) + 1))[:length + 256]
        row = json.dumps({"prompt": "Continue the text.\n\n", "completion": tokenizer.decode(ids)})
        out.mkdir(parents=True, exist_ok=True)
        (out / "train.jsonl").write_text(f"{row}\n{row}\n")
        for split in ("eval", "test"):
            (out / f"{split}.jsonl").write_text("")
    DATASETS[name] = ("llama3-alpaca", None, "bpe")
    CASES[f"ctx-{length}"] = ("llama3-8b", name, QLORA, CONTEXT | {"max_length": length}, 2)
    return f"ctx-{length}"


def run_case(name: str, data: Path, ckpt: Path, work: Path, peak_tflops: float, steps: int | None = None,
             callbacks: list | None = None, warmup: int = WARMUP) -> dict:
    """One case through the train stage; ``steps`` instead of the case's own, ``callbacks``: more Trainer callbacks,
    ``warmup``: steps left out of the timing."""
    import torch

    from finetune.core.recipe import Recipe, read_yaml
    from finetune.stages.train import train
    from finetune.training import fused_lora

    shape, dataset, quant, overrides, case_steps = CASES[name]
    overrides = dict(overrides)
    fused_lora.BASE_LAST = overrides.pop("base_last", True)  # a bench-only lever, not a recipe key
    steps = steps or case_steps
    raw = read_yaml(Path("recipes/recipe") / f"{DATASETS[dataset][0]}.yaml")
    raw["model"] = {"id": str(ckpt)}
    raw["data"] |= {"id": None, "local_path": "unused"}
    raw["quant"] = quant
    base_train = {k: v for k, v in raw["train"].items() if k not in LEVERS}
    raw["train"] = base_train | {"max_steps": steps, "logging_steps": 1, "precision": "bf16"} | overrides
    recipe = Recipe.model_validate(raw)
    timer = step_timer()
    holder: dict = {}  # the trainer, to read the model and losses
    metrics = train(recipe, data / dataset, work / "adapter", work / "metrics.json", live_dir=None,
                    callbacks=[timer, *(callbacks or [])], trainer_hook=lambda trainer: holder.update(trainer=trainer))
    trainer = holder["trainer"]
    fpt, counts = flops_per_token(trainer.model, doc_lengths(data / dataset, trainer.processing_class))
    kernels = liger_modules(trainer.model)
    if bool(kernels) != metrics["liger"]:  # what ran must be what the row says ran
        raise RuntimeError(f"{name}: liger {metrics['liger']} but {kernels} Liger modules in the model")
    timed = timer.steps[warmup:]
    seconds = sum(s["seconds"] for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tok_s = tokens / seconds
    del trainer
    holder.clear()  # the trainer holds the model: let the next case have the GPU memory
    gc.collect()  # and its reference cycles: left to the collector, ~6 GiB of one case was still allocated when
    torch.cuda.empty_cache()  # the next one's memory_budget_gib plan counted what is resident (the s4 run)
    return {
        "case": name, "shape": shape, "dataset": dataset, "quant": quant["mode"],
        "train": recipe.train.model_dump(), "packing": metrics["packing"], "liger": metrics["liger"],
        "liger_modules": kernels, "base_last": fused_lora.BASE_LAST,
        "attention": metrics.get("attention"),
        "steps": len(timer.steps), "timed_steps": len(timed),
        "useful_tok_s": round(tok_s, 1),
        "step_s_median": round(statistics.median(s["seconds"] for s in timed), 4),
        "tokens_per_step": round(tokens / len(timed), 1),
        "peak_alloc_gib": round(timer.peak_allocated, 2), "peak_reserved_gib": round(timer.peak_reserved, 2),
        "flops_per_token": fpt, **counts,
        "mfu": round(fpt * tok_s / (peak_tflops * 1e12), 4), "matmul_peak_tflops": round(peak_tflops, 1),
        "losses": losses, "step_seconds": [round(s["seconds"], 4) for s in timer.steps],
        "stage_train_seconds": metrics["train_seconds"],
        **({k: metrics[k] for k in ("memory_plan", "speed_max") if k in metrics}),
    }


def check_varlen() -> dict:
    """The real varlen kernel against separate sdpa runs: per-document losses of a packed bf16 row on a
    2-layer Llama-3-shaped model (grouped kv heads), and the gradient of one LoRA-sized weight."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from finetune.training import varlen

    torch.manual_seed(0)
    cfg = LlamaConfig(**(SHAPES["llama3-8b"] | {"num_hidden_layers": 2, "vocab_size": 4096}))
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    lengths = [97, 13, 250, 61, 400, 5]
    seqs = [torch.randint(5, 4096, (n,)) for n in lengths]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": x.tolist(), "seq_lengths": [len(x)]} for x in seqs])
    batch = {k: (v.cuda() if hasattr(v, "cuda") else v) for k, v in batch.items() if k != "labels"}
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    weight = model.model.layers[1].self_attn.q_proj.weight

    def losses(impl: str, packed: bool):
        model.config._attn_implementation = impl
        model.zero_grad()
        out = []
        if packed:
            logits = model(**batch, use_cache=False).logits[0].float()
            parts = [logits[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
        else:
            parts = [model(input_ids=x[None].cuda(), use_cache=False).logits[0].float() for x in seqs]
        for x, lg in zip(seqs, parts, strict=True):
            out.append(torch.nn.functional.cross_entropy(lg[:-1], x[1:].cuda()))
        torch.stack(out).sum().backward()
        return torch.stack(out).detach(), weight.grad.detach().float().clone()

    want, grad_want = losses("sdpa", packed=False)
    got, grad_got = losses(varlen.register(), packed=True)
    dense, grad_dense = losses("sdpa", packed=True)
    return {"case": "varlen-check", "docs": lengths,
            "max_rel_loss_diff_varlen_vs_separate": float(((got - want).abs() / want).max()),
            "max_rel_loss_diff_sdpa_packed_vs_separate": float(((dense - want).abs() / want).max()),
            "grad_rel_diff": float((grad_got - grad_want).norm() / grad_want.norm()),
            "grad_rel_diff_sdpa_packed": float((grad_dense - grad_want).norm() / grad_want.norm())}


@contextlib.contextmanager
def llama_module_restored():
    """Undo, on leaving, what Liger's ``apply_liger_kernel_to_llama`` did to transformers' Llama module: besides the
    model it is given, it swaps the module's RMSNorm, MLP and rotary function for its own, so every model built
    later in this process carried Liger's kernels, the cases with ``liger: off`` too (the tutorial rows of the
    s3 runs, which ran after check_fused)."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    try:
        yield
    finally:
        for name in set(vars(modeling_llama)) - set(saved):
            delattr(modeling_llama, name)
        for name, value in saved.items():
            setattr(modeling_llama, name, value)


def liger_modules(model) -> int:
    """How many of the model's modules are Liger's (0 when a case runs with ``liger: off``): by the name a module
    reports, since the Trainer's Liger patch (``_apply_liger_kernel_to_instance``) keeps each module's class and
    rebinds its ``forward`` and ``_get_name``; the module-wide patch swaps the classes, whose names say it too."""
    return sum(m._get_name().startswith("Liger") for m in model.modules())


def check_fused() -> dict:
    """finetune.training.fused_lora on the GPU with Liger's SwiGLU, bf16 autocast, fp32 adapters: loss and adapter
    gradients of a 2-layer Llama-3-shaped LoRA model (8 packed rows of 1024 tokens), fused vs PEFT's own
    forward, each against the same model in fp32 (the bf16 rounding both make)."""
    import copy

    import torch
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.training import fused_lora

    torch.manual_seed(0)
    cfg = LlamaConfig(**(SHAPES["llama3-8b"] | {"num_hidden_layers": 2, "vocab_size": 4096}))
    base = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    apply_liger_kernel_to_llama(model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    ids = torch.randint(5, 4096, (8, 1024), device="cuda")
    reference = copy.deepcopy(model).float()

    def run(m, autocast: bool):
        m.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.float().clone() for n, p in m.named_parameters() if p.grad is not None}

    exact, exact_g = run(reference, False)
    peft, peft_g = run(model, True)
    changed = fused_lora.install(model)
    fused, fused_g = run(model, True)
    fused_lora.install(model, groups=True)  # q/k/v and gate/up sharing their first matmul (train.fused_lora_groups)
    grouped, grouped_g = run(model, True)

    def off(grads, ref):  # largest relative difference over the adapter gradients
        return max(float((grads[n] - g).norm() / g.norm()) for n, g in ref.items())

    return {"case": "fused-check", "modules_fused": changed, "loss_fp32": exact,
            "loss_rel_diff_peft": abs(peft - exact) / exact, "loss_rel_diff_fused": abs(fused - exact) / exact,
            "loss_rel_diff_grouped": abs(grouped - exact) / exact,
            "max_grad_rel_diff_peft": off(peft_g, exact_g), "max_grad_rel_diff_fused": off(fused_g, exact_g),
            "max_grad_rel_diff_grouped": off(grouped_g, exact_g),
            "max_grad_rel_diff_fused_vs_peft": off(fused_g, peft_g),
            "max_grad_rel_diff_grouped_vs_fused": off(grouped_g, fused_g)}


KERNEL_KINDS = (  # (kind, substrings of the CUDA kernel name), first match wins
    ("(annotation, not a kernel)", ("profilerstep", "optimizer.step")),
    ("attention (flash varlen)", ("flash", "fmha")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitkreduce")),
    ("4-bit dequantize (bnb)", ("dequantize",)),
    ("optimizer", ("multi_tensor_apply", "adam")),
    ("copy / dtype cast", ("copy", "cast", "memcpy", "memset")),
    ("liger (triton)", ("rms_norm", "swiglu", "rope", "liger", "cross_entropy", "element_mul")),
    ("other elementwise / reduce (aten)", ("elementwise", "reduce", "vectorized", "at::native")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def profile_case(name: str, data: Path, ckpt: Path, work: Path, out: Path) -> dict:
    """CUDA kernels of 2 steps after warm-up (torch.profiler): time per kind of kernel, their sum per
    step (compare with the case's unprofiled step time: the gap is the GPU waiting on the host), and
    the top kernels. Written as text to ``out``; the summary is returned."""
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import TrainerCallback

    active = 2
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                   schedule=schedule(wait=0, warmup=WARMUP, active=active, repeat=1))

    class Step(TrainerCallback):
        def on_train_begin(self, *a, **k):
            prof.start()

        def on_step_end(self, *a, **k):
            prof.step()

        def on_train_end(self, *a, **k):
            prof.stop()

    row = run_case(name, data, ckpt, work, 1.0, steps=WARMUP + active, callbacks=[Step()])
    from torch.autograd import DeviceType

    kinds: dict[str, float] = {}
    for event in prof.events():  # kernels only: CPU ops carry their kernels' time too
        if event.device_type == DeviceType.CUDA:
            kind = kernel_kind(event.name)
            kinds[kind] = kinds.get(kind, 0.0) + event.time_range.elapsed_us() / 1e3 / active
    kinds.pop("(annotation, not a kernel)", None)
    busy = sum(kinds.values())
    summary = {"case": f"profile:{name}", "layers": ckpt.name, "tokens_per_step": row["tokens_per_step"],
               "profiled_wall_ms_per_step": round(sum(row["step_seconds"][-active:]) * 1e3 / active, 1),
               "kernel_ms_per_step": round(busy, 1),
               "kernel_ms_by_kind": {k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}}
    lines = [json.dumps(summary, indent=1), "",
             prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=90)]
    out.write_text("\n".join(lines))
    print("\n".join(lines), flush=True)
    return summary


def run_peer(mode: str, data: Path, ckpt: Path, out: Path, args, dataset: str = "alpaca", case: str = "",
             extra: tuple = ()) -> dict | None:
    """Unsloth in its own process on our Llama-3-8B checkpoint and prepared rows (``extra``: more of its flags);
    its row goes to ``out``, or the failure's last line does."""
    build_checkpoint("llama3-8b", data, ckpt, args.layers)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in (args.peer_site, os.environ.get("PYTHONPATH"))
                                                      if p)}
    case = case or f"unsloth-{mode}"
    cmd = [sys.executable, str(Path(__file__).parent / "unsloth_peer.py"), "--ckpt", str(ckpt), "--data",
           str(data / dataset), "--mode", mode, "--out", str(out), "--case", case, *extra]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.peer_timeout)
        failed = done.returncode != 0 and (done.stderr.strip().splitlines() or ["no output"])[-1]
    except subprocess.TimeoutExpired:
        failed = f"timed out after {args.peer_timeout} s"
    if failed:
        row = {"case": case, "error": failed[:500], "wall_s": round(time.perf_counter() - start, 1)}
        append_row(out, row)
        return row
    return None


def timed_case(name: str, data: Path, ckpt: Path, peak: float, args, **kw) -> dict:
    """One case as a JSONL row in ``args.out`` (its failure too: the next case goes on), printed short."""
    import torch

    ckpt = build_checkpoint(CASES[name][0], data, ckpt, args.layers)
    start = time.perf_counter()
    try:
        row = run_case(name, data, ckpt, Path("/tmp/bench-work") / name, peak, **kw)
    except Exception as err:  # noqa: BLE001 -- record the failure, go on with the next case
        row = {"case": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
               "trace": "".join(traceback.format_exception(err))[-3000:]}  # where it failed, for the next fix
        gc.collect()
        torch.cuda.empty_cache()
    row |= {"layers": args.layers, "wall_s": round(time.perf_counter() - start, 1),
            "gpu": torch.cuda.get_device_name(0)}
    append_row(Path(args.out), row)
    short = {k: row.get(k) for k in ("case", "useful_tok_s", "step_s_median", "tokens_per_step",
                                     "peak_alloc_gib", "mfu", "wall_s", "error")}
    print(json.dumps(short), flush=True)
    return row


def append_row(out: Path, row: dict) -> None:
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--vocab-dir", required=True)
    p.add_argument("--shared", default="../shared/data")
    p.add_argument("--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("--data", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--cases", default=",".join(CASES))
    r.add_argument("--profile", default="", help="cases to profile (torch.profiler, 2 steps)")
    r.add_argument("--layers", type=int, default=32, help="fewer layers for a smoke run")
    r.add_argument("--steps", type=int, default=0, help="override every case's step count")
    r.add_argument("--ckpt-root", default="/dev/shm/bench-ckpt")
    r.add_argument("--peers", default="", help="Unsloth's modes to run after our cases (bench/unsloth_peer.py): "
                   "packed, padfree")
    r.add_argument("--peer-site", default="", help="the folder with Unsloth's own pins, put first on PYTHONPATH")
    r.add_argument("--peer-timeout", type=int, default=300)
    r.add_argument("--context", default="", help="lengths for the longest-context probe (batch 1, one document), "
                   "ours from the shortest up to the first failure, then Unsloth's the same way with --peers packed")
    r.add_argument("--context-steps", type=int, default=2, help="steps per length; the first is not timed if two")
    args = parser.parse_args()
    if args.cmd == "prepare":
        prepare_data(Path(args.vocab_dir), Path(args.shared), Path(args.out))
        return
    from finetune.cli import cuda_allocator_default

    cuda_allocator_default()  # as the stage gets it from the CLI, before torch touches CUDA
    import torch

    data, out = Path(args.data), Path(args.out)
    peak = matmul_peak_tflops()
    print(json.dumps({"gpu": torch.cuda.get_device_name(0), "matmul_peak_tflops": round(peak, 1),
                      "torch": torch.__version__}), flush=True)
    checks = [check_fused] + [check_varlen] * any(CASES[c][3].get("attention") == "varlen"
                                                  for c in args.cases.split(",") if c)
    for check in checks:
        with llama_module_restored():
            row = check()
        append_row(out, row)
        print(json.dumps(row), flush=True)
    names = [c for c in args.cases.split(",") if c]
    names.sort(key=lambda c: CASES[c][0], reverse=True)  # one checkpoint build per shape
    for name in names:
        shape = CASES[name][0]
        timed_case(name, data, Path(args.ckpt_root) / f"{shape}-{args.layers}", peak, args, steps=args.steps or None)
    lengths = sorted(int(n) for n in args.context.split(",") if n)
    ckpt3 = Path(args.ckpt_root) / f"llama3-8b-{args.layers}"
    if lengths:
        from finetune.core.models import open_tokenizer

        tokenizer = open_tokenizer(build_checkpoint("llama3-8b", data, ckpt3, args.layers))
        warmup = int(args.context_steps > 1)
        for length in lengths:  # the probe stops at the first length that does not train
            name = context_case(data, tokenizer, length)
            row = timed_case(name, data, ckpt3, peak, args, steps=args.context_steps, warmup=warmup)
            if "error" in row:
                break
    for mode in [m for m in args.peers.split(",") if m]:
        row = run_peer(mode, data, ckpt3, out, args)
        if row:
            print(json.dumps(row), flush=True)
    if lengths and "packed" in args.peers.split(","):
        for length in lengths:
            name = context_case(data, tokenizer, length)
            extra = ("--rows", "1", "--length", str(length), "--steps", str(args.context_steps),
                     "--warmup", str(warmup))
            row = run_peer("packed", data, ckpt3, out, args, dataset=CASES[name][1], case=f"unsloth-{name}",
                           extra=extra)
            if row:  # a failure: the longest is the one before
                print(json.dumps(row), flush=True)
                break
    for name in [c for c in args.profile.split(",") if c]:
        ckpt = build_checkpoint(CASES[name][0], data, Path(args.ckpt_root) / f"{CASES[name][0]}-{args.layers}",
                                args.layers)
        summary = profile_case(name, data, ckpt, Path("/tmp/bench-work") / f"prof-{name}",
                               out.parent / f"profile-{name}.{args.layers}layers.txt")
        append_row(out, summary)


if __name__ == "__main__":
    main()
