"""Conformance of posttrain.data.chat over 68 real chat templates (../shared/chat_templates).

For every template a small byte-level BPE tokenizer is built with that template and its control
markers as special tokens (per SOURCES.md), saved, and loaded back with AutoTokenizer. A multi-turn
conversation (system + user + assistant + user + assistant) is rendered; `encode_messages` must then
either give apply_chat_template's ids with a mask that covers every assistant answer plus its
end-of-turn marker and nothing of the system/user turns (checked independently here, from the
rendered text's char offsets), or raise ChatTemplateError for the templates listed in
EXPECTED_REFUSALS (so pass -> refuse is a regression, and refuse -> pass must update the list).

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

from posttrain.data.chat import ChatTemplateError, _encode_messages_traced, encode_messages  # noqa: E402

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


def build_template_tokenizer(name: str, base: Path):
    from transformers import AutoTokenizer

    from posttrain.tiny import build_tokenizer

    src = _sources()[name]
    out = base / name
    if not (out / "tokenizer_config.json").is_file():
        build_tokenizer(
            out, chat_template=(TEMPLATES_DIR / f"{name}.jinja").read_text(), bos=src["bos"], eos=src["eos"],
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
    src = _sources()[name]
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


REASONING = "<think>\nI should recall it.\n</think>\n\n"


@pytest.mark.parametrize("name", _template_names())
def test_template_reasoning_never_wrong(name, template_tok_dir):
    """Assistant turns with inline <think> reasoning: templates that strip reasoning from history must
    be refused; when encoding succeeds, each full assistant content is inside the mask."""
    tok = build_template_tokenizer(name, template_tok_dir)
    variant, msgs, _ = render_conversation(tok)
    if variant is None:
        pytest.skip(f"{name} does not render the test conversation")
    msgs = [dict(m) for m in msgs]
    for m in msgs:
        if m["role"] == "assistant":
            if isinstance(m["content"], str):
                m["content"] = REASONING + m["content"]
            else:
                m["content"] = [{"type": "text", "text": REASONING + m["content"][0]["text"]}]
    try:
        enc = encode_messages(tok, msgs)
    except ChatTemplateError:
        return
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert enc.input_ids == list(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
    offs = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    masked = "".join(text[s:e] if v else "\x00" for (s, e), v in zip(offs, enc.loss_mask))
    for m in msgs:
        if m["role"] == "assistant":
            c = m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]
            assert c.strip() in masked, f"assistant content {c!r} not inside one masked span"
