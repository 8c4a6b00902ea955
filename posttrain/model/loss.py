"""Losses computed outside the model.

Run the decoder to hidden states, keep only the positions that predict a target (label != -100
after the causal shift), apply the output head to those alone, and sum the cross-entropy in fp32.
The recipe divides the sum by the target-token count of the whole optimizer step, so the loss is a
token-mean over the step whatever the micro-batching (no mean-of-means bias).

Padded vocabulary rows (ids >= the tokenizer's length) are cut from the logits: they are never
targets and take no probability mass, exactly as at sampling time where they are suppressed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .load import unwrap

IGNORE = -100


def count_targets(labels: torch.Tensor) -> int:
    return int((labels[..., 1:] != IGNORE).sum())


def hidden_states(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    decoder = unwrap(model).get_decoder()
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if batch.get(k) is not None}
    return decoder(input_ids=batch["input_ids"], use_cache=False, **kwargs).last_hidden_state


def head_logits(model: torch.nn.Module, hidden: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """Output head on selected hidden states -> fp32 logits over the real vocabulary."""
    base = unwrap(model)
    logits = base.get_output_embeddings()(hidden).float()
    cap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits[..., :vocab_size] if vocab_size is not None else logits


def ce_sum(model: torch.nn.Module, batch: dict, vocab_size: int | None = None) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over target positions, and their count."""
    labels = batch["labels"][:, 1:]
    sel = labels != IGNORE
    n = int(sel.sum())
    if vocab_size is not None and n and int(labels[sel].max()) >= vocab_size:
        raise ValueError(f"a label id >= the real vocabulary size {vocab_size}: padded rows are never targets")
    hidden = hidden_states(model, batch)[:, :-1][sel]
    logits = head_logits(model, hidden, vocab_size)
    return F.cross_entropy(logits, labels[sel], reduction="sum"), n


def backward_token_mean(model: torch.nn.Module, micro_batches: list[dict], vocab_size: int | None = None) -> tuple[float, int]:
    """Backward the token-mean CE of an optimizer step made of several micro-batches.

    Each micro-batch's CE *sum* is divided by the target count N of the whole step before its
    backward, so the accumulated gradient is that of sum(all CE) / N: identical to one big batch,
    however the tokens are split. Returns (loss value, N).
    """
    n = sum(count_targets(mb["labels"]) for mb in micro_batches)
    total = 0.0
    for mb in micro_batches:
        loss_sum, _ = ce_sum(model, mb, vocab_size)
        loss = loss_sum / max(n, 1)
        loss.backward()
        total += loss.item()
    return total, n
