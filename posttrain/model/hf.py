"""Where things are inside a transformers causal LM (through a peft wrapper): the base model and its
decoder blocks. Dependency-free within the package, so every module can use it without cycles."""

from __future__ import annotations

import torch


def unwrap(model: torch.nn.Module):
    """The underlying transformers model (through a peft wrapper if any)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of an HF causal LM (the FSDP2 sharding units)."""
    decoder = unwrap(model).get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(decoder).__name__} has no .layers; cannot shard it per decoder layer")
    return list(layers)
