"""Load an HF causal LM and make it trainable: dtype, attention backend, vocabulary, LoRA, checkpointing."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from ..config import ConfigError, ModelConfig


def load_model(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    device: torch.device,
    dtype: torch.dtype,
    merge_lora: bool = True,
) -> torch.nn.Module:
    """`merge_lora` is export.merge_lora: an adapter-only export is refused up front (before any
    training) when the vocabulary had to be resized."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            dtype=dtype,
            attn_implementation=cfg.attn_implementation,
        )
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path: cannot load a causal LM from {cfg.path!r}: {e}") from e
    model.config.use_cache = False
    base_rows = model.get_input_embeddings().weight.shape[0]
    rows = resize_vocab(model, tokenizer, multiple_of=cfg.pad_vocab_to_multiple_of, init=cfg.new_embedding_init)
    if cfg.lora is not None and not merge_lora and rows != base_rows:
        raise ConfigError(
            f"export.merge_lora: false (adapter-only export) needs the base model's vocabulary, but it was "
            f"resized from {base_rows} to {rows} rows (added tokens or model.pad_vocab_to_multiple_of="
            f"{cfg.pad_vocab_to_multiple_of}); a plain loader cannot apply such an adapter to the base. "
            "Set export.merge_lora: true, or add no tokens and pick a multiple that divides the base vocabulary."
        )
    model.to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora is not None:
        model = apply_lora(model, cfg)
    return model


def resize_vocab(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, multiple_of: int, init: str) -> int:
    """Make the embedding matrix hold every tokenizer id, rounded up to `multiple_of` rows (fast
    matmul shapes). Never shrinks: checkpoints often ship more rows than the tokenizer uses. Rows at
    and beyond len(tokenizer) are padding: never targets, never sampled (see model.vocab)."""
    rows = model.get_input_embeddings().weight.shape[0]
    need = max(rows, len(tokenizer))
    target = -(-need // multiple_of) * multiple_of
    if target != rows:
        # transformers' mean_resizing: new rows ~ N(mean, cov) of the old ones (Hewitt, 2021).
        model.resize_token_embeddings(target, mean_resizing=(init == "mean"))
    return target


def apply_lora(model: PreTrainedModel, cfg: ModelConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lc = cfg.lora
    try:
        peft_cfg = LoraConfig(
            r=lc.rank,
            lora_alpha=lc.alpha,
            lora_dropout=lc.dropout,
            target_modules=lc.target_modules,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise ConfigError(f"model.lora.target_modules: {e}") from e


def unwrap(model: torch.nn.Module) -> PreTrainedModel:
    """The underlying transformers model (through a peft wrapper if any)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model
