"""The whole pipeline at 7-8B on one GPU: prepare -> train -> merge -> heldout -> quantize -> eval -> report.

Every stage is what ``dvc repro`` runs: ``dvc repro --single-item <stage>`` in a fresh DVC workspace
made from this checkout (``dvc.yaml``, ``src/``, ``recipes/``, ``eval/tasks``, ``.dvc/config``: its
cache link type included) with ``params.yaml`` composed by ``python -m finetune use <recipe>`` (the
Hydra composition ``dvc exp run -S recipe=...`` does). Without DVC importable, the same ``cmd`` lines
of dvc.yaml run directly. The recipe runs with its own settings; only where the model and data come
from is overridden: a random-weight model of the recipe's real shape (Llama-3-8B for llama3-alpaca,
Llama-2-7B for llama2-guanaco, built from the published config, with the real tokenizer rebuilt
from llama.cpp's vocab GGUF) and the recipe's data from a local folder. Random weights score near
chance and never stop at EOS: every generation runs to its length limit, the worst case for time.

    # CPU side, once: tokenizers + the recipe's data + the eval suite's files into one folder
    python bench/pipeline_gpu.py bundle --vocab-dir <llama.cpp>/models --shared ../shared/data --out BUNDLE
    # the GPU host (after `make install GGML_CUDA=on LOCK=requirements/cuda.lock`, or the CUDA image)
    python bench/pipeline_gpu.py run --bundle BUNDLE --recipe llama3-alpaca --work /root/pipe \\
        --out bench/pipeline_gpu.h200.jsonl
    python bench/pipeline_gpu.py table bench/pipeline_gpu.h200.jsonl      # the README table
    # plumbing check on a CPU (2-layer model, a few steps/documents; its timings mean nothing)
    python bench/pipeline_gpu.py run --bundle BUNDLE --recipe llama3-alpaca --work /tmp/p --out /tmp/p.jsonl --tiny

One JSON line per stage: recipe, stage, seconds (wall clock, DVC's hashing and caching included),
peak_gpu_gib (the GPU's used memory, NVML, polled every 0.5 s), peak_rss_gib (resident memory of
the stage's process tree, polled), disk_gib (bytes the stage added to the workspace, DVC cache
included, each inode once: what the disk really lost), ok, and the stage's own numbers; then one
line ``stage: "total"``. Every 30 s a progress line shows the running stage's time, memory and last log line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from finetune.core import gpu_memory  # noqa: E402
from train_speed import SHAPES, TOKENIZER, append_row, build_checkpoint, save_tokenizers  # noqa: E402

RECIPES = {  # recipe: (model shape, raw data file under the bundle's data/)
    "llama3-alpaca": ("llama3-8b", "alpaca/alpaca_data_1k.json"),
    "llama2-guanaco": ("llama2-7b", "guanaco-llama2-1k/train-00000-of-00001.parquet"),
}
# heldout (needs merged only) before quantize: it runs while the llama.cpp build beside the stages may still go
STAGES = ["prepare", "train", "merge", "heldout", "quantize", "eval"]
PROJECT = ["dvc.yaml", "bin", "src", "recipes", "eval/tasks"]  # bin/project-python: the interpreter dvc.yaml calls
# --tiny: a 2-layer model 256 wide (llama.cpp's K-quants need 256-wide rows) and a few steps/documents
TINY_SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}
TINY = ["train.max_steps=2", "train.batch_size=2", "train.grad_accum=1", "train.max_length=256",
        "quantize.verify_prompts=2", "quantize.verify_tokens=4", "quantize.ppl_rows=4",
        "eval.limit=4", "eval.max_new_tokens=8", "eval.humaneval_limit=3", "eval.humaneval_max_new_tokens=8",
        "++eval.task_limits.ft_arc_challenge=4", "++eval.task_limits.ft_mmlu=1", "++eval.task_limits.ft_gsm8k=2"]
TINY_CPU = ["quant.mode=none", "train.optimizer=adamw_torch"]  # no 4-bit / 8-bit kernels without CUDA
PROGRESS_EVERY = 30.0


# ------------------------------------------------------------------------------------------ bundle
def eval_files(recipe: str, shared: Path) -> list[Path]:
    """The data files (under ``shared``) of the recipe's lm-eval tasks."""
    import tempfile

    from finetune.benchmarks import lmeval
    from finetune.core.recipe import load_recipe, recipe_path

    tasks = list(load_recipe(recipe_path(recipe, ROOT)).eval.tasks)
    with tempfile.TemporaryDirectory() as tmp:
        tm = lmeval.task_manager(lmeval.render_tasks(shared, ROOT / "outputs" / "prepared", tmp))
        files = {Path(p) for t in tasks for cfg in lmeval.leaf_configs(tm, t)
                 for p in ((cfg.get("dataset_kwargs") or {}).get("data_files") or {}).values()}
    return sorted(f for f in files if f.is_relative_to(shared.resolve()))


def bundle(vocab_dir: Path, shared: Path, out: Path, recipes: list[str]) -> None:
    """Tokenizers (gzipped), the recipes' raw data and their eval suites' files: what an offline GPU host needs."""
    save_tokenizers(vocab_dir, out)
    shutil.rmtree(out / "tmp-tok", ignore_errors=True)
    shared = shared.resolve()
    files = {shared / RECIPES[r][1] for r in recipes} | {f for r in recipes for f in eval_files(r, shared)}
    for src in sorted(files):
        dst = out / "data" / src.relative_to(shared)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(json.dumps({"bundle": str(out), "files": len(files), "mib": round(size / 2**20, 1)}))


# ------------------------------------------------------------------------------------------ measuring
def disk_bytes(root: Path) -> int:
    """Bytes on disk under ``root``, each inode counted once (hard links from DVC's cache are not doubled)."""
    seen, total = set(), 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def apparent_bytes(path: Path) -> int:
    """File sizes under ``path`` (what a copy would take again)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def linked_files(work: Path) -> int:
    """Workspace files that share their inode with DVC's cache (hard links) or point into it (symlinks)."""
    count = 0
    for path in work.rglob("*"):
        if ".dvc" in path.relative_to(work).parts:
            continue
        if path.is_symlink() or (path.is_file() and path.stat().st_nlink > 1):
            count += 1
    return count


def wait_for(marker: Path) -> bool:
    """Wait for a build running beside (llama-cpp-python with CUDA) to write ``marker`` (``rc=0 ...`` = built)."""
    start = time.perf_counter()
    while not marker.exists():
        print(f"[quantize] waiting for {marker} ({time.perf_counter() - start:.0f} s)", flush=True)
        time.sleep(15)
    text = marker.read_text().strip()
    print(f"[quantize] {marker}: {text}", flush=True)
    return text.startswith("rc=0")


class Sampler(threading.Thread):
    """Peak GPU memory in use (NVML) and peak resident memory of a process tree, polled."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        import psutil

        self.proc, self.stop, self.gpu, self.rss = psutil.Process(pid), threading.Event(), None, 0
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
            self.gpu = 0
        except Exception:  # noqa: BLE001 -- no NVIDIA GPU/driver: no GPU column
            self.nvml = None

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                tree = [self.proc, *self.proc.children(recursive=True)]
                self.rss = max(self.rss, sum(p.memory_info().rss for p in tree if p.is_running()))
            except Exception:  # noqa: BLE001 -- a process ended between listing and reading
                pass
            if self.nvml is not None:
                self.gpu = max(self.gpu, self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)


def run_stage(name: str, cmd: list[str] | str, cwd: Path, env: dict, log: Path) -> dict:
    """Run one stage with its output in ``log``; a progress line every PROGRESS_EVERY seconds."""
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                shell=isinstance(cmd, str))
        sampler = Sampler(proc.pid)
        sampler.start()
        while proc.poll() is None:
            try:
                proc.wait(PROGRESS_EVERY)
            except subprocess.TimeoutExpired:
                last = _last_line(log)
                gpu = f", GPU {sampler.gpu / 2**30:.1f} GiB" if sampler.gpu is not None else ""
                print(f"[{name}] {time.perf_counter() - start:.0f} s{gpu}, RSS {sampler.rss / 2**30:.1f} GiB | {last}",
                      flush=True)
        sampler.stop.set()
        sampler.join()
    return {"seconds": round(time.perf_counter() - start, 1), "rc": proc.returncode,
            "peak_gpu_gib": None if sampler.gpu is None else round(sampler.gpu / 2**30, 2),
            "peak_rss_gib": round(sampler.rss / 2**30, 2)}


def _last_line(log: Path) -> str:
    """The log's last non-empty line (tqdm's carriage-return updates count as lines)."""
    with log.open("rb") as fh:
        fh.seek(max(0, log.stat().st_size - 4096))
        tail = fh.read().decode(errors="replace").replace("\r", "\n")
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


# ------------------------------------------------------------------------------------------ the run
def workspace(work: Path, recipe: str, base: Path, bundle_dir: Path, overrides: list[str], env: dict,
              use_dvc: bool, cache_type: str | None) -> None:
    """A DVC workspace from this checkout with ``params.yaml`` composed for ``recipe``."""
    work.mkdir(parents=True)
    for rel in PROJECT:
        src = ROOT / rel
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, work / rel)
    raw = bundle_dir / "data" / RECIPES[recipe][1]
    (work / "data").mkdir()  # the prepare stage's `data` dependency
    shutil.copyfile(raw, work / "data" / raw.name)
    # the eval suite's files where dvc.yaml's eval stage expects them (eval.data_dir's default, a dependency)
    shutil.copytree(bundle_dir / "data", work / "eval" / "data")
    sets = [f"model.id={base}", "data.id=null", f"data.local_path=data/{raw.name}", *overrides]
    subprocess.run([sys.executable, "-m", "finetune", "use", recipe, *sets], cwd=work, env=env, check=True)
    if use_dvc:
        dvc = [sys.executable, "-m", "dvc"]
        subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=work, env=env, check=True)
        settings = {"core.analytics": "false", "core.check_update": "false"}  # offline: nothing to send or fetch
        for key, value in (settings | ({"cache.type": cache_type} if cache_type else {})).items():
            subprocess.run([*dvc, "config", key, value], cwd=work, env=env, check=True)


def _project_cache_type() -> str | None:
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    return config.get("cache", "type", fallback="").strip('"') or None


def stage_numbers(stage: str, work: Path) -> dict:
    """The stage's own figures from the files it wrote (train speed, GGUF sizes, eval seconds)."""
    def load(rel: str) -> dict:
        path = work / rel
        return json.loads(path.read_text()) if path.is_file() else {}

    if stage == "train":
        timing = load("metrics/timing/train.json")
        return {k: timing.get(k) for k in ("train_seconds", "tokens_per_second", "peak_memory_gib")}
    if stage == "quantize":
        return {t: {k: m.get(k) for k in ("size_mib", "seconds", "perplexity_ratio", "greedy_matched", "greedy_ties")
                    if k in m} for t in ("f16", "q8_0", "q4_k_m") if (m := load(f"metrics/quantize/{t}.json"))}
    if stage == "eval":
        out = {}
        for path in sorted((work / "eval" / "metrics").glob("*.json")):
            entry = json.loads(path.read_text())
            he = entry.get("humaneval") or {}
            out[path.stem] = {"seconds": entry.get("seconds"),
                              "humaneval_generation_s": he.get("generation_seconds"), "device": he.get("device"),
                              "pass@1": he.get("pass@1"),
                              "lm_eval": {t: r.get("acc", r.get("exact_match_strict_match"))
                                          for t, r in (entry.get("lm_eval") or {}).get("results", {}).items()
                                          if t in ("ft_arc_challenge", "ft_mmlu", "ft_gsm8k")}}
        return out
    if stage == "heldout":
        return load("metrics/heldout.json")
    return {}


def stage_env(bin_dir: Path, work: Path) -> dict:
    """Offline, ``python`` = this interpreter (dvc.yaml's commands call ``python``), the workspace's src first."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "python"  # a script, not a link: a link would lose a virtualenv's site-packages
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    path = os.environ.get("PYTHONPATH", "")
    # FINETUNE_VENV: bin/project-python (dvc.yaml's interpreter) runs <FINETUNE_VENV>/bin/python, the shim
    return os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": f"{work / 'src'}:{path}".rstrip(":"),
                         "FINETUNE_VENV": str(bin_dir.parent),
                         "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                         "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}


def gpu_label() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name(0).removeprefix("NVIDIA ").split()[0].lower()


def main_run(args: argparse.Namespace) -> None:
    import importlib.util

    import torch

    work, out, bundle_dir = Path(args.work).resolve(), Path(args.out).resolve(), Path(args.bundle).resolve()
    if work.exists():
        shutil.rmtree(work)
    logs = Path(args.logs).resolve() if args.logs else work.parent / f"{work.name}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    use_dvc = importlib.util.find_spec("dvc") is not None and not args.no_dvc
    cuda = torch.cuda.is_available()
    shape, _ = RECIPES[args.recipe]
    overrides = (TINY + ([] if cuda else TINY_CPU) if args.tiny else []) + list(args.set)
    common = {"recipe": args.recipe, "gpu": gpu_label(), "tiny": args.tiny, "dvc": use_dvc}
    if args.gpu_memory_gib:
        common["gpu_memory_cap_gib"] = args.gpu_memory_gib
    free = shutil.disk_usage(work.parent if work.parent.exists() else "/").free
    print(json.dumps(common | {"work": str(work), "free_disk_gib": round(free / 2**30, 1),
                               "torch": torch.__version__, "cuda": cuda}), flush=True)

    env = stage_env(logs / "bin", work)
    if args.gpu_memory_gib:
        env[gpu_memory.ENV] = str(args.gpu_memory_gib)
    # the eval stage refuses to run model-written code unconfined: find out now, not after train and quantize
    probe = ("from finetune import sandbox\nfrom finetune.core.errors import FinetuneError\ntry:\n"
             "    print('sandbox:', sandbox.isolation())\n"
             "except FinetuneError as err:\n    raise SystemExit(f'error: {err}')")
    check = [sys.executable, "-c", probe]
    if subprocess.run(check, env=env | {"PYTHONPATH": f"{ROOT / 'src'}:{env['PYTHONPATH']}"}).returncode != 0:
        raise SystemExit(2)
    start = time.perf_counter()
    base = Path(args.base or work.parent / f"{work.name}-base-{shape}{'-tiny' if args.tiny else ''}").resolve()
    build = {"layers": 2 if args.tiny else SHAPES[shape]["num_hidden_layers"],
             "device": "cuda" if cuda else "cpu", "overrides": TINY_SHAPE if args.tiny else None}
    build_checkpoint(shape, bundle_dir, base, **build)
    append_row(out, common | {"stage": "random-weights", "pipeline": False, "model": str(base), "shape": shape,
                              "tokenizer": TOKENIZER[shape], "seconds": round(time.perf_counter() - start, 1),
                              "disk_gib": round(disk_bytes(base) / 2**30, 2)})
    cache_type = args.cache_type or _project_cache_type()
    workspace(work, args.recipe, base, bundle_dir, overrides, env, use_dvc,
              None if cache_type == "default" else cache_type)

    stages = yaml.safe_load((work / "dvc.yaml").read_text())["stages"]
    rows, before = [], disk_bytes(work)
    for name in [*STAGES, "report"]:
        if name == "quantize" and args.wait_for and not wait_for(Path(args.wait_for)):
            break
        if name == "report":
            cmd: list[str] | str = [sys.executable, "-m", "finetune", "report", "--workspace"]
        elif use_dvc:
            cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", name]
        else:
            cmd = stages[name]["cmd"]
        print(f"[{name}] start: {cmd if isinstance(cmd, str) else ' '.join(cmd)}", flush=True)
        row = run_stage(name, cmd, work, env, logs / f"{name}.log")
        after = disk_bytes(work)
        outs = [work / (o if isinstance(o, str) else next(iter(o))) for o in stages.get(name, {}).get("outs", [])]
        row = common | {"stage": name} | row | {"disk_gib": round((after - before) / 2**30, 2), "ok": row["rc"] == 0,
                                               "outs_gib": round(sum(apparent_bytes(o) for o in outs) / 2**30, 2),
                                               **stage_numbers(name, work)}
        before = after
        append_row(out, row)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if row["rc"] != 0:
            print(f"[{name}] failed (rc {row['rc']}); the end of {logs / (name + '.log')}:", flush=True)
            print(subprocess.run(["tail", "-n", "25", str(logs / f"{name}.log")], capture_output=True,
                                 text=True).stdout, flush=True)
            break
    gpus = [r["peak_gpu_gib"] for r in rows if r.get("peak_gpu_gib") is not None]
    total = common | {"stage": "total", "stages": [r["stage"] for r in rows], "ok": all(r["ok"] for r in rows)
                      and len(rows) == len(STAGES) + 1,
                      "seconds": round(sum(r["seconds"] for r in rows), 1),
                      "peak_gpu_gib": max(gpus) if gpus else None,
                      "peak_rss_gib": max((r["peak_rss_gib"] for r in rows), default=0),
                      "disk_gib": round(disk_bytes(work) / 2**30, 2),
                      "outs_gib": round(sum(r.get("outs_gib", 0) for r in rows), 2),
                      "cache_type": cache_type if use_dvc else None,
                      "files_linked_to_cache": linked_files(work)}
    append_row(out, total)
    print(json.dumps(total), flush=True)


# ------------------------------------------------------------------------------------------ table
def table(paths: list[Path]) -> str:
    """The README table (run x stage x time x memory x disk) from the JSONL files."""
    def num(value, fmt="{:.1f}"):
        return "-" if value is None else fmt.format(value)

    lines = ["| run | recipe | stage | time | peak GPU GiB | peak RSS GiB | disk GiB | outputs GiB | ok |",
             "|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if not row.get("pipeline", True):
                continue
            secs = row["seconds"]
            when = f"{secs:.0f} s" if secs < 120 else f"{secs / 60:.1f} min"
            name = f"**{row['stage']}**" if row["stage"] == "total" else row["stage"]
            lines.append(f"| {path.name} | {row['recipe']} | {name} | {when} | {num(row.get('peak_gpu_gib'))} | "
                         f"{num(row.get('peak_rss_gib'))} | {num(row.get('disk_gib'))} | {num(row.get('outs_gib'))} | "
                         f"{'yes' if row.get('ok') else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bundle", help="tokenizers + data for an offline GPU host (CPU side)")
    b.add_argument("--vocab-dir", required=True, help="llama.cpp's models/ folder (ggml-vocab-llama-*.gguf)")
    b.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    b.add_argument("--out", required=True)
    b.add_argument("--recipes", default="llama3-alpaca,llama2-guanaco")
    r = sub.add_parser("run", help="the pipeline, stage by stage, measured")
    r.add_argument("--bundle", required=True)
    r.add_argument("--recipe", default="llama3-alpaca", choices=sorted(RECIPES))
    r.add_argument("--work", required=True, help="a fresh DVC workspace is made here (an old one is removed)")
    r.add_argument("--out", required=True, help="JSONL, one line per stage (appended)")
    r.add_argument("--base", default=None, help="where the random-weight model goes (default: beside --work)")
    r.add_argument("--logs", default=None, help="stage logs (default: <work>-logs)")
    r.add_argument("--tiny", action="store_true", help="2 layers, a few steps and documents: a plumbing check")
    r.add_argument("--no-dvc", action="store_true", help="run dvc.yaml's commands directly, without DVC")
    r.add_argument("--cache-type", default=None, help="DVC cache.type (default: the project's .dvc/config; "
                   "'default': DVC's own, reflink,copy) to compare the disk used")
    r.add_argument("--set", action="append", default=[], help="extra KEY=VALUE override (as dvc exp run -S)")
    r.add_argument("--gpu-memory-gib", type=float, default=None, help="every stage as if the GPU had this much "
                   "memory (FINETUNE_GPU_MEMORY_GIB; e.g. 22 for a 24 GB card); NVML's peak still counts the card")
    r.add_argument("--wait-for", default=None, help="before quantize, wait for this file (a llama.cpp build "
                   "running beside writes `rc=0 ...` when done)")
    t = sub.add_parser("table", help="markdown table from JSONL files")
    t.add_argument("jsonl", nargs="+")
    args = parser.parse_args()
    if args.cmd == "bundle":
        bundle(Path(args.vocab_dir), Path(args.shared), Path(args.out), args.recipes.split(","))
    elif args.cmd == "run":
        main_run(args)
    else:
        print(table([Path(p) for p in args.jsonl]), end="")


if __name__ == "__main__":
    main()
