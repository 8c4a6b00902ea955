"""GRPO-family policy-gradient math as pure functions (formulas: docs/recipes.md, "GRPO").

Per-token tensors are flat over a batch's loss targets in the order `target_hidden` picks them
([N]); `doc` [N] gives each token's completion (an index into the batch's documents) and per-sequence
tensors are [D]. Nothing here knows about models, ranks or micro-batches: `aggregate` takes the
*global* normalisers (over every micro-batch and worker of the update), so summing its results over
micro-batches and workers gives the loss of the whole update, whatever the split.
"""

from __future__ import annotations

from typing import Literal

import torch

from .loss import chunked_apply, target_hidden

Scale = Literal["group", "batch", "none"]
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]


def group_advantages(rewards: torch.Tensor, group_size: int, scale: Scale = "group", eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean of its group) / s, with s the group's std (`group`), the std of all rewards
    of the batch (`batch`) or 1 (`none`, Dr. GRPO). Rewards are [P * G], groups contiguous."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    centered = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        centered = centered / (r.std(dim=1, keepdim=True) + eps) if group_size > 1 else centered
    elif scale == "batch":
        centered = centered / (r.std() + eps) if r.numel() > 1 else centered
    elif scale != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale!r}")
    return centered.reshape(-1)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[P] bool: groups whose rewards are all equal (no learning signal from the advantage)."""
    r = rewards.view(-1, group_size)
    return (r == r[:, :1]).all(dim=1)


def seq_sum(values: torch.Tensor, doc: torch.Tensor, n_docs: int) -> torch.Tensor:
    """Per-sequence sums [D] of per-token values [N]."""
    return values.new_zeros(n_docs).index_add(0, doc, values)


def ratios(logp: torch.Tensor, old_logp: torch.Tensor, doc: torch.Tensor, n_docs: int,
           level: Literal["token", "sequence"] = "token") -> torch.Tensor:
    """Importance ratios pi/pi_old per token. `sequence` (GSPO): every token of sequence i carries
    s_i = exp(mean_t(logp - old_logp)) as its value, with the gradient of s_i * mean_t(log pi)
    spread over its tokens (GSPO-token: sg[s_i] * pi_t / sg[pi_t])."""
    delta = logp - old_logp
    if level == "token":
        return torch.exp(delta)
    if level != "sequence":
        raise ValueError(f"ratio level must be token or sequence, got {level!r}")
    lens = seq_sum(torch.ones_like(delta), doc, n_docs).clamp(min=1)
    s = torch.exp(seq_sum(delta.detach(), doc, n_docs) / lens)
    return s[doc] * torch.exp(logp - logp.detach())


def clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token loss -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A), and where the clip is
    active (the clipped term is the smaller one and differs from the unclipped)."""
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    active = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
    return -torch.minimum(unclipped, clipped), active


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: Literal["k1", "k3"] = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) on samples from pi: k1 = log pi - log pi_ref;
    k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 (unbiased, always >= 0)."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        d = ref_logp - logp
        return torch.exp(d) - d - 1
    raise ValueError(f"kl estimator must be k1 or k3, got {estimator!r}")


def is_weights(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, mode: Literal["truncate", "mask"] | None,
               cap: float) -> torch.Tensor:
    """Importance weights for the rollout engine / trainer mismatch, w = pi_old(trainer) / pi_behaviour
    (engine), per token, without gradient: `truncate` min(w, cap) (TIS); `mask` w where w <= cap,
    else 0 (MIS); None: 1."""
    if mode is None:
        return torch.ones_like(old_logp)
    w = torch.exp(old_logp.detach() - behaviour_logp)
    if mode == "truncate":
        return w.clamp(max=cap)
    if mode == "mask":
        return torch.where(w <= cap, w, torch.zeros_like(w))
    raise ValueError(f"importance correction must be truncate, mask or null, got {mode!r}")


def aggregate(per_token: torch.Tensor, doc: torch.Tensor, n_docs: int, mode: Aggregation, *,
              total_tokens: float, total_seqs: float, max_tokens: int | None = None) -> torch.Tensor:
    """This batch's share of the update's loss from per-token losses [N]:
    - token_mean: sum over tokens / total_tokens (every token of the update weighs the same);
    - seq_mean_token_mean: sum over sequences of (their token mean) / total_seqs;
    - seq_mean_token_sum_norm (Dr. GRPO): sum over sequences of (their token sum / max_tokens) / total_seqs.
    `total_*` are counts over the whole update (all micro-batches and workers)."""
    if mode == "token_mean":
        return per_token.sum() / max(total_tokens, 1)
    sums = seq_sum(per_token, doc, n_docs)
    if mode == "seq_mean_token_mean":
        lens = seq_sum(torch.ones_like(per_token), doc, n_docs).clamp(min=1)
        return (sums / lens).sum() / max(total_seqs, 1)
    if mode == "seq_mean_token_sum_norm":
        if not max_tokens:
            raise ValueError("seq_mean_token_sum_norm needs max_tokens (the generation length limit)")
        return (sums / max_tokens).sum() / max(total_seqs, 1)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-row entropy of softmax(logits) (fp32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def completion_logps(model: torch.nn.Module, batch: dict, vocab_size: int | None = None, *, temperature: float = 1.0,
                     entropy: bool | Literal["metric"] = False, chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log-probs [N] of the batch's targets (the completion tokens) under softmax(logits / T), the
    distribution the rollout engine sampled from, over the real vocabulary; and with `entropy`, the
    entropy [N] of that distribution at each position (`"metric"`: without a gradient, for logging
    only, so the backward does not go through it). Chunked head, fp32."""
    hidden, targets = target_hidden(model, batch, vocab_size)
    t = float(temperature) if temperature and temperature > 0 else 1.0

    def rows(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lp = torch.log_softmax(logits if t == 1.0 else logits / t, dim=-1)  # x / 1 is x: the same values, no pass
        picked = lp.gather(1, y[:, None])
        if not entropy:
            return picked
        p = lp.detach() if entropy == "metric" else lp
        return torch.cat([picked, -(p.exp() * p).sum(-1, keepdim=True)], dim=1)

    out = chunked_apply(model, hidden, rows, vocab_size=vocab_size, chunk_tokens=chunk_tokens, extras=(targets,), cat=True)
    if out.dim() == 1:  # no targets
        out = out.view(0, 2 if entropy else 1)
    return out[:, 0], (None if not entropy else out[:, 1].detach() if entropy == "metric" else out[:, 1])
