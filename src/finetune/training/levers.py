"""The train section's levers as this machine runs them: precision, packing, Liger kernels, attention, compile.

``auto`` means "what suits the hardware here"; :meth:`Levers.resolve` decides each lever once, and the
train stage carries the result in its plan, so every later use (the model load, the SFT config, the
metrics) sees the same choice.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass

import torch

from finetune.core.errors import FinetuneError
from finetune.core.recipe import Recipe, TrainSpec


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's decoder layers (transformers' ``GradientCheckpointingLayer``), in order: what the per-layer
    levers (checkpoint_layers, compile, offload) and the memory plan work on."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def precision(spec: TrainSpec) -> str:
    """Resolve ``auto``: bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU."""
    if spec.precision != "auto":
        return spec.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def packing_enabled(spec: TrainSpec, classify: bool = False) -> bool:
    """Resolve ``train.packing``: ``auto`` packs causal-LM rows on CUDA unless group_by_length is asked."""
    if classify:
        return False
    if spec.packing == "auto":
        return torch.cuda.is_available() and not spec.group_by_length
    return spec.packing


def liger_enabled(spec: TrainSpec) -> bool:
    """Resolve ``train.liger``: ``auto`` is on when CUDA is there and liger-kernel imports, and the decoder layers
    are not compiled: dynamo cannot trace Liger's RMSNorm (an autograd Function) inside a compiled layer, and
    Inductor fuses the norm, RoPE and SwiGLU there itself (bench/train_speed.h200-s7-compile.jsonl). The loss is
    TRL's fused LM head either way."""
    if spec.liger == "off":
        return False
    if spec.compile:
        if spec.liger == "on":
            raise FinetuneError("train.liger: on with train.compile: true: Liger's kernels cannot run inside the "
                                "compiled decoder layers; set train.liger: auto (off when compiling) or compile: false")
        return False
    available = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None
    if spec.liger == "on" and not available:
        raise FinetuneError("train.liger: on needs CUDA and the liger-kernel package (the `gpu` extra); "
                            "set train.liger: auto or off")
    return available


def attention(spec: TrainSpec, packed: bool) -> str | None:
    """``attn_implementation`` for the model load (None: the model's default, sdpa).

    Packed rows stay separate under every choice: sdpa and eager get a per-document mask that
    transformers builds from the restarting position ids (dense: cost grows with the square of the
    batch's tokens); flex_attention skips the blocks between documents but compiles first; varlen
    (:mod:`finetune.training.varlen`) hands the document boundaries to PyTorch's variable-length flash
    kernel. ``auto``: varlen when packing on CUDA and PyTorch has it, else the model's default.
    """
    from finetune.training import varlen

    if spec.attention == "auto":
        return varlen.register() if packed and varlen.available() else None
    if spec.attention == "varlen":
        if not varlen.available():
            raise FinetuneError("train.attention: varlen needs CUDA and PyTorch >= 2.10 "
                                "(torch.nn.attention.varlen); set train.attention: auto or sdpa")
        if not packed:
            raise FinetuneError("train.attention: varlen takes packed, padding-free batches; "
                                "set train.packing: true (or auto on CUDA) or train.attention: sdpa")
        return varlen.register()
    return spec.attention


def check_compile(spec: TrainSpec) -> None:
    """``train.compile`` needs inductor's toolchain here: Triton on CUDA, a C++ compiler on CPU (``$CXX``, else
    ``g++``, as inductor looks for it), or the first step would fail deep inside the compiler."""
    if not spec.compile:
        return
    if torch.cuda.is_available():
        if importlib.util.find_spec("triton") is None:
            raise FinetuneError("train.compile: torch.compile on CUDA needs Triton (PyTorch's CUDA wheels bring it), "
                                "which is not installed here; install it or set train.compile: false")
        return
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise FinetuneError(f"train.compile: torch.compile on CPU builds its kernels with a C++ compiler and {cxx} "
                            "(from $CXX, else g++) is not on PATH; install g++ or set train.compile: false")


@dataclass(frozen=True)
class Levers:
    """The levers of one run, each resolved once (:meth:`resolve`)."""

    classify: bool  # a sequence classifier (the Trainer) rather than a causal LM (TRL's SFTTrainer)
    precision: str  # fp32, fp16 or bf16
    packing: bool
    liger: bool
    attention: str | None  # attn_implementation; None: the model's default

    @classmethod
    def resolve(cls, recipe: Recipe) -> Levers:
        spec = recipe.train
        check_compile(spec)
        classify = recipe.model.task == "sequence_classification"
        packing = packing_enabled(spec, classify)
        return cls(classify=classify, precision=precision(spec), packing=packing,
                   liger=False if classify else liger_enabled(spec), attention=attention(spec, packing))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the base model is loaded in."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)

    @property
    def load_kwargs(self) -> dict[str, str]:
        """``load_model`` keywords: the attention implementation when one is chosen."""
        return {"attn_implementation": self.attention} if self.attention else {}
