"""posttrain's DPO side by side with Hugging Face TRL's DPOTrainer: tokens/s, peak memory, losses.

Both sides train the demo's tiny Qwen3 (examples/build_tiny_model.py; 3.5M parameters, fp32, full
fine-tuning) with the sigmoid DPO loss (beta 0.1), the same AdamW (constant lr, clip 1.0), the same
number of pairs per optimizer step and the same steps, on one generated pair dataset written once as
JSONL: real demo chat prompts (the conversation up to its last answer), chosen = the real answer,
rejected = a wrong one, each followed by a lognormal number of further demo sentences (length skew).
Pairs are consumed in file order on both sides (posttrain: `shuffle: false`; TRL: the `sequential`
sampler), so the two take the same pairs in every step and their losses must agree: ln 2 = 0.6931
at step 1 (policy = reference), and close afterwards.

Modes (each run its own process; modes interleaved across repeats: A B C D E, B C D E A, ...):
- posttrain, the frozen reference live, and with `dpo.precompute_reference: true` (also with
  `data.share_prefix: false`: each side computes the prompt again, as TRL does);
- TRL, live reference and `precompute_ref_log_probs=True`, both with the sequential sampler (the
  same pairs per step as posttrain), and `precompute_ref_log_probs` + `group_by_length` (TRL's
  answer to padding: batches of similar length; the same pairs in all, grouped differently).

TRL runs in its own venv (TRL 1.16 needs transformers >= 5.2x; posttrain pins < 5.20): run
`bash benchmarks/setup_trl_venv.sh` once. Tokens/s counts real (non-pad) tokens of the timed steps
(after `--warmup` steps; startup and the reference precompute pass excluded, the pass reported on its
own): the tokens of both sides, prompt included, as TRL counts them, also where posttrain computes a
pair's prompt once (`data.share_prefix`: its computed slots per real token are then below 1); peak memory is the peak RSS of each run's process (os.wait4).

    bash benchmarks/setup_trl_venv.sh                    # once (~2 minutes)
    .venv/bin/python benchmarks/dpo_vs_trl.py            # ~8 minutes on 2 idle CPU cores (estimate; 15 runs)
    .venv/bin/python benchmarks/dpo_vs_trl.py --quick    # smoke: 4 steps, 1 repeat (~2-3 minutes)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
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
RUNNER = ROOT / "benchmarks" / "trl_dpo_runner.py"

MODES = {
    "posttrain": dict(side="posttrain", precompute=False),
    "posttrain - no prefix sharing": dict(side="posttrain", precompute=False, share=False),
    "posttrain precomputed ref": dict(side="posttrain", precompute=True),
    "posttrain precomputed ref - no prefix sharing": dict(side="posttrain", precompute=True, share=False),
    "TRL": dict(side="trl", precompute=False, sampling="sequential"),
    "TRL precomputed ref": dict(side="trl", precompute=True, sampling="sequential"),
    "TRL precomputed ref + group_by_length": dict(side="trl", precompute=True, sampling="group_by_length"),
}


# ------------------------------------------------------------------------------------------ data
def make_pairs(path: Path, n: int, *, median: float, sigma: float, max_len: int, seed: int) -> dict:
    """n preference pairs as TRL's conversational explicit-prompt records; every side's token count
    (posttrain's rendering) kept <= max_len so that neither side truncates. Returns length stats."""
    from posttrain.config import ModelConfig
    from posttrain.data.pairs import encode_pair
    from posttrain.data.tokenizer import load_tokenizer

    tok = load_tokenizer(ModelConfig(path=str(MODEL)))
    rng = random.Random(seed)
    convs = [json.loads(ln)["messages"] for ln in DEMO.read_text().splitlines()]
    sentences = sorted({m["content"] for c in convs for m in c if m["role"] == "assistant"})
    recs, sides = [], []
    while len(recs) < n:
        m = rng.choice(convs)
        prompt, answer = m[:-1], m[-1]["content"]
        wrong = answer[:-1] + rng.choice([" maybe.", "!", " or not."])

        def more(text: str) -> str:  # the answer, then a lognormal number of further demo sentences
            return " ".join([text] + rng.choices(sentences, k=int(rng.lognormvariate(0, sigma) * median)))

        rec = {"prompt": prompt, "chosen": [{"role": "assistant", "content": more(answer)}],
               "rejected": [{"role": "assistant", "content": more(wrong)}]}
        lens = encode_pair(tok, rec, f"pair {len(recs)}").docs
        if max(lens) <= max_len:
            recs.append(rec)
            sides += lens
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    pair_tokens = [a + b for a, b in zip(sides[0::2], sides[1::2])]
    return {"sides": sides, "pair_tokens": pair_tokens, "vocab": len(tok)}


# ------------------------------------------------------------------------------------------ runs
def run_posttrain(tmp: Path, name: str, data: Path, a, budget: int, env: dict, pair_tokens: list[int]) -> dict:
    out = tmp / name
    job = {
        "recipe": "dpo",
        "model": {"path": str(MODEL), "dtype": "float32"},
        # buffer_size = pairs per step and a budget that fits any P consecutive pairs: every micro-batch is
        # exactly the next P pairs of the file (one packed row, the unused tail one padding segment)
        "data": {"sources": [{"path": str(data)}], "max_seq_len": a.max_len, "max_tokens_per_batch": budget,
                 "buffer_size": a.pairs, "shuffle": False, "share_prefix": MODES[name].get("share", True)},
        "train": {"steps": a.steps, "lr": a.lr, "schedule": "constant", "warmup_steps": 0, "grad_accum": 1,
                  "max_grad_norm": 1.0, "weight_decay": 0.0, "seed": 0, "log_every": a.steps},
        "compute": {"device": "cpu", "threads": a.threads, "output_dir": str(out), "progress": False,
                    "checkpoint_every": None, "checkpoint_every_minutes": None,  # TRL: save_strategy "no"
                    "peak_flops": 1.0e11},  # a fixed MFU peak: skips the matmul calibration at startup
        "export": {"enabled": False},
        "dpo": {"beta": a.beta, "loss": "sigmoid", "reference": "copy", "precompute_reference": MODES[name]["precompute"]},
    }
    job_file = tmp / f"{name.replace(' ', '_')}.yaml"
    job_file.write_text(yaml.safe_dump(job, sort_keys=False))
    log = tmp / f"{name.replace(' ', '_')}.log"
    rc, rss, wall = run_process([sys.executable, "-m", "posttrain.cli", "run", str(job_file), "--overwrite"], log, env)
    if rc != 0:
        raise RuntimeError(f"posttrain run {name!r} failed (exit {rc}):\n{log.read_text()[-3000:]}")
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    computed = [round(r["tokens_per_s"] * r["step_time_s"]) for r in rows]  # shared prompts counted once
    # step i trains pairs [i P, (i + 1) P) of the file; real = both sides' tokens, as TRL counts them
    real = [sum(pair_tokens[i * a.pairs : (i + 1) * a.pairs]) for i in range(len(rows))]
    if any(c > r for c, r in zip(computed, real)):
        raise RuntimeError(f"posttrain run {name!r}: computed more tokens than its pairs hold ({computed} vs {real})")
    m = re.search(r"units precomputed in ([0-9.]+) s", log.read_text())
    return {
        "loss": [r["loss"] for r in rows], "real": real,
        "slots": [round(n / (1 - r["padding"])) for n, r in zip(computed, rows)],
        "end": [r["time"] for r in rows], "precompute_s": float(m.group(1)) if m else 0.0, "rss": rss, "wall": wall,
    }


def run_trl(tmp: Path, name: str, data: Path, a, env: dict) -> dict:
    mode = MODES[name]
    stem = name.replace(" ", "_").replace("+", "")
    out = tmp / stem
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(TRL_PY), str(RUNNER), "--model", str(MODEL), "--data", str(data), "--out", str(out / "result.json"),
           "--steps", str(a.steps), "--pairs", str(a.pairs), "--lr", str(a.lr), "--beta", str(a.beta),
           "--max-length", str(a.max_len), "--threads", str(a.threads), "--sampling", mode["sampling"]]
    if mode["precompute"]:
        cmd.append("--precompute")
    env = {**env, "HF_DATASETS_CACHE": str(out / "hf-datasets")}  # fresh: TRL caches precomputed ref log-probs
    log = tmp / f"{stem}.log"
    rc, rss, wall = run_process(cmd, log, env)
    if rc != 0:
        raise RuntimeError(f"TRL run {name!r} failed (exit {rc}):\n{log.read_text()[-3000:]}")
    r = json.loads((out / "result.json").read_text())
    if len(r["loss"]) != a.steps or len(r["step_end"]) != a.steps:
        raise RuntimeError(f"TRL run {name!r}: {len(r['loss'])} losses, {len(r['step_end'])} steps, expected {a.steps}")
    if r["threads_at_train"] != a.threads:
        raise RuntimeError(f"TRL run {name!r}: torch threads {r['threads_at_train']} during training, expected {a.threads}")
    return {"loss": r["loss"], "real": r["real"], "slots": r["slots"], "end": r["step_end"],
            "precompute_s": r["precompute_s"], "rss": rss, "wall": wall, "versions": r["versions"], "optim": r["optim"],
            "attn": r["attn_implementation"]}


def summarize(r: dict, warmup: int, pairs: int) -> dict:
    """Throughput over the steps after `warmup`: from the end of step `warmup` to the end of the last."""
    window = r["end"][-1] - r["end"][warmup - 1]
    timed = len(r["end"]) - warmup
    real, slots = sum(r["real"][warmup:]), sum(r["slots"][warmup:])
    return {"tok_s": real / window, "pairs_s": timed * pairs / window, "step_ms": 1e3 * window / timed,
            "waste": slots / real, "precompute_s": r["precompute_s"], "rss": r["rss"], "wall": r["wall"],
            "loss1": r["loss"][0], "loss_end": r["loss"][-1], "losses": r["loss"], "real_all": r["real"]}


# ------------------------------------------------------------------------------------------ report
def report(a, stats: dict, results: dict[str, list[dict]], versions: dict, trl_info: dict) -> str:
    med = medians(results, ("tok_s", "pairs_s", "step_ms", "waste", "precompute_s", "rss", "loss1", "loss_end"))
    trl_modes = [k for k in results if MODES[k]["side"] == "trl"]
    pt_modes = [k for k in results if MODES[k]["side"] == "posttrain"]
    fastest = max(trl_modes, key=lambda k: med[k]["tok_s"]) if trl_modes else None
    reps = len(next(iter(results.values())))
    sides, pt = stats["sides"], stats["pair_tokens"]
    q = statistics.quantiles(sides, n=20)
    L = []
    L.append(f"DPO (sigmoid, beta {a.beta}), tiny Qwen3 ({stats['params'] / 1e6:.1f}M params, vocab {stats['vocab']}), "
             "fp32, full fine-tuning, "
             f"{a.threads} CPU threads per run; {a.pairs} pairs per optimizer step, {a.steps} steps "
             f"({a.steps - a.warmup} timed after {a.warmup} warm-up), lr {a.lr} constant; medians of {reps} "
             f"interleaved repeat(s).")
    L.append(f"Pairs: {len(pt)} demo chat prompts with lognormal completions; tokens per side: median "
             f"{statistics.median(sides):.0f}, p95 {q[18]:.0f}, max {max(sides)} (max length {a.max_len}, none "
             f"truncated); tokens per pair: mean {statistics.mean(pt):.0f}. posttrain: one packed row of "
             f"{stats['budget']} tokens per step (fits any {a.pairs} consecutive pairs).")
    L.append(f"Versions: posttrain venv torch {versions['posttrain']['torch']}, transformers "
             f"{versions['posttrain']['transformers']}; TRL venv " +
             (", ".join(f"{k} {v}" for k, v in versions.get("trl", {}).items()) or "(not run)") +
             (f"; TRL optimizer {trl_info['optim']}, attention {trl_info['attn']}" if trl_info else "") + ".")
    L.append("")
    L.append("| mode | tokens/s | pairs/s | step | computed slots / real | ref precompute | peak RSS | loss step 1 | final loss |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for k, m in med.items():
        pre = f"{m['precompute_s']:.1f} s" if MODES[k]["precompute"] else "-"
        L.append(f"| {k} | {m['tok_s']:,.0f} | {m['pairs_s']:.1f} | {m['step_ms']:.0f} ms | {m['waste']:.2f}x | "
                 f"{pre} | {m['rss']:.2f} GiB | "
                 f"{m['loss1']:.4f} | {m['loss_end']:.4f} |")
    if fastest and pt_modes:
        L.append("")
        L.append(f"Ratios posttrain / TRL fastest ({fastest}); the bound is TRL's padded slots per real token over "
                 "posttrain's (compute follows slots), with the reference cost of the two modes folded in:")
        L.append("")
        L.append("| posttrain mode | vs | tokens/s ratio | bound (slots) | share of bound | peak RSS ratio | ref precompute ratio |")
        L.append("|---|---|---|---|---|---|---|")
        pairs_of = [(p, fastest) for p in pt_modes]
        for p in pt_modes:  # like for like: the same reference mode and the same pairs per step
            like = next((t for t in trl_modes if MODES[t]["precompute"] == MODES[p]["precompute"]
                         and MODES[t]["sampling"] == "sequential"), None)
            if like and like != fastest:
                pairs_of.append((p, like))
        for p, t in pairs_of:
            ratio, bound = med[p]["tok_s"] / med[t]["tok_s"], med[t]["waste"] / med[p]["waste"]
            ref = "-"
            if MODES[p]["precompute"] and MODES[t]["precompute"] and med[p]["precompute_s"] > 0:
                ref = f"{med[p]['precompute_s'] / med[t]['precompute_s']:.2f}"
            if MODES[p]["precompute"] != MODES[t]["precompute"]:
                bound *= 4 / 3 if MODES[p]["precompute"] else 3 / 4  # a live reference adds ~1 forward to fwd+bwd (3)
            L.append(f"| {p} | {t} | {ratio:.2f}x | {bound:.2f}x | {ratio / bound:.0%} | {med[p]['rss'] / med[t]['rss']:.2f} | {ref} |")
    # the two sides did the same work: equal first loss, close trajectories on the same pairs
    L.append("")
    ok = True
    for k, v in results.items():
        bad = [x["loss1"] for x in v if abs(x["loss1"] - math.log(2)) > 5e-4]
        if bad:
            ok = False
            L.append(f"CHECK FAILED: {k}: step-1 loss {bad[0]:.6f} != ln 2")
    if ok:
        L.append(f"Step-1 loss = ln 2 = {math.log(2):.4f} in every run (policy = reference).")
    seq = [k for k in results if MODES[k].get("sampling", "sequential") == "sequential"]
    if len(seq) > 1:
        curves = {k: results[k][0]["losses"] for k in seq}
        base = curves[seq[0]]
        diffs = ", ".join(f"{k} {max(abs(x - y) for x, y in zip(base, c)):.4f}" for k, c in curves.items() if k != seq[0])
        L.append(f"Same pairs in the same steps, max |loss - {seq[0]}'s| over the {a.steps} steps: {diffs} (TRL also scores the newline after <|im_end|>; "
                 "posttrain scores content + <|im_end|> only).")
    L.append("")
    L.append("Loss per step (first repeat):")
    L.append("")
    L.append("| mode | " + " | ".join(str(i + 1) for i in range(a.steps)) + " |")
    L.append("|---|" + "---|" * a.steps)
    for k, v in results.items():
        L.append(f"| {k} | " + " | ".join(f"{x:.4f}" for x in v[0]["losses"]) + " |")
    L.append("")
    L.append("What bounds the ratio:")
    L.append("- pair packing without padding: TRL 1.16's DPO collator pads chosen and rejected rows to the longest "
             "sequence of the batch (its `padding_free` is disabled for DPO since the refactor: it warns and pads); "
             "posttrain packs the pairs of a step into one row with per-document attention. The slot ratio above is "
             "the most this can give; `group_by_length` shrinks TRL's padding (and that bound).")
    L.append("- shared prompts (`data.share_prefix`, on by default): posttrain computes a pair's prompt once, the "
             "rejected side attending to the chosen side's prompt; TRL computes it on both rows. Its computed slots per "
             "real token fall below 1 by the prompt's share of the pair; the `no prefix sharing` mode shows the rest.")
    L.append("- precomputed reference log-probs: both sides have them; they remove the reference forward (~1/4 of "
             "a live step: one forward beside the policy's forward + backward) and, in TRL, the reference model's "
             "memory. Compare like with like for the engine; the pass itself is reported separately.")
    L.append("- chunked head: both sides compute log-probs without full logits (posttrain's chunked head, TRL's "
             f"`fused_lm_head`); at vocab {stats['vocab']} the head is a negligible share of the work here, so it bounds nothing "
             "in this setting (it matters at 150k vocab: docs/performance.md, loss memory).")
    L.append("- pairs per step held fixed: posttrain normally fills each row to a token budget (the pair count "
             "per step varies); here its row is sized to the largest step, so the rows of smaller steps end in a "
             "padding segment (posttrain's slots / real above). With a token budget instead its rows are ~100% "
             "full and the bound grows by that factor.")
    L.append("- peak RSS on a 3.5M-parameter model is mostly the libraries each process imports (torch, "
             "transformers, TRL's datasets/accelerate), not training state.")
    return "\n".join(L)


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_args(ap, MODES, "dpo_vs_trl.md", steps=12, warmup=2, quick=(4, 1, 1))
    ap.add_argument("--pairs", type=int, default=12, help="pairs per optimizer step, both sides")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-len", type=int, default=512, help="longest side (posttrain data.max_seq_len, TRL max_length)")
    ap.add_argument("--median", type=float, default=6, help="median number of extra sentences per completion")
    ap.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of that number (the length skew)")
    a = parse_run_args(ap)
    modes = selected_modes(a.modes, MODES, TRL_PY)
    if not (MODEL / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "build_tiny_model.py"), str(MODEL)], check=True)
    env = child_env(a.threads)
    import torch
    import transformers

    versions = {"posttrain": {"torch": torch.__version__, "transformers": transformers.__version__}}
    results: dict[str, list[dict]] = {m: [] for m in modes}
    trl_info: dict = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dpo_vs_trl_") as tmp:
        tmp = Path(tmp)
        data = tmp / "pairs.jsonl"
        stats = make_pairs(data, a.steps * a.pairs, median=a.median, sigma=a.sigma, max_len=a.max_len, seed=1)
        stats["params"] = model_params(MODEL)
        pt = stats["pair_tokens"]
        groups = [sum(pt[i:i + a.pairs]) for i in range(0, len(pt), a.pairs)]
        stats["budget"] = budget = -(-max(max(groups), 2 * a.max_len) // 64) * 64
        print(f"{len(pt)} pairs -> {data}; posttrain row budget {budget} tokens "
              f"(step totals {min(groups)}-{max(groups)}, mean {statistics.mean(groups):.0f})", flush=True)
        for rep in range(a.repeats):
            for name in rotation(modes, rep):
                t0 = time.perf_counter()
                run_dir = tmp / f"r{rep}"
                run_dir.mkdir(exist_ok=True)
                if MODES[name]["side"] == "posttrain":
                    r = run_posttrain(run_dir, name, data, a, budget, env, pt)
                else:
                    r = run_trl(run_dir, name, data, a, env)
                    versions["trl"] = r["versions"]
                    trl_info = {"optim": r["optim"], "attn": r["attn"]}
                s = summarize(r, a.warmup, a.pairs)
                results[name].append(s)
                print(f"  repeat {rep + 1}/{a.repeats} {name:<40} {s['tok_s']:>8,.0f} tok/s  step {s['step_ms']:>5.0f} ms  "
                      f"slots/real {s['waste']:.2f}  precompute {s['precompute_s']:.1f} s  RSS {s['rss']:.2f} GiB  "
                      f"loss {s['loss1']:.4f} -> {s['loss_end']:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    text = report(a, stats, results, versions, trl_info)
    print("\n" + text)
    write_markdown(a.markdown, "benchmarks/dpo_vs_trl.py", text, time.perf_counter() - t_all)
    if any(abs(x["loss1"] - math.log(2)) > 5e-4 for v in results.values() for x in v):
        sys.exit("step-1 loss differs from ln 2 in some run (see CHECK FAILED above)")


if __name__ == "__main__":
    main()
