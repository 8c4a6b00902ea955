"""GRPO and its variants (Dr. GRPO, DAPO's clip-higher / dynamic sampling / overlong masking, GSPO).

    prompts  <- {prompt, ...fields the rewards read} records; a rollout engine (vLLM or the HF model)
    for step in 1..S:
        P prompts -> G completions each, with the engine's sampling log-probs  b(y_t)
        r_i      = sum_f w_f * reward_f(prompt, completion_i, fields)
        A_i      = (r_i - mean_group(r)) / std        std: group | batch | none
        [drop completions cut at max_new_tokens; drop groups whose rewards are all equal]
        ref_t    = log pi_ref(y_t)                    (beta > 0)
        old_t    = log pi_old(y_t)                    (computed once when the step makes several updates)
        for epoch in 1..ppo_epochs, minibatch in 1..minibatches:
            rho_t  = pi/pi_old per token, or GSPO's per-sequence exp(mean_t log pi/pi_old)
            l_t    = w_t * -min(rho_t A, clip(rho_t, 1 - clip_low, 1 + clip_high) A)
                     + beta * KL_t(pi || pi_ref) - entropy_coef * H_t
                     w_t = min(pi_old / b, cap) (truncate) or masked above cap: rollout/trainer mismatch
            loss   = token_mean | seq_mean_token_mean | seq_mean_token_sum_norm of l  (over the minibatch,
                     all workers)
            backward, clip, AdamW, schedule
        push the new weights into the rollout engine
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..config import JobConfig, Strict
from ..data.packing import target_doc_index
from ..model.loss import count_targets
from ..model.rl import aggregate, clipped_surrogate, completion_logps, is_weights, kl_penalty, ratios
from ..workflow.engine import Engine
from ..workflow.rewards import Rewards, RewardSpec
from ..workflow.rl import Rollouts
from ..workflow.rollout import EngineConfig, Sampling


class Config(Strict):
    rewards: list[RewardSpec] = Field(min_length=1, description="reward functions by import path (or reward models), with weights")
    reward_on_error: Literal["error", "zero"] = Field("error", description="a reward function that raises or returns a non-number: stop, or score 0 and count")
    prompts_per_step: int = Field(8, ge=1, description="prompts sampled per step (all workers together)")
    group_size: int = Field(8, ge=2, description="completions per prompt (G)")
    sampling: Sampling = Field(default_factory=Sampling, description="how completions are sampled (temperature > 0)")
    rollout: EngineConfig = Field(default_factory=EngineConfig, description="the rollout engine and where it runs")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="advantage scale: group std, batch std, or none (Dr. GRPO)")
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = Field(
        "token_mean", description="token mean over the update, mean over sequences of their token mean, or of their token sum / max_new_tokens (Dr. GRPO)")
    ratio_level: Literal["token", "sequence"] = Field("token", description="sequence: GSPO's sequence-level ratio")
    clip_low: float = Field(0.2, ge=0, lt=1, description="the ratio is clipped below at 1 - clip_low")
    clip_high: float = Field(0.2, ge=0, description="the ratio is clipped above at 1 + clip_high (DAPO clip-higher: e.g. 0.28)")
    beta: float = Field(0.0, ge=0, description="KL-to-reference coefficient (0: no reference model)")
    kl_estimator: Literal["k1", "k3"] = Field("k3", description="k1: log pi - log pi_ref; k3: exp(d) - d - 1 with d = log pi_ref - log pi")
    reference: str = Field("auto", description="auto | adapters | copy | a model dir (auto: adapters with LoRA, else copy)")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus coefficient")
    ppo_epochs: int = Field(1, ge=1, description="passes over each step's completions")
    minibatches: int = Field(1, ge=1, description="optimizer updates per pass")
    importance_correction: Literal["truncate", "mask"] | None = Field(
        "truncate", description="correct for the rollout engine / trainer log-prob mismatch: truncate (TIS) or mask (MIS) at importance_cap")
    importance_cap: float = Field(2.0, gt=1, description="the cap C of the rollout/trainer importance weight")
    mask_truncated: bool = Field(False, description="leave completions cut at max_new_tokens out of the loss (DAPO overlong filtering)")
    filter_zero_variance: bool = Field(False, description="leave groups whose rewards are all equal out of the loss (DAPO dynamic sampling)")

    def model_paths(self) -> dict[str, str]:
        """Model directories this section names (checked by `posttrain validate`)."""
        paths = {} if self.reference in ("auto", "adapters", "copy") else {"reference": self.reference}
        return paths | {f"rewards[{i}].model": r.model for i, r in enumerate(self.rewards) if r.model}

    def ray_resources(self) -> dict[str, float]:
        """Ray resources beyond the policy workers: the engine's and reward models' actors placed apart."""
        out: dict[str, float] = {}
        for part in (self.rollout, *self.rewards):
            for k, v in part.ray_resources().items():
                out[k] = out.get(k, 0.0) + v
        return {k: v for k, v in out.items() if v}

    @model_validator(mode="after")
    def _sampled(self):
        if self.sampling.temperature == 0:
            raise ValueError("sampling.temperature: GRPO needs sampled completions (temperature > 0)")
        return self


def run(cfg: JobConfig, run_dir: Path) -> dict:
    c: Config = cfg.section
    updates = c.ppo_epochs * c.minibatches
    job = Engine.setup(cfg, run_dir, updates_per_step=updates)
    lp = dict(vocab_size=job.vocab, temperature=c.sampling.temperature, chunk_tokens=cfg.model.loss_chunk_tokens)
    ref = job.frozen(("adapters" if cfg.model.lora else "copy") if c.reference == "auto" else c.reference) if c.beta else None
    rewards = Rewards(c.rewards, on_error=c.reward_on_error, key="grpo.rewards", device=job.device, dtype=job.dtype)
    rollouts = Rollouts(job, prompts_per_step=c.prompts_per_step, group_size=c.group_size, sampling=c.sampling,
                        engine=c.rollout, rewards=rewards, scale_rewards=c.scale_rewards,
                        mask_truncated=c.mask_truncated, filter_zero_variance=c.filter_zero_variance, minibatches=c.minibatches)

    for step in job.steps(rollouts):
        with rollouts.phase("reference"), torch.no_grad():
            for b in step.micro:
                if ref is not None:
                    b["ref_logp"] = ref.forward(completion_logps, b, **lp)[0]
                if updates > 1:  # off-policy after the first update: the ratio's denominator, fixed
                    b["old_logp"] = job.forward(completion_logps, b, **lp)[0]
        with rollouts.phase("train"):
            for epoch in range(c.ppo_epochs):
                for k in range(c.minibatches):
                    mine = lambda b: b["minibatch"] == k  # noqa: E731
                    tokens = step.total(lambda b: count_targets(b["labels"]) * b["weight"] * mine(b))
                    seqs = step.total(lambda b: len(b["doc_lens"]) * b["weight"] * mine(b))
                    for b in filter(mine, step.micro):
                        logp, entropy = job.forward(completion_logps, b, **lp, entropy=True if c.entropy_coef else "metric" if epoch == 0 else False)
                        doc, n_docs = target_doc_index(b), len(b["doc_lens"])
                        old = b["old_logp"] if updates > 1 else logp.detach()
                        adv = b["advantages"][doc]
                        pg, clipped = clipped_surrogate(ratios(logp, old, doc, n_docs, c.ratio_level), adv, c.clip_low, c.clip_high)
                        w = is_weights(old, b["behaviour_logp"], c.importance_correction, c.importance_cap)
                        per_token = w * pg
                        kl = kl_penalty(logp, b["ref_logp"], c.kl_estimator) if ref is not None else None
                        if kl is not None:
                            per_token = per_token + c.beta * kl
                        if c.entropy_coef:
                            per_token = per_token - c.entropy_coef * entropy
                        loss = aggregate(per_token, doc, n_docs, c.loss_aggregation, total_tokens=tokens, total_seqs=seqs,
                                         max_tokens=c.sampling.max_new_tokens)
                        step.backward(loss * b["weight"], **(_metrics(b, old, w, clipped, entropy, kl, tokens * c.minibatches,
                                                                      c.importance_correction is not None) if epoch == 0 else {}))
                        if epoch == 0:
                            step.log_max(**{"rollout/logp_diff_max": (old - b["behaviour_logp"]).abs().max() * b["weight"],
                                            "importance/weight_max": w.max() * b["weight"]})
                    step.update()
        rollouts.sync(step.index)
        step.log(**rollouts.metrics)
        step.log_max(**rollouts.take_times())
    return job.finish()


def _metrics(b: dict, old, w, clipped, entropy, kl, norm: float, corrects: bool) -> dict:
    """Token-mean metrics of the step, as this micro-batch's share."""
    s = b["weight"] / max(norm, 1)
    m = {
        "rollout/logp_diff_mean": (old - b["behaviour_logp"]).abs().sum() * s,
        "importance/weight_mean": w.sum() * s, "clip_fraction": clipped.float().sum() * s,
        # tokens whose weight was capped or masked
        "importance/corrected": (torch.exp(old - b["behaviour_logp"]) != w).float().sum() * s * corrects,
        "entropy": entropy.detach().sum() * s,
    }
    if kl is not None:
        m["kl"] = kl.detach().sum() * s
    return m
