"""Model families (Qwen3, Llama, Gemma3, Qwen3-MoE): the logit verifier, the family table, uniform
LoRA roles, MoE router aux loss against transformers' own, and vocabulary through export."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from posttrain.cli import main
from posttrain.config import ConfigError, JobConfig, LoraConfig, ModelConfig
from posttrain.data.tokenizer import load_tokenizer
from posttrain.model import loss as loss_mod
from posttrain.model.export import export_hf
from posttrain.model.families import FAMILIES, family_of, supported_architectures
from posttrain.model.load import load_model, unwrap
from posttrain.model.loss import backward_token_mean
from posttrain.model.verify import verify_model

from conftest import ALL_FAMILIES, DEMO_DATA, job_dict, write_jsonl

CPU = torch.device("cpu")


def _load(cfg: ModelConfig, tok=None):
    tok = tok or AutoTokenizer.from_pretrained(cfg.path)
    return load_model(cfg, tok, device=CPU, dtype=torch.float32), tok


# ------------------------------------------------------------------------------------- verifier
def test_verifier_passes_for_every_family(any_family):
    fam, path = any_family
    rep = verify_model(path)
    assert rep.family == fam and rep.rows > rep.vocab  # padded vocabulary exercised
    assert [c.name for c in rep.checks] == ["packed", "unpacked", "export"]
    assert rep.ok, rep.table()


def test_verifier_catches_a_broken_training_path(tiny_gemma3, monkeypatch, capsys):
    assert main(["verify", str(tiny_gemma3), "--skip-export"]) == 0
    assert "verify: ok" in capsys.readouterr().out
    monkeypatch.setattr(loss_mod, "_softcap", lambda model: None)  # forget Gemma's logit soft-capping
    assert main(["verify", str(tiny_gemma3), "--skip-export"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "verify: FAILED" in out


def test_verifier_catches_padded_rows_in_the_softmax(tiny_qwen3, monkeypatch):
    real = loss_mod._real_vocab
    monkeypatch.setattr(loss_mod, "_real_vocab", lambda model, v: real(model, None))  # no vocab cut
    rep = verify_model(tiny_qwen3, export=False)
    assert not rep.ok and rep.checks[0].logprob_abs > 1e-3


# ------------------------------------------------------------------------------------- family table
def test_unsupported_architecture_is_refused_unless_allowed(tiny_qwen3, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "qwen2")
    tok.save_pretrained(tmp_path / "qwen2")
    with pytest.raises(ConfigError, match="Qwen2ForCausalLM is not a verified family.*Gemma3ForCausalLM.*allow_unverified"):
        _load(ModelConfig(path=str(tmp_path / "qwen2")))
    model, _ = _load(ModelConfig(path=str(tmp_path / "qwen2"), allow_unverified=True, lora={"rank": 2}))
    assert any("lora_A" in n for n, _ in model.named_parameters())  # unverified: peft's all-linear
    with pytest.raises(ConfigError, match="target_modules"):  # roles need the table
        _load(ModelConfig(path=str(tmp_path / "qwen2"), allow_unverified=True, lora={"target": ["attention"]}))
    assert sorted(supported_architectures()) == sorted(a for f in FAMILIES.values() for a in f.architectures)


def _lora_suffixes(model):
    return {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A." in n}


@pytest.mark.parametrize("fam", ALL_FAMILIES)
def test_lora_roles_map_to_family_modules(fam, request):
    path = request.getfixturevalue(f"tiny_{fam}")
    model, _ = _load(ModelConfig(path=str(path), lora={"rank": 2, "target": ["attention"]}))
    assert family_of(model).name == fam
    assert _lora_suffixes(model) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    model, _ = _load(ModelConfig(path=str(path), lora={"rank": 2}))  # default roles: attention + mlp
    want = {"q_proj", "k_proj", "v_proj", "o_proj"} | ({"gate_proj", "up_proj", "down_proj"} if fam != "qwen3_moe" else set())
    assert _lora_suffixes(model) == want
    if fam == "qwen3_moe":  # experts only when asked; no silent remapping of 'mlp' to experts
        assert not any("lora" in n for n, _ in model.named_parameters() if ".mlp." in n)
        with pytest.raises(ConfigError, match="experts: true"):
            _load(ModelConfig(path=str(path), lora={"rank": 2, "target": ["mlp"]}))
        model, _ = _load(ModelConfig(path=str(path), lora={"rank": 2, "target": ["attention"], "experts": True}))
        lora_experts = {n for n, _ in model.named_parameters() if "mlp.experts" in n and "lora_" in n}
        assert lora_experts and all("layers.1." in n for n in lora_experts)  # layer 0 is dense
    else:
        with pytest.raises(ConfigError, match="has no MoE experts"):
            _load(ModelConfig(path=str(path), lora={"rank": 2, "experts": True}))
    if fam == "gemma3":  # tied head
        with pytest.raises(ConfigError, match="tied to the input embeddings"):
            _load(ModelConfig(path=str(path), lora={"rank": 2, "target": ["head"]}))
    else:
        model, _ = _load(ModelConfig(path=str(path), lora={"rank": 2, "target": ["head"]}))
        assert _lora_suffixes(model) == {"lm_head"}


def test_lora_config_errors():
    with pytest.raises(ValueError, match="either target .* or target_modules"):
        LoraConfig(target=["attention"], target_modules=["q_proj"])
    with pytest.raises(ValueError, match="experts: true works with target"):
        LoraConfig(target_modules=["q_proj"], experts=True)
    with pytest.raises(ValueError):
        LoraConfig(target=["attn"])
    assert LoraConfig(target_modules="all-linear").target is None  # escape hatch still accepted


@pytest.mark.parametrize("fam", ALL_FAMILIES)
def test_adapter_only_export_round_trips(fam, request, tmp_path):
    """Adapter-only export (no vocab resize) loads with plain from_pretrained and gives the training
    model's logits (merged export: see the verifier's export check)."""
    path = request.getfixturevalue(f"tiny_{fam}")
    lora = {"rank": 4, "alpha": 8, **({"target": ["attention"], "experts": True} if fam == "qwen3_moe" else {})}
    model, tok = _load(ModelConfig(path=str(path), lora=lora, pad_vocab_to_multiple_of=1))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    ids = torch.randint(0, len(tok), (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = export_hf(model, tok, tmp_path / "hf", merge_lora=False)
        assert (out / "adapter_config.json").exists()
        got = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- MoE aux loss
def _moe_batch(V, seed, lens=(20, 14)):
    g = torch.Generator().manual_seed(seed)
    T = max(lens)
    ids = torch.randint(0, V, (len(lens), T), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_moe_aux_loss_equals_transformers(tiny_qwen3_moe):
    """One micro-batch (with padding): our CE + coef * aux, loss and gradients, == transformers'
    `model(..., labels=..., output_router_logits=True).loss` (= CE mean + router_aux_loss_coef * aux)."""
    model, tok = _load(ModelConfig(path=str(tiny_qwen3_moe), router_aux_loss_coef=0.3, pad_vocab_to_multiple_of=1))
    assert unwrap(model).config.output_router_logits and unwrap(model).config.router_aux_loss_coef == 0.3
    b = _moe_batch(len(tok), 0)
    out = model(**b, output_router_logits=True)
    assert out.aux_loss > 0
    out.loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    metrics = {}
    loss, _ = backward_token_mean(model, [b], len(tok), chunk_tokens=5, metrics=metrics)
    assert abs(loss - out.loss.item()) < 1e-5
    assert abs(metrics["aux_loss"] - out.aux_loss.item()) < 1e-6 and abs(metrics["ce_loss"] + 0.3 * metrics["aux_loss"] - loss) < 1e-6
    router = [n for n in ref if "mlp.gate.weight" in n]
    assert router and all(ref[n].abs().sum() > 0 for n in router)  # the aux loss trains the router
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=2e-6 * max(1.0, ref[n].abs().max().item()), rtol=1e-5, msg=n)
    # off: no aux term, and the loss is plain CE
    model.config.output_router_logits = False
    metrics = {}
    loss_off, _ = backward_token_mean(model, [b], len(tok), metrics=metrics)
    assert "aux_loss" not in metrics and abs(loss_off - (out.loss - 0.3 * out.aux_loss).item()) < 1e-5


def test_moe_aux_loss_is_token_weighted_over_micro_batches(tiny_qwen3_moe):
    """Two micro-batches: loss = sum CE / N + coef * sum_j (n_j / N) aux_j, aux_j from transformers."""
    model, tok = _load(ModelConfig(path=str(tiny_qwen3_moe), pad_vocab_to_multiple_of=1))
    coef = model.config.router_aux_loss_coef
    mbs = [_moe_batch(len(tok), 1, (20, 14)), _moe_batch(len(tok), 2, (9,))]
    n = [int((mb["labels"][:, 1:] != -100).sum()) for mb in mbs]
    with torch.no_grad():
        outs = [model(**mb, output_router_logits=True) for mb in mbs]
    ce_sum = sum((o.loss - coef * o.aux_loss).item() * k for o, k in zip(outs, n))  # HF loss = CE mean + coef*aux
    ref = ce_sum / sum(n) + coef * sum(o.aux_loss.item() * k for o, k in zip(outs, n)) / sum(n)
    loss, N = backward_token_mean(model, mbs, len(tok))
    assert N == sum(n) and abs(loss - ref) < 1e-5


def test_sft_logs_moe_aux_loss(tiny_qwen3_moe, tmp_path):
    from posttrain.cli import run_job

    data = write_jsonl(tmp_path / "d.jsonl", DEMO_DATA.read_text().splitlines()[:16])
    job = job_dict(tiny_qwen3_moe, data, tmp_path / "run", train={"steps": 2}, export={"enabled": False},
                   model={"loss_chunk_tokens": 16, "lora": {"rank": 2, "experts": True}})
    run_job(JobConfig.model_validate(job))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["aux_loss"] > 0 and r["loss"] > r["ce_loss"] for r in rows)


# ------------------------------------------------------------------------------------- vocabulary
def test_export_sizes_agree_and_added_tokens_round_trip(tiny_gemma3, tmp_path):
    """Exported config.vocab_size == embedding rows == lm_head rows >= len(tokenizer), every tokenizer
    id < vocab_size, added tokens keep their ids through export and reload (tied-embedding family)."""
    added = ["<item_1>", "<item_2>", "<think>"]
    cfg = ModelConfig(path=str(tiny_gemma3), add_tokens=added[:2], add_special_tokens=added[2:])
    tok = load_tokenizer(cfg)
    model, _ = _load(cfg, tok)
    ids = {t: tok.convert_tokens_to_ids(t) for t in added}
    assert all(i >= 448 for i in ids.values())  # appended after the base vocabulary
    out = export_hf(model, tok, tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    tok2 = AutoTokenizer.from_pretrained(out)
    V = loaded.config.vocab_size
    assert V == loaded.get_input_embeddings().weight.shape[0] == loaded.get_output_embeddings().weight.shape[0]
    assert V % 64 == 0 and V >= len(tok2) == len(tok)
    assert max(tok2.get_vocab().values()) < V
    assert {t: tok2.convert_tokens_to_ids(t) for t in added} == ids
    assert tok2("a <item_2> b")["input_ids"] == tok("a <item_2> b")["input_ids"]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == list(range(len(tok), V))  # padded rows: never sampled
    torch.testing.assert_close(loaded.get_input_embeddings().weight, unwrap(model).get_input_embeddings().weight)
