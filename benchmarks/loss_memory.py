"""Peak memory and time of the LM loss (forward + backward): naive full logits vs chunked head.

    .venv/bin/python benchmarks/loss_memory.py            # full grid, hidden 512 (~10 min on 2 cores)
    .venv/bin/python benchmarks/loss_memory.py --quick    # 2k/4k tokens, hidden 256 (~1.5 min)
    .venv/bin/python benchmarks/loss_memory.py --hidden 1024 --vocabs 152064 --tokens 4096   # one case

The output head ([vocab, hidden] fp32, trainable) is the only weight; hidden states [tokens, hidden]
are random and require grad; targets are random real-vocabulary ids. Each case runs in its own
subprocess, so peaks do not mix: the child reads its peak RSS (resource.getrusage ru_maxrss) just
before and just after one forward+backward, and "loss memory" is the difference (the weight
gradient, [vocab, hidden], is part of it in both paths). Naive = `F.cross_entropy(hidden @ W.T)`
(what HF's `labels=` path does); chunked = `posttrain.model.loss.chunked_ce_sum` with the default
(auto) chunk size. A naive case whose estimated peak does not fit this machine is skipped and said so.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

GiB = 2**30


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(method: str, vocab: int, tokens: int, hidden: int, chunk: int | None) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import PretrainedConfig

    from posttrain.model.loss import auto_chunk_tokens, chunked_ce_sum

    torch.manual_seed(0)

    class HeadOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
            self.config = PretrainedConfig()

        def get_output_embeddings(self):
            return self.lm_head

    model = HeadOnly()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.02)
    h = torch.randn(tokens, hidden, requires_grad=True)
    y = torch.randint(0, vocab, (tokens,))
    # warm up kernels on a small separate head (its buffers stay far below the measured peak)
    small = torch.nn.Linear(hidden, 1024, bias=False)
    F.cross_entropy(small(h[:64].detach()), y[:64] % 1024).backward()
    del small
    before = _rss_peak()
    t0 = time.perf_counter()
    if method == "naive":
        loss = F.cross_entropy(model.lm_head(h).float(), y, reduction="sum")
    else:
        loss = chunked_ce_sum(model, h, y, vocab, chunk_tokens=chunk)
    loss.backward()
    dt = time.perf_counter() - t0
    after = _rss_peak()
    return {"loss": loss.item(), "time_s": dt, "peak_bytes": after - before,
            "chunk": chunk or auto_chunk_tokens(vocab)}


def naive_estimate(vocab: int, tokens: int, hidden: int) -> int:
    # logits, log-softmax output, their gradients (~4 x tokens x vocab fp32) + weight/grad + hidden
    return 4 * tokens * vocab * 4 + 2 * vocab * hidden * 4 + 2 * tokens * hidden * 4


def run_case(method, vocab, tokens, hidden, chunk) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(vocab), str(tokens), str(hidden), str(chunk or 0)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="hidden 256, 2k/4k tokens")
    p.add_argument("--hidden", type=int, help="hidden size (default 512; 256 with --quick)")
    p.add_argument("--vocabs", type=int, nargs="+", default=[32_000, 152_064, 262_144])
    p.add_argument("--tokens", type=int, nargs="+")
    p.add_argument("--chunk", type=int, help="chunk tokens (default: auto, ~256 MiB of fp32 logits)")
    p.add_argument("--mem-limit-gib", type=float, default=20.0, help="skip naive cases estimated above this")
    p.add_argument("--child", nargs=5)
    a = p.parse_args()
    if a.child:
        m, v, t, hd, c = a.child
        print(json.dumps(child(m, int(v), int(t), int(hd), int(c) or None)))
        return
    hidden = a.hidden or (256 if a.quick else 512)
    vocabs = a.vocabs
    tokens = a.tokens or ([2048, 4096] if a.quick else [2048, 4096, 16384])
    print(f"loss forward+backward, hidden {hidden}, fp32, {os.cpu_count()} CPU cores; memory = peak RSS growth")
    head = (f"{'vocab':>7} {'tokens':>6} | {'naive GiB':>9} {'naive s':>8} | {'chunked GiB':>11} {'chunked s':>9} {'chunk':>5} | "
            f"{'mem ratio':>9} {'time ratio':>10}")
    print(head)
    print("-" * len(head))
    rows = []
    for V in vocabs:
        for T in tokens:
            est = naive_estimate(V, T, hidden)
            naive = run_case("naive", V, T, hidden, None) if est <= a.mem_limit_gib * GiB else {"skipped": est}
            ch = run_case("chunked", V, T, hidden, a.chunk)
            if "peak_bytes" in naive and "peak_bytes" in ch:
                assert abs(naive["loss"] - ch["loss"]) <= 1e-4 * abs(naive["loss"]), (naive, ch)
            nm = f"{naive['peak_bytes'] / GiB:9.2f} {naive['time_s']:8.2f}" if "peak_bytes" in naive else (
                f"{'skip':>9} {'':>8}" if "skipped" in naive else f"{'error':>9} {'':>8}")
            cm = f"{ch['peak_bytes'] / GiB:11.2f} {ch['time_s']:9.2f} {ch['chunk']:5d}" if "peak_bytes" in ch else f"{'error':>11}"
            ratio = (f"{ch['peak_bytes'] / naive['peak_bytes']:9.3f} {ch['time_s'] / naive['time_s']:10.2f}"
                     if "peak_bytes" in naive and "peak_bytes" in ch else f"{'-':>9} {'-':>10}")
            print(f"{V:>7} {T:>6} | {nm} | {cm} | {ratio}", flush=True)
            if "skipped" in naive:
                print(f"{'':>16}naive skipped: needs ~{naive['skipped'] / GiB:.0f} GiB (> {a.mem_limit_gib:g} GiB limit on this machine)")
            for r in (naive, ch):
                if "error" in r:
                    print(f"{'':>16}error: {r['error']}")
            rows.append({"vocab": V, "tokens": T, "naive": naive, "chunked": ch})


if __name__ == "__main__":
    main()
