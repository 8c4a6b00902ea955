"""Distillation: the packed, chunked batch loss equals direct formulas on each document alone; the
recipe trains the student towards the teacher; a teacher with another tokenizer is refused."""

import json

import pytest
import torch
import torch.nn.functional as F

from posttrain.cli import run_job
from posttrain.config import JobConfig
from posttrain.data.loader import DataLoader
from posttrain.data.tokenizer import TokenizerMismatchError, load_tokenizer
from posttrain.model.kd import batch_kd_loss, selected_hidden
from posttrain.model.load import load_model
from posttrain.tiny import build_tiny_model

from conftest import DEMO_DATA, job_dict, write_jsonl


@pytest.fixture(scope="module")
def teacher(tiny_qwen3, tmp_path_factory):
    """A wider, deeper model with the student's tokenizer (saved in the student's model dir)."""
    return build_tiny_model(tmp_path_factory.mktemp("teacher") / "m", tiny_qwen3, hidden_size=96, num_layers=3, seed=1)


@pytest.fixture(scope="module")
def sharp_teacher(tiny_qwen3, tmp_path_factory):
    """The student's own weights with its head scaled by 4: peaked distributions (a random model's are
    near uniform) that a student can reach in a few steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharp") / "m"
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_qwen3).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("chats") / "d.jsonl", DEMO_DATA.read_text().splitlines()[:48])


def distill_job(student, teacher, data, out, steps=4, **distill):
    job = job_dict(student, data, out, recipe="distill", train={"steps": steps, "lr": 2e-3})
    job["distill"] = {"teacher": str(teacher), **distill}
    return job


def direct_divergence(zs, zt, kind, beta, T):
    ps, pt = torch.log_softmax(zs / T, -1), torch.log_softmax(zt / T, -1)
    kl = lambda a, b: (a.exp() * (a - b)).sum(-1)  # noqa: E731  KL(exp a || exp b)
    if kind == "forward_kl":
        d = kl(pt, ps)
    elif kind == "reverse_kl":
        d = kl(ps, pt)
    else:
        m = torch.logsumexp(torch.stack([pt + torch.log(torch.tensor(beta)), ps + torch.log(torch.tensor(1 - beta))]), 0)
        d = beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    return T * T * d


@pytest.mark.parametrize("kind,T", [("forward_kl", 1.0), ("reverse_kl", 2.0), ("jsd", 1.5)])
def test_packed_chunked_batch_loss_equals_direct_per_document(tiny_qwen3, teacher, chats, kind, T):
    cfg = JobConfig.model_validate(distill_job(tiny_qwen3, teacher, chats, "/tmp/unused"))
    tok = load_tokenizer(cfg.model)
    V = len(tok)
    student = load_model(cfg.model, tok, device=torch.device("cpu"), dtype=torch.float32)
    t_model = load_model(cfg.model.model_copy(update={"path": str(teacher)}), tok, device=torch.device("cpu"),
                         dtype=torch.float32).requires_grad_(False)
    batch = next(DataLoader(cfg.data, tok, seed=0, background=False))
    assert len(batch["doc_lens"]) > 2  # several documents packed in one row
    with torch.no_grad():
        t_hidden = selected_hidden(t_model, batch, V)
    out = batch_kd_loss(student, batch, t_model, t_hidden, vocab_size=V, divergence=kind, beta=0.3, temperature=T,
                        chunk_tokens=5, with_ce=True)
    (0.6 * out.kd_sum + 0.4 * out.ce_sum).backward()
    ours = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    # direct: each document alone through the plain HF forward, full logits
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    kd_total = ce_total = 0.0
    at = 0
    for n in batch["doc_lens"]:
        x, y = torch.tensor([ids[at:at + n]]), torch.tensor(labels[at + 1:at + n])
        at += n
        keep = y != -100
        zs = student(input_ids=x).logits[0, :-1, :V][keep]
        with torch.no_grad():
            zt = t_model(input_ids=x).logits[0, :-1, :V][keep]
        kd_total = kd_total + direct_divergence(zs, zt, kind, 0.3, T).sum()
        ce_total = ce_total + F.cross_entropy(zs, y[keep], reduction="sum")
    (0.6 * kd_total + 0.4 * ce_total).backward()
    torch.testing.assert_close(out.kd_sum, kd_total.detach(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.ce_sum, ce_total.detach(), atol=1e-4, rtol=1e-5)
    for n, p in student.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_recipe_moves_student_towards_teacher(tiny_qwen3, sharp_teacher, chats, tmp_path):
    res = run_job(JobConfig.model_validate(distill_job(tiny_qwen3, sharp_teacher, chats, tmp_path / "r", steps=10,
                                                       divergence="jsd", beta=0.3, temperature=1.5)))
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kd_loss"] < 0.7 * rows[0]["kd_loss"], [r["kd_loss"] for r in rows]
    assert {"kd_loss", "frozen_mfu", "policy_mfu"} <= set(rows[0])
    assert res["losses"][-1] < res["losses"][0]
    assert (tmp_path / "r" / "hf" / "model.safetensors").is_file()


def test_teacher_with_another_tokenizer_is_refused(tiny_qwen3, tiny_llama, chats, tmp_path):
    with pytest.raises(TokenizerMismatchError, match=r"fingerprints [0-9a-f]{16} vs [0-9a-f]{16}"):
        run_job(JobConfig.model_validate(distill_job(tiny_qwen3, tiny_llama, chats, tmp_path / "r")))
