"""One SFT run with Hugging Face TRL's SFTTrainer, for benchmarks/vs_trl.py.

Runs in benchmarks/.trl-venv (TRL needs a newer transformers than posttrain pins; see
benchmarks/setup_trl_venv.sh), never imports posttrain, and writes one JSON file of per-step
measurements that the benchmark reads:

    benchmarks/.trl-venv/bin/python benchmarks/trl_sft_runner.py --model DIR --data chats.jsonl \
        --chat-template chatml_generation.jinja --out result.json --steps 20 --lr 1e-3 --threads 2 \
        --mode bfd --max-length 1664                      # packing=True, packing_strategy="bfd"
        --mode group_by_length --batch-size 8 --max-length 1600   # padded, LengthGroupedSampler

Modes (TRL 1.16's fastest two for SFT on data of mixed lengths):
- `bfd`: `packing=True, packing_strategy="bfd"`: the whole dataset is packed best-fit-decreasing into
  rows of `max_length` tokens before training; TRL then trains padding-free (`padding_free` is forced
  on for BFD: one flattened row per batch, `position_ids` restarting per sequence, no attention mask;
  transformers turns the position restarts into a block-diagonal mask for SDPA). One packed row per
  step (`per_device_train_batch_size=1`).
- `group_by_length`: `packing=False`, `train_sampling_strategy="group_by_length"` (transformers'
  LengthGroupedSampler: random mega-batches of 50 batches, each sorted by length, so a batch holds
  samples of similar length), `--batch-size` samples per step right-padded to the longest.

Loss: `assistant_only_loss=True` with the chat template given by `--chat-template` (the demo's ChatML
with `{% generation %}` around each assistant answer and its `<|im_end|>`: the same text and token ids
as the model's own template, and the same loss mask as posttrain's). Per optimizer step the runner
records the loss, the batch's real tokens (tokens of the samples: `attention_mask.sum()` when padded,
the flattened row's length when padding-free, which has no padding on CPU), its slots
(`input_ids.numel()`), its loss targets (`labels != -100` after the shift), the attention score
entries SDPA computes (rows x width^2) and the wall-clock time at
the step's end (`on_step_end`, after the optimizer step). It also reports the prepared dataset's token
and target totals, and a digest of every unpacked sample's (input_ids, labels), for the benchmark's
check that both sides train on the same tokens with the same mask.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def sample_digest(rows) -> str:
    """sha256 over every sample's input_ids and labels, in order (the benchmark computes the same from
    posttrain's encoding: labels = input_ids where the loss mask is 1, else -100)."""
    h = hashlib.sha256()
    for ids, labels in rows:
        h.update(json.dumps([list(ids), list(labels)]).encode())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--chat-template", required=True, help="a .jinja file with {% generation %} markers")
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=["bfd", "group_by_length"], required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=1, help="samples per step (group_by_length); bfd: 1 packed row")
    ap.add_argument("--max-length", type=int, required=True, help="bfd: the packed row length; padded: truncation (none expected)")
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    import datasets
    import transformers
    import trl
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    datasets.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    tok = AutoTokenizer.from_pretrained(args.model)
    ds = load_dataset("json", data_files=args.data, split="train")
    bfd = args.mode == "bfd"
    rec = {"loss": [], "real": [], "slots": [], "targets": [], "pairs": [], "step_end": []}

    class Trainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                loss = out[0] if return_outputs else out
                rec["loss"].append(float(loss.detach()))
                ids = inputs["input_ids"]
                rec["real"].append(int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else int(ids.numel()))
                rec["slots"].append(int(ids.numel()))
                rec["targets"].append(int((inputs["labels"][:, 1:] != -100).sum()))
                # attention score entries SDPA computes: every row x width^2 (padded: a key-padding mask; padding-free:
                # transformers' block-diagonal mask over the whole row, computed densely)
                rec["pairs"].append(int(ids.shape[0] * ids.shape[1] ** 2))
            return out

    class StepClock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            rec["threads_at_train"] = torch.get_num_threads()

        def on_step_end(self, a, state, control, **kw):
            rec["step_end"].append(time.perf_counter())

    config = SFTConfig(
        output_dir=os.path.join(os.path.dirname(os.path.abspath(args.out)), "trl-out"),
        chat_template_path=args.chat_template,
        assistant_only_loss=True,
        max_length=args.max_length,
        packing=bfd,
        packing_strategy="bfd",
        padding_free=bfd,  # forced on by BFD anyway; padded mode keeps the attention mask
        pad_to_multiple_of=None,  # no padding of padding-free rows ("auto" pads only on Neuron)
        per_device_train_batch_size=1 if bfd else args.batch_size,
        train_sampling_strategy="random" if bfd else "group_by_length",
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=args.seed,
        # fp32 like posttrain's run (TRL's default is bf16 mixed precision)
        bf16=False,
        fp16=False,
        # TRL defaults to gradient checkpointing; posttrain's run does not recompute activations
        gradient_checkpointing=False,
        use_cpu=True,
        dataloader_pin_memory=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Trainer(model=args.model, args=config, train_dataset=ds, processing_class=tok, callbacks=[StepClock()])
    prepared = trainer.train_dataset
    rec["dataset_rows"] = len(prepared)
    rec["dataset_tokens"] = sum(len(x) for x in prepared["input_ids"])
    rec["dataset_targets"] = sum(sum(v != -100 for v in lab) for lab in prepared["labels"])
    if bfd:
        lens = [n for row in prepared["seq_lengths"] for n in row]
        rec["packed_rows"] = len(prepared)
        rec["packed_fill"] = rec["dataset_tokens"] / (len(prepared) * args.max_length)
        rec["dataset_samples"] = len(lens)
    else:
        rec["dataset_samples"] = len(prepared)
        rec["sample_digest"] = sample_digest(zip(prepared["input_ids"], prepared["labels"]))
    rec["threads"] = torch.get_num_threads()
    rec["startup_s"] = time.perf_counter() - t_start
    t_train = time.perf_counter()
    trainer.train()
    rec["train_s"] = time.perf_counter() - t_train
    rec["attn_implementation"] = trainer.model.config._attn_implementation
    rec["optim"] = getattr(config.optim, "value", str(config.optim))
    rec["versions"] = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                       "datasets": datasets.__version__}
    with open(args.out, "w") as f:
        json.dump(rec, f)


if __name__ == "__main__":
    main()
