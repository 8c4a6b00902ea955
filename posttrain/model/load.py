"""Load an HF causal LM and make it trainable: dtype, attention backend, vocabulary, LoRA, checkpointing."""

from __future__ import annotations

import warnings

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from ..config import ConfigError, ModelConfig, check_model_source, hub_hint
from .attention import NAME, check_document_isolation, default_attention
from .families import check_supported, family_of, lora_targets
from .hf import unwrap  # noqa: F401  (re-exported: posttrain.model.load.unwrap)


def load_model(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    device: torch.device,
    dtype: torch.dtype,
    merge_lora: bool = True,
    packing: bool = False,
) -> torch.nn.Module:
    """`merge_lora` is export.merge_lora: an adapter-only export is refused up front (before any
    training) when the vocabulary had to be resized. `packing`: the attention backend is probed and
    refused if it lets packed documents see each other (fail closed)."""
    attn = default_attention(device) if cfg.attn_implementation == "auto" else cfg.attn_implementation
    check_model_source(cfg.path, key="model.path", revision=cfg.revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            dtype=dtype,
            attn_implementation=attn,
        )
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path: cannot load a causal LM from {cfg.path!r}{hub_hint(cfg.path)}: {e}") from e
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise ConfigError(corrupt_weights_message(cfg.path, e)) from None
    model.config.use_cache = False
    check_supported(model, allow_unverified=cfg.allow_unverified)
    text_cfg = model.config.get_text_config()
    if cfg.output_router_logits is not None:
        text_cfg.output_router_logits = cfg.output_router_logits
    if cfg.router_aux_loss_coef is not None:
        text_cfg.router_aux_loss_coef = cfg.router_aux_loss_coef
        if hasattr(model, "router_aux_loss_coef"):  # transformers copies it onto the module at init
            model.router_aux_loss_coef = cfg.router_aux_loss_coef
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
    if packing:
        check_packing_support(model, attn, len(tokenizer), dtype)
    return model


def corrupt_weights_message(path: str, err: Exception) -> str:
    """One line naming the weights file safetensors cannot read (the error itself names none)."""
    from pathlib import Path

    from safetensors import safe_open

    detail = " ".join(str(err).split())
    folder = Path(path).expanduser()
    for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 - any failure to open is the answer
            detail = " ".join(str(e).split())
            return (f"model.path: the weights file {f} is corrupt or truncated ({detail}); "
                    f"download or export the model again")
    return f"model.path: cannot read the safetensors weights of {path!r} ({detail}); download or export the model again"


def check_packing_support(model: torch.nn.Module, attn: str, vocab_size: int, dtype: torch.dtype) -> None:
    diff = check_document_isolation(model, vocab_size)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    if not diff <= tol:
        raise ConfigError(
            f"model.attn_implementation: {attn!r} does not isolate packed documents (a document's logits "
            f"change by {diff:.3g} when another is packed before it). Use attn_implementation: auto "
            f"({NAME} on CPU, flash_attention_2 on GPU), sdpa or flex_attention, or set data.packing: false."
        )


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
    fam = family_of(model)
    modules, params = lc.target_modules, None
    if modules is None:
        if fam is None and lc.target is None and not lc.experts:
            modules = "all-linear"  # unverified family (model.allow_unverified), no roles given
        else:
            modules, params = lora_targets(model, fam, lc.target or ["attention", "mlp"], lc.experts, explicit=lc.target is not None)
    key = "target_modules" if lc.target_modules is not None else "target"
    try:
        peft_cfg = LoraConfig(
            r=lc.rank,
            lora_alpha=lc.alpha,
            lora_dropout=lc.dropout,
            target_modules=modules,
            target_parameters=params or None,
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():  # peft's own rank/alpha patterns for fused expert params
            warnings.filterwarnings("ignore", message=".*_pattern keys did not match any targeted module")
            return get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise ConfigError(f"model.lora.{key}: {e}") from e
