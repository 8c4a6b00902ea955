"""The committed demo data: what examples/make_demo_data.py writes, and the GRPO demo's premise (its
phrasings are not in the SFT data, held-out digit pairs never train)."""

import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_committed_demo_data_is_what_the_generator_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "examples" / "make_demo_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(data=tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written and all((tmp_path / n).read_bytes() == (DATA / n).read_bytes() for n in written), written


def test_grpo_demo_asks_in_words_the_sft_data_never_uses_and_holds_out_its_pairs():
    sft_users = " ".join(m["content"] for r in _records(DATA / "demo_chat.jsonl") for m in r["messages"] if m["role"] == "user")
    train, held = _records(DATA / "grpo_prompts.jsonl"), _records(DATA / "grpo_heldout.jsonl")
    pairs = {}
    for name, recs in (("train", train), ("held", held)):
        found = set()
        for r in recs:
            a, b = map(int, re.findall(r"\d+", r["prompt"]))
            assert int(r["answer"]) == a + b, r
            assert f"{a} plus {b}" in r["prompt"], r
            found.add((a, b))
        pairs[name] = found
    assert " plus " not in sft_users  # the SFT model has never seen the word the GRPO prompts use
    assert not pairs["train"] & pairs["held"] and len(pairs["held"]) == 30
