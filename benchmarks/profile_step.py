"""Where a training step's time goes: the SFT demo model on packed, length-skewed chat data.

Runs the real SFT recipe (engine, loader, packing, per-document attention, chunked loss) in this
process under `torch.profiler` for `--steps` steps after `--warmup` steps, and prints two tables:

1. Phases of the step (wall time, from ranges this script opens around the engine's calls): data
   wait, forward split into attention / MLP / the rest of the decoder (embeddings, norms, rotary)
   / head + loss, backward, optimizer (clip, AdamW, schedule, zero_grad), collectives, and "other"
   (the step's remaining wall time: Python, metrics, logging, allocator).
2. Self CPU time by kind of op over the profiled steps: matrix multiplies, attention kernels,
   elementwise, index/gather/scatter, copies and allocation, optimizer (foreach or fused) ops, the rest.

The ranges are added by wrapping the engine's methods and module hooks from outside, here, so the
library carries no profiling code; torch.profiler's own overhead inflates "other" a little.

    .venv/bin/python benchmarks/profile_step.py                  # ~1 minute on 2 idle cores
    .venv/bin/python benchmarks/profile_step.py --trace t.json   # also a Chrome trace
    .venv/bin/python benchmarks/profile_step.py --top 30         # also the 30 ops of most self CPU time
    .venv/bin/python benchmarks/profile_step.py --compile        # with compute.compile (warm-up compiles)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's posttrain

from posttrain.config import JobConfig  # noqa: E402
from posttrain.recipes import sft  # noqa: E402
from posttrain.workflow import engine as engine_mod  # noqa: E402

MODEL = ROOT / "examples" / ".cache" / "tiny-qwen3"
DEMO = ROOT / "examples" / "data" / "demo_chat.jsonl"


def skewed_chats(path: Path, n: int, *, median: float, sigma: float, seed: int) -> Path:
    """Conversations made of a lognormal number of demo conversations' turns (median `median`
    conversations, sigma `sigma`): lengths from ~20 to ~1,500 tokens."""
    rng = random.Random(seed)
    convs = [json.loads(line)["messages"] for line in DEMO.read_text().splitlines()]
    with open(path, "w") as f:
        for _ in range(n):
            k = max(1, min(60, round(math.exp(rng.gauss(math.log(median), sigma)))))
            msgs = [m for c in rng.sample(convs, k) for m in c if m["role"] != "system"]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


PHASES = ["data wait", "forward: attention", "forward: MLP", "forward: rest of decoder", "forward: head + loss",
          "backward", "optimizer", "collectives"]
OPS = [
    ("matrix multiplies", r"^aten::(mm|addmm|bmm|matmul|linear|_addmm_activation)$"),
    ("attention kernels", r"scaled_dot_product|flash_attention|_efficient_attention"),
    ("optimizer (foreach or fused)", r"^aten::_foreach_|^aten::_fused_adam"),
    ("index / gather / scatter", r"^aten::(index|index_select|gather|scatter|scatter_add_|index_put_|index_add_|_index_put_impl_|"
                                 r"masked_select|masked_fill_?|nonzero|where|take|embedding.*|repeat_interleave)$"),
    ("copies / allocation", r"^aten::(copy_|to|_to_copy|contiguous|clone|empty|empty_strided|zeros|zeros_like|ones|full|fill_|"
                            r"zero_|cat|stack|resize_|new_zeros|new_empty|ones_like|empty_like|full_like)$"),
    ("elementwise / reductions", r"^aten::(mul|add|sub|div|neg|pow|rsqrt|sqrt|exp|log|silu|sigmoid|tanh|mean|sum|softmax|"
                                 r"_softmax|log_softmax|_log_softmax|max|amax|logsumexp|mul_|add_|div_|sub_|addcmul_|"
                                 r"addcdiv_|lerp_|clamp|clamp_|cos|sin|abs|norm|linalg_vector_norm|silu_backward|"
                                 r"_log_softmax_backward_data|_softmax_backward_data|sigmoid_backward|threshold_backward|"
                                 r"nll_loss.*|cross_entropy.*|ne|eq|gt|lt|ge|le|any|all|square|reciprocal)$"),
]


def instrument() -> None:
    """Open a named range around each engine call and decoder sub-module (wrapping from outside)."""
    step_cls, eng_cls = engine_mod.Step, engine_mod.Engine
    fwd, bwd, upd = eng_cls.forward, step_cls.backward, step_cls.update

    def forward(self, fn, batch, *a, **k):
        with record_function("forward"):
            return fwd(self, fn, batch, *a, **k)

    def backward(self, loss, **m):
        with record_function("backward"):
            return bwd(self, loss, **m)

    def update(self):
        with record_function("optimizer"):
            return upd(self)

    eng_cls.forward, step_cls.backward, step_cls.update = forward, backward, update
    reduce = engine_mod.all_reduce

    def all_reduce(*a, **k):
        with record_function("collectives"):
            return reduce(*a, **k)

    engine_mod.all_reduce = all_reduce


def hook_modules(model: torch.nn.Module) -> None:
    for name, mod in model.named_modules():
        label = ("attention" if name.endswith("self_attn") else "MLP" if name.endswith(".mlp")
                 else "decoder" if name.endswith("model") and hasattr(mod, "layers") else None)
        if label is None:
            continue

        def pre(m, args, kwargs=None, label=label):
            m._pt_range = record_function(f"module: {label}")
            m._pt_range.__enter__()

        def post(m, args, out, label=label):
            m._pt_range.__exit__(None, None, None)

        mod.register_forward_pre_hook(pre)
        mod.register_forward_hook(post)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--warmup", type=int, default=5, help="steps before the profiled ones (>= 1)")
    ap.add_argument("--steps", type=int, default=20, help="profiled steps")
    ap.add_argument("--budget", type=int, default=1664, help="tokens per packed micro-batch")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--trace", help="also write a Chrome trace here")
    ap.add_argument("--data", help="a chat JSONL file to profile on instead of the generated skewed chats")
    ap.add_argument("--compile", action="store_true", help="compute.compile: true (the warm-up steps compile)")
    ap.add_argument("--top", type=int, default=0, help="also list the N ops of most self CPU time")
    a = ap.parse_args()
    if not (MODEL / "config.json").exists():
        sys.exit(f"{MODEL} missing: run `make demo` (or examples/build_tiny_model.py) first")
    tmp = Path(tempfile.mkdtemp(prefix="profile-step-"))
    data = Path(a.data) if a.data else skewed_chats(tmp / "skewed.jsonl", 3000, median=3, sigma=1.0, seed=0)
    total = a.warmup + a.steps
    cfg = JobConfig.model_validate({
        "recipe": "sft", "model": {"path": str(MODEL), "dtype": "float32"},
        "data": {"sources": [{"path": str(data)}], "max_seq_len": a.budget, "max_tokens_per_batch": a.budget},
        "train": {"lr": 1e-3, "steps": total, "warmup_steps": 2, "log_every": 1000},
        "compute": {"device": "cpu", "output_dir": str(tmp / "run"), "progress": False, "threads": a.threads, "compile": a.compile,
                    "checkpoint_every": None, "checkpoint_every_minutes": None},  # a step, not a save
        "export": {"enabled": False},
    })
    instrument()
    steps_done = {"n": 0, "t": []}
    prof = profile(activities=[ProfilerActivity.CPU], schedule=torch.profiler.schedule(wait=a.warmup - 1, warmup=1, active=a.steps),
                   record_shapes=False)
    upd = engine_mod.Step.update

    def update_and_tick(self):
        upd(self)
        steps_done["n"] += 1
        steps_done["t"].append(time.perf_counter())
        prof.step()

    engine_mod.Step.update = update_and_tick
    setup = engine_mod.Engine.__init__

    def init(self, *args, **kw):
        setup(self, *args, **kw)
        hook_modules(self.model)

    engine_mod.Engine.__init__ = init
    loader_next = engine_mod.DataLoader.__next__

    def next_batch(self):
        with record_function("data wait"):
            return loader_next(self)

    engine_mod.DataLoader.__next__ = next_batch
    (tmp / "run").mkdir()
    with prof:
        sft.run(cfg, tmp / "run")
    times = steps_done["t"]
    wall = (times[a.warmup + a.steps - 1] - times[a.warmup - 1]) if len(times) >= total else float("nan")
    events = prof.events()
    by_name: dict[str, float] = defaultdict(float)
    for e in events:
        if e.name in ("forward", "backward", "optimizer", "collectives", "data wait") or e.name.startswith("module: "):
            by_name[e.name] += e.cpu_time_total / 1e6
    decoder = by_name["module: decoder"]
    phases = {
        "data wait": by_name["data wait"],
        "forward: attention": by_name["module: attention"],
        "forward: MLP": by_name["module: MLP"],
        "forward: rest of decoder": decoder - by_name["module: attention"] - by_name["module: MLP"],
        "forward: head + loss": by_name["forward"] - decoder,
        "backward": by_name["backward"],
        "optimizer": by_name["optimizer"],
        "collectives": by_name["collectives"],
    }
    phases["other (Python, metrics, logging)"] = wall - sum(phases.values())
    print(f"\nprofile of {a.steps} SFT steps (after {a.warmup} warm-up steps), demo model, packed {a.data or 'skewed chats'}, "
          f"{a.budget}-token micro-batches, {torch.get_num_threads()} threads: {wall / a.steps * 1e3:.1f} ms/step\n")
    print("| phase | ms/step | share |\n|---|---:|---:|")
    for k, v in phases.items():
        print(f"| {k} | {v / a.steps * 1e3:.1f} | {100 * v / wall:.1f}% |")
    ops: dict[str, float] = defaultdict(float)
    self_total = 0.0
    for avg in prof.key_averages():
        t = avg.self_cpu_time_total / 1e6
        if avg.key in ("forward", "backward", "optimizer", "collectives", "data wait") or avg.key.startswith(("module: ", "ProfilerStep")):
            continue
        self_total += t
        kind = next((k for k, rx in OPS if re.search(rx, avg.key)), "rest")
        ops[kind] += t
    top_rest = sorted(((avg.self_cpu_time_total / 1e6, avg.key) for avg in prof.key_averages()
                       if not any(re.search(rx, avg.key) for _, rx in OPS)
                       and not avg.key.startswith(("module: ", "ProfilerStep"))
                       and avg.key not in ("forward", "backward", "optimizer", "collectives", "data wait")), reverse=True)[:8]
    print("\n| ops (self CPU time) | ms/step | share |\n|---|---:|---:|")
    for k, _ in [*OPS, ("rest", "")]:
        print(f"| {k} | {ops[k] / a.steps * 1e3:.1f} | {100 * ops[k] / max(self_total, 1e-9):.1f}% |")
    print("\nlargest ops in 'rest': " + ", ".join(f"{k} {t / a.steps * 1e3:.1f} ms" for t, k in top_rest))
    if a.top:
        print(f"\n| top {a.top} ops (self CPU time) | ms/step | calls/step |\n|---|---:|---:|")
        for avg in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:a.top]:
            print(f"| {avg.key} | {avg.self_cpu_time_total / 1e3 / a.steps:.1f} | {avg.count / a.steps:.0f} |")
    if a.trace:
        prof.export_chrome_trace(a.trace)
        print(f"trace: {a.trace}")


if __name__ == "__main__":
    main()
