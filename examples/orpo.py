"""ORPO (Hong et al., 2024) as a recipe written outside the package: odds-ratio preference
optimisation, monolithic (no SFT stage, no reference model). A job selects it by file path and
configures it in its own `orpo:` section:

    recipe: examples/orpo.py:run
    orpo: {lam: 0.1}

    for each pair: m_c, m_r = mean log p over the chosen / rejected completion tokens
                   log odds(y) = m - log(1 - exp(m))
    loss = NLL(chosen tokens) / chosen tokens in the step + lam * sum_i -log sigmoid(log odds_c - log odds_r) / pairs
"""

import torch
import torch.nn.functional as F
from pydantic import Field

from posttrain.config import Strict
from posttrain.data.pairs import encode_pair_record
from posttrain.model.preference import pair_logps, pair_token_counts
from posttrain.workflow.engine import Engine

SECTION = "orpo"


class Config(Strict):
    lam: float = Field(0.1, ge=0, description="weight of the odds-ratio term")


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    return mean_logp - torch.log(-torch.expm1(mean_logp))  # log(1 - e^m), stable for m < 0


def run(cfg, run_dir):
    lam = cfg.section.lam
    job = Engine.setup(cfg, run_dir)
    for step in job.steps(job.loader(encode_pair_record)):
        pairs = step.total(lambda b: len(b["unit_docs"]))
        chosen_tokens = step.total(lambda b: float(pair_token_counts(b)[0].sum()))
        for b in step.micro:
            lp = job.forward(pair_logps, b, job.vocab, chunk_tokens=cfg.model.loss_chunk_tokens)
            mean = lp.normalised()
            ratio = log_odds(mean.chosen) - log_odds(mean.rejected)
            nll = -lp.chosen.sum() / chosen_tokens
            odds_loss = -F.logsigmoid(ratio).sum() / pairs
            step.backward(nll + lam * odds_loss, nll_loss=nll, or_loss=odds_loss,
                          **{"rewards/accuracy": (ratio > 0).sum() / pairs})
        step.update()
    return job.finish()
