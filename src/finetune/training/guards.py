"""What stops a training run, as one line that says what to change: out of memory, a full disk, LoRA
targets that match no layer, rows cut away entirely, a loss that is not finite."""

from __future__ import annotations

import errno
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from finetune.core.errors import FinetuneError, errno_of, is_out_of_memory
from finetune.core.recipe import Recipe, TrainSpec


@contextmanager
def resource_errors(recipe: Recipe, where: str | Path) -> Iterator[None]:
    """Out of memory and a full disk become one line that says what to change."""
    spec = recipe.train
    try:
        yield
    except Exception as err:  # only memory and disk faults are translated, the rest re-raised
        if is_out_of_memory(err):
            raise FinetuneError(
                f"train: out of memory (train.batch_size {spec.batch_size}, train.max_length {spec.max_length}, "
                f"lora.r {recipe.lora.r}); lower train.batch_size and raise train.grad_accum, set "
                "train.gradient_checkpointing: true, or lower train.max_length (train.packing: true avoids "
                "padding) or lora.r"
            ) from None
        if errno_of(err) not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise FinetuneError(
            f"{getattr(err, 'filename', None) or where}: no space left on device while saving; free disk space "
            "and rerun (finished outputs and complete checkpoints are kept)"
        ) from None


def linear_names(model) -> list[str]:
    """The distinct last names of the model's linear layers (what lora.target_modules matches)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and name})


@contextmanager
def adding_adapter(recipe: Recipe, model) -> Iterator[None]:
    """Adding the adapter: target modules that match nothing, and memory for a huge ``lora.r``."""
    from peft.utils.error import NoMatchingPeftModuleError

    lora = recipe.lora
    try:
        yield
    except NoMatchingPeftModuleError:
        raise FinetuneError(
            f"lora.target_modules {lora.target_modules}: no layer of the model has that name; its linear layers "
            f"are {', '.join(linear_names(model))} (or set lora.target_modules: all-linear)"
        ) from None
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        raise FinetuneError(
            f"train: out of memory while adding the LoRA adapter (lora.r {lora.r}); lower lora.r "
            "(8-64 is usual) or target fewer layers in lora.target_modules"
        ) from None


def check_rows_left(trainer, splits: dict, data_dir: Path, spec: TrainSpec) -> None:
    """TRL drops rows whose completion is cut away entirely at train.max_length: none may be left."""
    for name, split in (("train", trainer.train_dataset), ("eval", trainer.eval_dataset)):
        if split is not None and name in splits and len(split) == 0:
            raise FinetuneError(
                f"{data_dir}/{name}.jsonl: every one of its {len(splits[name])} rows is cut to nothing at "
                f"train.max_length {spec.max_length} tokens (its prompt alone is that long); raise "
                "train.max_length, or set data.max_length with data.on_too_long: drop so prepare leaves them out"
            )


def check_finite_loss(history: list[dict], train_loss: float, eval_loss: float | None, learning_rate: float) -> None:
    """Every logged loss, the final train loss and the eval loss are finite numbers."""
    logged = [h["loss"] for h in history if "loss" in h] + [train_loss]
    bad = next((x for x in [*logged, eval_loss] if x is not None and not math.isfinite(x)), None)
    if bad is not None:
        raise FinetuneError(f"train: the loss became {bad}; lower train.learning_rate (now {learning_rate})")
