"""Knowledge-distillation losses (forward / reverse KL, generalised JSD), computed chunk by chunk.

    out = kd_loss(student, s_hidden, teacher, t_hidden, vocab_size=V, divergence="jsd", beta=0.5,
                  temperature=2.0, targets=y)
    loss = (out.kd_sum * lam + out.ce_sum * (1 - lam)) / n_step_targets   # any linear combination
    loss.backward()

Inputs are *hidden states at the selected positions* (`target_hidden` in loss.py), not logits: the
student's [N, H] (the decoder's last_hidden_state, after the final norm; with grad) and the teacher's
[N, H_t] at the same positions (no grad; the teacher may have another hidden size and depth, but must
share the tokenizer). Both output heads are applied here through `head_logits`, so soft-capping,
tied embeddings, LoRA on the head and padded vocabulary rows (ids >= vocab_size: cut, no probability
mass in either distribution) are handled exactly as for the CE. Being written in terms of (hidden
states at selected positions, models), the same function serves off-policy distillation (dataset
completions) and on-policy distillation (the student samples rollouts, the teacher scores them: build
the batch from the rollouts, mask the prompt with -100, select, call `kd_loss`).

Divergences, per target position, with p_t = softmax(z_t / T), p_s = softmax(z_s / T):
- forward_kl: T^2 * KL(p_t || p_s)   (mode covering; classic Hinton distillation)
- reverse_kl: T^2 * KL(p_s || p_t)   (mode seeking; MiniLLM / on-policy GKD)
- jsd: T^2 * [beta * KL(p_t || M) + (1 - beta) * KL(p_s || M)], M = beta p_t + (1 - beta) p_s: the
  generalised JSD of GKD (Agarwal et al. 2024), as TRL's `generalized_jsd_loss` defines it. At
  beta = 0 and beta = 1 the mixture family vanishes (M -> p_s or p_t, D -> 0), so, as in TRL, those
  end points are *defined* as forward KL (beta = 0) and reverse KL (beta = 1): D is discontinuous there.
The T^2 factor (Hinton et al. 2015) keeps the gradient's magnitude independent of T: the gradient
w.r.t. the student logits is T * dKL/du with u = z_s / T, and the soft targets' gradients scale as
1/T^2 for large T; without it, raising T would silently lower the KD term's weight against the CE.
(TRL divides the logits by T but does not multiply by T^2.) Values are in nats, summed over rows.

`top_k`: only the teacher's k most likely ids per row are kept; both distributions are restricted to
that support and renormalised over it (log-softmax over the k gathered logits), and the divergence
is computed between those k-dim distributions. This is an approximation (the mass outside the
teacher's top k, and the student's mass there, are ignored), and it is what makes teacher logits
cheap to precompute and store: k (id, logit) pairs per token instead of a vocabulary-wide row.

`targets` [N]: the student's hard-label cross-entropy at temperature 1 over the full real vocabulary
is summed too (`ce_sum`), in the same chunk pass, from the same student logits (the head runs once).

Memory: neither model's [N, vocab] logits ever exist, forward or backward. A custom autograd function
loops over row chunks in its forward; per chunk it computes the teacher's logits (no grad), the
student's, the divergence (and CE) and their gradients w.r.t. the student logits in closed form, then
backpropagates those through the student head only (a plain `nn.Linear` head, softcap included, by
hand with `addmm_` into fp32 accumulators; a LoRA or custom head with `torch.autograd.grad`). The
gradients w.r.t. the hidden states ([N, H]) and the head's trainable parameters are stored, and the
backward only scales them by the incoming gradient (as `_FusedLinearCE` does). So about one chunk of
student + teacher logits is alive at a time, and neither head is used in the backward: under FSDP2
the teacher's (and the student's) root weights only need to be unsharded around the forward.
With `targets`, the KD and CE gradients are kept apart (their weights are only known at backward):
one more head backward per chunk and a second set of accumulators ([N, H] and the head's gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .hf import unwrap
from .loss import _chunk, _real_vocab, _softcap, head_logits, target_hidden

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class KDOut:
    kd_sum: torch.Tensor  # fp32 scalar: sum over the N rows of the per-token divergence (times T^2)
    ce_sum: torch.Tensor | None  # fp32 scalar: sum of the student's CE on `targets` (T = 1), if given
    n: int  # rows (target positions)


# ------------------------------------------------------------------------------------- math on one chunk
def _divergence(u: torch.Tensor, w: torch.Tensor, kind: str, beta: float, want_grad: bool):
    """Per-row divergence between softmax(u) (student) and softmax(w) (teacher), u and w [c, k] fp32
    logits already divided by T, and its gradient w.r.t. u (None when not wanted).

    The log-ratio r = log ps - log pt is formed as (u - w) - (lse(u) - lse(w)), not as a difference
    of two log-softmaxes (each of magnitude ~log k): for close distributions the divergence is a
    small number obtained by cancellation, and this keeps it accurate in fp32."""
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    elif kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    lse_u = torch.logsumexp(u, dim=-1, keepdim=True)
    lse_w = torch.logsumexp(w, dim=-1, keepdim=True)
    r = (u - w).sub_(lse_u - lse_w)  # log ps - log pt
    ps = (u - lse_u).exp_()
    pt = (w - lse_w).exp_()
    if kind == "forward_kl":  # sum pt (lt - ls); d/du = ps - pt
        d = -(pt * r).sum(-1)
        return d, (ps.sub_(pt) if want_grad else None)
    if kind == "reverse_kl":  # sum ps (ls - lt); d/du = ps * (ls - lt - D)
        d = (ps * r).sum(-1)
        return d, (r.sub_(d[:, None]).mul_(ps) if want_grad else None)
    # jsd: beta KL(pt || M) + (1 - beta) KL(ps || M), M = beta pt + (1 - beta) ps:
    #   lt - lm = -log(beta + (1 - beta) e^r) = -logaddexp(log beta, log(1 - beta) + r), ls - lm = r + (lt - lm).
    # d/dps_i (free) = (1 - beta)(ls_i - lm_i) (the terms through M cancel), so after the softmax
    # Jacobian: d/du = (1 - beta) ps (ls - lm - KL(ps || M)).
    a = torch.logaddexp(r + math.log1p(-beta), torch.full_like(r[:1], math.log(beta))).neg_()
    kt = (pt * a).sum(-1)
    del pt
    rs = r.add_(a)  # ls - lm
    del a
    ks = (ps * rs).sum(-1)
    d = beta * kt + (1.0 - beta) * ks
    return d, (rs.sub_(ks[:, None]).mul_(ps).mul_(1.0 - beta) if want_grad else None)


def _kd_rows(zs: torch.Tensor, zt: torch.Tensor, kind: str, beta: float, T: float, top_k: int | None, want_grad: bool):
    """T^2 * divergence per row [c] from fp32 logits [c, V], and its gradient w.r.t. zs [c, V]."""
    idx = None
    if top_k is not None:  # the teacher's top k ids; both renormalised over them
        idx = zt.topk(top_k, dim=-1, sorted=False).indices
        zt, u = zt.gather(1, idx), zs.gather(1, idx)
    else:
        u = zs
    d, g = _divergence(u / T if T != 1.0 else u, zt / T if T != 1.0 else zt, kind, beta, want_grad)
    d = d * (T * T)
    if g is not None:
        g.mul_(T)  # d(T^2 D)/dz = T^2 * dD/du * (1 / T)
        if idx is not None:
            g = torch.zeros_like(zs).scatter_(1, idx, g)
    return d, g


def _ce_rows(zs: torch.Tensor, y: torch.Tensor, want_grad: bool):
    """Cross-entropy per row (T = 1, full real vocabulary) and its gradient softmax - onehot."""
    m = zs.amax(dim=-1, keepdim=True)
    e = (zs - m).exp_()
    s = e.sum(dim=-1, keepdim=True)
    ce = (s.log() + m).squeeze(1) - zs.gather(1, y[:, None]).squeeze(1)
    if not want_grad:
        return ce, None
    g = e.div_(s)
    g[torch.arange(g.shape[0], device=g.device), y] -= 1.0
    return ce, g


# ------------------------------------------------------------------------------------- the student head
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _student_chunk(spec: "_Spec", h: torch.Tensor, want_h: bool, params, want_p):
    """Student logits (fp32, softcapped, real vocabulary) of one chunk, and `back(g, gh, rows, gp)`
    which backpropagates a gradient w.r.t. those logits through the head: the hidden-state gradient
    is written into gh[rows], parameter gradients are added into the fp32 accumulators gp (aligned
    with `params`, None where not wanted)."""
    V, head = spec.vocab, spec.head
    if type(head) is torch.nn.Linear:  # plain head (tied or not): by hand, no autograd graph
        W = head.weight[:V]
        b = head.bias[:V] if head.bias is not None else None
        z = F.linear(h, W, b).float()
        cap, t = spec.cap, None
        if cap:
            t = torch.tanh(z.div_(cap))
            z = t * cap
        iw = next((i for i, p in enumerate(params) if p is head.weight), None)
        ib = next((i for i, p in enumerate(params) if b is not None and p is head.bias), None)

        def back(g, gh, rows, gp):
            if t is not None:
                g = g * (1.0 - t * t)  # d/dz cap * tanh(z / cap)
            if want_h:
                gh[rows] = (g.to(W.dtype) @ W).to(gh.dtype)
            if iw is not None and gp[iw] is not None:
                gw = gp[iw]
                gw[:V].addmm_(g.t().to(gw.dtype), h.to(gw.dtype))
            if ib is not None and gp[ib] is not None:
                gp[ib][:V] += g.sum(0).to(gp[ib].dtype)

        return z, back

    # LoRA-wrapped or custom head: autograd through `head_logits`, for the wanted inputs only
    inputs = [p for p, w in zip(params, want_p) if w]
    if not (want_h or inputs):
        with torch.no_grad():
            return head_logits(spec.student, h, V), None
    with torch.enable_grad():
        hh = h.detach().requires_grad_(want_h)
        z = head_logits(spec.student, hh, V)
    slots = [i for i, w in enumerate(want_p) if w]

    def back(g, gh, rows, gp):
        grads = torch.autograd.grad(z, ([hh] if want_h else []) + inputs, g, retain_graph=True, allow_unused=True)
        if want_h:
            gh[rows] = grads[0] if grads[0] is not None else 0.0
            grads = grads[1:]
        for i, gi in zip(slots, grads):
            if gi is not None:
                gp[i] += gi.to(gp[i].dtype)

    return z.detach(), back


@dataclass
class _Spec:
    student: torch.nn.Module
    teacher: torch.nn.Module
    head: torch.nn.Module
    cap: float | None
    vocab: int
    kind: str
    beta: float
    temperature: float
    top_k: int | None
    chunk: int
    grad_on: bool


class _ChunkedKD(torch.autograd.Function):
    """(kd_sum, ce_sum) over row chunks; gradients w.r.t. the student's hidden states and trainable
    head parameters are computed in the forward and only scaled in the backward."""

    @staticmethod
    def forward(ctx, s_hidden, t_hidden, targets, spec: _Spec, *params):
        ctx.set_materialize_grads(False)
        want_h = spec.grad_on and ctx.needs_input_grad[0]
        want_p = [spec.grad_on and w for w in ctx.needs_input_grad[4:]]
        want = want_h or any(want_p)
        sets = 2 if targets is not None else 1  # gradients of kd_sum, and of ce_sum
        gh = [torch.empty_like(s_hidden) if want_h else None for _ in range(sets)]
        gp = [[torch.zeros(p.shape, dtype=_acc_dtype(p.dtype), device=p.device) if w else None
               for p, w in zip(params, want_p)] for _ in range(sets)]
        kd = torch.zeros((), dtype=torch.float32, device=s_hidden.device)
        ce = torch.zeros((), dtype=torch.float32, device=s_hidden.device)
        for s in range(0, s_hidden.shape[0], spec.chunk):
            rows = slice(s, s + spec.chunk)
            with torch.no_grad():
                zt = head_logits(spec.teacher, t_hidden[rows], spec.vocab)
            zs, back = _student_chunk(spec, s_hidden[rows], want_h, params, want_p)
            d, g = _kd_rows(zs, zt, spec.kind, spec.beta, spec.temperature, spec.top_k, want)
            del zt
            kd += d.sum()
            if want:
                back(g, gh[0], rows, gp[0])
            del g
            if targets is not None:
                c, g = _ce_rows(zs, targets[rows], want)
                ce += c.sum()
                if want:
                    back(g, gh[1], rows, gp[1])
                del g
            del zs, back
        ctx.grads = (gh, gp) if want else None
        ctx.dtypes = (s_hidden.dtype, [p.dtype for p in params])
        return kd, ce

    @staticmethod
    def backward(ctx, g_kd, g_ce):
        if ctx.grads is None:
            raise RuntimeError("kd_loss: backward ran twice through the same graph (its stored gradients are "
                               "consumed by the first backward), or without gradients wanted")
        (gh, gp), ctx.grads = ctx.grads, None
        hd, pds = ctx.dtypes

        def combine(parts, dtype):  # sum_i parts[i] * g_i, in place in the stored buffers
            out = None
            for x, gi in zip(parts, (g_kd, g_ce)):
                if x is None or gi is None:
                    continue
                x.mul_(gi)
                out = x if out is None else out.add_(x)
            return out.to(dtype) if out is not None else None

        grad_h = combine(gh, hd)
        grad_p = [combine([s[i] for s in gp], d) for i, d in enumerate(pds)]
        return (grad_h, None, None, None, *grad_p)


# ------------------------------------------------------------------------------------- the API
def kd_loss(
    student: torch.nn.Module,
    s_hidden: torch.Tensor,
    teacher: torch.nn.Module,
    t_hidden: torch.Tensor,
    *,
    vocab_size: int | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int | None = None,
    chunk_tokens: int | None = None,
    targets: torch.Tensor | None = None,
) -> KDOut:
    """Distillation loss between a student and a teacher on N selected positions, chunked.

    `s_hidden` [N, H]: the student's final hidden states (after the final norm) at the positions that
    predict a target (see `target_hidden`); gradients flow into them and into the student head's
    trainable parameters (tied embeddings and LoRA included). `t_hidden` [N, H_t]: the teacher's at
    the same positions (treated as constants). `vocab_size`: the real vocabulary (len(tokenizer));
    head rows at and beyond it are padding and are cut from both models' logits; without it both heads
    must have the same number of rows. `divergence`: forward_kl | reverse_kl | jsd (with `beta` in
    [0, 1]; 0 and 1 are forward / reverse KL, TRL's convention); `temperature` T > 0 (the divergence is
    multiplied by T^2); `top_k`: restrict both distributions to the teacher's top k ids, renormalised
    (an approximation; see the module docstring). `targets` [N]: also return the student's hard-label
    CE sum (T = 1) from the same chunk pass. `chunk_tokens`: rows per chunk (default: auto, ~256 MiB
    of fp32 logits per model per chunk).

    Returns sums over the rows (`kd_sum`, `ce_sum`) and N: divide by the step's global target count.
    Works the same for dataset completions and on-policy rollouts (the student samples, the teacher
    scores the same tokens): only hidden states at selected positions go in. Backward at most once.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {beta}")
    temperature = float(temperature)
    if not temperature > 0.0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if s_hidden.dim() != 2 or t_hidden.dim() != 2 or t_hidden.shape[0] != s_hidden.shape[0]:
        raise ValueError(f"s_hidden [N, H] and t_hidden [N, H_t] must be 2-D with the same N, got "
                         f"{tuple(s_hidden.shape)} and {tuple(t_hidden.shape)}")
    if targets is not None and tuple(targets.shape) != (s_hidden.shape[0],):
        raise ValueError(f"targets must be [N] = [{s_hidden.shape[0]}], got {tuple(targets.shape)}")
    V = _real_vocab(student, vocab_size)
    Vt = _real_vocab(teacher, vocab_size)
    if V != Vt:
        raise ValueError(
            f"student and teacher heads cover different vocabularies ({V} vs {Vt} rows): pass vocab_size "
            "(len(tokenizer), shared by both) so padded rows are cut"
        )
    if top_k is not None and not 1 <= int(top_k) <= V:
        raise ValueError(f"top_k must be in [1, {V}], got {top_k}")
    head = unwrap(student).get_output_embeddings()
    params = [p for p in head.parameters() if p.requires_grad]
    spec = _Spec(
        student=student, teacher=teacher, head=head, cap=_softcap(student), vocab=V, kind=divergence,
        beta=beta, temperature=temperature, top_k=int(top_k) if top_k is not None else None,
        chunk=_chunk(chunk_tokens, V), grad_on=torch.is_grad_enabled(),
    )
    kd, ce = _ChunkedKD.apply(s_hidden, t_hidden.detach(), targets, spec, *params)
    return KDOut(kd, ce if targets is not None else None, int(s_hidden.shape[0]))


# ------------------------------------------------------------------------------------- on a batch
def selected_hidden(model: torch.nn.Module, batch: dict, vocab_size: int | None = None) -> torch.Tensor:
    """A model's final hidden states [N, H] at the batch's target positions (a teacher's side)."""
    return target_hidden(model, batch, vocab_size)[0]


def batch_kd_loss(student: torch.nn.Module, batch: dict, teacher: torch.nn.Module, t_hidden: torch.Tensor, *,
                  vocab_size: int | None = None, with_ce: bool = False, **kd) -> KDOut:
    """`kd_loss` on a (packed) batch: the student's decoder, its hidden states at the target
    positions, and the teacher's at the same positions (`selected_hidden`); `with_ce`: also the
    hard-label CE sum on the batch's labels. `kd`: divergence, beta, temperature, top_k, chunk_tokens."""
    s_hidden, targets = target_hidden(student, batch, vocab_size)
    return kd_loss(student, s_hidden, teacher, t_hidden, vocab_size=vocab_size, targets=targets if with_ce else None, **kd)
