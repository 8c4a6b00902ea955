"""Chunked knowledge-distillation losses (posttrain.model.kd) against direct formulas on full logits:
values and gradients (head and decoder weights), every divergence, temperatures, top-k, chunking,
the CE term, tied embeddings + softcapping, LoRA on the head, a padded vocabulary, a teacher of
another hidden size; and the full [N, vocab] logits never exist."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from posttrain.model.kd import kd_loss
from posttrain.model.loss import head_logits, hidden_states, select_targets

from conftest import load_padded, random_batch


# ------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: intra-op threads only cost here, and on a shared 2-core box they make every op
    spin against other processes (10-100x slower). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _kl(lp, lq):  # KL(p || q) per row from log-probs
    return (lp.exp() * (lp - lq)).sum(-1)


def reference(zs, zt, divergence, beta=0.5, T=1.0, top_k=None):
    """Direct per-row formulas on full logits, float64 (the definition, not the implementation's
    closed-form gradients)."""
    zs, zt = zs.double(), zt.double()
    if top_k is not None:
        idx = zt.topk(top_k, dim=-1).indices
        zs, zt = zs.gather(1, idx), zt.gather(1, idx)
    ls, lt = F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1)
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        d = _kl(lt, ls)
    elif divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        d = _kl(ls, lt)
    else:
        lm = torch.log(beta * lt.exp() + (1 - beta) * ls.exp())
        d = beta * _kl(lt, lm) + (1 - beta) * _kl(ls, lm)
    return d * T * T


def _grads(model):
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return g


def _close(got, ref, what="value"):
    ref = ref.detach().to(got.dtype)
    torch.testing.assert_close(got.detach(), ref, atol=1e-5 * max(1.0, ref.abs().max().item()), rtol=1e-5, msg=what)


def _close_grads(a, b):
    assert a.keys() == b.keys() and a, (sorted(a), sorted(b))
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-5 * max(1.0, b[n].abs().max().item()), rtol=1e-4, msg=n)


def _run(student, teacher, b, V, *, full_ref, ce_weight=None, loss_scale=1.0, **kw):
    """(value, ce value, grads) of kd_loss (full_ref=False) or of the reference formulas on full
    logits (full_ref=True), after one real student decoder forward; loss = scale*(kd + w*ce)."""
    hs, y = select_targets(b, hidden_states(student, b), V)
    with torch.no_grad():
        ht, _ = select_targets(b, hidden_states(teacher, b), V)
    if full_ref:
        zs = head_logits(student, hs, V)
        with torch.no_grad():
            zt = head_logits(teacher, ht, V)
        kw.pop("chunk_tokens", None)
        kd = reference(zs, zt, kw.pop("divergence"), kw.pop("beta", 0.5), kw.pop("temperature", 1.0), kw.pop("top_k", None)).sum()
        ce = F.cross_entropy(zs.double(), y, reduction="sum") if ce_weight is not None else None
    else:
        out = kd_loss(student, hs, teacher, ht, vocab_size=V, targets=y if ce_weight is not None else None, **kw)
        assert out.n == y.numel() and out.kd_sum.dtype == torch.float32
        kd, ce = out.kd_sum, out.ce_sum
        assert (ce is None) == (ce_weight is None)
    loss = kd if ce is None else kd + ce_weight * ce
    (loss * loss_scale).backward()
    return kd.detach(), (ce.detach() if ce is not None else None), _grads(student)


@pytest.fixture(scope="module")
def pair(tiny_qwen3, tiny_gemma3):
    """Student: Qwen3 (untied head, padded with 40 rows). Teacher: Gemma3 (tied, softcapped, 24 pad rows)."""
    student, V = load_padded(tiny_qwen3, pad_rows=40)
    teacher, Vt = load_padded(tiny_gemma3, pad_rows=24, seed=1)
    assert V == Vt
    teacher.requires_grad_(False)
    return student, teacher, V


# ------------------------------------------------------------------------------------- values and gradients
CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]


@pytest.mark.parametrize("top_k", [None, 5])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("divergence,beta", CASES)
def test_equals_full_logits_formulas(pair, divergence, beta, T, top_k):
    student, teacher, V = pair
    b = random_batch(V, seed=3)
    kw = dict(divergence=divergence, beta=beta, temperature=T, top_k=top_k)
    ref, _, ref_g = _run(student, teacher, b, V, full_ref=True, **kw)
    assert ref.item() > 1e-3  # not trivially zero
    for chunk in (3, None):
        got, _, g = _run(student, teacher, b, V, full_ref=False, chunk_tokens=chunk, **kw)
        _close(got, ref)
        assert "lm_head.weight" in g and "model.layers.0.self_attn.q_proj.weight" in g
        assert g["lm_head.weight"][V:].abs().max() == 0  # padded rows: no mass, never trained
        _close_grads(g, ref_g)


@pytest.mark.parametrize("beta,same_as", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_end_points_are_the_kls(pair, beta, same_as):
    student, teacher, V = pair
    b = random_batch(V, seed=5)
    a, _, ga = _run(student, teacher, b, V, full_ref=False, divergence="jsd", beta=beta, temperature=2.0, chunk_tokens=7)
    c, _, gc = _run(student, teacher, b, V, full_ref=False, divergence=same_as, temperature=2.0, chunk_tokens=7)
    assert torch.equal(a, c)
    for n in ga:
        assert torch.equal(ga[n], gc[n]), n
    # and the mixture family is continuous away from the end points only (TRL's convention)
    near, _, _ = _run(student, teacher, b, V, full_ref=False, divergence="jsd", beta=abs(beta - 1e-4), temperature=2.0)
    assert near.item() < 0.1 * a.item()


def test_ce_term_and_any_linear_combination(pair):
    """ce_sum == F.cross_entropy(sum) at T = 1 from the same pass; gradients of scale*(kd + w*ce)
    for non-unit weights (the backward combines the stored KD and CE gradients), and of each alone."""
    student, teacher, V = pair
    b = random_batch(V, seed=6)
    kw = dict(divergence="jsd", beta=0.3, temperature=2.0, top_k=5)
    for w, scale in ((0.7, 1.0 / 49), (0.0, 3.0)):
        rk, rc, rg = _run(student, teacher, b, V, full_ref=True, ce_weight=w, loss_scale=scale, **kw)
        gk, gc, gg = _run(student, teacher, b, V, full_ref=False, ce_weight=w, loss_scale=scale, chunk_tokens=4, **kw)
        _close(gk, rk)
        _close(gc, rc, "ce")
        _close_grads(gg, rg)
    # CE alone (kd_sum unused): the CE gradients only
    hs, y = select_targets(b, hidden_states(student, b), V)
    with torch.no_grad():
        ht, _ = select_targets(b, hidden_states(teacher, b), V)
    out = kd_loss(student, hs, teacher, ht, vocab_size=V, targets=y, chunk_tokens=5)
    out.ce_sum.backward()
    g = _grads(student)
    hs, _ = select_targets(b, hidden_states(student, b), V)
    ref = F.cross_entropy(head_logits(student, hs, V), y, reduction="sum")
    ref.backward()
    _close(out.ce_sum, ref, "ce alone")
    _close_grads(g, _grads(student))


# ------------------------------------------------------------------------------------- model variants
def test_tied_softcapped_student_and_teacher(tiny_gemma3):
    """Gemma3 as student (tied embeddings: the head's gradient lands in embed_tokens, added to the
    lookup's; softcap) and as teacher (another seed)."""
    student, V = load_padded(tiny_gemma3)
    teacher, _ = load_padded(tiny_gemma3, seed=2)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    teacher.requires_grad_(False)
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    b = random_batch(V, seed=7)
    for kw in (dict(divergence="forward_kl", temperature=2.0), dict(divergence="jsd", beta=0.3, top_k=5)):
        ref, rc, ref_g = _run(student, teacher, b, V, full_ref=True, ce_weight=0.5, **kw)
        got, gc, g = _run(student, teacher, b, V, full_ref=False, ce_weight=0.5, chunk_tokens=3, **kw)
        _close(got, ref)
        _close(gc, rc, "ce")
        assert "model.embed_tokens.weight" in g
        _close_grads(g, ref_g)


def test_lora_on_the_head(tiny_qwen3, tiny_gemma3):
    """peft LoRA on lm_head (and q_proj): the generic (autograd) head path; LoRA gradients only."""
    from peft import LoraConfig, get_peft_model

    base, V = load_padded(tiny_qwen3, pad_rows=20)
    student = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]))
    with torch.no_grad():
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    teacher, _ = load_padded(tiny_gemma3)
    teacher.requires_grad_(False)
    b = random_batch(V, seed=8)
    for kw in (dict(divergence="reverse_kl", temperature=2.0), dict(divergence="jsd", beta=0.3, top_k=5)):
        ref, rc, ref_g = _run(student, teacher, b, V, full_ref=True, ce_weight=0.3, **kw)
        got, gc, g = _run(student, teacher, b, V, full_ref=False, ce_weight=0.3, chunk_tokens=3, **kw)
        _close(got, ref)
        _close(gc, rc, "ce")
        assert any("lm_head.lora_B" in n for n in g) and all("lora_" in n for n in g)
        _close_grads(g, ref_g)


@pytest.fixture(scope="module")
def wide_teacher(tiny_qwen3, tmp_path_factory):
    """A teacher of another hidden size and depth (96, 3 layers) with the same tokenizer."""
    from posttrain.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("wide"), tiny_qwen3, family="qwen3", hidden_size=96,
                            num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=160, seed=5)


def test_teacher_of_another_hidden_size(tiny_qwen3, wide_teacher):
    student, V = load_padded(tiny_qwen3)
    teacher, Vt = load_padded(wide_teacher)
    teacher.requires_grad_(False)
    assert V == Vt and teacher.config.hidden_size != student.config.hidden_size
    b = random_batch(V, seed=9)
    kw = dict(divergence="forward_kl", temperature=1.0)
    ref, _, ref_g = _run(student, teacher, b, V, full_ref=True, **kw)
    got, _, g = _run(student, teacher, b, V, full_ref=False, chunk_tokens=3, **kw)
    _close(got, ref)
    _close_grads(g, ref_g)


def test_vocabularies_must_match(tiny_qwen3, tiny_gemma3):
    student, V = load_padded(tiny_qwen3, pad_rows=40)
    teacher, _ = load_padded(tiny_gemma3, pad_rows=24)
    h = torch.randn(4, student.config.hidden_size)
    ht = torch.randn(4, teacher.config.hidden_size)
    with pytest.raises(ValueError, match="pass vocab_size"):
        kd_loss(student, h, teacher, ht)  # 40 vs 24 padded rows
    out = kd_loss(student, h, teacher, ht, vocab_size=V)
    assert out.kd_sum.item() > 0
    for bad, match in ((dict(divergence="kl"), "divergence"), (dict(divergence="jsd", beta=1.5), "beta"),
                       (dict(temperature=0.0), "temperature"), (dict(top_k=V + 1), "top_k")):
        with pytest.raises(ValueError, match=match):
            kd_loss(student, h, teacher, ht, vocab_size=V, **bad)


# ------------------------------------------------------------------------------------- memory and edge cases
class _LargestVocabTensor(TorchDispatchMode):
    """The largest number of rows of any [rows, >= vocab] tensor an op produces. Head weights, their
    slices to the real vocabulary, transposes and gradients ([vocab(+pad), hidden] or transposed) are
    not logits and are skipped by size."""

    def __init__(self, vocab, *models):
        super().__init__()
        self.vocab, self.rows = vocab, 0
        self.skip = set()
        for m in models:
            w = m.get_output_embeddings().weight
            self.skip |= {w.numel(), vocab * w.shape[1]}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.dim() >= 2 and o.shape[-1] >= self.vocab and o.numel() not in self.skip:
                self.rows = max(self.rows, o.numel() // o.shape[-1])
        return out


@pytest.mark.parametrize("lora,top_k", [(False, None), (True, 5)])
def test_full_logits_never_exist(pair, lora, top_k, tiny_qwen3):
    student, teacher, V = pair
    if lora:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(load_padded(tiny_qwen3, pad_rows=40)[0], LoraConfig(r=4, target_modules=["lm_head"]))
    b = random_batch(V)
    hs, y = select_targets(b, hidden_states(student, b), V)
    with torch.no_grad():
        ht, _ = select_targets(b, hidden_states(teacher, b), V)
    assert hs.shape[0] > 8 and student.config.hidden_size * 8 < V
    mode = _LargestVocabTensor(V, student, teacher)
    try:
        with mode:
            out = kd_loss(student, hs, teacher, ht, vocab_size=V, divergence="jsd", temperature=2.0, chunk_tokens=8,
                          top_k=top_k, targets=y)
            (out.kd_sum + out.ce_sum).backward()
    finally:
        student.zero_grad(set_to_none=True)
    assert 0 < mode.rows <= 8


def test_no_rows_no_grad_and_single_backward(pair):
    student, teacher, V = pair
    H, Ht = student.config.hidden_size, teacher.config.hidden_size
    h = torch.zeros(0, H, requires_grad=True)
    out = kd_loss(student, h, teacher, torch.zeros(0, Ht), vocab_size=V, targets=torch.zeros(0, dtype=torch.long))
    assert out.n == 0 and out.kd_sum.item() == 0 and out.ce_sum.item() == 0
    (out.kd_sum + out.ce_sum).backward()
    assert h.grad.shape == (0, H) and student.lm_head.weight.grad.abs().max() == 0
    student.zero_grad(set_to_none=True)
    # evaluation under no_grad: same value, nothing to backward
    h = torch.randn(6, H, requires_grad=True)
    ht = torch.randn(6, Ht)
    with torch.no_grad():
        ev = kd_loss(student, h, teacher, ht, vocab_size=V, divergence="reverse_kl", chunk_tokens=4)
    assert not ev.kd_sum.requires_grad
    tr = kd_loss(student, h, teacher, ht, vocab_size=V, divergence="reverse_kl", chunk_tokens=4)
    torch.testing.assert_close(tr.kd_sum.detach(), ev.kd_sum)
    tr.kd_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        tr.kd_sum.backward()
    student.zero_grad(set_to_none=True)
    assert math.isfinite(ev.kd_sum.item())


def test_bf16_student_and_teacher(pair):
    """bf16 weights and hidden states: fp32 logits and accumulators, gradients handed back in bf16,
    close to the fp32 formulas on the same (bf16-rounded) weights."""
    import copy

    s32, t32, V = pair
    s16, t16 = copy.deepcopy(s32).to(torch.bfloat16), copy.deepcopy(t32).to(torch.bfloat16)
    g = torch.Generator().manual_seed(11)
    h16 = torch.randn(20, s16.config.hidden_size, generator=g).to(torch.bfloat16).requires_grad_()
    ht16 = torch.randn(20, t16.config.hidden_size, generator=g).to(torch.bfloat16)
    y = torch.randint(0, V, (20,), generator=g)
    out = kd_loss(s16, h16, t16, ht16, vocab_size=V, divergence="jsd", beta=0.3, temperature=2.0, chunk_tokens=6, targets=y)
    (out.kd_sum + 0.5 * out.ce_sum).backward()
    assert h16.grad.dtype == torch.bfloat16 and s16.lm_head.weight.grad.dtype == torch.bfloat16

    s_ref = copy.deepcopy(s16).float()
    h = h16.detach().float().requires_grad_()
    zs = head_logits(s_ref, h, V)
    zt = head_logits(t16, ht16, V)
    ref = reference(zs, zt.detach(), "jsd", 0.3, 2.0).sum()
    (ref + 0.5 * F.cross_entropy(zs.double(), y, reduction="sum")).backward()
    torch.testing.assert_close(out.kd_sum, ref.float().detach(), rtol=2e-2, atol=1e-3)
    for a, b in ((h16.grad, h.grad), (s16.lm_head.weight.grad, s_ref.lm_head.weight.grad)):
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=2e-2 * b.abs().max().item())
