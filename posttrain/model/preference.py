"""Preference-optimisation pieces as pure functions: per-document log-probs of a packed batch of
pairs, and the pairwise losses (DPO and its variants). Formulas: docs/recipes.md.

A batch of pairs holds, per unit, two documents: chosen then rejected (posttrain.data.pairs), so
documents 0, 2, 4, ... are the chosen sides and 1, 3, 5, ... the rejected ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.packing import target_doc_index
from .loss import count_targets, target_hidden, token_logprobs

LOSSES = ("sigmoid", "ipo", "hinge", "simpo")


@dataclass
class PairLogps:
    chosen: torch.Tensor  # [pairs] sum of log p over each chosen completion's tokens
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor  # [pairs] scored tokens per side
    rejected_tokens: torch.Tensor

    def normalised(self) -> "PairLogps":
        """Per-token means instead of sums (length normalisation)."""
        return PairLogps(self.chosen / self.chosen_tokens, self.rejected / self.rejected_tokens,
                         self.chosen_tokens, self.rejected_tokens)


def document_logps(model: torch.nn.Module, batch: dict, vocab_size: int | None = None, *,
                   chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of target-token log-probs, number of target tokens) per document of the batch, fp32."""
    hidden, targets = target_hidden(model, batch, vocab_size)
    lp = token_logprobs(model, hidden, targets, vocab_size, chunk_tokens=chunk_tokens)
    return per_document(batch, lp)


def per_document(batch: dict, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx = target_doc_index(batch)
    n_docs = len(batch["doc_lens"]) + 1  # + the padding tail of a packed row (never a target)
    sums = values.new_zeros(n_docs).index_add(0, idx, values)
    counts = torch.zeros(n_docs, device=values.device).index_add_(0, idx, torch.ones_like(values))
    return sums[:-1], counts[:-1]


def pair_logps(model: torch.nn.Module, batch: dict, vocab_size: int | None = None, *,
               chunk_tokens: int | None = None) -> PairLogps:
    if any(n != 2 for n in batch["unit_docs"]):
        raise ValueError("pair_logps: every unit of the batch must be a (chosen, rejected) pair")
    sums, counts = document_logps(model, batch, vocab_size, chunk_tokens=chunk_tokens)
    return PairLogps(sums[0::2], sums[1::2], counts[0::2], counts[1::2])


def pair_token_counts(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Scored tokens of the chosen and rejected sides, from the labels alone (no forward)."""
    _, counts = per_document(batch, torch.ones(count_targets(batch["labels"]), device=batch["labels"].device))
    return counts[0::2], counts[1::2]


def preference_loss(pi: PairLogps, ref: PairLogps | None, *, loss: str = "sigmoid", beta: float = 0.1,
                    label_smoothing: float = 0.0, gamma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair (loss, chosen reward, rejected reward). SimPO is reference-free (`ref` is ignored).

    h = beta * [(pi_c - ref_c) - (pi_r - ref_r)]        (simpo: beta * (pi_c - pi_r) - gamma)
    sigmoid: -(1 - eps) log sigma(h) - eps log sigma(-h)   (eps = label_smoothing: cDPO / robust)
    ipo:     ((pi_c - ref_c) - (pi_r - ref_r) - 1 / (2 beta))^2
    hinge:   max(0, 1 - h)
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown preference loss {loss!r}; choose one of {LOSSES}")
    if ref is None or loss == "simpo":
        if loss != "simpo":
            raise ValueError(f"loss {loss!r} needs reference log-probs; only 'simpo' is reference-free")
        rc, rr = pi.chosen, pi.rejected
    else:
        rc, rr = pi.chosen - ref.chosen, pi.rejected - ref.rejected
    chosen_reward, rejected_reward = beta * rc.detach(), beta * rr.detach()
    delta = rc - rr
    if loss == "ipo":
        return (delta - 1.0 / (2.0 * beta)) ** 2, chosen_reward, rejected_reward
    h = beta * delta - (gamma if loss == "simpo" else 0.0)
    if loss == "hinge":
        return torch.relu(1.0 - h), chosen_reward, rejected_reward
    out = -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return out, chosen_reward, rejected_reward
