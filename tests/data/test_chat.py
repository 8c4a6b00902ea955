"""posttrain.data.chat: chat tokenization + assistant-only loss mask, on tokenizers built by
posttrain.tiny and loaded back through AutoTokenizer.from_pretrained (the real loading path)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from posttrain.data import chat
from posttrain.data.chat import (
    ChatTemplateError,
    EmptyMaskError,
    Encoded,
    _encode_messages_traced,
    encode_messages,
    encode_prompt_completion,
    encode_text,
    encode_turns,
)
from posttrain.tiny import (
    CHATML_GENERATION_TEMPLATE,
    CHATML_SPECIALS,
    CHATML_TEMPLATE,
    LLAMA3_GENERATION_TEMPLATE,
    LLAMA3_SPECIALS,
    LLAMA3_TEMPLATE,
    build_tokenizer,
)

SYSTEM, U1, A1, U2, A2 = (
    "You are a helpful assistant.", "What is the capital of France?", "The capital of France is Paris.",
    "Add 12 and 30.", "42",
)
CONV = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": U1},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": U2},
    {"role": "assistant", "content": A2},
]

FAMILIES = {
    "chatml": (CHATML_TEMPLATE, CHATML_SPECIALS, False, "<|im_end|>"),
    "chatml_gen": (CHATML_GENERATION_TEMPLATE, CHATML_SPECIALS, False, "<|im_end|>"),
    "llama3": (LLAMA3_TEMPLATE, LLAMA3_SPECIALS, True, "<|eot_id|>"),
    "llama3_gen": (LLAMA3_GENERATION_TEMPLATE, LLAMA3_SPECIALS, True, "<|eot_id|>"),
}


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("chat_toks")


def _load(tok_dir, name, template, specials=CHATML_SPECIALS, add_bos=False):
    out = tok_dir / name
    if not out.exists():
        build_tokenizer(out, chat_template=template, bos=specials["bos"], eos=specials["eos"], pad=specials["pad"],
                        special_tokens=specials["extra"], add_bos_token=add_bos)
    return AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="session", params=list(FAMILIES))
def family(request, tok_dir):
    template, specials, add_bos, eot = FAMILIES[request.param]
    return request.param, _load(tok_dir, request.param, template, specials, add_bos), eot


@pytest.fixture(scope="session")
def chatml(tok_dir):
    return _load(tok_dir, "chatml", CHATML_TEMPLATE)


def _expected_mask(tok, messages, eot: str) -> list[int]:
    """Independent expectation: tokens overlapping each assistant answer in the rendered text, plus the
    end-of-turn token right after it; nothing else."""
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    eot_id = tok.convert_tokens_to_ids(eot)
    mask = [0] * len(ids)
    cursor = 0
    for m in messages:
        if m["role"] != "assistant":
            cursor = text.index(m["content"], cursor) + len(m["content"])
            continue
        a = text.index(m["content"], cursor)
        b = a + len(m["content"])
        toks = [t for t, (s, e) in enumerate(offs) if s < b and e > a]
        for t in toks:
            mask[t] = 1
        assert ids[toks[-1] + 1] == eot_id
        mask[toks[-1] + 1] = 1
        cursor = b
    return mask


def _show(tok, enc: Encoded) -> str:
    return "".join(f"[{tok.decode([i])}]" if m else tok.decode([i]) for i, m in zip(enc.input_ids, enc.loss_mask))


def test_ids_equal_apply_chat_template(family):
    _, tok, _ = family
    enc = encode_messages(tok, CONV)
    assert isinstance(enc, Encoded)
    assert enc.input_ids == list(tok.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"])
    assert len(enc.loss_mask) == len(enc.input_ids)


def test_mask_token_by_token(family):
    name, tok, eot = family
    enc, paths = _encode_messages_traced(tok, CONV)
    assert paths == (["generation"] * 2 if name.endswith("_gen") else ["prefix-diff"] * 2)
    assert enc.loss_mask == _expected_mask(tok, CONV, eot), _show(tok, enc)
    # explicit: the trained text is exactly the answers + end-of-turn markers
    trained = [tok.decode([i]) for i, m in zip(enc.input_ids, enc.loss_mask) if m]
    assert "".join(trained) == A1 + eot + A2 + eot
    eot_id = tok.convert_tokens_to_ids(eot)
    positions = [t for t, i in enumerate(enc.input_ids) if i == eot_id and enc.loss_mask[t]]
    assert len(positions) == 2
    if name.startswith("chatml"):  # the "\n" after <|im_end|> is never trained
        for t in positions:
            assert tok.decode([enc.input_ids[t + 1]]) == "\n" and enc.loss_mask[t + 1] == 0
        # header <|im_start|>assistant\n is prompt
        start_id = tok.convert_tokens_to_ids("<|im_start|>")
        assert all(enc.loss_mask[t] == 0 for t, i in enumerate(enc.input_ids) if i == start_id)


@pytest.mark.parametrize("plain,gen", [("chatml", "chatml_gen"), ("llama3", "llama3_gen")])
def test_generation_and_prefix_diff_agree(tok_dir, plain, gen):
    toks = {n: _load(tok_dir, n, FAMILIES[n][0], FAMILIES[n][1], FAMILIES[n][2]) for n in (plain, gen)}
    a, b = (encode_messages(toks[n], CONV) for n in (plain, gen))
    assert a.input_ids == b.input_ids and a.loss_mask == b.loss_mask


def test_tool_turns_not_trained(chatml):
    msgs = [{"role": "user", "content": U1}, {"role": "assistant", "content": "call weather"},
            {"role": "tool", "content": "sunny 21C"}, {"role": "assistant", "content": A1}]
    enc = encode_messages(chatml, msgs)
    trained = "".join(chatml.decode([i]) for i, m in zip(enc.input_ids, enc.loss_mask) if m)
    assert trained == "call weather<|im_end|>" + A1 + "<|im_end|>"


def test_template_kwargs_and_list_content(tok_dir):
    tpl = (
        "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endif %}"
        "{%- if greet is defined and m.role == 'user' %} {{ greet }}{% endif %}<|im_end|>\n{% endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = _load(tok_dir, "parts", tpl)
    msgs = [{"role": "user", "content": [{"type": "text", "text": U1}]},
            {"role": "assistant", "content": [{"type": "text", "text": A1}]}]
    enc = encode_messages(tok, msgs, greet="hello")
    assert enc.input_ids == list(tok.apply_chat_template(msgs, greet="hello", return_dict=True)["input_ids"])
    assert "hello" in tok.decode(enc.input_ids)
    assert "".join(tok.decode([i]) for i, m in zip(enc.input_ids, enc.loss_mask) if m) == A1 + "<|im_end|>"
    with pytest.raises(ValueError, match="add_generation_prompt"):
        encode_messages(tok, msgs, add_generation_prompt=True)


# ---------------------------------------------------------------------------------- prompt/completion, text


def test_prompt_completion_strings(family):
    _, tok, _ = family
    enc = encode_prompt_completion(tok, "Add 12 and 30:", " 42")
    p = tok("Add 12 and 30:", add_special_tokens=True)["input_ids"]
    c = tok(" 42", add_special_tokens=False)["input_ids"]
    assert enc.input_ids == p + c + [tok.eos_token_id]
    assert enc.loss_mask == [0] * len(p) + [1] * (len(c) + 1)
    # completion already ending with eos: not doubled
    enc2 = encode_prompt_completion(tok, "Add 12 and 30:", " 42" + tok.eos_token)
    assert enc2.input_ids == p + c + [tok.eos_token_id]


def test_prompt_completion_conversational(family):
    _, tok, eot = family
    prompt, completion = CONV[:4], CONV[4:]
    enc = encode_prompt_completion(tok, prompt, completion)
    assert enc.input_ids == encode_messages(tok, CONV).input_ids
    trained = "".join(tok.decode([i]) for i, m in zip(enc.input_ids, enc.loss_mask) if m)
    assert trained == A2 + eot  # the assistant turn inside the prompt is context only


def test_encode_text(family):
    _, tok, _ = family
    enc = encode_text(tok, "hello world")
    expected = tok("hello world", add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    assert enc.input_ids == expected and enc.loss_mask == [1] * len(expected)
    if tok.bos_token == "<|begin_of_text|>":
        assert enc.input_ids[0] == tok.bos_token_id


def test_empty_mask_errors(chatml):
    with pytest.raises(EmptyMaskError, match="no assistant tokens"):
        encode_messages(chatml, CONV[:2])
    with pytest.raises(EmptyMaskError):
        encode_prompt_completion(chatml, "question", "")
    with pytest.raises(EmptyMaskError):
        encode_prompt_completion(chatml, CONV[:2], [{"role": "user", "content": "more"}])
    with pytest.raises(EmptyMaskError):
        encode_text(chatml, "")
    with pytest.raises(TypeError):
        encode_prompt_completion(chatml, "question", [{"role": "assistant", "content": "x"}])


# ---------------------------------------------------------------------------------- refusals

# Strips <think>...</think> from every assistant turn (DeepSeek-R1 style).
STRIP_ALL = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{{ m.content.split('</think>')[-1] | trim }}{% else %}{{ m.content }}{% endif %}"
    "<|im_end|>\n{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Strips reasoning only from turns that are not the last one (Qwen3 style).
STRIP_HISTORY = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] | trim }}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Moves the system prompt into the last user turn (Mistral v3 style): not prefix-stable.
SYSTEM_LAST = (
    "{%- set sys = messages[0].content if messages[0].role == 'system' else '' %}"
    "{%- set msgs = messages[1:] if sys else messages %}"
    "{%- set ns = namespace(last=-1) %}{%- for m in msgs %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
    "{%- for m in msgs %}<|im_start|>{{ m.role }}\n{% if loop.index0 == ns.last and sys %}{{ sys }}\n\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Renders reasoning_content only for the last assistant turn.
REASONING_LAST = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and loop.last and m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# No end-of-turn marker after the assistant (GLM-4 style).
NO_EOT = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{% if m.role != 'assistant' %}<|im_end|>{% endif %}"
    "{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# {% generation %} around the last assistant turn only.
GEN_LAST_ONLY = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and loop.last %}"
    "{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}{% else %}{{ m.content }}<|im_end|>{% endif %}\n"
    "{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

THINK = [
    {"role": "user", "content": U1},
    {"role": "assistant", "content": "<think>recall it</think>" + A1},
    {"role": "user", "content": U2},
    {"role": "assistant", "content": "<think>add</think>" + A2},
]


@pytest.mark.parametrize("name,template,messages,match", [
    ("strip_all", STRIP_ALL, THINK, r"content of assistant turn 1 does not appear in its masked span"),
    ("strip_history", STRIP_HISTORY, THINK, r"turn 1 is not a prefix of the full conversation .*cannot be found"),
    ("system_last", SYSTEM_LAST, CONV, r"add_generation_prompt=True is not a prefix of the conversation at assistant turn 2"),
    ("reasoning_last", REASONING_LAST,
     [CONV[1], dict(CONV[2], reasoning_content="because"), CONV[3], dict(CONV[4], reasoning_content="sum")],
     r"reasoning of assistant turn 1 is dropped"),
    ("no_eot", NO_EOT, CONV, r"not closed by any special token"),
    ("gen_last_only", GEN_LAST_ONLY, CONV, r"generation %\} spans \(1\) do not match the assistant turns \(2\)"),
    # a render that changes between calls (the clock's microseconds; two renders are >10 us apart)
    ("clock", "{{ strftime_now('%f') }}" + CHATML_TEMPLATE, CONV, r"the render is not deterministic"),
])
def test_template_errors(tok_dir, name, template, messages, match):
    tok = _load(tok_dir, name, template)
    with pytest.raises(ChatTemplateError, match=match) as ei:
        encode_messages(tok, messages)
    assert f"template {name}" in str(ei.value)


def test_strip_history_single_turn_ok(tok_dir):
    """The same template is fine when the reasoning turn is the last one (one sample per turn)."""
    tok = _load(tok_dir, "strip_history", STRIP_HISTORY)
    enc = encode_messages(tok, THINK[:2])
    trained = "".join(tok.decode([i]) for i, m in zip(enc.input_ids, enc.loss_mask) if m)
    assert trained == THINK[1]["content"] + "<|im_end|>"


def test_history_rerender_handled(tok_dir):
    """Qwen3-style: the last assistant turn gets an empty think block, earlier ones do not. Each turn
    is trained as rendered in the full conversation."""
    tpl = (
        "{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
        "{{ m.content }}<|im_end|>\n{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = _load(tok_dir, "qwen3ish", tpl)
    enc, paths = _encode_messages_traced(tok, CONV)
    assert paths == ["history-rerender", "prefix-diff"]
    trained = "".join(tok.decode([i]) for i, m in zip(enc.input_ids, enc.loss_mask) if m)
    assert trained == A1 + "<|im_end|>" + "<think>\n\n</think>\n\n" + A2 + "<|im_end|>"


def test_render_error_is_template_error(tok_dir):
    tok = _load(tok_dir, "no_system", "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + CHATML_TEMPLATE)
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        encode_messages(tok, CONV)


def test_per_tokenizer_cache(chatml):
    assert chat._tok_info(chatml) is chat._tok_info(chatml)
    assert chatml.convert_tokens_to_ids("<|im_end|>") in chat._tok_info(chatml).special_ids


# ---------------------------------------------------------------------------------- one sample per turn

# QwQ style: history turns lose everything up to </think>, the last keeps its content, and the
# generation prompt forces an opening <think>.
FORCED_THINK = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1].lstrip('\\n') }}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
# Mistral v3 / Nemo style: the system prompt goes into the user turn only when it is the last message,
# so it is in the served prompt but in no render of a conversation that ends with an answer.
SYSTEM_IF_LAST = (
    "{%- set sys = messages[0].content if messages[0].role == 'system' else '' %}"
    "{%- set msgs = messages[1:] if sys else messages %}"
    "{%- for m in msgs %}<|im_start|>{{ m.role }}\n{% if loop.last and sys and m.role == 'user' %}{{ sys }}\n\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The generation prompt forces text (a response prefix) that the answer starts with.
FORCED_PREFIX = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\nAnswer:{% endif %}"
)
R1, R2 = "<think>\nrecall it\n</think>\n\n", "<think>\nadd them\n</think>\n\n"
THINK_NL = [
    {"role": "user", "content": U1},
    {"role": "assistant", "content": R1 + A1},
    {"role": "user", "content": U2},
    {"role": "assistant", "content": R2 + A2},
]


def _trained(tok, enc: Encoded) -> str:
    return "".join(tok.decode([i]) for i, m in zip(enc.input_ids, enc.loss_mask) if m)


def test_forced_think_prompt_is_given_not_trained(tok_dir):
    """The generation prompt ends with <think>\\n and the answer starts with it: that text is prompt (given
    at inference), the rest of the turn is trained."""
    tok = _load(tok_dir, "forced_think", FORCED_THINK)
    enc, paths = _encode_messages_traced(tok, THINK_NL[:2])
    assert paths == ["prefix-diff"]
    assert enc.input_ids == list(tok.apply_chat_template(THINK_NL[:2], return_dict=True)["input_ids"])
    assert _trained(tok, enc) == R1[len("<think>\n"):] + A1 + "<|im_end|>"
    # two turns: the first loses its reasoning in history, so one sample cannot train it; per turn can
    with pytest.raises(ChatTemplateError, match="not a prefix"):
        encode_messages(tok, THINK_NL)
    encs, paths = chat._encode_turns_traced(tok, THINK_NL)
    assert paths == ["prefix-diff", "prefix-diff"]
    assert [_trained(tok, e) for e in encs] == [
        R1[len("<think>\n"):] + A1 + "<|im_end|>", R2[len("<think>\n"):] + A2 + "<|im_end|>"]
    assert encs[1].input_ids == list(tok.apply_chat_template(THINK_NL, return_dict=True)["input_ids"])
    assert "recall it" not in tok.decode(encs[1].input_ids)  # history rendered as at inference
    # an answer without reasoning after a prompt that forces <think>: no render is what is served
    with pytest.raises(ChatTemplateError, match="generation prompt forces text that the template does not render"):
        encode_turns(tok, CONV[1:3])


def test_forced_response_prefix(tok_dir):
    tok = _load(tok_dir, "forced_prefix", FORCED_PREFIX)
    msgs = [{"role": "user", "content": U2}, {"role": "assistant", "content": "Answer: 42"}]
    enc = encode_messages(tok, msgs)
    assert _trained(tok, enc) == " 42<|im_end|>"


def test_history_rewrite_trained_per_turn(tok_dir):
    """Reasoning dropped from earlier turns (Qwen3 style): each turn in its own sample, rendered as at
    inference, trains that turn's reasoning and answer."""
    tok = _load(tok_dir, "strip_history", STRIP_HISTORY)
    encs = encode_turns(tok, THINK)
    assert [e.input_ids for e in encs] == [
        list(tok.apply_chat_template(THINK[:2], return_dict=True)["input_ids"]),
        list(tok.apply_chat_template(THINK, return_dict=True)["input_ids"])]
    assert [_trained(tok, e) for e in encs] == [THINK[1]["content"] + "<|im_end|>", THINK[3]["content"] + "<|im_end|>"]


@pytest.mark.parametrize("name,template,path", [("system_last", SYSTEM_LAST, "prefix-diff"),
                                                ("system_if_last", SYSTEM_IF_LAST, "inference-render")])
def test_system_moved_to_last_user_trained_per_turn(tok_dir, name, template, path):
    tok = _load(tok_dir, name, template)
    with pytest.raises(ChatTemplateError, match="not a prefix"):
        encode_messages(tok, CONV)
    encs, paths = chat._encode_turns_traced(tok, CONV)
    assert paths == [path, path]
    for enc, k, answer in zip(encs, (2, 4), (A1, A2)):
        prompt = list(tok.apply_chat_template(CONV[:k], add_generation_prompt=True, return_dict=True)["input_ids"])
        assert enc.input_ids[:len(prompt)] == prompt  # the served prompt, system prompt included
        assert SYSTEM in tok.decode(enc.input_ids)
        assert enc.loss_mask == [0] * len(prompt) + [1] * (len(enc.input_ids) - len(prompt) - 1) + [0]
        assert _trained(tok, enc) == answer + "<|im_end|>"


def test_per_turn_matches_single_where_both_work(family):
    """A prefix-stable template: the per-turn samples train exactly what the single sample trains."""
    _, tok, eot = family
    one = encode_messages(tok, CONV)
    encs = encode_turns(tok, CONV)
    assert [_trained(tok, e) for e in encs] == [A1 + eot, A2 + eot]
    first, last = encs
    assert last.input_ids == one.input_ids and first.input_ids == one.input_ids[:len(first.input_ids)]
    union = [a or b for a, b in zip(first.loss_mask + [0] * len(one.input_ids), last.loss_mask)]
    assert union == one.loss_mask
    with pytest.raises(ValueError, match="add_generation_prompt"):
        encode_turns(tok, CONV, add_generation_prompt=True)
    with pytest.raises(EmptyMaskError):
        encode_turns(tok, CONV[:2])


def test_ids_and_offsets_from_the_backend_equal_the_tokenizers_own_call(tok_dir):
    """`_ids_offsets` encodes with the fast tokenizer's backend directly where transformers' call would
    only pass the text through; its ids and offsets must be that call's, and where the backend carries
    a setting the call would change (truncation, padding, special tokens split), it must fall back."""
    tok = _load(tok_dir, "ids_offsets", CHATML_TEMPLATE)  # its own copy: the settings below change it
    text = tok.apply_chat_template(CONV, tokenize=False) + "  trailing <|im_end|>\n  spaces\n"

    def reference():
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    calls = []
    backend_encode = type(tok._tokenizer).encode

    def direct(self, *a, **kw):  # counts the direct calls (transformers' own call uses encode_batch)
        calls.append(1)
        return backend_encode(self, *a, **kw)

    want = reference()
    ids, offsets = chat._ids_offsets(tok, text)
    assert (list(ids), list(offsets)) == want and len(want[0]) > 40
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids  # special tokens kept whole

    import unittest.mock as mock

    with mock.patch.object(type(tok._tokenizer), "encode", direct):
        chat._ids_offsets(tok, text)
        assert calls == [1]
        tok._tokenizer.enable_truncation(8)  # set on the backend (e.g. by a tokenizer.json): the call resets it
        got = chat._ids_offsets(tok, text)
        assert calls == [1] and got == reference() and len(got[0]) == len(want[0])
        tok._tokenizer.no_truncation()
        tok._tokenizer.enable_padding(length=400)
        got = chat._ids_offsets(tok, text)
        assert calls == [1] and got == reference() and got[0] == want[0]
        tok._tokenizer.no_padding()
        tok.split_special_tokens = True  # the call then splits "<|im_end|>" into ordinary tokens
        got = chat._ids_offsets(tok, text)
        assert calls == [1] and got == reference() and tok.convert_tokens_to_ids("<|im_end|>") not in got[0]
        tok.split_special_tokens = False  # the backend still splits (the last call set it): one more fallback resets it
        assert chat._ids_offsets(tok, text) == want and calls == [1]
        assert chat._ids_offsets(tok, text) == want and calls == [1, 1]
