"""`posttrain preview JOB.yaml`: the data as the model will see it, before any weights are loaded.

Renders a few samples exactly as they are tokenized for training (decoded back to text, special
tokens included) with the trained tokens (label != -100) highlighted, then token statistics over a
sample of the data: lengths, truncation and skips by reason, and the packing efficiency and steps
per epoch the packer would give. Only the tokenizer is loaded."""

from __future__ import annotations

import math
import sys
from collections import deque
from collections.abc import Callable

from ..config import JobConfig
from .packing import make_batch
from .records import RecordStats, Sample

OPEN, CLOSE = "«", "»"


def _encoder(cfg: JobConfig):
    if cfg.recipe == "dpo":
        from .pairs import encode_pair_record

        return encode_pair_record
    return None  # SFT records (sft, distill, custom recipes); grpo's prompts: preview_prompts


def read_samples(cfg: JobConfig, tokenizer, limit: int, encode=None) -> tuple[list[Sample], RecordStats, bool]:
    """Up to `limit` samples of one pass over the sources, as the training loader makes them (same
    mixer, seed, transforms, length policy and bad-record policy). Returns (samples, record stats,
    whether the pass ended)."""
    from .loader import SampleStream

    stream = SampleStream(cfg.data.model_copy(update={"max_epochs": 1}), tokenizer, seed=cfg.train.seed, encode=encode)
    samples: list[Sample] = []
    while len(samples) < limit:
        s = stream.next()
        if s is None:
            return samples, stream.stats, True
        samples.append(s)
    return samples, stream.stats, False


def segments(tokenizer, sample: Sample) -> list[list[tuple[str, bool]]]:
    """Per document of the sample: runs of (decoded text, trained?) in order."""
    docs, start = [], 0
    for n in sample.docs:
        ids, labels = sample.input_ids[start:start + n], sample.labels[start:start + n]
        runs: list[tuple[list[int], bool]] = []
        for t, lab in zip(ids, labels):
            trained = lab != -100
            if runs and runs[-1][1] == trained:
                runs[-1][0].append(t)
            else:
                runs.append(([t], trained))
        docs.append([(tokenizer.decode(r, skip_special_tokens=False), trained) for r, trained in runs])
        start += n
    return docs


def render_plain(docs: list[list[tuple[str, bool]]]) -> str:
    """Trained text between « and »."""
    return "\n".join("".join(f"{OPEN}{t}{CLOSE}" if trained else t for t, trained in doc) for doc in docs)


def packing_stats(samples: list[Sample], cfg: JobConfig, pad_id: int) -> dict:
    """Run the packer over the samples as the loader would (rolling buffer of data.buffer_size):
    micro-batches, token slots they occupy (padding included) and real tokens."""
    d = cfg.data
    buffer, pending = [], deque(samples)
    batches = slots = real = 0
    while pending or buffer:
        while pending and len(buffer) < d.buffer_size:
            buffer.append(pending.popleft())
        batch, buffer = make_batch(buffer, budget=d.max_tokens_per_batch, pad_id=pad_id, packing=d.packing,
                                   multiple_of=d.pack_to_multiple_of)
        batches += 1
        slots += batch["input_ids"].numel()
        real += int(batch["num_tokens"])
    return {"micro_batches": batches, "slots": slots, "real": real}


def _percentile(xs: list[int], q: float) -> int:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def statistics(samples: list[Sample], stats: RecordStats, ended: bool, cfg: JobConfig, pad_id: int) -> list[str]:
    lines = []
    scope = "one full pass" if ended else f"the first {len(samples)} samples (pass --records to read more)"
    lines.append(f"statistics over {scope}")
    lines.append(f"  {stats.summary()}")
    if stats.seen:
        lines.append(f"  truncated: {stats.truncated / stats.seen:.1%} of records read (data.max_seq_len "
                     f"{cfg.data.max_seq_len}, overlong: {cfg.data.overlong})")
    if not samples:
        lines.append("  no samples")
        return lines
    lens = [len(s.input_ids) for s in samples]
    trained = sum(sum(1 for lab in s.labels if lab != -100) for s in samples)
    lines.append("  tokens per sample: " + "  ".join(f"p{q} {_percentile(lens, q)}" for q in (50, 90, 99))
                 + f"  max {max(lens)}  mean {sum(lens) / len(lens):.1f}")
    lines.append(f"  trained tokens: {trained:,} of {sum(lens):,} ({trained / sum(lens):.1%})")
    p = packing_stats(samples, cfg, pad_id)
    per_step = cfg.train.grad_accum * cfg.compute.workers
    mode = "packing" if cfg.data.packing else "padding (data.packing: false)"
    lines.append(f"  {mode}: efficiency {p['real'] / p['slots']:.1%} (real tokens / token slots: {p['real']:,} / "
                 f"{p['slots']:,}); {p['micro_batches']} micro-batches of <= {cfg.data.max_tokens_per_batch} tokens")
    steps = math.ceil(p["micro_batches"] / per_step)
    what = "steps per epoch" if ended else f"steps for these {len(samples)} samples"
    lines.append(f"  {what}: {steps} ({per_step} micro-batches per step = grad_accum {cfg.train.grad_accum} "
                 f"x workers {cfg.compute.workers}); train.steps: {cfg.train.steps}")
    return lines


def preview_prompts(cfg: JobConfig, tok, *, n: int, records: int, emit: Callable[[str], None]) -> None:
    """GRPO's data: prompts rendered with the generation prompt, as the rollout engine receives them
    (nothing is trained in them: the completions are), the fields the rewards read, and statistics."""
    from .loader import SampleStream
    from .prompts import make_prompt_encoder, prompt_limit

    sec = cfg.section
    limit = prompt_limit(cfg.data, sec.sampling.max_new_tokens)
    stream = SampleStream(cfg.data.model_copy(update={"max_epochs": 1}), tok, seed=cfg.train.seed,
                          encode=make_prompt_encoder(limit))
    prompts, ended = [], False
    while len(prompts) < max(n, records):
        p = stream.next()
        if p is None:
            ended = True
            break
        prompts.append(p)
    for i, p in enumerate(prompts[:n]):
        emit(f"── prompt {i + 1} ({p.where}, {len(p.ids)} tokens; then up to {sec.sampling.max_new_tokens} generated) ──")
        emit(tok.decode(p.ids, skip_special_tokens=False))
        fields = {k: v for k, v in p.record.items() if k != "prompt"}
        if fields:
            emit("fields the rewards receive: " + ", ".join(f"{k}={v!r}" for k, v in fields.items()))
    scope = "one full pass" if ended else f"the first {len(prompts)} prompts (pass --records to read more)"
    emit(f"statistics over {scope}")
    emit(f"  {stream.stats.summary()} (a prompt over data.max_seq_len - max_new_tokens = {limit} tokens is a bad record)")
    if not prompts:
        emit("  no prompts")
        return
    lens = [len(p.ids) for p in prompts]
    emit("  prompt tokens: " + "  ".join(f"p{q} {_percentile(lens, q)}" for q in (50, 90, 99)) + f"  max {max(lens)}")
    what = "steps per epoch" if ended else f"steps for these {len(prompts)} prompts"
    emit(f"  {what}: {math.ceil(len(prompts) / sec.prompts_per_step)} ({sec.prompts_per_step} prompts x {sec.group_size} "
         f"completions per step); train.steps: {cfg.train.steps}")


def preview(cfg: JobConfig, *, n: int = 3, records: int = 2000, plain: bool = False,
            out: Callable[[str], None] | None = None) -> None:
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.model)
    if cfg.recipe == "grpo":
        return preview_prompts(cfg, tok, n=n, records=records, emit=out or print)
    samples, stats, ended = read_samples(cfg, tok, max(n, records), _encoder(cfg))
    rich_out = not plain and out is None and sys.stdout.isatty()
    console = None
    if rich_out:
        from rich.console import Console

        console = Console(highlight=False)
        say = lambda line: console.print(line, markup=False)  # noqa: E731
    emit = out or print
    for i, s in enumerate(samples[:n]):
        docs = segments(tok, s)
        header = f"── sample {i + 1} ({s.where}, {len(s.input_ids)} tokens, " \
                 f"{sum(1 for lab in s.labels if lab != -100)} trained) ──"
        if console is not None:
            from rich.text import Text

            console.print(header, style="bold", markup=False)
            for doc in docs:
                text = Text()
                for t, trained in doc:
                    text.append(t, style="bold green on grey15" if trained else "dim")
                console.print(text)
        else:
            emit(header)
            emit(render_plain(docs))
    if not rich_out:
        emit(f"(trained tokens are between {OPEN} and {CLOSE})")
    for line in statistics(samples, stats, ended, cfg, tok.pad_token_id):
        (say if console is not None else emit)(line)
