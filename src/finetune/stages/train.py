"""Stage ``train``: LoRA / QLoRA on the prepared data -> adapter + metrics.

Causal LMs train with TRL's SFTTrainer on ``{prompt, completion}`` rows: loss on completion tokens
only, EOS appended to every completion. Sequence classification (``text_label``) trains a PEFT
LoRA classifier with the Trainer and reports accuracy. Loss curves go to DVCLive. More than one
process (``distributed``) re-runs the command under ``accelerate launch`` (the CLI does that).
Reads the ``model``, ``lora``, ``quant``, ``train`` and ``distributed`` sections.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.core.errors import FinetuneError
from finetune.core.models import load_model, load_tokenizer, reading
from finetune.core.outputs import atomic_dir, write_json
from finetune.core.provenance import provenance
from finetune.core.recipe import Recipe
from finetune.training import checkpoints, distributed, guards, memory, speed
from finetune.training.levers import Levers, decoder_layers
from finetune.training.trainer import (
    autocast_inputs,
    build_trainer,
    dvclive_callback,
    load_splits,
    model_levers,
    peak_memory_gib,
    tokenize_texts,
    training_kwargs,
)


@dataclass(frozen=True)
class TrainPlan:
    """What the run is, decided before anything loads: the levers and where the run's files live."""

    levers: Levers
    data_dir: Path
    adapter_dir: Path
    run_dir: Path  # checkpoints of this params+data hash (checkpoints.run_key): a rerun resumes there
    resume: Path | None  # the newest intact checkpoint in run_dir
    live_dir: Path | None  # DVCLive's folder (None: no DVCLive)
    live_work: Path | None  # DVCLive's files while training, inside run_dir (rank 0 only)
    main: bool  # rank 0 (or the only process): the one that writes adapter, metrics and DVCLive

    @classmethod
    def resolve(cls, recipe: Recipe, data_dir: str | Path, adapter_dir: str | Path, live_dir: str | Path | None,
                checkpoint_dir: str | Path | None) -> TrainPlan:
        if recipe.quant.mode == "4bit" and recipe.model.task == "sequence_classification":
            raise FinetuneError("quant.mode 4bit is for causal LMs here; set quant.mode: none")
        data_dir, adapter_dir = Path(data_dir), Path(adapter_dir)
        root = Path(checkpoint_dir) if checkpoint_dir else adapter_dir.parent / "checkpoints"
        run = root / checkpoints.run_key(recipe.model_dump(include={"model", "lora", "quant", "train"}),
                                         [data_dir / "train.jsonl", data_dir / "eval.jsonl"])
        main = distributed.is_main_process()
        return cls(levers=Levers.resolve(recipe), data_dir=data_dir, adapter_dir=adapter_dir, run_dir=run,
                   resume=checkpoints.latest_complete(run), live_dir=Path(live_dir) if live_dir else None,
                   live_work=run / "dvclive" if live_dir and main else None, main=main)


@dataclass
class Run:
    """The built trainer and what watches it."""

    trainer: Any
    model: Any  # as loaded, before the adapter
    guard: checkpoints.StopOnNonFinite
    stop: checkpoints.StopOnSignal
    trainable: int
    total: int


def train(recipe: Recipe, data_dir: str | Path, adapter_dir: str | Path, metrics_path: str | Path,
          live_dir: str | None = None, timing_path: str | Path | None = None, callbacks: list | None = None,
          checkpoint_dir: str | Path | None = None,
          trainer_hook: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Run the stage; return the metrics written. Quality metrics (deterministic on CPU) go to
    ``metrics_path``, wall-clock ones (seconds, tokens/s, peak memory) to ``timing_path``.
    ``callbacks``: extra Trainer callbacks; ``trainer_hook``: called with the trainer once it is built,
    before it trains (benchmarks read its model and log history).

    Checkpoints go to ``checkpoint_dir`` (default: ``checkpoints/`` beside the adapter folder),
    one subfolder per params+data hash; a rerun with the same ones resumes from the newest intact
    checkpoint (see :mod:`finetune.training.checkpoints`).
    """
    tutorial, recipe = recipe, speed.resolve(recipe)  # train.speed: max sets its levers here
    plan = TrainPlan.resolve(recipe, data_dir, adapter_dir, live_dir, checkpoint_dir)
    splits, tokenizer, model = _setup(recipe, plan)
    recipe, memory_plan = _fit(recipe, plan, model)
    with checkpoints.removed_on_success(plan.run_dir):  # the run folder outlives a kill or an error
        run = _build(recipe, plan, model, tokenizer, splits, list(callbacks or []))
        matched = speed.match_tokens(run.trainer, tutorial)  # max: the steps that hold the tutorial's tokens
        if trainer_hook is not None:
            trainer_hook(run.trainer)
        result, seconds, eval_loss = _run(recipe, plan, run, "eval" in splits)
        metrics = _quality(recipe, plan, run, result.training_loss, eval_loss, splits, tokenizer)
        if matched:
            metrics["speed_max"] = matched
        peak = _save(recipe, plan, run.trainer, tokenizer)
    tokens = metrics["tokens_seen"]
    timing = {
        "train_seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 2) if seconds else None,
        "peak_memory_gib": round(peak, 3),
        **({"memory_plan": memory_plan} if memory_plan else {}),
        "provenance": provenance(),
    }
    if plan.main:
        if timing_path is not None:
            write_json(timing_path, timing)
        write_json(metrics_path, metrics)
    return metrics | timing


def _setup(recipe: Recipe, plan: TrainPlan) -> tuple[dict, Any, Any]:
    """Threads and seed, then the data, the tokenizer and the base model (in the plan's dtype and attention)."""
    from transformers import set_seed

    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    set_seed(recipe.train.seed)
    splits = load_splits(plan.data_dir)
    with reading(recipe.model):  # a GGUF's header parsed once for both
        tokenizer = load_tokenizer(recipe.model)
        model = load_model(recipe.model, plan.levers.dtype, recipe.quant, **plan.levers.load_kwargs,
                           **distributed.load_overrides(recipe))
    if plan.live_work is not None:
        checkpoints.restore_live(plan.resume, plan.live_work)
    return splits, tokenizer, model


def _fit(recipe: Recipe, plan: TrainPlan, model) -> tuple[Recipe, dict | None]:
    """The recipe with the train settings that fit ``train.memory_budget_gib`` (:mod:`finetune.training.memory`),
    and what was chosen; the recipe as it is when no budget is set."""
    if recipe.train.memory_budget_gib is None:
        return recipe, None
    if plan.levers.classify or not decoder_layers(model):
        raise FinetuneError("train.memory_budget_gib plans causal LMs made of decoder layers; set it to null for "
                            f"{recipe.model.id}")
    offload = torch.cuda.is_available()  # on the CPU offloading moves nothing out of the memory budgeted
    spec, chosen = memory.plan(model, recipe, offload=offload)
    return recipe.model_copy(update={"train": spec}), chosen


def _build(recipe: Recipe, plan: TrainPlan, model, tokenizer, splits: dict, callbacks: list) -> Run:
    """The trainer with the adapter added, checkpointing, DVCLive, the NaN and signal guards."""
    spec = recipe.train
    args = training_kwargs(spec, plan.levers.precision, str(plan.run_dir)) | checkpoints.trainer_args(
        spec.save_steps, plan.run_dir)
    guard, stop = checkpoints.StopOnNonFinite(), checkpoints.StopOnSignal()
    saver = checkpoints.CheckpointCallback(plan.live_work, plan.resume)
    hooks = [*dvclive_callback(plan.live_work, resume=plan.resume is not None), guard, stop, saver, *callbacks]
    with guards.adding_adapter(recipe, model):
        trainer = build_trainer(recipe, plan.levers, model, tokenizer,
                                {k: v for k, v in splits.items() if k != "test"}, args, hooks)
    saver.trainer = trainer
    guards.check_rows_left(trainer, splits, plan.data_dir, spec)
    distributed.check_backend(recipe, trainer)
    trainer.add_callback(model_levers(trainer.model, spec))
    trainable, total = trainer.model.get_nb_trainable_parameters()
    return Run(trainer, model, guard, stop, int(trainable), int(total))


def _run(recipe: Recipe, plan: TrainPlan, run: Run, has_eval: bool) -> tuple[Any, float, float | None]:
    """Train (resuming from the plan's checkpoint), then the eval loss; (train result, seconds, eval loss)."""
    trainer, spec, prec = run.trainer, recipe.train, plan.levers.precision
    start = time.perf_counter()
    with run.stop.installed(), guards.resource_errors(recipe, plan.run_dir), autocast_inputs(trainer.model, prec):
        result = trainer.train(resume_from_checkpoint=str(plan.resume) if plan.resume else None)
    seconds = time.perf_counter() - start
    checkpoints.raise_if_stopped(run.guard, run.stop, trainer.state.global_step, trainer.state.max_steps,
                                 plan.run_dir, spec.learning_rate)
    with autocast_inputs(trainer.model, prec):
        eval_loss = float(trainer.evaluate()["eval_loss"]) if has_eval else None
    guards.check_finite_loss(trainer.state.log_history, result.training_loss, eval_loss, spec.learning_rate)
    return result, seconds, eval_loss


def _quality(recipe: Recipe, plan: TrainPlan, run: Run, train_loss: float, eval_loss: float | None,
             splits: dict, tokenizer) -> dict[str, Any]:
    """The deterministic metrics (no wall clock); a classifier is also scored on the test split."""
    trainer, levers = run.trainer, plan.levers
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics: dict[str, Any] = {
        "train_loss": round(float(train_loss), 6),  # a resumed run's too covers every step (restore_log_state)
        "final_logged_loss": losses[-1] if losses else None,
        "steps": trainer.state.global_step,
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "trainable_params": run.trainable,
        "total_params": run.total,
        "precision": levers.precision,
        "packing": levers.packing,
        "liger": levers.liger,
        "attention": getattr(run.model.config, "_attn_implementation", None),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "num_processes": trainer.args.world_size,
    }
    if plan.resume is not None:
        metrics["resumed_from_step"] = checkpoints.step_of(plan.resume)
    if eval_loss is not None:
        metrics["eval_loss"] = round(eval_loss, 6)
    if levers.classify and "test" in splits:
        test = trainer.evaluate(eval_dataset=tokenize_texts(splits["test"], tokenizer, recipe.train.max_length),
                                metric_key_prefix="test")
        metrics["test_accuracy"] = round(float(test["test_accuracy"]), 6)
    return metrics


def _save(recipe: Recipe, plan: TrainPlan, trainer, tokenizer) -> float:
    """The adapter (every process takes part under FSDP) and DVCLive's files; returns the peak memory."""
    for config in getattr(trainer.model, "peft_config", {}).values():  # a set: saved in hash order otherwise
        if isinstance(config.target_modules, (set, frozenset)):
            config.target_modules = sorted(config.target_modules)
    with guards.resource_errors(recipe, plan.adapter_dir):
        distributed.save_adapter(trainer, tokenizer, plan.adapter_dir, recipe.model.id)
    if plan.live_dir is not None and plan.live_work is not None and plan.live_work.is_dir():
        with atomic_dir(plan.live_dir) as tmp:
            shutil.copytree(plan.live_work, tmp, dirs_exist_ok=True)
    return distributed.max_over_processes(trainer, peak_memory_gib())
