"""Direct Preference Optimization and its variants: IPO, hinge (SLiC), SimPO, cDPO, RPO.

    data  <- {prompt, chosen, rejected} records; a pair is one packing unit of two documents
    ref   <- frozen reference: the policy with LoRA adapters off, a frozen copy of the starting
             policy, or another model; or its log-probs computed once before training
    for step in 1..S:
        P = pairs in the global step (all micro-batches, all workers)
        for each micro-batch:
            pi_c, pi_r = sum of log p_policy over the chosen / rejected completion tokens
                         (per-token mean with length_normalize: default for ipo and simpo)
            r_c, r_r   = the same under the reference (none for simpo)
            loss_i     = L(beta * ((pi_c - r_c) - (pi_r - r_r)))      L: sigmoid | ipo | hinge | simpo
            loss       = sum_i loss_i / P  [+ rpo_alpha * NLL of the chosen tokens / their count]
        backward, clip, AdamW, schedule
    log rewards beta * (pi - r) of each side, their margin and accuracy, log-probs
    every train.eval_every steps: the same loss and rewards over all pairs of data.eval_sources (the
    reference computed live there, also with precompute_reference)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ..config import JobConfig, Strict
from ..data.pairs import encode_pair_record
from ..model.preference import PairLogps, pair_logps, pair_token_counts, preference_loss
from ..workflow.engine import Engine


class Config(Strict):
    beta: float = Field(0.1, gt=0, description="strength of the KL constraint to the reference (simpo: reward scale)")
    loss: Literal["sigmoid", "ipo", "hinge", "simpo"] = Field(
        "sigmoid", description="sigmoid (DPO), ipo, hinge (SLiC) or simpo (reference-free)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="sigmoid/simpo: assumed label noise (cDPO)")
    gamma: float = Field(0.5, ge=0, description="simpo: target reward margin")
    rpo_alpha: float | None = Field(None, ge=0, description="weight of an NLL term on the chosen tokens (RPO)")
    length_normalize: bool | None = Field(None, description="per-token mean log-probs (null: true for ipo, simpo)")
    reference: str = Field("auto", description="auto | adapters | copy | a model dir (auto: adapters with LoRA, else copy)")
    precompute_reference: bool = Field(False, description="reference log-probs computed once before training")

    def model_paths(self) -> dict[str, str]:
        """Model directories this section names (checked by `posttrain validate`)."""
        return {} if self.reference in ("auto", "adapters", "copy") else {"reference": self.reference}


def run(cfg: JobConfig, run_dir: Path) -> dict:
    c: Config = cfg.section
    job = Engine.setup(cfg, run_dir)
    logps = dict(vocab_size=job.vocab, chunk_tokens=cfg.model.loss_chunk_tokens)
    norm = c.length_normalize if c.length_normalize is not None else c.loss in ("ipo", "simpo")
    ref = None
    if c.loss != "simpo":
        frozen = job.frozen(("adapters" if cfg.model.lora else "copy") if c.reference == "auto" else c.reference)
        ref = live = lambda b: frozen.forward(pair_logps, b, **logps)  # noqa: E731
        if c.precompute_reference:
            table = job.precompute("reference_logps", lambda b: _rows(live(b)), encode_pair_record)
            ref = lambda b: _from_rows(torch.stack([table[w] for w in b["unit_where"]]).to(job.device))  # noqa: E731

    def pair_losses(b: dict, ref_fn) -> tuple[PairLogps, torch.Tensor, torch.Tensor, torch.Tensor]:
        pi, r = job.forward(pair_logps, b, **logps), ref_fn(b) if ref_fn else None
        return pi, *preference_loss(
            pi.normalised() if norm else pi, (r.normalised() if norm else r) if r else None,
            loss=c.loss, beta=c.beta, label_smoothing=c.label_smoothing, gamma=c.gamma,
        )

    def held_out(b: dict) -> dict:
        """Sums over one held-out batch's pairs (the reference live: no precomputed row covers them)."""
        pi, losses, rw_c, rw_r = pair_losses(b, live if ref else None)
        n = len(b["unit_docs"])
        out = {"loss": (losses.sum(), n), "rewards/chosen": (rw_c.sum(), n), "rewards/rejected": (rw_r.sum(), n),
               "rewards/margin": ((rw_c - rw_r).sum(), n), "rewards/accuracy": ((rw_c > rw_r).sum(), n)}
        if c.rpo_alpha:
            out["nll_loss"] = nll = (-pi.chosen.sum(), float(pair_token_counts(b)[0].sum()))
            out["loss"] = [(losses.sum(), n, 1.0), (*nll, c.rpo_alpha)]
        return out

    for step in job.steps(job.loader(encode_pair_record), eval_fn=held_out):
        pairs = step.total(lambda b: len(b["unit_docs"]))
        chosen_tokens = step.total(lambda b: float(pair_token_counts(b)[0].sum())) if c.rpo_alpha else None
        for b in step.micro:
            pi, losses, rw_c, rw_r = pair_losses(b, ref)
            loss = losses.sum() / pairs
            extra = {}
            if c.rpo_alpha:
                extra["nll_loss"] = -pi.chosen.sum() / chosen_tokens
                loss = loss + c.rpo_alpha * extra["nll_loss"]
            step.backward(
                loss, **extra, **{
                    "rewards/chosen": rw_c.sum() / pairs, "rewards/rejected": rw_r.sum() / pairs,
                    "rewards/margin": (rw_c - rw_r).sum() / pairs, "rewards/accuracy": (rw_c > rw_r).sum() / pairs,
                    "logps/chosen": pi.chosen.detach().sum() / pairs, "logps/rejected": pi.rejected.detach().sum() / pairs,
                },
            )
        step.update()
    return job.finish()


def _rows(p: PairLogps) -> torch.Tensor:
    return torch.stack([p.chosen, p.rejected, p.chosen_tokens, p.rejected_tokens], dim=1)


def _from_rows(rows: torch.Tensor) -> PairLogps:
    return PairLogps(*rows.unbind(1))
