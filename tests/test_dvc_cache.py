"""DVC's cache keeps one copy of each large output: the project's cache.type links instead of copying."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, pipeline_env, run

SIZE = 8 << 20


def _repo(tmp: Path, config: bool) -> Path:
    env = pipeline_env()
    run(["git", "init", "-q"], tmp, env)
    run([sys.executable, "-m", "dvc", "init", "-q"], tmp, env)
    if config:
        shutil.copyfile(ROOT / ".dvc" / "config", tmp / ".dvc" / "config")
    (tmp / "dvc.yaml").write_text(
        "stages:\n  big:\n"
        "    cmd: python -c \"import os; os.makedirs('out', exist_ok=True); "
        f"open('out/w.bin', 'wb').write(os.urandom({SIZE}))\"\n"
        "    outs:\n      - out\n")
    run([sys.executable, "-m", "dvc", "repro", "-q"], tmp, env)
    return tmp


def _disk(root: Path) -> int:
    """Bytes on disk under ``root``, each inode once (what `du` counts)."""
    seen, total = set(), 0
    for path in root.rglob("*"):
        st = path.lstat()
        if path.is_file() and not path.is_symlink() and st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_blocks * 512
    return total


def _reflinks(tmp: Path) -> bool:
    (tmp / "r1").write_bytes(b"x" * 4096)
    return subprocess.run(["cp", "--reflink=always", tmp / "r1", tmp / "r2"], capture_output=True).returncode == 0


@pytest.mark.parametrize("config", [True, False], ids=["project-config", "dvc-default"])
def test_outputs_are_linked_from_the_cache_not_copied(tmp_path, config):
    repo = _repo(tmp_path, config)
    out = repo / "out" / "w.bin"
    cached = [p for p in (repo / ".dvc" / "cache").rglob("*") if p.is_file() and p.stat().st_size == SIZE]
    assert len(cached) == 1
    same = os.path.samefile(out, cached[0])
    if config:  # one inode, read-only (DVC protects linked outputs)
        assert same and out.stat().st_nlink == 2 and out.stat().st_mode & 0o222 == 0
        assert _disk(repo) < 1.5 * SIZE
    else:  # DVC's default (reflink, else copy) on a filesystem without reflinks: a second full copy
        if _reflinks(tmp_path):
            pytest.skip("this filesystem has reflinks: DVC's default shares the blocks too")
        assert not same
        assert _disk(repo) > 2 * SIZE
    # a rerun replaces the output (DVC removes the read-only link first; the cache keeps its copy)
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-f", "-q"], cwd=repo, env=pipeline_env(), check=True)
    assert out.stat().st_size == SIZE
