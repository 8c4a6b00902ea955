"""`posttrain --version`, `posttrain generate` and `posttrain chat` on a tiny model dir."""

import io
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import posttrain
from posttrain.cli import main


def _greedy(model_dir, conversations, max_new_tokens, plain=False):
    """Reference: plain transformers, the prompt rendered by the chat template (or the raw text)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    outs = []
    for conv in conversations:
        if plain:
            enc = tok("".join(m["content"] for m in conv), return_tensors="pt")
        else:
            enc = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        outs.append(tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return outs


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"posttrain {posttrain.__version__}"


def test_generate_matches_greedy_generate(tiny_qwen3, capsys):
    assert main(["generate", str(tiny_qwen3), "--prompt", "What is the capital of France?", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    [want] = _greedy(tiny_qwen3, [[{"role": "user", "content": "What is the capital of France?"}]], 12)
    assert want.strip(), "the tiny model should say something"
    assert out == want + "\n"


def test_generate_without_chat_template_is_plain_text(tiny_qwen3, tmp_path, capsys):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_qwen3, plain)
    cfg_file = plain / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("chat_template", None)
    cfg_file.write_text(json.dumps(cfg))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    assert not AutoTokenizer.from_pretrained(plain).chat_template
    assert main(["generate", str(plain), "--prompt", "The capital of France", "--max-new-tokens", "6"]) == 0
    [want] = _greedy(plain, [[{"role": "user", "content": "The capital of France"}]], 6, plain=True)
    assert capsys.readouterr().out == want + "\n"


def test_chat_keeps_history_resets_and_exits(tiny_qwen3, monkeypatch, capsys):
    turns = ["What is the capital of France?", "Add 3 and 4.", "/reset", "Spell the word moon.", "/exit", "never read"]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(t + "\n" for t in turns)))
    assert main(["chat", str(tiny_qwen3), "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr().out

    # the same conversations, rendered in full each time: turn 2 sees turn 1 and its answer; after
    # /reset the history is empty again
    u1, u2, u3 = ({"role": "user", "content": t} for t in (turns[0], turns[1], turns[3]))
    [a1] = _greedy(tiny_qwen3, [[u1]], 10)
    [a2, a3] = _greedy(tiny_qwen3, [[u1, {"role": "assistant", "content": a1}, u2], [u3]], 10)
    [a2_fresh] = _greedy(tiny_qwen3, [[u2]], 10)
    assert out == f"assistant> {a1}\nassistant> {a2}\n(conversation reset)\nassistant> {a3}\n"
    assert "never read" not in out
    assert a2 != a2_fresh, "with this tiny model the history changes the second answer (so the test can tell)"


def test_chat_ends_at_eof(tiny_qwen3, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Add 3 and 4."))  # no newline, no /exit
    assert main(["chat", str(tiny_qwen3), "--max-new-tokens", "4"]) == 0
    [want] = _greedy(tiny_qwen3, [[{"role": "user", "content": "Add 3 and 4."}]], 4)
    assert capsys.readouterr().out == f"assistant> {want}\n"


def test_generate_missing_model_dir(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_chat_system_message_survives_reset(tiny_qwen3, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Add 3 and 4.\n/reset\nAdd 3 and 4.\n"))
    assert main(["chat", str(tiny_qwen3), "--system", "Be terse.", "--max-new-tokens", "6"]) == 0
    conv = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Add 3 and 4."}]
    [want] = _greedy(tiny_qwen3, [conv], 6)
    assert capsys.readouterr().out == f"assistant> {want}\n(conversation reset)\nassistant> {want}\n"
    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    assert "Be terse." in tok.apply_chat_template(conv, tokenize=False)  # the template renders it
