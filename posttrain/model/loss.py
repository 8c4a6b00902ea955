"""Losses computed outside the model, with the output head applied in chunks.

Run the decoder to hidden states, keep only the positions that predict a target (label != -100
after the causal shift), and apply the output head to those alone, `chunk_tokens` rows at a time:
the full [tokens, vocab] logits tensor never exists, neither in the forward nor in the backward.

Two ways to get there, chosen per call:
- fused (cross-entropy with a plain `nn.Linear` head, the SFT hot path): a custom autograd function
  computes, chunk by chunk, the CE sum *and* its gradients w.r.t. the hidden states and the head
  weight (softmax - onehot), so backward only scales stored gradients. Same matmul count as the
  naive path (3), memory: one chunk of logits plus the [vocab, hidden] weight gradient.
- generic (log-probs, distillation, any loss; a LoRA-wrapped or custom head): every chunk runs under
  `torch.utils.checkpoint(use_reentrant=False)`: its logits are dropped after the forward and
  recomputed, one chunk at a time, in the backward.

Family specifics live in `head_logits`: final logit soft-capping (Gemma), tied embeddings (the head
module *is* the embedding matrix, gradients accumulate into it), LoRA on the head (the peft module is
called as is), and padded vocabulary rows (ids >= the tokenizer's length) are cut: never targets,
no probability mass, exactly as at sampling time where they are suppressed.

The recipe divides the CE sum by the target-token count of the whole optimizer step, so the loss is
a token-mean over the step whatever the micro-batching (no mean-of-means bias). MoE router
load-balancing loss: see `backward_token_mean`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.packing import target_rows
from .hf import unwrap
from .tail import only_targets

IGNORE = -100
# auto chunk size: about this many bytes of fp32 logits per chunk
AUTO_CHUNK_BYTES = 256 * 2**20
# logits this small are kept for the backward instead of recomputed (`chunked_apply`)
SMALL_LOGITS_BYTES = 16 * 2**20


def count_targets(labels: torch.Tensor) -> int:
    return int((labels[..., 1:] != IGNORE).sum())


def auto_chunk_tokens(vocab_size: int) -> int:
    """Rows per chunk so that one chunk's fp32 logits take about 256 MiB (a power of two, >= 64):
    2048 at a 32k vocabulary, 256 at 152k / 256k."""
    rows = AUTO_CHUNK_BYTES // (4 * max(vocab_size, 1))
    return max(64, 2 ** int(math.log2(max(rows, 1))))


def _chunk(chunk_tokens: int | None, vocab_size: int) -> int:
    return int(chunk_tokens) if chunk_tokens else auto_chunk_tokens(vocab_size)


# ------------------------------------------------------------------------------------- decoder
def decoder_outputs(model: torch.nn.Module, batch: dict, *, router_logits: bool = False):
    """The decoder's output (last_hidden_state, and router_logits for an MoE model when asked)."""
    decoder = unwrap(model).get_decoder()
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if batch.get(k) is not None}
    if router_logits:
        kwargs["output_router_logits"] = True
    return decoder(input_ids=batch["input_ids"], use_cache=False, **kwargs)


def hidden_states(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return decoder_outputs(model, batch).last_hidden_state


def _targets(batch: dict, vocab_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [N]: flat indices into [B * T] of the positions that predict the targets (`target_rows`),
    the targets [N])."""
    labels = batch["labels"][:, 1:]
    targets = labels[labels != IGNORE]
    if vocab_size is not None and targets.numel() and int(targets.max()) >= vocab_size:
        raise ValueError(f"a label id >= the real vocabulary size {vocab_size}: padded rows are never targets")
    return target_rows(batch), targets


def select_targets(batch: dict, hidden: torch.Tensor, vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [N, H] of the positions that predict a target, and those targets [N]."""
    rows, targets = _targets(batch, vocab_size)
    return hidden.flatten(0, 1).index_select(0, rows), targets


def target_outputs(model: torch.nn.Module, batch: dict, vocab_size: int | None = None, *, router_logits: bool = False):
    """The decoder run for a loss: (its output, final hidden states [N, H] at the positions that predict a
    target, those targets [N]). Where the family allows, the last layer's output projection and MLP
    run at those positions only (model/tail.py)."""
    rows, targets = _targets(batch, vocab_size)
    with only_targets(model, rows) as pruned:
        out = decoder_outputs(model, batch, router_logits=router_logits)
    h = out.last_hidden_state
    return out, (h[0] if pruned else h.flatten(0, 1).index_select(0, rows)), targets


def target_hidden(model: torch.nn.Module, batch: dict, vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states [N, H] at the positions that predict a target, and those targets [N]."""
    return target_outputs(model, batch, vocab_size)[1:]


# ------------------------------------------------------------------------------------- the head
def _softcap(model: torch.nn.Module) -> float | None:
    return getattr(unwrap(model).config.get_text_config(), "final_logit_softcapping", None) or None


def head_logits(model: torch.nn.Module, hidden: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """Output head on (a chunk of) selected hidden states -> fp32 logits over the real vocabulary."""
    base = unwrap(model)
    logits = base.get_output_embeddings()(hidden).float()
    cap = _softcap(model)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits[..., :vocab_size] if vocab_size is not None else logits


def _real_vocab(model: torch.nn.Module, vocab_size: int | None) -> int:
    rows = unwrap(model).get_output_embeddings().weight.shape[0]
    return rows if vocab_size is None else min(int(vocab_size), rows)


class _FusedLinearCE(torch.autograd.Function):
    """sum_i CE(softcap(h_i W[:V]^T + b[:V]), y_i), chunk by chunk, gradients computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, vocab, cap, chunk, want_h, want_w, want_b):
        W = weight[:vocab]
        b = bias[:vocab] if bias is not None else None
        acc = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
        gh = torch.empty_like(hidden) if want_h else None
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        gb = torch.zeros(bias.shape, dtype=acc, device=bias.device) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h, y = hidden[s : s + chunk], targets[s : s + chunk]
            z = F.linear(h, W, b).float()
            t = None
            if cap:
                t = torch.tanh(z.div_(cap))
                z = t * cap
            zy = z.gather(1, y[:, None]).squeeze(1)
            m = z.amax(dim=-1, keepdim=True)
            e = z.sub_(m).exp_()  # in place of the logits: one exp pass serves the loss and the softmax
            s_ = e.sum(dim=-1, keepdim=True)
            total += (s_.log() + m).squeeze(1).sub_(zy).sum()
            if not (want_h or want_w or want_b):
                continue
            g = e.div_(s_)  # softmax
            g[torch.arange(g.shape[0], device=g.device), y] -= 1.0
            if cap:
                g.mul_(1.0 - t * t)  # d/dz cap*tanh(z/cap)
            del t
            if want_h:
                gh[s : s + chunk] = (g.to(W.dtype) @ W).to(hidden.dtype)
            if want_w:
                gw[:vocab].addmm_(g.t().to(acc), h.to(acc))
            if want_b:
                gb[:vocab] += g.sum(0).to(acc)
            del g, z, e
        ctx.grads = (gh, gw, gb)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw, gb = ctx.grads
        del ctx.grads
        hd, wd, bd = ctx.dtypes
        one = bool(grad_out == 1)  # the usual case: hand the stored tensors over, no copy

        def scale(g, d):
            return g.to(d) if one else (g * grad_out).to(d)

        return (
            scale(gh, hd) if gh is not None else None,
            scale(gw, wd) if gw is not None else None,
            scale(gb, bd) if gb is not None else None,
            None, None, None, None, None, None, None,
        )


def chunked_ce_sum(
    model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None,
    *, chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Sum over rows of CE(head(hidden_i), targets_i) in fp32, never holding more than one chunk of
    logits. `hidden` [N, H] are already-selected positions. Fused path for a plain nn.Linear head,
    per-chunk checkpointing otherwise (LoRA on the head, custom heads)."""
    V = _real_vocab(model, vocab_size)
    chunk = _chunk(chunk_tokens, V)
    if hidden.shape[0] == 0:
        return hidden.sum(dtype=torch.float32) * 0.0
    head = unwrap(model).get_output_embeddings()
    if type(head) is torch.nn.Linear:
        w, b = head.weight, head.bias
        grad = torch.is_grad_enabled()
        want = (grad and hidden.requires_grad, grad and w.requires_grad, grad and b is not None and b.requires_grad)
        return _FusedLinearCE.apply(hidden, w, b, targets, V, _softcap(model), chunk, *want)
    return chunked_apply(
        model, hidden, lambda logits, y: F.cross_entropy(logits, y, reduction="sum"), vocab_size=V,
        chunk_tokens=chunk, extras=(targets,),
        recompute_small=True,  # always checkpointed: the FLOP counter's HFU counts this head twice (flops.head_recompute)
    )


def chunked_apply(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    fn: Callable[..., torch.Tensor],
    *,
    vocab_size: int | None = None,
    chunk_tokens: int | None = None,
    extras: Sequence[torch.Tensor] = (),
    cat: bool = False,
    recompute_small: bool = False,
) -> torch.Tensor:
    """The generic chunked primitive: for each chunk of rows, `fn(logits_chunk, *extras_chunk)` where
    logits are fp32 over the real vocabulary (softcapped). Results are summed (scalars) or, with
    `cat=True`, concatenated (per-row tensors). Each chunk runs under non-reentrant activation
    checkpointing when gradients are on, so only one chunk's logits are alive, forward or backward;
    except where all the rows are one chunk whose logits take at most SMALL_LOGITS_BYTES (unless
    `recompute_small`): recomputing them in the backward would save next to nothing and cost the
    head's matmul and `fn` again (GRPO's log-probs and entropy of 1,897 targets over the demo's 598-token
    vocabulary, fwd + bwd: 13.8 vs 18.9 ms)."""
    V = _real_vocab(model, vocab_size)
    chunk = _chunk(chunk_tokens, V)

    def one(h, *ex):
        return fn(head_logits(model, h, V), *ex)

    small = not recompute_small and hidden.shape[0] <= chunk and hidden.shape[0] * V * 4 <= SMALL_LOGITS_BYTES
    outs = []
    for s in range(0, hidden.shape[0], chunk):
        args = (hidden[s : s + chunk], *(e[s : s + chunk] for e in extras))
        if torch.is_grad_enabled() and not small:
            outs.append(checkpoint(one, *args, use_reentrant=False))
        else:
            outs.append(one(*args))
    if not outs:
        return hidden.new_zeros((0,), dtype=torch.float32) if cat else hidden.sum(dtype=torch.float32) * 0.0
    return torch.cat(outs) if cat else torch.stack(outs).sum()


def _gather_logprobs(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def token_logprobs(
    model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None,
    *, chunk_tokens: int | None = None,
) -> torch.Tensor:
    """log p(targets_i | hidden_i) [N] in fp32, chunked (for DPO, RL, distillation, verification)."""
    return chunked_apply(model, hidden, _gather_logprobs, vocab_size=vocab_size, chunk_tokens=chunk_tokens,
                         extras=(targets,), cat=True)


def batch_logprobs(model: torch.nn.Module, batch: dict, vocab_size: int | None = None, *, chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target-token log-probs of a batch (decoder -> select label != -100 -> chunked head), and
    the boolean [B, T-1] mask telling where they sit."""
    hidden, targets = target_hidden(model, batch, vocab_size)
    return token_logprobs(model, hidden, targets, vocab_size, chunk_tokens=chunk_tokens), batch["labels"][:, 1:] != IGNORE


def teacher_head(teacher: torch.nn.Module, teacher_hidden: torch.Tensor, vocab_size: int | None = None) -> Callable[[slice], torch.Tensor]:
    """`rows -> teacher logits` for `chunked_distill`, computed without gradients, chunk by chunk."""

    def logits(rows: slice) -> torch.Tensor:
        with torch.no_grad():
            return head_logits(teacher, teacher_hidden[rows], vocab_size)

    return logits


def chunked_distill(
    student: torch.nn.Module,
    student_hidden: torch.Tensor,
    teacher_logits: Callable[[slice], torch.Tensor] | torch.Tensor,
    loss_fn: Callable[..., torch.Tensor],
    *,
    vocab_size: int | None = None,
    chunk_tokens: int | None = None,
    extras: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """Sum over chunks of `loss_fn(student_logits, teacher_logits, *extras_chunk)`.

    `teacher_logits` is either a function of a row slice (e.g. `teacher_head(teacher, t_hidden)`,
    so the teacher's logits are also materialised one chunk at a time) or a precomputed [N, V]
    tensor. Both logits are fp32 over the real vocabulary; `loss_fn` returns a scalar (a sum, so the
    caller can divide by the step's token count). Student chunks are checkpointed."""
    V = _real_vocab(student, vocab_size)
    chunk = _chunk(chunk_tokens, V)
    rows = torch.arange(student_hidden.shape[0], device=student_hidden.device)

    def one(h, r, *ex):
        sl = slice(int(r[0]), int(r[-1]) + 1)
        t = teacher_logits(sl) if callable(teacher_logits) else teacher_logits[sl]
        return loss_fn(head_logits(student, h, V), t.float()[..., :V], *ex)

    total = student_hidden.sum(dtype=torch.float32) * 0.0
    for s in range(0, student_hidden.shape[0], chunk):
        args = (student_hidden[s : s + chunk], rows[s : s + chunk], *(e[s : s + chunk] for e in extras))
        total = total + (checkpoint(one, *args, use_reentrant=False) if torch.is_grad_enabled() else one(*args))
    return total


# ------------------------------------------------------------------------------------- MoE aux
def router_aux_settings(model: torch.nn.Module) -> tuple[bool, float]:
    """(enabled, coefficient) of the router load-balancing loss, from the model config."""
    cfg = unwrap(model).config.get_text_config()
    on = bool(getattr(cfg, "output_router_logits", False)) and getattr(cfg, "num_experts", None) is not None
    return on, float(getattr(cfg, "router_aux_loss_coef", 0.0) or 0.0)


def load_balancing_loss(router_logits, num_experts: int, top_k: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, as transformers' Qwen3-MoE computes it
    (`load_balancing_loss_func`): num_experts * sum_e f_e * P_e, f_e the fraction of top-k
    assignments routed to expert e and P_e its mean router probability, over all layers' (non-padding)
    rows. Re-implemented so it is computed from the decoder's router logits on our path."""
    dev = router_logits[0].device
    f = torch.zeros(num_experts, dtype=torch.float32, device=dev)
    p = torch.zeros(num_experts, dtype=torch.float32, device=dev)
    rows = torch.zeros((), dtype=torch.float32, device=dev)
    m = attention_mask.reshape(-1).to(dev, torch.float32) if attention_mask is not None else None
    for layer in router_logits:
        probs = torch.softmax(layer.float(), dim=-1)
        top = torch.topk(probs, top_k, dim=-1).indices
        w = m if m is not None else torch.ones(probs.shape[0], device=dev)
        f = f + torch.zeros(num_experts, device=dev).scatter_add_(0, top.reshape(-1), w.repeat_interleave(top_k))
        p = p + (probs * w[:, None]).sum(0)
        rows = rows + w.sum()
    return num_experts * torch.sum((f / rows) * (p / rows))


# ------------------------------------------------------------------------------------- the loss
@dataclass
class LossParts:
    ce_sum: torch.Tensor  # fp32 sum of CE over target tokens
    n_targets: int
    aux: torch.Tensor | None = None  # router load-balancing loss of this micro-batch (a mean), if any


def lm_loss(model: torch.nn.Module, batch: dict, vocab_size: int | None = None, *, chunk_tokens: int | None = None) -> LossParts:
    aux_on, _ = router_aux_settings(model)
    out, hidden, targets = target_outputs(model, batch, vocab_size, router_logits=aux_on)
    ce = chunked_ce_sum(model, hidden, targets, vocab_size, chunk_tokens=chunk_tokens)
    aux = None
    if aux_on and getattr(out, "router_logits", None):
        cfg = unwrap(model).config.get_text_config()
        aux = load_balancing_loss(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok, batch.get("attention_mask"))
    return LossParts(ce, int(targets.numel()), aux)


def ce_sum(model: torch.nn.Module, batch: dict, vocab_size: int | None = None, *, chunk_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over target positions, and their count."""
    parts = lm_loss(model, batch, vocab_size, chunk_tokens=chunk_tokens)
    return parts.ce_sum, parts.n_targets


def backward_token_mean(
    model: torch.nn.Module, micro_batches: list[dict], vocab_size: int | None = None, *,
    chunk_tokens: int | None = None, metrics: dict | None = None,
    normalizer: int | None = None, grad_scale: float = 1.0, loss_fn: Callable | None = None,
) -> tuple[float, int]:
    """Backward the token-mean CE of an optimizer step made of several micro-batches.

    Each micro-batch's CE *sum* is divided by the target count N of the whole step before its
    backward, so the accumulated gradient is that of sum(all CE) / N: identical to one big batch,
    however the tokens are split. Returns (loss value, N).

    MoE: when the model config has `output_router_logits`, the router load-balancing loss of each
    micro-batch j (a mean over its rows, as transformers computes it) is added with weight
    coef * n_j / N (n_j its target tokens): the step loss is CE_mean + coef * (token-weighted mean of
    the micro-batch aux losses), which for a single micro-batch is exactly transformers'
    `CE_mean + router_aux_loss_coef * aux_loss`. `metrics` (if given) receives `ce_loss` and `aux_loss`.

    Data parallel: pass `normalizer` = the target count of the *global* step (all ranks) and
    `grad_scale` = world size when the gradient reduction averages over ranks (FSDP2 does), so the
    update equals one worker's over the same documents; the returned loss is this rank's share.
    `loss_fn(batch, vocab_size, chunk_tokens=...)` replaces `lm_loss(model, ...)` (the FSDP2 root
    module, whose forward must run so that sharded root weights are gathered).
    """
    n = normalizer if normalizer is not None else sum(count_targets(mb["labels"]) for mb in micro_batches)
    _, coef = router_aux_settings(model)
    total = 0.0
    parts_total: dict[str, float] = {}
    for mb in micro_batches:
        parts = (loss_fn or partial(lm_loss, model))(mb, vocab_size, chunk_tokens=chunk_tokens)
        loss, shares = token_mean_share(parts, n, coef)
        (loss * grad_scale if grad_scale != 1.0 else loss).backward()
        total += loss.item()
        for k, v in shares.items():
            parts_total[k] = parts_total.get(k, 0.0) + v.item()
    if metrics is not None:
        metrics.update(parts_total)
    return total, n


def token_mean_share(parts: LossParts, n: int, coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's share of the step's token-mean loss, `n` the step's target count:
    CE_sum / n, plus (MoE) coef * (n_j / n) * aux_j; and its parts {ce_loss, aux_loss}."""
    ce = parts.ce_sum / max(n, 1)
    shares = {"ce_loss": ce}
    if parts.aux is None:
        return ce, shares
    w = parts.n_targets / max(n, 1)
    shares["aux_loss"] = w * parts.aux
    return ce + coef * w * parts.aux, shares
