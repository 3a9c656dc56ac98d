"""The one recipe schema: every option has a type, a default and a validation error.

A recipe is YAML read into `Recipe`. Unknown keys are errors (``extra="forbid"``) so that a typo
never silently falls back to a default on a 70B run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    Strict,
    field_validator,
    model_validator,
)

EMBEDDED_SMOLLM2 = "embedded:smollm2-135m-instruct"


def _no_bool(value: Any) -> Any:
    """YAML `true` is not a number: pydantic would read it as 1 (`training.steps: true`)."""
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


_NUMBER = BeforeValidator(_no_bool)

# Count-like fields: strict integers (no bools, no 2.0) with an upper bound, so that a typo
# cannot start a million workers or a 2**70 seed reach torch. Floats: finite, no bools.
Count = Annotated[int, Strict(), Field(ge=1, le=10**9)]
NonNegativeCount = Annotated[int, Strict(), Field(ge=0, le=10**9)]
Samples = Annotated[int, Strict(), Field(ge=1, le=10**7)]
BatchSize = Annotated[int, Strict(), Field(ge=1, le=2**16)]
GlobalBatchSize = Annotated[int, Strict(), Field(ge=1, le=2**24)]
Tokens = Annotated[int, Strict(), Field(ge=1, le=2**20)]
LayerNumber = Annotated[int, Strict(), Field(ge=1, le=4096)]
Degree = Annotated[int, Strict(), Field(ge=1, le=1024)]
Seed = Annotated[int, Strict(), Field(ge=0, le=2**32 - 1)]
NonNegativeFloat = Annotated[float, _NUMBER, Field(ge=0.0, allow_inf_nan=False)]
PositiveFloat = Annotated[float, _NUMBER, Field(gt=0.0, allow_inf_nan=False)]
Real = Annotated[float, _NUMBER, Field(allow_inf_nan=False)]
Beta = Annotated[float, _NUMBER, Field(ge=0.0, lt=1.0, allow_inf_nan=False)]
MAX_NAME_LENGTH = 128


def check_chat_template(value: str) -> str:
    """Parse a chat template as transformers compiles it, so a syntax error is a recipe error
    (line named) and not a traceback in the middle of the data pipeline."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
    try:
        env.parse(value)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"not a valid Jinja template: {exc.message} (line {exc.lineno})") from None
    return value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    backbone: str = Field(
        EMBEDDED_SMOLLM2,
        description="A local Hugging Face directory, a hub id (from the local cache when "
        "offline), a .gguf file, or an embedded model name.",
    )
    gguf_file: str | None = Field(None, description="GGUF file inside `backbone` (a directory).")
    revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit) of a hub id."
    )
    trust_remote_code: bool = Field(
        False,
        description="Run the model repository's own Python code (off: only transformers' classes).",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in backward (less memory, about 1/3 more compute).",
    )
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="transformers attention kernel."
    )
    chat_template: str | None = Field(
        None, description="Jinja chat template that replaces the tokenizer's own."
    )

    @field_validator("chat_template")
    @classmethod
    def _template_parses(cls, value: str | None) -> str | None:
        return None if value is None else check_chat_template(value)


class DataSource(Section):
    path: str = Field(
        description="JSON Lines file or folder, a .json array, builtin:polyglot, or a datasets "
        "source."
    )
    format: Literal["auto", "instruction", "alpaca", "sharegpt", "messages"] = Field(
        "auto",
        description="Row layout: instruction/response, alpaca (instruction, input, output), "
        "sharegpt (conversations of from/value), messages (role/content); auto: from the first "
        "row. Conversations train on every assistant turn.",
    )
    language: str | None = Field(None, description="Language of every row without a `lang` field.")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Canonical name (id, lang, instruction, input, response, messages) -> the "
        "source's field name.",
    )
    split: str = Field("train", description="datasets split to read (datasets sources only).")
    limit: Count | None = Field(None, description="Stop after this many valid rows of the source.")

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        known = ("id", "lang", "instruction", "input", "response", "messages")
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown canonical field(s) {unknown}; expected {', '.join(known)}")
        return value


class DataSection(Section):
    train: list[DataSource] = Field(
        default_factory=lambda: [DataSource(path="builtin:polyglot")],
        min_length=1,
        description="Training sources, concatenated.",
    )
    eval: list[DataSource] = Field(
        default_factory=list,
        description="Held-out sources; when empty, `eval_fraction` of the train ids is held out.",
    )
    eval_fraction: Real = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="Without data.eval: fraction of item ids held out, in every language.",
    )
    eval_samples_per_language: Samples = Field(
        32, description="Held-out rows per language for the held-out loss."
    )
    languages: list[str] | None = Field(
        None, description="Keep only these languages (all languages of the data when unset)."
    )
    dominant_language: str = Field(
        "en",
        description="The language the others are aligned to (ShifCon's English); must have rows.",
    )
    max_length: Tokens = Field(
        256,
        description="Tokens per example; longer ones are cut (a row with no response token left is dropped).",
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="error: stop at a malformed row (file:line); skip: skip and count it."
    )
    batching: Literal["bucket", "random"] = Field(
        "bucket", description="bucket: length-bucketed global batches (less padding)."
    )
    system_prompt: str | None = Field(
        None, description="System turn for every prompt (a conversation's own system turn wins)."
    )


class SFTMethod(Section):
    """Plain supervised fine-tuning: the baseline every method is compared against."""

    name: Literal["sft"] = Field("sft", description="Plain supervised fine-tuning.")


class PairSource(Section):
    path: str = Field(
        "train",
        description="train: parallel pairs from the training rows (same id, dominant vs other "
        "language); else a JSONL file/folder of {lang, en, target} rows (e.g. the shared data).",
    )
    limit_per_language: Samples | None = Field(
        None, description="At most this many pairs per language (all when unset)."
    )
    max_length: Tokens = Field(128, description="Tokens per pair sentence; longer ones are cut.")


class ShifConMethod(Section):
    """ShifCon: shift non-dominant languages into the dominant subspace for layers [f, b)."""

    name: Literal["shifcon"] = Field(description="ShifCon (shift + multilingual contrastive loss).")
    band: tuple[LayerNumber, LayerNumber] | Literal["auto"] = Field(
        description="(f, b): shift toward after layer f, back after layer b; 1 <= f < b <= L-1. "
        "auto: chosen by the layer probe (methods/shifcon/probe.py) on the training data before training."
    )
    probe_samples: Samples = Field(
        32, description="band: auto: samples (and parallel pairs) per language for the probe."
    )
    probe_tolerance: NonNegativeFloat = Field(
        0.1, description="band: auto: relative tolerance over the minimum mean distance."
    )
    vector_mode: Literal["precompute", "running"] = Field(
        "precompute",
        description="precompute: language vectors from one pass of the frozen model; running: they keep updating from the unshifted contrastive forwards.",
    )
    vector_samples: Samples = Field(64, description="Samples per language for the vectors.")
    alpha: NonNegativeFloat = Field(
        0.5, description="Weight of the LM loss: total = alpha * LM + beta * MCL."
    )
    beta: NonNegativeFloat = Field(2.0, description="Weight of the contrastive (MCL) loss.")
    tau: PositiveFloat = Field(
        0.05, description="InfoNCE temperature (chosen by measurement: docs/shifcon.md)."
    )
    pooling: Literal["content", "all"] = Field(
        "content",
        description="content: vectors, MCL embeddings, probe and detection average the "
        "instruction's own tokens (no attention sink, no chat template), MCL centred on the "
        "language vectors; all: the original every-token mean (ablation only).",
    )
    shift_positions: Literal["all", "prompt", "none"] = Field(
        "all",
        description="all: every position of a non-dominant sample is shifted (the paper); "
        "prompt: only the prompt (positions without a label in training, the prefilled prompt "
        "in generation), for data whose answers are in the dominant language (x -> en); "
        "none: no shift at all (the contrastive loss alone: an ablation).",
    )
    mcl_batch_size: BatchSize = Field(
        8, ge=2, description="Parallel pairs per micro-batch (InfoNCE)."
    )
    pairs: PairSource = Field(
        default_factory=PairSource, description="Parallel pairs for the contrastive loss."
    )

    @field_validator("band")
    @classmethod
    def _ordered(cls, band: tuple[int, int] | str) -> tuple[int, int] | str:
        if band != "auto" and band[0] >= band[1]:
            raise ValueError(f"need f < b, got f={band[0]}, b={band[1]}")
        return band


class LensPrompts(Section):
    path: str = Field(
        "train",
        description="train: parallel prompts from the training rows (same id); else a JSONL "
        "file/folder of {lang, en, target} rows (e.g. the shared parallel data).",
    )
    count: Samples = Field(200, description="Parallel prompt items, split over languages.")
    max_length: Tokens = Field(128, description="Tokens per prompt; longer ones are cut.")
    batch_size: BatchSize = Field(8, description="Parallel prompt items per micro-batch.")


class LensMethod(Section):
    """Lens: edit the top k layers so target languages move toward English along the
    language-agnostic direction and apart in the language-specific subspace; English kept."""

    name: Literal["lens"] = Field(description="Lens (edit the top layers in language subspaces).")
    top_k: LayerNumber = Field(2, description="Only the top k decoder layers train.")
    retain: NonNegativeFloat = Field(1.0, description="Weight of the English-retention MSE.")
    pull: NonNegativeFloat = Field(1.0, description="Weight of the agnostic-space pull MSE.")
    push_scale: Real = Field(1.0, description="w: target push along delta_X (specific space).")
    lm_weight: NonNegativeFloat = Field(0.0, description="Optional LM loss on the batch.")
    languages: list[str] | None = Field(
        None, description="Target languages (default: every non-dominant run language)."
    )
    prompts: LensPrompts = Field(
        default_factory=LensPrompts, description="Parallel prompts the Lens losses are computed on."
    )


MethodSection = Annotated[SFTMethod | ShifConMethod | LensMethod, Field(discriminator="name")]
METHOD_NAMES = ("sft", "shifcon", "lens")


class TrainingSection(Section):
    steps: Count = Field(100, description="Optimizer steps.")
    global_batch_size: GlobalBatchSize = Field(
        8,
        description="Examples per optimizer step over all data-parallel ranks (micro_batch_size x DP x accumulation).",
    )
    micro_batch_size: BatchSize = Field(1, description="Examples per forward/backward on one rank.")
    lr: PositiveFloat = Field(2e-5, description="Peak learning rate (AdamW).")
    min_lr_ratio: Real = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Final learning rate as a fraction of lr (cosine and linear).",
    )
    warmup_steps: NonNegativeCount = Field(0, description="Linear warm-up steps from 0 to lr.")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after warm-up."
    )
    weight_decay: NonNegativeFloat = Field(0.0, description="AdamW weight decay.")
    betas: tuple[Beta, Beta] = Field(
        (0.9, 0.95), description="AdamW (beta1, beta2), each in [0, 1)."
    )
    grad_clip: NonNegativeFloat = Field(
        1.0, description="Clip the global gradient norm to this (0: no clipping)."
    )
    eval_every: NonNegativeCount = Field(0, description="0: evaluate only before and after.")
    eval_batch_size: BatchSize = Field(8, description="Examples per forward of the held-out loss.")
    log_every: Count = Field(1, description="Log training metrics every N steps (and at the last).")
    seed: Seed = Field(0, description="Seed of data order, initialisation and dropout.")

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainingSection:
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) is larger than steps ({self.steps})"
            )
        return self


class ParallelSection(Section):
    engine: Literal["deepspeed", "megatron"] = Field(
        "deepspeed",
        description="deepspeed: ZeRO data parallelism; megatron: megatron-core tensor/pipeline "
        "parallelism (data, method and tracking sections are the same).",
    )
    zero_stage: Annotated[Literal[0, 1, 2, 3], _NUMBER] = Field(3, description="deepspeed only.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU."
    )
    tensor_parallel: Degree = Field(1, description="megatron: TP size (within a node).")
    pipeline_parallel: Degree = Field(1, description="megatron: pipeline stages.")
    sequence_parallel: bool = Field(
        False, description="megatron, TP > 1: shard norms/activations along the sequence."
    )
    distributed_optimizer: bool = Field(
        False, description="megatron: shard the optimizer state over data-parallel ranks."
    )
    attention: Literal["auto", "local", "transformer_engine"] = Field(
        "auto",
        description="megatron layer spec: transformer_engine (fused attention, CUDA with "
        "Transformer Engine; refused elsewhere), local (megatron-core's unfused attention; CPU "
        "always), auto: transformer_engine where available, else local.",
    )
    offload_optimizer: bool = Field(
        False, description="deepspeed: optimizer state in CPU memory (ZeRO-Offload)."
    )
    offload_params: bool = Field(False, description="deepspeed, ZeRO-3: parameters in CPU memory.")
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="Raw DeepSpeed config merged over the generated one (last word).",
    )


class ClusterSection(Section):
    nodes: Annotated[int, Strict(), Field(ge=1, le=100_000)] = Field(
        1, description="Machines; a local run is one node."
    )
    workers_per_node: Degree = Field(
        1,
        description="Processes per node (one per GPU); >1 without a launcher starts them locally.",
    )
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="auto: GPU when CUDA is available, else CPU."
    )
    cpus_per_worker: PositiveFloat = Field(
        1.0, le=4096, description="Ray: CPUs reserved per worker."
    )
    gpus_per_worker: NonNegativeFloat = Field(
        1.0, le=64, description="Ray: GPUs reserved per worker."
    )
    max_failures: NonNegativeCount = Field(
        0,
        description="Restarts of the worker group after a failure (each resumes from the newest checkpoint).",
    )
    launcher: Literal["auto", "local", "ray"] = Field(
        "auto",
        description="Who starts the workers. auto: Ray Train when a Ray cluster is known "
        "(RAY_ADDRESS, or inside a Ray job), else the local elastic agent (or this process); "
        "local: never Ray; ray: always Ray (a local Ray instance when no address is known).",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="Ray placement-group strategy for the worker bundles (PACK fills a node's "
        "GPUs before the next node, which keeps ranks of a node contiguous).",
    )

    @property
    def world_size(self) -> int:
        return self.nodes * self.workers_per_node


class TrackingSection(Section):
    enabled: bool = Field(True, description="Log to MLflow (off: nothing is logged).")
    tracking_uri: str | None = Field(
        None, description="MLflow server or store; default: MLFLOW_TRACKING_URI, else ./mlflow.db"
    )
    experiment: str = Field("polyshift", description="MLflow experiment name.")
    run_name: str | None = Field(None, description="MLflow run name (default: the recipe name).")
    registered_model_name: str | None = Field(
        None,
        description="Register the export under this model name (unset: logged, not registered).",
    )
    log_system_metrics: bool = Field(
        True, description="CPU, memory and GPU usage as system/ metrics."
    )
    log_model: bool = Field(True, description="Log the export as an MLflow model after training.")


class CheckpointSection(Section):
    every: NonNegativeCount = Field(0, description="0: only at the end of training.")
    keep_last: Count = Field(2, description="Complete checkpoints kept; older ones are deleted.")
    resume: bool = Field(True, description="Resume from the newest checkpoint of the run dir.")
    export: bool = Field(
        True, description="Write <run dir>/export (a Hugging Face directory) after training."
    )


EVAL_TASKS = ("xcopa", "mgsm", "bitext", "ppl")
EvalTask = Literal["xcopa", "mgsm", "bitext", "ppl"]


class EvalSection(Section):
    """Benchmarks (docs/methods.md "Evaluation formats") run on the training engine after training;
    also the options of ``python -m launcher.evaluate``, so a recipe and the CLI share one definition.
    No tasks (the default): nothing runs."""

    tasks: list[EvalTask] = Field(
        default_factory=list,
        description="xcopa (log-likelihood multiple choice), mgsm (generation, numeric answer), "
        "bitext (retrieval per layer), ppl (perplexity); empty: no evaluation.",
    )
    languages: list[str] | None = Field(
        None, min_length=1, description="Benchmark languages; default: the run's languages."
    )
    data_dir: Path | None = Field(
        None,
        description="Shared data folder; default: $POLYSHIFT_SHARED_DATA, else ../shared/data.",
    )
    files: dict[EvalTask, str] = Field(
        default_factory=dict,
        description="Per task, a path pattern with {lang} replacing the data_dir layout, e.g. "
        "mgsm: ../shared/data/mgsm/{lang}.jsonl.",
    )
    limit: Count | None = Field(None, description="First N rows per language and task.")
    batch_size: BatchSize = Field(8, description="Rows per forward.")
    max_new_tokens: Tokens = Field(256, description="mgsm: greedy tokens per answer.")
    max_length: Tokens | None = Field(
        None, description="Longest scored sequence (cut on the left); default: the model's."
    )
    mgsm_template: str = Field("{question}", description="mgsm prompt; must hold {question}.")
    chat: bool = Field(True, description="Chat-format generation prompts (the training format).")
    system_prompt: str | None = Field(
        None, description="Generation system prompt; after training: data.system_prompt if unset."
    )
    shift: bool = Field(True, description="ShifCon: score with the per-language shift on.")
    pivot: str = Field("en", description="bitext/ppl: the language parallel texts pair with.")

    @field_validator("files")
    @classmethod
    def _lang_pattern(cls, value: dict[str, str]) -> dict[str, str]:
        for task, pattern in value.items():
            if "{lang}" not in pattern:
                raise ValueError(f"{task}: {pattern!r} must contain {{lang}}")
        return value

    @field_validator("mgsm_template")
    @classmethod
    def _has_question(cls, value: str) -> str:
        if "{question}" not in value:
            raise ValueError("must contain {question}")
        try:
            value.format(question="")
        except (KeyError, IndexError, ValueError):
            raise ValueError("only {question} may be a placeholder (double other braces)") from None
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.tasks)


LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraSection(Section):
    """LoRA adapters through peft (model/lora.py): the backbone is frozen and only the adapters
    train; the export holds the merged model and the adapter. Deepspeed engine only."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of every weight.")
    rank: PositiveInt = Field(16, description="r: the adapters' inner dimension.")
    alpha: PositiveFloat = Field(32.0, description="Scale alpha: the update is alpha/r * B A.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapters' input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: list(LORA_DEFAULT_TARGETS),
        min_length=1,
        description="Linear module names that get adapters (peft target_modules), or "
        "all-linear (every linear layer but the LM head).",
    )
    layers: list[PositiveInt] | None = Field(
        None,
        min_length=1,
        description="1-based decoder layer numbers that get adapters (the numbering of "
        "method.band; peft's layers_to_transform is 0-based: layer l here is l-1 there); "
        "unset: every layer.",
    )
    rslora: bool = Field(
        False, description="Rank-stabilised scale alpha/sqrt(r) (peft use_rslora)."
    )
    quantize: Literal["none", "nf4"] = Field(
        "none",
        description="nf4: a QLoRA-style 4-bit frozen base, not built yet: refused before the "
        "run (it needs bitsandbytes on CUDA and a 4-bit ZeRO-3 load); none: the base in the "
        "run's precision.",
    )

    @field_validator("layers")
    @classmethod
    def _distinct(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"layer numbers repeat: {value}")
        return None if value is None else sorted(value)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Recipe(Section):
    name: str = Field(
        description="Run name; the run directory is <output_dir>/<name>.",
        max_length=MAX_NAME_LENGTH,
    )
    output_dir: str = Field(
        "runs", min_length=1, description="Folder that holds the run directories."
    )
    model: ModelSection = Field(
        default_factory=ModelSection, description="The backbone and how it is loaded."
    )
    lora: LoraSection = Field(
        default_factory=LoraSection,
        description="Parameter-efficient training with LoRA adapters (off by default).",
    )
    data: DataSection = Field(
        default_factory=DataSection, description="Training and held-out data."
    )
    method: MethodSection = Field(
        default_factory=SFTMethod,
        description="The training method, chosen by `name`: sft, shifcon or lens.",
    )
    training: TrainingSection = Field(
        default_factory=TrainingSection,
        description="Optimisation: steps, batch sizes, learning-rate schedule, seed.",
    )
    parallel: ParallelSection = Field(
        default_factory=ParallelSection,
        description="Engine and parallel layout (ZeRO stage, TP/PP, precision).",
    )
    cluster: ClusterSection = Field(
        default_factory=ClusterSection, description="Nodes, workers, devices and restarts."
    )
    tracking: TrackingSection = Field(
        default_factory=TrackingSection, description="MLflow tracking (rank 0 only)."
    )
    checkpoint: CheckpointSection = Field(
        default_factory=CheckpointSection, description="Checkpoints, resume and export."
    )
    eval: EvalSection = Field(
        default_factory=EvalSection,
        description="Benchmarks run on the training engine after training.",
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not _NAME.match(value.replace("{method}", "m")):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names a directory)")
        return value

    @field_validator("method", mode="before")
    @classmethod
    def _method_shorthand(cls, value: Any) -> Any:
        """`method: sft` (or `--set method=sft`) means a method with its defaults."""
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _expand_name(self) -> Recipe:
        """`{method}` in the name gives each method its own run dir (and MLflow run name)."""
        if "{method}" in self.name:
            self.name = self.name.replace("{method}", self.method.name)
        return self

    @property
    def data_parallel_size(self) -> int:
        return self.cluster.world_size // (
            self.parallel.tensor_parallel * self.parallel.pipeline_parallel
        )

    @property
    def grad_accum_steps(self) -> int:
        t = self.training
        return t.global_batch_size // (t.micro_batch_size * self.data_parallel_size)

    @model_validator(mode="after")
    def _layout_and_batch(self) -> Recipe:
        world = self.cluster.world_size
        model_parallel = self.parallel.tensor_parallel * self.parallel.pipeline_parallel
        if world % model_parallel:
            raise ValueError(
                f"parallel: tensor_parallel x pipeline_parallel = {model_parallel} does not "
                f"divide the world size {world} (cluster.nodes x cluster.workers_per_node)"
            )
        if self.parallel.engine == "deepspeed" and model_parallel > 1:
            raise ValueError(
                "parallel.tensor_parallel/pipeline_parallel: the deepspeed engine is data-parallel"
                " (ZeRO); tensor or pipeline parallelism needs parallel.engine: megatron"
            )
        # What a method needs from the engine is its registry entry's to say
        # (methods/registry.py `recipe_errors`, checked by the launcher's preflight).
        p = self.parallel
        if p.engine == "megatron" and p.sequence_parallel and p.tensor_parallel == 1:
            raise ValueError("parallel.sequence_parallel: needs tensor_parallel > 1")
        t, dp = self.training, self.data_parallel_size
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ValueError(
                f"training.global_batch_size: {t.global_batch_size} is not divisible by "
                f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp} "
                f"= {t.micro_batch_size * dp}"
            )
        if (
            self.data.languages is not None
            and self.data.dominant_language not in self.data.languages
        ):
            raise ValueError(
                f"data.dominant_language: {self.data.dominant_language!r} is not in "
                f"data.languages {self.data.languages}"
            )
        return self
