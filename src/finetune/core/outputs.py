"""Write stage outputs atomically: into a temporary sibling, renamed into place on success."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from finetune.core.errors import FinetuneError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(path: Path) -> list[Path]:
    """Remove temporary siblings of ``path`` left by a killed writer (``.<name>.tmp-<pid>-*``, ``.old-``);
    return the ones removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for sibling in path.parent.glob(f".{path.name}.{kind}-*"):
            pid = sibling.name.removeprefix(f".{path.name}.{kind}-").split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                if sibling.is_dir() and not sibling.is_symlink():
                    shutil.rmtree(sibling, ignore_errors=True)
                else:
                    sibling.unlink(missing_ok=True)
                removed.append(sibling)
    return removed


def remove_orphans(paths: Iterable[str | Path]) -> list[Path]:
    """:func:`remove_stale` for every output path: a stage killed outside DVC leaves its temporary
    sibling (a whole model, say) until any later command sweeps it."""
    return [gone for path in dict.fromkeys(map(Path, paths)) for gone in remove_stale(path)]


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{os.getpid()}-"


def _named(path: Path, make: Callable[..., Any], **kwargs: Any) -> Any:
    """``make(**kwargs)`` (mkstemp / mkdtemp); a failure names ``path``, not the hidden temporary name."""
    try:
        return make(**kwargs)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename.

    A crash leaves either the previous complete folder or the new complete one, never a mix: an
    existing folder is swapped with the new one atomically (renameat2), and temporary siblings a
    killed run left behind are removed the next time.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = Path(_named(path, tempfile.mkdtemp, prefix=_tmp_prefix(path), dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700
    try:
        yield tmp
        if path.exists() and _exchange(tmp, path):
            pass  # tmp now holds the previous output; removed below
        elif path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def require_free(path: str | Path, need_bytes: float, what: str) -> None:
    """Stop before writing ``what`` when the filesystem that will hold ``path`` has less than
    ``need_bytes`` free (one line naming both amounts), rather than filling the disk halfway."""
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise FinetuneError(f"{path}: {what} needs {need_bytes / 2**30:.1f} GiB free on the disk of {probe}, "
                            f"which has {free / 2**30:.1f} GiB; free space there and rerun")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    fd, tmp = _named(path, tempfile.mkstemp, prefix=_tmp_prefix(path), dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON (sorted keys, stable floats) atomically: DVC metrics files go through here."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_json_files(folder: str | Path, files: dict[str, Any]) -> None:
    """A folder of ``<name>.json`` files (a metrics folder: one file per model or type), replaced as a whole."""
    with atomic_dir(folder) as tmp:
        for name, data in files.items():
            write_json(tmp / f"{name}.json", data)


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSON lines atomically."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def json_lines(lines: Iterable[str], name: str | Path, hint: str = "") -> Iterator[tuple[int, Any]]:
    """(line number, value) of every non-blank line of a JSONL stream; a line that is not JSON is a
    one-line error naming ``name:line`` (``hint`` says what a line should hold)."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FinetuneError(f"{name}:{lineno}: not valid JSON ({exc.msg}, column {exc.colno}){hint}") from None
        yield lineno, value


# --------------------------------------------------------------------------------------------
# checksum manifests: a folder is complete and intact when every file matches the manifest written last

MANIFEST = "finetune-complete.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Mark ``folder`` complete: the sha256 of every file in it, written last and atomically."""
    files = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    write_json(folder / MANIFEST, {"files": files})


def manifest_problem(folder: Path, required: tuple[str, ...] = ()) -> str | None:
    """Why ``folder`` does not match its manifest (missing, unreadable, a file missing or changed), or None."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"incomplete (no {MANIFEST}: the save was interrupted or the folder was not written by finetune)"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{MANIFEST} is unreadable"
    for name in required:
        if name not in files:
            return f"no {name}"
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} is corrupt (its sha256 differs from {MANIFEST})"
    return None
