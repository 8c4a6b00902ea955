"""Did distillation teach the student? Mean per-token KL(teacher || student) on held-out chats.

Plain transformers only (no posttrain import): every conversation is rendered with
`tokenizer.apply_chat_template`, and both models score it with their ordinary forward. The KL is
taken at the *assistant tokens* only, the tokens the distill recipe trains on: for each assistant
turn, the conversation before it is rendered with add_generation_prompt=True; the turn's tokens run
from the end of that prefix through the end-of-turn token (eos, e.g. <|im_end|>) inclusive, so the
template's text after eos (ChatML's newline) is left out, as in training. At each such token t the
distributions compared are the two models' next-token distributions at the position before t, at
temperature 1, over the real vocabulary (both models' logits are cut to len(tokenizer): rows past
it are embedding padding and carry no probability). The reported value is the token-weighted mean
over all assistant tokens of all conversations, in nats.

    python examples/check_distill.py --teacher runs/distill_teacher/hf --student runs/distill_demo/hf \
        --baseline examples/.cache/distill/student --min-reduction 0.3

`--baseline DIR` (the student before distillation) also prints its KL and the relative reduction
1 - KL(student) / KL(baseline); `--min-reduction R` exits 1 when that reduction is below R.
Also printed, for context: each model's mean negative log-likelihood of the reference answers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

DEFAULT_DATA = Path(__file__).parent / "data" / "distill_heldout.jsonl"


def _ids(tok, messages, **kw) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding on some transformers versions
        out = out["input_ids"]
    return list(out)


def assistant_positions(tok, messages) -> tuple[list[int], list[int]]:
    """(ids of the whole conversation, indices of its assistant tokens: each turn's content and eos)."""
    ids = _ids(tok, messages)
    eos = tok.eos_token_id
    targets = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix, upto = _ids(tok, messages[:i], add_generation_prompt=True), _ids(tok, messages[: i + 1])
        start, end = len(prefix), len(upto)
        if ids[:start] != prefix or ids[:end] != upto:
            raise SystemExit(f"the chat template does not render turn {i} as a prefix of the conversation; "
                             "this script needs a prefix-stable template")
        span = list(range(start, end))
        if eos is not None and eos in ids[start:end]:  # through the end-of-turn token, not the text after it
            last = max(j for j in span if ids[j] == eos)
            span = span[: span.index(last) + 1]
        targets += span
    return ids, [t for t in targets if t > 0]


def load(path: str):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template and a.eos_token_id == b.eos_token_id


@torch.no_grad()
def measure(teacher, students: dict, tok, records) -> dict:
    """Token-weighted mean KL(teacher || s) per student, and each model's mean NLL of the answers."""
    V = len(tok)
    kl = {k: 0.0 for k in students}
    nll = {k: 0.0 for k in ["teacher", *students]}
    n = 0
    for rec in records:
        ids, pos = assistant_positions(tok, rec["messages"])
        if not pos:
            continue
        x = torch.tensor([ids])
        at = torch.tensor(pos) - 1  # the position whose logits predict token t
        y = x[0, torch.tensor(pos)]
        lt = F.log_softmax(teacher(input_ids=x).logits[0, at, :V].float(), -1)
        nll["teacher"] += -lt.gather(1, y[:, None]).sum().item()
        for k, m in students.items():
            ls = F.log_softmax(m(input_ids=x).logits[0, at, :V].float(), -1)
            kl[k] += (lt.exp() * (lt - ls)).sum().item()
            nll[k] += -ls.gather(1, y[:, None]).sum().item()
        n += len(pos)
    if n == 0:
        raise SystemExit("no assistant tokens in the data")
    return {"tokens": n, "kl": {k: v / n for k, v in kl.items()}, "nll": {k: v / n for k, v in nll.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="the teacher's HF model dir")
    p.add_argument("--student", required=True, help="the distilled student's HF model dir")
    p.add_argument("--baseline", help="the student before distillation (prints its KL and the reduction)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="JSONL of {messages: [...]} records")
    p.add_argument("--min-reduction", type=float, help="exit 1 when 1 - KL(student)/KL(baseline) is below this")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: tiny models, and robust on "
                   "a shared machine, where 2 threads can run 10x slower than 1)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.min_reduction is not None and not a.baseline:
        p.error("--min-reduction needs --baseline")

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(a.student)
    for d in [a.teacher] + ([a.baseline] if a.baseline else []):
        if not same_tokenizer(tok, AutoTokenizer.from_pretrained(d)):
            print(f"error: {d} has another tokenizer than {a.student}", file=sys.stderr)
            return 2
    records = [json.loads(line) for line in Path(a.data).read_text().splitlines() if line.strip()]
    torch.manual_seed(0)
    students = {"student": load(a.student)}
    if a.baseline:
        students["baseline"] = load(a.baseline)
    r = measure(load(a.teacher), students, tok, records)

    print(f"data: {a.data}: {len(records)} conversations, {r['tokens']} assistant tokens; vocabulary {len(tok)}")
    print(f"mean NLL of the reference answers: teacher {r['nll']['teacher']:.4f} nats/token, "
          f"student {r['nll']['student']:.4f}" + (f", baseline {r['nll']['baseline']:.4f}" if a.baseline else ""))
    if a.baseline:
        print(f"KL(teacher || baseline) = {r['kl']['baseline']:.4f} nats/token  ({a.baseline})")
    print(f"KL(teacher || student)  = {r['kl']['student']:.4f} nats/token  ({a.student})")
    if not a.baseline:
        return 0
    red = 1.0 - r["kl"]["student"] / r["kl"]["baseline"]
    print(f"reduction: {red:.1%}")
    if a.min_reduction is not None and red < a.min_reduction:
        print(f"FAILED: reduction {red:.1%} < required {a.min_reduction:.1%}", file=sys.stderr)
        return 1
    if a.min_reduction is not None:
        print(f"ok: reduction {red:.1%} >= {a.min_reduction:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
