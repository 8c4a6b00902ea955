"""Build the distillation example's two tiny Qwen3 models locally (no downloads), sharing ONE tokenizer.

    OUT_ROOT/tokenizer     the SFT demo's tokenizer (examples/build_tiny_model.py:build_demo_tokenizer)
    OUT_ROOT/teacher-init  the bigger model (hidden 384, 6 layers, 10.8M parameters), randomly
                           initialised; examples/distill_teacher.yaml fine-tunes it into the teacher
    OUT_ROOT/student       the smaller model (hidden 128, 2 layers, 0.55M parameters), randomly
                           initialised; examples/distill_demo.yaml distils the teacher into it

Both model dirs carry a copy of the same tokenizer, so the distill recipe accepts the pair (it
refuses a teacher whose tokenizer fingerprint differs from the student's).

Usage: python examples/build_distill_models.py [OUT_ROOT]   (default: examples/.cache/distill)
"""

import sys
from pathlib import Path

from build_tiny_model import build_demo_tokenizer

from posttrain.tiny import build_tiny_model

TEACHER = dict(hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2, intermediate_size=1152, seed=0)
STUDENT = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=384, seed=1)


def main(out_root: str) -> None:
    root = Path(out_root)
    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        build_demo_tokenizer(tok_dir)
    for name, size in (("teacher-init", TEACHER), ("student", STUDENT)):
        out = root / name
        if (out / "config.json").exists():
            print(f"already built: {out}")
            continue
        build_tiny_model(out, tok_dir, family="qwen3", **size)
        print(f"built {out}: tiny Qwen3, hidden {size['hidden_size']}, {size['num_layers']} layers")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples/.cache/distill")
