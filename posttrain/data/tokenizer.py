"""The model's own HF tokenizer, made trainable: a pad token, added tokens, and a fingerprint.

The tokenizer is the single source of truth for ids; nothing here re-implements tokenization.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..config import ConfigError, ModelConfig, check_model_source, hub_hint, read_chat_template

PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|endoftext|>", "<pad>", "[PAD]", "<|pad|>")
FINGERPRINT_FILE = "posttrain.json"


class TokenizerMismatchError(RuntimeError):
    """A checkpoint was written with a different tokenizer than the one being used with it."""


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    src = cfg.tokenizer or cfg.path
    key = f"model.{'tokenizer' if cfg.tokenizer else 'path'}"
    check_model_source(src, key=key, revision=cfg.revision)
    try:
        tok = AutoTokenizer.from_pretrained(src, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot load a tokenizer from {src!r}{hub_hint(src)}: {e}") from e
    # A model dir written by posttrain records its tokenizer; compare before this run's additions.
    check_fingerprint(tok, cfg.path)
    if cfg.chat_template:  # replaces or supplies the template; saved with the tokenizer on export
        tok.chat_template = read_chat_template(cfg.chat_template)
    new_tokens = list(cfg.add_tokens)
    if cfg.add_tokens_file:
        try:
            new_tokens += [ln.strip() for ln in Path(cfg.add_tokens_file).read_text().splitlines() if ln.strip()]
        except OSError as e:
            raise ConfigError(f"model.add_tokens_file: cannot read {cfg.add_tokens_file!r} ({e.strerror})") from e
    add_tokens(tok, special=cfg.add_special_tokens, normal=new_tokens)
    ensure_pad_token(tok)
    return tok


def add_tokens(tok: PreTrainedTokenizerBase, *, special: list[str] = (), normal: list[str] = ()) -> int:
    """Append tokens to the vocabulary (existing ids never change). Special tokens are never split
    and are skipped when decoding with skip_special_tokens; normal added tokens (e.g. semantic IDs
    like `<item_12_3>`) are matched whole but decoded as text. Returns how many were new."""
    n = 0
    if special:
        n += tok.add_special_tokens({"additional_special_tokens": list(special)}, replace_extra_special_tokens=False)
    if normal:
        n += tok.add_tokens(list(normal))
    return n


def ensure_pad_token(tok: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token without changing the ids of any real text.

    Prefer a dedicated pad token already in the vocabulary; otherwise append a new special
    `<|pad|>`. We never alias pad to eos: a collator that masks pad would then also mask the eos the
    model must learn to emit. (Our losses use explicit masks, but exported tokenizers are used by
    other tools too.)
    """
    if tok.pad_token is not None:
        return
    vocab = tok.get_vocab()
    for cand in PAD_CANDIDATES:
        if cand in vocab and cand not in (tok.eos_token, tok.bos_token):
            tok.pad_token = cand
            return
    tok.add_special_tokens({"pad_token": "<|pad|>"})


def fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """Hash of everything that decides which ids a text gets: the tokenizer model (vocab, merges,
    normalizer, pre-tokenizer, added tokens), the special tokens and the chat template."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizer: fall back to the vocabulary
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(json.dumps({k: str(v) for k, v in sorted(tok.special_tokens_map.items())}).encode())
    h.update((tok.chat_template or "").encode() if isinstance(tok.chat_template, (str, type(None))) else json.dumps(tok.chat_template, sort_keys=True).encode())
    return h.hexdigest()


def write_fingerprint(tok: PreTrainedTokenizerBase, out_dir: str | Path, **extra) -> None:
    path = Path(out_dir) / FINGERPRINT_FILE
    path.write_text(json.dumps({"tokenizer_fingerprint": fingerprint(tok), "real_vocab_size": len(tok), **extra}, indent=2))


def read_checkpoint_meta(ckpt_dir: str | Path) -> dict | None:
    path = Path(ckpt_dir) / FINGERPRINT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_fingerprint(tok: PreTrainedTokenizerBase, ckpt_dir: str | Path) -> None:
    """Fail loudly if `ckpt_dir` was written by posttrain with a different tokenizer."""
    meta = read_checkpoint_meta(ckpt_dir)
    if meta is None:
        return
    want, got = meta.get("tokenizer_fingerprint"), fingerprint(tok)
    if want != got:
        raise TokenizerMismatchError(
            f"{ckpt_dir}: this checkpoint was trained with a different tokenizer "
            f"(fingerprint {want[:12]}…, the loaded one is {got[:12]}…). Token ids would silently mean "
            "different text. Use the tokenizer saved in the checkpoint directory (drop model.tokenizer), "
            "or the same add_tokens/add_special_tokens as the run that wrote it."
        )
