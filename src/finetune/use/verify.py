"""``finetune verify`` (``make verify``): this workspace's metrics against the published ones, metric by metric.

Published = the metrics files at a git rev (default ``HEAD``: what is committed) or a DVC experiment
name, read through DVC (``Repo.metrics.show``), so both sides are the files their ``dvc.yaml``
declares. Every number (and boolean) is compared: exactly where both sides' ``provenance`` block
(:mod:`finetune.core.provenance`) names the same hardware, Python and library versions, since a rerun there
is byte-identical; else within the tolerance ``tolerances.yaml`` declares for it (math.isclose with its
``rel``/``abs``), and exactly where it declares none. Wall-clock numbers and the provenance blocks
themselves are left out by that file's ``ignore`` list.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune.core.errors import FinetuneError

ROOT = Path(__file__).resolve().parents[3]
TOLERANCES = ROOT / "tolerances.yaml"
# where a metrics file has no provenance block of its own, the block of the run that wrote it
RUN_PROVENANCE = ("metrics/timing/train.json", "eval/metrics/finetuned.json")
CLASS_KEYS = ("hardware", "python", "versions")  # what decides whether a rerun is byte-identical


@dataclass(frozen=True)
class Rule:
    pattern: str
    rel: float = 0.0
    abs: float = 0.0

    def allows(self, workspace: Any, published: Any) -> bool:
        """The workspace's value passes against the published one (booleans: the same)."""
        if isinstance(workspace, bool) or isinstance(published, bool):
            return workspace is published
        return math.isclose(workspace, published, rel_tol=self.rel, abs_tol=self.abs)

    def describe(self) -> str:
        parts = [f"rel {self.rel:g}"] if self.rel else []
        return " / ".join(parts + ([f"abs {self.abs:g}"] if self.abs else [])) or "exact"


@dataclass(frozen=True)
class Tolerances:
    ignore: tuple[str, ...]
    rules: tuple[Rule, ...]

    def ignored(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, p) for p in self.ignore)

    def rule(self, key: str) -> Rule:
        return next((r for r in self.rules if fnmatch.fnmatchcase(key, r.pattern)), Rule(key))


@dataclass(frozen=True)
class Row:
    key: str  # file:dotted.path
    published: Any
    workspace: Any
    check: str  # "exact (same hardware)", "rel 0.002", ...
    ok: bool

    def failure(self) -> str:
        if self.workspace is None:
            return f"{self.key}: missing in the workspace (published: {self.published})"
        if self.published is None:
            return f"{self.key}: not in the published metrics (workspace: {self.workspace})"
        return f"{self.key}: workspace {self.workspace!r} vs published {self.published!r} (allowed: {self.check})"


# ------------------------------------------------------------------------------------ tolerances
def _number(path: Path, where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise FinetuneError(f"{path}: {where} must be a number >= 0, not {value!r}")
    return float(value)


def load_tolerances(path: str | Path = TOLERANCES) -> Tolerances:
    """The reviewed tolerance file: ``ignore: [pattern, ...]`` and ``tolerances: [{metric, rel|abs, measured}]``."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise FinetuneError(f"{path}: cannot read the tolerance file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise FinetuneError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict) or set(raw) - {"ignore", "tolerances"}:
        raise FinetuneError(f"{path}: top-level keys must be 'ignore' and 'tolerances'")
    ignore = raw.get("ignore") or []
    if not all(isinstance(p, str) for p in ignore):
        raise FinetuneError(f"{path}: 'ignore' must be a list of file:metric patterns")
    rules = []
    for i, entry in enumerate(raw.get("tolerances") or []):
        where = f"tolerances[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("metric"), str):
            raise FinetuneError(f"{path}: {where} needs 'metric: <file>:<key pattern>'")
        unknown = set(entry) - {"metric", "rel", "abs", "measured"}
        if unknown:
            raise FinetuneError(f"{path}: {where} ({entry['metric']}): unknown key(s) {', '.join(sorted(unknown))}; "
                                "use rel, abs, measured")
        if not isinstance(entry.get("measured"), str):
            raise FinetuneError(f"{path}: {where} ({entry['metric']}): 'measured' must say what justifies it")
        rel, abs_ = (_number(path, f"{where}.{k}", entry.get(k, 0)) for k in ("rel", "abs"))
        rules.append(Rule(entry["metric"], rel, abs_))
    return Tolerances(tuple(ignore), tuple(rules))


# ------------------------------------------------------------------------------------ reading
def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; numbers and booleans only (what DVC calls metrics)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return {prefix: data} if isinstance(data, (int, float)) and prefix else {}


def read_metrics(rev: str, root: str | Path = ".") -> tuple[dict[str, Any], dict[str, Any]]:
    """(workspace, published): file -> parsed content, or None where DVC could not read the file."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo
    from dvc.scm import RevError

    try:
        with Repo(str(root)) as repo:
            shown = repo.metrics.show(revs=[rev], hide_workspace=False, on_error="return")
    except NotDvcRepoError:
        raise FinetuneError(f"{Path(root).resolve()}: not a DVC project (run from the repository root)") from None
    except RevError:
        raise FinetuneError(f"--rev {rev}: no such git revision or DVC experiment "
                            "(give a commit, branch, tag or a name from `dvc exp list`)") from None
    if rev not in shown:  # the brancher names the workspace "workspace" and the rev as given
        raise FinetuneError(f"--rev {rev}: DVC returned no metrics for it")

    def files(result: dict) -> dict[str, Any]:
        if "error" in result:
            raise FinetuneError(f"--rev {rev}: cannot read its metrics ({result['error']})")
        return {path.replace("\\", "/"): entry.get("data") if "data" in entry else None
                for path, entry in (result.get("data") or {}).items()}

    published = files(shown[rev])
    if not any(v for v in published.values()):
        raise FinetuneError(
            f"--rev {rev}: has no metrics files to compare with (was the pipeline run and committed there?)")
    return files(shown.get("workspace", shown[rev])), published


def provenance_of(side: dict[str, Any], file: str) -> dict | None:
    own = (side.get(file) or {}).get("provenance")
    if isinstance(own, dict):
        return own
    for run in RUN_PROVENANCE:
        block = (side.get(run) or {}).get("provenance")
        if isinstance(block, dict):
            return block
    return None


def on_gpu(block: dict) -> bool:
    """provenance.hardware names GPUs first: '1 x NVIDIA H100 ... + 16 x <cpu>'."""
    return " + " in (block.get("hardware") or "")


def same_class(a: dict | None, b: dict | None) -> bool:
    """True when both blocks exist and name the same CPU-only hardware, Python and library versions (CUDA
    kernels are not bitwise deterministic, so GPU runs are compared within tolerance: docs/reproduce.md)."""
    return (a is not None and b is not None and not on_gpu(a) and all(a.get(k) == b.get(k) for k in CLASS_KEYS))


# ------------------------------------------------------------------------------------ comparing

def compare(workspace: dict[str, Any], published: dict[str, Any], tolerances: Tolerances) -> list[Row]:
    """One row per published or workspace number that the tolerance file does not ignore."""
    rows = []
    for file in sorted(set(workspace) | set(published)):
        if tolerances.ignored(f"{file}:"):
            continue
        if not workspace.get(file) or not published.get(file):  # a whole file on one side only: one row
            n = sum(not tolerances.ignored(f"{file}:{k}") for k in flatten(workspace.get(file) or published.get(file)))
            side = f"{file} ({n} metrics)"
            rows.append(Row(file, side if published.get(file) else None, side if workspace.get(file) else None,
                            "present on both sides", False))
            continue
        exact = same_class(provenance_of(workspace, file), provenance_of(published, file))
        ws, pub = flatten(workspace[file]), flatten(published[file])
        for key in sorted(set(ws) | set(pub)):
            full = f"{file}:{key}"
            if tolerances.ignored(full):
                continue
            if key not in ws or key not in pub:
                rows.append(Row(full, pub.get(key), ws.get(key), "present on both sides", False))
                continue
            rule = Rule(full) if exact else tolerances.rule(full)
            check = "exact" if exact else rule.describe()
            rows.append(Row(full, pub[key], ws[key], check, rule.allows(ws[key], pub[key])))
    return rows


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def _diff(row: Row) -> str:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (row.workspace, row.published))
    return f"{row.workspace - row.published:+.3g}" if numbers and row.workspace != row.published else ""


def table(rows: list[Row]) -> str:
    head = ("metric", "published", "workspace", "diff", "check", "")
    cells = [head] + [(r.key, _fmt(r.published), _fmt(r.workspace), _diff(r), r.check, "ok" if r.ok else "MISMATCH")
                      for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip() for c in cells)


def summary(rev: str, workspace: dict[str, Any], published: dict[str, Any]) -> str:
    """Which provenance each side has and whether the comparison is exact."""
    from finetune.core.provenance import describe

    ws, pub = provenance_of(workspace, RUN_PROVENANCE[0]), provenance_of(published, RUN_PROVENANCE[0])
    lines = [f"published: {rev}: {describe(pub) if pub else 'no provenance block'}",
             f"workspace: {describe(ws) if ws else 'no provenance block'}"]
    if same_class(ws, pub):
        lines.append("same hardware, Python and library versions: every metric must be equal")
    elif ws and pub and on_gpu(ws) and all(ws.get(k) == pub.get(k) for k in CLASS_KEYS):
        lines.append(
            "same GPU hardware, but CUDA kernels are not bitwise deterministic: metrics within tolerances.yaml")
    else:
        differs = [k for k in CLASS_KEYS if (ws or {}).get(k) != (pub or {}).get(k)] if ws and pub else ["provenance"]
        lines.append(f"{', '.join(differs)} differ(s): metrics within tolerances.yaml")
    return "\n".join(lines)


def verify(rev: str = "HEAD", tolerances: str | Path | None = None, root: str | Path = ".") -> tuple[str, list[str]]:
    """(report text, one line per failing metric)."""
    rules = load_tolerances(tolerances or TOLERANCES)
    workspace, published = read_metrics(rev, root)
    rows = compare(workspace, published, rules)
    failures = [r.failure() for r in rows if not r.ok]
    counts = f"{len(rows) - len(failures)} of {len(rows)} metrics match"
    return f"{summary(rev, workspace, published)}\n\n{table(rows)}\n\n{counts}", failures
