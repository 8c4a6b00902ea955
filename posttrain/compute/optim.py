"""AdamW with warmup + cosine/linear/constant decay, on trainable parameters only."""

from __future__ import annotations

import math

import torch

from ..config import ConfigError, TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # no weight decay on biases and norm weights (1-d), as in GPT-2 / LLaMA recipes
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all tensors (2.9 vs 10 ms per update of the demo's 3.5M parameters on CPU)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, fused=True)


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Multiplier of the peak lr for optimizer step `s` (0-based): linear warmup, then decay to
    `min_lr_ratio` at the last step."""

    def f(s: int) -> float:
        if s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps - 1)
        progress = min(1.0, (s - cfg.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return f


class LRSchedule(torch.optim.lr_scheduler.LambdaLR):
    """`lr_lambda` over `span` optimizer updates. A checkpoint keeps `span` and `planned` (the updates
    train.steps asked for when that span was chosen) beside the scheduler's own state, so that a
    resume with another train.steps is noticed (`on_resume`) instead of silently reshaping the decay."""

    _OWN = ("cfg", "span", "planned", "saved", "_f")

    def __init__(self, opt: torch.optim.Optimizer, cfg: TrainConfig, total: int):
        self.cfg, self.span, self.planned, self.saved = cfg, total, total, None
        self._f = lr_lambda(cfg, total)
        super().__init__(opt, lambda s: self._f(s))

    def state_dict(self) -> dict:
        sd = {k: v for k, v in super().state_dict().items() if k not in self._OWN}
        sd["plan"] = {"span": self.span, "planned": self.planned}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.saved = state_dict.pop("plan", None)  # None: a checkpoint older than this field
        super().load_state_dict(state_dict)

    def factor_at(self, span: int, update: int) -> float:
        return lr_lambda(self.cfg, span)(update)

    def set_span(self, span: int, planned: int) -> None:
        """Lay the decay over `span` updates from now on; the current LR follows at once."""
        self.span, self.planned, self._f = span, planned, lr_lambda(self.cfg, span)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self._f(self.last_epoch)
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def on_resume(self, planned: int, per_step: int, choice: str, *, fallback: int | None, where: str) -> str | None:
        """After a checkpoint was loaded: reconcile its schedule with this run's `planned` updates
        (train.steps x `per_step` updates per step) by `choice` (train.on_steps_change). Returns a
        line saying what changed (None: nothing did); raises ConfigError for `error`. `fallback`:
        the planned updates of a checkpoint written before the plan was saved (its train.steps)."""
        saved = self.saved or ({"span": fallback, "planned": fallback} if fallback else None)
        if saved is None:
            return None
        self.set_span(saved["span"], saved["planned"])  # the checkpoint's schedule, as it was
        done = self.last_epoch
        if saved["planned"] == planned or done >= planned:  # same length, or nothing left to train
            return None
        lr = self.base_lrs[0]
        old, new = saved["planned"] // per_step, planned // per_step
        kept = self.factor_at(saved["span"], done) * lr
        fresh = self.factor_at(planned, done) * lr
        final = self.cfg.min_lr_ratio * lr if self.cfg.schedule != "constant" else lr
        span_steps = saved["span"] // per_step
        if self.cfg.schedule == "constant":  # warmup, then lr: nothing depends on the length
            self.set_span(planned, planned)
            return None
        if choice == "error":
            raise ConfigError(
                f"train.steps changed from {old} to {new} since {where} was written (resuming after step {done // per_step}); "
                f"its learning-rate schedule ({self.cfg.schedule} over {span_steps} steps, LR now {kept:.3g}) would change. "
                "Choose with train.on_steps_change (in the job file, or the override train.on_steps_change=continue): "
                f"continue (keep the {span_steps}-step schedule; past its end the LR stays "
                f"at {final:.3g}), rescale (the LR of a {new}-step schedule from here on: {fresh:.3g} at the next step), "
                f"or put train.steps back to {old}")
        if choice == "continue":
            self.set_span(saved["span"], planned)
            tail = ""
            if planned > saved["span"]:
                tail = f"; steps {span_steps + 1}-{new} run at its final LR {final:.3g}"
                if final == 0:
                    tail += " (min_lr_ratio 0: they change nothing; rescale or a min_lr_ratio > 0 would)"
            return f"train.steps {old} -> {new} (on_steps_change: continue): the {span_steps}-step schedule is kept{tail}"
        self.set_span(planned, planned)
        return (f"train.steps {old} -> {new} (on_steps_change: rescale): the schedule now spans {new} steps; "
                f"LR at the next step {fresh:.3g} (the old schedule's: {kept:.3g})")


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> LRSchedule:
    return LRSchedule(opt, cfg, total_steps)
