"""Supervised fine-tuning, single process.

    tokenizer  <- the model's own, plus pad / added tokens
    data       <- streamed records, rendered with the chat template (assistant-only labels),
                  packed into fixed token budgets in a background thread
    model      <- HF causal LM, vocab padded to a multiple of 64, optional LoRA / checkpointing;
                  packed rows need an attention backend that isolates documents (checked)
    for step in 1..S:
        micro-batches b_1..b_k                    (k = train.grad_accum)
        N      = target tokens in b_1..b_k        (the whole optimizer step)
        loss   = sum_j CE_sum(b_j) / N            (token-mean over the step, not a mean of means)
        backward per micro-batch, clip, AdamW, schedule, log
        every k steps: checkpoint (weights, optimizer, schedule, data state, RNG) atomically
    export HF checkpoint (+ tokenizer + fingerprint), sample from it
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..compute.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from ..compute.distributed import all_reduce, full_state_dict, local_scalar, rank_world, shard_fsdp2
from ..compute.flops import FlopCounter, mfu, peak_flops
from ..compute.device import choose_device, choose_dtype, seed_everything
from ..compute.metrics import MetricsLogger, console, peak_memory_gb
from ..compute.optim import build_optimizer, build_scheduler
from ..config import JobConfig
from ..data.loader import DataLoader
from ..data.tokenizer import TokenizerMismatchError, fingerprint, load_tokenizer
from ..model.export import export_hf
from ..model.load import load_model, unwrap
from ..model.loss import backward_token_mean, count_targets
from ..model.sample import sample_chat


def run(cfg: JobConfig, run_dir: Path) -> dict:
    seed_everything(cfg.train.seed)
    rank, world = rank_world()  # N SPMD workers run this same function on their data shards
    say = console.print if rank == 0 else (lambda *a, **k: None)
    if cfg.compute.threads:
        torch.set_num_threads(cfg.compute.threads)
    device = choose_device(cfg.compute.device)
    dtype = choose_dtype(cfg.model.dtype, device)

    tokenizer = load_tokenizer(cfg.model)
    # Under FSDP2, model.dtype is the compute dtype: weights, gradients and AdamW state stay fp32.
    master = torch.float32 if world > 1 else dtype
    model = load_model(cfg.model, tokenizer, device=device, dtype=master, merge_lora=cfg.export.merge_lora, packing=cfg.data.packing)
    model.train()
    vocab = len(tokenizer)  # real vocabulary; rows beyond it are padding
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = FlopCounter.from_model(model, vocab_size=vocab)  # per step: documents, targets, LoRA, recompute
    peak = peak_flops(device, dtype, override=cfg.compute.peak_flops)  # calibrated here, not in step 1
    # FSDP2: per decoder layer + a loss root
    loss_fn = shard_fsdp2(model, param_dtype=dtype if dtype != master else None) if world > 1 else None
    loader = DataLoader(cfg.data, tokenizer, seed=cfg.train.seed, rank=rank, world_size=world)

    steps = cfg.train.steps
    opt = build_optimizer(model, cfg.train)
    trainable = [p for p in model.parameters() if p.requires_grad]
    sched = build_scheduler(opt, cfg.train, steps)
    attn = unwrap(model).config._attn_implementation
    say(f"model: {n_params:,} parameters ({n_train:,} trainable), {dtype}, {device}, attention {attn}, "
        f"{world} worker{'s' if world > 1 else ''}; {steps} steps")

    ckpt_root = run_dir / "checkpoints"
    start = 0
    if (resume := resolve_resume(cfg.compute.resume, ckpt_root)) is not None:
        state = load_checkpoint(resume, model=model, optimizer=opt, scheduler=sched)
        if state["meta"].get("tokenizer_fingerprint") != fingerprint(tokenizer):
            raise TokenizerMismatchError(f"{resume}: written with a different tokenizer than this run's")
        loader.load_state_dict(state["data"])
        start = state["step"]
        say(f"[bold]resumed[/] from {resume} at step {start}")

    log = MetricsLogger(run_dir, steps, progress=cfg.compute.progress, log_every=cfg.train.log_every, start_step=start,
                        enabled=rank == 0, tensorboard=cfg.compute.tensorboard)
    losses = []
    try:
        for step in range(start + 1, steps + 1):
            t0, wait0 = time.perf_counter(), loader.wait_s
            micro = [b for _, b in zip(range(cfg.train.grad_accum), loader)]
            micro = micro[: int(all_reduce(len(micro), "min"))]  # ranks stop together when data runs out
            if not micro:
                say(f"[yellow]data exhausted after {step - 1} steps (data.max_epochs={cfg.data.max_epochs})")
                break
            micro = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in micro]
            loss_parts: dict = {}  # ce_loss, and aux_loss (MoE router load balancing) when enabled
            # normalise by the target tokens of the *global* step; FSDP2 averages gradients over ranks
            n_local = sum(count_targets(b["labels"]) for b in micro)
            n_targets = int(all_reduce(n_local))
            step_loss, _ = backward_token_mean(model, micro, vocab, chunk_tokens=cfg.model.loss_chunk_tokens,
                                               metrics=loss_parts, normalizer=n_targets, grad_scale=world,
                                               loss_fn=loss_fn)
            step_loss = all_reduce(step_loss)
            loss_parts = {k: all_reduce(v) for k, v in loss_parts.items()}
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
                if cfg.train.max_grad_norm
                else None
            )
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            f = flops.step_flops([n for b in micro for n in b["doc_lens"]], n_local, n_micro_batches=len(micro))
            model_flops, hw_flops = all_reduce(f["model"]), all_reduce(f["hardware"])
            real = all_reduce(sum(b["num_tokens"] for b in micro))
            slots = all_reduce(sum(b["input_ids"].numel() for b in micro))
            losses.append(step_loss)
            log.log({
                "step": step, "epoch": micro[-1]["epoch"], "loss": step_loss, "lr": lr,
                "grad_norm": local_scalar(grad_norm) if grad_norm is not None else None,
                "target_tokens": n_targets, "tokens_per_s": real / dt, "step_time_s": dt,
                "data_wait": (loader.wait_s - wait0) / dt, "padding": 1 - real / slots,
                "mfu": mfu(model_flops / dt, peak, n_devices=world), "hfu": mfu(hw_flops / dt, peak, n_devices=world),
                "peak_mem_gb": peak_memory_gb(device), **loss_parts,
            })
            if cfg.compute.checkpoint_every and step % cfg.compute.checkpoint_every == 0:
                save_checkpoint(
                    ckpt_root, step, model=model, optimizer=opt, scheduler=sched, data_state=loader.state_dict(),
                    meta={"tokenizer_fingerprint": fingerprint(tokenizer), "config": cfg.model_dump(mode="json")},
                    keep=cfg.compute.keep_checkpoints,
                )
    finally:
        log.close()
        loader.close()
    say(f"data: {loader.stats.summary()}; mixture {loader.proportions()}")

    if world > 1:  # gather the full weights (collective), export from an unsharded copy on rank 0
        weights = full_state_dict(model)
        if rank != 0:
            return {"steps": start + len(losses), "rank": rank}
        model = load_model(cfg.model, tokenizer, device=torch.device("cpu"), dtype=dtype, merge_lora=cfg.export.merge_lora)
        model.load_state_dict(weights)
    result = {"steps": start + len(losses), "losses": losses, "start_step": start, "run_dir": str(run_dir)}
    if cfg.export.enabled:
        out = export_hf(
            model, tokenizer, run_dir / "hf", merge_lora=cfg.export.merge_lora,
            meta={"base_model": cfg.model.path, "steps": start + len(losses)},
        )
        result["export_dir"] = str(out)
        console.print(f"[bold green]HF checkpoint:[/] {out}  (tokenizer fingerprint {fingerprint(tokenizer)[:12]})")
        if cfg.export.sample_prompts:
            for prompt, text in zip(cfg.export.sample_prompts, sample_chat(out, cfg.export.sample_prompts, max_new_tokens=cfg.export.max_new_tokens)):
                console.print(f"[bold]sample[/] {prompt!r} -> {text!r}")
    return result
