"""train + merge on a tiny random Llama: prompt masking, EOS, adapter shape, merge output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import adapter_tensors, recipe_dict, saved_bytes
from finetune.core.outputs import write_jsonl
from finetune.core.recipe import Recipe

ROWS = [{"prompt": f"<|im_start|>user\nWhat is {i} + 1?<|im_end|>\n<|im_start|>assistant\n",
         "completion": str(i + 1)} for i in range(24)]


def tiny_recipe(model_dir: Path, **train) -> Recipe:
    raw = recipe_dict(
        "quickstart",
        model={"id": str(model_dir), "gguf_file": None},
        train={"max_steps": 2, "batch_size": 4, "logging_steps": 1, "threads": 2, **train},
        lora={"r": 4, "alpha": 8},
        eval={"limit": 4, "max_new_tokens": 4, "batch_size": 4},
    )
    return Recipe.model_validate(raw)


@pytest.fixture
def prepared(tmp_path) -> Path:
    data = tmp_path / "prepared"
    write_jsonl(data / "train.jsonl", ROWS[:16])
    write_jsonl(data / "eval.jsonl", ROWS[16:20])
    write_jsonl(data / "test.jsonl", ROWS[20:])
    return data


def test_completion_only_labels_and_eos(tiny_llama, prepared, tmp_path):
    from finetune.core.models import load_model, load_tokenizer
    from finetune.training.levers import Levers
    from finetune.training.trainer import build_trainer, load_splits, training_kwargs

    recipe = tiny_recipe(tiny_llama)
    levers = Levers.resolve(recipe)
    tok = load_tokenizer(recipe.model)
    model = load_model(recipe.model, levers.dtype)
    data = load_splits(prepared)
    trainer = build_trainer(recipe, levers, model, tok, {"train": data["train"]},
                            training_kwargs(recipe.train, levers.precision, str(tmp_path / "s")), [])
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        real = ids[ids != -1]
        text = tok.decode(real)
        row = next(r for r in ROWS if text.startswith(r["prompt"]) or r["prompt"] in text)
        n_prompt = len(tok(row["prompt"])["input_ids"])
        assert (labels[:n_prompt] == -100).all(), "prompt tokens must not carry loss"
        kept = labels[labels != -100]
        assert tok.decode(kept[:-1]).strip() == row["completion"]
        assert kept[-1].item() == tok.eos_token_id, "the completion must end with EOS"


def test_packed_and_padded_epochs_count_the_same_tokens_eos_included(tiny_llama, prepared, tmp_path):
    """One epoch over the same rows counts the same tokens packed (padding-free, no attention mask) as padded: the
    packed count keeps each row's EOS, which is also the pad token here (counting "non_padding" dropped it)."""
    from finetune.core.models import load_tokenizer
    from finetune.stages.train import train

    tok = load_tokenizer(tiny_recipe(tiny_llama).model)
    assert tok.pad_token_id == tok.eos_token_id, "the case this test is about"
    seen = {}
    for packing in (False, True):
        recipe = tiny_recipe(tiny_llama, packing=packing, max_steps=-1, epochs=1, batch_size=4)
        seen[packing] = train(recipe, prepared, tmp_path / f"a{packing}", tmp_path / f"m{packing}.json",
                              live_dir=None, checkpoint_dir=tmp_path / f"c{packing}")["tokens_seen"]
    assert seen[True] == seen[False] > 0


def test_train_then_merge(tiny_llama, prepared, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.stages.merge import merge
    from finetune.stages.train import train

    recipe = tiny_recipe(tiny_llama)
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    metrics = train(recipe, prepared, adapter, tmp_path / "train.json", live_dir=str(tmp_path / "live"),
                    timing_path=tmp_path / "timing.json")
    assert metrics["steps"] == 2 and metrics["tokens_seen"] > 0
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    quality = json.loads((tmp_path / "train.json").read_text())
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert {"train_loss", "eval_loss", "steps"} <= set(quality) and quality.items() <= metrics.items()
    assert {"train_seconds", "tokens_per_second", "peak_memory_gib"} <= set(timing)
    assert not set(timing) & set(quality), "wall-clock numbers stay out of the deterministic metrics"
    assert timing["provenance"]["hardware"] and timing["provenance"]["versions"]["torch"]
    live_files = " ".join(p.name for p in (tmp_path / "live").rglob("*"))
    assert "runtime" not in live_files and "per_second" not in live_files
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert (tmp_path / "live" / "plots" / "metrics").is_dir(), "DVCLive must log the loss curve"

    merge(recipe, adapter, merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    assert model.dtype == torch.bfloat16  # merge.dtype of the quickstart
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert tok.chat_template, "the chat template travels with the merged model"
    eos = model.generation_config.eos_token_id
    assert tok.eos_token_id == (eos if isinstance(eos, int) else eos[0])
    # the merged weights equal base + the adapter's update: compare logits with PEFT's unmerged model
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    peft_model = PeftModel.from_pretrained(base, adapter)
    ids = tok("What is 3 + 1?", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (peft_model(ids).logits.float() - model(ids).logits.float()).abs().max().item()
    assert diff < 0.05


def test_the_adapter_names_the_recipe_model_not_its_folder(tiny_llama, prepared, tmp_path, monkeypatch):
    """A ``pypi:`` model loads from inside the checkout's .venv; the adapter records the recipe's id instead, so
    two checkouts write the same bytes."""
    import importlib
    import shutil

    from finetune.stages.train import train

    package = tmp_path / "site" / "tiny_model_pkg"
    shutil.copytree(tiny_llama, package)
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    recipe = tiny_recipe(tiny_llama)
    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"id": "pypi:tiny_model_pkg"})})
    train(recipe, prepared, tmp_path / "adapter", tmp_path / "train.json")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "pypi:tiny_model_pkg"
    for name in ("adapter_config.json", "README.md"):
        assert str(tmp_path) not in (tmp_path / "adapter" / name).read_text(), name


def test_nan_loss_is_one_line_error(tiny_llama, prepared, tmp_path):
    from finetune.core.errors import FinetuneError
    from finetune.stages.train import train

    recipe = tiny_recipe(tiny_llama, learning_rate=1e30, max_grad_norm=1e30)
    with pytest.raises(FinetuneError, match="learning_rate"):
        train(recipe, prepared, tmp_path / "adapter", tmp_path / "m.json", live_dir=None)
    assert not (tmp_path / "adapter").exists(), "no adapter is written for a diverged run"


def _trained(recipe, prepared, tmp_path, name) -> tuple[dict, list[bool]]:
    """Train; return the metrics and which decoder layers were checkpointed during training."""
    from transformers import TrainerCallback

    from finetune.stages.train import train
    from finetune.training import fused_lora

    flags: list[bool] = []

    class Flags(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if not flags:
                flags.extend(layer.gradient_checkpointing for layer in model.get_base_model().model.layers)
                fused = [fused_lora.is_fused(layer.mlp) for layer in model.get_base_model().model.layers]
                # in place for the steps; an MLP only where its layer keeps activations (not checkpointed)
                assert fused == [recipe.train.fused_lora and not ckpt for ckpt in flags]

    metrics = train(recipe, prepared, tmp_path / name, tmp_path / f"{name}.json", live_dir=None,
                    callbacks=[Flags()], checkpoint_dir=tmp_path / f"{name}-ckpt")
    return metrics, flags


def test_checkpoint_layers(tiny_llama, prepared, tmp_path):
    """checkpoint_layers: 1 of 2 layers recomputes, the other keeps its activations; the losses are those
    of no checkpointing."""
    plain, plain_flags = _trained(tiny_recipe(tiny_llama), prepared, tmp_path, "plain")
    full, full_flags = _trained(tiny_recipe(tiny_llama, gradient_checkpointing=True, fused_lora=False),
                                prepared, tmp_path, "full")
    half, half_flags = _trained(tiny_recipe(tiny_llama, gradient_checkpointing=True, checkpoint_layers=1),
                                prepared, tmp_path, "half")
    assert plain_flags == [False, False] and full_flags == [True, True] and half_flags == [False, True]
    for metrics in (full, half):  # (full also runs PEFT's own forward: the fused one agrees to rounding)
        assert metrics["train_loss"] == pytest.approx(plain["train_loss"], abs=1e-5)
        assert metrics["eval_loss"] == pytest.approx(plain["eval_loss"], abs=1e-5)


def test_checkpoint_layers_needs_checkpointing(tiny_llama, prepared, tmp_path):
    from pydantic import ValidationError

    from finetune.core.errors import FinetuneError
    from finetune.core.recipe import TrainSpec
    from finetune.stages.train import train

    with pytest.raises(ValidationError, match="checkpoint_layers is 2 but train.gradient_checkpointing is false"):
        TrainSpec(checkpoint_layers=2)
    recipe = tiny_recipe(tiny_llama, gradient_checkpointing=True, checkpoint_layers=3)
    with pytest.raises(FinetuneError, match="checkpoint_layers is 3 but the model has 2 decoder layers"):
        train(recipe, prepared, tmp_path / "a", tmp_path / "m.json", live_dir=None)


def _steps(recipe, data: Path, tmp_path, name: str, callbacks: list | None = None) -> tuple:
    """Train; return the trainer (log history, model) and the adapter's tensors."""
    from finetune.stages.train import train

    kept = []
    train(recipe, data, tmp_path / name, tmp_path / f"{name}.json", live_dir=None, callbacks=callbacks,
          checkpoint_dir=tmp_path / f"{name}-ckpt", trainer_hook=kept.append)
    return kept[0], adapter_tensors(tmp_path / name)


def _curve(trainer) -> list[tuple[float, float]]:
    """(loss, grad norm) of every step."""
    return [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]


def test_offload_activations(tiny_llama, prepared, tmp_path, monkeypatch):
    """offload_activations with 1 of 2 layers checkpointed: only the checkpointed layer's input goes through the
    hooks (out once a step, back once for its recompute; never for the layer that keeps its activations), and the
    per-step losses, gradient norms and the adapter equal the plain checkpointed run's bit for bit. On CPU the
    hooks pass tensors through; COPY_ON_CPU makes them copy to new storage and back, as they do to the host on CUDA."""
    from finetune.training import offload

    monkeypatch.setattr(offload, "COPY_ON_CPU", True)
    levers = {"gradient_checkpointing": True, "checkpoint_layers": 1}
    plain, plain_adapter = _steps(tiny_recipe(tiny_llama, **levers), prepared, tmp_path, "plain")
    moved, moved_adapter = _steps(tiny_recipe(tiny_llama, **levers, offload_activations=True), prepared, tmp_path,
                                  "moved")
    layers = moved.model.get_base_model().model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [False, True]
    funcs = [layer._gradient_checkpointing_func for layer in layers]
    assert not isinstance(funcs[0], offload.OffloadedCheckpoint)
    assert isinstance(funcs[1], offload.OffloadedCheckpoint)
    assert (funcs[1].offloaded, funcs[1].restored) == (2, 2), "the hidden state, once per step each way"
    assert len(_curve(moved)) == 2 and _curve(moved) == _curve(plain)
    assert moved_adapter.keys() == plain_adapter.keys()
    assert all(torch.equal(moved_adapter[k], plain_adapter[k]) for k in plain_adapter)


def test_fused_lora_groups(tiny_llama, prepared, tmp_path):
    """fused_lora_groups through the train stage, 1 of 2 layers checkpointed: each layer's q/k/v and gate/up share
    one product per forward (the checkpointed layer's once more in its recompute), and the per-step losses,
    gradient norms and the adapter equal the ungrouped run's to float32 rounding."""
    levers = {"gradient_checkpointing": True, "checkpoint_layers": 1}
    plain, plain_adapter = _steps(tiny_recipe(tiny_llama, **levers), prepared, tmp_path, "plain")
    grouped, grouped_adapter = _steps(tiny_recipe(tiny_llama, **levers, fused_lora_groups=True), prepared, tmp_path,
                                      "grouped")
    layers = grouped.model.get_base_model().model.layers
    stacked = [(layer.self_attn.q_proj._group.stacked, layer.mlp.gate_proj._group.stacked) for layer in layers]
    assert stacked == [(3, 3), (5, 5)], "2 steps and the final eval; the checkpointed layer recomputes in each step"
    assert all(layer.self_attn.q_proj._group is None for layer in plain.model.get_base_model().model.layers)
    assert len(_curve(grouped)) == 2
    for (loss, norm), (want_loss, want_norm) in zip(_curve(grouped), _curve(plain), strict=True):
        assert loss == pytest.approx(want_loss, rel=1e-5) and norm == pytest.approx(want_norm, rel=1e-4)
    assert grouped_adapter.keys() == plain_adapter.keys()
    assert all(torch.allclose(grouped_adapter[k], plain_adapter[k], atol=1e-6) for k in plain_adapter)


def test_offload_activations_needs_checkpointing():
    from pydantic import ValidationError

    from finetune.core.recipe import TrainSpec

    with pytest.raises(ValidationError, match="offload_activations is true but train.gradient_checkpointing is false"):
        TrainSpec(offload_activations=True)
    assert TrainSpec(offload_activations=True, gradient_checkpointing=True).offload_activations


@pytest.mark.slow
def test_compile(tiny_llama, tmp_path, monkeypatch):
    """compile: every decoder layer runs compiled, the one that keeps its activations in place and the checkpointed
    (and offloaded) one inside its checkpoint, with the fused LoRA forward; the losses, gradient norms and adapter
    are the eager run's to 1e-4, and batches of other lengths reuse the first step's graphs (dynamic shapes)."""
    from torch._dynamo.utils import counters
    from transformers import TrainerCallback

    from finetune.training import offload, regional_compile

    monkeypatch.setattr(offload, "COPY_ON_CPU", True)
    data = tmp_path / "prepared"  # rows of many lengths, so that every step's batch has another length
    write_jsonl(data / "train.jsonl", [{"prompt": f"<|im_start|>user\nWhat is {' + '.join(['1'] * k)}?<|im_end|>\n"
                                                  "<|im_start|>assistant\n", "completion": str(k)}
                                       for k in range(1, 17)])
    levers = {"gradient_checkpointing": True, "checkpoint_layers": 1, "offload_activations": True, "max_steps": 3}
    graphs: list[int] = []
    lengths: list[int] = []

    class Graphs(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            graphs.append(counters["stats"]["unique_graphs"])
            assert all(regional_compile.is_compiled(layer) for layer in model.get_base_model().model.layers)

    def hook(trainer):
        trainer.model.register_forward_pre_hook(lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]),
                                                with_kwargs=True)

    eager, eager_adapter = _steps(tiny_recipe(tiny_llama, **levers), data, tmp_path, "eager")
    before = counters["stats"]["unique_graphs"]
    try:
        from finetune.stages.train import train

        kept = []
        train(tiny_recipe(tiny_llama, **levers, compile=True), data, tmp_path / "compiled", tmp_path / "c.json",
              live_dir=None, callbacks=[Graphs()], checkpoint_dir=tmp_path / "c-ckpt",
              trainer_hook=lambda t: (kept.append(t), hook(t)))
    finally:
        torch._dynamo.reset()
    compiled, compiled_adapter = kept[0], adapter_tensors(tmp_path / "compiled")
    layers = compiled.model.get_base_model().model.layers
    assert layers[0]._compiled_call_impl is not None, "the layer that keeps its activations: compiled in place"
    assert isinstance(layers[1]._gradient_checkpointing_func, offload.OffloadedCheckpoint)
    assert layers[1]._gradient_checkpointing_func.offloaded == 3
    assert len(set(lengths)) > 1, f"the steps' batches should differ in length: {lengths}"
    assert graphs[0] > before and graphs[-1] == graphs[0], f"no recompile for new lengths: {before} -> {graphs}"
    for (loss, norm), (want_loss, want_norm) in zip(_curve(compiled), _curve(eager), strict=True):
        assert loss == pytest.approx(want_loss, rel=1e-4) and norm == pytest.approx(want_norm, rel=1e-4)
    for name, want in eager_adapter.items():
        torch.testing.assert_close(compiled_adapter[name], want, rtol=1e-4, atol=1e-5)


def test_autocast_inputs_skip_fp32_copies(tiny_llama):
    """Under bf16 autocast, LoRA layers give the same output without PEFT's fp32 copy of their input, and
    backward keeps fewer bytes (q/k/v and gate/up share one input instead of a copy each); in fp32 the
    switch is off."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.training.trainer import autocast_inputs

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.float32
    ids = torch.randint(0, 100, (2, 16))

    def run() -> tuple[torch.Tensor, int]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, kept = saved_bytes(lambda: model(input_ids=ids).logits)
        return logits.detach(), kept

    want, bytes_cast = run()
    with autocast_inputs(model, "bf16"):
        got, bytes_plain = run()
    assert torch.equal(got, want)
    assert bytes_plain < bytes_cast
    with autocast_inputs(model, "fp32"):
        assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))
