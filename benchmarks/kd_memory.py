"""Peak memory and time of a distillation loss (forward + backward): naive full logits vs `kd_loss`.

    .venv/bin/python benchmarks/kd_memory.py                 # vocab 152064, 4096 tokens, student 256 / teacher 512
    .venv/bin/python benchmarks/kd_memory.py --quick         # 2048 tokens, forward_kl only
    .venv/bin/python benchmarks/kd_memory.py --divergences jsd --ce --tokens 2048 4096 --student-hidden 1024

Two heads only (the student's [vocab, H_s] fp32, trainable; the teacher's [vocab, H_t], frozen);
hidden states are random (the student's require grad). Each case runs in its own subprocess, so peaks
do not mix: the child reads its peak RSS (resource.getrusage ru_maxrss) just before and just after one
forward+backward, and "memory" is the difference (it includes the student head's weight gradient,
[vocab, H_s], in both paths; kd_loss also holds its fp32 accumulator). Naive = the usual full-logits
code (both heads on all N rows, log_softmax / F.kl_div or the generalised JSD on [N, vocab], autograd;
with --ce, F.cross_entropy on the same student logits); chunked = `posttrain.model.kd.kd_loss` with
the default (auto) chunk size. Values of the two paths are checked to agree.

Safety on a shared machine: a naive case whose estimated peak exceeds the limit (default: 70% of
MemAvailable) is skipped and said so, and every child runs under an address-space limit (RLIMIT_AS)
so that a bad estimate ends in a MemoryError in the child, not in the kernel's OOM killer.
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


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 * GiB


def _limit_address_space(extra: int) -> None:
    with open("/proc/self/statm") as f:
        vsz = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (vsz + extra, resource.RLIM_INFINITY))


def child(method, divergence, ce, vocab, tokens, hs, ht, chunk, temperature, beta, limit) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import PretrainedConfig

    from posttrain.model.kd import kd_loss
    from posttrain.model.loss import auto_chunk_tokens

    torch.manual_seed(0)

    class HeadOnly(torch.nn.Module):
        def __init__(self, hidden, rows):
            super().__init__()
            self.lm_head = torch.nn.Linear(hidden, rows, bias=False)
            self.config = PretrainedConfig()

        def get_output_embeddings(self):
            return self.lm_head

    student, teacher = HeadOnly(hs, vocab), HeadOnly(ht, vocab)
    with torch.no_grad():
        student.lm_head.weight.normal_(0, 0.02)
        teacher.lm_head.weight.normal_(0, 0.04)
    teacher.requires_grad_(False)
    h = torch.randn(tokens, hs, requires_grad=True)
    th = torch.randn(tokens, ht)
    y = torch.randint(0, vocab, (tokens,)) if ce else None
    T = temperature

    def naive():
        zs = student.lm_head(h).float()
        with torch.no_grad():
            lt = F.log_softmax(teacher.lm_head(th).float() / T, dim=-1)
        ls = F.log_softmax(zs / T, dim=-1)
        if divergence == "forward_kl":
            kd = F.kl_div(ls, lt, log_target=True, reduction="sum")
        elif divergence == "reverse_kl":
            kd = F.kl_div(lt, ls, log_target=True, reduction="sum")
        else:  # generalised JSD (TRL's generalized_jsd_loss, with logaddexp instead of a stacked logsumexp)
            lm = torch.logaddexp(ls + torch.log1p(torch.tensor(-beta)), lt + torch.log(torch.tensor(beta)))
            kd = beta * F.kl_div(lm, lt, log_target=True, reduction="sum") + (1 - beta) * F.kl_div(lm, ls, log_target=True, reduction="sum")
        kd = kd * T * T
        c = F.cross_entropy(zs, y, reduction="sum") if ce else None
        return kd, c

    # warm up kernels on small separate heads (their buffers stay far below the measured peak)
    small_s, small_t = HeadOnly(hs, 1024), HeadOnly(ht, 1024)
    w = kd_loss(small_s, h[:64].detach().requires_grad_(), small_t, th[:64], divergence=divergence, beta=beta,
                temperature=T, targets=y[:64] % 1024 if ce else None)
    (w.kd_sum + (w.ce_sum if ce else 0)).backward()
    del small_s, small_t, w
    _limit_address_space(limit)
    before = _rss_peak()
    t0 = time.perf_counter()
    if method == "naive":
        kd, c = naive()
    else:
        out = kd_loss(student, h, teacher, th, divergence=divergence, beta=beta, temperature=T,
                      chunk_tokens=chunk, targets=y)
        kd, c = out.kd_sum, out.ce_sum
    loss = kd + c if ce else kd
    loss.backward()
    dt = time.perf_counter() - t0
    after = _rss_peak()
    return {"kd": kd.item(), "ce": c.item() if ce else None, "time_s": dt, "peak_bytes": after - before,
            "chunk": chunk or auto_chunk_tokens(vocab)}


def naive_estimate(divergence: str, ce: bool, vocab: int, tokens: int, hs: int, ht: int) -> int:
    # [N, vocab] fp32 tensors alive at the peak (logits, log-softmaxes, kl_div temporaries, their
    # gradients): ~7 for a KL, ~11 for the JSD, +1 with CE; plus weights, gradient, hidden states
    n = (11 if divergence == "jsd" else 7) + (1 if ce else 0)
    return n * tokens * vocab * 4 + (2 * hs + ht) * vocab * 4 + 2 * tokens * (hs + ht) * 4


def run_case(method, div, ce, vocab, tokens, hs, ht, chunk, a, limit) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps([method, div, ce, vocab, tokens, hs, ht, chunk, a.temperature, a.beta, limit])]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"failed (exit {out.returncode})"])[-1][:160]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="2048 tokens, forward_kl only")
    p.add_argument("--vocab", type=int, default=152_064)
    p.add_argument("--tokens", type=int, nargs="+")
    p.add_argument("--student-hidden", type=int, default=256)
    p.add_argument("--teacher-hidden", type=int, default=512)
    p.add_argument("--divergences", nargs="+", choices=["forward_kl", "reverse_kl", "jsd"])
    p.add_argument("--ce", action="store_true", help="also the student's hard-label CE (targets)")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--chunk", type=int, help="chunk tokens (default: auto, ~256 MiB of fp32 logits)")
    p.add_argument("--mem-limit-gib", type=float, help="skip naive cases estimated above this (default 70%% of MemAvailable)")
    p.add_argument("--child")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(*json.loads(a.child))))
        return
    limit = int((a.mem_limit_gib * GiB) if a.mem_limit_gib else 0.7 * _mem_available())
    tokens = a.tokens or ([2048] if a.quick else [4096])
    divs = a.divergences or (["forward_kl"] if a.quick else ["forward_kl", "jsd"])
    V, hs, ht = a.vocab, a.student_hidden, a.teacher_hidden
    print(f"KD loss forward+backward, vocab {V}, student hidden {hs}, teacher hidden {ht}, T={a.temperature:g}, "
          f"fp32, {os.cpu_count()} CPU cores; memory = peak RSS growth; limit {limit / GiB:.1f} GiB")
    head = (f"{'divergence':>10} {'ce':>3} {'tokens':>6} | {'naive GiB':>9} {'naive s':>8} | {'kd_loss GiB':>11} "
            f"{'kd_loss s':>9} {'chunk':>5} | {'mem ratio':>9} {'time ratio':>10}")
    print(head)
    print("-" * len(head))
    for div in divs:
        for T in tokens:
            est = naive_estimate(div, a.ce, V, T, hs, ht)
            naive = run_case("naive", div, a.ce, V, T, hs, ht, None, a, limit) if est <= limit else {"skipped": est}
            ch = run_case("chunked", div, a.ce, V, T, hs, ht, a.chunk, a, limit)
            if "peak_bytes" in naive and "peak_bytes" in ch:
                for k in ("kd", "ce"):
                    if naive[k] is not None:
                        assert abs(naive[k] - ch[k]) <= 1e-4 * abs(naive[k]) + 1e-3, (k, naive, ch)
            nm = f"{naive['peak_bytes'] / GiB:9.2f} {naive['time_s']:8.2f}" if "peak_bytes" in naive else (
                f"{'skip':>9} {'':>8}" if "skipped" in naive else f"{'error':>9} {'':>8}")
            cm = f"{ch['peak_bytes'] / GiB:11.2f} {ch['time_s']:9.2f} {ch['chunk']:5d}" if "peak_bytes" in ch else f"{'error':>11} {'':>9} {'':>5}"
            ratio = (f"{ch['peak_bytes'] / naive['peak_bytes']:9.3f} {ch['time_s'] / naive['time_s']:10.2f}"
                     if "peak_bytes" in naive and "peak_bytes" in ch else f"{'-':>9} {'-':>10}")
            print(f"{div:>10} {'yes' if a.ce else 'no':>3} {T:>6} | {nm} | {cm} | {ratio}", flush=True)
            if "skipped" in naive:
                print(f"{'':>22}naive skipped: needs ~{naive['skipped'] / GiB:.0f} GiB (> {limit / GiB:.1f} GiB limit)")
            for r in (naive, ch):
                if "error" in r:
                    print(f"{'':>22}error: {r['error']}")


if __name__ == "__main__":
    main()
