"""Chat tokenization with an assistant-only loss mask, driven by the tokenizer's own chat template.

The chat template is the single source of truth: the ids we train on are exactly
`tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]` (checked on every sample), and
nothing here concatenates per-turn renders. What is trained (see docs/chat_templates.md):

* each assistant turn's answer tokens and the turn's end-of-turn marker (`<|im_end|>`, `<|eot_id|>`,
  `<end_of_turn>`, `</s>`, ...); never tokens after that marker (the "\\n" after `<|im_end|>`), never
  system / user / tool turns;
* the assistant header (`<|im_start|>assistant\\n`) is prompt: we train on what the model generates
  after `add_generation_prompt=True`. Templates with native `{% generation %}` spans are
  authoritative where they are used (some TRL templates put part of the header inside the span).

Two ways to find the spans:

* template has `{% generation %}` -> transformers' `return_assistant_tokens_mask=True`;
* otherwise prefix-diff: for assistant turn i, p = render(messages[:i], add_generation_prompt=True)
  and q = render(messages[:i+1]); the span is [len(p), len(q)) of the full render, mapped to tokens
  with the offsets of the full render. When q is not a prefix of the full render but p is (Qwen3
  renders the *last* assistant turn with an empty `<think></think>` and earlier ones without), the
  span runs from len(p) to the end-of-turn marker after the turn's content ("handled").

`encode_turns` (`data.multi_turn: expand`) makes one sample per assistant turn k instead: the
conversation up to turn k rendered as the template renders it when turn k is the last one (history
rewritten as at inference: reasoning dropped, think blocks added, ...), training turn k only. It is
the only correct option for templates that rewrite history. When even that render does not start
with the generation prompt because the template moves text into the last prompt message (Mistral
v3/Nemo put the system prompt into the last user turn, and only when it is the last message), the
sample is the inference prompt `render(messages[:k], add_generation_prompt=True)` followed by the
turn's text as the template renders it ("inference-render"); its prompt tokens are checked to be
exactly the prompt's own tokens.

Both are verified per assistant turn (content and any reasoning field inside the masked text, an
end-of-turn special token present when the template writes one); any failure raises
`ChatTemplateError` naming the problem. A silently wrong mask is never returned.
"""

from __future__ import annotations

import re
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ChatTemplateError",
    "EmptyMaskError",
    "Encoded",
    "encode_messages",
    "encode_turns",
    "encode_prompt_completion",
    "encode_text",
]


class ChatTemplateError(ValueError):
    """The chat template cannot be trained on correctly (message names the problem and what to do)."""


class _PromptNotPrefix(ChatTemplateError):
    """Prefix-diff: the generation prompt is not a prefix of the render (history rewritten or text
    moved into the last prompt message); one sample per assistant turn may still work."""


class _NoCap(Exception):
    """The capped path cannot decide a turn from the tokenized prefix alone: use the full render."""


class EmptyMaskError(ValueError):
    """The sample has no trainable token (no assistant turn, empty completion, ...)."""


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    loss_mask: list[int]  # 1 = token i is a training target (labels[i] = input_ids[i]), 0 = not
    # only a prefix of the render was tokenized (max_tokens): the first max_tokens ids and their mask
    # are those of the whole render; the ids after them are not, and must be cut (records.fit_length)
    capped: bool = field(default=False, compare=False)


# Names of end-of-turn markers of public chat models. Only used to pick the end-of-turn token when a
# turn's content cannot be located (tool calls, empty content); otherwise the end-of-turn marker is
# the first special token after the content.
_EOT_NAMES = frozenset({
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|return|>", "<|call|>", "</s>",
    "<|endoftext|>", "<|end_of_text|>", "<eos>", "<｜end▁of▁sentence｜>", "<|END_OF_TURN_TOKEN|>",
    "<|END_RESPONSE|>", "<end_of_utterance>", "<|im_end|>", "<turn|>",
})
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


@dataclass(frozen=True)
class _TokInfo:
    special_ids: frozenset[int]
    eot_ids: frozenset[int]
    name: str
    special_strs: tuple[str, ...] = ()  # their text, for checks on text that is not tokenized (capped)


_CACHE: dict[int, tuple[Any, Any, _TokInfo]] = {}
_CACHE_LOCK = threading.Lock()


def _tok_info(tok) -> _TokInfo:
    key = (len(tok), str(tok.chat_template))
    with _CACHE_LOCK:
        hit = _CACHE.get(id(tok))
        if hit is not None and hit[0]() is tok and hit[1] == key:
            return hit[2]
    special = set(getattr(tok, "all_special_ids", []) or [])
    for tid, added in (getattr(tok, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            special.add(int(tid))
    eot = {tid for tid in special if tok.convert_ids_to_tokens(tid) in _EOT_NAMES}
    if tok.eos_token_id is not None:
        eot.add(tok.eos_token_id)
    name = str(getattr(tok, "name_or_path", "") or "").rstrip("/").rsplit("/", 1)[-1] or "<unnamed>"
    strs = tuple(t for t in tok.convert_ids_to_tokens(sorted(special)) if t)
    info = _TokInfo(frozenset(special), frozenset(eot), name, strs)
    try:
        ref = weakref.ref(tok)
    except TypeError:  # pragma: no cover - tokenizers are weak-referenceable
        return info
    with _CACHE_LOCK:
        _CACHE[id(tok)] = (ref, key, info)
    return info


def _has_generation(tok, tools) -> bool:
    try:
        template = tok.get_chat_template(None, tools)
    except ValueError as e:
        raise ChatTemplateError(f"template {_tok_info(tok).name}: tokenizer has no usable chat template ({e})") from e
    return bool(_GENERATION_RE.search(template))


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def encode_messages(tokenizer, messages: list[dict], *, tools: list | None = None, max_tokens: int | None = None,
                    **template_kwargs) -> Encoded:
    """Render `messages` with the tokenizer's chat template; mask = assistant answers + end-of-turn.

    With `max_tokens`, a render far longer than that is tokenized only as far as its first max_tokens
    tokens need (plus a margin; `Encoded.capped`), for templates without {% generation %}: those ids
    and their mask are exactly the full render's, the ids after them are not and must be cut. Turns
    that start past the tokenized prefix are neither trained nor checked (they would be truncated)."""
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    train = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    return _encode_chat(tokenizer, list(messages), train, tools, template_kwargs, max_tokens=max_tokens)


def _encode_messages_traced(tokenizer, messages, *, tools=None, **template_kwargs) -> tuple[Encoded, list[str]]:
    """encode_messages plus how each assistant turn's span was found ("generation", "prefix-diff",
    "history-rerender"); for tests and the conformance report."""
    paths: list[str] = []
    train = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    return _encode_chat(tokenizer, list(messages), train, tools, template_kwargs, paths), paths


def encode_turns(tokenizer, messages: list[dict], *, tools: list | None = None, **template_kwargs) -> list[Encoded]:
    """One sample per assistant turn (`data.multi_turn: expand`): sample k is the conversation up to
    assistant turn k rendered as at inference (the template rewrites the history as it does when turn
    k is the last message), with only turn k trained. Turns with nothing to train (empty content) give
    no sample; EmptyMaskError when no turn gives one."""
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    train = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    return _encode_turns(tokenizer, list(messages), train, tools, template_kwargs)


def _encode_turns_traced(tokenizer, messages, *, tools=None, **template_kwargs) -> tuple[list[Encoded], list[str]]:
    """encode_turns plus how each sample's span was found ("generation", "prefix-diff", "inference-render")."""
    paths: list[str] = []
    train = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    return _encode_turns(tokenizer, list(messages), train, tools, template_kwargs, paths), paths


def encode_prompt_completion(tokenizer, prompt, completion, *, per_turn: bool = False, max_tokens: int | None = None,
                             **template_kwargs) -> Encoded | list[Encoded]:
    """TRL prompt/completion: both strings ("standard") or both lists of messages ("conversational").
    With `per_turn` (`data.multi_turn: expand`), a conversational pair gives a list: one sample per
    assistant turn of the completion, as `encode_turns`. `template_kwargs` go to the chat template;
    `max_tokens` caps the tokenization of a conversational pair as in `encode_messages`."""
    if isinstance(prompt, str) and isinstance(completion, str):
        p_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        c_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) if completion else []
        if not c_ids:
            raise EmptyMaskError("sample has no assistant tokens to train on: the completion is empty")
        eos = tokenizer.eos_token_id
        if eos is not None and c_ids[-1] != eos:
            c_ids.append(eos)
        return Encoded(p_ids + c_ids, [0] * len(p_ids) + [1] * len(c_ids))
    if isinstance(prompt, (list, tuple)) and isinstance(completion, (list, tuple)):
        messages = list(prompt) + list(completion)
        train = [i for i in range(len(prompt), len(messages)) if messages[i].get("role") == "assistant"]
        if not train:
            raise EmptyMaskError("sample has no assistant tokens to train on: the completion has no assistant message")
        if per_turn:
            return _encode_turns(tokenizer, messages, train, None, template_kwargs)
        return _encode_chat(tokenizer, messages, train, None, template_kwargs, max_tokens=max_tokens)
    raise TypeError("prompt and completion must both be strings or both be lists of messages")


def encode_text(tokenizer, text: str) -> Encoded:
    """Plain text (continued pretraining): every token is a target; eos appended if missing."""
    if not isinstance(text, str):
        raise TypeError("text must be a string")
    if not text.strip():
        raise EmptyMaskError("sample has no tokens to train on: the text is empty")
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return Encoded(ids, [1] * len(ids))


# ----------------------------------------------------------------------------------------------
# implementation
# ----------------------------------------------------------------------------------------------


def _ids_offsets(tok, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """`tok(text, add_special_tokens=False, return_offsets_mapping=True)`'s ids and offsets. Straight
    from the fast tokenizer's backend where that call would only pass the text through (no truncation
    or padding configured on the backend, special tokens split as the tokenizer says): transformers'
    own call adds ~20 us of Python per text around a ~35 us encode, about an eighth of the SFT demo's
    data preparation per record. Anything else goes through the tokenizer's call."""
    backend = getattr(tok, "_tokenizer", None)
    if (backend is not None and getattr(backend, "truncation", True) is None and getattr(backend, "padding", True) is None
            and backend.encode_special_tokens == bool(getattr(tok, "split_special_tokens", False))):
        enc = backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _render(tok, messages, tools, kw, *, add_generation_prompt=False) -> str:
    return tok.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **kw
    )


def _check_kwargs(kw: dict) -> dict:
    kw = dict(kw)
    for bad in ("add_generation_prompt", "continue_final_message", "tokenize", "return_dict",
                "return_assistant_tokens_mask"):
        if kw.get(bad):
            raise ValueError(f"encode_messages: {bad}=... is not allowed for training samples")
        kw.pop(bad, None)
    return kw


def _encode_turns(tok, messages: list[dict], train: list[int], tools, kw: dict, paths: list | None = None) -> list[Encoded]:
    kw = _check_kwargs(kw)
    if not train:
        raise EmptyMaskError("sample has no assistant tokens to train on: the conversation has no assistant turn")
    out = []
    for k in train:
        hows: list[str] = []
        try:
            enc = _encode_chat(tok, messages[: k + 1], [k], tools, kw, hows)
        except _PromptNotPrefix as e:
            enc = _inference_render(tok, _tok_info(tok), messages, k, tools, kw, e)
            hows = ["inference-render"]
        except EmptyMaskError:
            continue  # an empty turn: nothing to train in its sample
        out.append(enc)
        if paths is not None:
            paths.extend(hows)
    if not out:
        raise EmptyMaskError("sample has no assistant tokens to train on: every assistant turn is empty")
    return out


def _inference_render(tok, info: _TokInfo, messages: list[dict], k: int, tools, kw: dict,
                      cause: ChatTemplateError) -> Encoded:  # cause: why prefix-diff refused the turn
    """Assistant turn k as served: the generation prompt p = render(messages[:k], add_generation_prompt=True)
    followed by the turn's text C as the template renders it at the end of q = render(messages[:k+1]).

    Only for templates that put extra text into the last prompt message when it is the last one
    (Mistral v3/Nemo: the system prompt): p = X + S + Y and q = X + Y + C, where X is the common
    prefix, S the inserted text, and Y the rest of the prompt, which must hold the previous message's
    whole content and a special token (the turn's header). Anything else (e.g. a generation prompt that
    forces `<think>\n` the turn does not render) stays refused. The prompt must tokenize to exactly
    the prompt's own ids (a clean token boundary), so the trained tokens follow the served prompt."""
    p = _render(tok, messages[:k], tools, kw, add_generation_prompt=True)
    q = _render(tok, messages[: k + 1], tools, kw)
    prev = _content_texts(messages[k - 1]) if k > 0 else []
    y = x = None
    if prev and (pc := p.rfind(prev[0])) >= 0:
        y0 = p[pc:]  # the previous message's content through the end of the generation prompt
        i0 = q.rfind(y0)
        if i0 >= 0 and _text_has_special(tok, info, y0):
            n = 0  # extend Y back over what p and q share right before it
            while n < min(pc, i0) and p[pc - n - 1] == q[i0 - n - 1]:
                n += 1
            if p.startswith(q[:i0 - n]) and pc - n > i0 - n:
                x, y = i0 - n, p[pc - n:]
    if y is None:
        raise ChatTemplateError(
            f"template {info.name}: assistant turn {k} rendered as the last message does not continue the prompt "
            f"rendered with add_generation_prompt=True ({p[-40:]!r} at the end of the prompt vs {q[-60:]!r} at the "
            "end of the turn), so no sample is what the model sees when served: the generation prompt forces "
            "text that the template does not render in this turn (e.g. an opening <think> while the turn has no "
            "reasoning or the template strips reasoning from every turn, or an empty think block before a turn "
            "with reasoning). Give the turn its reasoning in the form "
            "the template renders, pass the template's switch for answers without reasoning (e.g. "
            "data.chat_template_kwargs: {enable_thinking: false}), or use a template whose turns continue its generation prompt"
        ) from cause
    c = q[x + len(y):]  # p = X + S + Y, q = X + Y + C
    text = p + c
    try:
        p_ids = list(tok.apply_chat_template(messages[:k], tools=tools, tokenize=True, return_dict=True,
                                             add_generation_prompt=True, **kw)["input_ids"])
    except Exception as e:
        raise ChatTemplateError(f"template {info.name}: cannot render the prompt of assistant turn {k} "
                                f"({type(e).__name__}: {e})") from e
    ids, offsets = _ids_offsets(tok, text)
    c_ids = list(tok(c, add_special_tokens=False)["input_ids"])
    if ids != p_ids + c_ids:
        raise ChatTemplateError(
            f"template {info.name}: assistant turn {k}: the template moves text into the prompt at inference, and "
            "the generation prompt followed by the turn does not tokenize to the prompt's own tokens plus the "
            "turn's (a token straddles the end of the prompt), so the sample would not be what the model sees "
            "when served"
        ) from cause
    a, b = len(p_ids), len(ids)
    a, b, has_eot = _trim_to_eot(info, messages[k], text, ids, offsets, a, b)
    _verify(info, messages[k], k, text, offsets, a, b, _text_has_special(tok, info, c), has_eot,
            "generation prompt + turn as rendered last", prompt_given=True)
    if b <= a:
        raise EmptyMaskError("sample has no assistant tokens to train on: the assistant turn is empty")
    return Encoded(ids, [0] * a + [1] * (b - a) + [0] * (len(ids) - b))


def _encode_chat(tok, messages: list[dict], train: list[int], tools, kw: dict, paths: list | None = None,
                 max_tokens: int | None = None) -> Encoded:
    kw = _check_kwargs(kw)
    if not train:
        raise EmptyMaskError("sample has no assistant tokens to train on: the conversation has no assistant turn")
    info = _tok_info(tok)
    gen = _has_generation(tok, tools)
    full = None
    if max_tokens is not None and not gen:
        try:
            full = _render(tok, messages, tools, kw)
        except Exception:  # noqa: BLE001 - reported with its context by the full path below
            pass
        if full is not None:
            from .records import cap_text  # records imports this module

            prefix, cut = cap_text(tok, full, max_tokens, add_special_tokens=False)
            if cut:
                try:
                    return _encode_capped(tok, info, messages, train, tools, kw, full, prefix, paths)
                except _NoCap:
                    pass

    try:
        if full is None:  # (the render above, when it was not cut, is the conversation's render)
            full = _render(tok, messages, tools, kw)
        # With {% generation %} markers transformers' own mask is needed; otherwise tokenize=True would
        # only tokenize a second render the same way as `tok(full, ...)` below (apply_chat_template
        # calls `self(rendered, add_special_tokens=False)`), so a second render, ~10x cheaper than a
        # tokenization, checks the same thing: that the template renders deterministically.
        out = tok.apply_chat_template(
            messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kw
        ) if gen else None
        again = _render(tok, messages, tools, kw) if not gen else full
    except ChatTemplateError:
        raise
    except Exception as e:  # jinja TemplateError (raise_exception), TypeError on content type, ...
        raise ChatTemplateError(
            f"template {info.name}: cannot render this conversation ({type(e).__name__}: {e}); "
            "check the roles and content format the template accepts (system role, list-of-parts content)"
        ) from e
    try:
        ids, offsets = _ids_offsets(tok, full)
    except NotImplementedError as e:
        raise ChatTemplateError(
            f"template {info.name}: assistant masks need offset mappings; load a fast tokenizer (use_fast=True)"
        ) from e
    if again != full or (out is not None and list(out["input_ids"]) != ids):
        raise ChatTemplateError(
            f"template {info.name}: tokenizing the rendered text (add_special_tokens=False) does not give "
            "apply_chat_template's ids (the render is not deterministic, e.g. it changed between calls); "
            "cannot align the mask"
        )

    if gen:
        spans = _generation_spans(tok, info, messages, train, full, ids, offsets, list(out["assistant_masks"]))
        hows = ["generation"] * len(spans)
    else:
        spans, hows = _prefix_spans(tok, info, messages, train, tools, kw, full, ids, offsets)
    if paths is not None:
        paths.extend(hows)

    mask = _span_mask(len(ids), spans)
    if not any(mask):
        raise EmptyMaskError("sample has no assistant tokens to train on: every assistant turn is empty")
    return Encoded(ids, mask)


def _span_mask(n: int, spans) -> list[int]:
    """1 on every token inside one of the (start, end) spans, else 0."""
    mask = [0] * n
    for a, b in spans:
        for t in range(a, b):
            mask[t] = 1
    return mask


def _encode_capped(tok, info, messages, train, tools, kw, full: str, prefix: str, paths) -> Encoded:
    """prefix-diff masking of `full` with only `prefix` tokenized (see encode_messages' max_tokens)."""
    ids, offsets = _ids_offsets(tok, prefix)
    spans, hows = _prefix_spans(tok, info, messages, train, tools, kw, full, ids, offsets, cut=len(prefix))
    if paths is not None:
        paths.extend(hows)
    mask = _span_mask(len(ids), spans)
    if not any(mask):
        err = EmptyMaskError("sample has no assistant tokens to train on: no assistant turn starts within the "
                             "tokens kept (data.max_seq_len)")
        err.capped = True  # counted like a capped sample
        raise err
    return Encoded(ids, mask, capped=True)


def _content_end(info, message: dict, full: str, start: int, end: int) -> int:
    """End char of the turn's content in full[start:end] (as _verify accepts it: in the span, starting
    in the generation prompt, or as think-block parts), checked without tokens for a turn that is not
    (wholly) tokenized: _NoCap when the content is missing or no special token text follows it (an
    end-of-turn marker), so that the full path, not the cap, decides whether the turn is refused."""
    ends = []
    for piece in _content_texts(message) + _reasoning_texts(message):
        got = _find_end(full, piece, start, end)
        if got is None and (parts := _think_parts(piece)):
            got_parts = [_find_end(full, t, start, end) for t in parts]
            got = None if None in got_parts else max(got_parts)
        if got is None:
            raise _NoCap  # the full path reports the turn
        ends.append(got)
    if not ends:
        raise _NoCap
    content_end = max(ends)
    if not any(sp in full[content_end:end] for sp in info.special_strs):
        raise _NoCap
    return content_end


def _cut_turn(info, message: dict, full: str, ids, offsets, start: int, end: int) -> tuple[int, int] | None:
    """A turn [start, end) of `full` that runs past the tokenized prefix: None when its end-of-turn
    marker (the first special token after its content) is inside the prefix, so the normal trim sees
    exactly what it sees on the full render; else the span from its first token to the prefix's end
    (every token up to the marker is trained)."""
    content_end = _content_end(info, message, full, start, end)
    a, _ = _tokens_overlapping(offsets, start, end)
    if any(ids[t] in info.special_ids and offsets[t][0] >= content_end for t in range(a, len(ids))):
        return None
    return a, len(ids)


def _content_texts(message: dict) -> list[str]:
    """The stripped text pieces of a message's content that must appear in its masked span."""
    c = message.get("content")
    if isinstance(c, str):
        return [c.strip()] if c.strip() else []
    if isinstance(c, (list, tuple)):
        return [p["text"].strip() for p in c
                if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) and p["text"].strip()]
    return []


_THINK_RE = re.compile(r"^\s*<think>(.*?)</think>(.*)$", re.S)


def _think_parts(piece: str) -> list[str]:
    """Content with an inline `<think>reasoning</think>answer` block: [reasoning, answer] stripped (a
    template may re-render the block with its own whitespace, e.g. GLM-4.5 `<think>R</think>\nA`; both
    parts must still be in the turn). Any other content: [] (no fallback)."""
    m = _THINK_RE.match(piece)
    if not m:
        return []
    parts = [t.strip() for t in m.groups() if t.strip()]
    return parts if parts and "<think>" not in m.group(2) else []


def _reasoning_texts(message: dict) -> list[str]:
    out = []
    for k in _REASONING_KEYS:
        v = message.get(k)
        if isinstance(v, str) and v.strip():
            out.append(v.strip())
    return out


def _tokens_overlapping(offsets, start: int, end: int) -> tuple[int, int]:
    """Token index range [a, b) of the tokens overlapping chars [start, end)."""
    a = b = None
    for t, (s, e) in enumerate(offsets):
        if e > start and s < end and e > s:
            if a is None:
                a = t
            b = t + 1
        elif s >= end and e > s:
            break
    if a is None:
        return (0, 0)
    return (a, b)


def _trim_to_eot(info: _TokInfo, message: dict, full: str, ids, offsets, a: int, b: int) -> tuple[int, int, bool]:
    """Cut token span [a, b) right after the turn's end-of-turn special token.

    The end-of-turn marker is the first special token after the end of the turn's (last) content
    piece; when the content cannot be located (tool calls, empty content) it is the first known
    end-of-turn token (eos, <|im_end|>, <|eot_id|>, ...) in the span, else the last special token.
    Without any special token the span loses its trailing whitespace-only tokens.
    Returns (a, b, has_eot)."""
    specials = [t for t in range(a, b) if ids[t] in info.special_ids]
    if not specials:
        while b > a and not full[offsets[b - 1][0]:offsets[b - 1][1]].strip():
            b -= 1
        return a, b, False
    text_start, text_end = offsets[a][0], offsets[b - 1][1]
    content_end = None
    pos = text_start
    for piece in _content_texts(message) + _reasoning_texts(message):
        # the piece in the span, or starting in the generation prompt just before it (forced text), or
        # its think block's reasoning and answer (re-rendered by the template)
        for part in [piece, *_think_parts(piece)]:
            if (got := _find_end(full, part, text_start, text_end)) is not None:
                content_end = max(content_end or 0, got)
    if content_end is not None:
        pos = content_end
        after = [t for t in specials if offsets[t][0] >= pos]
        if after:
            return a, after[0] + 1, True
    eots = [t for t in specials if ids[t] in info.eot_ids and offsets[t][0] >= pos]
    if eots:
        return a, eots[0] + 1, True
    return a, specials[-1] + 1, True


def _find_end(full: str, part: str, start: int, end: int) -> int | None:
    """End char of `part` in full[start:end], else of an occurrence that starts before `start` (in the
    generation prompt: forced text) and ends inside; None if neither."""
    k = full.find(part, start, end)
    if k >= 0:
        return k + len(part)
    k = full.rfind(part, max(0, start - len(part)), end)
    return k + len(part) if 0 <= k < start < k + len(part) else None


def _in_span(piece: str, full: str, start: int, end: int, prompt_given: bool) -> bool:
    """`piece` lies in full[start:end]; or, with `prompt_given`, it starts in the generation prompt just
    before the span and ends inside it: the template's generation prompt forces the piece's first
    characters (QwQ, Qwen3.5/3.6 and Nemotron-3 end it with `<think>\n`, which the turn's content starts
    with), so at inference they are given, not generated, and the rest is trained."""
    if piece in full[start:end]:
        return True
    if not prompt_given:
        return False
    k = full.rfind(piece, max(0, start - len(piece)), end)
    return 0 <= k < start < k + len(piece)


def _verify(info: _TokInfo, message: dict, turn: int, full: str, offsets, a: int, b: int,
            eot_expected: bool, has_eot: bool, how: str, prompt_given: bool = False) -> None:
    if b <= a:
        if _content_texts(message):
            raise ChatTemplateError(
                f"template {info.name}: assistant turn {turn} has an empty mask span ({how}) although it has "
                "content; the template does not render this turn where expected"
            )
        return
    start, end = offsets[a][0], offsets[b - 1][1]
    for piece in _content_texts(message):
        if not _in_span(piece, full, start, end, prompt_given) and not all(
                _in_span(part, full, start, end, prompt_given) for part in _think_parts(piece)):
            raise ChatTemplateError(
                f"template {info.name}: the content of assistant turn {turn} does not appear in its masked span "
                f"({how}); the template rewrites the turn (e.g. strips <think> reasoning from history or trims "
                "content). Use one sample per assistant turn (data.multi_turn: expand), or a template with "
                "{% generation %} markers"
            )
    for piece in _reasoning_texts(message):
        if not _in_span(piece, full, start, end, prompt_given):
            raise ChatTemplateError(
                f"template {info.name}: the reasoning of assistant turn {turn} is dropped by the template "
                f"({how}); training on it would teach the model to skip reasoning. Use one sample per "
                "assistant turn (data.multi_turn: expand) if the template keeps reasoning for the last turn, or "
                "remove the reasoning field"
            )
    if eot_expected and not has_eot:
        raise ChatTemplateError(
            f"template {info.name}: the masked span of assistant turn {turn} has no end-of-turn special token "
            f"({how}); the model would not learn to stop. Check that the end-of-turn marker is a special token"
        )
    if not has_eot:
        raise ChatTemplateError(
            f"template {info.name}: assistant turn {turn} is not closed by any special token ({how}): the template "
            "writes no end-of-turn marker after the answer (e.g. GLM-4 ends a turn with the next turn's header, "
            "and the last turn with nothing), so a model trained on it would never learn to stop. Use a template "
            "that ends assistant turns with a special token (e.g. the TRL *_training variant with {% generation %})"
        )


def _prefix_spans(tok, info, messages, train, tools, kw, full, ids, offsets, cut: int | None = None):
    """Spans and how each was found. With `cut`, ids/offsets cover only full[:cut] (capped)."""
    spans, hows = [], []
    for i in train:
        if i == 0:
            raise ChatTemplateError(
                f"template {info.name}: the conversation starts with an assistant turn; there is no prompt to "
                "render with add_generation_prompt=True. Start with a user (or system) message"
            )
        try:
            p = _render(tok, messages[:i], tools, kw, add_generation_prompt=True)
            # the conversation ending at its last message is the full render (already checked to render
            # deterministically, or the capped path's own render)
            q = full if i == len(messages) - 1 else _render(tok, messages[: i + 1], tools, kw)
        except Exception as e:
            raise ChatTemplateError(
                f"template {info.name}: cannot render the conversation prefix up to assistant turn {i} "
                f"({type(e).__name__}: {e}); prefix-diff masking needs every prefix to render. Use one sample "
                "per assistant turn or a template with {% generation %} markers"
            ) from e
        if not full.startswith(p):
            raise _PromptNotPrefix(
                f"template {info.name}: the prompt rendered with add_generation_prompt=True is not a prefix of the "
                f"conversation at assistant turn {i} (the template rewrites earlier turns or its generation "
                "prompt differs from how it renders the turn in history, e.g. strips reasoning or moves the "
                "system prompt); use one sample per assistant turn (data.multi_turn: expand) or a template with "
                "{% generation %} markers"
            )
        if not q.startswith(p):
            raise ChatTemplateError(
                f"template {info.name}: the prompt rendered with add_generation_prompt=True is not a prefix of the "
                f"conversation ending at assistant turn {i}; use a template with {{% generation %}} markers"
            )
        if full.startswith(q):
            start, end, how = len(p), len(q), "prefix-diff"
            kind = "prefix-diff"
            diff = q[len(p):]
        else:
            # Prompt is stable but this turn renders differently when it is not the last one (Qwen3's
            # empty <think></think> on the last turn). Use the turn as rendered in the full conversation:
            # from the generation prompt to the end-of-turn marker after the content.
            start, how = len(p), "prefix-diff, turn rendered differently in history"
            kind = "history-rerender"
            pieces = _content_texts(messages[i])
            if not pieces:
                raise ChatTemplateError(
                    f"template {info.name}: the conversation up to assistant turn {i} is not a prefix of the full "
                    "conversation (the template renders the turn differently when it is not the last one) and the "
                    "turn has no text content to locate it; use one sample per assistant turn (data.multi_turn: expand)"
                )
            if cut is not None and start >= cut:
                _content_end(info, messages[i], full, start, len(full))  # past the tokenized prefix: not trained
                continue
            others = [t for j, m in enumerate(messages) if j != i for t in _content_texts(m)]
            end = _locate_turn_end(info, full, ids, offsets, start, pieces, others)
            if end is None and cut is not None:
                raise _NoCap
            if end is None:
                raise ChatTemplateError(
                    f"template {info.name}: the conversation up to assistant turn {i} is not a prefix of the full "
                    "conversation and the turn's content cannot be found right after its generation prompt (the "
                    "template rewrites it in history, e.g. strips reasoning); use one sample per assistant turn "
                    "(data.multi_turn: expand) or a template with {% generation %} markers"
                )
            diff = full[start:end]
        if cut is not None and start >= cut:
            _content_end(info, messages[i], full, start, end)  # past the tokenized prefix: not trained
            continue
        if cut is not None and end > cut and (span := _cut_turn(info, messages[i], full, ids, offsets, start, end)):
            spans.append(span)
            hows.append(kind)
            continue
        a, b = _tokens_overlapping(offsets, start, end)
        eot_expected = _span_has_special(info, ids, offsets, range(a, b), start, end) or _text_has_special(tok, info, diff)
        a, b, has_eot = _trim_to_eot(info, messages[i], full, ids, offsets, a, b)
        _verify(info, messages[i], i, full, offsets, a, b, eot_expected, has_eot, how, prompt_given=True)
        spans.append((a, b))
        hows.append(kind)
    return spans, hows


def _locate_turn_end(info, full, ids, offsets, start, pieces, others) -> int | None:
    """End char of the first special token after the turn's content, when the content follows `start`
    without any special token in between (so we cannot run into another turn)."""
    pos = start
    for piece in pieces:
        k = full.find(piece, pos)
        if k < 0:
            return None
        pos = k + len(piece)
    # Between the generation prompt and the content there may be the template's own in-turn markup
    # (Qwen3's <think></think>, GPT-OSS's <|channel|>final<|message|>), but never an end-of-turn token
    # or another message's text: that would mean we ran into a different turn.
    a, b = _tokens_overlapping(offsets, start, full.find(pieces[0], start))
    if any(ids[t] in info.eot_ids for t in range(a, b)):
        return None
    between = full[start:full.find(pieces[0], start)]
    if any(o and o in between for o in others):
        return None
    for t, (s, e) in enumerate(offsets):
        if s >= pos and ids[t] in info.special_ids:
            return e
    return None


def _span_has_special(info, ids, offsets, tokens: range, start: int, end: int) -> bool:
    """Whether one of `tokens` (those overlapping chars [start, end) of the tokenized text) is a special
    token lying wholly in [start, end). Then that text tokenized alone has it too (special tokens are
    matched in the raw text before any other splitting), so `_text_has_special` of a span of the full
    render needs no tokenization of its own when this says yes: every assistant turn of a template
    with end-of-turn markers."""
    return any(ids[t] in info.special_ids and start <= offsets[t][0] and offsets[t][1] <= end for t in tokens)


def _text_has_special(tok, info, text: str) -> bool:
    if not text:
        return False
    return any(t in info.special_ids for t in tok(text, add_special_tokens=False)["input_ids"])


def _generation_spans(tok, info, messages, train, full, ids, offsets, gen_mask) -> list[tuple[int, int]]:
    runs, t = [], 0
    while t < len(gen_mask):
        if gen_mask[t]:
            s = t
            while t < len(gen_mask) and gen_mask[t]:
                t += 1
            runs.append((s, t))
        else:
            t += 1
    assistants = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if len(runs) != len(assistants):
        raise ChatTemplateError(
            f"template {info.name}: the template's {{% generation %}} spans ({len(runs)}) do not match the "
            f"assistant turns ({len(assistants)}); the template marks more or less than one span per assistant "
            "turn (or an assistant turn renders empty). Fix the markers or remove them to use prefix-diff masking"
        )
    spans = []
    for (a, b), i in zip(runs, assistants):
        if i not in train:
            continue
        diff = full[offsets[a][0]:offsets[b - 1][1]]
        eot_expected = any(ids[x] in info.special_ids for x in range(a, b))
        a, b, has_eot = _trim_to_eot(info, messages[i], full, ids, offsets, a, b)
        _verify(info, messages[i], i, full, offsets, a, b, eot_expected, has_eot, "{% generation %} span")
        del diff
        spans.append((a, b))
    return spans
