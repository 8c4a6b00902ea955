"""Conformance of posttrain.data.chat over 68 real chat templates (../shared/chat_templates).

For every template a small byte-level BPE tokenizer is built with that template and its control
markers as special tokens (per SOURCES.md), saved, and loaded back with AutoTokenizer. A multi-turn
conversation (system + user + assistant + user + assistant) is rendered; `encode_messages` must then
either give apply_chat_template's ids with a mask that covers every assistant answer plus its
end-of-turn marker and nothing of the system/user turns (checked independently here, from the
rendered text's char offsets), or raise ChatTemplateError for the templates listed in
EXPECTED_REFUSALS (so pass -> refuse is a regression, and refuse -> pass must update the list).

The same conversation is also encoded with one sample per assistant turn (`encode_turns`, i.e.
`data.multi_turn: expand`): each sample's ids must be the template's render of the conversation up
to that turn (or, "inference-render", the generation prompt's own ids followed by the turn), and
its mask exactly that turn's answer and end-of-turn marker after the generation prompt; templates
refused in that mode are in EXPECTED_EXPAND_REFUSALS. A conversation with inline `<think>`
reasoning goes through both modes too; expected refusals of the per-turn mode are in
EXPECTED_REASONING_EXPAND_REFUSALS.

`scripts/chat_template_report.py` prints the status table of docs/chat_templates.md from the same
harness.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import pytest

TEMPLATES_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "chat_templates"

if not (TEMPLATES_DIR / "SOURCES.md").is_file():
    pytest.skip(f"real chat templates not found at {TEMPLATES_DIR} (shared/chat_templates is absent)",
                allow_module_level=True)

from posttrain.data.chat import (  # noqa: E402
    ChatTemplateError,
    EmptyMaskError,
    _encode_messages_traced,
    _encode_turns_traced,
    encode_messages,
)

SYSTEM = "Answer tersely please."
USER1 = "Name the capital of France?"
ANSWER1 = "The capital is Paris."
USER2 = "And what is six times seven?"
ANSWER2 = "Forty two, of course."

# template -> why prefix-diff masking genuinely cannot work (refusal is the correct answer).
EXPECTED_REFUSALS: dict[str, str] = {}  # filled below, after the harness

_CORPUS = [
    SYSTEM, USER1, ANSWER1, USER2, ANSWER2,
    "system user assistant tool think reasoning You are a helpful assistant. Today Date: Cutting Knowledge",
]


def _template_names() -> list[str]:
    manifest = json.loads((TEMPLATES_DIR / "manifest.json").read_text())
    return [t["name"] for t in manifest["templates"]]


@lru_cache(maxsize=None)
def _sources() -> dict[str, dict]:
    """name -> {markers, bos, eos, pad, unk, other} parsed from SOURCES.md."""
    text = (TEMPLATES_DIR / "SOURCES.md").read_text()
    parts = re.split(r"^### `([^`]+)\.jinja`\s*$", text, flags=re.M)
    out = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        def ticks(label):
            m = re.search(r"\*\*" + re.escape(label) + r"\*\*: (.*)", body)
            return re.findall(r"`([^`]+)`", m.group(1)) if m else []

        m = re.search(r"\*\*bos / eos / pad\*\*[^:]*: `([^`]*)` / `([^`]*)` / `([^`]*)`(.*)", body)
        assert m, f"SOURCES.md: no bos/eos/pad line for {name}"
        none = lambda v: None if v == "None" else v  # noqa: E731
        unk = re.search(r"unk `([^`]+)`", m.group(4))
        out[name] = dict(
            markers=ticks("Markers (literal)"),
            other=ticks("Other real-model tokens added by the profile"),
            bos=none(m.group(1)), eos=none(m.group(2)), pad=none(m.group(3)), unk=unk.group(1) if unk else None,
        )
    return out


# "<template>+<kwarg>=<value>": the template rendered with that template kwarg set, as
# data.chat_template_kwargs passes it (a `set` in front of the template, which these templates honour)
KWARG_VARIANTS = {
    f"{n}+enable_thinking=false": (n, "{%- set enable_thinking = false %}")
    for n in ("trl_nemotron_3_nano", "trl_nemotron_3_super", "trl_nemotron_3_ultra")
}


def build_template_tokenizer(name: str, base: Path):
    from transformers import AutoTokenizer

    from posttrain.tiny import build_tokenizer

    file, prefix = KWARG_VARIANTS.get(name, (name, ""))
    src = _sources()[file]
    out = base / name
    if not (out / "tokenizer_config.json").is_file():
        build_tokenizer(
            out, chat_template=prefix + (TEMPLATES_DIR / f"{file}.jinja").read_text(), bos=src["bos"], eos=src["eos"],
            pad=src["pad"], unk=src["unk"], special_tokens=src["markers"] + src["other"], corpus=_CORPUS,
            vocab_size=320,
        )
    return AutoTokenizer.from_pretrained(out)


def conversations():
    """Variants tried in order: with system, without system, then list-of-parts content."""
    sys_msg = [{"role": "system", "content": SYSTEM}]
    turns = [("user", USER1), ("assistant", ANSWER1), ("user", USER2), ("assistant", ANSWER2)]
    plain = [{"role": r, "content": c} for r, c in turns]
    parts = [{"role": r, "content": [{"type": "text", "text": c}]} for r, c in turns]
    sys_parts = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}]
    return [("plain", sys_msg + plain), ("no system", plain), ("parts", sys_parts + parts), ("parts, no system", parts)]


def render_conversation(tok):
    """(variant, messages, text) of the first conversation the template renders with both answers in it,
    or (None, None, reason)."""
    reasons = []
    for variant, msgs in conversations():
        try:
            text = tok.apply_chat_template(msgs, tokenize=False)
        except Exception as e:  # noqa: BLE001 - templates raise anything
            reasons.append(f"{variant}: {type(e).__name__}: {str(e)[:80]}")
            continue
        if ANSWER1 in text and ANSWER2 in text and USER1 in text and USER2 in text:
            return variant, msgs, text
        reasons.append(f"{variant}: renders without the answers")
    return None, None, "; ".join(reasons)


def check_mask(tok, msgs, ids, mask, text, markers: set[str]) -> None:
    """Independent check from char offsets: every answer token and the first control marker after each
    answer are masked; the token after that marker is not; nothing of system/user text is masked;
    every masked token lies between a user turn's end and an answer's end-of-turn marker."""
    assert ids == list(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert list(enc["input_ids"]) == ids
    offs = [tuple(o) for o in enc["offset_mapping"]]

    def toks(start, end):
        return [t for t, (s, e) in enumerate(offs) if s < end and e > start and e > s]

    allowed = set()
    cursor = 0
    for user, answer in ((USER1, ANSWER1), (USER2, ANSWER2)):
        u = text.index(user, cursor)
        a = text.index(answer, u + len(user))
        a_end = a + len(answer)
        ans_toks = toks(a, a_end)
        assert ans_toks and all(mask[t] for t in ans_toks), f"answer {answer!r} not fully masked"
        eot = next((t for t in range(ans_toks[-1] + 1, len(ids))
                    if tok.convert_ids_to_tokens(ids[t]) in markers), None)
        assert eot is not None, f"no control marker after {answer!r}"
        assert mask[eot] == 1, f"end-of-turn marker {tok.convert_ids_to_tokens(ids[eot])!r} after {answer!r} not masked"
        if eot + 1 < len(ids):
            assert mask[eot + 1] == 0, f"token after the end-of-turn marker ({tok.decode([ids[eot + 1]])!r}) is masked"
        first_after_user = max(toks(u, u + len(user))) + 1
        allowed.update(range(first_after_user, eot + 1))
        cursor = a_end
    for m in msgs:
        if m["role"] in ("system", "user"):
            c = m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]
            for hit in re.finditer(re.escape(c), text):
                bad = [t for t in toks(hit.start(), hit.end()) if mask[t]]
                assert not bad, f"{m['role']} text {c!r} is masked"
    stray = [t for t, v in enumerate(mask) if v and t not in allowed]
    assert not stray, f"masked tokens outside assistant turns: {tok.decode([ids[t] for t in stray])!r}"
    for t, v in enumerate(mask):  # nothing between a user turn and its answer except the assistant's own output
        if v and t in allowed:
            s, e = offs[t]
            assert USER1 not in text[s:e] and USER2 not in text[s:e]


def check_header_is_prompt(tok, msgs, mask, text) -> None:
    """Policy for templates without {% generation %}: what add_generation_prompt=True renders (the
    assistant header) is prompt, so no masked token of an assistant turn starts before it ends."""
    offs = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        p = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        assert text.startswith(p)
        u = msgs[i - 1]["content"]
        u = u if isinstance(u, str) else u[0]["text"]
        u_end = text.rindex(u, 0, len(p)) + len(u)  # end of the user turn just before
        header = [t for t, (s, e) in enumerate(offs) if s >= u_end and e <= len(p) and e > s]
        assert not any(mask[t] for t in header), f"assistant header before turn {i} is masked: {text[u_end:len(p)]!r}"


def classify(name: str, base: Path) -> tuple[str, str]:
    """(status, detail) with status in pass / handled / refused / does-not-render; raises AssertionError
    when a mask is wrong."""
    tok = build_template_tokenizer(name, base)
    variant, msgs, text = render_conversation(tok)
    if variant is None:
        return "does-not-render", text
    src = _sources()[KWARG_VARIANTS.get(name, (name,))[0]]
    markers = set(src["markers"]) | {t for t in (src["eos"], src["bos"]) if t} | set(src["other"])
    try:
        enc, paths = _encode_messages_traced(tok, msgs)
    except ChatTemplateError as e:
        return "refused", f"{variant}: {e}"
    check_mask(tok, msgs, enc.input_ids, enc.loss_mask, text, markers)
    if "generation" not in paths:
        check_header_is_prompt(tok, msgs, enc.loss_mask, text)
    note = f"{variant}; {'/'.join(sorted(set(paths)))}"
    return ("handled" if "history-rerender" in paths else "pass"), note


def check_turn_sample(tok, msgs, k: int, ids, mask, answer: str, markers: set[str]) -> str:
    """Independent check of the sample of assistant turn k (one sample per turn). Its ids are either the
    render of msgs[:k+1] (which must start with the generation prompt p of msgs[:k]) or p's own ids
    followed by more tokens. Every masked token lies after p; the masked tokens are one run that covers
    the answer's last occurrence and ends at the first control marker after it. Returns the masked text."""
    p = tok.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True)
    q_ids = list(tok.apply_chat_template(msgs[:k + 1], tokenize=True, return_dict=True)["input_ids"])
    gen = "{% generation %}" in re.sub(r"\{%-?\s*generation\s*-?%\}", "{% generation %}", tok.chat_template)
    if gen:  # the template's spans are authoritative, also where its turns do not continue its generation prompt
        assert ids == q_ids, "sample of a {% generation %} template is not the render up to the turn"
    if ids == q_ids:
        text = tok.apply_chat_template(msgs[:k + 1], tokenize=False)
        assert gen or text.startswith(p), "sample is the render up to the turn, but the generation prompt is not its prefix"
        offs = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        prompt_toks = {t for t, (s, e) in enumerate(offs) if e <= len(p)}
    else:
        p_ids = list(tok.apply_chat_template(msgs[:k], tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"])
        assert ids[:len(p_ids)] == p_ids, "sample is neither the render up to the turn nor the served prompt + turn"
        text = p + tok.decode(ids[len(p_ids):])
        assert list(tok(text, add_special_tokens=False)["input_ids"]) == ids
        offs = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        prompt_toks = set(range(len(p_ids)))
    on = [t for t, v in enumerate(mask) if v]
    assert on and on == list(range(on[0], on[-1] + 1)), "the mask is not one contiguous run"
    if gen:  # the template's spans win (some hold the assistant header): nothing before the previous message's end
        prev = msgs[k - 1]["content"]
        prev = (prev if isinstance(prev, str) else prev[0]["text"]).strip()
        prev_end = text.rindex(prev, 0, len(p)) + len(prev)
        assert all(offs[t][0] >= prev_end for t in on), "a token before the end of the previous message is masked"
    else:
        assert not any(mask[t] for t in prompt_toks), "a token of the generation prompt is masked"
        assert on[0] == min(set(range(len(ids))) - prompt_toks), "the mask does not start right after the generation prompt"
    a = text.rindex(answer)
    ans = [t for t, (s, e) in enumerate(offs) if s < a + len(answer) and e > a and e > s]
    assert all(mask[t] for t in ans), f"answer {answer!r} not fully masked"
    eot = next((t for t in range(ans[-1] + 1, len(ids)) if tok.convert_ids_to_tokens(ids[t]) in markers), None)
    assert eot is not None and on[-1] == eot, f"the mask does not end at the end-of-turn marker after {answer!r}"
    return "".join(text[s:e] for (s, e), v in zip(offs, mask) if v)


def classify_expand(name: str, base: Path, msgs=None, answers=(ANSWER1, ANSWER2), must_train: str = "") -> tuple[str, str]:
    """(status, detail) of one sample per assistant turn: pass / refused; AssertionError when a mask is wrong
    (or when `must_train`, e.g. the reasoning, is not in every sample's masked text)."""
    tok = build_template_tokenizer(name, base)
    if msgs is None:
        variant, msgs, _ = render_conversation(tok)
        if variant is None:
            return "does-not-render", ""
    src = _sources()[KWARG_VARIANTS.get(name, (name,))[0]]
    markers = set(src["markers"]) | {t for t in (src["eos"], src["bos"]) if t} | set(src["other"])
    try:
        encs, paths = _encode_turns_traced(tok, msgs)
    except ChatTemplateError as e:
        return "refused", str(e)
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    assert len(encs) == len(turns)
    for enc, k, answer in zip(encs, turns, answers):
        masked = check_turn_sample(tok, msgs, k, enc.input_ids, enc.loss_mask, answer, markers)
        assert must_train in masked, f"{must_train!r} is not trained in the sample of turn {k}: {masked!r}"
    return "pass", "/".join(sorted(set(paths)))


_THINK_PROMPT = "the generation prompt forces an opening <think> that history turns do not have"
EXPECTED_REFUSALS.update({
    "qwen3_5_think": _THINK_PROMPT + " (Qwen3.5 thinking)",
    "qwq_32b": _THINK_PROMPT + " (QwQ)",
    "trl_qwen3_6": _THINK_PROMPT + " (Qwen3.6)",
    "trl_qwen3_5_nothink": "the generation prompt adds an empty <think>\n\n</think> that history turns do not have",
    "deepseek_r1_distill": _THINK_PROMPT + "; reasoning is stripped from every assistant turn",
    "deepseek_v3": _THINK_PROMPT + "; reasoning is stripped from every assistant turn",
    "trl_nemotron_3_nano": "generation prompt opens <think> but history turns render <think></think>",
    "trl_nemotron_3_super": "generation prompt opens <think> but history turns render <think></think>",
    "trl_nemotron_3_ultra": "generation prompt opens <think> but history turns render <think></think>",
    "mistral_v3_large_2407": "the system prompt moves into the last user turn, so earlier prompts are not prefixes",
    "mistral_nemo_instruct_2407": "the system prompt moves into the last user turn, so earlier prompts are not prefixes",
    "mistral_common_v3_spm": "the system prompt moves into the last user turn, so earlier prompts are not prefixes",
    "trl_glm4moe": "no end-of-turn token after assistant turns (the next header ends a turn); would never learn to stop",
})


_FORCED = "but the generation prompt forces an opening <think>: no render is what is served"
EXPECTED_EXPAND_REFUSALS: dict[str, str] = {
    "qwq_32b": "answers without reasoning render with no <think>, " + _FORCED,
    "deepseek_r1_distill": "answers render with no <think> (reasoning is stripped from every turn), " + _FORCED,
    "deepseek_v3": "answers render with no <think> (reasoning is stripped from every turn), " + _FORCED,
    **{n: "answers without reasoning render as <think></think>, " + _FORCED + "; with enable_thinking=false both match"
       for n in ("trl_nemotron_3_nano", "trl_nemotron_3_super", "trl_nemotron_3_ultra")},
    "trl_glm4moe": "no end-of-turn token after assistant turns; would never learn to stop",
}


@pytest.fixture(scope="session")
def template_tok_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("chat_templates")


@pytest.mark.parametrize("name", _template_names())
def test_template_conformance(name, template_tok_dir):
    status, detail = classify(name, template_tok_dir)
    if status == "does-not-render":
        pytest.skip(f"{name} does not render the test conversation: {detail}")
    if name in EXPECTED_REFUSALS:
        assert status == "refused", (
            f"{name} is expected to be refused ({EXPECTED_REFUSALS[name]}) but is {status} ({detail}); "
            "if the mask is now correct, update EXPECTED_REFUSALS and docs/chat_templates.md"
        )
    else:
        assert status in ("pass", "handled"), f"{name} regressed to {status}: {detail}"


@pytest.mark.parametrize("name", list(KWARG_VARIANTS))
def test_template_kwarg_variants(name, template_tok_dir):
    """Nemotron-3 with enable_thinking=false (data.chat_template_kwargs): its generation prompt then
    matches how it renders answers without reasoning, so both modes train the plain conversation."""
    assert classify(name, template_tok_dir)[0] == "pass"
    assert classify_expand(name, template_tok_dir)[0] == "pass"


@pytest.mark.parametrize("name", _template_names())
def test_template_conformance_per_turn(name, template_tok_dir):
    """One sample per assistant turn (data.multi_turn: expand) on the same conversation."""
    status, detail = classify_expand(name, template_tok_dir)
    if status == "does-not-render":
        pytest.skip(f"{name} does not render the test conversation")
    if name in EXPECTED_EXPAND_REFUSALS:
        assert status == "refused", f"{name} is expected to be refused per turn ({EXPECTED_EXPAND_REFUSALS[name]}) but passes"
    else:
        assert status == "pass", f"{name} is refused per turn: {detail}"


REASONING = "<think>\nI should recall it.\n</think>\n\n"
# templates that cannot train the reasoning conversation even with one sample per turn
EXPECTED_REASONING_EXPAND_REFUSALS: dict[str, str] = {
    "deepseek_r1_distill": "strips reasoning from every assistant turn, the last one included",
    "deepseek_v3": "strips reasoning from every assistant turn, the last one included",
    "trl_deepseekv3_training": "strips reasoning from every assistant turn, the last one included",
    "trl_qwen3_5_nothink": "its generation prompt forces an empty think block; turns with reasoning never follow it",
    "trl_glm4moe": "no end-of-turn token after assistant turns; would never learn to stop",
}


def reasoning_conversation(tok):
    variant, msgs, _ = render_conversation(tok)
    if variant is None:
        return None
    msgs = [dict(m) for m in msgs]
    for m in msgs:
        if m["role"] == "assistant":
            if isinstance(m["content"], str):
                m["content"] = REASONING + m["content"]
            else:
                m["content"] = [{"type": "text", "text": REASONING + m["content"][0]["text"]}]
    return msgs


def classify_reasoning(name: str, base: Path) -> str:
    """Status (pass / refused / does-not-render) of the reasoning conversation as one sample. When
    encoding succeeds, each assistant content is trained, except for its first characters when the
    generation prompt forces them (an opening <think>: given at inference), or both its reasoning and
    its answer are trained (the template re-renders the think block); AssertionError otherwise."""
    tok = build_template_tokenizer(name, base)
    msgs = reasoning_conversation(tok)
    if msgs is None:
        return "does-not-render"
    try:
        enc = encode_messages(tok, msgs)
    except ChatTemplateError:
        return "refused"
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert enc.input_ids == list(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
    offs = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    masked = "".join(text[s:e] if v else "\x00" for (s, e), v in zip(offs, enc.loss_mask))
    cursor = 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        c = (m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]).strip()
        if c in text[cursor:]:
            p = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
            a = text.index(c, cursor)
            toks = [t for t, (s, e) in enumerate(offs) if s < a + len(c) and e > a and e > s and e > len(p)]
            assert all(enc.loss_mask[t] for t in toks), f"assistant content {c!r} is not trained"
            cursor = a + len(c)
        else:
            for part in ("I should recall it.", ANSWER1 if "capital" in c else ANSWER2):
                assert part in masked[cursor:], f"{part!r} of {c!r} is not trained"
                cursor = masked.index(part, cursor) + len(part)
    return "pass"


@pytest.mark.parametrize("name", _template_names())
def test_template_reasoning_never_wrong(name, template_tok_dir):
    """Assistant turns with inline <think> reasoning as one sample: templates that strip reasoning from
    history must be refused; when encoding succeeds, the mask is checked (classify_reasoning)."""
    if classify_reasoning(name, template_tok_dir) == "does-not-render":
        pytest.skip(f"{name} does not render the test conversation")


@pytest.mark.parametrize("name", _template_names())
def test_template_reasoning_per_turn(name, template_tok_dir):
    """The reasoning conversation with one sample per turn: every sample trains its turn's reasoning and
    answer, unless the template is listed in EXPECTED_REASONING_EXPAND_REFUSALS."""
    tok = build_template_tokenizer(name, template_tok_dir)
    msgs = reasoning_conversation(tok)
    if msgs is None:
        pytest.skip(f"{name} does not render the test conversation")
    status, detail = classify_expand(name, template_tok_dir, msgs, must_train="I should recall it.")
    if name in EXPECTED_REASONING_EXPAND_REFUSALS:
        assert status == "refused", f"{name} is expected to be refused ({EXPECTED_REASONING_EXPAND_REFUSALS[name]})"
    else:
        assert status == "pass", f"{name} is refused per turn on the reasoning conversation: {detail}"


LONG = " ".join(["the answer is 42, café 東京 (a+b) don't"] * 60)


@pytest.mark.parametrize("name", _template_names())
def test_template_capped_tokenization_keeps_the_full_render_tokens(name, template_tok_dir):
    """encode_messages(max_tokens=n) tokenizes only a prefix of a long render: its first n ids and mask
    equal those of the whole render, and it refuses exactly when the whole render is refused."""
    tok = build_template_tokenizer(name, template_tok_dir)
    variant, msgs, _ = render_conversation(tok)
    if variant is None:
        pytest.skip(f"{name} does not render the test conversation")
    for where in (2, 3, 4):  # a long first answer, second question, second answer
        long_msgs = [dict(m) for m in msgs]
        i = [j for j, m in enumerate(long_msgs) if m["role"] != "system"][where - 1]
        c = long_msgs[i]["content"]
        long_msgs[i]["content"] = c + " " + LONG if isinstance(c, str) else [{"type": "text", "text": c[0]["text"] + " " + LONG}]
        try:
            full = encode_messages(tok, long_msgs)
        except ChatTemplateError:
            with pytest.raises(ChatTemplateError):
                encode_messages(tok, long_msgs, max_tokens=24)
            continue
        for n in (24, 60, 150):
            try:
                capped = encode_messages(tok, long_msgs, max_tokens=n)
            except EmptyMaskError:
                assert not any(full.loss_mask[1:n]), (where, n)
                continue
            assert capped.input_ids[:n] == full.input_ids[:n], (where, n)
            assert capped.loss_mask[:n] == full.loss_mask[:n], (where, n)
