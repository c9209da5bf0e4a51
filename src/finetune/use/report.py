"""``make eval``: one table across recipes and experiments, from DVC's metrics.

Rows are (experiment, recipe, model variant); columns are the score of every task the eval asked
for in ``eval/metrics/<variant>.json`` (a group as its aggregate, no stderr), plus train time,
tokens/s, peak memory and GGUF size. Reads ``dvc exp show --json`` (the workspace and every
experiment), writes ``eval/report.md`` and a PNG.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.core.outputs import write_text_atomic
from finetune.core.provenance import describe

HIDDEN = ("provenance",)  # row keys kept out of the table's columns


def _runs(node: Any) -> Iterator[tuple[str, dict]]:
    """(label, data) for every revision in ``dvc exp show --json`` output."""
    if isinstance(node, list):
        for item in node:
            yield from _runs(item)
    elif isinstance(node, dict):
        data = node.get("data")
        if isinstance(data, dict) and "metrics" in data:
            rev = str(node.get("rev", "?"))
            label = node.get("name") or data.get("name") or (rev[:7] if len(rev) == 40 else rev)
            yield label, data
        for key in ("experiments", "revs"):
            if key in node:
                yield from _runs(node[key])


def _metric_files(data: dict) -> dict[str, dict]:
    out = {}
    for path, entry in (data.get("metrics") or {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("data"), dict):
            out[path] = entry["data"]
    return out


def rows_from(label: str, metrics: dict[str, dict]) -> list[dict[str, Any]]:
    """Table rows of one revision: one per eval/metrics/<variant>.json."""
    train = metrics.get("metrics/timing/train.json", {})
    rows = []
    for path, entry in sorted(metrics.items()):
        if not (path.startswith("eval/metrics/") and "variant" in entry):
            continue
        variant = entry["variant"]
        row: dict[str, Any] = {"experiment": label, "recipe": entry.get("recipe", "?"), "model": variant,
                               "provenance": entry.get("provenance")}
        lm_eval = entry.get("lm_eval") or {}
        config = lm_eval.get("config", {})
        # Only the tasks the eval asked for: a group (MMLU) is one score, not its 57 subjects.
        asked = config.get("tasks")
        for task, scores in lm_eval.get("results", {}).items():
            if asked and task not in asked:
                continue
            for metric, value in scores.items():
                if isinstance(value, (int, float)) and "stderr" not in metric:
                    row[f"{task} {metric}"] = value
        if "humaneval" in entry:
            for key, value in entry["humaneval"].items():
                if key.startswith("pass@"):
                    row[f"humaneval {key}"] = value
        backend = config.get("backend")
        if backend:
            row["lm-eval backend"] = backend
        tuned = variant != "base"  # training cost belongs to the fine-tuned model and its GGUFs
        row["train s"] = train.get("train_seconds") if tuned else None
        row["tokens/s"] = train.get("tokens_per_second") if tuned else None
        row["peak GiB"] = train.get("peak_memory_gib") if tuned else None
        if variant.startswith("gguf-"):
            size = metrics.get(f"metrics/quantize/{variant[5:]}.json", {}).get("size_mib")
            row["GGUF MiB"] = size
        rows.append(row)
    return rows


def collect(all_experiments: bool = True) -> list[dict[str, Any]]:
    if all_experiments:
        proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True, text=True)
        if proc.returncode == 0 and proc.stdout.strip():
            rows: list[dict[str, Any]] = []
            for label, data in _runs(json.loads(proc.stdout)):
                rows.extend(rows_from(label, _metric_files(data)))
            if rows:
                return rows
    metrics = {str(p): json.loads(p.read_text()) for p in Path("eval/metrics").glob("*.json")}
    metrics |= {str(p): json.loads(p.read_text()) for p in Path("metrics").rglob("*.json")}
    return rows_from("workspace", metrics)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "No eval metrics yet: run `dvc repro` (or `dvc exp run`) first.\n"
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns and c not in HIDDEN]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n\n" + sources(rows)


def sources(rows: list[dict[str, Any]]) -> str:
    """What produced each experiment's rows: commit, experiment, image, hardware, versions."""
    blocks: dict[tuple[str, str], dict | None] = {}
    for row in rows:
        key = (row["experiment"], row["recipe"])
        blocks[key] = blocks.get(key) or row.get("provenance")
    lines = ["Produced by (`eval/metrics/*.json` -> `provenance`):", ""]
    for (experiment, recipe), block in blocks.items():
        text = describe(block) if block else "no provenance recorded (metrics from before it was added)"
        lines.append(f"- {experiment} ({recipe}): {text}")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars: every benchmark score per (experiment, model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [c for c in rows[0] if " " in c and c.split(" ")[-1] in ("acc", "acc_norm", "exact_match", "pass@1")]
    for row in rows[1:]:
        metrics += [c for c in row if c not in metrics and " " in c
                    and c.split(" ")[-1] in ("acc", "acc_norm", "exact_match", "pass@1")]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) * max(1, len(metrics)) / 2), 4))
    width = 0.8 / max(1, len(metrics))
    for i, metric in enumerate(metrics):
        ax.bar([x + i * width for x in range(len(rows))], [row.get(metric) or 0 for row in rows], width, label=metric)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))])
    ax.set_xticklabels([f"{r['experiment']}\n{r['model']}" for r in rows], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(out: str | Path, png: str | Path, all_experiments: bool = True) -> str:
    rows = collect(all_experiments)
    text = markdown(rows)
    write_text_atomic(out, "# Benchmarks\n\nMade by `make eval` from DVC metrics.\n\n" + text)
    if rows:
        chart(rows, Path(png))
    return text
