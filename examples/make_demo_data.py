"""Generate examples/data/demo_chat.jsonl: small, learnable chat conversations (committed output).

Tasks with a deterministic answer a tiny model can pick up in a couple of CPU minutes: capitals,
small additions, spelling, and opposites; some with a system prompt, some multi-turn.
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


def qa(rng):
    kind = rng.randrange(4)
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


def main(n=2000, seed=0):
    rng = random.Random(seed)
    out = Path(__file__).parent / "data" / "demo_chat.jsonl"
    out.parent.mkdir(exist_ok=True)
    with open(out, "w") as f:
        for _ in range(n):
            f.write(json.dumps(conversation(rng)) + "\n")
    print(f"wrote {n} conversations to {out} ({out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
