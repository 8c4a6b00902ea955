"""The last decoder layer at the target positions only (model/tail.py): the losses' hidden states and
gradients equal those of the full decoder (the reference: the model's own last_hidden_state, selected
afterwards), on every family it applies to, packed and padded, with LoRA; where it does not apply
(other families, activation checkpointing, a subclass with its own forward) the full layer runs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

import posttrain.model.attention  # noqa: F401  (registers posttrain_packed)
from posttrain.model import tail
from posttrain.model.loss import chunked_ce_sum, hidden_states, select_targets, target_hidden

V = 128
DIMS = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_hidden_layers=2)
CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}


def build(cfg, seed=0):
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="posttrain_packed")
    return m.train()


def packed(lens=(9, 7, 12), seed=0):
    """One packed row; targets only on the second half of each document (as a chat's answers)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (1, sum(lens)), generator=g)
    labels = torch.full_like(ids, -100)
    s = 0
    for n in lens:
        labels[0, s + n // 2 : s + n] = ids[0, s + n // 2 : s + n]
        s += n
    return {"input_ids": ids, "labels": labels, "position_ids": torch.cat([torch.arange(n) for n in lens])[None]}


def padded(seed=1):
    """Two right-padded rows with an attention mask (the unpacked layout)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def loss_and_grads(model, batch, pruned: bool):
    model.zero_grad()
    if pruned:
        h, t = target_hidden(model, batch, V)
    else:
        h, t = select_targets(batch, hidden_states(model, batch), V)
    loss = chunked_ce_sum(model, h, t, V)
    loss.backward()
    return h.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(model, batch):
    h_ref, g_ref = loss_and_grads(model, batch, pruned=False)
    h, g = loss_and_grads(model, batch, pruned=True)
    assert h.shape == h_ref.shape and torch.allclose(h, h_ref, atol=1e-6, rtol=0)
    assert g.keys() == g_ref.keys()
    for n in g:
        assert torch.allclose(g[n], g_ref[n], atol=1e-6, rtol=1e-5), n


@pytest.mark.parametrize("family", list(CONFIGS))
def test_pruned_last_layer_equals_the_full_decoder(family):
    model = build(CONFIGS[family](**DIMS))
    assert tail.eligible(model)
    assert_same(model, packed())
    assert_same(model, padded())
    # outside the losses the layer is the family's own: generation-style forwards see every position
    ids = packed()["input_ids"]
    with torch.no_grad():
        after = model(input_ids=ids).logits
        fresh = build(CONFIGS[family](**DIMS))(input_ids=ids).logits
    assert torch.equal(after, fresh)


def test_lora_and_no_targets():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build(Qwen3Config(**DIMS)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert tail.eligible(model)
    assert_same(model, packed())  # o_proj is a LoRA layer: the rows are taken at its input
    b = packed()
    b["labels"][:] = -100  # a micro-batch without targets: zero rows, zero loss, no error
    h, t = target_hidden(model, b, V)
    assert h.shape == (0, 64) and t.numel() == 0


def test_where_the_full_layer_runs():
    gemma = build(Gemma3TextConfig(**{**DIMS, "head_dim": 16}))  # sandwich norms around the MLP
    assert not tail.eligible(gemma)
    assert_same(gemma, packed())

    ckpt = build(Qwen3Config(**DIMS))
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not tail.eligible(ckpt)
    assert_same(ckpt, packed())

    class Custom(Qwen3DecoderLayer):  # a subclass with its own forward is not assumed plain
        def forward(self, hidden_states, **kwargs):
            return super().forward(hidden_states, **kwargs)

    custom = build(Qwen3Config(**DIMS))
    custom.model.layers[-1].__class__ = Custom
    assert not tail.eligible(custom)
    assert_same(custom, packed())


def test_the_pruned_layer_does_less_work():
    """The point of it: the last layer's o_proj and MLP see only the target rows."""
    model = build(Qwen3Config(**DIMS))
    b = packed()
    n = int((b["labels"][:, 1:] != -100).sum())
    seen = []
    hook = model.model.layers[-1].mlp.down_proj.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[-2]))
    target_hidden(model, b, V)
    hidden_states(model, b)
    hook.remove()
    assert seen == [n, b["input_ids"].shape[1]]
