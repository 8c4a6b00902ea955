"""Records -> tokenized samples, with the bad-record policy.

A record is one JSON object (a line, a row, an array element): `{"messages": [...]}`,
`{"conversations": [...]}` (ShareGPT), `{"instruction", "input", "output"}` (Alpaca),
`{"prompt": ..., "completion": ...}` or `{"text": ...}` (formats.py). Every failure (bad JSON, missing or mistyped fields, a sample with nothing to
train on, an overlong sample under `overlong: drop`, a chat role other than system/user/assistant/tool
under `data.unknown_roles: error`, where a compressed file broke) is a `BadRecord` naming `file:line`
and the reason; `on_bad_record: error` stops the job with it, `skip` counts it per reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .chat import ChatTemplateError, EmptyMaskError, encode_messages, encode_prompt_completion, encode_text, encode_turns
from .formats import SHAREGPT_ROLES, FormatError, normalize

if TYPE_CHECKING:
    from ..config import DataConfig


CHAT_FORMATS = ("messages", "sharegpt", "alpaca")


def no_chat_template(tokenizer, what: str):
    """The configuration error for chat records and a tokenizer without a chat template (every such
    record would fail the same way, so it is not a bad record to skip)."""
    from ..config import ConfigError

    name = str(getattr(tokenizer, "name_or_path", "") or "the tokenizer")
    return ConfigError(
        f"model.path: the tokenizer of {name!r} has no chat template, but {what} holds conversations; set "
        f"model.chat_template to a Jinja template (inline or a .jinja file), use a model whose tokenizer has one, "
        f"or give the data as text / prompt+completion strings")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


class BadRecord(ValueError):
    def __init__(self, where: str, reason: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.where, self.reason, self.detail = where, reason, detail


@dataclass(frozen=True)
class Sample:
    """One packing unit. Immutable, so loader state snapshots can share samples instead of copying them.

    A unit holds one or more documents laid end to end in `input_ids` (a preference pair: chosen
    then rejected). `doc_lens` gives their lengths; None means the whole sample is one document.
    The packer never splits a unit, and every document gets its own positions and attention.

    `doc_starts` (None: all 0) is the position of each document's first token. A document starting at
    s > 0 is a *branch*: it continues the first s tokens of the unit's first document, which it
    attends to without repeating them (`packing.share_prefix`: a pair's or a group's prompt computed
    once).
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # -100 where no loss
    where: str  # file:line, for error messages
    doc_lens: tuple[int, ...] | None = None  # None: one document
    epoch: int = 0  # the pass over its source this sample was read in (set by the loader)
    doc_starts: tuple[int, ...] | None = None  # None: every document starts at position 0

    @property
    def docs(self) -> tuple[int, ...]:
        """Lengths of the unit's documents, in order (one entry for a single-document sample)."""
        return self.doc_lens if self.doc_lens is not None else (len(self.input_ids),)

    @property
    def starts(self) -> tuple[int, ...]:
        """Position of each document's first token (0 unless it is a branch)."""
        return self.doc_starts if self.doc_starts is not None else (0,) * len(self.docs)


@dataclass
class RecordStats:
    seen: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    capped: int = 0  # records so long that only a prefix of their text was tokenized (see cap_text)
    expanded: int = 0  # kept records made into one sample per assistant turn (data.multi_turn)
    turn_samples: int = 0  # the samples those records gave

    def copy(self) -> "RecordStats":
        return RecordStats(self.seen, self.kept, self.truncated, Counter(self.skipped), self.capped, self.expanded,
                           self.turn_samples)

    def summary(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        capped = f" ({self.capped} so long that only their first characters were tokenized)" if self.capped else ""
        expanded = (f", {self.expanded} made into {self.turn_samples} samples (one per assistant turn)"
                    if self.expanded else "")
        return f"records: {self.seen} read, {self.kept} kept{expanded}, {self.truncated} truncated{capped}; skipped: {skipped}"


CAP_MARGIN = 64  # tokens tokenized past the limit, so the cut cannot change the tokens kept
CAP_CHARS_PER_TOKEN = 8  # first guess; quadrupled until the prefix gives enough tokens


def cap_text(tokenizer, text: str, max_tokens: int | None, *, add_special_tokens: bool) -> tuple[str, bool]:
    """(a prefix of `text` enough for its first `max_tokens` tokens, whether it was cut).

    A 5 MB record of which only max_seq_len tokens are kept is not tokenized in full: the prefix is
    grown (8, 32, 128, ... characters per token) until it gives at least max_tokens + CAP_MARGIN
    tokens, so the cut lies CAP_MARGIN tokens past the last token kept and cannot change it (a
    tokenizer's merges across a cut reach back a few tokens, not 64). Text shorter than the guess is
    returned whole, untouched."""
    if max_tokens is None:
        return text, False
    need = max_tokens + CAP_MARGIN
    chars = need * CAP_CHARS_PER_TOKEN
    while chars < len(text):
        if len(tokenizer(text[:chars], add_special_tokens=add_special_tokens)["input_ids"]) >= need:
            return text[:chars], True
        chars *= 4
    return text, False


def _check_messages(msgs) -> str | None:
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list of {role, content} objects"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return f"messages[{i}] must be an object with a string 'role'"
        if "content" not in m:
            return f"messages[{i}] has no 'content'"
        c = m["content"]
        if not (c is None or isinstance(c, (str, list))):
            return f"messages[{i}].content must be a string or a list of parts, got {type(c).__name__}"
    return None


ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {**SHAREGPT_ROLES, "developer": "system"}


def apply_role_policy(messages: list, where: str, policy: str, key: str = "messages") -> list:
    """`data.unknown_roles` on a checked message list: roles other than system/user/assistant/tool
    are an error (BadRecord `unknown_role`), mapped by their ShareGPT name, dropped, or kept."""
    if policy == "keep" or all(m["role"] in ROLES for m in messages):
        return messages
    out = []
    for i, m in enumerate(messages):
        role = m["role"]
        if role in ROLES:
            out.append(m)
        elif policy == "drop":
            continue
        elif policy == "map" and role.lower() in ROLE_ALIASES:
            out.append({**m, "role": ROLE_ALIASES[role.lower()]})
        else:
            hint = ("it has no known mapping; fix the record, or set data.unknown_roles: drop or keep" if policy == "map" else
                    "set data.unknown_roles: map (human -> user, gpt -> assistant, ...), drop or keep, or fix the record")
            raise BadRecord(where, "unknown_role", f"{key}[{i}].role {role!r} is not one of {', '.join(ROLES)}; {hint}")
    return out


MULTI_TURN_HINT = ("; this conversation trains correctly with data.multi_turn: expand (or auto): one sample per "
                   "assistant turn, rendered as at inference")


def _chat(tokenizer, multi_turn: str, single, per_turn):
    """Encode a conversation per `data.multi_turn`: single -> `single()`, expand -> `per_turn()`,
    auto -> single, else per turn. A refusal in single mode says whether expand would work."""
    if multi_turn == "expand":
        return per_turn()
    try:
        return single()
    except ChatTemplateError as e:
        try:
            encs = per_turn()
        except (ChatTemplateError, EmptyMaskError) as e2:
            if multi_turn == "auto":
                raise e2 from e
            raise ChatTemplateError(f"{e} (data.multi_turn: expand does not help here either: {e2})") from e
        if multi_turn == "auto":
            return encs
        raise ChatTemplateError(f"{e}{MULTI_TURN_HINT}") from e


def encode_record(tokenizer, rec: dict, where: str, fmt: str, unknown_roles: str = "error", *,
                  max_tokens: int | None = None, stats: RecordStats | None = None,
                  multi_turn: str = "single", template_kwargs: dict | None = None) -> Sample | list[Sample]:
    """One record -> Sample, or raise BadRecord naming the reason. With `max_tokens`, only what the
    first max_tokens tokens need of a long text / prompt / completion string, or of a conversation's
    render (one sample per conversation, templates without {% generation %}), is tokenized (counted
    in `stats.capped`); the tokens kept are the same. A conversation made into one sample per
    assistant turn (`multi_turn` expand, or auto where needed) gives a list of Samples.
    `template_kwargs` (data.chat_template_kwargs) go to every chat template render."""
    kw = dict(template_kwargs or {})
    try:
        fmt, rec = normalize(rec, fmt)
    except FormatError as e:
        raise BadRecord(where, e.reason, e.detail) from None
    if not has_chat_template(tokenizer) and (fmt == "messages" or (fmt == "prompt_completion" and isinstance(rec.get("prompt"), list))):
        raise no_chat_template(tokenizer, f"record {where}")
    try:
        if fmt == "messages":
            if (err := _check_messages(rec.get("messages"))) is not None:
                raise BadRecord(where, "wrong_type" if "messages" in rec else "missing_field", err)
            messages = apply_role_policy(rec["messages"], where, unknown_roles)
            tools = rec.get("tools")
            enc = _chat(tokenizer, multi_turn,
                        lambda: encode_messages(tokenizer, messages, tools=tools, max_tokens=max_tokens, **kw),
                        lambda: encode_turns(tokenizer, messages, tools=tools, **kw))
        elif fmt == "prompt_completion":
            p, c = rec.get("prompt"), rec.get("completion")
            if p is None or c is None:
                raise BadRecord(where, "missing_field", "prompt/completion record needs both 'prompt' and 'completion'")
            if isinstance(p, str) != isinstance(c, str) or not isinstance(p, (str, list)):
                raise BadRecord(where, "wrong_type", "'prompt' and 'completion' must both be strings or both lists of messages")
            if isinstance(p, list):
                for key, msgs in (("prompt", p), ("completion", c)):
                    if msgs and (err := _check_messages(msgs)) is not None:
                        raise BadRecord(where, "wrong_type", err.replace("'messages'", f"'{key}'").replace("messages[", f"{key}["))
                p = apply_role_policy(p, where, unknown_roles, "prompt")
                c = apply_role_policy(c, where, unknown_roles, "completion")
            if isinstance(p, str):
                p, cut_p = cap_text(tokenizer, p, max_tokens, add_special_tokens=True)
                c, cut_c = cap_text(tokenizer, c, max_tokens, add_special_tokens=False)
                if (cut_p or cut_c) and stats is not None:
                    stats.capped += 1
            if isinstance(p, list):
                enc = _chat(tokenizer, multi_turn, lambda: encode_prompt_completion(tokenizer, p, c, max_tokens=max_tokens, **kw),
                            lambda: encode_prompt_completion(tokenizer, p, c, per_turn=True, **kw))
            else:
                enc = encode_prompt_completion(tokenizer, p, c)
        else:
            if not isinstance(rec.get("text"), str):
                raise BadRecord(where, "wrong_type" if "text" in rec else "missing_field", "'text' must be a string")
            text, cut = cap_text(tokenizer, rec["text"], max_tokens, add_special_tokens=True)
            if cut and stats is not None:
                stats.capped += 1
            enc = encode_text(tokenizer, text)
    except EmptyMaskError as e:
        if getattr(e, "capped", False) and stats is not None:
            stats.capped += 1
        raise BadRecord(where, "empty_mask", f"nothing to train on: {e}") from e
    except ChatTemplateError as e:
        raise BadRecord(where, "template", str(e)) from e
    if isinstance(enc, list):
        return [_sample(e, where) for e in enc]
    if enc.capped and stats is not None:
        stats.capped += 1
    return _sample(enc, where)


def _sample(enc, where: str) -> Sample:
    labels = [t if m else -100 for t, m in zip(enc.input_ids, enc.loss_mask)]
    return Sample(tuple(enc.input_ids), tuple(labels), where)


def fit_length(s: Sample, max_len: int, policy: str, stats: RecordStats) -> Sample:
    if len(s.input_ids) <= max_len:
        return s
    if policy == "drop":
        raise BadRecord(s.where, "overlong", f"{len(s.input_ids)} tokens > data.max_seq_len={max_len} (data.overlong: drop)")
    labels = s.labels[:max_len]
    if all(lab == -100 for lab in labels[1:]):
        raise BadRecord(s.where, "empty_mask", f"nothing to train on after truncation to data.max_seq_len={max_len}")
    stats.truncated += 1
    return Sample(s.input_ids[:max_len], labels, s.where)


def encode_sft_record(tokenizer, rec: dict, where: str, cfg: "DataConfig", stats: RecordStats) -> Sample | list[Sample]:
    """The loader's default `encode`: one SFT record -> one single-document Sample of at most
    min(data.max_seq_len, data.max_tokens_per_batch) tokens (data.overlong decides the rest).

    With data.multi_turn expand (or auto, where needed) a conversation gives one such Sample per
    assistant turn, each its own document; each follows data.overlong on its own. A turn sample that
    is dropped (overlong: drop) or loses its turn to truncation is left out and the record counts as
    truncated; a record left with no sample is a bad record (overlong / empty_mask)."""
    max_len = min(cfg.max_seq_len, cfg.max_tokens_per_batch)
    capped = stats.capped
    too_long = BadRecord(where, "overlong", f"far more than data.max_seq_len={max_len} tokens (data.overlong: drop)")
    try:
        out = encode_record(tokenizer, rec, where, cfg.format, cfg.unknown_roles, max_tokens=max_len, stats=stats,
                            multi_turn=cfg.multi_turn, template_kwargs=cfg.chat_template_kwargs)
    except BadRecord as bad:  # e.g. capped with no assistant turn in the tokens kept: overlong comes first
        if stats.capped > capped and cfg.overlong == "drop":
            raise too_long from bad
        raise
    if stats.capped > capped and cfg.overlong == "drop":  # its full length was never counted
        raise too_long
    if not isinstance(out, list):
        return fit_length(out, max_len, cfg.overlong, stats)
    kept, lost, first_bad = [], False, None
    for s in out:
        try:
            fitted = fit_length(s, max_len, cfg.overlong, RecordStats())
        except BadRecord as bad:
            lost, first_bad = True, first_bad or bad
            continue
        lost = lost or len(fitted.input_ids) < len(s.input_ids)
        kept.append(fitted)
    if not kept:
        raise BadRecord(where, first_bad.reason, f"{first_bad.detail} (every assistant turn's sample, data.multi_turn)")
    if lost:
        stats.truncated += 1
    stats.expanded += 1
    stats.turn_samples += len(kept)
    return kept
