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
- the loss curve: the DVCLive folder and the Trainer's logging state are snapshotted into each
  checkpoint and restored with it, so a resumed run logs the same values as an uninterrupted one.
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
from finetune.outputs import manifest_problem, sha256_file, write_json, write_manifest

LIVE_SNAPSHOT = "dvclive"
LOG_STATE = "finetune-log-state.json"
KEEP = 2  # checkpoints kept: the newest and one to fall back to
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# train keys that do not change the weights (a changed value still resumes)
_NOT_IN_KEY = {"threads", "save_steps"}


def run_key(sections: dict[str, Any], data_files: list[Path]) -> str:
    """A short hash of the recipe sections and data files that decide the trained weights."""
    sections = dict(sections)
    if "train" in sections:
        sections["train"] = {k: v for k, v in sections["train"].items() if k not in _NOT_IN_KEY}
    digest = hashlib.sha256(json.dumps(sections, sort_keys=True, default=str).encode())
    for path in data_files:
        digest.update(path.name.encode() + b"\0" + (sha256_file(path) if path.is_file() else "-").encode())
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


def problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from, or None when it is complete and intact."""
    return manifest_problem(ckpt, required=("trainer_state.json", LOG_STATE))


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


def _finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)


class CheckpointCallback(TrainerCallback):
    """After each Trainer save: snapshot DVCLive and the logging state, check the weights, write the manifest.
    On a resume: put the logging state back (:func:`restore_log_state`). ``trainer`` is set once built."""

    def __init__(self, live_dir: Path | None, resume: Path | None = None):
        self.live_dir, self.resume = live_dir, resume
        self.trainer = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.resume is not None and self.trainer is not None:
            restore_log_state(self.trainer, json.loads((self.resume / LOG_STATE).read_text(encoding="utf-8")))

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
        if self.trainer is not None:
            write_json(ckpt / LOG_STATE, log_state(self.trainer))
        write_manifest(ckpt)


def log_state(trainer) -> dict[str, Any]:
    """What the Trainer and TRL hold in memory for the logs and do not checkpoint: the loss summed since
    the start and since the last log, the step last logged, TRL's token count and its per-step values
    (entropy, accuracy) waiting for the next log. Without them a resumed run logs ``num_tokens`` from 0,
    a final ``train_loss`` over the resumed steps only, and a first loss averaged over fewer steps."""
    metrics = getattr(trainer, "_metrics", {})
    return {
        "total_loss_scalar": trainer._total_loss_scalar,
        "tr_loss": trainer._tr_loss.item(),  # this process's; the others' differ only under DDP between logs
        "globalstep_last_logged": trainer._globalstep_last_logged,
        "total_train_tokens": getattr(trainer, "_total_train_tokens", None),
        "metrics": {mode: {k: list(v) for k, v in values.items()} for mode, values in metrics.items()},
    }


def restore_log_state(trainer, saved: dict[str, Any]) -> None:
    """Put :func:`log_state` back after ``Trainer.train`` reset it (its ``on_train_begin``), so the
    resumed logs and the final ``train_loss`` equal an uninterrupted run's, value for value."""
    trainer._total_loss_scalar = saved["total_loss_scalar"]
    trainer._tr_loss.fill_(saved["tr_loss"])
    trainer._globalstep_last_logged = saved["globalstep_last_logged"]
    trainer._initial_global_step = 0  # train_loss = the whole run's loss sum / all its steps
    if saved["total_train_tokens"] is not None:
        trainer._total_train_tokens = saved["total_train_tokens"]
    for mode, values in saved["metrics"].items():
        trainer._metrics[mode].clear()
        trainer._metrics[mode].update(values)


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
