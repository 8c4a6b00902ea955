"""Loss outside the model equals independent references (HF's own labels= loss; a token-mean)."""

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from posttrain.model.loss import backward_token_mean, ce_sum


def _sample(vocab, n, prompt, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, n), generator=g)
    labels = ids.clone()
    labels[0, :prompt] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def _load(path):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")


def test_single_sample_equals_hf_labels_loss(tiny_model):
    model = _load(tiny_model)
    b = _sample(model.config.vocab_size, 24, 7, 0)
    ref = model(**b).loss
    s, n = ce_sum(model, b)
    assert n == 24 - 7
    torch.testing.assert_close(s / n, ref, atol=1e-6, rtol=1e-6)


def test_padded_vocab_rows_are_excluded_from_the_softmax(tiny_qwen3):
    model = _load(tiny_qwen3)
    b = _sample(300, 20, 5, 1)
    real = 300  # pretend rows >= 300 are vocabulary padding
    logits = model(input_ids=b["input_ids"]).logits[0, :-1, :real]
    y = b["labels"][0, 1:]
    ref = F.cross_entropy(logits[y != -100], y[y != -100], reduction="sum")
    s, _ = ce_sum(model, b, vocab_size=real)
    torch.testing.assert_close(s, ref, atol=1e-5, rtol=1e-6)


def test_token_mean_over_micro_batches_equals_one_batch(tiny_model):
    """Loss and gradients of (3 uneven samples in 2 micro-batches, one padded) == a plain token-mean."""
    model = _load(tiny_model)
    V = model.config.vocab_size
    samples = [_sample(V, 30, 25, 2), _sample(V, 12, 2, 3), _sample(V, 20, 10, 4)]
    # reference: every target token's NLL from HF's own forward, one sample at a time, then the mean
    nll = []
    for s in samples:
        logits = model(input_ids=s["input_ids"]).logits[0, :-1]
        y = s["labels"][0, 1:]
        nll.append(F.cross_entropy(logits, y, ignore_index=-100, reduction="none")[y != -100])
    ref = torch.cat(nll).mean()
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # ours: micro-batch 1 = sample 0 alone, micro-batch 2 = samples 1+2 right-padded together
    pad = torch.full((1, 8), 0)
    mb2 = {
        "input_ids": torch.cat([torch.cat([samples[1]["input_ids"], pad], 1), samples[2]["input_ids"]]),
        "labels": torch.cat([torch.cat([samples[1]["labels"], pad - 100], 1), samples[2]["labels"]]),
        "attention_mask": torch.cat([torch.cat([torch.ones(1, 12, dtype=torch.long), pad], 1), torch.ones(1, 20, dtype=torch.long)]),
    }
    loss, n = backward_token_mean(model, [samples[0], mb2])
    assert n == 5 + 10 + 10
    assert abs(loss - ref.item()) < 1e-6
    # a mean of per-micro-batch means would differ: (5 tokens) vs (20 tokens) weigh differently
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)
