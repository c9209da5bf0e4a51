"""train.speed: max trains the tutorial's tokens (packed, fewer steps), tutorial is the recipe as written."""

from __future__ import annotations

import pytest

from finetune.training import speed
from test_train import prepared, tiny_recipe  # noqa: F401 -- the train tests' tiny recipe and rows (a fixture)


def test_max_sets_the_speed_levers_and_keeps_the_tutorials_optimization(tiny_llama):
    tutorial = tiny_recipe(tiny_llama, packing=False, fused_lora=False, liger="off", warmup_steps=2)
    assert speed.resolve(tutorial) is tutorial
    fast = speed.resolve(tutorial.model_copy(update={"train": tutorial.train.model_copy(update={"speed": "max"})}))
    t = fast.train
    assert (t.packing, t.fused_lora, t.liger, t.attention, t.memory_budget_gib) == (True, True, "auto", "auto", "auto")
    kept = ("learning_rate", "optimizer", "batch_size", "grad_accum", "max_steps", "seed", "lr_scheduler")
    assert all(getattr(t, k) == getattr(tutorial.train, k) for k in kept)
    budget = speed.resolve(tiny_recipe(tiny_llama, speed="max", memory_budget_gib=12.0)).train.memory_budget_gib
    assert budget == 12.0  # a budget given is kept


def test_max_trains_the_tutorials_tokens_in_fewer_packed_steps(tiny_llama, prepared, tmp_path):  # noqa: F811
    from finetune.stages.train import train

    def run(name, **over):
        recipe = tiny_recipe(tiny_llama, max_steps=8, batch_size=2, grad_accum=2, warmup_steps=2, **over)
        return train(recipe, prepared, tmp_path / name, tmp_path / f"{name}.json", live_dir=None,
                     checkpoint_dir=tmp_path / f"{name}-ckpt")

    tutorial, fast = run("tutorial", packing=False), run("max", packing=False, speed="max")
    assert "speed_max" not in tutorial and tutorial["steps"] == 8 and tutorial["packing"] is False
    matched = fast["speed_max"]
    assert fast["packing"] is True and fast["steps"] == matched["steps"] < 8
    assert matched["warmup_steps"] == -(-2 * matched["steps"] // 8)
    per_step = fast["tokens_seen"] / fast["steps"]  # the same tokens, to within one packed step
    assert abs(fast["tokens_seen"] - tutorial["tokens_seen"]) <= per_step
    assert matched["tutorial_tokens"] == pytest.approx(tutorial["tokens_seen"], rel=0.15)
