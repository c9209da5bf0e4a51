"""Train checkpoints that survive a kill, on top of the HF Trainer's own checkpointing.

The Trainer saves ``checkpoint-<step>/`` (adapter, optimizer, scheduler, RNG states, trainer state
with the step, hence the data position) every ``train.save_steps`` and resumes from one with
``resume_from_checkpoint``. This module adds what a preemptible run needs around that:

- where: ``<root>/<key>/`` with ``key`` a hash of the params and data that decide the weights, so
  the same recipe resumes and a changed one starts fresh. The root (``outputs/checkpoints``) is not
  a DVC output: ``dvc repro`` deletes declared outputs before it runs a stage.
- which: the Trainer writes a checkpoint in place, so a kill can leave half of one. Each complete
  checkpoint gets a manifest (sha256 of every file) written last; resuming takes the newest
  checkpoint whose manifest matches and falls back past incomplete or corrupt ones.
- the loss curve: the DVCLive folder is snapshotted into each checkpoint and restored with it, so a
  resumed curve has no repeated or missing steps.
- SIGTERM/SIGINT: finish the current step, save a checkpoint, stop (:class:`StopOnSignal`).
- NaN/inf loss: stop without saving; a checkpoint with non-finite weights is never marked complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from finetune.errors import FinetuneError
from finetune.outputs import write_json

MANIFEST = "finetune-complete.json"
LIVE_SNAPSHOT = "dvclive"
KEEP = 2  # checkpoints kept: the newest and one to fall back to
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# train keys that do not change the weights (a changed value still resumes)
_NOT_IN_KEY = {"threads", "save_steps"}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_key(sections: dict[str, Any], data_files: list[Path]) -> str:
    """A short hash of the recipe sections and data files that decide the trained weights."""
    sections = dict(sections)
    if "train" in sections:
        sections["train"] = {k: v for k, v in sections["train"].items() if k not in _NOT_IN_KEY}
    digest = hashlib.sha256(json.dumps(sections, sort_keys=True, default=str).encode())
    for path in data_files:
        digest.update(path.name.encode() + b"\0" + (_sha256(path) if path.is_file() else "-").encode())
    return digest.hexdigest()[:16]


def trainer_args(save_steps: int, output_dir: str | Path) -> dict[str, Any]:
    """TrainingArguments that make the Trainer checkpoint into ``output_dir`` every ``save_steps``."""
    return {
        "output_dir": str(output_dir),
        "save_strategy": "steps",
        "save_steps": save_steps,
        "save_total_limit": KEEP,
        "save_only_model": False,
        "logging_nan_inf_filter": False,  # a NaN loss must show in the logs, not be averaged away
        "ignore_data_skip": False,  # resume at the same batch
    }


def step_of(path: Path) -> int:
    """The step of a ``checkpoint-<step>`` folder (-1 for other names)."""
    match = _CHECKPOINT.match(path.name)
    return int(match.group(1)) if match else -1


def checkpoints(run_dir: Path) -> list[Path]:
    """``checkpoint-<step>`` folders in ``run_dir``, newest first."""
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.iterdir() if p.is_dir() and step_of(p) >= 0), key=step_of, reverse=True)


def write_manifest(ckpt: Path) -> None:
    """Mark ``ckpt`` complete: the sha256 of every file in it, written last and atomically."""
    files = {str(p.relative_to(ckpt)): _sha256(p) for p in sorted(ckpt.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    write_json(ckpt / MANIFEST, {"files": files})


def problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from, or None when it is complete and intact."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return "incomplete (no manifest: the save was interrupted)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "manifest unreadable"
    if "trainer_state.json" not in files:
        return "no trainer_state.json"
    for name, digest in files.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != digest:
            return f"{name} is corrupt (checksum differs)"
    return None


def latest_complete(run_dir: Path) -> Path | None:
    """The newest intact checkpoint; broken newer ones are removed with a one-line warning each."""
    for ckpt in checkpoints(run_dir):
        why = problem(ckpt)
        if why is None:
            return ckpt
        print(f"warning: checkpoint {ckpt}: {why}; falling back to the previous one", file=sys.stderr, flush=True)
        shutil.rmtree(ckpt, ignore_errors=True)
    return None


def restore_live(ckpt: Path | None, live_dir: Path) -> None:
    """Make ``live_dir`` the DVCLive folder as it was at ``ckpt`` (empty when starting fresh)."""
    shutil.rmtree(live_dir, ignore_errors=True)
    snapshot = ckpt / LIVE_SNAPSHOT if ckpt else None
    if snapshot and snapshot.is_dir():
        shutil.copytree(snapshot, live_dir)


@contextmanager
def removed_on_success(run_dir: Path) -> Iterator[Path]:
    """Keep ``run_dir`` (checkpoints) if the block fails or is killed; remove it when it succeeds."""
    yield run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    try:  # the checkpoints root too, once no other run's checkpoints are in it
        run_dir.parent.rmdir()
    except OSError:
        pass


def logged_mean_loss(history: list[dict[str, Any]]) -> float | None:
    """Mean training loss over the logged steps (each logged loss weighted by its interval)."""
    total, steps, last = 0.0, 0, 0
    for entry in history:
        if "loss" in entry and "step" in entry:
            width = entry["step"] - last
            total, steps, last = total + entry["loss"] * width, steps + width, entry["step"]
    return total / steps if steps else None


def _finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)


class CheckpointCallback(TrainerCallback):
    """After each Trainer save: snapshot DVCLive, check the weights, write the manifest."""

    def __init__(self, live_dir: Path | None):
        self.live_dir = live_dir

    def on_step_end(self, args, state, control, **kwargs):
        # no checkpoint of the last step: the adapter is saved next, and the Trainer resumed at
        # max_steps runs one step too many
        if state.global_step >= state.max_steps:
            control.should_save = False

    def on_save(self, args, state, control, model=None, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ckpt.is_dir():
            return
        if model is not None and not _finite(model):
            shutil.rmtree(ckpt, ignore_errors=True)  # never resume into NaN weights
            return
        if self.live_dir is not None and self.live_dir.is_dir():
            shutil.copytree(self.live_dir, ckpt / LIVE_SNAPSHOT, dirs_exist_ok=True)
        write_manifest(ckpt)


class StopOnNonFinite(TrainerCallback):
    """Stop at the first logged NaN/inf loss, without saving that step."""

    def __init__(self) -> None:
        self.bad: tuple[int, float] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss) and self.bad is None:
            self.bad = (state.global_step, loss)
            control.should_training_stop = True
            control.should_save = False


class StopOnSignal(TrainerCallback):
    """SIGTERM/SIGINT: finish the current step, save a checkpoint, stop. A second signal stops now."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    @contextmanager
    def installed(self) -> Iterator[StopOnSignal]:
        previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True


def raise_if_stopped(guard: StopOnNonFinite, stop: StopOnSignal, step: int, max_steps: int, run_dir: Path,
                     learning_rate: float) -> None:
    """One line for a run the guard or a signal stopped: what happened and what to do."""
    if guard.bad is not None:
        kept = latest_complete(run_dir)
        raise FinetuneError(
            f"train: the loss became {guard.bad[1]} at step {guard.bad[0]}; lower train.learning_rate "
            f"(now {learning_rate})" + (f"; the last good checkpoint is kept in {kept}" if kept else "")
        )
    if stop.received is not None and step < max_steps:  # a signal in the last step: the run is done
        raise FinetuneError(
            f"train: stopped by {stop.name} at step {step}; checkpoint saved in {latest_complete(run_dir)}; "
            "run `dvc repro` (or this command) again to resume from it"
        )
