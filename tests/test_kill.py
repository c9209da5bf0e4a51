"""SIGKILL at random moments: outputs are always complete (the old one or the new one) and a rerun
finishes; a killed train resumes to the adapter and loss curve of an uninterrupted run.

Each stage runs as ``python -m finetune <stage>`` in a small project on tiny models; the state left
behind by every kill is checked against a complete run's outputs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import adapter_tensors, live_curve, recipe_dict

pytestmark = pytest.mark.slow

ENV = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DVC_NO_ANALYTICS": "1",
                    "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
STAGES = {  # stage -> (cli args, output paths)
    "prepare": (["prepare"], ["outputs/prepared", "metrics/prepare.json"]),
    "train": (["train"], ["outputs/adapter", "metrics/train.json", "dvclive"]),
    "merge": (["merge"], ["outputs/merged"]),
    "quantize": (["quantize"], ["models", "metrics/quantize"]),
    "heldout": (["heldout"], ["outputs/heldout", "metrics/heldout.json"]),
    "eval": (["eval"], ["eval/metrics", "eval/samples"]),
}
TRIALS = {"prepare": 1, "train": 2, "merge": 1, "quantize": 1, "heldout": 1, "eval": 1}  # 7 kills
TRAIN_STEPS = 8


def start(project: Path, stage: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "finetune", *STAGES[stage][0]], cwd=project, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(project: Path, stage: str) -> float:
    begin = time.perf_counter()
    proc = start(project, stage)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{stage} failed:\n{err[-3000:]}"
    return time.perf_counter() - begin


def snapshot(project: Path, rel: str) -> dict[str, int] | None:
    """{file: size} under an output path (a file maps to itself), None when absent."""
    path = project / rel
    if not path.exists():
        return None
    if path.is_file():
        return {rel: path.stat().st_size}
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def assert_complete(project: Path, rel: str, reference: dict[str, int]) -> None:
    """The output at ``rel`` is absent or complete: the reference's files, binary ones the same size,
    every JSON/JSONL file parses."""
    state = snapshot(project, rel)
    if state is None:
        return
    assert set(state) == set(reference), f"{rel}: files {sorted(set(state) ^ set(reference))} differ"
    path = project / rel
    for name, size in state.items():
        file = path if path.is_file() else path / name
        if file.suffix == ".json":
            json.loads(file.read_text())
        elif file.suffix == ".jsonl":
            [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        elif file.suffix in (".safetensors", ".gguf", ".bin", ".pt"):
            assert size == reference[name], f"{rel}/{name}: {size} bytes, a complete one has {reference[name]}"


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_llama) -> Path:
    """A small project: generated data, tiny model, every stage small."""
    root = tmp_path_factory.mktemp("project")
    raw = recipe_dict(
        "quickstart",
        model={"id": str(tiny_llama), "gguf_file": None},
        data={"eval_size": 8},
        train={"max_steps": TRAIN_STEPS, "batch_size": 4, "logging_steps": 1, "save_steps": 2, "threads": 1},
        lora={"r": 4, "alpha": 8},
        quantize={"types": ["f16", "q8_0"], "verify_prompts": 2, "verify_tokens": 4, "ppl_rows": 4, "threads": 1},
        eval={"limit": 4, "max_new_tokens": 4, "batch_size": 4, "tasks": [], "humaneval_limit": 1,
              "humaneval_max_new_tokens": 8, "gguf_types": ["q8_0"], "threads": 1},
    )
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    subprocess.run([sys.executable, "-m", "finetune", "generate-data", "--out", "data/quickstart",
                    "--n-train", "60", "--n-test", "8"], cwd=root, env=ENV, check=True, capture_output=True)
    return root


def test_kill_each_stage_at_random_moments(project):
    rng = random.Random(int(os.environ.get("KILL_SEED", time.time())))
    reference, seconds = {}, {}
    for stage, (_, outs) in STAGES.items():  # one complete run: the reference outputs, the timings
        seconds[stage] = finish(project, stage)
        reference |= {rel: snapshot(project, rel) for rel in outs}
    print("complete runs (s):", {k: round(v, 1) for k, v in seconds.items()})
    kills = 0
    for stage, trials in TRIALS.items():
        outs = STAGES[stage][1]
        killed = attempts = 0
        while killed < trials and attempts < trials + 3:  # a run that beat its kill is retried
            attempts += 1
            proc = start(project, stage)
            try:
                proc.wait(timeout=rng.uniform(0.2, 0.8) * seconds[stage])
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed += 1
            for rel in outs:
                assert_complete(project, rel, reference[rel])
        kills += killed
        finish(project, stage)  # a rerun completes
        for rel in outs:
            assert snapshot(project, rel) is not None, rel
            assert_complete(project, rel, reference[rel])
        if stage == "train":  # the uninterrupted run's adapter and curve, for the resume test
            shutil.rmtree(project / "ref", ignore_errors=True)
            shutil.copytree(project / "outputs/adapter", project / "ref/adapter")
            shutil.copytree(project / "dvclive", project / "ref/live")
    assert kills >= sum(TRIALS.values()), f"only {kills} runs were killed before they finished"
    leftovers = [p for p in project.rglob(".*.tmp-*")] + [p for p in project.rglob(".*.old-*")]
    assert not leftovers, f"temporary siblings left after reruns: {leftovers}"


def test_kill_9_during_train_then_resume(project):
    """kill -9 at a random step; the rerun resumes and ends on the uninterrupted run's adapter."""
    ref = project / "ref"
    if not (ref / "adapter").is_dir():  # run alone: make the uninterrupted reference here
        finish(project, "prepare")
        finish(project, "train")
        shutil.copytree(project / "outputs/adapter", ref / "adapter")
        shutil.copytree(project / "dvclive", ref / "live")
    ckpt_root = project / "outputs" / "checkpoints"
    assert not ckpt_root.exists(), "a finished run removes its checkpoints"

    at = random.Random(int(os.environ.get("KILL_SEED", time.time()))).randint(3, TRAIN_STEPS - 1)
    proc = start(project, "train")
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until DVCLive has logged `at` steps, then kill -9
        tsv = list(ckpt_root.glob("*/dvclive/plots/metrics/loss.tsv"))
        if tsv and len(tsv[0].read_text().splitlines()) - 1 >= at:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        assert proc.poll() is None, "train ended before the kill"
        time.sleep(0.02)
    proc.wait()
    [run_dir] = list(ckpt_root.iterdir())
    assert list(run_dir.glob("checkpoint-*")), f"no checkpoint after step {at}"

    finish(project, "train")
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert metrics["steps"] == TRAIN_STEPS and 2 <= metrics["resumed_from_step"] <= at
    a, b = adapter_tensors(ref / "adapter"), adapter_tensors(project / "outputs/adapter")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    resumed, reference = live_curve(project / "dvclive"), live_curve(ref / "live")
    assert [s for s, _ in resumed] == list(range(TRAIN_STEPS)), "no repeated or lost step"
    assert [v for _, v in resumed] == pytest.approx([v for _, v in reference], abs=1e-6)


ORPHANS = {"quantize": ".models.tmp-*", "merge": "outputs/.merged.tmp-*"}  # what a kill mid-write leaves


@pytest.mark.parametrize(("stage", "then"), [("quantize", "heldout"), ("merge", "prepare"), ("quantize", "clean")])
def test_a_stage_killed_outside_dvc_leaves_no_orphan_after_any_other_command(project, stage, then):
    """SIGKILL while the stage writes its temporary sibling (hundreds of MB for a real model); the next run
    of any other stage (or `finetune clean`) removes it, and the finished outputs stay complete."""
    for needed in ("prepare", "train", "merge"):
        if not snapshot(project, STAGES[needed][1][0]):
            finish(project, needed)
    complete = {rel: snapshot(project, rel) for rel in STAGES[stage][1] if snapshot(project, rel)}
    rng = random.Random(int(os.environ.get("KILL_SEED", time.time())))
    proc = start(project, stage)
    deadline = time.time() + 300
    while not list(project.glob(ORPHANS[stage])):
        assert proc.poll() is None and time.time() < deadline, f"{stage} ended before writing its temporary sibling"
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.02))  # the tiny model's sibling lives for well under a second
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(project.glob(ORPHANS[stage])), "the kill left the temporary sibling behind"
    for rel, reference in complete.items():
        assert_complete(project, rel, reference)
    if then == "clean":
        out = subprocess.run([sys.executable, "-m", "finetune", "clean"], cwd=project, env=ENV, capture_output=True,
                             text=True, check=True).stdout
        assert Path(ORPHANS[stage]).name.split("*")[0] in out, out
    else:
        finish(project, then)
    assert not list(project.glob(ORPHANS[stage])), f"`finetune {then}` left {stage}'s temporary sibling"
    for rel, reference in complete.items():
        assert_complete(project, rel, reference)
