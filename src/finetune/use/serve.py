"""``finetune serve``: an OpenAI-compatible HTTP endpoint on a pipeline output, through existing servers.

- GGUF (``--model gguf[:<type>|:<file>.gguf]``, or ``base`` when the recipe's base is a GGUF):
  llama.cpp's server from ``llama-cpp-python[server]`` (``python -m llama_cpp.server``); it applies the
  chat template embedded in the GGUF and stops at its EOS; threads and GPU layers as everywhere else
  (:func:`finetune.core.gguf.llama_settings`: every available core unless ``--threads``, all layers on a GPU).
- HF weights (``merged``, ``base``, a model folder): ``transformers serve`` (transformers' own
  FastAPI/uvicorn server, offline on CPU), pinned to that one model.
An adapter is not served on its own: neither server loads a LoRA onto a GGUF-sourced base; serve the
merge stage's output (the same weights, folded).

Binds 127.0.0.1 by default; any address that is not loopback is refused unless ``--allow-remote``.
The server replaces this process (``exec``), so Ctrl-C / SIGTERM reach it directly.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path

from finetune.core.errors import FinetuneError
from finetune.core.gguf import llama_settings
from finetune.core.models import resolve_source
from finetune.core.recipe import Recipe
from finetune.core.targets import Target, resolve


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_host(host: str, allow_remote: bool) -> None:
    if not allow_remote and not is_loopback(host):
        raise FinetuneError(
            f"serve --host {host}: not a loopback address; the endpoint has no authentication, so "
            "binding it beyond this machine needs --allow-remote"
        )


def serve_target(choice: str, recipe: Recipe, outputs_dir: str, models_dir: str) -> Target:
    """The model to serve; ``base`` of a GGUF-sourced recipe is that GGUF through llama.cpp."""
    if choice == "base" and recipe.model.gguf_file:
        path = Path(resolve_source(recipe.model.id)) / recipe.model.gguf_file
        if not path.is_file():
            raise FinetuneError(f"model.gguf_file '{recipe.model.gguf_file}': not found in {path.parent}")
        return Target("gguf", f"gguf:{path.name}", path)
    target = resolve(choice, recipe, outputs_dir, models_dir)
    if target.kind == "adapter":
        raise FinetuneError(
            f"serve --model {choice}: the servers load whole models, not a LoRA on a base; serve `merged` "
            "(the merge stage's output: this adapter folded into the base) or a GGUF"
        )
    return target


def server_command(target: Target, recipe: Recipe, host: str, port: int, threads: int | None,
                   ctx: int) -> list[str]:
    """The argv of the server for ``target``."""
    if target.backend == "gguf":  # threads and GPU layers as everywhere else llama.cpp runs a GGUF here
        settings = [arg for key, value in llama_settings(threads).items() for arg in (f"--{key}", str(value))]
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(target.path), "--host", host,
                "--port", str(port), "--n_ctx", str(ctx), "--model_alias", recipe.name, *settings]
    model = str(target.path) if target.path is not None else resolve_source(recipe.model.id)
    return [sys.executable, "-m", "transformers.cli.transformers", "serve", model, "--host", host,
            "--port", str(port), "--device", "cuda" if _cuda() else "cpu", "--log-level", "warning"]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def server_env(threads: int | None) -> dict[str, str]:
    """Offline: no hub calls, no update check."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_UPDATE_CHECK="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def serve(recipe: Recipe, choice: str, host: str = "127.0.0.1", port: int = 8000, *, allow_remote: bool = False,
          outputs_dir: str = "outputs", models_dir: str = "models", threads: int | None = None, ctx: int = 4096,
          dry_run: bool = False) -> dict[str, object]:
    """Check the host, pick the server, then exec it (``dry_run``: return the command instead)."""
    check_host(host, allow_remote)
    if not 0 < port < 65536:
        raise FinetuneError(f"serve --port {port}: not a TCP port (1-65535)")
    target = serve_target(choice, recipe, outputs_dir, models_dir)
    if target.backend == "hf" and recipe.model.task != "causal_lm":
        raise FinetuneError(f"model.task is {recipe.model.task}: the OpenAI chat endpoint needs a causal LM")
    cmd = server_command(target, recipe, host, port, threads, ctx)
    shown = f"[{host}]" if ":" in host else host
    name = recipe.name if target.backend == "gguf" else cmd[cmd.index("serve") + 1]
    info = {"model": target.name, "url": f"http://{shown}:{port}/v1", "request_model": name,
            "server": "llama.cpp (llama_cpp.server)" if target.backend == "gguf" else "transformers serve",
            "command": cmd}
    if dry_run:
        return info
    print(f"serving {target.name} with {info['server']} at {info['url']} (OpenAI-compatible: "
          f"POST /v1/chat/completions, model {name!r}); Ctrl-C stops", file=sys.stderr, flush=True)
    os.execve(cmd[0], cmd, server_env(threads))
    raise AssertionError("unreachable")  # pragma: no cover
