"""DPO: losses, rewards and gradients against a plain implementation (full logits, one unpadded
sequence at a time); reference modes agree; exact resume; the job file's `dpo:` section."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

from posttrain.cli import main, run_job
from posttrain.config import ConfigError, JobConfig, load_config
from posttrain.data.loader import DataLoader
from posttrain.data.packing import pack_row, share_prefix
from posttrain.data.pairs import encode_pair_record
from posttrain.data.records import Sample
from posttrain.data.tokenizer import load_tokenizer
from posttrain.model.load import load_model
from posttrain.model.preference import pair_logps, preference_loss

from conftest import ROOT, job_dict, make_pairs, run_and_kill, write_jsonl


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", make_pairs(48))


def dpo_job(model_dir, pairs_file, out, steps=4, **sections):
    dpo = sections.pop("dpo", {})
    job = job_dict(model_dir, pairs_file, out, train={"steps": steps, "lr": 1e-3}, recipe="dpo", **sections)
    job["dpo"] = dpo
    return job


# --------------------------------------------------------------------------- against a plain DPO
def naive_side_logp(model, ids, labels, vocab):
    """sum of log p(label) over labelled positions: full logits, no packing, no chunking."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1, :vocab].float()
    y = torch.tensor(labels[1:])
    keep = y != -100
    return torch.log_softmax(logits, -1)[keep].gather(1, y[keep][:, None]).sum(), int(keep.sum())


def naive_dpo(pi_c, pi_r, ref_c, ref_r, loss, beta, ls, gamma):
    if loss == "simpo":
        h = beta * (pi_c - pi_r) - gamma
        return -(1 - ls) * F.logsigmoid(h) - ls * F.logsigmoid(-h)
    lr = (pi_c - ref_c) - (pi_r - ref_r)
    if loss == "sigmoid":
        return -(1 - ls) * F.logsigmoid(beta * lr) - ls * F.logsigmoid(-beta * lr)
    if loss == "ipo":
        return (lr - 1 / (2 * beta)) ** 2
    return torch.relu(1 - beta * lr)


@pytest.mark.parametrize("loss,ls,norm,shared", [("sigmoid", 0.0, False, False), ("sigmoid", 0.2, True, True),
                                                 ("ipo", 0.0, True, True), ("hinge", 0.0, False, True), ("simpo", 0.1, True, False)])
def test_loss_rewards_gradients_equal_plain_dpo(tiny_qwen3, pairs, loss, ls, norm, shared):
    """`shared`: each pair's prompt computed once (data.share_prefix), the plain side still whole."""
    cfg = JobConfig.model_validate(dpo_job(tiny_qwen3, pairs, "/tmp/unused", data={"max_tokens_per_batch": 1024}))
    tok = load_tokenizer(cfg.model)
    V = len(tok)
    torch.manual_seed(0)
    policy = load_model(cfg.model, tok, device=torch.device("cpu"), dtype=torch.float32)
    ref = load_model(cfg.model, tok, device=torch.device("cpu"), dtype=torch.float32).requires_grad_(False)
    with torch.no_grad():  # make the reference differ from the policy
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    batch = next(DataLoader(cfg.data, tok, seed=0, background=False, encode=encode_pair_record))
    beta, gamma = 0.3, 0.4
    ours_batch = batch
    if shared:  # the same pairs, each rejected side a branch of its chosen side's prompt
        ids, labels, at, units = batch["input_ids"][0].tolist(), batch["labels"][0].tolist(), 0, []
        for u, n in enumerate(batch["unit_docs"]):
            lens = batch["doc_lens"][len(units) * 2 : len(units) * 2 + n]
            units.append(share_prefix(Sample(tuple(ids[at : at + sum(lens)]), tuple(labels[at : at + sum(lens)]), f"u{u}", tuple(lens))))
            at += sum(lens)
        ours_batch = pack_row(units, 1024, tok.pad_token_id, 64)
        assert all(s.doc_starts[1] > 0 for s in units) and ours_batch["num_tokens"] < batch["num_tokens"]
    # ours: packed row, chunked head, per-document sums
    pi = pair_logps(policy, ours_batch, V, chunk_tokens=7)
    with torch.no_grad():
        r = pair_logps(ref, ours_batch, V, chunk_tokens=7)
    lo, rc, rr = preference_loss(pi.normalised() if norm else pi, r.normalised() if norm else r,
                                 loss=loss, beta=beta, label_smoothing=ls, gamma=gamma)
    lo.sum().backward()
    ours = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    # plain: each side alone, full logits
    ids, labels, lens = batch["input_ids"][0].tolist(), batch["labels"][0].tolist(), batch["doc_lens"]
    docs, at = [], 0
    for n in lens:
        docs.append((ids[at:at + n], labels[at:at + n]))
        at += n
    total, want_rc = 0.0, []
    for k in range(0, len(docs), 2):
        (pc, nc), (pr, nr) = (naive_side_logp(policy, *docs[k], V), naive_side_logp(policy, *docs[k + 1], V))
        with torch.no_grad():
            (qc, _), (qr, _) = naive_side_logp(ref, *docs[k], V), naive_side_logp(ref, *docs[k + 1], V)
        if norm:
            pc, pr, qc, qr = pc / nc, pr / nr, qc / nc, qr / nr
        total = total + naive_dpo(pc, pr, qc, qr, loss, beta, ls, gamma)
        want_rc.append(beta * (pc if loss == "simpo" else pc - qc).detach())
    total.backward()
    assert len(docs) == 2 * len(batch["unit_docs"]) > 4
    torch.testing.assert_close(lo.sum(), total.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rc, torch.stack(want_rc), atol=1e-5, rtol=1e-5)
    for n, p in policy.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


# --------------------------------------------------------------------------- reference modes
def _metrics(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_precomputed_reference_equals_live(tiny_qwen3, pairs, tmp_path):
    live = run_job(JobConfig.model_validate(dpo_job(tiny_qwen3, pairs, tmp_path / "live")))
    pre = run_job(JobConfig.model_validate(dpo_job(tiny_qwen3, pairs, tmp_path / "pre", dpo={"precompute_reference": True})))
    assert (tmp_path / "pre" / "reference_logps.rank_00000.pt").is_file()
    assert max(abs(a - b) for a, b in zip(live["losses"], pre["losses"])) < 1e-6
    assert live["losses"][-1] < live["losses"][0]
    m = _metrics(tmp_path / "live")[-1]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen", "logps/rejected", "frozen_mfu"):
        assert key in m
    assert m["rewards/accuracy"] > 0.5 and m["rewards/margin"] > 0


def test_adapters_off_reference_equals_frozen_copy(tiny_qwen3, pairs, tmp_path):
    """LoRA starts with B = 0: the policy with adapters disabled is exactly the starting model."""
    lora = {"lora": {"rank": 4}}
    a = run_job(JobConfig.model_validate(dpo_job(tiny_qwen3, pairs, tmp_path / "a", model=lora, dpo={"reference": "adapters"})))
    b = run_job(JobConfig.model_validate(dpo_job(tiny_qwen3, pairs, tmp_path / "b", model=lora, dpo={"reference": "copy"})))
    assert max(abs(x - y) for x, y in zip(a["losses"], b["losses"])) < 1e-6
    assert a["losses"][-1] < a["losses"][0]


def test_rpo_and_simpo_run(tiny_qwen3, pairs, tmp_path):
    r = run_job(JobConfig.model_validate(dpo_job(tiny_qwen3, pairs, tmp_path / "r", dpo={"rpo_alpha": 1.0})))
    assert "nll_loss" in _metrics(tmp_path / "r")[0] and r["losses"][-1] < r["losses"][0]
    s = run_job(JobConfig.model_validate(dpo_job(tiny_qwen3, pairs, tmp_path / "s", dpo={"loss": "simpo", "beta": 2.0})))
    assert s["losses"][-1] < s["losses"][0]
    assert "frozen_mfu" not in _metrics(tmp_path / "s")[0]  # reference-free: no frozen model


# --------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_kill_and_resume_continues_bitwise_with_precomputed_reference(tiny_qwen3, pairs, tmp_path):
    def job(out):
        return dpo_job(tiny_qwen3, pairs, out, steps=8, compute={"checkpoint_every": 3},
                       data={"max_tokens_per_batch": 256, "buffer_size": 8}, dpo={"precompute_reference": True})

    ref = run_job(JobConfig.model_validate(job(tmp_path / "ref")))
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job(tmp_path / "killed")))
    run_and_kill(job_file, tmp_path / "killed", kill_at=5)
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(job_file)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed" in out.stderr and "precomputed" not in out.stderr  # the stored reference is reused
    assert [m["loss"] for m in _metrics(tmp_path / "killed")] == ref["losses"]


# --------------------------------------------------------------------------- the job file
def test_recipe_sections_are_typed_and_checked(tiny_qwen3, pairs, tmp_path, capsys):
    job = dpo_job(tiny_qwen3, pairs, tmp_path / "r", dpo={"beta": 0.2, "loss": "ipo"})
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(job, sort_keys=False))
    cfg = load_config(p)
    assert cfg.section.beta == 0.2 and cfg.section.loss == "ipo"
    assert JobConfig.model_validate_json(cfg.model_dump_json()).section == cfg.section  # to Ray workers
    text = p.read_text().replace("loss: ipo", "loss: ipoo")
    p.write_text(text)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "ipoo" in ln)
    with pytest.raises(ConfigError, match=rf"job.yaml:{line}: dpo.loss: input should be 'sigmoid'"):
        load_config(p)
    with pytest.raises(ConfigError, match="dpo.beta: input should be greater than 0"):
        load_config(p, ["dpo.loss=ipo", "dpo.beta=0"])
    with pytest.raises(ConfigError, match="dpo: this is the section of recipe 'dpo', but the job's recipe is 'sft'"):
        load_config(p, ["dpo.loss=ipo", "recipe=sft"])
    assert main(["validate", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "beta" in json.dumps(schema["properties"]["dpo"])
