"""Export to a plain HF checkpoint (safetensors + config + tokenizer) that any loader accepts.

Written atomically: into a temporary sibling directory that is renamed over the target only when
complete, so an interrupted export never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from ..data.tokenizer import write_fingerprint
from .hf import unwrap


def padded_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of vocabulary padding rows: they exist in the weights but no text maps to them."""
    rows = unwrap(model).get_input_embeddings().weight.shape[0]
    return list(range(len(tokenizer), rows))


def generation_config(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """The base model's generation config, kept whole (every end-of-sequence id, e.g. Llama 3's
    `<|eot_id|>`, `<|eom_id|>` and `<|end_of_text|>`; its pad id; its sampling defaults), plus
    suppression of padded vocab rows (-inf logits). The tokenizer's eos is added to the eos ids when
    the base config lacks it, and its pad id fills a pad the base config does not set."""
    gen = copy.deepcopy(getattr(unwrap(model), "generation_config", None) or GenerationConfig())
    pad_rows = padded_ids(model, tokenizer)
    gen.suppress_tokens = sorted(set(gen.suppress_tokens or []) | set(pad_rows)) or None
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    eos = gen.eos_token_id
    eos_ids = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    if eos_ids:
        gen.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    return gen


def export_hf(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    merge_lora: bool = True,
    meta: dict | None = None,
) -> Path:
    """Save `model` (merged LoRA or adapter only) + tokenizer + fingerprint to `out_dir`."""
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    is_peft = hasattr(model, "peft_config")
    # Merge into a copy so the training model keeps its adapters (export may happen mid-run).
    # Unmerged, PeftModel.save_pretrained writes adapter_model.safetensors + adapter_config.json.
    to_save = copy.deepcopy(model).merge_and_unload() if is_peft and merge_lora else model
    kwargs = {}
    if is_peft and not merge_lora and len(tokenizer) != unwrap(model).config.vocab_size:
        kwargs["save_embedding_layers"] = True
    with torch.no_grad():
        to_save.save_pretrained(tmp, safe_serialization=True, **kwargs)
    gen = generation_config(model, tokenizer)
    gen.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_fingerprint(tokenizer, tmp, padded_vocab_size=unwrap(model).get_input_embeddings().weight.shape[0], **(meta or {}))
    for f in tmp.iterdir():  # make it durable before it becomes visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out


def inference_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a plain HF model (or an inference engine) loads, under HF names: LoRA merged
    functionally (W + the adapter's delta, peft's own `get_delta_weight`; the training model is not
    touched, unlike merge/unmerge which round-trips the base weights), peft wrappers stripped, and
    tensors that share storage (tied embeddings) cloned, so every key is present and writable with
    safetensors (vLLM keeps a separate packed lm_head that only refreshes when it is sent)."""
    base = unwrap(model)
    deltas: dict[str, torch.Tensor] = {}
    if hasattr(model, "peft_config"):
        from peft.tuners.lora import LoraLayer

        for name, mod in base.named_modules():
            if isinstance(mod, LoraLayer):
                for adapter in mod.active_adapters:
                    if adapter in mod.lora_A or adapter in getattr(mod, "lora_embedding_A", {}):
                        d = mod.get_delta_weight(adapter).detach()
                        deltas[name] = deltas[name] + d if name in deltas else d
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in base.state_dict().items():
        if ".lora_" in key or ".original_module." in key:
            continue
        name = key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        module = name.rsplit(".", 1)[0]
        v = value.detach()
        if name.endswith(".weight") and module in deltas:
            v = v + deltas[module].to(v.dtype)
        ptr = v.untyped_storage().data_ptr()
        out[name] = (v.clone() if ptr in seen else v).contiguous()
        seen.add(ptr)
    return out
