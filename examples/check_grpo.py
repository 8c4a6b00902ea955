"""Held-out greedy accuracy of an HF model directory on {prompt, answer} records (plain transformers only).

Each prompt (a string: one user message) is rendered with the tokenizer's chat template and the
generation prompt, then answered greedily by `model.generate` (up to --max-new-tokens, stopping at the
generation config's EOS). A completion is correct when the last integer in it equals `answer`.

    python examples/check_grpo.py runs/grpo_demo/hf [--prompts examples/data/grpo_heldout.jsonl] [--min 0.6]
    python examples/check_grpo.py runs/grpo_demo/hf --baseline runs/demo/hf --min-gain 0.2

Prints the accuracy; with `--min FRACTION` the exit code is 1 when it is below FRACTION; with
`--baseline DIR --min-gain G` (the model the run started from) when it is not at least G above that
model's accuracy on the same prompts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT = Path(__file__).parent / "data" / "grpo_heldout.jsonl"


def accuracy(model_dir: str, records: list[dict], max_new_tokens: int = 24) -> tuple[float, list[str]]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    right, texts = 0, []
    for rec in records:
        ids = tok.apply_chat_template([{"role": "user", "content": rec["prompt"]}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        with torch.no_grad():
            out = model.generate(torch.tensor([list(ids)]), do_sample=False, max_new_tokens=max_new_tokens)
        text = tok.decode(out[0, len(ids):], skip_special_tokens=True)
        found = re.findall(r"-?\d+", text)
        right += bool(found) and int(found[-1]) == int(rec["answer"])
        texts.append(text)
    return right / len(records), texts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--prompts", default=str(DEFAULT))
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--min", type=float, default=None, help="fail below this accuracy")
    p.add_argument("--baseline", default=None, help="the model the run started from: measured too")
    p.add_argument("--min-gain", type=float, default=None, help="fail unless the accuracy is this much above --baseline's")
    a = p.parse_args(argv)
    if (a.baseline is None) != (a.min_gain is None):
        p.error("--baseline and --min-gain go together")
    records = [json.loads(line) for line in Path(a.prompts).read_text().splitlines() if line.strip()]
    failed = False
    for model_dir in ([a.baseline] if a.baseline else []) + [a.model_dir]:
        acc, texts = accuracy(model_dir, records, a.max_new_tokens)
        print(f"{model_dir}: held-out greedy accuracy {acc:.1%} ({round(acc * len(records))}/{len(records)}); "
              f"e.g. {records[0]['prompt']!r} -> {texts[0]!r}")
        if model_dir == a.baseline:
            base = acc
    if a.min is not None and acc < a.min:
        print(f"FAILED: below --min {a.min:.1%}")
        failed = True
    if a.baseline is not None and acc < base + a.min_gain:
        print(f"FAILED: {acc - base:+.1%} over {a.baseline}, less than --min-gain {a.min_gain:.1%}")
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
