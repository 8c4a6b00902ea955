"""Preference pairs (DPO and friends) -> packing units of two documents: chosen, then rejected.

A record is TRL's explicit-prompt preference format, one JSON object per line:

    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
    {"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", ...}], "rejected": ...}

* `prompt`: a string or a non-empty list of messages; `messages` is accepted as an alias for a
  message-list prompt.
* `chosen` / `rejected`: each a string, one message object, or a list of messages.

Each side is rendered through the tokenizer layer (`posttrain.data.chat.encode_prompt_completion`),
so its ids are exactly the chat template's rendering of prompt + completion and its scored tokens
exactly the completion's assistant tokens (content and end-of-turn marker). With a chat template a
string prompt becomes one user message and a string completion one assistant message; without a
chat template both must be strings and go through the plain-text path (prompt with the tokenizer's
special tokens, completion + eos).

The pair becomes ONE `Sample` whose `input_ids` are chosen + rejected and whose `doc_lens` are
(len(chosen), len(rejected)); the packer never splits it, and each side is its own document
(positions restart, nothing attends across). Labels are -100 outside each side's completion.

Bad pairs raise `BadRecord` with reason `missing_field`, `wrong_type`, `identical_pair` (both sides
render to the same ids), `empty_mask` (a side with nothing to score, also after truncation),
`template` (the chat template cannot render it correctly) or, under `overlong: drop`, `overlong`.

Length: each side must fit `max_len_per_side = min(data.max_seq_len, data.max_tokens_per_batch // 2)`
(`pair_max_len`), so a whole pair always fits one packed micro-batch and its two padded rows fit the
budget counted with padding. `overlong: truncate` cuts each side's tail; `drop` drops the pair.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .chat import ChatTemplateError, EmptyMaskError, encode_prompt_completion
from .records import BadRecord, RecordStats, Sample, _check_messages, apply_role_policy

if TYPE_CHECKING:
    from ..config import DataConfig

__all__ = ["encode_pair", "fit_pair", "pair_max_len", "encode_pair_record"]

SIDES = ("chosen", "rejected")


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _rename(err: str, key: str) -> str:
    """_check_messages' message about 'messages', said about `key`."""
    return err.replace("'messages'", f"'{key}'").replace("messages[", f"{key}[")


def _prompt(rec: dict, where: str, unknown_roles: str = "error"):
    if "prompt" in rec and "messages" in rec:
        raise BadRecord(where, "wrong_type", "preference record has both 'prompt' and 'messages'; give one (the prompt)")
    key = "prompt" if "prompt" in rec else "messages" if "messages" in rec else None
    if key is None or rec[key] is None:
        keys = ", ".join(sorted(rec)) or "none"
        raise BadRecord(where, "missing_field", f"preference record needs a 'prompt' (or 'messages') and 'chosen' + 'rejected' (keys: {keys})")
    p = rec[key]
    if isinstance(p, str) and key == "prompt":
        return p
    if not isinstance(p, list):
        kinds = "a string or a list of messages" if key == "prompt" else "a list of messages"
        raise BadRecord(where, "wrong_type", f"'{key}' must be {kinds}, got {type(p).__name__}")
    if (err := _check_messages(p)) is not None:
        raise BadRecord(where, "wrong_type", _rename(err, key))
    return apply_role_policy(p, where, unknown_roles, key)


def _completion(rec: dict, side: str, where: str, unknown_roles: str = "error"):
    c = rec.get(side)
    if c is None:
        keys = ", ".join(sorted(rec)) or "none"
        raise BadRecord(where, "missing_field", f"preference record has no '{side}' (keys: {keys})")
    if isinstance(c, str):
        return c
    if isinstance(c, dict):
        c = [c]
    if not isinstance(c, list):
        raise BadRecord(where, "wrong_type", f"'{side}' must be a string, a message object or a list of messages, got {type(c).__name__}")
    if (err := _check_messages(c)) is not None:
        raise BadRecord(where, "wrong_type", _rename(err, side))
    return apply_role_policy(c, where, unknown_roles, side)


def _encode_side(tokenizer, prompt, completion, side: str, where: str, chat: bool, template_kwargs: dict | None = None):
    if chat:
        p = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        c = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
    elif isinstance(prompt, str) and isinstance(completion, str):
        p, c = prompt, completion
    else:
        raise BadRecord(where, "template", "the tokenizer has no chat template: a preference pair with messages needs one "
                        "(without a template, 'prompt', 'chosen' and 'rejected' must all be strings)")
    try:
        enc = encode_prompt_completion(tokenizer, p, c, **((template_kwargs or {}) if chat else {}))
    except EmptyMaskError as e:
        raise BadRecord(where, "empty_mask", f"'{side}': nothing to score: {e}") from e
    except ChatTemplateError as e:
        raise BadRecord(where, "template", f"'{side}': {e}") from e
    labels = tuple(t if m else -100 for t, m in zip(enc.input_ids, enc.loss_mask))
    return tuple(enc.input_ids), labels


def encode_pair(tokenizer, rec: dict, where: str, unknown_roles: str = "error", template_kwargs: dict | None = None) -> Sample:
    """One preference record -> one unit of two documents (chosen, rejected), or raise BadRecord.
    `unknown_roles` is data.unknown_roles for the messages of prompt and completions;
    `template_kwargs` (data.chat_template_kwargs) go to the chat template."""
    prompt = _prompt(rec, where, unknown_roles)
    completions = [_completion(rec, side, where, unknown_roles) for side in SIDES]
    chat = _has_chat_template(tokenizer)
    (c_ids, c_labels), (r_ids, r_labels) = (
        _encode_side(tokenizer, prompt, comp, side, where, chat, template_kwargs) for side, comp in zip(SIDES, completions)
    )
    if c_ids == r_ids and c_labels == r_labels:
        raise BadRecord(where, "identical_pair", "'chosen' and 'rejected' render to the same tokens: nothing to prefer")
    return Sample(c_ids + r_ids, c_labels + r_labels, where, (len(c_ids), len(r_ids)))


def fit_pair(sample: Sample, max_len_per_side: int, policy: str, stats: RecordStats) -> Sample:
    """Each document (side) of `sample` must fit `max_len_per_side`: `truncate` cuts a side's tail
    (a side left with no target -> BadRecord empty_mask), `drop` -> BadRecord overlong.
    A truncated pair counts once in `stats.truncated`."""
    docs = sample.docs
    if max(docs) <= max_len_per_side:
        return sample
    names = SIDES if len(docs) == 2 else tuple(f"document {i}" for i in range(len(docs)))
    limit = f"max_len_per_side={max_len_per_side} (min(data.max_seq_len, data.max_tokens_per_batch // 2))"
    if policy == "drop":
        long = ", ".join(f"'{nm}' has {n} tokens" for nm, n in zip(names, docs) if n > max_len_per_side)
        raise BadRecord(sample.where, "overlong", f"{long} > {limit} (data.overlong: drop)")
    ids, labels, lens, start = (), (), [], 0
    for nm, n in zip(names, docs):
        keep = min(n, max_len_per_side)
        side_labels = sample.labels[start : start + keep]
        if all(lab == -100 for lab in side_labels[1:]):
            raise BadRecord(sample.where, "empty_mask", f"'{nm}': nothing to score after truncation to {limit}")
        ids += sample.input_ids[start : start + keep]
        labels += side_labels
        lens.append(keep)
        start += n
    stats.truncated += 1
    return Sample(ids, labels, sample.where, tuple(lens))


def pair_max_len(cfg: "DataConfig") -> int:
    """Longest side of a pair: min(data.max_seq_len, data.max_tokens_per_batch // 2), so both sides
    fit one micro-batch (packed: the sum; padded: two rows of the longer side)."""
    return min(cfg.max_seq_len, cfg.max_tokens_per_batch // 2)


def encode_pair_record(tokenizer, rec: dict, where: str, cfg: "DataConfig", stats: RecordStats) -> Sample:
    """The loader's `encode` for preference data: `encode_pair` + `fit_pair` with
    max_len_per_side = min(data.max_seq_len, data.max_tokens_per_batch // 2) and data.overlong.
    `data.format` does not apply to pairs."""
    return fit_pair(encode_pair(tokenizer, rec, where, cfg.unknown_roles, cfg.chat_template_kwargs), pair_max_len(cfg),
                    cfg.overlong, stats)
