"""A reward model: a sequence-classification model dir (one output, e.g. `AutoModelForSequenceClassification`
with num_labels=1, as TRL's RewardTrainer writes) scoring prompt + completion.

The conversation is rendered with the reward model's own chat template (prompt messages, then the
completion as the assistant turn), so a reward model with another tokenizer than the policy works;
a tokenizer without a template scores the plain concatenated text. Batches are right-padded; the
model pools at the last non-pad token (transformers' own rule), so a batch scores as each text alone.
Loaded on first use, so only the process that scores (the RL controller) holds it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError, check_model_source


class RewardModel:
    def __init__(self, path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 16, key: str = "reward_model"):
        self.path, self.device, self.dtype, self.batch_size, self.key = str(path), torch.device(device), dtype, batch_size, key
        self.model = self.tokenizer = None
        check_model_source(self.path, key=key)  # a path that cannot be there fails now, not at the first score

    def load(self) -> None:
        """Load the model and its tokenizer (`score` does on its first call)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(self.path)
            model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=self.dtype)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{self.key}: cannot load a sequence-classification reward model from {self.path!r}: {e}") from None
        if model.config.num_labels != 1:
            raise ConfigError(f"{self.key}: {self.path!r} has {model.config.num_labels} outputs; a reward model has one (num_labels=1)")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "right"
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        self.tokenizer, self.model = tok, model.to(self.device).eval()

    def text(self, prompt, completion: str) -> str:
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        msgs = msgs + [{"role": "assistant", "content": completion}]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(msgs, tokenize=False)
        return "\n".join(m["content"] for m in msgs)

    def score(self, prompts: list, completions: list[str]) -> list[float]:
        """One scalar per (prompt, completion)."""
        if self.model is None:
            self.load()
        tok, out = self.tokenizer, []
        texts = [self.text(p, c) for p, c in zip(prompts, completions)]
        for i in range(0, len(texts), self.batch_size):
            enc = tok(texts[i: i + self.batch_size], return_tensors="pt", padding=True,
                      add_special_tokens=not tok.chat_template).to(self.device)
            with torch.no_grad():
                out += self.model(**enc).logits[:, 0].float().tolist()
        return out

    def __call__(self, prompts, completions, **_) -> list[float]:
        """The reward functions' signature (TRL's)."""
        return self.score(prompts, completions)
