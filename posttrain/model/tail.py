"""The last decoder layer at the target positions only.

Only the positions that predict a target reach the head. A decoder layer's output at a position depends
on the layer below at every position of its document through attention, but on its own position alone
through the rest of the layer: the attention's output projection, the residual adds, the
post-attention norm and the MLP. So in the *last* layer those run at the target positions only, while
its input norm, q/k/v projections and attention still run on every position (keys and values are
needed everywhere). It is the same arithmetic on fewer rows: the same loss, and gradients equal to
float rounding (a matmul over fewer rows may sum in another order).

What it saves: (1 - targets / tokens) of the last layer's output projection and MLP, most of a
layer's matmuls. On the demo's 4-layer model with 28% of the tokens as targets (chat SFT, whose prompts
are not scored), a forward + backward takes 389 instead of 435 ms (-11%, interleaved A/B). On an
L-layer model it is about 1/L of that fraction of the decoder.

Where it applies: decoder layers of the plain pre-norm form, input norm -> self-attention -> residual
add -> post-attention norm -> MLP -> residual add, followed by the final norm (Llama, Mistral, Qwen2,
Qwen3), whose class's `forward` is transformers' own. Not on layers with further norms (Gemma), on MoE
blocks (their router statistics cover every token), nor under activation checkpointing (the
recomputation in the backward runs outside the call that knows the rows). Those run the full layer.

    with only_targets(model, rows) as pruned:     # rows [N]: flat indices into [B * T] (data.packing.target_rows)
        hidden = decoder(...).last_hidden_state   # [1, N, H] when pruned, else [B, T, H]

transformers cannot do this itself: `logits_to_keep` trims only the head, after the last layer ran in full.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import MethodType

import torch

from .hf import unwrap

# model_type -> the decoder layer class whose forward is the plain pre-norm form above
PLAIN = {"llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer", "qwen2": "Qwen2DecoderLayer",
         "qwen3": "Qwen3DecoderLayer"}
_ROWS = "_posttrain_target_rows"


def pruned_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder's last layer if `only_targets` runs it at the target positions only, else None."""
    layers = getattr(unwrap(model).get_decoder(), "layers", None)
    layer = layers[-1] if layers is not None and len(layers) else None
    if layer is None or getattr(layer, "gradient_checkpointing", False):
        return None
    mine = layer.__dict__.get("forward")
    if mine is not None and getattr(mine, "__func__", None) is not _forward:  # someone else's per-instance forward
        return None
    # transformers' class itself, not a subclass that changed forward (FSDP2's wrapper class keeps it)
    plain = [c for c in type(layer).__mro__ if c.__name__ in PLAIN.values() and c.__module__.startswith("transformers.")]
    return layer if plain and type(layer).forward is plain[0].forward else None


def eligible(model: torch.nn.Module) -> bool:
    """Whether the last layer runs at the target positions only (in `only_targets`)."""
    return pruned_layer(model) is not None


def _forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
             position_embeddings=None, **kwargs):
    """The layer's own forward, or with `_ROWS` set, the plain pre-norm layer whose output projection
    and MLP run on those rows (flat indices into [B * T]) only: out [1, N, H]."""
    rows = self.__dict__.get(_ROWS)
    common = dict(attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                  use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
    if rows is None:
        return type(self).forward(self, hidden_states, **common)

    def pick(t: torch.Tensor) -> torch.Tensor:  # index_select: its backward is an index_add
        return t.flatten(0, 1).index_select(0, rows)[None]

    residual = pick(hidden_states)
    # the rows are taken at the output projection's input (whatever module sits there: a peft LoRA
    # layer included), so attention itself stays the family's own code
    hook = self.self_attn.o_proj.register_forward_pre_hook(lambda _m, args: (pick(args[0]), *args[1:]))
    try:
        h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **common)
    finally:
        hook.remove()
    h = residual + h
    return h + self.mlp(self.post_attention_layernorm(h))


@contextmanager
def only_targets(model: torch.nn.Module, rows: torch.Tensor):
    """Within: a forward of `model`'s decoder returns the final hidden states at `rows` [N] only (flat
    indices into [B * T] of the positions that predict the targets, in the targets' order; a position
    may predict several: a shared prefix's last one), as [1, N, H] (yields True), where the family
    allows it (else yields False: the full [B, T, H])."""
    layer = pruned_layer(model)
    if layer is None:
        yield False
        return
    if "forward" not in layer.__dict__:  # installed once per layer instance, a no-op outside this context
        layer.forward = MethodType(_forward, layer)
    layer.__dict__[_ROWS] = rows
    try:
        yield True
    finally:
        layer.__dict__[_ROWS] = None
