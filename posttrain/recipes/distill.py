"""Knowledge distillation: a frozen teacher's next-token distributions teach a student.

    teacher <- any supported causal LM sharing the student's tokenizer (refused otherwise, with both
               fingerprints), frozen, sharded like the student
    data    <- the student's SFT data: divergences are taken on the assistant tokens (labels != -100)
    for step in 1..S:
        N = target tokens of the global step
        for each micro-batch:
            p_t, p_s = softmax(teacher / T), softmax(student / T)      at every target position
            D        = T^2 * {KL(p_t||p_s) | KL(p_s||p_t) | generalised JSD(beta)}  [top-k: on the
                       teacher's k most likely ids, renormalised]
            loss     = (1 - alpha) * sum D / N + alpha * sum CE(student, label) / N
        backward, clip, AdamW, schedule
    every train.eval_every steps: the same loss over all target tokens of data.eval_sources
    chunked: neither model's [tokens, vocab] logits ever exist (posttrain.model.kd)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from ..config import JobConfig, Strict
from ..model.kd import batch_kd_loss, selected_hidden
from ..model.loss import count_targets
from ..workflow.engine import Engine


class Config(Strict):
    teacher: str = Field(description="the teacher's model directory (or hub id); must share the student's tokenizer")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="forward_kl (KL(teacher||student)), reverse_kl, or jsd (generalised Jensen-Shannon, see beta)")
    beta: float = Field(0.5, ge=0, le=1, description="jsd: mixture weight of the teacher (0: forward KL, 1: reverse KL)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of both teacher and student logits")
    alpha: float = Field(0.0, ge=0, le=1, description="weight of the hard-label cross-entropy")
    top_k: int | None = Field(None, ge=1, description="divergence on the teacher's top-k ids only (renormalised)")

    def model_paths(self) -> dict[str, str]:
        """Model directories this section names (checked by `posttrain validate`)."""
        return {"teacher": self.teacher}


def run(cfg: JobConfig, run_dir: Path) -> dict:
    c: Config = cfg.section
    job = Engine.setup(cfg, run_dir)
    teacher = job.frozen(c.teacher)
    kd = dict(divergence=c.divergence, beta=c.beta, temperature=c.temperature, top_k=c.top_k,
              chunk_tokens=cfg.model.loss_chunk_tokens, vocab_size=job.vocab, with_ce=c.alpha > 0)

    def losses(b: dict):
        t_hidden = teacher.forward(selected_hidden, b, job.vocab)
        with teacher.gathered():  # the teacher's head runs inside the student's loss
            return job.forward(batch_kd_loss, b, teacher.model, t_hidden, **kd)

    def held_out(b: dict) -> dict:
        out, n = losses(b), count_targets(b["labels"])
        if out.ce_sum is None:
            return {"loss": (out.kd_sum, n)}
        return {"loss": [(out.kd_sum, n, 1 - c.alpha), (out.ce_sum, n, c.alpha)], "kd_loss": (out.kd_sum, n),
                "ce_loss": (out.ce_sum, n)}

    for step in job.steps(job.loader(), eval_fn=held_out):
        n = step.targets()
        for b in step.micro:
            out = losses(b)
            kd_part = out.kd_sum / n
            if out.ce_sum is None:
                step.backward(kd_part, kd_loss=kd_part)
            else:
                ce_part = out.ce_sum / n
                step.backward((1 - c.alpha) * kd_part + c.alpha * ce_part, kd_loss=kd_part, ce_loss=ce_part)
        step.update()
    return job.finish()
