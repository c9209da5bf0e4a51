"""A failing stage keeps the last good metrics: dvc.yaml marks its uncached metrics/plots `persist: true`
(DVC would delete them before running the stage) and the stages replace them atomically themselves."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, pipeline_env, run

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))


def uncached(stage: dict) -> list[tuple[str, dict]]:
    entries = [e for kind in ("outs", "metrics", "plots") for e in stage.get(kind, []) if isinstance(e, dict)]
    return [(path, opts) for e in entries for path, opts in e.items() if opts.get("cache") is False]


def test_every_uncached_output_persists():
    found = [(name, path, opts) for name, stage in DVC_YAML["stages"].items() for path, opts in uncached(stage)]
    expected = {"eval/metrics", "metrics/train.json", "metrics/quantize", "dvclive/plots/metrics"}
    assert expected <= {p for _, p, _ in found}
    assert not [f"{name}: {path}" for name, path, opts in found if opts.get("persist") is not True]


@pytest.fixture()
def project(tmp_path) -> Path:
    """git + DVC with the real eval stage's command and metrics, on a model that does not exist (so it fails),
    and eval/metrics from an earlier good run."""
    env = pipeline_env()
    (tmp_path / "bin").mkdir()  # dvc.yaml's commands run bin/project-python (it finds the venv on PATH)
    shutil.copy2(ROOT / "bin" / "project-python", tmp_path / "bin" / "project-python")
    run(["git", "init", "-q"], tmp_path, env)
    run([sys.executable, "-m", "dvc", "init", "-q"], tmp_path, env)
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["model"] = {"id": str(tmp_path / "no-such-model"), "gguf_file": None}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "eval" / "metrics").mkdir(parents=True)
    (tmp_path / "eval" / "metrics" / "finetuned.json").write_text(json.dumps({"last": "good"}) + "\n")
    return tmp_path


def eval_stage(persist: bool) -> dict:
    real = DVC_YAML["stages"]["eval"]
    metrics = [{path: {k: v for k, v in opts.items() if persist or k != "persist"}}
               for entry in real["metrics"] for path, opts in entry.items()]
    stage = {"cmd": real["cmd"], "params": real["params"], "outs": real["outs"], "metrics": metrics}
    return {"stages": {"eval": stage}}


@pytest.mark.parametrize("persist", [True, False])
def test_failing_eval_keeps_the_previous_metrics(project, persist):
    (project / "dvc.yaml").write_text(yaml.safe_dump(eval_stage(persist), sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "eval"], cwd=project, env=pipeline_env(),
                          text=True, capture_output=True, timeout=300)
    assert proc.returncode != 0
    assert "no-such-model" in proc.stdout + proc.stderr  # it failed in the stage, on our error
    kept = project / "eval" / "metrics" / "finetuned.json"
    if persist:  # what dvc.yaml does
        assert json.loads(kept.read_text()) == {"last": "good"}
    else:  # DVC's default, the reason for persist: the last good metrics are gone
        assert not kept.exists()
