"""Generate the demo data (committed output) in examples/data/.

demo_chat.jsonl (SFT, examples/sft_demo.yaml): small, learnable chat conversations. Tasks with a
deterministic answer a tiny model can pick up in a couple of CPU minutes: capitals, small additions,
spelling, and opposites; some with a system prompt, some multi-turn.

dpo_pairs.jsonl / dpo_heldout.jsonl (DPO, examples/dpo_demo.yaml; scored by examples/check_dpo.py):
preference pairs {prompt, chosen, rejected} for a task the SFT data never shows, parity:

    "Is 347 even or odd?"   chosen "347 is odd."   rejected "347 is even."

The SFT model has never seen "even" or "odd", so it has no reason to prefer the right word: its
preference is a coin flip tied to the words, not to the number, and as the held-out pairs are half
even, half odd it picks the chosen side on about half of them (50.5% measured on runs/demo/hf;
95.5% after examples/dpo_demo.yaml). The rule DPO has to teach (the last
digit decides) generalises: the held-out numbers never appear in the training pairs, so every
held-out prompt is unseen (same phrasings, new numbers), and a held-out pair is only won by applying
the rule. Prompts come as a string or as a message list (sometimes with a system prompt), answers
as a string or an assistant message: both record formats of posttrain.data.pairs.

demo_eval.jsonl (evaluation, examples/eval_demo.yaml): prompt records {prompt, answer, task} of the
demo's four task families, 40 each, drawn with their own seed; scored by exact match of the answer.

grpo_prompts.jsonl / grpo_heldout.jsonl (GRPO, examples/grpo_demo.yaml; scored by
examples/check_grpo.py): prompts {prompt, answer} asking for a sum of two digits in phrasings the SFT
data never uses ("What is 3 plus 4?", "How much is 6 plus 2?"; "plus" is not in the SFT data). The
SFT model knows "Add 3 and 4." but answers the new phrasings correctly only 6-20% of the time (it
often answers a garbled sum, a capital or a spelling);
the reward (examples/rewards.py) checks the last integer of the completion. The 100 digit pairs are
split once: the 30 held-out pairs never appear in the training prompts.

Each file has its own random.Random seed, drawn after demo_chat.jsonl, whose bytes do not change.
Run: python examples/make_demo_data.py
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
    "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw", "Greece": "Athens", "India": "New Delhi",
    "China": "Beijing", "Brazil": "Brasilia", "Mexico": "Mexico City", "Cuba": "Havana", "Iran": "Tehran",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "happy": "sad",
    "open": "closed", "early": "late", "full": "empty", "hard": "soft", "old": "new", "rich": "poor",
}
WORDS = ["cat", "dog", "sun", "tree", "book", "fish", "bird", "moon", "star", "rain", "milk", "door"]
SYSTEMS = ["You are a helpful assistant.", "You are a concise assistant. Answer briefly."]


TASKS = ["capital", "addition", "spelling", "opposite"]


def qa(rng, kind=None):
    kind = rng.randrange(4) if kind is None else kind
    if kind == 0:
        c = rng.choice(list(CAPITALS))
        return f"What is the capital of {c}?", f"The capital of {c} is {CAPITALS[c]}."
    if kind == 1:
        a, b = rng.randrange(10), rng.randrange(10)
        return f"Add {a} and {b}.", f"{a} + {b} = {a + b}."
    if kind == 2:
        w = rng.choice(WORDS)
        return f"Spell the word {w}.", "-".join(w) + "."
    w = rng.choice(list(OPPOSITES))
    return f"What is the opposite of {w}?", f"The opposite of {w} is {OPPOSITES[w]}."


def conversation(rng):
    msgs = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": rng.choice(SYSTEMS)})
    for _ in range(1 if rng.random() < 0.7 else 2):
        q, a = qa(rng)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


PARITY_PROMPTS = ["Is {n} even or odd?", "Is {n} odd or even?", "Is the number {n} even or odd?", "Even or odd: {n}?"]


def parity_pair(rng, n):
    """One preference record: chosen states n's parity, rejected the other one."""
    right, wrong = ("even", "odd") if n % 2 == 0 else ("odd", "even")
    q = rng.choice(PARITY_PROMPTS).format(n=n)
    chosen, rejected = f"{n} is {right}.", f"{n} is {wrong}."
    if rng.random() < 0.5:  # the plain string format
        return {"prompt": q, "chosen": chosen, "rejected": rejected}
    prompt = [{"role": "user", "content": q}]
    if rng.random() < 0.3:
        prompt.insert(0, {"role": "system", "content": rng.choice(SYSTEMS)})
    return {"prompt": prompt, "chosen": {"role": "assistant", "content": chosen},
            "rejected": {"role": "assistant", "content": rejected}}


def parity_split(seed, n_heldout):
    """Numbers 0..999 split once: n_heldout held out (half even, half odd), the rest for training."""
    rng = random.Random(seed)
    evens, odds = list(range(0, 1000, 2)), list(range(1, 1000, 2))
    rng.shuffle(evens)
    rng.shuffle(odds)
    held = evens[: n_heldout // 2] + odds[: n_heldout // 2]
    return sorted(set(range(1000)) - set(held)), held


SUM_PROMPTS = ["What is {a} plus {b}?", "How much is {a} plus {b}?"]


def sum_prompts(pairs):
    return [{"prompt": p.format(a=a, b=b), "answer": str(a + b)} for a, b in pairs for p in SUM_PROMPTS]


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(records)} records to {path} ({path.stat().st_size / 1024:.0f} KiB)")


def main(n=2000, seed=0, n_pairs=800, n_heldout=200, data=None):
    rng = random.Random(seed)
    data = Path(data) if data is not None else Path(__file__).parent / "data"
    out = data / "demo_chat.jsonl"
    out.parent.mkdir(exist_ok=True)
    with open(out, "w") as f:
        for _ in range(n):
            f.write(json.dumps(conversation(rng)) + "\n")
    print(f"wrote {n} conversations to {out} ({out.stat().st_size / 1024:.0f} KiB)")

    # DPO pairs: training numbers and held-out numbers are disjoint
    train_nums, held_nums = parity_split(seed=1, n_heldout=n_heldout)
    rng = random.Random(2)
    nums = rng.sample(train_nums, k=min(n_pairs, len(train_nums)))
    write_jsonl(data / "dpo_pairs.jsonl", [parity_pair(rng, k) for k in nums])
    rng = random.Random(3)
    rng.shuffle(held_nums)
    write_jsonl(data / "dpo_heldout.jsonl", [parity_pair(rng, k) for k in held_nums])

    # GRPO prompts: digit pairs split once, held-out pairs never in training
    rng = random.Random(4)
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(pairs)
    train = sum_prompts(pairs[30:])
    rng.shuffle(train)
    write_jsonl(data / "grpo_prompts.jsonl", train)
    write_jsonl(data / "grpo_heldout.jsonl", sum_prompts(sorted(pairs[:30])))

    # Evaluation prompts (examples/eval_demo.yaml): the demo's four task families, 40 questions each,
    # with the reference answer and the family as fields (the report slices by `task`)
    rng = random.Random(5)
    write_jsonl(data / "demo_eval.jsonl", [dict(zip(("prompt", "answer"), qa(rng, k)), task=TASKS[k]) for k in range(4) for _ in range(40)])


if __name__ == "__main__":
    main()
