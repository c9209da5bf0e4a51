"""``train.memory_budget_gib``: the fastest setting that fits a memory budget, planned from what this model
costs here.

At start, before the trainer is built, one decoder layer runs forward on a row of ``train.max_length``
tokens and the bytes autograd keeps for its backward are counted (:func:`measure`); with the weights
already in memory and the adapter's and optimizer's share counted from the LoRA targets, that gives the
peak of any setting (:func:`need`): rows per forward (the recipe's rows per optimizer step are kept, so
``grad_accum`` grows as rows shrink: the same tokens per step), decoder layers recomputed in backward
(``checkpoint_layers``) and, if the lever is there, their inputs offloaded to host memory. :func:`choose`
takes the setting that fits with the lowest estimated time per token; a budget that fits none stops
with one line naming the smallest that would.

The speed model and the correction to the counted bytes are fitted to one H200 run of
``bench/train_speed.py`` (``bench/train_speed.s4.h200.jsonl``: Llama-3-8B QLoRA r=16, Alpaca rows packed to
2048, varlen attention, Liger): time per token is the recomputed share (RECOMPUTE with every layer
recomputed, OFFLOAD more with inputs offloaded) plus a fixed cost per forward (FORWARD_TOKENS tokens' worth:
kernel launches, an underfilled GPU), within 3% of the eight measured settings there. The byte counts are
measured, except the adapter's and optimizer's (from the parameter counts). The loss adds nothing per row:
TRL's SFTTrainer scores through its fused LM head (``add_fused_lm_head``: tiles, never the whole logits), with
Liger or without, and a classifier's logits are a few labels wide.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from finetune.core import gpu_memory
from finetune.core.errors import FinetuneError
from finetune.core.recipe import Recipe, TrainSpec
from finetune.training.levers import decoder_layers

log = logging.getLogger(__name__)

GIB = 2**30
# fitted to the eight settings of bench/train_speed.s4.h200.jsonl (least squares on relative error); it also
# gives 11,716 tok/s for 18 of 32 layers recomputed at 4 rows, measured 11,723 on another day (issue 19)
RECOMPUTE = 0.60  # extra time per token with every layer recomputed
OFFLOAD = 0.18  # more of it with the recomputed layers' inputs in host memory (the copies do not hide fully)
FORWARD_TOKENS = 6250  # fixed cost of one forward in tokens of full-speed work (4 rows of 2048: +76%)
# peak per row over the bytes one layer's autograd hooks count, times the layers: (36.89 - 21.47) / 2 GiB per
# row measured (4 vs 2 rows, nothing recomputed) against 32 x 0.2034 counted; the rest (LoRA's dropout and
# low-rank products, Liger's kernels' own saves) is not seen by the hooks at plan time, before the adapter
KEPT_SCALE = 1.185
MARGIN = 0.05  # of the budget, for the allocator's fragmentation and kernels' workspaces
AUTO_RESERVE_GIB = 1.0  # ``auto``: the GPU's free memory minus this (CUDA context, other processes' growth)
OPTIMIZER_BYTES = {"adamw_8bit": 2, "paged_adamw_8bit": 2, "adamw_bnb_8bit": 2, "sgd": 0}  # per trainable param
DEFAULT_OPTIMIZER_BYTES = 8  # Adam's two float32 moments


@dataclass(frozen=True)
class Costs:
    """What one run of this model at this row length costs, in bytes (measured by :func:`measure`)."""

    static: int  # weights and buffers in memory now + the adapter, its gradients and optimizer states
    kept_per_row: int  # activations one decoder layer keeps for backward, one row of max_length tokens
    input_per_row: int  # what a recomputed layer keeps instead: its input hidden states
    layers: int
    tokens_per_row: int


@dataclass(frozen=True)
class Setting:
    rows: int  # rows per forward (train.batch_size)
    grad_accum: int  # rows * grad_accum = the recipe's rows per optimizer step
    checkpoint_layers: int  # decoder layers recomputed in backward (0: no gradient checkpointing)
    offload: bool  # recomputed layers' inputs kept in host memory


def need(costs: Costs, s: Setting) -> int:
    """Peak bytes of setting ``s``: the static part, every layer's kept activations (the inputs of recomputed
    ones, none if offloaded) and one recomputed layer's activations during its backward."""
    kept = (costs.layers - s.checkpoint_layers) * costs.kept_per_row
    recomputed = s.checkpoint_layers * (0 if s.offload else costs.input_per_row)
    redo = costs.kept_per_row if s.checkpoint_layers else 0
    return costs.static + s.rows * (kept + recomputed + redo)


def time_per_token(costs: Costs, s: Setting) -> float:
    """Estimated relative time per training token (1.0: nothing recomputed, no cost per forward)."""
    redo = 1 + RECOMPUTE * s.checkpoint_layers / costs.layers
    offload = 1 + OFFLOAD if s.offload and s.checkpoint_layers else 1
    return redo * offload + FORWARD_TOKENS / (s.rows * costs.tokens_per_row)


def settings(rows_per_step: int, layers: int, offload: bool) -> list[Setting]:
    """Every setting that keeps ``rows_per_step`` rows per optimizer step."""
    rows = [r for r in range(rows_per_step, 0, -1) if rows_per_step % r == 0]
    return [Setting(r, rows_per_step // r, k, o) for r in rows for k in range(layers + 1)
            for o in ((False, True) if offload and k else (False,))]


def choose(costs: Costs, budget: int, rows_per_step: int, offload: bool) -> Setting:
    """The fastest setting within ``budget`` bytes (less the margin); one line if none fits."""
    usable = budget * (1 - MARGIN)
    candidates = settings(rows_per_step, costs.layers, offload)
    fits = [s for s in candidates if need(costs, s) <= usable]
    if not fits:
        least = min(candidates, key=lambda s: need(costs, s))
        smallest = math.ceil(need(costs, least) / (1 - MARGIN) / GIB * 10) / 10  # rounded up: that much fits
        how = f"{least.checkpoint_layers} of {costs.layers} layers recomputed" + (", inputs offloaded"
                                                                                  if least.offload else "")
        raise FinetuneError(
            f"train.memory_budget_gib {budget / GIB:.1f}: even the smallest setting (1 row of "
            f"{costs.tokens_per_row} tokens per forward, {how}) needs {smallest:.1f} GiB; set memory_budget_gib "
            f">= {smallest:.1f}, or lower train.max_length or lora.r"
        )
    return min(fits, key=lambda s: (time_per_token(costs, s), s.checkpoint_layers, s.offload, -s.rows))


# --------------------------------------------------------------------------------- measuring
class _Captured(Exception):
    """Stops the model's forward once the first decoder layer's inputs are known."""


def layer_bytes(model, tokens: int) -> tuple[int, int]:
    """(bytes the first decoder layer keeps for backward, bytes of its input) on one row of ``tokens``."""
    layer = decoder_layers(model)[0]
    captured: dict[str, Any] = {}

    def grab(module, args, kwargs):
        captured.update(args=args, kwargs=kwargs)
        raise _Captured

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    args, kwargs = captured["args"], dict(captured["kwargs"])
    hidden = (args[0] if args else kwargs.pop("hidden_states")).detach().requires_grad_(True)
    # weights, and what every layer shares (rotary cos/sin, a mask): not a layer's own per-row cost
    shared = [*model.parameters(), *[t for v in [*args[1:], *kwargs.values()]
                                    for t in (v if isinstance(v, (tuple, list)) else (v,))
                                    if isinstance(t, torch.Tensor)]]
    weights = {t.untyped_storage().data_ptr() for t in shared}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    was_training = layer.training
    layer.train()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = layer(hidden, *args[1:], **kwargs)
    finally:
        layer.train(was_training)
    del out
    return sum(saved.values()), hidden.numel() * hidden.element_size()


def adapter_params(model, recipe: Recipe) -> int:
    """Parameters LoRA will add: r x (in + out) per targeted linear layer."""
    targets = recipe.lora.target_modules
    total = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        linear = isinstance(module, torch.nn.Linear) and name
        wanted = leaf in targets if isinstance(targets, list) else (targets == "all-linear" and leaf != "lm_head")
        if linear and wanted:
            total += recipe.lora.r * (module.in_features + module.out_features)
    return total


def resident_bytes(model) -> int:
    """The model's weights and buffers where they are now (GPU memory allocated, when on a GPU)."""
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        return torch.cuda.memory_allocated()
    tensors = [*model.parameters(), *model.buffers()]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def measure(model, recipe: Recipe) -> Costs:
    """The costs of ``model`` (loaded, before the adapter) at ``train.max_length`` tokens per row."""
    spec = recipe.train
    counted, inputs = layer_bytes(model, spec.max_length)
    kept = int(counted * KEPT_SCALE)
    lora = adapter_params(model, recipe)
    static = resident_bytes(model) + lora * (4 + 4 + OPTIMIZER_BYTES.get(spec.optimizer, DEFAULT_OPTIMIZER_BYTES))
    return Costs(static=static, kept_per_row=kept, input_per_row=inputs,
                 layers=len(decoder_layers(model)), tokens_per_row=spec.max_length)


def budget_bytes(value: float | str) -> int | None:
    """``auto``: the GPU's free memory (under ``FINETUNE_GPU_MEMORY_GIB``'s cap, if set) less AUTO_RESERVE_GIB (None
    without a GPU); a number: that many GiB."""
    if value == "auto":
        if not torch.cuda.is_available():
            return None
        return int(gpu_memory.free_bytes() - AUTO_RESERVE_GIB * GIB)
    return int(float(value) * GIB)


def plan(model, recipe: Recipe, offload: bool) -> tuple[TrainSpec, dict | None]:
    """``recipe.train`` with the fastest setting that fits ``train.memory_budget_gib`` (as written when that is
    null, or ``auto`` without a GPU), and what was chosen (None when nothing was planned)."""
    spec = recipe.train
    if spec.memory_budget_gib is None or (budget := budget_bytes(spec.memory_budget_gib)) is None:
        return spec, None
    costs = measure(model, recipe)
    best = choose(costs, budget, spec.batch_size * spec.grad_accum, offload)
    layers = best.checkpoint_layers
    update = {"batch_size": best.rows, "grad_accum": best.grad_accum, "gradient_checkpointing": layers > 0,
              "checkpoint_layers": layers if 0 < layers < costs.layers else None}
    update["offload_activations"] = best.offload
    chosen = asdict(best) | {"budget_gib": round(budget / GIB, 2), "predicted_gib": round(need(costs, best) / GIB, 2),
                             "costs_gib": {k: round(v / GIB, 4) for k, v in asdict(costs).items()
                                           if k not in ("layers", "tokens_per_row")}}
    log.info("train.memory_budget_gib %.1f GiB: %d rows x %d accumulated, %d of %d layers recomputed%s; "
             "predicted peak %.1f GiB", budget / GIB, best.rows, best.grad_accum, layers, costs.layers,
             ", inputs offloaded" if best.offload else "", need(costs, best) / GIB)
    return spec.model_copy(update=update), chosen
