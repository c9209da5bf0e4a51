"""Resume after a stop: the same params continue from the newest intact checkpoint and end where an
uninterrupted run ends (same adapter, same loss curve); changed params start fresh."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from conftest import adapter_tensors, live_curve
from finetune.core.errors import FinetuneError
from finetune.core.outputs import write_jsonl
from finetune.training import checkpoints
from test_train import ROWS, tiny_recipe

STEPS = 6


def write_prepared(data: Path) -> Path:
    write_jsonl(data / "train.jsonl", ROWS[:16])
    write_jsonl(data / "eval.jsonl", ROWS[16:20])
    return data


@pytest.fixture
def prepared(tmp_path) -> Path:
    return write_prepared(tmp_path / "prepared")


def max_diff(a: Path, b: Path) -> float:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    return max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)


def run(recipe, prepared: Path, out: Path, ckpt_root: Path):
    from finetune.stages.train import train

    return train(recipe, prepared, out / "adapter", out / "train.json", live_dir=str(out / "live"),
                 checkpoint_dir=ckpt_root)


def run_stopped(recipe, prepared: Path, out: Path, ckpt_root: Path, monkeypatch, step: int, match: str) -> None:
    """Run with a SIGTERM as step ``step`` begins: the run finishes that step, checkpoints, stops with one line."""
    def term(self, args, state, control, **kwargs):
        if state.global_step == step and self.received is None:
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(checkpoints.StopOnSignal, "on_step_begin", term, raising=False)
        with pytest.raises(FinetuneError, match=match):
            run(recipe, prepared, out, ckpt_root)


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, tmp_path_factory) -> Path:
    """One run straight through, the reference for every resumed run."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    recipe = tiny_recipe(tiny_llama, max_steps=STEPS, save_steps=2)
    run(recipe, write_prepared(tmp / "prepared"), tmp / "ref", tmp / "ref-ckpt")
    assert not (tmp / "ref-ckpt").exists(), "checkpoints are removed once the adapter is saved"
    return tmp / "ref"


def test_sigterm_saves_then_rerun_resumes_to_the_same_adapter(tiny_llama, prepared, tmp_path, uninterrupted,
                                                              monkeypatch):
    recipe = tiny_recipe(tiny_llama, max_steps=STEPS, save_steps=2)

    out, root = tmp_path / "run", tmp_path / "ckpt"
    run_stopped(recipe, prepared, out, root, monkeypatch, 3,
                r"stopped by SIGTERM at step 4; checkpoint saved in .*checkpoint-4.*resume")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "the handler is removed again"
    assert not (out / "adapter").exists() and not (out / "live").exists()
    [run_dir] = list(root.iterdir())
    assert [p.name for p in checkpoints.checkpoints(run_dir)] == ["checkpoint-4", "checkpoint-2"]

    metrics = run(recipe, prepared, out, root)
    assert metrics["resumed_from_step"] == 4 and metrics["steps"] == STEPS
    assert max_diff(out / "adapter", uninterrupted / "adapter") <= 1e-6
    resumed, reference = live_curve(out / "live"), live_curve(uninterrupted / "live")
    assert [s for s, _ in resumed] == [s for s, _ in reference] == list(range(STEPS)), "no repeated or lost step"
    assert [v for _, v in resumed] == pytest.approx([v for _, v in reference], abs=1e-6)
    ref_metrics = json.loads((uninterrupted / "train.json").read_text())
    assert metrics["train_loss"] == ref_metrics["train_loss"]
    assert live_files(out / "live") == live_files(uninterrupted / "live"), \
        "DVCLive output differs from an uninterrupted run's"
    assert not run_dir.exists()


def live_files(live: Path) -> dict[str, bytes]:
    return {str(p.relative_to(live)): p.read_bytes() for p in sorted(live.rglob("*")) if p.is_file()}


def test_resume_between_logging_steps_logs_what_an_uninterrupted_run_logs(tiny_llama, prepared, tmp_path, monkeypatch):
    """A checkpoint between two logs (the loss summed since the last log, TRL's token count and per-step values
    are in memory only): the resumed run's DVCLive files, counters and final train_loss equal an
    uninterrupted run's byte for byte."""
    recipe = tiny_recipe(tiny_llama, max_steps=7, save_steps=2, logging_steps=3, eval_steps=3)
    run(recipe, prepared, tmp_path / "ref", tmp_path / "ref-ckpt")

    out, root = tmp_path / "run", tmp_path / "ckpt"
    run_stopped(recipe, prepared, out, root, monkeypatch, 4, "step 5")
    metrics = run(recipe, prepared, out, root)
    assert metrics["resumed_from_step"] == 5
    reference = json.loads((tmp_path / "ref" / "train.json").read_text())
    assert {k: v for k, v in metrics.items() if k in reference} == reference
    assert live_files(out / "live") == live_files(tmp_path / "ref" / "live")
    assert "num_tokens" in json.loads((out / "live" / "metrics.json").read_text())


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(tiny_llama, prepared, tmp_path, uninterrupted,
                                                              monkeypatch, capfd):
    recipe = tiny_recipe(tiny_llama, max_steps=STEPS, save_steps=2)
    out, root = tmp_path / "run", tmp_path / "ckpt"
    run_stopped(recipe, prepared, out, root, monkeypatch, 4, "step 5")
    [run_dir] = list(root.iterdir())
    newest = run_dir / "checkpoint-5" / "optimizer.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # a torn write
    capfd.readouterr()
    metrics = run(recipe, prepared, out, root)
    assert "checkpoint-5: optimizer.pt is corrupt" in capfd.readouterr().err
    assert metrics["resumed_from_step"] == 4
    assert max_diff(out / "adapter", uninterrupted / "adapter") <= 1e-6


def test_a_crash_after_the_last_step_resumes_without_an_extra_step(tiny_llama, prepared, tmp_path, uninterrupted,
                                                                  monkeypatch):
    import transformers

    recipe = tiny_recipe(tiny_llama, max_steps=STEPS, save_steps=2)
    out, root = tmp_path / "run", tmp_path / "ckpt"

    def crash(*args, **kwargs):
        raise RuntimeError("killed after training")

    with monkeypatch.context() as m:
        m.setattr(transformers.Trainer, "evaluate", crash)
        with pytest.raises(RuntimeError):
            run(recipe, prepared, out, root)
    [run_dir] = list(root.iterdir())
    assert [p.name for p in checkpoints.checkpoints(run_dir)] == ["checkpoint-4", "checkpoint-2"], \
        "no checkpoint of the last step"
    metrics = run(recipe, prepared, out, root)
    assert metrics["resumed_from_step"] == 4 and metrics["steps"] == STEPS
    assert [s for s, _ in live_curve(out / "live")] == list(range(STEPS))
    assert max_diff(out / "adapter", uninterrupted / "adapter") <= 1e-6


def test_changed_params_start_fresh(tiny_llama, prepared, tmp_path):
    a = tiny_recipe(tiny_llama, max_steps=STEPS)

    def key(r):
        return checkpoints.run_key(r.model_dump(include={"model", "lora", "quant", "train"}),
                                   [prepared / "train.jsonl"])

    assert key(a) == key(tiny_recipe(tiny_llama, max_steps=STEPS, threads=1, save_steps=3))
    assert key(a) != key(tiny_recipe(tiny_llama, max_steps=STEPS, learning_rate=5e-4))
    before = key(a)
    write_jsonl(prepared / "train.jsonl", ROWS[:15])
    assert key(a) != before, "changed data starts fresh"


def test_incomplete_checkpoint_is_skipped(tmp_path):
    run_dir = tmp_path / "run"
    for step in (2, 4):
        ckpt = run_dir / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text("{}")
        (ckpt / checkpoints.LOG_STATE).write_text("{}")
        (ckpt / "adapter_model.safetensors").write_bytes(b"x" * 10)
    checkpoints.write_manifest(run_dir / "checkpoint-2")  # checkpoint-4 was killed before its manifest
    assert checkpoints.problem(run_dir / "checkpoint-4").startswith("incomplete")
    assert checkpoints.latest_complete(run_dir) == run_dir / "checkpoint-2"
    assert not (run_dir / "checkpoint-4").exists()
