"""Prompt records for on-policy methods (GRPO, evaluation): `{"prompt": str | [messages], ...}`.

The prompt is rendered by the chat template with the generation prompt (`add_generation_prompt`),
exactly as at inference, into token ids that the rollout engine and the trainer share. Every other
field of the record (an `answer`, test cases, metadata) travels with it to the reward functions.
A tokenizer without a chat template encodes a string prompt as plain text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .records import BadRecord, RecordStats, _check_messages

if TYPE_CHECKING:
    from ..config import DataConfig


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    record: dict  # the whole record (reward functions read its other fields)
    where: str  # file:line
    epoch: int = 0  # the pass over its source it was read in (set by the stream, like a Sample's)


def prompt_messages(rec: dict, where: str) -> list[dict] | str:
    p = rec.get("prompt")
    if p is None:
        keys = ", ".join(sorted(rec)) or "none"
        raise BadRecord(where, "missing_field", f"a prompt record needs 'prompt' (a string or a list of messages); keys: {keys}")
    if isinstance(p, str):
        return [{"role": "user", "content": p}]
    if (err := _check_messages(p)) is not None:
        raise BadRecord(where, "wrong_type", err.replace("'messages'", "'prompt'"))
    if p[-1]["role"] == "assistant":
        raise BadRecord(where, "wrong_type", "the prompt's last message is an assistant turn; the completion is generated")
    return p


def encode_prompt(tokenizer, rec: dict, where: str, template_kwargs: dict | None = None) -> Prompt:
    """`template_kwargs` (data.chat_template_kwargs) go to the chat template, as for training samples."""
    messages = prompt_messages(rec, where)
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                            **(template_kwargs or {}))
    else:
        if not isinstance(rec["prompt"], str):
            raise BadRecord(where, "template", "the tokenizer has no chat template, so the prompt must be a string")
        ids = tokenizer(rec["prompt"], add_special_tokens=True)["input_ids"]
    return Prompt(tuple(int(t) for t in ids), rec, where)


def prompt_limit(cfg: "DataConfig", max_new_tokens: int) -> int:
    """The longest prompt that leaves room for a full completion within data.max_seq_len."""
    return cfg.max_seq_len - max_new_tokens


def make_prompt_encoder(max_prompt_tokens: int):
    """The loader `encode` for prompt records: longer prompts are bad records (`too_long`), never cut."""

    def encode(tokenizer, rec: dict, where: str, cfg: "DataConfig", stats: RecordStats) -> Prompt:
        p = encode_prompt(tokenizer, rec, where, cfg.chat_template_kwargs)
        if len(p.ids) > max_prompt_tokens:
            raise BadRecord(where, "overlong", f"prompt of {len(p.ids)} tokens > data.max_seq_len - max_new_tokens = {max_prompt_tokens}")
        return p

    return encode
