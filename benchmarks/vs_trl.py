"""posttrain's SFT side by side with Hugging Face TRL's SFTTrainer: real tokens/s, peak memory, losses.

Both sides train the demo's tiny Qwen3 (examples/build_tiny_model.py; 3.5M parameters, fp32, full
fine-tuning) on one generated chat dataset written once as JSONL, with the same AdamW (constant lr, no
lr warm-up, betas 0.9/0.999, no weight decay, clip 1.0), the same steps, one micro-batch per optimizer
step, and the loss on assistant tokens only (each answer and its `<|im_end|>`; TRL: `assistant_only_loss`
with the demo's ChatML template plus `{% generation %}` markers, which renders the same text). The
benchmark checks that TRL's tokenized dataset has exactly posttrain's tokens and loss targets.

Datasets (`--data`): demo conversations with further demo turns appended up to a lognormal target length
in tokens (samples end a little below their target):
- `skewed`: targets of median 120 tokens, sigma 1.0 (samples from ~25 to over 1,000 tokens at the
  default size; capped at --max-len);
- `uniform`: targets of median 200 tokens, sigma 0.1 (similar lengths, about the skewed set's mean).
Each dataset holds about `--steps x --budget` tokens: one pass over the data per run, on every side.

Modes (each run its own process; modes interleaved across repeats: A B C, B C A, C A B):
- `posttrain`: its default packed SFT: best-fit rows of at most `--budget` tokens from a rolling buffer,
  per-document attention, the chunked head on target tokens;
- `posttrain_compiled`: the same with `compute.compile: true` (decoder layers compiled; the compilation
  falls in the warm-up steps);
- `trl_bfd`: `packing=True`, `packing_strategy="bfd"` (best-fit decreasing over the whole dataset into
  rows of `--budget` tokens; TRL then trains padding-free, one packed row per step);
- `trl_group_by_length`: padded batches, `train_sampling_strategy="group_by_length"` (transformers'
  LengthGroupedSampler), B samples per step right-padded to the longest, B = samples / steps, so that
  its real tokens per step average the same budget and the run is one pass over the data too. The
  sampler sorts random mega-batches (here 4 of them: min(50, samples / 4B) batches each) by length,
  longest batch first, so a run that is exactly one pass sees every length class; a shorter run would
  see mostly its longest batches.

The same token budget per step: posttrain and trl_bfd fill rows of `--budget` tokens; a padded batch has
a fixed number of samples, so its budget is met on average (B above) and its padding is extra work.
What is compared is real tokens/s: tokens of the samples (prompt and answer tokens, everything but
padding) over the timed steps, counted the same way on both sides. The timed window runs from the end of
step `--warmup` to the end of the last step (startup, tokenization, TRL's dataset packing excluded).
Peak memory is the peak RSS of each run's process.

TRL 1.16 needs a newer transformers than posttrain pins, so it runs in its own venv, benchmarks/.trl-venv,
which benchmarks/setup_trl_venv.sh creates (~2 minutes) when a TRL mode is selected; it returns at once
when the venv is current.

    .venv/bin/python benchmarks/vs_trl.py              # both datasets, 3 modes x 3 repeats x 24 steps
    .venv/bin/python benchmarks/vs_trl.py --data skewed --quick   # smoke: 3 steps (1 warm-up), 1 repeat
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_common import add_run_args, child_env, medians, model_params, parse_run_args, rotation, run_process, selected_modes, write_markdown

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / ".cache" / "tiny-qwen3"
DEMO = ROOT / "examples" / "data" / "demo_chat.jsonl"
TRL_PY = ROOT / "benchmarks" / ".trl-venv" / "bin" / "python"
RUNNER = ROOT / "benchmarks" / "trl_sft_runner.py"

MODES = {
    "posttrain": dict(side="posttrain"),
    "posttrain_compiled": dict(side="posttrain", compile=True),
    "trl_bfd": dict(side="trl", trl_mode="bfd"),
    "trl_group_by_length": dict(side="trl", trl_mode="group_by_length"),
}
DATASETS = {
    "skewed": dict(median=120, sigma=1.0),
    "uniform": dict(median=200, sigma=0.1),
}
TAIL = 5  # the final loss: the mean over the last TAIL steps (one batch's loss is noisy)
FIELDS = ("tok_s", "step_ms", "real_step", "waste", "pairs_tok", "rss", "loss1", "loss_end")


# ------------------------------------------------------------------------------------------ data
def make_chats(path: Path, tok, *, tokens: int, median: float, sigma: float, max_len: int, seed: int) -> dict:
    """Conversations until their tokens reach `tokens`: each a random demo conversation, then random demo
    (user, assistant) turn pairs appended while the sample stays within a lognormal target length
    (median, sigma; at most max_len), until 8 drawn pairs in a row would overshoot it. Lengths are posttrain's encoding (the chat template's tokens).
    Returns per-sample token and target counts, and the digest of (input_ids, labels) the TRL runner
    computes on its side."""
    from posttrain.data.chat import encode_messages

    rng = random.Random(seed)
    convs = [json.loads(ln)["messages"] for ln in DEMO.read_text().splitlines()]
    pairs = sorted({(c[i]["content"], c[i + 1]["content"]) for c in convs for i in range(0, len(c) - 1, 2)
                    if c[i]["role"] == "user" and c[i + 1]["role"] == "assistant"})
    cost = {p: len(encode_messages(tok, [{"role": "user", "content": p[0]}, {"role": "assistant", "content": p[1]}]).input_ids)
            for p in pairs}
    recs, lens, targets = [], [], []
    digest = hashlib.sha256()
    while sum(lens) < tokens:
        target = min(max_len, rng.lognormvariate(math.log(median), sigma))
        msgs = list(rng.choice(convs))
        n = len(encode_messages(tok, msgs).input_ids)
        misses = 0
        while misses < 8:  # the template renders turn by turn, so a pair adds exactly its own tokens (checked below)
            p = rng.choice(pairs)
            if n + cost[p] > target:
                misses += 1  # try a few other pairs before calling the sample full
                continue
            msgs += [{"role": "user", "content": p[0]}, {"role": "assistant", "content": p[1]}]
            n += cost[p]
        enc = encode_messages(tok, msgs)
        if len(enc.input_ids) != n or n > max_len:
            raise RuntimeError(f"sample {len(recs)}: {len(enc.input_ids)} tokens, expected {n} (max {max_len})")
        recs.append({"messages": msgs})
        lens.append(n)
        targets.append(sum(enc.loss_mask))
        labels = [t if m else -100 for t, m in zip(enc.input_ids, enc.loss_mask)]
        digest.update(json.dumps([list(enc.input_ids), labels]).encode())
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return {"lens": lens, "targets": targets, "digest": digest.hexdigest()}


def length_stats(lens: list[int]) -> str:
    q = statistics.quantiles(lens, n=20)
    return (f"{len(lens)} samples, {sum(lens):,} tokens; tokens per sample min {min(lens)}, median "
            f"{statistics.median(lens):.0f}, mean {statistics.mean(lens):.0f}, p95 {q[18]:.0f}, max {max(lens)}; "
            f"max/median {max(lens) / statistics.median(lens):.1f}")


# ------------------------------------------------------------------------------------------ runs
def run_posttrain(tmp: Path, name: str, data: Path, a, env: dict) -> dict:
    out = tmp / name
    job = {
        "recipe": "sft",
        "model": {"path": str(MODEL), "dtype": "float32"},
        # posttrain's defaults otherwise: packing, best-fit from a 256-sample buffer, rows ending at a
        # multiple of 64, shuffled
        "data": {"sources": [{"path": str(data)}], "max_seq_len": a.max_len, "max_tokens_per_batch": a.budget},
        "train": {"steps": a.steps, "lr": a.lr, "schedule": "constant", "warmup_steps": 0, "grad_accum": 1,
                  "max_grad_norm": 1.0, "weight_decay": 0.0, "seed": 0, "log_every": a.steps},
        "compute": {"device": "cpu", "threads": a.threads, "output_dir": str(out), "progress": False,
                    "checkpoint_every": None, "checkpoint_every_minutes": None,  # TRL: save_strategy "no"
                    "compile": MODES[name].get("compile", False),
                    "peak_flops": 1.0e11},  # a fixed MFU peak: skips the matmul calibration at startup
        "export": {"enabled": False},
    }
    job_file = tmp / f"{name}.yaml"
    job_file.write_text(yaml.safe_dump(job, sort_keys=False))
    log = tmp / f"{name}.log"
    rc, rss, wall = run_process([sys.executable, "-m", "posttrain.cli", "run", str(job_file), "--overwrite"], log, env)
    if rc != 0:
        raise RuntimeError(f"posttrain run {name!r} failed (exit {rc}):\n{log.read_text()[-3000:]}")
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    if len(rows) != a.steps:
        raise RuntimeError(f"posttrain run {name!r}: {len(rows)} steps logged, expected {a.steps}")
    real = [round(r["tokens_per_s"] * r["step_time_s"]) for r in rows]
    return {"loss": [r["loss"] for r in rows], "real": real,
            "slots": [round(n / (1 - r["padding"])) for n, r in zip(real, rows)],
            "targets": [r["target_tokens"] for r in rows], "end": [r["time"] for r in rows], "rss": rss, "wall": wall}


def run_trl(tmp: Path, name: str, data: Path, template: Path, batch: int, a, env: dict) -> dict:
    mode = MODES[name]["trl_mode"]
    out = tmp / name
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(TRL_PY), str(RUNNER), "--model", str(MODEL), "--data", str(data), "--chat-template", str(template),
           "--out", str(out / "result.json"), "--mode", mode, "--steps", str(a.steps), "--lr", str(a.lr),
           "--threads", str(a.threads), "--batch-size", str(batch),
           "--max-length", str(a.budget if mode == "bfd" else a.max_len)]
    env = {**env, "HF_DATASETS_CACHE": str(out / "hf-datasets")}  # fresh: no tokenized/packed dataset reused
    log = tmp / f"{name}.log"
    rc, rss, wall = run_process(cmd, log, env)
    if rc != 0:
        raise RuntimeError(f"TRL run {name!r} failed (exit {rc}):\n{log.read_text()[-3000:]}")
    r = json.loads((out / "result.json").read_text())
    if len(r["loss"]) != a.steps or len(r["step_end"]) != a.steps:
        raise RuntimeError(f"TRL run {name!r}: {len(r['loss'])} losses, {len(r['step_end'])} steps, expected {a.steps}")
    if r["threads_at_train"] != a.threads:
        raise RuntimeError(f"TRL run {name!r}: torch threads {r['threads_at_train']} during training, expected {a.threads}")
    return {**r, "end": r["step_end"], "rss": rss, "wall": wall}


def summarize(r: dict, warmup: int, doc_pairs_per_token: float) -> dict:
    """Over the steps after `warmup`: from the end of step `warmup` to the end of the last."""
    window = r["end"][-1] - r["end"][warmup - 1]
    timed = len(r["end"]) - warmup
    real, slots = sum(r["real"][warmup:]), sum(r["slots"][warmup:])
    # attention score entries per real token: TRL's from its batch shapes; posttrain attends per document
    pairs = sum(r["pairs"][warmup:]) / real if "pairs" in r else doc_pairs_per_token
    tail = r["loss"][-min(TAIL, len(r["loss"])):]
    return {"tok_s": real / window, "step_ms": 1e3 * window / timed, "real_step": real / timed, "waste": slots / real,
            "pairs_tok": pairs, "rss": r["rss"], "loss1": r["loss"][0], "loss_end": statistics.mean(tail),
            "tokens_all": sum(r["real"]), "targets_all": sum(r["targets"]), "wall": r["wall"]}


def check_same_data(name: str, r: dict, info: dict) -> str:
    """TRL's prepared dataset holds posttrain's tokens and loss targets (padded: sample by sample)."""
    want_tokens, want_targets = sum(info["lens"]), sum(info["targets"])
    if (r["dataset_tokens"], r["dataset_targets"], r["dataset_samples"]) != (want_tokens, want_targets, len(info["lens"])):
        raise RuntimeError(f"{name}: TRL's dataset has {r['dataset_samples']} samples, {r['dataset_tokens']} tokens, "
                           f"{r['dataset_targets']} targets; posttrain's encoding {len(info['lens'])}, {want_tokens}, "
                           f"{want_targets}")
    if "sample_digest" in r and r["sample_digest"] != info["digest"]:
        raise RuntimeError(f"{name}: TRL's (input_ids, labels) differ from posttrain's encoding of the same records")
    return "every sample's input_ids and labels equal" if "sample_digest" in r else "token and target totals equal"


# ------------------------------------------------------------------------------------------ report
def report(a, ds: str, info: dict, results: dict[str, list[dict]]) -> list[str]:
    med = medians(results, FIELDS)
    reps = len(next(iter(results.values())))
    trl_modes = [k for k in results if MODES[k]["side"] == "trl"]
    fastest = max(trl_modes, key=lambda k: med[k]["tok_s"]) if trl_modes else None
    L = [f"### {ds}: lognormal target lengths, median {DATASETS[ds]['median']} tokens, sigma {DATASETS[ds]['sigma']}", ""]
    checks = "; ".join(f"{k} {v}" for k, v in info["checks"].items())
    L.append(f"Data: {length_stats(info['lens'])}; {sum(info['targets']):,} loss targets."
             + (f" TRL's dataset against posttrain's encoding: {checks}." if checks else ""))
    packed = (f" trl_bfd packed the whole dataset into {info['packed_rows']} rows before training, "
              f"{info['packed_fill']:.1%} full." if "packed_rows" in info else "")
    L.append(f"Per step: posttrain and trl_bfd one packed row of <= {a.budget} tokens; trl_group_by_length "
             f"{info['batch']} samples padded to the longest (B = {len(info['lens'])} samples / {a.steps} steps).{packed} "
             f"Medians of {reps} interleaved repeat(s); {a.steps - a.warmup} timed steps after {a.warmup} warm-up.")
    L.append("")
    L.append("| mode | real tokens/s | step | real tokens / step (of the budget) | padded slots / real | attention scores / "
             f"real token | peak RSS | loss step 1 | final loss (mean of last {min(TAIL, a.steps)} steps) |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for k, m in med.items():
        L.append(f"| {k} | {m['tok_s']:,.0f} | {m['step_ms']:.0f} ms | {m['real_step']:,.0f} ({m['real_step'] / a.budget:.0%}) "
                 f"| {m['waste']:.2f}x | {m['pairs_tok']:,.0f} | {m['rss']:.2f} GiB | {m['loss1']:.4f} | {m['loss_end']:.4f} |")
    ours = [k for k in med if MODES[k]["side"] == "posttrain"]
    if ours and trl_modes:
        L.append("")
        L.append("| ratio | real tokens/s | bound from padding (TRL slots/real over posttrain's) | share of that bound "
                 "| attention scores per real token (TRL / posttrain) | peak RSS |")
        L.append("|---|---|---|---|---|---|")
        for o in ours:
            p = med[o]
            for t in trl_modes:
                ratio, bound = p["tok_s"] / med[t]["tok_s"], med[t]["waste"] / p["waste"]
                L.append(f"| {o} / {t}{' (fastest TRL)' if t == fastest else ''} | {ratio:.2f}x | {bound:.2f}x | "
                         f"{ratio / bound:.0%} | {med[t]['pairs_tok'] / p['pairs_tok']:.2f}x | {p['rss'] / med[t]['rss']:.2f} |")
    first = [x["loss1"] for v in results.values() for x in v]
    L.append("")
    L.append(f"Step-1 loss of every run {min(first):.4f}-{max(first):.4f} (the same initial weights; ln vocab = "
             f"{math.log(info['vocab']):.4f}; the sides' first batches may differ).")
    L.append("Work done, first repeat (tokens and loss targets over all steps; every side one pass, in its own order): "
             + ", ".join(f"{k} {v[0]['tokens_all']:,} tokens / {v[0]['targets_all']:,} targets" for k, v in results.items())
             + ".")
    return L


def header(a, params: int, vocab: int, versions: dict, trl_info: dict) -> list[str]:
    return [
        f"SFT, tiny Qwen3 ({params / 1e6:.1f}M params, vocab {vocab}), fp32, full fine-tuning, {a.threads} CPU threads "
        f"per run; one micro-batch of ~{a.budget} real tokens per optimizer step, {a.steps} steps ({a.steps - a.warmup} "
        f"timed after {a.warmup} warm-up), AdamW lr {a.lr} constant, clip 1.0; loss = token mean over assistant "
        "answers + <|im_end|> (both sides).",
        f"Versions: posttrain venv torch {versions['posttrain']['torch']}, transformers "
        f"{versions['posttrain']['transformers']}; TRL venv "
        + (", ".join(f"{k} {v}" for k, v in versions.get("trl", {}).items()) or "(not run)")
        + (f"; TRL optimizer {trl_info['optim']}, attention {trl_info['attn']}" if trl_info else "") + ".",
        "",
    ]


FOOTER = """What bounds each ratio:
- padding: compute follows slots, so TRL's padded slots per real token over posttrain's is the most that
  packing alone can give (trl_group_by_length: its padding inside length-grouped batches; trl_bfd: ~1.00x,
  it packs too, so the gap to BFD is not padding).
- attention: SDPA computes every score of its mask. posttrain attends per document (the sum of squared
  document lengths); TRL's padding-free BFD row gets a block-diagonal mask over the whole row (row length
  squared), a padded batch rows x width squared. On this 3.5M model with 256 hidden and rows of ~1.7k
  tokens the score work is of the order of the linear layers' (4 x 256 x row vs ~2 x 0.8M FLOPs
  per token and layer), so this column is the second lever; its ratio limits the gain on the attention
  share of a step only (not measured here), and causal halving inside the kernels is not modelled.
- loss targets: both sides score the same tokens (checked above: TRL with `assistant_only_loss` and the
  generation-marked template trains on each answer and its <|im_end|>, not the newline after it; TRL's
  default for a `messages` dataset would train on every token); the head runs on target tokens only on
  both sides (posttrain's chunked head, TRL's fused_lm_head).
- final losses: the same data, lr and steps on every side, in a different order (posttrain's shuffled
  buffer, BFD's shuffled packed rows, length-grouped batches), so they agree within the noise of the last
  batches, and step 1 starts at ~ln(vocab) on every run (the same initial weights)."""


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_args(ap, MODES, "vs_trl.md", steps=24, warmup=4, quick=(3, 1, 1))
    ap.add_argument("--data", default="skewed,uniform", help="comma-separated datasets: " + ", ".join(DATASETS))
    ap.add_argument("--budget", type=int, default=1664, help="real tokens per optimizer step (a packed row's length)")
    ap.add_argument("--max-len", type=int, default=1600, help="longest sample (posttrain max_seq_len, TRL padded max_length)")
    ap.add_argument("--lr", type=float, default=1e-3)
    a = parse_run_args(ap)
    modes = selected_modes(a.modes, MODES, TRL_PY)
    sets = [d.strip() for d in a.data.split(",") if d.strip()]
    if not sets or any(d not in DATASETS for d in sets):
        sys.exit(f"--data: choose from {list(DATASETS)}")
    if a.max_len > a.budget:
        sys.exit("--max-len must be <= --budget (a sample must fit one packed row on both sides)")
    if not (MODEL / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "build_tiny_model.py"), str(MODEL)], check=True)
    env = child_env(a.threads)
    import torch
    import transformers

    from posttrain.config import ModelConfig
    from posttrain.data.tokenizer import load_tokenizer
    from posttrain.tiny import CHATML_GENERATION_TEMPLATE, CHATML_TEMPLATE

    tok = load_tokenizer(ModelConfig(path=str(MODEL)))
    if tok.chat_template != CHATML_TEMPLATE:
        sys.exit(f"{MODEL}: not the demo's ChatML template; TRL's generation-marked copy would not match it")
    versions = {"posttrain": {"torch": torch.__version__, "transformers": transformers.__version__}}
    trl_info: dict = {}
    text = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vs_trl_") as tmp:
        tmp = Path(tmp)
        template = tmp / "chatml_generation.jinja"
        template.write_text(CHATML_GENERATION_TEMPLATE)
        for ds in sets:
            data = tmp / f"{ds}.jsonl"
            info = make_chats(data, tok, tokens=a.steps * a.budget, max_len=a.max_len, seed=1, **DATASETS[ds])
            info["batch"] = batch = max(1, round(len(info["lens"]) / a.steps))
            info["vocab"] = json.loads((MODEL / "config.json").read_text())["vocab_size"]
            info["checks"] = {}
            lens = info["lens"]
            doc_pairs = sum(n * n for n in lens) / sum(lens)
            print(f"{ds}: {length_stats(lens)} -> {data}; trl_group_by_length {batch} samples per step", flush=True)
            results: dict[str, list[dict]] = {m: [] for m in modes}
            for rep in range(a.repeats):
                for name in rotation(modes, rep):
                    t0 = time.perf_counter()
                    run_dir = tmp / ds / f"r{rep}"
                    run_dir.mkdir(parents=True, exist_ok=True)
                    if MODES[name]["side"] == "posttrain":
                        r = run_posttrain(run_dir, name, data, a, env)
                    else:
                        r = run_trl(run_dir, name, data, template, batch, a, env)
                        info["checks"][name] = check_same_data(name, r, info)
                        if "packed_rows" in r:
                            info["packed_rows"], info["packed_fill"] = r["packed_rows"], r["packed_fill"]
                        versions["trl"] = r["versions"]
                        trl_info = {"optim": r["optim"], "attn": r["attn_implementation"]}
                    s = summarize(r, a.warmup, doc_pairs)
                    results[name].append(s)
                    print(f"  {ds} repeat {rep + 1}/{a.repeats} {name:<20} {s['tok_s']:>7,.0f} real tok/s  step "
                          f"{s['step_ms']:>5.0f} ms  {s['real_step']:>5,.0f} real tok/step  slots/real {s['waste']:.2f}  "
                          f"RSS {s['rss']:.2f} GiB  loss {s['loss1']:.4f} -> {s['loss_end']:.4f}  "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)
            text += report(a, ds, info, results) + [""]
    text = "\n".join(header(a, model_params(MODEL), info["vocab"], versions, trl_info) + text + [FOOTER])
    print("\n" + text)
    write_markdown(a.markdown, "benchmarks/vs_trl.py", text, time.perf_counter() - t_all)


if __name__ == "__main__":
    main()
