"""Greedy samples from an exported checkpoint, loaded the way a user would load it."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def sample_chat(model_dir: str | Path, prompts: list[str], *, max_new_tokens: int = 32) -> list[str]:
    """Render each prompt as a one-turn chat (or plain text if there is no chat template), generate
    greedily, and return the decoded completions. Padded vocab rows are suppressed by the
    checkpoint's generation_config (suppress_tokens)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    outs = []
    for prompt in prompts:
        if tok.chat_template:
            enc = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        else:
            enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        outs.append(tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return outs
