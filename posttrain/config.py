"""Job configuration: one YAML file, pydantic models per section, typed dotted overrides.

Every error names the file (or the override) and the full key path, plus the YAML line when known:
    job.yaml:7: train.lr: input should be a valid number, unable to parse string as a number
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import atomic


class ConfigError(ValueError):
    """A job file, an override or an import path is wrong. The message is meant for the user."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------- sections
class LoraConfig(Strict):
    rank: int = Field(16, ge=1, description="LoRA rank r")
    alpha: float = Field(32.0, description="LoRA scaling numerator: updates are scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    # roles, mapped to each family's module names (posttrain/model/families.py); default
    # [attention, mlp] for a verified family, peft's "all-linear" for an unverified one.
    target: list[Literal["attention", "mlp", "head"]] | None = Field(
        None, description="roles `attention`, `mlp`, `head`, mapped to each family's module names (null: [attention, mlp]; "
        "an unverified family: peft's `all-linear`)")
    experts: bool = Field(False, description="MoE: LoRA on the fused expert weights too (peft target_parameters)")
    # escape hatch, peft's own names: "all-linear" or a list of module names (exclusive with target).
    target_modules: str | list[str] | None = Field(
        None, description="escape hatch: peft's own module names or `all-linear`; exclusive with `target` and `experts`")

    @model_validator(mode="after")
    def _one_way_to_target(self):
        if self.target is not None and self.target_modules is not None:
            raise ValueError("give either target (roles: attention, mlp, head) or target_modules (peft module names), not both")
        if self.experts and self.target_modules is not None:
            raise ValueError("experts: true works with target (roles), not with raw target_modules")
        return self


class ModelConfig(Strict):
    path: str = Field(description="local HF model directory (relative paths start at the current directory) or hub id 'org/name'")
    tokenizer: str | None = Field(None, description="tokenizer dir/id if not the model's own")
    chat_template: str | None = Field(
        None, description="a Jinja chat template, inline or as a file (.jinja/.txt, or a chat_template.json), that replaces or "
        "supplies the tokenizer's own; trained with and saved into the exported tokenizer")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) of a hub id")
    trust_remote_code: bool = Field(False, description="allow the model's own Python code from its directory or the hub")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype; auto: bfloat16 on a GPU that supports it, else float32")
    # auto: flash_attention_2 on CUDA when installed, else posttrain's per-document SDPA
    attn_implementation: str = Field(
        "auto", description="auto: `posttrain_packed` (per-document SDPA) on CPU, `flash_attention_2` on CUDA when installed; "
        "or any transformers backend (`sdpa`, `flex_attention`, ...); with packing, a backend that lets documents see each "
        "other is refused")
    gradient_checkpointing: bool = Field(False, description="activation checkpointing: recompute activations in the backward")
    lora: LoraConfig | None = Field(None, description="train LoRA adapters instead of every weight (null: full fine-tuning)")
    # vocabulary: new tokens are appended; embeddings are resized to a multiple of this.
    add_special_tokens: list[str] = Field([], description="special tokens appended to the vocabulary (never split, skipped when decoding)")
    add_tokens: list[str] = Field([], description="normal tokens appended to the vocabulary (matched whole, decoded as text)")
    add_tokens_file: str | None = Field(None, description="a file of tokens to append, one per line")
    new_embedding_init: Literal["mean", "random"] = Field(
        "mean", description="new embedding rows: the mean of the existing ones (transformers' mean-resizing) or random")
    pad_vocab_to_multiple_of: int = Field(64, ge=1, description="embedding rows rounded up to this multiple")
    # loss outside the model: output-head rows per chunk (null: auto, ~256 MiB of fp32 logits)
    loss_chunk_tokens: int | None = Field(
        None, ge=1, description="output-head rows per chunk of the loss (null: auto, ~256 MiB of fp32 logits: 2048 at a "
        "32k vocabulary, 256 at 152k)")
    allow_unverified: bool = Field(False, description="train an architecture not in the verified family table")
    # MoE router load-balancing loss; null: as in the checkpoint's config.json
    output_router_logits: bool | None = Field(None, description="MoE: router load-balancing loss on or off (null: as in the checkpoint's config.json)")
    router_aux_loss_coef: float | None = Field(None, ge=0.0, description="MoE: weight of the router loss (null: as in the checkpoint's config.json)")


RecordFormat = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"]


class DataSource(Strict):
    path: str = Field(description="a file, glob or folder, local or an fsspec URL (s3://...): JSON Lines (.jsonl/.ndjson/.json, "
                      ".gz/.zst/.bz2/.xz), JSON array (.json), text (.txt), Parquet, Arrow (.arrow), or a folder written by "
                      "datasets' save_to_disk; a folder means every supported file in it, sorted")
    weight: float = Field(1.0, gt=0, description="relative sampling weight among the sources")
    format: RecordFormat | None = Field(None, description="this source's record format (null: data.format)")
    transform: str | None = Field(None, description="import path of fn(record) -> record | None for this source (null: data.transform)")
    sample_by: Literal["line", "document"] = Field("line", description=".txt files: one {text} record per line, or per file")


class DataConfig(Strict):
    sources: list[DataSource] = Field(min_length=1, description="sources mixed by weight, deterministically from train.seed")
    eval_sources: list[DataSource] | None = Field(
        None, min_length=1, description="held-out data evaluated every train.eval_every steps: the same schema, record formats, "
        "transforms, chat template, masking and packing as `sources`; read once in full (one pass, unshuffled, weights "
        "ignored), each worker its share of the records")
    storage_options: dict[str, Any] = Field({}, description="fsspec options, e.g. {endpoint_url: ...} for S3")
    format: RecordFormat = Field("auto", description="record format of every source without its own; auto picks per record: "
                                 "messages | conversations (sharegpt) | instruction (alpaca) | prompt+completion | text")
    transform: str | None = Field(None, description="import path ('pkg.mod:fn' or 'path/to/file.py:fn') of fn(record) -> record | None, "
                                  "applied to every source without its own")
    max_seq_len: int = Field(2048, ge=8, description="tokens per sample; longer ones follow data.overlong")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="a sample over max_seq_len: truncate (keep the start) or drop")
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="a bad record: error (stop with file:line and reason) or skip (count per reason, e.g. invalid_json)")
    unknown_roles: Literal["error", "map", "drop", "keep"] = Field(
        "error", description="a chat message whose role is not system, user, assistant or tool: error (a bad record "
        "naming file:line and the role), map (ShareGPT names: human -> user, gpt/model -> assistant, observation/"
        "function/ipython -> tool, developer -> system; others stay errors), drop (leave such messages out) or keep "
        "(pass it to the chat template as it is, never trained)")
    multi_turn: Literal["single", "expand", "auto"] = Field(
        "single", description="a chat record with several assistant turns: single (one sample that trains every assistant "
        "turn; refused when the chat template rewrites earlier turns, e.g. drops their reasoning or moves the system "
        "prompt), expand (one sample per assistant turn: the conversation up to it rendered as at inference, only that "
        "turn trained; history is repeated, so about N times the tokens for N turns) or auto (single where the "
        "conversation allows it, else expand)")
    chat_template_kwargs: dict[str, Any] = Field(
        {}, description="keyword arguments of every chat template render, as the serving engine passes them (e.g. "
        "{enable_thinking: false} for answers without reasoning on Qwen3 or Nemotron-3 templates)")
    packing: bool = Field(True, description="pack documents into rows of at most max_tokens_per_batch, or (false) pad to the longest sample")
    max_tokens_per_batch: int = Field(8192, ge=8, description="tokens in one micro-batch on one worker")
    pack_to_multiple_of: int | None = Field(
        64, ge=1, description="a packed row ends at its real tokens rounded up to this, so a row the data cannot fill "
        "carries no long padding tail (null: every row is exactly max_tokens_per_batch, fixed shapes)")
    share_prefix: bool = Field(
        True, description="packed units of several documents that start alike (a preference pair's sides, a GRPO "
        "group's completions) compute their shared prompt once: each later document keeps only its own tokens and "
        "attends to the first one's prompt (the same logits and gradients, fewer tokens). Used where the attention "
        "supports it (posttrain_packed without sliding windows or soft-capping, probed at setup)")
    buffer_size: int = Field(256, ge=1, description="tokenized samples the packer chooses from")
    background: bool | None = Field(
        None, description="prepare micro-batches (tokenization, packing) in a background thread. null: yes, except "
        "when training on CPU with torch's threads on every core this process may use and every source local, where "
        "the thread only takes cores from the compute threads (the batch is then made in the training thread, between "
        "steps)")
    prefetch: int = Field(4, ge=1, description="micro-batches prepared ahead in the background")
    shuffle: bool = Field(True, description="shuffle files and windows, reshuffled every epoch from the seed")
    shuffle_window: int = Field(1024, ge=1, description="records permuted together while streaming")
    on_exhausted: Literal["restart", "drop"] = Field(
        "restart", description="an exhausted source restarts (up to max_epochs passes) or is dropped from the mixture")
    max_epochs: int | None = Field(None, ge=1, description="passes over each source; None: restart forever")


class TrainConfig(Strict):
    lr: float = Field(2e-5, gt=0, description="peak learning rate")
    steps: int = Field(ge=1, description="optimizer steps (the data streams; see data.max_epochs)")
    warmup_steps: int = Field(0, ge=0, description="linear warmup from 0 to lr over these steps")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warmup, down to min_lr_ratio x lr")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="final learning rate as a fraction of lr")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step on one worker")
    max_grad_norm: float | None = Field(1.0, description="gradient clipping by global norm (null: no clipping)")
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    seed: int = Field(0, description="random seed of the run: data order, mixer and torch RNG")
    log_every: int = Field(1, ge=1, description="optimizer steps between metric lines")
    on_steps_change: Literal["error", "continue", "rescale"] = Field(
        "error", description="resuming with another train.steps than the checkpoint's learning-rate schedule was laid "
        "over: error (stop, naming the choices), continue (keep the checkpoint's schedule: past its end the LR stays at "
        "its final value, min_lr_ratio x lr), rescale (from the resumed step on, the LR of a schedule over the new "
        "train.steps, as if the run had been started with it; the LR may jump). See docs/reliability.md")

    eval_every: int | None = Field(
        None, ge=1, description="optimizer steps between evaluations on data.eval_sources, and one after the last step "
        "(null: no evaluation); the recipe's own loss on held-out data and its metrics, logged as `eval/...` with the step")
    eval_max_batches: int | None = Field(
        None, ge=1, description="micro-batches each worker evaluates (the first ones of its share; null: all of data.eval_sources)")
    best_metric: str = Field(
        "eval/loss", description="the evaluation metric (`eval/...`) that picks the best step, named with its checkpoint "
        "in <output_dir>/best.json, and that early stopping watches")
    best_mode: Literal["min", "max"] = Field("min", description="min: lower best_metric is better (a loss); max: higher (an accuracy)")
    keep_best: bool = Field(
        True, description="write a checkpoint at each evaluation that improves best_metric and keep it whatever "
        "compute.keep_checkpoints says (false: best.json names the best step, checkpoints follow compute.checkpoint_every)")
    eval_suite: str | None = Field(
        None, description="an evaluation suite file (`posttrain eval`, docs/eval.md) run on the current weights at every "
        "evaluation, on worker 0; its metrics are logged as eval/<task>/<metric> (usable as best_metric) and its full "
        "results written to <output_dir>/eval_suite/step_N")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many evaluations in a row without improving best_metric by more than "
        "early_stopping_min_delta (null: never); the run checkpoints, exports and ends normally")
    early_stopping_min_delta: float = Field(0.0, ge=0.0, description="the least change of best_metric that counts as an improvement")

class WandbConfig(Strict):
    project: str | None = Field(None, description="W&B project (null: W&B's default, WANDB_PROJECT or `uncategorized`)")
    name: str | None = Field(None, description="display name of the run (null: the output_dir's folder name)")
    tags: list[str] = Field([], description="tags of the run")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="online: stream to the W&B server; offline: write the run under `dir` only (upload later "
        "with `wandb sync`); disabled: no W&B at all")
    entity: str | None = Field(None, description="W&B team or user (null: your default entity)")
    dir: str | None = Field(None, description="where W&B writes its files, a `wandb/` folder inside (null: the output_dir)")


class MlflowConfig(Strict):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking server or store, e.g. http://host:5000 or sqlite:///mlflow.db (null: "
        "MLFLOW_TRACKING_URI, else MLflow's default); a local file store also needs MLFLOW_ALLOW_FILE_STORE=true")
    experiment: str | None = Field(None, description="experiment name, created if missing (null: MLflow's `Default`)")
    run_name: str | None = Field(None, description="name of the run (null: the output_dir's folder name)")


class ComputeConfig(Strict):
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="auto: cuda when available, else cpu")
    output_dir: str = Field(
        "runs/default", description="run directory; a run there with a checkpoint is resumed, one without is not replaced "
        "without --overwrite")
    # SPMD: >1 launches that many Ray workers (one torch.distributed group, FSDP2-sharded model)
    workers: int = Field(1, ge=1, description="SPMD workers: >1 launches that many Ray workers (FSDP2-sharded model); 1: this process")
    cpus_per_worker: float = Field(1, gt=0, description="Ray CPUs per worker")
    gpus_per_worker: float = Field(0, ge=0, description="1 per worker on a GPU cluster")
    max_restarts: int = Field(2, ge=0, description="restarts from the newest checkpoint after a worker dies")
    worker_group: Literal["posttrain", "verl"] = Field(
        "posttrain", description="who starts the Ray workers: posttrain's own worker group, or Verl's RayWorkerGroup "
        "(pip install --no-deps verl, plus posttrain[verl]); the recipe and its results are the same")
    peak_flops: float | None = Field(None, gt=0, description="peak FLOP/s of one device for MFU (null: GPU table / measured CPU matmul)")
    tensorboard: bool = Field(False, description="also write TensorBoard events to <output_dir>/tensorboard")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (CPU)")
    progress: bool = Field(True, description="a rich progress bar on the console")
    checkpoint_every: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        "auto", description="optimizer steps between checkpoints; auto: ceil(train.steps / 10), about ten per run "
        "(null: no step-based checkpoints)")
    checkpoint_every_minutes: float | None = Field(
        30.0, gt=0, description="also write a checkpoint once this many minutes of wall-clock time have passed since the "
        "last one (or the start), by rank 0's clock, broadcast so every worker saves after the same step (null: off)")
    async_checkpoint: bool = Field(
        False, description="periodic checkpoints (checkpoint_every, checkpoint_every_minutes) are copied at the step and written by a background "
        "thread while training goes on, then made visible (atomically, as always) at the first step boundary where every "
        "worker's write is done; until then the previous checkpoint is the resume point. Checkpoints on interrupt, at a "
        "new best and at early stopping stay synchronous")
    compile: bool = Field(
        False, description="compile every decoder layer with torch.compile (per layer, in place; the per-document "
        "attention stays eager between the compiled halves; of a last layer run at the target positions only, its norms and "
        "MLP, and the final norm): fuses norms, rotary, activations and residual adds forward "
        "and backward. The first steps pay the compilation (about 20-60 s on CPU); losses match eager to ~1e-6 (fp32), not "
        "bitwise. If the backend cannot compile on this device (no C++ compiler on CPU, no Triton on GPU) the run says so "
        "and trains eager")
    keep_checkpoints: int | None = Field(3, ge=1, description="keep the newest K checkpoints (null: all)")
    checkpoint_on_interrupt: bool = Field(
        True, description="on Ctrl-C or SIGTERM, finish the current step and write a checkpoint before stopping (every "
        "worker at the same step), so the run resumes from there; a second signal stops at once")
    wandb: WandbConfig | None = Field(
        None, description="log every step's metrics to Weights & Biases, from rank 0 only: one W&B run per job (the run "
        "id is kept in <output_dir>/tracking.json, so a resume continues the same run); needs `pip install wandb`")
    mlflow: MlflowConfig | None = Field(
        None, description="log every step's metrics to MLflow, from rank 0 only: one MLflow run per job (the run id is "
        "kept in <output_dir>/tracking.json, so a resume continues the same run); needs `pip install mlflow-skinny`")
    # auto: continue from the newest complete checkpoint in output_dir if there is one; never; or a path
    resume: str = Field(
        "auto", description="auto: continue from the newest complete checkpoint in output_dir if there is one; never; or a "
        "checkpoint path (also --resume PATH); a checkpoint written with other data.sources is refused (its data position is for those)")


class ExportConfig(Strict):
    enabled: bool = Field(True, description="write a plain HF model directory to <output_dir>/hf at the end")
    merge_lora: bool = Field(True, description="merge LoRA adapters into the weights (false: the adapter only)")
    sample_prompts: list[str] = Field([], description="prompts answered greedily by the exported checkpoint at the end")
    max_new_tokens: int = Field(32, ge=1, description="tokens generated per sample prompt")
    best: bool = Field(False, description="also export the best checkpoint (train.best_metric; needs train.eval_every and "
                       "train.keep_best) to <output_dir>/hf-best, loaded in one process on the CPU")


class JobConfig(Strict):
    """The job file. Besides the pillar sections it holds the chosen recipe's own section (`dpo:`,
    `distill:`, or a custom recipe's), typed by the recipe module's `Config` model."""

    # extra keys hold the recipe's section only; anything else is refused (see _recipe_section)
    model_config = ConfigDict(extra="allow", validate_assignment=True)
    recipe: str = Field(description="sft | dpo | distill | grpo, or a custom recipe 'pkg.mod:run' / 'path/to/file.py:run'")
    model: ModelConfig = Field(description="the model to train and how to load it")
    data: DataConfig = Field(description="where the data is and how it becomes packed token batches")
    train: TrainConfig = Field(description="optimizer, schedule and steps")
    compute: ComputeConfig = Field(ComputeConfig(), description="where and how the job runs, checkpoints and resumes")
    export: ExportConfig = Field(ExportConfig(), description="the HF export at the end of the run")

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, v: str) -> str:
        if v not in RECIPES and ":" not in v:
            raise ValueError(f"unknown recipe {v!r}; choose one of {sorted(RECIPES)} or give an import path 'pkg.mod:fn'")
        return v

    @model_validator(mode="after")
    def _recipe_section(self):
        """Type the recipe's section with its `Config`; refuse any other extra top-level key.
        (`load_config` reports the same problems with file:line before this runs.)"""
        extra = self.__pydantic_extra__ or {}
        section, model = recipe_section(self.recipe)
        for key in extra:
            if key != section:
                raise ValueError(_stray_section_msg(key, self.recipe, [*type(self).model_fields, section]))
        if model is not None and not isinstance(extra.get(section), model):
            try:
                extra[section] = model.model_validate(extra.get(section) or {})
            except ValidationError as e:
                raise ValueError("; ".join(f"{_dotted((section, *err['loc']))}: {err['msg']}" for err in e.errors())) from None
        elif model is None and section in extra:
            raise ValueError(f"{section}: recipe {self.recipe!r} takes no section of its own")
        return self

    @model_validator(mode="after")
    def _evaluation(self):
        """Evaluation during training needs held-out data and an interval, both or neither."""
        t, d = self.train, self.data
        if t.eval_every is not None and not d.eval_sources and not t.eval_suite:
            raise ValueError("train.eval_every is set but neither data.eval_sources nor train.eval_suite is: name the held-out "
                             "data to evaluate (data.eval_sources, like data.sources) or a suite file, or remove train.eval_every")
        if (d.eval_sources or t.eval_suite) and t.eval_every is None:
            which = "data.eval_sources" if d.eval_sources else "train.eval_suite"
            raise ValueError(f"{which} is set but train.eval_every is not: set train.eval_every (optimizer steps "
                             f"between evaluations), or remove {which}")
        if t.early_stopping_patience is not None and t.eval_every is None:
            raise ValueError("train.early_stopping_patience needs evaluations: set train.eval_every and data.eval_sources")
        if not t.best_metric.startswith("eval/"):
            raise ValueError(f"train.best_metric: {t.best_metric!r} is not an evaluation metric; name one logged as "
                             "`eval/...` (e.g. eval/loss)")
        if self.export.best and (t.eval_every is None or not t.keep_best):
            raise ValueError("export.best needs a best checkpoint: set train.eval_every (with data.eval_sources) and "
                             "keep train.keep_best: true")
        if d.eval_sources and self.recipe in NO_EVAL_RECIPES:
            raise ValueError(f"data.eval_sources: recipe {self.recipe!r} has no evaluation during training (its data are "
                             f"prompts whose completions it generates); remove data.eval_sources and train.eval_every")
        return self

    @property
    def section(self) -> BaseModel | None:
        """The recipe's own section (e.g. the DPOConfig of a `dpo:` job), None if it has none."""
        return (self.__pydantic_extra__ or {}).get(recipe_section(self.recipe)[0])

    def import_paths(self) -> dict[str, str]:
        """Every component plugged in by import path, by config key."""
        paths = {"recipe": recipe_path(self.recipe)}
        if self.data.transform:
            paths["data.transform"] = self.data.transform
        for i, src in enumerate(self.data.sources):
            if src.transform:
                paths[f"data.sources[{i}].transform"] = src.transform
        for i, src in enumerate(self.data.eval_sources or []):
            if src.transform:
                paths[f"data.eval_sources[{i}].transform"] = src.transform
        return paths


RECIPES = {
    "sft": "posttrain.recipes.sft:run",
    "dpo": "posttrain.recipes.dpo:run",
    "distill": "posttrain.recipes.distill:run",
    "grpo": "posttrain.recipes.grpo:run",
}
NO_EVAL_RECIPES = ("grpo",)  # built-in recipes without evaluation during training


def recipe_path(recipe: str) -> str:
    return RECIPES.get(recipe, recipe)


def load_recipe(cfg: "JobConfig"):
    """The recipe's `run(cfg, run_dir)` function."""
    return resolve_import_path(recipe_path(cfg.recipe), key="recipe")


def job_schema() -> dict:
    """JSON schema of job files, with every built-in recipe's section (`dpo:`, `distill:`, ...)."""
    schema = JobConfig.model_json_schema()
    for name in RECIPES:
        section, model = recipe_section(name)
        if model is not None:
            sub = model.model_json_schema()
            schema.setdefault("$defs", {}).update(sub.pop("$defs", {}))
            sub["description"] = f"only with recipe: {name}. " + sub.get("description", "")
            schema["properties"][section] = sub
    return schema


def recipe_section(recipe: str) -> tuple[str, type[BaseModel] | None]:
    """(section name, its pydantic model or None) of a recipe. A built-in recipe's section is named
    after it; a custom recipe module names its section with `SECTION` (default: the module name) and
    types it with `Config`. Imports the recipe module (it is resolved at validation anyway)."""
    spec = recipe_path(recipe)
    mod_name = spec.rpartition(":")[0]
    module = import_module(mod_name, key="recipe")
    default = recipe if recipe in RECIPES else Path(mod_name).stem.rsplit(".", 1)[-1]
    return getattr(module, "SECTION", default), getattr(module, "Config", None)


def _stray_section_msg(key: str, recipe: str, candidates: list[str] | None = None) -> str:
    if key in RECIPES:
        return f"{key}: this is the section of recipe {key!r}, but the job's recipe is {recipe!r}; remove it or set recipe: {key}"
    return f"{key}: {unknown_key_msg(key, candidates if candidates is not None else list(JobConfig.model_fields))}"


def unknown_key_msg(key: Any, candidates: list[str]) -> str:
    """"unknown key", with the closest valid key when one is close enough (difflib)."""
    close = difflib.get_close_matches(str(key), candidates, n=1, cutoff=0.6)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    return f"unknown key{hint} (check the spelling; see `posttrain validate --schema`)"


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models inside a field's type (`X`, `X | None`, `list[X]`, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def keys_at(root: type[BaseModel], loc: tuple) -> list[str]:
    """The valid keys of the section at `loc` (a key path from `root`; list indices skipped)."""
    models = [root]
    for part in loc:
        if isinstance(part, int):
            continue
        models = [m for model in models if part in model.model_fields for m in _models_in(model.model_fields[part].annotation)]
    return sorted({k for m in models for k in m.model_fields})


# ------------------------------------------------------------------------------------- import paths
def import_module(mod_name: str, *, key: str):
    """A module by dotted name, or a Python file by path (`path/to/file.py`, relative to the current
    directory; modules beside the file are importable from it), with an error naming the config key on failure. A dotted name that is not importable
    from sys.path is looked up in the current directory too (as `python -m` would), so a module
    beside the job needs no PYTHONPATH (`load_config` also looks next to the job file)."""
    if mod_name.endswith(".py"):
        path = Path(mod_name).resolve()
        if not path.is_file():
            raise ConfigError(f"{key}: no such Python file {mod_name!r} (relative paths start at {Path.cwd()})")
        name = f"posttrain_user_{path.stem}_{abs(hash(str(path))):x}"
        if name in sys.modules:
            return sys.modules[name]
        if str(path.parent) not in sys.path:  # its own imports of modules beside it work, as under `python file.py`
            sys.path.append(str(path.parent))
            importlib.invalidate_caches()
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise ConfigError(f"{key}: importing {mod_name!r} failed: {type(e).__name__}: {e}") from e
        return module
    cwd = str(Path.cwd())
    if _module_file(mod_name, Path.cwd()) is not None and not _importable(mod_name) and cwd not in sys.path:
        sys.path.append(cwd)
        importlib.invalidate_caches()
    try:
        return importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"{key}: cannot import module {mod_name!r} ({e}; looked on sys.path, next to the job file "
                          f"and in {cwd}; a file can be given as 'path/to/file.py:name')") from e
    except Exception as e:
        raise ConfigError(f"{key}: importing {mod_name!r} failed: {type(e).__name__}: {e}") from e


def _importable(mod_name: str) -> bool:
    try:
        return importlib.util.find_spec(mod_name.partition(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def _module_file(mod_name: str, base: Path) -> Path | None:
    """`base/a/b.py` or `base/a/b/__init__.py` for the dotted name `a.b`, if it exists."""
    parts = mod_name.split(".")
    if not all(p.isidentifier() for p in parts):
        return None
    stem = base.joinpath(*parts)
    return next((f for f in (stem.with_suffix(".py"), stem / "__init__.py") if f.is_file()), None)


def resolve_import_path(spec: str, *, key: str) -> Any:
    """`"pkg.module:attr.sub"` or `"path/to/file.py:attr"` -> the object, with an error naming the
    config key on failure."""
    if ":" not in spec:
        raise ConfigError(f"{key}: {spec!r} is not an import path; expected 'package.module:name' or 'file.py:name'")
    mod_name, _, attr = spec.rpartition(":")
    obj = import_module(mod_name, key=key)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise ConfigError(f"{key}: module {mod_name!r} has no attribute {attr!r}") from e
    return obj


# --------------------------------------------------------------------------------------- tracking
TRACKING_PACKAGES = {"wandb": ("wandb", "pip install wandb"), "mlflow": ("mlflow", "pip install mlflow-skinny")}


def check_tracking(cfg: JobConfig) -> None:
    """A configured tracking sink (compute.wandb, compute.mlflow) needs its package installed."""
    for key, (module, install) in TRACKING_PACKAGES.items():
        section = getattr(cfg.compute, key)
        if section is None or getattr(section, "mode", None) == "disabled":
            continue
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ConfigError(f"compute.{key}: the {module!r} package is not installed; {install} (or pip install "
                              f"'posttrain[tracking]'), or remove compute.{key} from the job")


# ----------------------------------------------------------------------------- models and templates
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def hub_offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model_source(path: str, *, key: str, revision: str | None = None) -> None:
    """Fail at once on a model (or tokenizer) that cannot be there: a local path that does not exist,
    or a hub id `org/name` that is not a local directory while the hub is offline and the id is not
    in the local cache. A hub id that may be downloaded is left to `from_pretrained`."""
    p = Path(path).expanduser()
    if p.is_dir():
        return
    if p.exists():
        raise ConfigError(f"{key}: {path!r} is a file; give the model's directory (with config.json)")
    if not HUB_ID.match(path):
        raise ConfigError(f"{key}: no such directory {path!r} (relative paths start at {Path.cwd()}; a hub id is 'org/name')")
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, "config.json", revision=revision), str) and not isinstance(
                try_to_load_from_cache(path, "tokenizer_config.json", revision=revision), str):
            raise ConfigError(f"{key}: no such directory {path!r}, and as a hub id it is not in the Hugging Face cache "
                              "while the hub is offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set)")


def hub_hint(path: str) -> str:
    """What was tried for a model source that failed to load."""
    if Path(path).expanduser().exists():
        return ""
    return f" ({path!r} is not a local directory, so it was tried as a Hugging Face Hub id{'; the hub is offline' if hub_offline() else ''})"


def is_inline_template(value: str) -> bool:
    return "{{" in value or "{%" in value


def read_chat_template(value: str, *, key: str = "model.chat_template") -> str:
    """`model.chat_template`: an inline Jinja template (it contains `{{` or `{%`), or a file holding
    one (`chat_template.json` files: their "chat_template" entry)."""
    if is_inline_template(value):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}: no such template file {value!r} (relative paths start at {Path.cwd()}; "
                          "an inline template contains '{{' or '{%')")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            text = json.loads(text)["chat_template"]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{key}: {value!r} is a .json file but has no \"chat_template\" string ({e})") from None
    if not is_inline_template(text):
        raise ConfigError(f"{key}: {value!r} holds no Jinja template (no '{{{{' or '{{%' in it)")
    return text


# --------------------------------------------------------------------------------------- loading
def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map key paths (tuples of keys / list indices) to 1-based line numbers in the YAML text."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (k.value,)
                lines[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 1e-4). Values are parsed as YAML, so lists/bools work."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.path=value")
    key, _, raw = item.partition("=")
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r}: bad key path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value: {e}") from e
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict[tuple, str]:
    """Apply dotted overrides in place; return {key path: override text} for error messages."""
    origin = {}
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        loc: list = []
        for i, part in enumerate(path):
            if isinstance(node, list):  # a list entry by index: data.sources.0.weight=2
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: {'.'.join(path[:i])} is a list of {len(node)}; "
                                      f"{part!r} is not an index of it")
                key: Any = int(part)
            elif isinstance(node, dict):
                key = part
            else:
                raise ConfigError(f"override {item!r}: {'.'.join(path[:i])} is not a section")
            loc.append(key)
            if i == len(path) - 1:
                node[key] = value
            else:
                if isinstance(node, dict) and part not in node:
                    node[part] = {}
                node = node[key]
        origin[tuple(loc)] = item
    return origin


class Located:
    """Validation errors of a YAML file as `file:line: key.path: message` (or `override '...'`), with
    the closest valid key for a misspelled one; shared by job files and evaluation suites."""

    def __init__(self, path: Path, lines: dict[tuple, int], origin: dict[tuple, str]):
        self.path, self.lines, self.origin, self.msgs = path, lines, origin, []

    def where(self, loc: tuple) -> str:
        src = next((f"override {o!r}" for p, o in self.origin.items() if loc[: len(p)] == p), None)
        if src is None:
            line = next((self.lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in self.lines), None)
            src = f"{self.path}:{line}" if line else str(self.path)
        return src

    def collect(self, e: ValidationError, prefix: tuple = (), root: type[BaseModel] | None = None) -> None:
        for err in e.errors():
            loc = prefix + tuple(err["loc"])
            msg = err["msg"]
            msg = msg[0].lower() + msg[1:] if msg else msg
            if err["type"] == "extra_forbidden" and root is not None:
                msg = unknown_key_msg(err["loc"][-1], keys_at(root, tuple(err["loc"][:-1])))
            if not loc and err["type"] == "value_error":  # a check across sections: its message names the key
                msg = msg.removeprefix("value error, ")
                self.msgs.append(f"{self.where(tuple(msg.split()[0].rstrip(':').split('.')))}: {msg}")
                continue
            self.msgs.append(f"{self.where(loc)}: {_dotted(loc) or '(top level)'}: {msg}")


def read_yaml_file(path: Path, overrides: list[str], *, what: str, shape: str) -> tuple[dict, dict[tuple, str], dict[tuple, int]]:
    """(the mapping with `overrides` applied, {key path: override}, {key path: line}) of a YAML file;
    `what` names the file in errors, `shape` says what its top level must be."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what} ({e.strerror})") from e
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {shape}")
    origin = apply_overrides(raw, overrides or [])
    return raw, origin, _yaml_lines(text)


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    path = Path(path)
    raw, origin, lines = read_yaml_file(path, overrides or [], what="job file",
                                        shape="the job file must be a mapping of sections (recipe, model, data, ...)")
    _absolute_file_paths(raw, path.parent)

    located = Located(path, lines, origin)
    where, msgs = located.where, located.msgs

    def collect(e: ValidationError, prefix: tuple = (), root: type[BaseModel] = JobConfig) -> None:
        located.collect(e, prefix, root)

    # The recipe's own section is checked against its Config model, other top-level keys against
    # JobConfig, so that every error carries its file:line and full key path.
    section, model = None, None
    if isinstance(raw.get("recipe"), str) and (raw["recipe"] in RECIPES or ":" in raw["recipe"]):
        try:
            section, model = recipe_section(raw["recipe"])
        except ConfigError as e:
            raise ConfigError(f"{where(('recipe',))}: {e}") from None
    known = set(JobConfig.model_fields)
    for key in raw:
        if key not in known and key != section:
            msgs.append(f"{where((key,))}: {_stray_section_msg(key, raw.get('recipe'), sorted(known | ({section} - {None})))}")
    if section in raw and model is None:
        msgs.append(f"{where((section,))}: {section}: recipe {raw['recipe']!r} takes no section of its own")
    pillars = {k: v for k, v in raw.items() if k in known}
    if model is not None:
        try:
            pillars[section] = model.model_validate(raw.get(section) or {})
        except ValidationError as e:
            collect(e, (section,), model)
            # reported with file:line above; an unvalidated stand-in keeps JobConfig from repeating it
            pillars[section] = model.model_construct()
    try:
        JobConfig.model_validate(pillars)
    except ValidationError as e:
        collect(e)
    if msgs:
        raise ConfigError("\n".join(msgs)) from None
    cfg = JobConfig.model_validate(raw)
    # Resolve plugged-in components now (also in `posttrain validate`), not an hour into the run.
    for key, spec in cfg.import_paths().items():
        try:
            resolve_import_path(spec, key=key)
        except ConfigError as e:
            src = origin.get(tuple(key.split(".")))
            raise ConfigError(f"{f'override {src!r}' if src else path}: {e}") from None
    # A tracking sink whose package is missing fails now, not at the first step.
    try:
        check_tracking(cfg)
    except ConfigError as e:
        key = next(k for k in ("wandb", "mlflow") if f"compute.{k}:" in str(e))
        raise ConfigError(f"{where(('compute', key))}: {e}") from None
    # Model, tokenizer and template that cannot be there fail now too.
    checks = [("model.path", lambda: check_model_source(cfg.model.path, key="model.path", revision=cfg.model.revision))]
    if cfg.model.tokenizer:
        checks.append(("model.tokenizer", lambda: check_model_source(cfg.model.tokenizer, key="model.tokenizer", revision=cfg.model.revision)))
    if cfg.model.chat_template:
        checks.append(("model.chat_template", lambda: read_chat_template(cfg.model.chat_template)))
    # a recipe section naming other models (a teacher, a reference) lists them with `model_paths()`
    for field, value in (getattr(cfg.section, "model_paths", dict)() or {}).items():
        checks.append((f"{section}.{field}", lambda k=f"{section}.{field}", v=value: check_model_source(v, key=k)))
    for key, check in checks:
        try:
            check()
        except ConfigError as e:
            src = origin.get(tuple(key.split(".")))
            raise ConfigError(f"{f'override {src!r}' if src else where(tuple(key.split('.')))}: {e}") from None
    return cfg


def _absolute_file_paths(raw: dict, job_dir: Path) -> None:
    """Import-path components (`recipe`, `data.transform`, `data.sources[i].transform`, a recipe's
    `rewards[i].fn`) are looked up
    next to the job file, then in the current directory, and stored absolute (Ray workers run
    elsewhere): `path/to/file.py:fn`, and `module:fn` when `module` is not importable but is a file
    next to the job file (a module in the current directory is imported from there as it is).
    `model.chat_template` naming a file is made absolute too."""
    def fix(spec):
        return absolute_import_path(spec, job_dir)

    raw["recipe"] = fix(raw.get("recipe"))
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("chat_template"), str) and not is_inline_template(model["chat_template"]):
        if (file := Path(model["chat_template"]).expanduser()).is_file():
            model["chat_template"] = str(file.resolve())
    data = raw.get("data")
    if isinstance(data, dict):
        if "transform" in data:
            data["transform"] = fix(data["transform"])
        for src in [s for k in ("sources", "eval_sources") if isinstance(data.get(k), list) for s in data[k]]:
            if isinstance(src, dict) and "transform" in src:
                src["transform"] = fix(src["transform"])
    for section in raw.values():  # a recipe section's reward functions (grpo.rewards[i].fn)
        for reward in (section.get("rewards") if isinstance(section, dict) else None) or []:
            if isinstance(reward, dict) and "fn" in reward:
                reward["fn"] = fix(reward["fn"])


def absolute_import_path(spec, base_dir: Path):
    """An import path as a job or suite file names it, made absolute: `path/to/file.py:fn` found
    next to the file (`base_dir`), then in the current directory; `module:fn` when `module` is not
    importable but is a file next to it. Anything else is returned as it is."""
    if not isinstance(spec, str) or ":" not in spec:
        return spec
    file, _, attr = spec.rpartition(":")
    if file.endswith(".py"):
        for base in (base_dir, Path.cwd()):
            if (base / file).is_file():
                return f"{(base / file).resolve()}:{attr}"
    elif not _importable(file) and (found := _module_file(file, base_dir)) is not None:
        return f"{found.resolve()}:{attr}"
    return spec


def dump_config(cfg: JobConfig, path: str | Path) -> None:
    """Write the fully resolved config (defaults filled in) as YAML, atomically."""
    atomic.write_text(path, yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
