"""The recipe schema: one YAML file (or the composed ``params.yaml``) validated by pydantic.

Every stage reads its sections from the validated :class:`Recipe`. Errors are reported as one
line naming the file, the key and what would fix it (the nearest valid key for a misspelling).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from finetune.core.errors import FinetuneError, one_line

DType = Literal["float32", "float16", "bfloat16"]
Threads = Annotated[int, Field(ge=1)] | Literal["auto"]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's or taskset's limit)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return max(1, os.cpu_count() or 1)


def resolve_threads(value: int | str) -> int:
    """llama.cpp threads: a number as given; ``auto``: every core available to this process."""
    return available_cores() if value == "auto" else int(value)


class _Section(BaseModel):
    # strict: `r: true` is not 1 and "16" is not 16 (YAML already types every value); finite: no inf/nan
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ModelSpec(_Section):
    """Where the base model comes from and what head it gets."""

    id: str = Field(description="Hub id (owner/name), a local folder, or pypi:<package>[/subdir]")
    revision: str | None = Field(None, description="Hub revision (commit sha, tag or branch)")
    gguf_file: str | None = Field(None, description="GGUF file inside `id` to load and dequantize")
    task: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    num_labels: int = Field(2, ge=2)
    trust_remote_code: bool = False
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's")


class DataSpec(_Section):
    """Where the raw data comes from, how rows are formatted, and how they are split."""

    id: str | None = Field(None, description="Hub dataset id, used when local_path is not set")
    revision: str | None = None
    split: str = "train"
    local_path: str | None = Field(None, description="Local file or folder (json, jsonl, parquet, csv)")
    test_path: str | None = Field(None, description="Separate held-out file; else split from the data")
    format: Literal["alpaca", "llama2_inst", "chat", "messages", "prompt_completion", "text_label"]
    fields: dict[str, str] = Field(default_factory=dict, description="Rename raw fields, e.g. {output: response}")
    system_prompt: str | None = None
    max_rows: int | None = Field(None, ge=1)
    eval_size: float = Field(0.0, ge=0, description="Fraction (<1) or count (>=1) held out for eval loss")
    test_size: float = Field(0.0, ge=0, description="Fraction (<1) or count (>=1) held out as test split")
    seed: int = 42
    on_bad_row: Literal["fail", "skip"] = "fail"
    max_length: int | None = Field(None, ge=8, description="Token limit per formatted row; None: no check")
    on_too_long: Literal["fail", "truncate", "drop"] = Field(
        "fail", description="A row over data.max_length: fail the stage, cut it (counted), or drop it (counted)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if not self.id and not self.local_path:
            raise ValueError("data: set `id` (hub dataset) or `local_path` (a local file)")
        return self


class LoraSpec(_Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"


class QuantSpec(_Section):
    mode: Literal["none", "4bit"] = "none"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = False
    compute_dtype: DType = "bfloat16"
    quant_storage: Literal["uint8", "float16", "bfloat16", "float32"] = Field(
        "uint8", description="bnb_4bit_quant_storage: FSDP shards only float tensors, so FSDP+QLoRA needs a float type"
    )


class TrainSpec(_Section):
    seed: int = 42
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int = Field(0, ge=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="-1: run `epochs`; else stop after this many steps")
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(512, ge=8)
    packing: bool | Literal["auto"] = Field(
        "auto", description="Pack whole rows into max_length bins, padding-free, position ids restarting per row "
        "(attention never crosses rows); auto: on with CUDA unless group_by_length"
    )
    group_by_length: bool = False
    optimizer: str = "adamw_torch"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    checkpoint_layers: int | None = Field(
        None, ge=1, description="With gradient_checkpointing: how many decoder layers recompute their activations "
        "in backward, spread evenly (None: all); the others keep them, which gives memory back for speed"
    )
    fused_lora: bool = Field(
        True, description="Add the LoRA update inside the adapter's matmul (finetune.training.fused_lora); "
        "false: PEFT's forward"
    )
    fused_lora_groups: bool = Field(
        False, description="With fused_lora: q/k/v and gate/up, which read the same input, run as one autograd "
        "node each: one LoRA A matmul, input gradients added inside the GEMMs (finetune.training.fused_lora); not "
        "with compile. Off until measured on a GPU"
    )
    offload_activations: bool = Field(
        False, description="With gradient_checkpointing: the input each checkpointed layer keeps for its recompute "
        "waits in pinned host memory until backward, copied on a side CUDA stream (finetune.training.offload; "
        "Unsloth's offloaded checkpointing): 2*hidden bytes per token and layer back in bf16; a no-op on CPU. "
        "Off until measured on a GPU"
    )
    compile: bool = Field(
        False, description="Regional torch.compile: each decoder layer compiled with dynamic shapes, not the whole "
        "model (finetune.training.regional_compile); on CPU it needs a C++ compiler. Off until measured on a GPU"
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    logging_steps: int = Field(5, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="Eval-loss interval; None: at the end only")
    threads: int | None = Field(None, ge=1, description="CPU threads (torch.set_num_threads)")
    liger: Literal["auto", "on", "off"] = Field(
        "auto", description="Liger kernels (RMSNorm, SwiGLU, RoPE); auto: on with CUDA when liger-kernel imports"
    )
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps; a killed run resumes from the last one")
    attention: Literal["auto", "sdpa", "eager", "flex_attention", "varlen"] = Field(
        "auto", description="Attention kernel (attn_implementation). varlen: PyTorch's variable-length flash "
        "attention over packed documents (CUDA). auto: varlen when packing on CUDA, else the model's default (sdpa)"
    )

    speed: Literal["tutorial", "max"] = Field(
        "tutorial", description="tutorial: train as the recipe's tutorial did; max: the same number of tokens at full "
        "speed (packed rows, varlen attention, Liger, fused LoRA, memory_budget_gib auto; max_steps rescaled to the "
        "tutorial's tokens: finetune.training.speed)"
    )
    memory_budget_gib: float | Literal["auto"] | None = Field(
        None, description="Plan rows per forward (the same rows per optimizer step), checkpoint_layers and offload "
        "at start so the run fits this much memory at the best estimated speed (finetune.training.memory); auto: "
        "the GPU's free memory (no planning without a GPU); null: the settings as written"
    )

    @model_validator(mode="after")
    def _levers(self) -> TrainSpec:
        if isinstance(self.memory_budget_gib, float) and not (0 < self.memory_budget_gib < 1e6):
            raise ValueError(f"train.memory_budget_gib is {self.memory_budget_gib}; give a size in GiB above 0 "
                             "(e.g. 24), auto (the GPU's free memory) or null")
        if self.checkpoint_layers is not None and not self.gradient_checkpointing:
            raise ValueError(f"train.checkpoint_layers is {self.checkpoint_layers} but train.gradient_checkpointing "
                             "is false; set gradient_checkpointing: true or checkpoint_layers: null")
        if self.offload_activations and not self.gradient_checkpointing:
            raise ValueError("train.offload_activations is true but train.gradient_checkpointing is false (it moves "
                             "what checkpointed layers keep); set gradient_checkpointing: true or "
                             "offload_activations: false")
        if self.fused_lora_groups and not self.fused_lora:
            raise ValueError("train.fused_lora_groups is true but train.fused_lora is false (the groups share the "
                             "fused forward's first matmul); set fused_lora: true or fused_lora_groups: false")
        if self.fused_lora_groups and self.compile:
            raise ValueError("train.fused_lora_groups and train.compile are both true: the compiled layers fuse "
                             "their matmuls' neighbours themselves and cannot trace the groups' shared product; "
                             "set one of them false")
        if self.packing is True and self.group_by_length:
            raise ValueError("train.packing and train.group_by_length are both true: packing already bins rows "
                             "by length; set group_by_length: false")
        return self


class DistributedSpec(_Section):
    """Multi-process training through `accelerate launch` (train.batch_size is per process)."""

    mode: Literal["none", "ddp", "fsdp"] = Field("none", description="none: one process; ddp or fsdp: accelerate")
    num_processes: int = Field(1, ge=1, description="Processes (one per GPU); >1 needs mode ddp or fsdp")
    config_file: str | None = Field(
        None, description="accelerate config; None: recipes/accelerate/<mode>.yaml (fsdp_qlora.yaml for 4-bit)"
    )
    main_process_port: int | None = Field(None, ge=1, le=65535, description="None: a free port")

    @model_validator(mode="after")
    def _processes_match_mode(self) -> DistributedSpec:
        if self.mode == "none" and self.num_processes > 1:
            raise ValueError("distributed.num_processes > 1 needs distributed.mode ddp or fsdp")
        if self.mode != "none" and self.num_processes < 2:
            raise ValueError(f"distributed.mode {self.mode} needs distributed.num_processes >= 2 (or mode: none)")
        return self


class MergeSpec(_Section):
    dtype: DType = "float16"


QuantType = Literal["f16", "q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_k_s", "q4_0", "q3_k_m", "q2_k"]


class QuantizeSpec(_Section):
    """GGUF export: which llama.cpp types to write, and how hard to check them."""

    types: list[QuantType] = Field(default_factory=lambda: ["f16", "q8_0", "q4_k_m"], min_length=1)
    verify_prompts: int = Field(8, ge=1, description="Held-out prompts for the greedy token-match check")
    verify_tokens: int = Field(32, ge=1, description="New tokens generated per prompt in the checks")
    ppl_rows: int = Field(64, ge=1, description="Held-out rows scored for perplexity")
    tie_tolerance: float = Field(
        0.01, ge=0,
        description="f16 greedy check: a parting where the HF logits of the two tokens are this close is a tie",
    )
    threads: Threads = Field("auto", description="llama.cpp threads; auto: the cores available to the process")

    @property
    def cpu_threads(self) -> int:
        return resolve_threads(self.threads)


class EvalSpec(_Section):
    """Held-out exact match (stage heldout) and benchmarks (stage eval) for base, tuned and GGUF."""

    limit: int | None = Field(None, ge=1, description="Score at most this many held-out rows")
    max_new_tokens: int = Field(32, ge=1)
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="HF generation and lm-eval batch; auto: as large as fits on a GPU "
        "(lm-eval's own search), 16 on the CPU"
    )
    tasks: list[str] = Field(default_factory=lambda: ["ft_arc_easy"], description="lm-eval tasks")
    task_limit: int | None = Field(None, ge=1, description="Documents per lm-eval task (None: all)")
    task_limits: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict, description="The first N documents of the named tasks (a group: of each of its "
        "tasks), e.g. {ft_gsm8k: 250}; the others get task_limit"
    )
    num_fewshot: int | None = Field(None, ge=0, description="None: each task's own default")
    data_dir: str = Field("eval/data", description="Root of the local benchmark files (shipped in eval/data)")
    humaneval_limit: int | None = Field(None, ge=0, description="HumanEval problems (None: all 164; 0: skip)")
    humaneval_prompt: Literal["completion", "chat"] = "completion"
    humaneval_max_new_tokens: int = Field(384, ge=1)
    humaneval_timeout: float = Field(10.0, gt=0)
    humaneval_samples: int = Field(1, ge=1, description="Completions per problem; >1 samples for pass@k")
    humaneval_temperature: float = Field(0.8, gt=0, description="Sampling temperature when samples > 1")
    sandbox: Literal["bubblewrap", "rlimits-only"] = Field(
        "bubblewrap", description="Where model-written code runs (HumanEval, MBPP): bubblewrap or refuse; "
        "rlimits-only runs it unconfined and is for machines where that is acceptable")
    gguf_types: list[str] | None = Field(None, description="GGUF types to score (None: every file)")
    seed: int = 1234
    threads: Threads = Field("auto", description="llama.cpp threads; auto: the cores available to the process")

    @property
    def cpu_threads(self) -> int:
        return resolve_threads(self.threads)

    @model_validator(mode="after")
    def _one_limit(self) -> EvalSpec:
        if self.task_limits and self.task_limit is not None:
            raise ValueError("eval.task_limit and eval.task_limits are both set: lm-eval takes one kind of limit; "
                             "set task_limit: null or task_limits: {}")
        return self


class Recipe(_Section):
    """A whole recipe: what `params.yaml` holds after composition."""

    name: str
    description: str = ""
    model: ModelSpec
    data: DataSpec
    lora: LoraSpec = LoraSpec()
    quant: QuantSpec = QuantSpec()
    train: TrainSpec = TrainSpec()
    distributed: DistributedSpec = DistributedSpec()
    merge: MergeSpec = MergeSpec()
    quantize: QuantizeSpec = QuantizeSpec()
    eval: EvalSpec = EvalSpec()

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.model.task == "sequence_classification" and self.data.format != "text_label":
            raise ValueError("model.task sequence_classification needs data.format text_label")
        if self.model.task == "causal_lm" and self.data.format == "text_label":
            raise ValueError("data.format text_label needs model.task sequence_classification")
        if self.distributed.mode == "fsdp" and self.quant.mode == "4bit" and self.quant.quant_storage == "uint8":
            raise ValueError("distributed.mode fsdp with quant.mode 4bit needs quant.quant_storage bfloat16 "
                             "(FSDP shards only floating-point tensors)")
        return self


# --------------------------------------------------------------------------------------------
# loading and one-line errors


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel]:
    """The pydantic model that owns the key at ``loc`` (for 'did you mean' suggestions)."""
    current: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = current.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            current = ann
        else:
            break
    return current


def format_validation_error(err: ValidationError, source: str) -> str:
    """Turn the first pydantic error into one line: file, dotted key, problem, fix."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc) or "<root>"
    kind = first["type"]
    if kind == "extra_forbidden" and "token" in str(loc[-1]).lower():
        return f"{source}: unknown key '{key}'; never put a hub token in a recipe, export HF_TOKEN instead"
    if kind == "extra_forbidden":
        valid = _field_names(_section_model(loc))
        near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean '{'.'.join([*map(str, loc[:-1]), near[0]])}'?" if near else (
            f"valid keys here: {', '.join(valid)}"
        )
        return f"{source}: unknown key '{key}'; {hint}"
    if kind == "missing":
        return f"{source}: missing required key '{key}'"
    msg = first["msg"]
    if kind == "value_error":  # a model validator's message already names the keys
        return f"{source}: {msg.removeprefix('Value error, ')}"
    got = first.get("input")
    got_s = "a mapping" if isinstance(got, dict) else one_line(repr(got), 80)
    if isinstance(got, bool) and kind in ("int_type", "float_type"):
        msg += " (true/false is a boolean, not a number)"
    elif kind == "finite_number":
        msg += " (inf and nan are refused)"
    return f"{source}: key '{key}' = {got_s}: {msg}"


def parse_recipe(raw: Any, source: str) -> Recipe:
    """Validate a mapping (from YAML) as a Recipe; raise FinetuneError with one line."""
    if not isinstance(raw, dict):
        raise FinetuneError(f"{source}: expected a mapping of recipe keys, got {type(raw).__name__}")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise FinetuneError(format_validation_error(err, source)) from None


MAX_NODES = 100_000  # YAML values after aliases are expanded; a recipe has a few hundred


def _check_nodes(node: yaml.Node, source: Path) -> None:
    """Refuse a duplicate key (naming both lines) and aliases that expand past :data:`MAX_NODES` values.

    PyYAML keeps the last of two equal keys, so a second ``lora:`` block would silently replace the
    first; and ``&a [*b, *b, ...]`` chains grow exponentially ("billion laughs"). Walks the composed
    node graph, counting an aliased node each time it is reached, and stops at the budget.
    """
    budget = MAX_NODES
    stack: list[tuple[yaml.Node, str]] = [(node, "")]
    while stack:
        current, where = stack.pop()
        budget -= 1
        if budget < 0:
            raise FinetuneError(f"{source}: the YAML expands to more than {MAX_NODES} values (aliases that "
                                "repeat aliases); write the values out instead")
        if isinstance(current, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in current.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` overrides on purpose
                    stack.append((value_node, where))
                    continue
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
                line = key_node.start_mark.line + 1
                name = f"{where}.{key}" if where else str(key)
                if key in seen:
                    raise FinetuneError(f"{source}: key '{name}' appears twice (lines {seen[key]} and {line}); "
                                        "YAML would keep only the second: merge them into one")
                seen[key] = line
                stack.append((value_node, name))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(current.value))


def read_yaml(path: Path) -> Any:
    """Read a YAML file strictly (no duplicate keys, no alias bombs), turning errors into one line."""
    if path.is_dir():
        raise FinetuneError(f"{path}: is a folder; give the YAML file (e.g. {path / 'params.yaml'})")
    if not path.is_file():
        raise FinetuneError(f"{path}: file not found")
    try:
        loader = yaml.SafeLoader(path.read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_nodes(node, path)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise FinetuneError(f"{path}: YAML syntax error at {where}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise FinetuneError(f"{path}: not valid YAML ({one_line(str(err), 120)})") from None
    except UnicodeDecodeError as err:
        raise FinetuneError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def load_recipe(path: str | Path) -> Recipe:
    """Load ``params.yaml`` or a recipe file into a validated Recipe."""
    path = Path(path)
    return parse_recipe(read_yaml(path), str(path))


RECIPE_DIR = Path("recipes/recipe")


def recipe_path(name: str, root: Path = Path(".")) -> Path:
    """Path of the shipped recipe ``name``; a clear error lists the known ones."""
    known = sorted(p.stem for p in (root / RECIPE_DIR).glob("*.yaml"))
    if "/" in name or "\\" in name or name.startswith("."):  # a name, never a path out of recipes/recipe/
        raise FinetuneError(f"recipe '{name}': give the name of a file in {root / RECIPE_DIR}, not a path "
                            f"(known recipes: {', '.join(known)})")
    path = root / RECIPE_DIR / f"{name}.yaml"
    if not path.is_file():
        near = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean '{near[0]}'?" if near else f"known recipes: {', '.join(known)}"
        raise FinetuneError(f"unknown recipe '{name}' (no {path}); {hint}")
    return path


def compose_params(name: str, overrides: list[str], root: Path = Path(".")) -> str:
    """The ``params.yaml`` text that ``dvc exp run -S recipe=NAME -S ...`` composes (Hydra), validated.

    Composes in memory (dvc's ``compose_and_dump`` writes the file first) so that an invalid result,
    or a refused key such as a hub token, never reaches the disk. The recipe files are read strictly
    first: Hydra's YAML loader lets aliases expand without limit.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = recipe_path(name, root)
    config_dir = (root / RECIPE_DIR).parent
    read_yaml(config_dir / "config.yaml")
    read_yaml(path)
    secrets = [o.partition("=")[2] for o in overrides if "token" in o.partition("=")[0].lower() and "=" in o]
    source = f"{path} with {' '.join(overrides) or 'no overrides'}"
    for secret in filter(None, secrets):  # an error line must not echo a token either
        source = source.replace(secret, "<hidden>")
    try:
        with initialize_config_dir(str(config_dir.resolve()), version_base=None):
            cfg = compose(config_name="config", overrides=[f"recipe={name}", *overrides])
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        first = str(err).split("\n\n")[0]  # Hydra appends the config search path after a blank line
        for secret in filter(None, secrets):
            first = first.replace(secret, "<hidden>")
        raise FinetuneError(f"{source}: {one_line(first, 240)}; overrides are key=value (+key=value adds a "
                            "key the recipe leaves unset)") from None
    text = OmegaConf.to_yaml(cfg)
    parse_recipe(yaml.safe_load(text), source)
    return text
