"""Generate examples/data/distill_heldout.jsonl: held-out conversations for examples/check_distill.py
(committed output).

The same task families as the demo chats (examples/make_demo_data.py's `conversation`: capitals,
small additions, spelling, opposites; some with a system prompt, some two-turn), drawn with another
seed, keeping only conversations that appear nowhere in examples/data/demo_chat.jsonl (nor twice
here). The task space is small, so the single questions and answers are mostly seen in training;
what is held out is each whole conversation (its combination of system prompt and turns), which is
what the KL is measured on.

Run: python examples/make_distill_heldout.py [N]   (default 150)
"""

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from make_demo_data import conversation  # noqa: E402  (the demo's task families)

DATA = Path(__file__).parent / "data"
SEED = 20240531


def key(rec) -> str:
    return json.dumps(rec["messages"], sort_keys=True)


def main(n: int = 150) -> None:
    seen = {key(json.loads(line)) for line in (DATA / "demo_chat.jsonl").read_text().splitlines() if line.strip()}
    rng = random.Random(SEED)
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * n:
            raise SystemExit(f"only {len(out)} unseen conversations in {tries} draws")
        rec = conversation(rng)
        k = key(rec)
        if k in seen:
            continue
        seen.add(k)
        out.append(rec)
    path = DATA / "distill_heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    turns = sum(sum(m["role"] == "assistant" for m in r["messages"]) for r in out)
    print(f"wrote {len(out)} held-out conversations ({turns} assistant turns; {tries} drawn) to {path}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 150)
