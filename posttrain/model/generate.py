"""`posttrain generate` and `posttrain chat`: completions from any HF model dir (an export of ours or
any other), rendered through its own chat template, as a serving engine would see them.

Without a chat template the prompt is plain text: `generate` continues the prompt, and `chat`
continues the whole transcript so far (each turn appended as it was typed, each answer as it was
generated)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..config import ConfigError, check_model_source, hub_hint


class Generator:
    """A model and its tokenizer, loaded the way a user would load them (`from_pretrained`)."""

    def __init__(self, model_dir: str | Path, *, device: str = "auto", dtype: str = "auto"):
        model_dir = str(model_dir)
        check_model_source(model_dir, key="MODEL_DIR")
        try:
            self.tok = AutoTokenizer.from_pretrained(model_dir)
            torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
        except (OSError, ValueError) as e:
            raise ConfigError(f"MODEL_DIR: cannot load a model from {model_dir!r}{hub_hint(model_dir)}: {e}") from e
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(device)
        self.device = device

    @property
    def has_template(self) -> bool:
        return bool(self.tok.chat_template)

    def encode(self, messages: list[dict]) -> dict:
        """The prompt for the next assistant turn: the chat template with its generation prompt, or
        (no template) the turns' text concatenated."""
        if self.has_template:
            enc = self.tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        else:
            enc = self.tok("".join(m["content"] for m in messages), return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    def complete(self, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0) -> str:
        """The next assistant turn, decoded without special tokens. temperature 0: greedy."""
        enc = self.encode(messages)
        kw = {"do_sample": False} if temperature <= 0 else {"do_sample": True, "temperature": temperature, "top_p": top_p}
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=self._pad_id(), **kw)
        return self.tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    def _pad_id(self) -> int | None:
        if self.tok.pad_token_id is not None:
            return self.tok.pad_token_id
        eos = self.model.generation_config.eos_token_id
        return eos[0] if isinstance(eos, list) else eos


def chat_loop(gen: Generator, *, stdin: TextIO | None = None, stdout: TextIO | None = None, system: str | None = None,
              **gen_kw) -> int:
    """Read user turns from `stdin` until `/exit` or EOF; `/reset` forgets the conversation. Each
    answer is printed and kept in the history. Returns the number of answers."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    base = len(history)
    answers = 0
    if interactive:
        print("chat: /reset forgets the conversation, /exit (or Ctrl-D) leaves", file=stdout)
    while True:
        if interactive:
            print("user> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # EOF
            break
        text = line.rstrip("\n")
        cmd = text.strip()
        if cmd == "/exit":
            break
        if cmd == "/reset":
            del history[base:]
            print("(conversation reset)", file=stdout, flush=True)
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": text})
        answer = gen.complete(history, **gen_kw)
        history.append({"role": "assistant", "content": answer})
        answers += 1
        print(f"assistant> {answer}", file=stdout, flush=True)
    return answers
