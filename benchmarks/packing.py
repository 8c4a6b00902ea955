"""Packed vs padded SFT throughput, side by side in one run.

Trains the same small Qwen3 (built locally) on generated datasets with lognormal sample lengths,
once in padded mode (pad to the longest sample of each micro-batch; the budget counts padding) and
once packed (best-fit rows of exactly the budget, per-document attention), and prints real
(non-padding) tokens/s, the speedup, its upper bound (padding-waste ratio = padded slots / real
tokens of the padded run), the share of that bound achieved, and the data-wait share of step time.

    python benchmarks/packing.py            # ~5 minutes on 2 CPU cores
    python benchmarks/packing.py --quick    # fewer steps
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from posttrain.compute.optim import build_optimizer
from posttrain.config import DataConfig, DataSource, ModelConfig, TrainConfig
from posttrain.data.loader import DataLoader
from posttrain.data.tokenizer import load_tokenizer
from posttrain.model.load import load_model
from posttrain.model.loss import backward_token_mean
from posttrain.tiny import build_tiny_model, build_tokenizer

WORDS = "the a of to and in is it you that he was for on are with as his they be at one have this from".split()


def make_dataset(path: Path, n: int, median: float, sigma: float, max_len: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            k = max(4, min(max_len, int(rng.lognormvariate(0, sigma) * median)))
            f.write(json.dumps({"prompt": "Q:", "completion": " " + " ".join(rng.choice(WORDS) for _ in range(k))}) + "\n")


def run_mode(model_dir: Path, data: Path, packing: bool, steps: int, budget: int, warmup: int) -> dict:
    torch.manual_seed(0)
    mcfg = ModelConfig(path=str(model_dir), dtype="float32")
    tok = load_tokenizer(mcfg)
    model = load_model(mcfg, tok, device=torch.device("cpu"), dtype=torch.float32, packing=packing)
    model.train()
    opt = build_optimizer(model, TrainConfig(steps=steps, lr=1e-4))
    dcfg = DataConfig(sources=[DataSource(path=str(data))], packing=packing, max_tokens_per_batch=budget,
                      max_seq_len=budget, buffer_size=512)
    loader = DataLoader(dcfg, tok, seed=0)
    real = slots = 0
    t_total = wait0 = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            t_start, wait0 = time.perf_counter(), loader.wait_s
        batch = next(loader)
        backward_token_mean(model, [batch], len(tok))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            real += batch["num_tokens"]
            slots += batch["input_ids"].numel()
    t_total = time.perf_counter() - t_start
    wait = loader.wait_s - wait0
    loader.close()
    return {"tok_s": real / t_total, "waste": slots / real, "wait": wait / t_total}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=int, default=8192)
    args = ap.parse_args()
    steps, warmup = (6, 1) if args.quick else (20, 2)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok_dir = build_tokenizer(tmp / "tok", corpus=[" ".join(WORDS)] * 10, vocab_size=400)
        model_dir = build_tiny_model(tmp / "model", tok_dir, hidden_size=256, num_layers=4, num_heads=4,
                                     num_kv_heads=2, intermediate_size=768)
        datasets = {
            "high skew (lognormal median 20, sigma 1.6, cap 2000)": dict(median=20, sigma=1.6, max_len=2000),
            "low skew (lognormal median 300, sigma 0.25)": dict(median=300, sigma=0.25, max_len=4000),
        }
        rows = []
        for name, spec in datasets.items():
            path = tmp / "data.jsonl"
            make_dataset(path, 20000, seed=1, **spec)
            padded = run_mode(model_dir, path, False, steps, args.budget, warmup)
            packed = run_mode(model_dir, path, True, steps, args.budget, warmup)
            bound = padded["waste"]
            speedup = packed["tok_s"] / padded["tok_s"]
            rows.append((name, padded, packed, bound, speedup))
    print(f"\nbudget {args.budget} tokens per micro-batch, {steps} timed steps per mode, tiny Qwen3 (3.5M params), 2 CPU threads\n")
    print("| dataset | padded tok/s | packed tok/s | speedup | bound (padded slots / real) | share of bound | packed row fill | data wait (packed) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, padded, packed, bound, speedup in rows:
        print(f"| {name} | {padded['tok_s']:,.0f} | {packed['tok_s']:,.0f} | {speedup:.2f}x | {bound:.2f}x | "
              f"{speedup / bound:.0%} | {1 / packed['waste']:.1%} | {packed['wait']:.1%} |")


if __name__ == "__main__":
    main()
