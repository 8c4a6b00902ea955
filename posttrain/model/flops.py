"""Honest FLOP accounting for MFU / HFU: matmul FLOPs per step from the model config and the batch.

Conventions (docs/mfu.md has the derivations):
- Only matrix-multiply FLOPs count, 2 per multiply-add. Norms, activations, softmax, RoPE, the
  embedding lookup (a gather) and the optimizer are 0.
- Decoder matmuls run on every *real* token (`sum(doc_lens)`; padding is waste, never counted); the
  LM head runs only on target positions (our loss selects them before the head) over the real
  vocabulary, and so do the last layer's output projection and MLP where the family allows it
  (`tail_targets`, model/tail.py; its q/k/v projections and scores still count every token).
- Attention scores are counted per document, causally: a query at position t (0-based) of a document
  sees min(t + 1, window) keys, and QK^T plus AV cost 2 * 2 * head_dim FLOPs per (query, key) pair
  and query head. For a document of L tokens without a window that is 2 * head_dim * heads * L(L+1)
  forward: the exact causal triangle with its diagonal, not half the square, and not the packed row.
- Backward: 2x forward for a matmul whose weight trains (input gradient + weight gradient), 1x for a
  frozen base weight (input gradient only), 0 where nothing below needs a gradient (LoRA: the layers
  before the first adapter get no input gradient unless peft forces one). Attention scores have no
  weights: 2x forward wherever q, k or v needs a gradient.
- LoRA (peft): an adapted nn.Linear d_in -> d_out of rank r adds 2 r (d_in + d_out) per token
  forward, 2x that backward (less the A input gradient where none is needed). LoRA on fused MoE
  expert parameters (peft `target_parameters`) folds W + B @ A into the weight on every forward, so
  it costs 2 r * numel(W) per forward per micro-batch (2x backward), and it makes the expert weight
  need its full weight gradient.
- Model FLOPs (MFU) are the work above; hardware FLOPs (HFU) add what the run does again: under
  activation checkpointing one more forward of every decoder layer that takes part in backward (less
  its trailing down_proj where torch's non-reentrant checkpoint stops early, see `_layer`); one more
  forward of the head when it runs through the per-chunk checkpointed path (LoRA on the head, custom
  heads); and peft's second evaluation of each expert-parameter LoRA fold per forward.
- Verified exactly (to the FLOP) against torch's FlopCounterMode in tests/test_flops.py.

    counter = FlopCounter.from_model(model, vocab_size=len(tokenizer))   # once, after load_model
    peak = peak_flops(device, dtype, override=cfg.compute.peak_flops)     # once, before the loop
    f = counter.step_flops(doc_lens_of_the_step, n_target_tokens, n_micro_batches=k)
    mfu(f["model"] / dt, peak), mfu(f["hardware"] / dt, peak)
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.utils.checkpoint

from .families import ATTENTION, EXPERT_PARAMS, MLP
from .hf import unwrap
from .tail import PLAIN, eligible

# ------------------------------------------------------------------------------------ architecture
ATTN_IN = ATTENTION[:3]  # q, k, v: the module names of the verified families (model/families.py)
DENSE_MLP = MLP
ALL_LINEAR = ATTENTION + MLP  # peft "all-linear": every nn.Linear but the head
POST_MLP_NORM_TYPES = {"gemma2", "gemma3", "gemma3_text", "olmo2"}  # from_model checks the real modules


@dataclass(frozen=True)
class Arch:
    """What the FLOP count needs from an HF text config."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int  # rows the head multiplies (the real vocabulary for our fused CE head)
    moe_layers: tuple[bool, ...]  # per layer: sparse MoE block (else a dense gated MLP)
    windows: tuple[int | None, ...]  # per layer: sliding-window size, None = full causal
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate: int = 0
    shared_intermediate: int = 0  # Qwen2-MoE style shared expert (0: none)
    shared_gate: bool = False  # its sigmoid gate Linear(hidden, 1)
    post_mlp_norm: bool = False  # a norm after the MLP (Gemma 2/3 sandwich norms) saves down_proj's output

    @classmethod
    def from_config(cls, config, vocab_size: int | None = None) -> "Arch":
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = c.num_attention_heads
        hidden = c.hidden_size
        head_dim = getattr(c, "head_dim", None) or hidden // heads
        L = c.num_hidden_layers
        E = getattr(c, "num_experts", None) or getattr(c, "n_routed_experts", None) or 0
        mlp_only = set(getattr(c, "mlp_only_layers", None) or ())
        step = getattr(c, "decoder_sparse_step", None) or 1
        moe = tuple(bool(E) and i not in mlp_only and (i + 1) % step == 0 for i in range(L))
        types = getattr(c, "layer_types", None) or ["full_attention"] * L
        window = getattr(c, "sliding_window", None)
        windows = tuple(window if (t == "sliding_attention" and window) else None for t in types)
        shared = getattr(c, "shared_expert_intermediate_size", None) or 0
        if not shared and getattr(c, "n_shared_experts", None):  # DeepSeek style: n x moe_intermediate
            shared = c.n_shared_experts * c.moe_intermediate_size
        return cls(
            hidden=hidden, layers=L, heads=heads, kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=head_dim, intermediate=getattr(c, "intermediate_size", 0) or 0,
            vocab=int(vocab_size) if vocab_size is not None else c.vocab_size,
            moe_layers=moe, windows=windows, num_experts=E if any(moe) else 0,
            top_k=(getattr(c, "num_experts_per_tok", 0) or 0) if any(moe) else 0,
            moe_intermediate=getattr(c, "moe_intermediate_size", 0) or 0,
            shared_intermediate=shared, shared_gate=bool(getattr(c, "shared_expert_intermediate_size", None)),
            post_mlp_norm=getattr(c, "model_type", "") in POST_MLP_NORM_TYPES,
        )

    def layer_matmuls(self, i: int) -> list[tuple[str, str, int, int, int]]:
        """Decoder layer i as (group, name, d_in, d_out, rows per token), in data-flow order.

        group: attn_in (reads the layer input), attn_out, mlp_in (reads the post-attention residual),
        mlp_out. rows per token: top_k for routed experts, else 1."""
        H, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        mm = [("attn_in", "q_proj", H, q, 1), ("attn_in", "k_proj", H, kv, 1), ("attn_in", "v_proj", H, kv, 1),
              ("attn_out", "o_proj", q, H, 1)]
        if not self.moe_layers[i]:
            I = self.intermediate
            return mm + [("mlp_in", "gate_proj", H, I, 1), ("mlp_in", "up_proj", H, I, 1), ("mlp_out", "down_proj", I, H, 1)]
        Im, k = self.moe_intermediate, self.top_k
        mm += [("mlp_in", "router", H, self.num_experts, 1),
               ("mlp_in", "experts.gate_up_proj", H, 2 * Im, k), ("mlp_out", "experts.down_proj", Im, H, k)]
        if self.shared_intermediate:
            S = self.shared_intermediate
            mm += [("mlp_in", "shared_expert.gate_proj", H, S, 1), ("mlp_in", "shared_expert.up_proj", H, S, 1),
                   ("mlp_out", "shared_expert.down_proj", S, H, 1)]
            if self.shared_gate:
                mm.append(("mlp_in", "shared_expert_gate", H, 1, 1))
        return mm

    def expert_numel(self, name: str) -> int:
        Im, H, E = self.moe_intermediate, self.hidden, self.num_experts
        return E * 2 * Im * H if name == "experts.gate_up_proj" else E * H * Im


def causal_pairs(L: int, window: int | None = None) -> int:
    """(query, key) pairs a causal document of L tokens computes: sum_t min(t + 1, window)."""
    if window is None or window >= L:
        return L * (L + 1) // 2
    return window * (window + 1) // 2 + (L - window) * window


@dataclass(frozen=True)
class LoraSpec:
    """LoRA as a job asks for it: rank and target module names (peft names, or "all-linear"), and
    `experts`: LoRA on the fused MoE expert parameters too (peft target_parameters). On MoE layers the
    dense names gate/up/down_proj map to a shared expert if there is one (routed experts are only
    adapted through `experts`)."""

    rank: int
    targets: tuple[str, ...] | str = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    experts: bool = False

    def names(self) -> set[str]:
        t = ALL_LINEAR if self.targets == "all-linear" else tuple(self.targets)
        return set(t) | ({"shared_expert." + n for n in t if n in DENSE_MLP} if t else set())


# ------------------------------------------------------------------------------------ the counter
@dataclass
class FlopCounter:
    """Matmul FLOPs of one training step. Build with `from_model` (reads what was actually loaded:
    peft adapters and their ranks, which weights train, checkpointing) or `from_config` (a job's
    description, for planning and tests)."""

    arch: Arch
    adapters: list[dict[str, int]]  # per layer: matmul name -> LoRA rank (incl. expert params)
    head_rank: int = 0
    train_base: bool = True  # base weights train: full fine-tuning
    train_head: bool | None = None  # the head's weight trains (None: as train_base)
    input_grads: bool = True  # the embeddings' output needs a gradient (full FT, or peft forces it)
    grad_checkpointing: bool = False
    head_recompute: bool = False  # head under per-chunk checkpointing (not the fused plain-Linear CE)
    recompute_early_stop: bool = True  # torch non-reentrant checkpoint stops at the last saved tensor
    tail_targets: bool = False  # the last layer's o_proj and MLP run on target positions only (model/tail.py)
    _per_layer: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.train_head is None:
            self.train_head = self.train_base
        self._per_layer = []
        for i in range(self.arch.layers):  # each layer needs to know whether its input needs a gradient
            self._per_layer.append(self._layer(i))
        self._tail_grad = self._per_layer[-1]["out_req"] if self._per_layer else self.input_grads

    @classmethod
    def from_config(
        cls, config, *, vocab_size: int | None = None, lora: LoraSpec | None = None, grad_checkpointing: bool = False,
        input_grads: bool | None = None, tail_targets: bool | None = None,
    ) -> "FlopCounter":
        """`input_grads` (LoRA only): None = what peft does, i.e. forced on with gradient checkpointing.
        `tail_targets`: None = where the losses prune the last layer (model/tail.py: its families, no
        checkpointing)."""
        arch = Arch.from_config(config, vocab_size)
        if tail_targets is None:
            tail_targets = not grad_checkpointing and getattr(config.get_text_config(), "model_type", None) in PLAIN
        if lora is None:
            return cls(arch, [{} for _ in range(arch.layers)], grad_checkpointing=grad_checkpointing, tail_targets=tail_targets)
        names = lora.names()
        adapters = []
        for i in range(arch.layers):
            layer = {n: lora.rank for _, n, *_ in arch.layer_matmuls(i) if n in names}
            if lora.experts and arch.moe_layers[i]:
                layer.update({p: lora.rank for p in EXPERT_PARAMS})
            adapters.append(layer)
        head = lora.rank if ("lm_head" in names) else 0
        return cls(
            arch, adapters, head_rank=head, train_base=False, grad_checkpointing=grad_checkpointing,
            input_grads=grad_checkpointing if input_grads is None else input_grads, head_recompute=bool(head),
            tail_targets=tail_targets,
        )

    @classmethod
    def from_model(cls, model: torch.nn.Module, *, vocab_size: int | None = None) -> "FlopCounter":
        """From a loaded (possibly peft-wrapped, checkpointing-enabled) model. `vocab_size`: the
        real vocabulary the loss's head multiplies (default: the head's rows)."""
        model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
        base = unwrap(model)
        head = base.get_output_embeddings()
        rows = head.weight.shape[0] if hasattr(head, "weight") else head.base_layer.weight.shape[0]
        arch = Arch.from_config(base.config, rows if vocab_size is None else min(int(vocab_size), rows))
        norms = [n for n, _ in base.named_modules() if re.search(r"\.layers\.0\.post_(feedforward|mlp)", n)]
        arch = dataclasses.replace(arch, post_mlp_norm=bool(norms))
        adapters: list[dict[str, int]] = [{} for _ in range(arch.layers)]
        head_rank = 0
        for name, mod in base.named_modules():
            r = _lora_rank(mod)
            if not r:
                continue
            m = re.search(r"\.layers\.(\d+)\.(.+)$", name)
            if re.search(r"vision|visual|audio", name):  # towers of multimodal models: not counted
                continue
            if m is None:
                if mod is head or name.endswith("lm_head"):
                    head_rank = r
                continue
            i, path = int(m.group(1)), re.sub(r"(\.base_layer)+", "", m.group(2))
            pname = getattr(mod, "parameter_name", None)
            if pname is not None:  # peft ParamWrapper on a fused expert parameter
                path = f"{path}.{pname}"
            key = _matmul_name(path)
            if key is not None:
                adapters[i][key] = r
        emb = base.get_input_embeddings()
        layers = [p for n, p in base.named_parameters() if ".layers." in n and "lora_" not in n and p.ndim >= 2]
        train_base = any(p.requires_grad for p in layers)
        return cls(
            arch, adapters, head_rank=head_rank, train_base=train_base, train_head=head_weight(base).requires_grad,
            input_grads=_forces_input_grads(emb),
            grad_checkpointing=bool(getattr(base, "is_gradient_checkpointing", False)),
            head_recompute=type(base.get_output_embeddings()) is not torch.nn.Linear,
            tail_targets=eligible(model),
            recompute_early_stop=getattr(torch.utils.checkpoint, "_enable_checkpoint_early_stop", None) is not False,
        )

    # ------------------------------------------------------------------------------ per layer
    def _layer(self, i: int) -> dict:
        """Per-token forward/backward FLOPs of layer i's matmuls and adapters, following which
        tensors need a gradient (the only thing that varies between layers besides MoE/windows)."""
        a = self.arch
        ad = self.adapters[i]
        x_req = self.input_grads if i == 0 else self._per_layer[i - 1]["out_req"]
        req = {"attn_in": x_req}  # does the group's *input* need a gradient
        out = {"attn_in": x_req}  # does the group's output need one
        lin_f = lin_b = ad_f = ad_b = 0.0
        ad_batch_f = 0.0  # expert-parameter LoRA: per micro-batch, not per token
        skip_lin = skip_ad = 0.0  # the layer's trailing matmul, never recomputed (checkpoint early stop)
        after = [0.0, 0.0, 0.0, 0.0]  # lin_f, lin_b, ad_f, ad_b of the matmuls after attention (see tail_targets)
        for group, name, d_in, d_out, rows in a.layer_matmuls(i):
            if group == "attn_out":
                req[group] = out["attn_in"]
            elif group == "mlp_in":
                req[group] = x_req or out.get("attn_out", False)
            elif group == "mlp_out":
                req[group] = out.get("mlp_in", False)
            need_dx = req[group]
            f = 2.0 * d_in * d_out * rows
            r = ad.get(name, 0)
            expert_lora = bool(r) and name in EXPERT_PARAMS
            b = (f if need_dx else 0.0) + (f if (self.train_base or expert_lora) else 0.0)
            af = abk = 0.0
            if r and not expert_lora:
                af = 2.0 * r * (d_in + d_out) * rows
                # B: weight grad + input grad (2 r d_out each); A: weight grad, and input grad if needed
                abk = (4.0 * r * d_out + 2.0 * r * d_in + (2.0 * r * d_in if need_dx else 0.0)) * rows
            lin_f, lin_b, ad_f, ad_b = lin_f + f, lin_b + b, ad_f + af, ad_b + abk
            if group != "attn_in":
                after = [after[0] + f, after[1] + b, after[2] + af, after[3] + abk]
            if expert_lora:
                ad_batch_f += 2.0 * r * a.expert_numel(name)
            out[group] = out.get(group, False) or need_dx or bool(r) or self.train_base
            if name == "down_proj" and not a.moe_layers[i] and not a.post_mlp_norm:
                # a dense layer ends in down_proj (+ residual add), whose output nothing saves for
                # backward: non-reentrant checkpointing stops recomputing once the last saved tensor is
                # back, i.e. before down_proj, or before LoRA's B if down_proj carries an adapter (the
                # base matmul runs first in peft's forward). MoE blocks end in a routing-weight
                # multiply that saves the expert outputs, and Gemma's post-feedforward norm saves
                # down_proj's output: those layers are recomputed whole.
                if r:
                    skip_ad = 2.0 * r * d_out
                else:
                    skip_lin = f
        score_bwd = out["attn_in"]  # q/k/v need a gradient
        out_req = x_req or out.get("attn_out", False) or out.get("mlp_out", False)
        return {
            "lin_f": lin_f, "lin_b": lin_b, "ad_f": ad_f, "ad_b": ad_b, "ad_batch_f": ad_batch_f,
            "skip_lin": skip_lin, "skip_ad": skip_ad, "score_bwd": score_bwd, "out_req": out_req, "after": after,
        }

    # ------------------------------------------------------------------------------ per step
    def breakdown(self, doc_lens: Iterable[int], n_target_tokens: int, n_micro_batches: int = 1,
                  doc_starts: Iterable[int] | None = None) -> dict[str, dict[str, float]]:
        """Per part ("layers", "attention", "adapters", "head"): forward, backward, and extra FLOPs
        of a step whose micro-batches hold documents of `doc_lens` (real tokens, all micro-batches
        together) and `n_target_tokens` loss positions. forward + backward is the model's work (MFU);
        `extra` is what the hardware does on top (HFU): checkpoint recomputation, and peft's second
        evaluation of an expert-parameter LoRA fold (register_parametrization's consistency check).
        `doc_starts`: each document's first position; a shared-prefix branch starting at s > 0 computes
        its own tokens' projections and their scores against the prefix (not the prefix's again)."""
        a = self.arch
        docs = [(int(n), int(s)) for n, s in zip(doc_lens, doc_starts if doc_starts is not None else itertools.repeat(0)) if n > 0]
        tokens = float(sum(n for n, _ in docs))
        mb = float(n_micro_batches)
        pairs: dict[int | None, float] = {
            w: float(sum(causal_pairs(s + n, w) - causal_pairs(s, w) for n, s in docs)) for w in set(a.windows)}
        per_pair = 4.0 * a.head_dim * a.heads  # QK^T and AV, 2 FLOPs per multiply-add each
        parts = {p: {"forward": 0.0, "backward": 0.0, "extra": 0.0} for p in ("layers", "attention", "adapters", "head")}
        n = float(n_target_tokens)
        for i, L in enumerate(self._per_layer):
            s_f = per_pair * pairs[a.windows[i]]
            fold = mb * L["ad_batch_f"]
            # the last layer's matmuls after attention at the target positions only (tail_targets)
            less = [(tokens - n) * x for x in L["after"]] if self.tail_targets and i == a.layers - 1 else [0.0] * 4
            vals = {
                "layers": (tokens * L["lin_f"] - less[0], tokens * L["lin_b"] - less[1]),
                "attention": (s_f, 2.0 * s_f if L["score_bwd"] else 0.0),
                "adapters": (tokens * L["ad_f"] + fold - less[2], tokens * L["ad_b"] + 2.0 * fold - less[3]),
            }
            for p, (f, b) in vals.items():
                parts[p]["forward"] += f
                parts[p]["backward"] += b
            parts["adapters"]["extra"] += fold  # the consistency check's evaluation
            if self.grad_checkpointing and L["out_req"]:
                early = self.recompute_early_stop
                parts["layers"]["extra"] += vals["layers"][0] - (tokens * L["skip_lin"] if early else 0.0)
                parts["attention"]["extra"] += s_f
                parts["adapters"]["extra"] += vals["adapters"][0] - (tokens * L["skip_ad"] if early else 0.0) + fold
        H, V, r = a.hidden, a.vocab, self.head_rank
        hf = 2.0 * n * H * V
        parts["head"]["forward"] = hf
        parts["head"]["backward"] = (hf if self._tail_grad else 0.0) + (hf if self.train_head else 0.0)
        if r:
            af = 2.0 * n * r * (H + V)
            parts["adapters"]["forward"] += af
            parts["adapters"]["backward"] += 4.0 * n * r * V + 2.0 * n * r * H + (2.0 * n * r * H if self._tail_grad else 0.0)
        if self.head_recompute:  # per-chunk checkpointed head: its forward runs again in backward
            parts["head"]["extra"] += hf
            parts["adapters"]["extra"] += 2.0 * n * r * (H + V)
        return parts

    def step_flops(self, doc_lens: Iterable[int], n_target_tokens: int, n_micro_batches: int = 1,
                   doc_starts: Iterable[int] | None = None) -> dict[str, float]:
        """{"model": FLOPs of the step's useful work (MFU), "hardware": plus recomputation (HFU)}."""
        parts = self.breakdown(doc_lens, n_target_tokens, n_micro_batches, doc_starts)
        model = sum(p["forward"] + p["backward"] for p in parts.values())
        return {"model": model, "hardware": model + sum(p["extra"] for p in parts.values())}

    def forward_flops_per_token(self) -> float:
        """Weight-matmul forward FLOPs per token (decoder + head on every token, no attention
        scores, no adapters): the `2N` of the usual `6N` rule, for sanity checks."""
        return sum(L["lin_f"] for L in self._per_layer) + 2.0 * self.arch.hidden * self.arch.vocab


def head_weight(base: torch.nn.Module) -> torch.Tensor:
    head = base.get_output_embeddings()
    return head.weight if hasattr(head, "weight") and isinstance(head.weight, torch.Tensor) else head.base_layer.weight


def _lora_rank(mod: torch.nn.Module) -> int:
    """Rank of the active peft LoRA adapter on a module (0: none)."""
    lora_A, r = getattr(mod, "lora_A", None), getattr(mod, "r", None)
    if not isinstance(lora_A, torch.nn.ModuleDict) or not isinstance(r, dict) or not len(lora_A):
        return 0
    active = getattr(mod, "active_adapters", None) or list(lora_A.keys())
    return sum(r[n] for n in active if n in lora_A)


def _matmul_name(path: str) -> str | None:
    """A module path inside a decoder layer -> our matmul name."""
    parts = path.split(".")
    last = parts[-1]
    if "shared_expert_gate" in parts:
        return "shared_expert_gate"
    if "shared_expert" in parts and last in DENSE_MLP:
        return "shared_expert." + last
    if path.endswith(EXPERT_PARAMS):
        return next(p for p in EXPERT_PARAMS if path.endswith(p))
    if last in ALL_LINEAR:
        return last
    return None


def _forces_input_grads(emb: torch.nn.Module) -> bool:
    """Whether the input embeddings' output requires grad: they train, or transformers'
    `enable_input_require_grads` hook is on them (peft adds it under gradient checkpointing). Read
    from the hooks, never by running the module (safe on sharded FSDP2 modules)."""
    if getattr(emb, "weight", None) is not None and emb.weight.requires_grad:
        return True
    return any(getattr(h, "__name__", "") == "make_inputs_require_grads" for h in emb._forward_hooks.values())
