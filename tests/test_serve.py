"""serve: loopback unless --allow-remote; a real server on a free port answers a chat completion, then stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, recipe_dict
from finetune.cli import main
from finetune.training.distributed import free_port
from finetune.use.serve import is_loopback

pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn, sse-starlette, ...) is not installed")


@pytest.fixture(scope="module")
def params(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(recipe_dict("quickstart")))
    return path


def test_loopback_only_unless_allowed(params, capsys):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("no-such-host.invalid")
    assert main(["--params", str(params), "serve", "--model", "base", "--host", "0.0.0.0", "--dry-run"]) == 2
    assert "not a loopback address" in capsys.readouterr().err
    assert main(["--params", str(params), "serve", "--model", "base", "--host", "0.0.0.0", "--allow-remote",
                 "--dry-run", "--port", "9123"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["command"][1:3] == ["-m", "llama_cpp.server"] and info["url"] == "http://0.0.0.0:9123/v1"
    assert main(["--params", str(params), "serve", "--model", "adapter", "--outputs", "/nonexistent"]) == 2


def test_the_gguf_server_runs_as_every_other_llama_cpp_call(params, capsys):
    from finetune.core.gguf import gpu_layers

    assert main(["--params", str(params), "serve", "--model", "base", "--dry-run", "--threads", "3"]) == 0
    command = json.loads(capsys.readouterr().out)["command"]
    settings = dict(zip(command[-6::2], command[-5::2], strict=True))
    assert settings == {"--n_threads": "3", "--n_threads_batch": "3", "--n_gpu_layers": str(gpu_layers())}


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _stream(url: str, body: dict, timeout: float) -> list[str]:
    req = urllib.request.Request(url, json.dumps({**body, "stream": True}).encode(),
                                 {"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for line in resp:
            line = line.decode().strip()
            if line.startswith("data: "):
                events.append(line[6:])
    return events


def _wait_ready(proc: subprocess.Popen, url: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise AssertionError(f"server not ready within {timeout}s")


def _serve(params: Path, model: str, port: int, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    argv = [sys.executable, "-m", "finetune", "--params", str(params), "serve", "--model", model,
            "--port", str(port), "--threads", "1", "--ctx", "512"]
    log = open(cwd / "server.log", "w")  # a file, not a pipe: an undrained pipe would block the server
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> int:
    """SIGINT (Ctrl-C) first; the server must be gone within 20 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError("the server ignored SIGINT for 20 s") from None
    return proc.returncode


def _chat_round_trip(base: str, model: str | None) -> None:
    body = {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 12, "temperature": 0}
    body |= {"model": model} if model else {}
    reply = _post(f"{base}/chat/completions", body, timeout=60)
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert reply["usage"]["completion_tokens"] > 0
    assert choice["finish_reason"] in ("stop", "length")
    events = _stream(f"{base}/chat/completions", body, timeout=60)
    chunks = [json.loads(e) for e in events if e != "[DONE]"]  # llama.cpp ends with [DONE], transformers not
    finish = [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]]
    assert finish[-1] in ("stop", "length")
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert len([p for p in pieces if p]) >= 2  # streamed in pieces


def test_gguf_server_answers_a_chat_completion_and_stops(params, tmp_path):
    """`serve --model base` on the quickstart: its base is a GGUF, served by llama.cpp's server."""
    port = free_port()
    proc = _serve(params, "base", port, tmp_path)
    start = time.monotonic()
    try:
        base = f"http://127.0.0.1:{port}/v1"
        _wait_ready(proc, f"{base}/models", timeout=90, log=tmp_path / "server.log")
        models = json.loads(urllib.request.urlopen(f"{base}/models", timeout=10).read())
        assert models["data"][0]["id"] == "quickstart"
        _chat_round_trip(base, "quickstart")
    finally:
        rc = _stop(proc)
    assert rc == 0 and time.monotonic() - start < 150
    assert "Finished server process" in (tmp_path / "server.log").read_text()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)


def test_hf_server_answers_a_chat_completion_and_stops(params, tmp_path, tiny_llama):
    """An HF folder through `transformers serve`, offline, on CPU."""
    port = free_port()
    proc = _serve(params, str(tiny_llama), port, tmp_path)
    try:
        base = f"http://127.0.0.1:{port}/v1"
        _wait_ready(proc, f"http://127.0.0.1:{port}/health", timeout=120, log=tmp_path / "server.log")
        _chat_round_trip(base, None)
    finally:
        rc = _stop(proc)
    assert rc in (0, 1)  # typer reports Ctrl-C as "Aborted!", exit 1, after uvicorn's clean shutdown
    assert "Finished server process" in (tmp_path / "server.log").read_text()
