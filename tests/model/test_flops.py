"""FLOP / MFU accounting (posttrain.model.flops; peak FLOP/s in posttrain.compute.device).

Two kinds of checks:
- hand calculations for a dense, an MoE and a LoRA config, the arithmetic written out so a reader
  can redo it (2 FLOPs per multiply-add; see docs/mfu.md for the conventions);
- the analytic count against torch's FlopCounterMode on real tiny models running our actual SFT
  loss path (`backward_token_mean`: decoder -> target selection -> fused chunked head), forward and
  backward. Known blind spots of FlopCounterMode, handled explicitly:
    * SDPA on CPU (`_scaled_dot_product_flash_attention_for_cpu`) has no FLOP formula, so attention
      scores count 0 there: matmuls are compared with SDPA, scores separately with eager attention;
    * in-place `addmm_` (the fused head's weight gradient) has no formula: we register the addmm one;
    * transformers' grouped_mm MoE kernel is not counted: MoE runs with experts_implementation="eager".
"""

from __future__ import annotations

import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen3Config, Qwen3MoeConfig

import posttrain.model.attention  # noqa: F401  (registers the posttrain_packed attention backend)
from posttrain.compute.device import gpu_peak, measure_matmul_peak, mfu, peak_flops
from posttrain.model.flops import Arch, FlopCounter, LoraSpec, causal_pairs
from posttrain.model.loss import backward_token_mean, count_targets

V = 128
DIMS = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, tie_word_embeddings=False, max_position_embeddings=256)


def qwen3(layers=2):
    return Qwen3Config(num_hidden_layers=layers, **DIMS)


def qwen3_moe():
    # 4 layers; layer i is MoE iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
    # -> layers 1 and 3 are MoE (4 experts, top-2, expert width 32), layers 0 and 2 dense (width 96)
    return Qwen3MoeConfig(num_hidden_layers=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                          decoder_sparse_step=2, mlp_only_layers=[0], output_router_logits=False, **DIMS)


def packed_batch(doc_lens, pad=0, seed=0):
    """One packed row like data/packing.py: documents back to back, positions restarting at each,
    label -100 on every document's first token and on the padding tail."""
    g = torch.Generator().manual_seed(seed)
    T = sum(doc_lens) + pad
    ids = torch.randint(0, V, (1, T), generator=g)
    labels, pos, s = ids.clone(), [], 0
    for n in list(doc_lens) + ([pad] if pad else []):
        labels[0, s] = -100
        pos += range(n)
        s += n
    if pad:
        labels[0, T - pad :] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": torch.tensor([pos]), "doc_lens": list(doc_lens),
            "num_tokens": sum(doc_lens)}


def _addmm_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]  # [n, k] @ [k, m]: n*m*k multiply-adds


def measured(model, batches, vocab=V):
    """FlopCounterMode FLOPs of one SFT step (forward + backward) on our loss path, per aten op."""
    fc = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_flop})
    with fc:
        backward_token_mean(model, batches, vocab)
    return {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}


def build(cfg, attn="posttrain_packed", **kw):
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn, **kw)
    m.config.use_cache = False
    return m.train()


def no_scores(parts):
    """Everything but the attention scores (which FlopCounterMode cannot see under CPU SDPA)."""
    return sum(p["forward"] + p["backward"] + p["extra"] for k, p in parts.items() if k != "attention")


# --------------------------------------------------------------------------- hand calculations
def test_dense_by_hand():
    c = FlopCounter.from_config(qwen3(), tail_targets=False)  # every layer on every token (see below)
    # per token and layer (hidden 64, 4 query heads and 2 kv heads of 16, gated MLP of width 96):
    q, k, v, o = 2 * 64 * 64, 2 * 64 * 32, 2 * 64 * 32, 2 * 64 * 64  # 8192 + 4096 + 4096 + 8192 = 24576
    mlp = 3 * 2 * 64 * 96  # gate, up, down = 36864
    per_token = 2 * (q + k + v + o + mlp)  # 2 layers: 122880
    assert per_token == 122880
    # documents of 10 and 6 tokens: causal pairs 10*11/2 + 6*7/2 = 55 + 21 = 76;
    # each pair costs QK^T + AV = 2 * 2 * head_dim per query head: 4 * 16 * 4 = 256, per layer
    scores = 2 * 76 * 256  # 2 layers: 38912
    head = 2 * 64 * 128 * 14  # LM head on the 14 target positions only: 229376
    fwd = 16 * per_token + scores + head  # 1966080 + 38912 + 229376 = 2234368
    f = c.step_flops([10, 6], 14)
    assert fwd == 2234368
    assert f["model"] == 3 * fwd == 6703104  # full fine-tuning: backward = 2 x forward everywhere
    assert f["hardware"] == f["model"]
    # activation checkpointing recomputes the forward of the decoder layers, not the head, and not
    # each layer's last matmul (down_proj: torch's non-reentrant checkpoint stops recomputing once the
    # last tensor saved for backward, down_proj's input, is back)
    down = 2 * 96 * 64  # 12288
    g = FlopCounter.from_config(qwen3(), grad_checkpointing=True).step_flops([10, 6], 14)
    assert g["model"] == f["model"] and g["hardware"] == f["model"] + 16 * (per_token - 2 * down) + scores
    g = FlopCounter.from_config(qwen3(), grad_checkpointing=True)
    g.recompute_early_stop = False  # e.g. reentrant checkpointing: the whole layer again
    assert g.step_flops([10, 6], 14)["hardware"] == f["model"] + 16 * per_token + scores
    # the same 16 tokens as one document of 16 costs more attention (16*17/2 = 136 pairs)
    assert c.step_flops([16], 14)["model"] - f["model"] == 3 * 2 * (136 - 76) * 256
    # padding is not a document: it never enters doc_lens, so it never counts
    assert c.forward_flops_per_token() == per_token + 2 * 64 * 128
    # the losses' default on Qwen3 (model/tail.py): the last layer's o_proj and MLP on the 14 target
    # positions only, i.e. 2 tokens x (o + mlp) less, forward and twice that backward
    t = FlopCounter.from_config(qwen3())
    assert t.tail_targets and not FlopCounter.from_config(qwen3(), grad_checkpointing=True).tail_targets
    assert t.step_flops([10, 6], 14)["model"] == f["model"] - 3 * 2 * (o + mlp) == 6432768


def test_head_dim_absent_and_real_vocab():
    cfg = LlamaConfig(num_hidden_layers=1, **{k: v for k, v in DIMS.items() if k != "head_dim"})
    a = Arch.from_config(cfg, vocab_size=100)  # head_dim = 64 / 4 = 16; head over the 100 real rows
    assert (a.head_dim, a.vocab, a.kv_heads) == (16, 100, 2)
    f = FlopCounter.from_config(cfg, vocab_size=100).breakdown([8], 5)
    assert f["head"]["forward"] == 2 * 64 * 100 * 5


def test_moe_by_hand():
    c = FlopCounter.from_config(qwen3_moe())
    assert c.arch.moe_layers == (False, True, False, True)
    attn = 2 * 64 * (64 + 32 + 32 + 64)  # q, k, v, o: 24576
    dense = 3 * 2 * 64 * 96  # 36864
    router = 2 * 64 * 4  # router logits over 4 experts: 512
    experts = 2 * (2 * 64 * (2 * 32) + 2 * 32 * 64)  # top-2 x (fused gate+up 64->64, down 32->64) = 24576
    per_token = 4 * attn + 2 * dense + 2 * (router + experts)  # 98304 + 73728 + 50176 = 222208
    assert per_token == 222208
    parts = c.breakdown([20], 19)
    assert parts["layers"]["forward"] == 20 * per_token
    assert parts["layers"]["backward"] == 2 * 20 * per_token
    assert parts["attention"]["forward"] == 4 * (20 * 21 // 2) * 256  # 4 layers x 210 pairs x 256
    # inactive experts cost nothing: a top-2-of-4 MoE layer is cheaper than if all 4 experts ran
    assert router + experts < router + 2 * experts


def test_lora_by_hand():
    """Llama, LoRA rank 8 on q_proj and v_proj, no checkpointing: the base is frozen, so its
    backward is the input gradient only (1 x forward), and layer 0's q/k/v get none at all (their
    input, the frozen embeddings, needs no gradient); the adapters cost their own small matmuls."""
    cfg = LlamaConfig(num_hidden_layers=2, **DIMS)
    c = FlopCounter.from_config(cfg, lora=LoraSpec(rank=8, targets=("q_proj", "v_proj")), tail_targets=False)
    assert c.adapters == [{"q_proj": 8, "v_proj": 8}] * 2 and not c.input_grads
    T, N = 16, 14
    base = 2 * 64 * (64 + 32 + 32 + 64) + 3 * 2 * 64 * 96  # 24576 + 36864 = 61440 per layer and token
    qkv = 2 * 64 * (64 + 32 + 32)  # 16384: layer 0's q/k/v input gradient, not needed
    ad_fwd = 2 * 8 * (64 + 64) + 2 * 8 * (64 + 32)  # q: 2048, v: 1536 -> 3584 per layer and token
    # adapter backward: B weight + input grads (2 x 2 r d_out), A weight grad (2 r d_in), A input grad
    # (2 r d_in) except in layer 0: q: 4*8*64 + 2*8*64 (+ 2*8*64), v: 4*8*32 + 2*8*64 (+ 2*8*64)
    ad_bwd_l0 = (4 * 8 * 64 + 2 * 8 * 64) + (4 * 8 * 32 + 2 * 8 * 64)  # 3072 + 2048 = 5120
    ad_bwd_l1 = ad_bwd_l0 + 2 * (2 * 8 * 64)  # 7168
    parts = c.breakdown([10, 6], N)
    assert parts["layers"]["forward"] == T * 2 * base
    assert parts["layers"]["backward"] == T * (2 * base - qkv)  # frozen: 1 x forward, minus layer 0 qkv
    assert parts["adapters"]["forward"] == T * 2 * ad_fwd
    assert parts["adapters"]["backward"] == T * (ad_bwd_l0 + ad_bwd_l1)
    assert parts["attention"]["backward"] == 2 * parts["attention"]["forward"]  # q, v carry gradients
    head = 2 * 64 * 128 * N
    assert parts["head"]["forward"] == head and parts["head"]["backward"] == head  # frozen head: dX only
    # with checkpointing peft forces input gradients: layer 0's q/k/v input gradient comes back
    g = FlopCounter.from_config(cfg, lora=LoraSpec(rank=8, targets=("q_proj", "v_proj")), grad_checkpointing=True)
    gp = g.breakdown([10, 6], N)
    assert gp["layers"]["backward"] == T * 2 * base
    assert gp["layers"]["extra"] == T * 2 * (base - 2 * 96 * 64) and gp["head"]["extra"] == 0  # minus down_proj
    # full fine-tuning of the same model costs more: weight gradients of every base matmul
    full = FlopCounter.from_config(cfg, tail_targets=False).step_flops([10, 6], N)["model"]
    lora = c.step_flops([10, 6], N)["model"]
    assert lora < full
    assert full - lora == T * (2 * base + qkv) + head - T * (2 * ad_fwd + ad_bwd_l0 + ad_bwd_l1)


def test_sliding_window_gemma3():
    cfg = gemma3()
    a = Arch.from_config(cfg)
    assert a.windows == (16, None)
    # a document of 20 tokens: full 20*21/2 = 210 pairs; window 16: 16*17/2 + 4*16 = 136 + 64 = 200
    assert causal_pairs(20) == 210 and causal_pairs(20, 16) == 200 and causal_pairs(10, 16) == 55
    parts = FlopCounter.from_config(cfg).breakdown([20], 19)
    assert parts["attention"]["forward"] == (200 + 210) * 4 * 16 * 4


# --------------------------------------------------------------------------- vs FlopCounterMode
def gemma3():
    # tied embeddings (the head's weight is the embedding matrix: trained in full fine-tuning),
    # one sliding-window layer and one full layer, final logit soft-capping (no matmul)
    return Gemma3TextConfig(num_hidden_layers=2, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                            final_logit_softcapping=2.0, **{**DIMS, "tie_word_embeddings": True})


FAMILIES = {"qwen3": qwen3, "llama": lambda: LlamaConfig(num_hidden_layers=2, **DIMS), "gemma3": gemma3}


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_dense_matches_flop_counter(family, ckpt):
    m = build(FAMILIES[family]())
    if ckpt:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    b = packed_batch([10, 6], pad=4)
    n = count_targets(b["labels"])
    counter = FlopCounter.from_model(m)
    assert counter.grad_checkpointing == ckpt and counter.train_base and counter.train_head and not counter.head_recompute
    got = measured(m, [b])
    assert set(got) <= {"aten.mm", "aten.addmm_"}  # CPU SDPA: scores invisible to FlopCounterMode
    # the decoder also ran over the 4 padding slots: hardware work that is not model work
    assert sum(got.values()) == no_scores(counter.breakdown([10, 6, 4], n))
    assert no_scores(counter.breakdown([10, 6], n)) < sum(got.values())


def test_attention_scores_vs_eager():
    """Eager attention computes (and FlopCounterMode counts) the full L x L square, masked; our count
    is the causal triangle with its diagonal: a ratio of (L + 1) / (2 L)."""
    m = build(qwen3(), attn="eager")
    L = 12
    b = packed_batch([L])
    got = measured(m, [b])
    counter = FlopCounter.from_model(m)
    parts = counter.breakdown([L], count_targets(b["labels"]))
    square = 3 * 2 * (2 * 2 * 16 * 4 * L * L)  # fwd + 2x bwd, 2 layers, QK^T and AV, 4 heads of 16
    assert got["aten.bmm"] == square
    ours = parts["attention"]["forward"] + parts["attention"]["backward"]
    assert ours * 2 * L == square * (L + 1)
    assert got["aten.mm"] + got.get("aten.addmm_", 0) == no_scores(parts)


@pytest.mark.parametrize("ckpt", [False, True])
def test_moe_matches_flop_counter(ckpt):
    m = build(qwen3_moe(), experts_implementation="eager")
    if ckpt:  # MoE blocks are recomputed whole (their last op saves the expert outputs)
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    b = packed_batch([12, 8])
    n = count_targets(b["labels"])
    counter = FlopCounter.from_model(m)
    assert counter.arch.moe_layers == (False, True, False, True)
    assert sum(measured(m, [b]).values()) == no_scores(counter.breakdown([12, 8], n))


def _peft(model, **kw):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=kw.pop("r", 8), lora_alpha=16, lora_dropout=0.0, **kw))


@pytest.mark.parametrize("ckpt", [False, True])
def test_lora_matches_flop_counter(ckpt):
    m = build(LlamaConfig(num_hidden_layers=2, **DIMS))
    if ckpt:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm = _peft(m, target_modules=["q_proj", "v_proj", "down_proj"])
    counter = FlopCounter.from_model(pm)
    assert counter.adapters == [{"q_proj": 8, "v_proj": 8, "down_proj": 8}] * 2
    assert not counter.train_base and not counter.train_head and counter.input_grads == ckpt
    assert counter.grad_checkpointing == ckpt
    b = packed_batch([10, 6], pad=2)
    n = count_targets(b["labels"])
    assert sum(measured(pm, [b]).values()) == no_scores(counter.breakdown([10, 6, 2], n))
    spec = FlopCounter.from_config(m.config, lora=LoraSpec(8, ("q_proj", "v_proj", "down_proj")), grad_checkpointing=ckpt)
    assert spec.step_flops([10, 6], n) == counter.step_flops([10, 6], n)


def test_lora_on_head_and_moe_experts_match_flop_counter():
    """LoRA on the head: the generic per-chunk-checkpointed head path (one more head forward, in
    hardware FLOPs). LoRA on fused MoE experts: W + B@A folded per forward (per micro-batch), and
    the expert weight then needs its full weight gradient."""
    m = build(qwen3_moe(), experts_implementation="eager")
    pm = _peft(m, r=4, target_modules=["q_proj", "lm_head"],
               target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    counter = FlopCounter.from_model(pm)
    assert counter.head_rank == 4 and counter.head_recompute
    assert counter.adapters[1] == {"q_proj": 4, "experts.gate_up_proj": 4, "experts.down_proj": 4}
    assert counter.adapters[0] == {"q_proj": 4}
    b1, b2 = packed_batch([9, 5], seed=1), packed_batch([12], seed=2)
    n = count_targets(b1["labels"]) + count_targets(b2["labels"])
    parts = counter.breakdown([9, 5, 12], n, n_micro_batches=2)
    assert sum(measured(pm, [b1, b2]).values()) == no_scores(parts)
    f = counter.step_flops([9, 5, 12], n, n_micro_batches=2)
    # hardware extra: the head (+ its adapter) forward again, and peft evaluating each expert fold
    # W + B@A twice per forward (torch's register_parametrization checks it once): per MoE layer
    # (1 and 3) and micro-batch, 2 * r * numel = 2 * 4 * (4*64*64 + 4*64*32) = 196608
    fold = 2 * 2 * 196608
    assert f["hardware"] - f["model"] == 2 * 64 * 128 * n + 2 * 4 * (64 + 128) * n + fold
    assert parts["adapters"]["forward"] >= fold and parts["adapters"]["backward"] >= 2 * fold
    spec = FlopCounter.from_config(m.config, lora=LoraSpec(4, ("q_proj", "lm_head"), experts=True))
    assert spec.breakdown([9, 5, 12], n, 2) == parts


def test_from_model_after_load_model(tiny_qwen3):
    """What the SFT recipe builds (load_model: vocab padded to a multiple of 64, LoRA roles,
    checkpointing), counted with the real vocabulary, equals what actually runs."""
    from transformers import AutoTokenizer

    from posttrain.config import LoraConfig, ModelConfig
    from posttrain.model.load import load_model

    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    cfg = ModelConfig(path=str(tiny_qwen3), dtype="float32", gradient_checkpointing=True, lora=LoraConfig(rank=4))
    model = load_model(cfg, tok, device=torch.device("cpu"), dtype=torch.float32, packing=True).train()  # as sft.py
    vocab = len(tok)
    counter = FlopCounter.from_model(model, vocab_size=vocab)
    rows = model.get_output_embeddings().weight.shape[0]
    assert rows % 64 == 0 and counter.arch.vocab == vocab <= rows
    assert counter.grad_checkpointing and counter.input_grads and not counter.train_base
    assert set(counter.adapters[0]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    b = packed_batch([9, 7], pad=3)
    b["input_ids"] %= vocab
    b["labels"] = torch.where(b["labels"] >= 0, b["labels"] % vocab, b["labels"])
    n = count_targets(b["labels"])
    assert sum(measured(model, [b], vocab).values()) == no_scores(counter.breakdown([9, 7, 3], n))
    spec = FlopCounter.from_config(model.config, vocab_size=vocab, lora=LoraSpec(4), grad_checkpointing=True)
    assert spec.step_flops([9, 7], n) == counter.step_flops([9, 7], n)


# --------------------------------------------------------------------------- peak FLOP/s and MFU
def test_gpu_peak_table():
    assert gpu_peak("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert gpu_peak("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert gpu_peak("NVIDIA H100 NVL", torch.float16) == 835e12
    assert gpu_peak("NVIDIA H200", torch.bfloat16) == 989e12
    assert gpu_peak("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert gpu_peak("NVIDIA A100-SXM4-80GB", torch.float32, tf32=True) == 156e12
    assert gpu_peak("NVIDIA A100-SXM4-80GB", torch.float32, tf32=False) == 19.5e12
    assert gpu_peak("NVIDIA A10G", torch.bfloat16) == 70e12
    assert gpu_peak("NVIDIA A10", torch.bfloat16) == 125e12
    assert gpu_peak("NVIDIA L40S", torch.bfloat16) == 362e12
    assert gpu_peak("NVIDIA L4", torch.bfloat16) == 121e12
    assert gpu_peak("NVIDIA GeForce RTX 4090", torch.bfloat16) == 165.2e12
    assert gpu_peak("Some Future GPU", torch.bfloat16) is None


def test_cpu_peak_is_measured_once_and_overridable():
    assert peak_flops("cpu", torch.float32, override=1.5e12) == 1.5e12
    t0 = time.perf_counter()
    p = peak_flops("cpu", torch.float32)
    t1 = time.perf_counter()
    assert 1e8 < p < 1e14 and t1 - t0 < 3.0
    assert peak_flops("cpu", torch.float32) == p  # cached: same number, no second benchmark
    assert time.perf_counter() - t1 < 0.05
    assert measure_matmul_peak.cache_info().currsize >= 1
    assert mfu(p / 2, p) == pytest.approx(0.5) and mfu(1.0, 0.0) == 0.0
    assert mfu(p, p, n_devices=4) == pytest.approx(0.25)
