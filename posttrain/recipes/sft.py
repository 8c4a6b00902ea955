"""Supervised fine-tuning.

    data   <- conversations rendered with the model's chat template, labels on assistant tokens only,
              packed into fixed token budgets (documents isolated in attention)
    for step in 1..S:
        micro-batches b_1..b_k on each of W workers        (k = train.grad_accum)
        N    = target tokens of all k x W micro-batches    (the global step)
        loss = sum_j CE_sum(b_j) / N                       (a token-mean over the step, never a mean
                                                            of per-micro-batch means)
        MoE: + coef * sum_j (n_j / N) * aux_j              (router load balancing, as transformers)
        backward per micro-batch, clip, AdamW, schedule    (the engine: log, checkpoint, resume)
    every train.eval_every steps: eval/loss = CE_sum / target tokens over all of data.eval_sources
    export the HF model, sample from it
"""

from __future__ import annotations

from pathlib import Path

from ..config import JobConfig
from ..model.loss import ce_sum, lm_loss, router_aux_settings, token_mean_share
from ..workflow.engine import Engine


def run(cfg: JobConfig, run_dir: Path) -> dict:
    job = Engine.setup(cfg, run_dir)
    _, aux_coef = router_aux_settings(job.model)
    held_out = lambda b: {"loss": job.forward(ce_sum, b, job.vocab, chunk_tokens=cfg.model.loss_chunk_tokens)}  # noqa: E731
    for step in job.steps(job.loader(), eval_fn=held_out):
        n = step.targets()
        for b in step.micro:
            parts = job.forward(lm_loss, b, job.vocab, chunk_tokens=cfg.model.loss_chunk_tokens)
            loss, shares = token_mean_share(parts, n, aux_coef)
            step.backward(loss, **shares)
        step.update()
    return job.finish()
