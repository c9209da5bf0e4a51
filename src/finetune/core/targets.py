"""A model to run: the recipe's base, the train stage's adapter on it, a merged model, or a GGUF file.

The eval and heldout stages run the ones the pipeline made (:func:`stage_targets`); chat, generate and
serve turn ``--model`` into one (:func:`resolve`). HF weights load through :meth:`Target.spec`, a GGUF
through llama.cpp (:mod:`finetune.core.gguf`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from finetune.core.errors import FinetuneError
from finetune.core.gguf import gguf_name, gguf_type
from finetune.core.recipe import ModelSpec, Recipe

Kind = Literal["base", "adapter", "merged", "gguf"]


@dataclass(frozen=True)
class Target:
    """One model: its kind, the name results and messages give it, and where it is."""

    kind: Kind
    name: str  # eval's variant (base, finetuned, gguf-q8_0), chat's label (merged, gguf:<file>, a path)
    path: Path | None = None  # the adapter or merged folder, or the GGUF file; None: the recipe's base

    @property
    def backend(self) -> Literal["hf", "gguf"]:
        """transformers for HF weights, llama.cpp for a GGUF file."""
        return "gguf" if self.kind == "gguf" else "hf"

    def spec(self, base: ModelSpec) -> ModelSpec:
        """What loads its weights through transformers (a GGUF dequantized); an adapter's base is ``base``."""
        if self.kind == "merged":
            return ModelSpec(id=str(self.path), task=base.task, num_labels=base.num_labels)
        if self.kind == "gguf":
            return ModelSpec(id=str(self.path.parent), gguf_file=self.path.name)
        return base


def stage_targets(recipe: Recipe, merged_dir: str | Path, gguf_dir: str | Path | None = None) -> list[Target]:
    """base, finetuned (the merge stage's folder), then one per GGUF file the quantize stage wrote in
    ``gguf_dir`` (those of ``eval.gguf_types``; None: every one)."""
    targets = [Target("base", "base"), Target("merged", "finetuned", Path(merged_dir))]
    for path in sorted(Path(gguf_dir).glob("*.gguf")) if gguf_dir is not None else []:
        qtype = gguf_type(path)
        if recipe.eval.gguf_types is None or qtype in recipe.eval.gguf_types:
            targets.append(Target("gguf", f"gguf-{qtype}", path))
    return targets


def resolve(choice: str, recipe: Recipe, outputs_dir: str | Path = "outputs",
            models_dir: str | Path = "models") -> Target:
    """Turn ``--model`` into a Target; a one-line error says what is missing and how to make it."""
    outputs_dir, models_dir = Path(outputs_dir), Path(models_dir)
    if choice == "base":
        return Target("base", "base")
    if choice == "gguf" or choice.startswith("gguf:") or choice.endswith(".gguf"):
        path = _gguf_for(choice if choice.startswith("gguf") else f"gguf:{choice}", recipe, models_dir)
        return Target("gguf", f"gguf:{path.name}", path)
    if choice in ("adapter", "merged"):
        path = outputs_dir / choice
        marker = "adapter_config.json" if choice == "adapter" else "config.json"
        if not (path / marker).is_file():
            stage = "train" if choice == "adapter" else "merge"
            raise FinetuneError(f"--model {choice}: {path / marker} missing; run `dvc repro {stage}` "
                                "(or `dvc exp apply <exp>` to restore an experiment's outputs)")
        return Target(choice, choice, path)
    path = Path(choice)
    if (path / "adapter_config.json").is_file():
        return Target("adapter", str(path), path)
    if (path / "config.json").is_file():
        return Target("merged", str(path), path)
    raise FinetuneError(
        f"--model {choice}: not adapter, merged, base, gguf[:<type>|:<file>.gguf], "
        "nor a folder with config.json / adapter_config.json"
    )


def _gguf_for(choice: str, recipe: Recipe, models_dir: Path) -> Path:
    qtype = choice.partition(":")[2]
    if qtype.endswith(".gguf") or "/" in qtype:
        path = Path(qtype)
        if not path.is_file():
            raise FinetuneError(f"--model {choice}: {path} does not exist")
        return path
    types = [qtype] if qtype else list(recipe.quantize.types)
    for t in types:
        path = models_dir / gguf_name(recipe.name, t)
        if path.is_file():
            return path
    have = sorted(p.name for p in models_dir.glob("*.gguf")) if models_dir.is_dir() else []
    want = models_dir / gguf_name(recipe.name, types[0])
    hint = f"present: {', '.join(have)}" if have else "run `dvc repro quantize` (or `finetune quantize`) first"
    raise FinetuneError(f"--model {choice}: {want} not found; {hint}")
