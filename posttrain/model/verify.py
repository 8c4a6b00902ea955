"""Logit verifier: our training path vs the plain transformers forward, on random documents.

Checks, each reporting max |diff| of logits (abs and relative to max |reference logit|) and of
per-token log-probs, and failing above a tolerance (fp32: 1e-5 abs on log-probs; logits 10x that):

1. `packed`: the training path: several random documents concatenated in one row, `position_ids`
   restarting at 0 per document and no attention mask (the document mask comes from the position
   ids), model loaded by `load_model` (vocabulary padded to a multiple of 64, LoRA on every role the
   family has, experts included, adapters zero-initialised as peft does), decoder -> hidden states ->
   chunked head (a small chunk that does not divide the token count) -> logits and log-probs over the
   real vocabulary; vs each document run alone through `AutoModelForCausalLM.from_pretrained(dir)`
   with eager attention, its logits cut to the real vocabulary.
2. `unpacked`: the same training model, each document alone (batch of one).
3. `export`: LoRA adapters set to random non-zero values, the model exported with `export_hf`
   (merged) and reloaded with plain `from_pretrained`, vs the training model (packed). Also checks
   that the export's config/embeddings/head/tokenizer sizes agree.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..config import LoraConfig, ModelConfig
from .export import export_hf
from .families import family_of
from .load import load_model, unwrap
from .loss import IGNORE, chunked_apply, hidden_states, target_hidden, token_logprobs


@dataclass
class Check:
    name: str
    logit_abs: float
    logit_rel: float
    logprob_abs: float
    tol: float
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.logprob_abs <= self.tol and self.logit_abs <= 10 * self.tol and not self.notes


@dataclass
class Report:
    model_dir: str
    family: str
    vocab: int
    rows: int
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def table(self) -> str:
        lines = [
            f"{self.model_dir}: family {self.family}, real vocab {self.vocab}, padded rows {self.rows}",
            f"  {'check':<10} {'logit max|d|':>13} {'logit rel':>11} {'logprob max|d|':>15} {'tol':>8}  result",
        ]
        for c in self.checks:
            lines.append(
                f"  {c.name:<10} {c.logit_abs:>13.3e} {c.logit_rel:>11.3e} {c.logprob_abs:>15.3e} {c.tol:>8.0e}  "
                f"{'ok' if c.ok else 'FAIL'}{'  ' + '; '.join(c.notes) if c.notes else ''}"
            )
        return "\n".join(lines)


def random_documents(vocab: int, n_docs: int, min_len: int, max_len: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (n_docs,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g) for n in lens]


def pack(docs: list[torch.Tensor]) -> dict:
    """One row, position ids restarting per document, no attention mask; the first token of each
    document is not a target (nothing in the row before it belongs to its document)."""
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = ids.clone()
    start = 0
    for d in docs:
        labels[0, start] = IGNORE
        start += len(d)
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


def _our_outputs(model, batch, vocab, chunk):
    """(logits [T, V] of every position, log-probs of the targets [N]) through the training path (the
    targets' through `target_hidden`, as the losses run: the last layer at the target positions only
    where the family allows, model/tail.py)."""
    h = hidden_states(model, batch)
    logits = chunked_apply(model, h[0], lambda x: x, vocab_size=vocab, chunk_tokens=chunk, cat=True)
    hs, t = target_hidden(model, batch, vocab)
    return logits, token_logprobs(model, hs, t, vocab, chunk_tokens=chunk)


def _reference(model, docs, vocab):
    logits, lps = [], []
    for d in docs:
        lg = model(input_ids=d[None], use_cache=False).logits[0, :, :vocab].float()
        logits.append(lg)
        lps.append(torch.log_softmax(lg[:-1], -1).gather(1, d[1:, None]).squeeze(1))
    return torch.cat(logits), torch.cat(lps)


def _compare(name, ours, ref, tol) -> Check:
    (lo, po), (lr, pr) = ours, ref
    if lo.shape != lr.shape or po.shape != pr.shape:
        return Check(name, float("inf"), float("inf"), float("inf"), tol, [f"shape mismatch {tuple(lo.shape)} vs {tuple(lr.shape)}"])
    d = (lo - lr).abs().max().item()
    return Check(name, d, d / max(lr.abs().max().item(), 1e-12), (po - pr).abs().max().item(), tol)


def _lora_roles(model) -> LoraConfig:
    fam = family_of(model)
    base = unwrap(model)
    tied = base.get_output_embeddings().weight is base.get_input_embeddings().weight
    roles = [r for r in ("attention", "mlp") if fam is None or fam.role_suffixes(r)] + ([] if tied else ["head"])
    return LoraConfig(rank=4, alpha=8, target=roles, experts=bool(fam and fam.experts))


def verify_model(
    model_dir: str | Path,
    *,
    n_docs: int = 3,
    min_len: int = 8,
    max_len: int = 40,
    seed: int = 0,
    tol: float = 1e-5,
    chunk_tokens: int = 7,
    lora: bool = True,
    export: bool = True,
    export_dir: str | Path | None = None,
    allow_unverified: bool = False,
) -> Report:
    model_dir = str(model_dir)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = len(tok)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    family = family_of(ref)
    if vocab > ref.get_input_embeddings().weight.shape[0]:
        raise ValueError(f"{model_dir}: tokenizer has {vocab} ids but the checkpoint only "
                         f"{ref.get_input_embeddings().weight.shape[0]} embedding rows")
    # make sure padded vocabulary rows exist (64, or the next power of two that leaves some)
    multiple, have = 64, ref.get_input_embeddings().weight.shape[0]
    while -(-have // multiple) * multiple == have:
        multiple *= 2
    cfg = ModelConfig(path=model_dir, dtype="float32", allow_unverified=allow_unverified, pad_vocab_to_multiple_of=multiple)
    ours = load_model(cfg, tok, device=torch.device("cpu"), dtype=torch.float32)
    if lora:
        cfg = cfg.model_copy(update={"lora": _lora_roles(ours)})
        from .load import apply_lora

        ours = apply_lora(ours, cfg)
    ours.eval()
    rows = unwrap(ours).get_input_embeddings().weight.shape[0]
    docs = random_documents(vocab, n_docs, min_len, max_len, seed)
    checks = []
    with torch.no_grad():
        reference = _reference(ref, docs, vocab)
        packed = _our_outputs(ours, pack(docs), vocab, chunk_tokens)
        checks.append(_compare("packed", packed, reference, tol))
        alone = [_our_outputs(ours, pack([d]), vocab, chunk_tokens) for d in docs]
        # pack([d]) has no ignored position but the first, like the reference (which skips nothing)
        unpacked = (torch.cat([a[0] for a in alone]), torch.cat([a[1] for a in alone]))
        checks.append(_compare("unpacked", unpacked, reference, tol))
        # the reference's log-probs include each document's own targets only, like pack() labels
        if export:
            if lora:
                g = torch.Generator().manual_seed(seed + 1)
                for n, p in ours.named_parameters():
                    if "lora_B" in n:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            trained = _our_outputs(ours, pack(docs), vocab, chunk_tokens)
            with tempfile.TemporaryDirectory() as tmp:
                out = export_hf(ours, tok, Path(export_dir) if export_dir else Path(tmp) / "hf", merge_lora=True)
                loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
                check = _compare("export", trained, _reference(loaded, docs, vocab), tol)
                check.notes += _export_sizes(out, loaded, vocab)
                checks.append(check)
    return Report(model_dir, family.name if family else f"unverified ({type(ref).__name__})", vocab, rows, checks)


def _export_sizes(out: Path, loaded, vocab: int) -> list[str]:
    """An export's config, embeddings, head and tokenizer agree (what vLLM-style loaders check)."""
    notes = []
    tok = AutoTokenizer.from_pretrained(out)
    cfg_v = loaded.config.get_text_config().vocab_size
    emb = loaded.get_input_embeddings().weight.shape[0]
    head = loaded.get_output_embeddings().weight.shape[0]
    if not cfg_v == emb == head:
        notes.append(f"export sizes disagree: config.vocab_size {cfg_v}, embeddings {emb}, lm_head {head}")
    if len(tok) > cfg_v or max(tok.get_vocab().values()) >= cfg_v:
        notes.append(f"export tokenizer has ids >= config.vocab_size {cfg_v}")
    if len(tok) != vocab:
        notes.append(f"export tokenizer has {len(tok)} ids, the training one {vocab}")
    return notes
