"""Does the model prefer the chosen answers? Held-out preference accuracy of an HF model directory.

Plain transformers only (no posttrain import). For each pair {prompt, chosen, rejected} (the DPO
record format: `prompt` a string or a list of messages, each side a string, an assistant message or
a list of messages), both sides are rendered with `tokenizer.apply_chat_template` as prompt + side.
A side's score is log p(side | prompt): the sum of the log-probs of its completion tokens, the tokens
after the prompt rendered with add_generation_prompt=True (checked to be a prefix of the whole
render), through the end-of-turn token (eos, e.g. <|im_end|>) inclusive. The template's text after
eos (ChatML's newline) is left out, as in training. Log-probs are over the real vocabulary: logits
are cut to len(tokenizer), the rows past it being embedding padding that no text maps to.

Printed: the fraction of pairs with log p(chosen) > log p(rejected) (the preference accuracy) and
the mean margin log p(chosen) - log p(rejected), in nats.

    python examples/check_dpo.py runs/dpo_demo/hf [--pairs examples/data/dpo_heldout.jsonl] [--min 0.85]

Exit code 0; with `--min FRACTION`, 1 when the accuracy is below FRACTION.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_PAIRS = Path(__file__).parent / "data" / "dpo_heldout.jsonl"


def _ids(tok, messages, **kw) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding on some transformers versions
        out = out["input_ids"]
    return list(out)


def _messages(x, role: str) -> list[dict]:
    if isinstance(x, str):
        return [{"role": role, "content": x}]
    return [x] if isinstance(x, dict) else list(x)


def side_tokens(tok, prompt: list[dict], completion: list[dict]) -> tuple[list[int], int, int]:
    """(ids of prompt + completion, first completion index, end of the scored span)."""
    p = _ids(tok, prompt, add_generation_prompt=True)
    ids = _ids(tok, prompt + completion)
    if ids[: len(p)] != p:
        raise SystemExit("the chat template does not render the prompt (with add_generation_prompt=True) as a "
                         "prefix of prompt + completion; this script needs a prefix-stable template")
    end = len(ids)
    eos = tok.eos_token_id
    if eos is not None and eos in ids[len(p):]:  # through the last end-of-turn token, not the text after it
        end = max(i for i in range(len(p), len(ids)) if ids[i] == eos) + 1
    if end <= len(p):
        raise SystemExit("a completion renders to no tokens")
    return ids, len(p), end


@torch.no_grad()
def side_logp(model, tok, prompt, completion) -> float:
    ids, start, end = side_tokens(tok, prompt, completion)
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0, start - 1 : end - 1, : len(tok)].float()
    return F.log_softmax(logits, -1).gather(1, x[0, start:end, None]).sum().item()


def measure(model, tok, records) -> dict:
    margins = []
    for rec in records:
        prompt = _messages(rec["prompt"] if "prompt" in rec else rec["messages"], "user")
        c, r = (side_logp(model, tok, prompt, _messages(rec[k], "assistant")) for k in ("chosen", "rejected"))
        margins.append(c - r)
    if not margins:
        raise SystemExit("no pairs")
    return {"pairs": len(margins), "accuracy": sum(m > 0 for m in margins) / len(margins),
            "margin": sum(margins) / len(margins)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model_dir", help="HF model directory (model + tokenizer)")
    p.add_argument("--pairs", default=str(DEFAULT_PAIRS), help="JSONL of {prompt, chosen, rejected} records")
    p.add_argument("--min", type=float, metavar="FRACTION", help="exit 1 when the accuracy is below FRACTION")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1 suits a tiny model scored one sequence at a time; raise for a big one)")
    a = p.parse_args(argv)

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    if not tok.chat_template:
        print(f"error: {a.model_dir}: the tokenizer has no chat template", file=sys.stderr)
        return 2
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32).eval()
    records = [json.loads(line) for line in Path(a.pairs).read_text().splitlines() if line.strip()]
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        r = measure(model, tok, records)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another process (tests)
    print(f"{a.model_dir}: prefers chosen on {r['accuracy']:.1%} of {r['pairs']} pairs ({a.pairs}); "
          f"mean margin log p(chosen) - log p(rejected) = {r['margin']:+.3f} nats")
    if a.min is not None and r["accuracy"] < a.min:
        print(f"FAILED: accuracy {r['accuracy']:.1%} < required {a.min:.1%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
