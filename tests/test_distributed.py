"""Multi-process training through accelerate on CPU (gloo): same loss curve as one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, adapter_tensors, live_curve, recipe_dict
from finetune.core.outputs import write_jsonl
from finetune.core.recipe import Recipe

ROWS = [{"prompt": f"<|im_start|>user\nWhat is {i} + {i % 7}?<|im_end|>\n<|im_start|>assistant\n",
         "completion": str(i + i % 7)} for i in range(40)]


def write_params(path: Path, model_dir: Path, batch_size: int, quant: dict | None = None, **distributed) -> Path:
    raw = recipe_dict(
        "quickstart",
        model={"id": str(model_dir), "gguf_file": None},
        train={"max_steps": 4, "batch_size": batch_size, "logging_steps": 1, "threads": 1,
               "learning_rate": 5e-3, "warmup_ratio": 0.0, "lr_scheduler": "linear"},
        lora={"r": 4, "alpha": 8},
        quant=quant or {},
        distributed=distributed,
    )
    path.write_text(yaml.safe_dump(Recipe.model_validate(raw).model_dump(mode="json")), encoding="utf-8")
    return path


def run_train(params: Path, data: Path, out: Path) -> dict:
    from finetune.cli import main

    code = main(["--params", str(params), "train", "--data", str(data), "--out", str(out / "adapter"),
                 "--metrics", str(out / "train.json"), "--live-dir", str(out / "live")])
    assert code == 0
    return json.loads((out / "train.json").read_text())


@pytest.mark.slow
def test_two_gloo_processes_match_one_with_double_batch(tiny_llama, tmp_path, monkeypatch):
    """2 x batch 4 (DDP over gloo, launched by `accelerate launch`) == 1 x batch 8, step for step."""
    from finetune.stages.merge import merge

    monkeypatch.chdir(ROOT)  # the shipped recipes/accelerate/ddp.yaml is found from the repo root
    data = tmp_path / "prepared"
    write_jsonl(data / "train.jsonl", ROWS[:32])
    write_jsonl(data / "eval.jsonl", ROWS[32:])
    single = run_train(write_params(tmp_path / "one.yaml", tiny_llama, 8), data, tmp_path / "one")
    ddp_params = write_params(tmp_path / "two.yaml", tiny_llama, 4, mode="ddp", num_processes=2)
    double = run_train(ddp_params, data, tmp_path / "two")

    assert (single["num_processes"], double["num_processes"]) == (1, 2)
    assert single["steps"] == double["steps"] == 4
    assert double["tokens_seen"] == single["tokens_seen"], "the 2 processes together see the same tokens"
    one, two = live_curve(tmp_path / "one" / "live"), live_curve(tmp_path / "two" / "live")
    assert [s for s, _ in one] == [s for s, _ in two] and len(one) == 4
    for (step, a), (_, b) in zip(one, two, strict=True):
        assert b == pytest.approx(a, rel=1e-4), f"step {step}: 1 process {a}, 2 processes {b}"
    assert one[-1][1] < one[0][1], "the loss must fall, or the comparison shows nothing"
    assert double["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-4)

    # rank 0 alone wrote one ordinary PEFT adapter (no leftovers from rank 1), equal to the 1-process one
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["adapter", "live", "train.json"]
    w1, w2 = adapter_tensors(tmp_path / "one" / "adapter"), adapter_tensors(tmp_path / "two" / "adapter")
    assert w1.keys() == w2.keys() and w1
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-3, atol=1e-5, msg=key)
    recipe = Recipe.model_validate(yaml.safe_load(ddp_params.read_text()))
    merge(recipe, tmp_path / "two" / "adapter", tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_gloo_processes_qlora_match_one(tiny_llama, tmp_path, monkeypatch):
    """The same with a 4-bit base (bitsandbytes on CPU): DDP + QLoRA, and merge loads its adapter."""
    from finetune.stages.merge import merge

    monkeypatch.chdir(ROOT)
    data = tmp_path / "prepared"
    write_jsonl(data / "train.jsonl", ROWS[:32])
    quant = {"mode": "4bit", "compute_dtype": "float32"}
    run_train(write_params(tmp_path / "one.yaml", tiny_llama, 8, quant), data, tmp_path / "one")
    params = write_params(tmp_path / "two.yaml", tiny_llama, 4, quant, mode="ddp", num_processes=2)
    assert run_train(params, data, tmp_path / "two")["num_processes"] == 2
    one, two = live_curve(tmp_path / "one" / "live"), live_curve(tmp_path / "two" / "live")
    assert len(one) == len(two) == 4
    for (step, a), (_, b) in zip(one, two, strict=True):
        assert b == pytest.approx(a, rel=1e-4), f"step {step}: 1 process {a}, 2 processes {b}"
    merge(Recipe.model_validate(yaml.safe_load(params.read_text())), tmp_path / "two" / "adapter", tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_launch_command_uses_the_shipped_config(tiny_llama, tmp_path, monkeypatch):
    from finetune.training import distributed

    monkeypatch.chdir(ROOT)
    params = write_params(tmp_path / "p.yaml", tiny_llama, 4, mode="ddp", num_processes=3)
    recipe = Recipe.model_validate(yaml.safe_load(params.read_text()))
    cmd = distributed.launch_command(recipe, ["--params", "p.yaml", "train"])
    assert cmd[1:3] == ["-m", "finetune.training.distributed"]
    assert cmd[cmd.index("--config_file") + 1] == "recipes/accelerate/ddp.yaml"
    assert cmd[cmd.index("--num_processes") + 1] == "3"
    assert cmd[-5:] == ["-m", "finetune", "--params", "p.yaml", "train"]
    qlora = recipe.model_copy(update={"distributed": recipe.distributed.model_copy(update={"mode": "fsdp"}),
                                      "quant": recipe.quant.model_copy(update={"mode": "4bit"})})
    assert distributed.config_file(qlora) == Path("recipes/accelerate/fsdp_qlora.yaml")
    for name in ("ddp", "fsdp", "fsdp_qlora"):
        config = yaml.safe_load((ROOT / "recipes" / "accelerate" / f"{name}.yaml").read_text())
        assert config["distributed_type"] == ("MULTI_GPU" if name == "ddp" else "FSDP")
        assert config["mixed_precision"] == "no", "train.precision decides the precision"


def test_missing_config_file_is_one_line_error(tiny_llama, tmp_path, capsys):
    from finetune.cli import main

    params = write_params(tmp_path / "p.yaml", tiny_llama, 4, mode="ddp", num_processes=2,
                          config_file=str(tmp_path / "nope.yaml"))
    assert main(["--params", str(params), "train", "--metrics", str(tmp_path / "m.json")]) == 2
    assert capsys.readouterr().err == f"error: distributed.config_file: {tmp_path / 'nope.yaml'} not found; " \
        "point it at an accelerate config file\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fsdp_on_cpu_is_refused_in_one_line(tiny_llama, tmp_path, monkeypatch, capsys):
    """accelerate enables FSDP only on GPU backends; on CPU it would silently run DDP, so refuse."""
    from finetune.cli import main

    monkeypatch.chdir(ROOT)
    params = write_params(tmp_path / "p.yaml", tiny_llama, 4, mode="fsdp", num_processes=2)
    assert main(["--params", str(params), "train", "--metrics", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "distributed.mode fsdp needs CUDA GPUs" in err
    assert not (tmp_path / "m.json").exists()


@pytest.mark.slow
def test_fsdp2_sharded_lora_gathers_to_an_adapter_merge_loads(tiny_llama, tmp_path):
    """torch FSDP2 runs on CPU/gloo even though accelerate will not apply FSDP there: shard a LoRA
    model over 2 processes, take a step, gather FULL_STATE_DICT the way accelerate does for FSDP2,
    and check the result is the ordinary adapter of the unsharded step, which the merge stage loads."""
    import subprocess
    import sys

    from finetune.stages.merge import merge
    from finetune.training.distributed import free_port

    worker = str(ROOT / "tests" / "fsdp2_gloo_worker.py")
    sharded, ref = tmp_path / "sharded", tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(free_port()), worker, str(tiny_llama), str(sharded)],
                   check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, worker, str(tiny_llama), str(ref)], check=True, capture_output=True, timeout=300)
    w_sharded, w_ref = adapter_tensors(sharded), adapter_tensors(ref)
    assert w_sharded.keys() == w_ref.keys() and len(w_ref) == 28  # 2 layers x 7 linears x (A, B)
    for key in w_ref:
        torch.testing.assert_close(w_sharded[key], w_ref[key], rtol=1e-4, atol=1e-5, msg=key)
    recipe = Recipe.model_validate(yaml.safe_load(write_params(tmp_path / "p.yaml", tiny_llama, 4).read_text()))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.core.outputs import write_manifest

    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(sharded)  # as save_adapter writes it,
    write_manifest(sharded)  # with the manifest merge checks
    merge(recipe, sharded, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_quant_storage_reaches_bitsandbytes():
    from finetune.core.models import quantization_config
    from finetune.core.recipe import QuantSpec

    assert quantization_config(QuantSpec(mode="4bit")).bnb_4bit_quant_storage == torch.uint8
    bf16_storage = quantization_config(QuantSpec(mode="4bit", quant_storage="bfloat16"))
    assert bf16_storage.bnb_4bit_quant_storage == torch.bfloat16
