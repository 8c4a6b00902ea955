"""Chunked head: CE, log-probs and distillation equal the naive full-logits computation (values and
gradients), with chunk sizes that do and do not divide the token count, a padded vocabulary,
soft-capping (Gemma3), tied embeddings and LoRA on the head; the full logits never exist."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from posttrain.model.loss import (
    auto_chunk_tokens,
    backward_token_mean,
    chunked_ce_sum,
    chunked_distill,
    hidden_states,
    select_targets,
    teacher_head,
    token_logprobs,
)

from conftest import load_padded, random_batch

CHUNKS = [1, 7, 64, None]  # 7 does not divide the 50 target tokens; None = auto (one chunk here)


def _naive_logits(model, batch, V):
    """HF's own forward (softcap included), full logits, real vocabulary only."""
    return model(input_ids=batch["input_ids"]).logits[:, :-1, :V].float()


def _grads(model):
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return g


def _close_grads(a, b):
    assert a.keys() == b.keys() and a
    for n in a:
        # fp32: summation order differs (chunks, fused softmax-onehot), so scale atol to the gradient
        torch.testing.assert_close(a[n], b[n], atol=2e-6 * max(1.0, b[n].abs().max().item()), rtol=1e-5, msg=n)


@pytest.mark.parametrize("fam", ["qwen3", "gemma3"])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_ce_equals_naive(fam, chunk, request):
    model, V = load_padded(request.getfixturevalue(f"tiny_{fam}"), pad_rows=50)
    b = random_batch(V)
    y = b["labels"][:, 1:]
    ref = F.cross_entropy(_naive_logits(model, b, V)[y != -100], y[y != -100], reduction="sum")
    ref.backward()
    ref_g = _grads(model)
    h, t = select_targets(b, hidden_states(model, b), V)
    got = chunked_ce_sum(model, h, t, V, chunk_tokens=chunk)
    got.backward()
    torch.testing.assert_close(got, ref.detach(), atol=1e-5, rtol=1e-6)
    head_grad = model.get_output_embeddings().weight.grad
    assert head_grad.shape[0] == V + 50 and head_grad[V:].abs().max() == 0  # padded rows: never trained
    _close_grads(_grads(model), ref_g)
    # padded rows are refused as targets
    bad = dict(b, labels=b["labels"].clone())
    bad["labels"][0, -1] = V + 3
    with pytest.raises(ValueError, match="padded rows are never targets"):
        select_targets(bad, hidden_states(model, bad), V)


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_token_logprobs_equal_naive_with_per_token_gradients(tiny_gemma3, chunk):
    model, V = load_padded(tiny_gemma3, pad_rows=30)
    b = random_batch(V, seed=1)
    y = b["labels"][:, 1:]
    w = torch.randn(int((y != -100).sum()), generator=torch.Generator().manual_seed(3))  # non-uniform upstream grad
    ref = F.log_softmax(_naive_logits(model, b, V), -1)[y != -100].gather(1, y[y != -100][:, None]).squeeze(1)
    (ref * w).sum().backward()
    ref_g = _grads(model)
    h, t = select_targets(b, hidden_states(model, b), V)
    got = token_logprobs(model, h, t, V, chunk_tokens=chunk)
    (got * w).sum().backward()
    torch.testing.assert_close(got, ref.detach(), atol=1e-5, rtol=1e-6)
    _close_grads(_grads(model), ref_g)


def test_lora_on_head_uses_the_adapter(tiny_qwen3):
    """A peft LoRA on lm_head (generic, checkpointed path) == naive, for values and LoRA grads."""
    from peft import LoraConfig, get_peft_model

    base, V = load_padded(tiny_qwen3, pad_rows=20)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    b = random_batch(V, seed=2)
    y = b["labels"][:, 1:]
    ref = F.cross_entropy(model(input_ids=b["input_ids"]).logits[:, :-1, :V][y != -100], y[y != -100], reduction="sum")
    ref.backward()
    ref_g = _grads(model)
    for chunk in (7, None):
        h, t = select_targets(b, hidden_states(model, b), V)
        got = chunked_ce_sum(model, h, t, V, chunk_tokens=chunk)
        got.backward()
        torch.testing.assert_close(got, ref.detach(), atol=1e-5, rtol=1e-6)
        g = _grads(model)
        assert any("lm_head.lora_B" in n for n in g)
        _close_grads(g, ref_g)


def test_chunked_distill_equals_naive_kl(tiny_qwen3, tiny_gemma3):
    student, V = load_padded(tiny_qwen3)
    teacher, _ = load_padded(tiny_gemma3)  # same tokenizer (both ChatML tiny BPE); teacher softcapped
    b = random_batch(V, seed=4)

    def kl_sum(s_logits, t_logits):
        return F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True, reduction="sum")

    y = b["labels"][:, 1:]
    with torch.no_grad():
        t_full = _naive_logits(teacher, b, V)[y != -100]
    ref = kl_sum(_naive_logits(student, b, V)[y != -100], t_full)
    ref.backward()
    ref_g = _grads(student)
    hs, _ = select_targets(b, hidden_states(student, b), V)
    with torch.no_grad():
        ht, _ = select_targets(b, hidden_states(teacher, b), V)
    got = chunked_distill(student, hs, teacher_head(teacher, ht, V), kl_sum, vocab_size=V, chunk_tokens=7)
    got.backward()
    torch.testing.assert_close(got, ref.detach(), atol=1e-5, rtol=1e-5)
    _close_grads(_grads(student), ref_g)


class _LargestVocabTensor(TorchDispatchMode):
    """Records the largest [rows, vocab] tensor produced by any op (the head weight itself, its
    transpose and gradient, [vocab, hidden], are not logits and are skipped)."""

    def __init__(self, vocab, weight_numel):
        super().__init__()
        self.vocab, self.weight_numel, self.rows = vocab, weight_numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.dim() >= 2 and o.shape[-1] >= self.vocab and o.numel() != self.weight_numel:
                self.rows = max(self.rows, o.numel() // o.shape[-1])
        return out


@pytest.mark.parametrize("fam", ["qwen3", "gemma3"])
def test_full_logits_never_exist_forward_or_backward(fam, request):
    model, V = load_padded(request.getfixturevalue(f"tiny_{fam}"))
    b = random_batch(V)
    n = int((b["labels"][:, 1:] != -100).sum())
    mode = _LargestVocabTensor(V, model.get_output_embeddings().weight.numel())
    with mode:
        backward_token_mean(model, [b], V, chunk_tokens=8)
    assert 0 < mode.rows <= 8 < n  # the head's outputs were never bigger than one chunk
    h, t = select_targets(b, hidden_states(model, b), V)
    mode = _LargestVocabTensor(V, model.get_output_embeddings().weight.numel())
    with mode:
        token_logprobs(model, h, t, V, chunk_tokens=8).sum().backward()
    assert 0 < mode.rows <= 8


def test_auto_chunk_size():
    assert auto_chunk_tokens(32_000) == 2048
    assert auto_chunk_tokens(152_064) == 256
    assert auto_chunk_tokens(262_144) == 256
    assert auto_chunk_tokens(100) >= 64
