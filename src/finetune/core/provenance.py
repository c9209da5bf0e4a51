"""What produced a number: git commit, DVC experiment, container image, hardware, library versions.

Stages that publish numbers (train timing, eval) store this block beside them, and ``make eval``
prints it under the table, so every row names its source.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "transformers", "peft", "trl", "llama-cpp-python", "lm-eval")
# what decides a result: local changes here make a run differ from its commit (dvc.lock and metrics do not)
SOURCES = ("src", "recipes", "params.yaml", "dvc.yaml", "eval/tasks", "eval/data", "pyproject.toml", "requirements")
CONTAINERENV = Path("/run/.containerenv")  # podman writes the image's name and id here (--privileged only)


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def image() -> str | None:
    """The container image: ``FINETUNE_IMAGE`` (give ``name@sha256:...`` to ``docker run -e``),
    else what podman records in /run/.containerenv, else the commit the image was built from."""
    if os.environ.get("FINETUNE_IMAGE"):
        return os.environ["FINETUNE_IMAGE"]
    if CONTAINERENV.is_file():
        fields = dict(line.split("=", 1) for line in CONTAINERENV.read_text().splitlines() if "=" in line)
        name, image_id = fields.get("image", "").strip('"'), fields.get("imageid", "").strip('"')
        if name or image_id:
            return f"{name} (id sha256:{image_id})" if image_id else name
    built = os.environ.get("FINETUNE_IMAGE_SOURCE")
    return f"image built from {built}" if built else None


def hardware() -> str:
    """e.g. '2 x Intel(R) Xeon(R) ... CPU' or '1 x NVIDIA H100 80GB HBM3 + 16 CPU cores'."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cores} x {cpu}"
    try:
        import torch

        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            text = f"{len(names)} x {names[0]} + {text}"
    except ImportError:
        pass
    return text


def versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def provenance() -> dict[str, Any]:
    """The block stored beside published numbers."""
    status = _git("status", "--porcelain", "--untracked-files=no", "--", *SOURCES)
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "experiment": os.environ.get("DVC_EXP_NAME"),
        "image": image(),
        "hardware": hardware(),
        "python": platform.python_version(),
        "versions": versions(),
    }


def describe(block: dict[str, Any]) -> str:
    """One line for reports: 'commit 1a2b3c4 (+ local changes), exp-abc, image ..., 2 x CPU ...'."""
    commit = (block.get("git_commit") or "unknown")[:7]
    parts = [f"commit {commit}" + (" (+ uncommitted params/code)" if block.get("git_dirty") else "")]
    if block.get("experiment"):
        parts.append(f"experiment {block['experiment']}")
    parts.append(f"image {block['image']}" if block.get("image") else "no container")
    parts.append(block.get("hardware") or "unknown hardware")
    libs = block.get("versions") or {}
    if libs:
        parts.append(", ".join(f"{k} {v}" for k, v in libs.items()))
    return "; ".join(parts)
