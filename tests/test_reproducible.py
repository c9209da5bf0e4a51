"""The pipeline is deterministic on CPU: two clean copies give byte-identical metrics and the
same output hashes in dvc.lock for prepare, train and merge."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from conftest import pipeline_env, project_copy, run

pytestmark = pytest.mark.slow
STAGES = ("prepare", "train", "merge")
# wall-clock numbers by nature (seconds, tokens/s, peak memory): kept apart from the quality metrics
TIMING = ("metrics/timing",)


def metric_files(repo: Path) -> dict[str, bytes]:
    """Every metrics/plots file the three stages write, by path, except the timing ones."""
    found = {}
    for root in ("metrics", "dvclive"):
        for path in sorted((repo / root).rglob("*")):
            rel = path.relative_to(repo).as_posix()
            if path.is_file() and not rel.startswith(TIMING):
                found[rel] = path.read_bytes()
    return found


def stage_outs(repo: Path) -> dict[str, list]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {stage: [out for out in lock[stage]["outs"] if not out["path"].startswith(TIMING)] for stage in STAGES}


def test_two_clean_runs_are_identical(tmp_path_factory, tiny_llama_256):
    env = pipeline_env()
    runs = []
    for name in ("first", "second"):
        repo = project_copy(tmp_path_factory.mktemp(name), tiny_llama_256, env)
        out = run([sys.executable, "-m", "dvc", "repro", "merge"], repo, env)
        assert all(f"Running stage '{stage}'" in out for stage in STAGES)
        runs.append(repo)
    first, second = (metric_files(r) for r in runs)
    assert {"metrics/prepare.json", "metrics/train.json", "dvclive/metrics.json"} <= set(first)
    assert any(p.startswith("dvclive/plots/") for p in first), "the loss curve is compared too"
    assert sorted(first) == sorted(second)
    differing = [p for p in first if first[p] != second[p]]
    assert not differing, f"metrics differ between two clean runs: {differing}"
    assert stage_outs(runs[0]) == stage_outs(runs[1])
    assert (runs[0] / "metrics/timing/train.json").is_file()
