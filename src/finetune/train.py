"""Stage ``train``: LoRA / QLoRA on the prepared data -> adapter + metrics.

Causal LMs train with TRL's SFTTrainer on ``{prompt, completion}`` rows: loss on completion tokens
only, EOS appended to every completion. Sequence classification (``text_label``) trains a PEFT
LoRA classifier with the Trainer and reports accuracy. Loss curves go to DVCLive.
Reads the ``model``, ``lora``, ``quant`` and ``train`` sections.
"""

from __future__ import annotations

import errno
import importlib.util
import math
import resource
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from finetune import checkpoints, distributed, fused_lora
from finetune.errors import FinetuneError, errno_of, is_out_of_memory
from finetune.models import load_model, load_tokenizer
from finetune.outputs import atomic_dir, read_jsonl, write_json
from finetune.provenance import provenance
from finetune.recipe import Recipe, TrainSpec


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
    """Resolve ``train.liger``: ``auto`` is on when CUDA is there and liger-kernel imports."""
    if spec.liger == "off":
        return False
    available = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None
    if spec.liger == "on" and not available:
        raise FinetuneError("train.liger: on needs CUDA and the liger-kernel package (the `gpu` extra); "
                            "set train.liger: auto or off")
    return available


def attention_kwargs(spec: TrainSpec, classify: bool = False) -> dict[str, str]:
    """``attn_implementation`` for the model load.

    Packed rows stay separate under every choice: sdpa and eager get a per-document mask that
    transformers builds from the restarting position ids (dense: cost grows with the square of the
    batch's tokens); flex_attention skips the blocks between documents but compiles first; varlen
    (``finetune.varlen``) hands the document boundaries to PyTorch's variable-length flash kernel.
    ``auto``: varlen when packing on CUDA and PyTorch has it, else the model's default (sdpa).
    """
    from finetune import varlen

    packed = packing_enabled(spec, classify)
    if spec.attention == "auto":
        return {"attn_implementation": varlen.register()} if packed and varlen.available() else {}
    if spec.attention == "varlen":
        if not varlen.available():
            raise FinetuneError("train.attention: varlen needs CUDA and PyTorch >= 2.10 "
                                "(torch.nn.attention.varlen); set train.attention: auto or sdpa")
        if not packed:
            raise FinetuneError("train.attention: varlen takes packed, padding-free batches; "
                                "set train.packing: true (or auto on CUDA) or train.attention: sdpa")
        return {"attn_implementation": varlen.register()}
    return {"attn_implementation": spec.attention}


def _model_dtype(prec: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec, torch.float32)


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


WALL_CLOCK = ("runtime", "_per_second")  # Trainer log keys that measure the machine, not the model


def _dvclive_callback(live_dir: str | Path | None, resume: bool = False):
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


def _sft_trainer(recipe: Recipe, model, tokenizer, data: dict, kwargs: dict, callbacks: list):
    from trl import SFTConfig, SFTTrainer

    spec = recipe.train
    config = SFTConfig(
        **kwargs,
        max_length=spec.max_length,
        packing=packing_enabled(spec),
        use_liger_kernel=liger_enabled(spec),
        completion_only_loss=True,
        dataset_num_proc=None,
    )
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=data["train"],
        eval_dataset=data.get("eval"),
        processing_class=tokenizer,
        peft_config=lora_config(recipe),
        callbacks=callbacks,
    )


def _accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def _tokenize_texts(split, tokenizer, max_length: int):
    """A ``text_label`` split tokenized for the classifier (truncated to ``max_length``)."""
    return split.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length),
                     batched=True, remove_columns=["text"])


def _classification_trainer(recipe: Recipe, model, tokenizer, data: dict, kwargs: dict, callbacks: list):
    from peft import get_peft_model
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    tokenized = {k: _tokenize_texts(v, tokenizer, recipe.train.max_length) for k, v in data.items()}
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return Trainer(
        model=get_peft_model(model, lora_config(recipe)),
        args=TrainingArguments(**kwargs),
        train_dataset=tokenized["train"],
        eval_dataset=tokenized.get("eval"),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=_accuracy,
        callbacks=callbacks,
    )


def _load_splits(data_dir: Path) -> dict:
    from datasets import Dataset

    splits = {}
    for name in ("train", "eval", "test"):
        path = data_dir / f"{name}.jsonl"
        rows = read_jsonl(path) if path.is_file() else []
        if rows:
            splits[name] = Dataset.from_list(rows)
    if "train" not in splits:
        raise FinetuneError(f"{data_dir}/train.jsonl: missing or empty; run the prepare stage first")
    return splits


def _peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _last(history: list[dict], key: str) -> float | None:
    values = [h[key] for h in history if key in h]
    return values[-1] if values else None


def _model_levers(model, spec: TrainSpec):
    """A callback that sets the levers living on the model's modules once ``Trainer.train`` has set up the
    model (Liger's patches, gradient checkpointing on every layer): the fused LoRA forward
    (``train.fused_lora``) and checkpointing on only ``train.checkpoint_layers`` decoder layers, spread evenly."""
    from transformers import TrainerCallback
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    count = spec.checkpoint_layers
    if count is not None and count > len(layers):
        raise FinetuneError(f"train.checkpoint_layers is {count} but the model has {len(layers)} decoder layers; "
                            f"set it to at most {len(layers)} (or null: all)")

    class ModelLevers(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if count is not None:
                for i, layer in enumerate(layers):
                    layer.gradient_checkpointing = (i + 1) * count // len(layers) > i * count // len(layers)
            if spec.fused_lora:
                recomputed = [getattr(layer, "mlp", None) for layer in layers if layer.gradient_checkpointing]
                fused_lora.install(model, keep_mlps=[m for m in recomputed if m is not None])

    return ModelLevers()


def _autocast_inputs(model, prec: str):
    """Under bf16/fp16 autocast, stop PEFT from copying every LoRA layer's input to the adapters' fp32.

    PEFT keeps adapters in fp32 and casts each LoRA layer's input to it; autocast then casts it back
    for the matmul, so the round trip changes no value but costs two copies of every projection's
    input per step, one of them kept for backward (measured in bench/README.md). 4-bit layers
    already skip it under autocast. A no-op in fp32.
    """
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model, active=prec in ("bf16", "fp16"))


@contextmanager
def _resource_errors(recipe: Recipe, where: str | Path) -> Iterator[None]:
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


def _linear_names(model) -> list[str]:
    """The distinct last names of the model's linear layers (what lora.target_modules matches)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and name})


@contextmanager
def _building(recipe: Recipe, model) -> Iterator[None]:
    """Adding the adapter: target modules that match nothing, and memory for a huge ``lora.r``."""
    from peft.utils.error import NoMatchingPeftModuleError

    lora = recipe.lora
    try:
        yield
    except NoMatchingPeftModuleError:
        raise FinetuneError(
            f"lora.target_modules {lora.target_modules}: no layer of the model has that name; its linear layers "
            f"are {', '.join(_linear_names(model))} (or set lora.target_modules: all-linear)"
        ) from None
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        raise FinetuneError(
            f"train: out of memory while adding the LoRA adapter (lora.r {lora.r}); lower lora.r "
            "(8-64 is usual) or target fewer layers in lora.target_modules"
        ) from None


def _check_rows_left(trainer, data: dict, data_dir: Path, spec: TrainSpec) -> None:
    """TRL drops rows whose completion is cut away entirely at train.max_length: none may be left."""
    for name, split in (("train", trainer.train_dataset), ("eval", trainer.eval_dataset)):
        if split is not None and name in data and len(split) == 0:
            raise FinetuneError(
                f"{data_dir}/{name}.jsonl: every one of its {len(data[name])} rows is cut to nothing at "
                f"train.max_length {spec.max_length} tokens (its prompt alone is that long); raise "
                "train.max_length, or set data.max_length with data.on_too_long: drop so prepare leaves them out"
            )


def train(
    recipe: Recipe,
    data_dir: str | Path,
    adapter_dir: str | Path,
    metrics_path: str | Path,
    live_dir: str | None = "dvclive",
    timing_path: str | Path | None = None,
    callbacks: list | None = None,
    checkpoint_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run the stage; return the metrics written. Quality metrics (deterministic on CPU) go to
    ``metrics_path``, wall-clock ones (seconds, tokens/s, peak memory) to ``timing_path``.
    ``callbacks``: extra Trainer callbacks (benchmarks).

    Checkpoints go to ``checkpoint_dir`` (default: ``checkpoints/`` beside the adapter folder),
    one subfolder per params+data hash; a rerun with the same ones resumes from the newest intact
    checkpoint (see :mod:`finetune.checkpoints`).
    """
    from transformers import set_seed

    spec = recipe.train
    if spec.threads:
        torch.set_num_threads(spec.threads)
    set_seed(spec.seed)
    if recipe.quant.mode == "4bit" and recipe.model.task == "sequence_classification":
        raise FinetuneError("quant.mode 4bit is for causal LMs here; set quant.mode: none")
    prec = precision(spec)
    data = _load_splits(Path(data_dir))
    tokenizer = load_tokenizer(recipe.model)
    main = distributed.is_main_process()  # only rank 0 writes adapter, metrics and DVCLive
    classify = recipe.model.task == "sequence_classification"
    model = load_model(recipe.model, _model_dtype(prec), recipe.quant, **attention_kwargs(spec, classify),
                       **distributed.load_overrides(recipe))
    root = Path(checkpoint_dir) if checkpoint_dir else Path(adapter_dir).parent / "checkpoints"
    run = root / checkpoints.run_key(recipe.model_dump(include={"model", "lora", "quant", "train"}),
                                     [Path(data_dir) / "train.jsonl", Path(data_dir) / "eval.jsonl"])
    resume = checkpoints.latest_complete(run)
    live_work = run / "dvclive" if live_dir and main else None
    if live_work is not None:
        checkpoints.restore_live(resume, live_work)
    with checkpoints.removed_on_success(run):  # the run folder outlives a kill or an error
        kwargs = training_kwargs(spec, prec, str(run)) | checkpoints.trainer_args(spec.save_steps, run)
        build = _classification_trainer if classify else _sft_trainer
        guard, stop = checkpoints.StopOnNonFinite(), checkpoints.StopOnSignal()
        saver = checkpoints.CheckpointCallback(live_work, resume)
        hooks = [*_dvclive_callback(live_work, resume=resume is not None), guard, stop, saver]
        with _building(recipe, model):
            trainer = build(recipe, model, tokenizer, {k: v for k, v in data.items() if k != "test"},
                            kwargs, hooks + list(callbacks or []))
        saver.trainer = trainer
        _check_rows_left(trainer, data, Path(data_dir), spec)
        distributed.check_backend(recipe, trainer)
        trainer.add_callback(_model_levers(trainer.model, spec))
        trainable, total = trainer.model.get_nb_trainable_parameters()
        start = time.perf_counter()
        with stop.installed(), _resource_errors(recipe, run), _autocast_inputs(trainer.model, prec):
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        seconds = time.perf_counter() - start
        history = trainer.state.log_history
        checkpoints.raise_if_stopped(guard, stop, trainer.state.global_step, trainer.state.max_steps, run,
                                     spec.learning_rate)
        with _autocast_inputs(trainer.model, prec):
            eval_loss = float(trainer.evaluate()["eval_loss"]) if "eval" in data else None
        logged = [h["loss"] for h in history if "loss" in h] + [result.training_loss]
        bad = next((x for x in [*logged, eval_loss] if x is not None and not math.isfinite(x)), None)
        if bad is not None:
            raise FinetuneError(
                f"train: the loss became {bad}; lower train.learning_rate (now {spec.learning_rate})"
            )
        loss = result.training_loss  # a resumed run's too covers every step (checkpoints.restore_log_state)
        tokens = int(trainer.state.num_input_tokens_seen)
        metrics: dict[str, Any] = {
            "train_loss": round(float(loss), 6),
            "final_logged_loss": _last(history, "loss"),
            "steps": trainer.state.global_step,
            "tokens_seen": tokens,
            "trainable_params": int(trainable),
            "total_params": int(total),
            "precision": prec,
            "packing": packing_enabled(spec, classify),
            "liger": liger_enabled(spec) if not classify else False,
            "attention": getattr(model.config, "_attn_implementation", None),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "num_processes": trainer.args.world_size,
        }
        if resume is not None:
            metrics["resumed_from_step"] = checkpoints.step_of(resume)
        if eval_loss is not None:
            metrics["eval_loss"] = round(eval_loss, 6)
        if classify and "test" in data:
            test = trainer.evaluate(eval_dataset=_tokenize_texts(data["test"], tokenizer, spec.max_length),
                                    metric_key_prefix="test")
            metrics["test_accuracy"] = round(float(test["test_accuracy"]), 6)
        for config in getattr(trainer.model, "peft_config", {}).values():  # a set: saved in hash order otherwise
            if isinstance(config.target_modules, (set, frozenset)):
                config.target_modules = sorted(config.target_modules)
        with _resource_errors(recipe, adapter_dir):
            distributed.save_adapter(trainer, tokenizer, adapter_dir)
        if live_dir and live_work is not None and live_work.is_dir():
            with atomic_dir(live_dir) as tmp:
                shutil.copytree(live_work, tmp, dirs_exist_ok=True)
        peak = distributed.max_over_processes(trainer, _peak_memory_gib())
    timing = {
        "train_seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 2) if seconds else None,
        "peak_memory_gib": round(peak, 3),
        "provenance": provenance(),
    }
    if main:
        if timing_path is not None:
            write_json(timing_path, timing)
        write_json(metrics_path, metrics)
    return metrics | timing
