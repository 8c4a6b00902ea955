"""Tokenizer layer: pad token, added tokens, vocab padding to a multiple of 64, fingerprints."""

import pytest
import torch
from transformers import AutoTokenizer

from posttrain.config import ModelConfig
from posttrain.data.tokenizer import (
    TokenizerMismatchError,
    add_tokens,
    check_fingerprint,
    ensure_pad_token,
    fingerprint,
    load_tokenizer,
    write_fingerprint,
)
from posttrain.model.load import load_model
from posttrain.tiny import build_tokenizer

TEXTS = ["Hello world, 12 + 30 = 42.", "<|im_start|>user\nhi<|im_end|>", "a <|pad|> b"]


def test_pad_token_added_without_changing_ids(tmp_path):
    tok = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path, pad=None))
    assert tok.pad_token is None
    before = [tok(t)["input_ids"] for t in TEXTS[:2]]
    n = len(tok)
    ensure_pad_token(tok)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == n  # appended, a new id
    assert tok.pad_token_id not in (tok.eos_token_id, tok.bos_token_id)
    assert [tok(t)["input_ids"] for t in TEXTS[:2]] == before


def test_existing_pad_candidate_is_reused(tmp_path):
    tok = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path, pad=None, special_tokens=["<|im_start|>", "<|endoftext|>"]))
    n = len(tok)
    ensure_pad_token(tok)
    assert tok.pad_token == "<|endoftext|>" and len(tok) == n


def test_added_tokens_keep_existing_ids(tmp_path):
    tok = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path))
    before = tok("Hello world")["input_ids"]
    n = len(tok)
    assert add_tokens(tok, special=["<tool>"], normal=["<item_12_3>", "<item_7_1>"]) == 3
    assert len(tok) == n + 3
    assert tok("Hello world")["input_ids"] == before
    ids = tok("x<item_12_3>y")["input_ids"]
    assert tok.convert_tokens_to_ids("<item_12_3>") in ids  # a semantic id is one token
    assert tok.decode(tok("<tool>ok")["input_ids"], skip_special_tokens=True) == "ok"


def test_vocab_resized_to_multiple_of_64_and_new_rows_mean_init(tiny_qwen3, tmp_path):
    cfg = ModelConfig(path=str(tiny_qwen3), add_tokens=[f"<item_{i}>" for i in range(70)], add_special_tokens=["<tool>"])
    tok = load_tokenizer(cfg)
    old = AutoTokenizer.from_pretrained(tiny_qwen3)
    assert len(tok) == len(old) + 71
    model = load_model(cfg, tok, device=torch.device("cpu"), dtype=torch.float32)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows >= len(tok) and rows - len(tok) < 64
    emb = model.get_input_embeddings().weight
    # mean-resizing: new rows are drawn around the mean of the old ones, not N(0, 0.02) noise
    old_mean = emb[: len(old)].mean(0)
    assert torch.allclose(emb[len(old):].mean(0), old_mean, atol=0.05)


def test_never_shrinks_a_larger_checkpoint_vocab(tiny_qwen3):
    cfg = ModelConfig(path=str(tiny_qwen3), pad_vocab_to_multiple_of=1)
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok, device=torch.device("cpu"), dtype=torch.float32)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)  # already exact: untouched


def test_fingerprint_tracks_ids_and_template(tmp_path):
    a = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path / "a"))
    b = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path / "b"))
    assert fingerprint(a) == fingerprint(b)  # same construction, same ids -> same fingerprint
    b.chat_template = b.chat_template + "{{ '' }}"
    assert fingerprint(a) != fingerprint(b)
    c = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path / "c"))
    add_tokens(c, normal=["<item_1>"])
    assert fingerprint(a) != fingerprint(c)


def test_checkpoint_with_other_tokenizer_fails_loudly(tmp_path):
    a = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path / "a"))
    write_fingerprint(a, tmp_path / "a")
    check_fingerprint(a, tmp_path / "a")  # same tokenizer: fine
    other = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path / "o", corpus=["completely different words here"]))
    with pytest.raises(TokenizerMismatchError, match="different tokenizer"):
        check_fingerprint(other, tmp_path / "a")
    # through the config path: model dir written by posttrain + a different model.tokenizer
    with pytest.raises(TokenizerMismatchError, match=str(tmp_path / "a")):
        load_tokenizer(ModelConfig(path=str(tmp_path / "a"), tokenizer=str(tmp_path / "o")))
