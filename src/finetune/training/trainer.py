"""The Trainer for a recipe: TRL's SFTTrainer for causal LMs, the Trainer for a LoRA classifier, and what
runs around them (DVCLive without wall-clock values, the levers that live on the model's modules, autocast
without PEFT's fp32 input copies)."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import torch

from finetune.core.errors import FinetuneError
from finetune.core.outputs import read_jsonl
from finetune.core.recipe import Recipe, TrainSpec
from finetune.training import fused_lora, offload, regional_compile
from finetune.training.levers import Levers, decoder_layers

WALL_CLOCK = ("runtime", "_per_second")  # Trainer log keys that measure the machine, not the model


def load_splits(data_dir: Path) -> dict:
    """The prepare stage's ``train``/``eval``/``test`` JSONL files as datasets (empty or missing ones left out)."""
    from datasets import Dataset

    splits = {}
    for name in ("train", "eval", "test"):
        path = Path(data_dir) / f"{name}.jsonl"
        rows = read_jsonl(path) if path.is_file() else []
        if rows:
            splits[name] = Dataset.from_list(rows)
    if "train" not in splits:
        raise FinetuneError(f"{data_dir}/train.jsonl: missing or empty; run the prepare stage first")
    return splits


def lora_config(recipe: Recipe):
    from peft import LoraConfig, TaskType

    spec = recipe.lora
    task = TaskType.SEQ_CLS if recipe.model.task == "sequence_classification" else TaskType.CAUSAL_LM
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        bias=spec.bias,
        task_type=task,
    )


def training_kwargs(spec: TrainSpec, prec: str, output_dir: str) -> dict[str, Any]:
    """TrainingArguments shared by SFT and classification, straight from the recipe."""
    return {
        "output_dir": output_dir,
        "seed": spec.seed,
        "data_seed": spec.seed,
        "full_determinism": not torch.cuda.is_available(),  # deterministic kernels: free on CPU, slow on GPU
        "learning_rate": spec.learning_rate,
        "lr_scheduler_type": spec.lr_scheduler,
        "warmup_steps": spec.warmup_steps if spec.warmup_steps else spec.warmup_ratio,
        "num_train_epochs": spec.epochs,
        "max_steps": spec.max_steps,
        "per_device_train_batch_size": spec.batch_size,
        "per_device_eval_batch_size": spec.batch_size,
        "gradient_accumulation_steps": spec.grad_accum,
        "optim": spec.optimizer,
        "weight_decay": spec.weight_decay,
        "max_grad_norm": spec.max_grad_norm,
        "gradient_checkpointing": spec.gradient_checkpointing,
        "train_sampling_strategy": "group_by_length" if spec.group_by_length else "random",
        "bf16": prec == "bf16",
        "fp16": prec == "fp16",
        "use_cpu": not torch.cuda.is_available(),
        "logging_steps": spec.logging_steps,
        "eval_strategy": "steps" if spec.eval_steps else "no",
        "eval_steps": spec.eval_steps,
        "save_strategy": "no",
        "report_to": "none",
        "dataloader_num_workers": 0,
        "include_num_input_tokens_seen": "non_padding",
        "disable_tqdm": True,
    }


def build_trainer(recipe: Recipe, levers: Levers, model, tokenizer, splits: dict, args: dict[str, Any],
                  callbacks: list):
    """The Trainer that trains ``model`` on ``splits`` (``train`` and an optional ``eval``) with the
    TrainingArguments ``args`` (:func:`training_kwargs` plus checkpointing) and ``callbacks``."""
    build = _classification_trainer if levers.classify else _sft_trainer
    return build(recipe, levers, model, tokenizer, splits, args, callbacks)


def _sft_trainer(recipe: Recipe, levers: Levers, model, tokenizer, splits: dict, args: dict, callbacks: list):
    from trl import SFTConfig, SFTTrainer

    # packed rows are padding-free: every token is real, and counting "non_padding" would skip each document's EOS
    # (the pad token is the EOS when the tokenizer has none), ~1% of Alpaca's tokens
    counted = "all" if levers.packing else args["include_num_input_tokens_seen"]
    config = SFTConfig(
        **(args | {"include_num_input_tokens_seen": counted}),
        max_length=recipe.train.max_length,
        packing=levers.packing,
        use_liger_kernel=levers.liger,
        completion_only_loss=True,
        dataset_num_proc=None,
    )
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=splits["train"],
        eval_dataset=splits.get("eval"),
        processing_class=tokenizer,
        peft_config=lora_config(recipe),
        callbacks=callbacks,
    )


def _accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def tokenize_texts(split, tokenizer, max_length: int):
    """A ``text_label`` split tokenized for the classifier (truncated to ``max_length``)."""
    return split.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length),
                     batched=True, remove_columns=["text"])


def _classification_trainer(recipe: Recipe, levers: Levers, model, tokenizer, splits: dict, args: dict,
                            callbacks: list):
    from peft import get_peft_model
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    tokenized = {k: tokenize_texts(v, tokenizer, recipe.train.max_length) for k, v in splits.items()}
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return Trainer(
        model=get_peft_model(model, lora_config(recipe)),
        args=TrainingArguments(**args),
        train_dataset=tokenized["train"],
        eval_dataset=tokenized.get("eval"),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=_accuracy,
        callbacks=callbacks,
    )


def dvclive_callback(live_dir: Path | None, resume: bool = False) -> list:
    """DVCLive logging of the loss curve and params, without wall-clock values or scratch paths, so
    two runs of the same recipe write byte-identical files (timing goes to the timing file)."""
    if live_dir is None:
        return []
    from dvclive import Live
    from transformers.integrations import DVCLiveCallback

    class QualityDVCLiveCallback(DVCLiveCallback):
        def setup(self, args, state, model):
            self._initialized = True
            if state.is_world_process_zero:
                params = {k: v for k, v in args.to_dict().items() if k not in ("output_dir", "logging_dir")}
                self.live.log_params(params)

        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            logs = {k: v for k, v in (logs or {}).items() if not k.endswith(WALL_CLOCK)}
            super().on_log(args, state, control, model=model, logs=logs, **kwargs)

    live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None, resume=resume)
    return [QualityDVCLiveCallback(live=live)]


def model_levers(model, spec: TrainSpec):
    """A callback that sets the levers living on the model's modules once ``Trainer.train`` has set up the
    model (Liger's patches, gradient checkpointing on every layer): the fused LoRA forward
    (``train.fused_lora``, q/k/v and gate/up grouped with ``train.fused_lora_groups``), checkpointing on only
    ``train.checkpoint_layers`` decoder layers, spread evenly, each decoder layer compiled (``train.compile``)
    and the checkpointed layers' inputs kept in host memory (``train.offload_activations``)."""
    from transformers import TrainerCallback

    layers = decoder_layers(model)
    count = spec.checkpoint_layers
    if count is not None and count > len(layers):
        raise FinetuneError(f"train.checkpoint_layers is {count} but the model has {len(layers)} decoder layers; "
                            f"set it to at most {len(layers)} (or null: all)")
    if spec.compile and not layers:
        raise FinetuneError("train.compile: the model has no decoder layers (transformers' GradientCheckpointingLayer) "
                            "to compile one by one; set train.compile: false")

    class ModelLevers(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if count is not None:
                for i, layer in enumerate(layers):
                    layer.gradient_checkpointing = (i + 1) * count // len(layers) > i * count // len(layers)
            if spec.fused_lora:
                recomputed = [getattr(layer, "mlp", None) for layer in layers if layer.gradient_checkpointing]
                fused_lora.install(model, recomputed_mlps=[m for m in recomputed if m is not None],
                                   groups=spec.fused_lora_groups)
            if spec.compile:  # after the flags and the fused forward: a checkpointed layer compiles another way
                regional_compile.install(layers)
            if spec.offload_activations:
                offload.install(layers)

    return ModelLevers()


def autocast_inputs(model, prec: str):
    """Under bf16/fp16 autocast, stop PEFT from copying every LoRA layer's input to the adapters' fp32.

    PEFT keeps adapters in fp32 and casts each LoRA layer's input to it; autocast then casts it back
    for the matmul, so the round trip changes no value but costs two copies of every projection's
    input per step, one of them kept for backward (measured in bench/README.md). 4-bit layers
    already skip it under autocast. A no-op in fp32. A context manager.
    """
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model, active=prec in ("bf16", "fp16"))


def peak_memory_gib() -> float:
    """This process's peak: GPU memory allocated on CUDA, else the resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
