"""One DPO run with Hugging Face TRL's DPOTrainer, for benchmarks/dpo_vs_trl.py.

Runs in benchmarks/.trl-venv (TRL needs a newer transformers than posttrain pins; see
benchmarks/setup_trl_venv.sh), never imports posttrain, and writes one JSON file of per-step
measurements that the benchmark reads:

    benchmarks/.trl-venv/bin/python benchmarks/trl_dpo_runner.py --model DIR --data pairs.jsonl \
        --out result.json --steps 12 --pairs 12 --lr 1e-4 --beta 0.1 --max-length 512 --threads 2 \
        [--precompute] [--sampling sequential|group_by_length]

Per optimizer step it records the DPO loss, the real (attention-mask) and padded token counts of the
batch, and the wall-clock time at the step's end (`on_step_end`, after the optimizer step); the
reference precompute pass (`precompute_ref_log_probs`, run inside `DPOTrainer.__init__`) is timed on
its own. HF_DATASETS_CACHE should point at a fresh directory (the benchmark sets one per run):
TRL caches precomputed reference log-probs by dataset fingerprint and would otherwise skip the pass.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--pairs", type=int, required=True, help="pairs per optimizer step (= per micro-batch)")
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-length", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precompute", action="store_true")
    ap.add_argument("--sampling", choices=["sequential", "group_by_length"], default="sequential")
    args = ap.parse_args()

    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    import datasets
    import transformers
    import trl
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    datasets.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    tok = AutoTokenizer.from_pretrained(args.model)
    ds = load_dataset("json", data_files=args.data, split="train")
    group = args.sampling == "group_by_length"
    if group:
        # LengthGroupedSampler needs a length per example: the longer side, as the collator pads to it.
        def length(ex):
            sides = [tok.apply_chat_template(ex["prompt"] + ex[k], tokenize=False) for k in ("chosen", "rejected")]
            return {"length": max(len(tok(s, add_special_tokens=False)["input_ids"]) for s in sides)}

        ds = ds.map(length)

    rec = {"loss": [], "real": [], "slots": [], "step_end": [], "precompute_s": 0.0}

    class Trainer(DPOTrainer):
        def _precompute_ref_logps(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*a, **k)
            finally:
                rec["precompute_s"] += time.perf_counter() - t0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                loss = out[0] if return_outputs else out
                rec["loss"].append(float(loss.detach()))
                rec["real"].append(int(inputs["attention_mask"].sum()))
                rec["slots"].append(int(inputs["input_ids"].numel()))
            return out

    class StepClock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            rec["threads_at_train"] = torch.get_num_threads()

        def on_step_end(self, a, state, control, **kw):
            rec["step_end"].append(time.perf_counter())

    config = DPOConfig(
        output_dir=os.path.join(os.path.dirname(os.path.abspath(args.out)), "trl-out"),
        per_device_train_batch_size=args.pairs,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=0,
        beta=args.beta,
        loss_type=["sigmoid"],
        max_length=args.max_length,
        # fp32 like posttrain's run (TRL's default is bf16 mixed precision)
        bf16=False,
        fp16=False,
        # TRL defaults to gradient checkpointing; posttrain's run does not recompute activations
        gradient_checkpointing=False,
        # TRL 1.16 DPO: padding_free "warns and falls back to standard padding"; no packing for DPO
        padding_free=False,
        precompute_ref_log_probs=args.precompute,
        train_sampling_strategy=args.sampling,
        # group_by_length reads the `length` column, which the trainer would drop as unused
        remove_unused_columns=not group,
        use_cpu=True,
        dataloader_pin_memory=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Trainer(model=args.model, args=config, train_dataset=ds, processing_class=tok, callbacks=[StepClock()])
    rec["threads"] = torch.get_num_threads()
    rec["startup_s"] = time.perf_counter() - t_start
    t_train = time.perf_counter()
    trainer.train()
    rec["train_s"] = time.perf_counter() - t_train
    rec["threads_after"] = torch.get_num_threads()
    rec["ref_model_in_memory"] = trainer.ref_model is not None
    rec["attn_implementation"] = trainer.model.config._attn_implementation
    rec["optim"] = getattr(config.optim, "value", str(config.optim))
    rec["versions"] = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                       "datasets": datasets.__version__}
    with open(args.out, "w") as f:
        json.dump(rec, f)


if __name__ == "__main__":
    main()
