"""`make install` finds the lock's CPU torch build (not on PyPI): a local wheel folder, else PyTorch's CPU index;
with neither, make stops with one line saying what to set. No download from PyTorch's index here (offline)."""

from __future__ import annotations

import os
import subprocess

from conftest import ROOT

INDEX = "https://download.pytorch.org/whl/cpu"


def make(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, env=env or os.environ, text=True,
                          capture_output=True, timeout=timeout)


def no_pip_config() -> dict:
    """This machine's pip config points at a local torch folder; a newcomer's machine has none. (No MAKEFLAGS
    either: under `make test` the outer make's command-line variables would reach this one.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")
           and (not k.startswith("PIP_") or k in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT"))}
    return env | {"PIP_CONFIG_FILE": os.devnull}


def lock_line(dry_run: str) -> str:
    return next(line for line in dry_run.splitlines() if "-r requirements/cpu.lock" in line)


def test_pytorch_cpu_index_is_the_default_without_a_wheel_folder(tmp_path):
    proc = make("-n", "install", f"VENV={tmp_path / 'venv'}", f"TORCH_WHEELS={tmp_path / 'none'}", env=no_pip_config())
    assert proc.returncode == 0, proc.stderr
    assert f"--extra-index-url {INDEX}" in lock_line(proc.stdout)
    folder = tmp_path / "wheels"
    folder.mkdir()
    proc = make("-n", "install", f"VENV={tmp_path / 'venv'}", f"TORCH_WHEELS={folder}", env=no_pip_config())
    line = lock_line(proc.stdout)
    assert f"--find-links {folder}" in line and "--extra-index-url" not in line


def test_missing_torch_wheel_stops_make_with_one_line(tmp_path):
    """A scratch venv, an empty wheel folder, no index: pip (from PyPI) cannot find torch==X+cpu."""
    lock = (ROOT / "requirements" / "cpu.lock").read_text().splitlines()
    start = next(i for i, line in enumerate(lock) if line.startswith("torch=="))
    (tmp_path / "torch.lock").write_text("\n".join(lock[start:start + 2]) + "\n")  # the pin and its hash
    (tmp_path / "empty").mkdir()
    venv = tmp_path / "venv"
    proc = make(f"{venv}/.installed", f"VENV={venv}", f"LOCK={tmp_path / 'torch.lock'}",
                f"TORCH_WHEELS={tmp_path / 'empty'}", "TORCH_INDEX=", env=no_pip_config())
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("make: ***")]
    pin = lock[start].split()[0]
    assert errors == [f"error: no wheel for {pin} (the CPU build the lock pins; PyPI does not serve it): set "
                      f"TORCH_WHEELS=<folder holding it> or TORCH_INDEX={INDEX} (pip log: {venv}/pip-lock.log)"]
    assert not (venv / ".installed").exists()


def test_make_test_lints_before_pytest():
    """`make test` and `make test-fast` run `ruff check` (pyproject.toml [tool.ruff]) first: a finding fails them."""
    for target in ("test", "test-fast"):
        proc = make("-n", target, env=no_pip_config())
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        ruff = next(i for i, line in enumerate(lines) if line.endswith("/ruff check"))
        assert ruff < next(i for i, line in enumerate(lines) if "-m pytest" in line), target
