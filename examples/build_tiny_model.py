"""Build the demo's tiny Qwen3 model and its tokenizer locally (no downloads).

The tokenizer is a byte-level BPE trained on the demo data, with the ChatML chat template and its
markers as special tokens; the model is a randomly initialised Qwen3 built from its transformers
config class. Both are saved as an ordinary HF model directory, which the job then loads through
`from_pretrained` exactly like a downloaded checkpoint.

Usage: python examples/build_tiny_model.py OUT_DIR
"""

import json
import sys
import tempfile
from pathlib import Path

from posttrain.tiny import CHATML_TEMPLATE, build_tiny_model, build_tokenizer

DATA = Path(__file__).parent / "data" / "demo_chat.jsonl"


def corpus():
    for line in DATA.read_text().splitlines():
        for m in json.loads(line)["messages"]:
            yield m["content"]


def build_demo_tokenizer(out_dir) -> Path:
    """The demos' tokenizer: byte-level BPE (1,000 tokens) trained on the demo chats, ChatML template."""
    return build_tokenizer(out_dir, chat_template=CHATML_TEMPLATE, corpus=list(corpus()), vocab_size=1000)


def main(out_dir: str) -> None:
    out = Path(out_dir)
    if (out / "config.json").exists():
        print(f"tiny model already built: {out}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = build_demo_tokenizer(tmp)
        build_tiny_model(out, tok_dir, family="qwen3", hidden_size=256, num_layers=4, num_heads=4,
                         num_kv_heads=2, intermediate_size=768)
    print(f"built tiny Qwen3 + tokenizer in {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples/.cache/tiny-qwen3")
