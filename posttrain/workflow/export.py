"""`posttrain export`: a training checkpoint -> a plain HF model directory, in this process."""

from __future__ import annotations

from pathlib import Path

import torch

from ..compute.checkpoint import load_weights, read_meta
from ..compute.device import seed_everything
from ..compute.rundir import RunDir
from ..config import JobConfig
from ..data.tokenizer import TokenizerMismatchError, fingerprint, load_tokenizer
from ..model.export import export_hf
from ..model.load import load_model


def export_checkpoint(ckpt_dir: Path, out_dir: Path | None = None) -> Path:
    """Rebuild the model from the checkpoint's own resolved config, load its weights, export
    (default: `<run dir>/hf-step_N`)."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    cfg = JobConfig.model_validate(meta["config"])
    tok = load_tokenizer(cfg.model)
    if fingerprint(tok) != meta["tokenizer_fingerprint"]:
        raise TokenizerMismatchError(f"{ckpt_dir}: the tokenizer at model.path differs from the one it was trained with")
    seed_everything(cfg.train.seed)  # as the engine does: resized vocab rows are drawn from the RNG
    model = load_model(cfg.model, tok, device=torch.device("cpu"), dtype=torch.float32, merge_lora=cfg.export.merge_lora)
    load_weights(ckpt_dir, model)
    out = Path(out_dir) if out_dir else RunDir.of_checkpoint(ckpt_dir).export_of(ckpt_dir)
    return export_hf(model, tok, out, merge_lora=cfg.export.merge_lora,
                     meta={"base_model": cfg.model.path, "steps": meta["step"], "recipe": cfg.recipe})
