"""``train.speed``: ``tutorial`` (the default) trains as the recipe's tutorial did; ``max`` trains the same
number of tokens at full speed.

``max`` turns on every lever that changes how fast the tokens go through, not which tokens: rows packed
padding-free into ``max_length`` bins with per-document attention (varlen on CUDA), Liger kernels when they
are there, the fused LoRA forward, and ``train.memory_budget_gib: auto`` unless a budget is set (rows per
forward and recomputed layers chosen to fit the GPU). The optimizer, learning rate, LoRA and data stay the
tutorial's. A packed step holds more tokens than the tutorial's padded rows, so a run of ``max_steps`` gets
fewer steps: as many as the tutorial's steps' tokens fill (:func:`match_tokens`), with its warmup scaled
alike. A run of ``epochs`` sees every row as often either way.
"""

from __future__ import annotations

import logging
import math

from finetune.core.recipe import Recipe

log = logging.getLogger(__name__)


def resolve(recipe: Recipe) -> Recipe:
    """The recipe with ``speed: max``'s levers set (as it is for ``tutorial`` and for classifiers)."""
    spec = recipe.train
    if spec.speed != "max" or recipe.model.task != "causal_lm":
        return recipe
    update = {"packing": True, "group_by_length": False, "attention": "auto", "liger": "auto", "fused_lora": True,
              "memory_budget_gib": spec.memory_budget_gib if spec.memory_budget_gib is not None else "auto"}
    return recipe.model_copy(update={"train": spec.model_copy(update=update)})


def match_tokens(trainer, tutorial: Recipe) -> dict | None:
    """Give a packed ``speed: max`` run of ``max_steps`` the steps that hold the tokens the tutorial's steps held
    (its rows per step x the mean row length; the warmup steps scaled alike); returns what was set."""
    spec = tutorial.train
    if spec.speed != "max" or spec.max_steps <= 0 or "seq_lengths" not in trainer.train_dataset.column_names:
        return None
    lengths = trainer.train_dataset["seq_lengths"]
    rows, tokens = sum(len(bin_) for bin_ in lengths), sum(sum(bin_) for bin_ in lengths)
    world = trainer.args.world_size
    tutorial_tokens = spec.max_steps * spec.batch_size * spec.grad_accum * world * tokens / rows
    per_step = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps * world
    steps = max(1, round(tutorial_tokens / (per_step * tokens / len(lengths))))
    warmup = math.ceil(spec.warmup_steps * steps / spec.max_steps) if spec.warmup_steps else 0
    trainer.args.max_steps = steps
    if spec.warmup_steps:
        trainer.args.warmup_steps = warmup
    log.info("train.speed max: %d packed steps hold the tokens of the tutorial's %d (~%.0f tokens)", steps,
             spec.max_steps, tutorial_tokens)
    return {"steps": steps, "tutorial_steps": spec.max_steps, "tutorial_tokens": round(tutorial_tokens),
            "warmup_steps": warmup}
