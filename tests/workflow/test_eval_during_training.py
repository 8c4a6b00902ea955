"""Evaluation during training: eval/loss is the token-mean over the whole held-out set (checked against
plain transformers), evaluating never changes training, the best checkpoint outlives
keep_checkpoints, early stopping takes the same decision across an interrupt and resume, and a job
that asks for evaluation without the means to run it fails naming the key."""

import json
import signal

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.cli import run_job
from posttrain.compute.interrupt import Interrupted
from posttrain.compute.metrics import _SINKS, add_sink
from posttrain.config import ConfigError, JobConfig, load_config
from posttrain.data.loader import DataLoader
from posttrain.data.pairs import encode_pair_record
from posttrain.data.tokenizer import load_tokenizer
from posttrain.tiny import CHATML_GENERATION_TEMPLATE
from posttrain.workflow.engine import Engine

from conftest import DEMO_DATA, job_dict, make_pairs, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    lines = DEMO_DATA.read_text().splitlines()
    d = tmp_path_factory.mktemp("d")
    return write_jsonl(d / "train.jsonl", lines[:40]), write_jsonl(d / "heldout.jsonl", lines[100:117])


def _job(model, data, out, steps, *, eval_every=None, compute=None, **train):
    train_file, heldout = data
    job = job_dict(model, train_file, out, train={"steps": steps, "lr": 2e-3, **train}, compute=compute or {},
                   data={"max_tokens_per_batch": 256, "max_seq_len": 256, "buffer_size": 8})
    if eval_every:
        job["train"]["eval_every"] = eval_every
        job["data"]["eval_sources"] = [{"path": str(heldout)}]
    return job


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _evals(run_dir):
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/") and k != "eval/time_s"}
            for r in _rows(run_dir) if "eval/loss" in r}


def hf_heldout_loss(model_dir, heldout) -> tuple[float, int]:
    """Plain transformers: each held-out conversation alone, labels = its assistant tokens (from the
    template's {% generation %} spans via apply_chat_template), next-token cross-entropy over the
    real vocabulary (the export's padded rows are never targets nor sampled), summed over the whole
    set and divided by its target count."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = CHATML_GENERATION_TEMPLATE  # renders the same text as the model's ChatML template
    total, count = 0.0, 0
    for line in heldout.read_text().splitlines():
        enc = tok.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ids = torch.tensor([enc["input_ids"]])
        labels = torch.where(torch.tensor([enc["assistant_masks"]]) == 1, ids, -100)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1, : len(tok)]
        total += float(F.cross_entropy(logits.double(), labels[0, 1:], ignore_index=-100, reduction="sum"))
        count += int((labels[0, 1:] != -100).sum())
    return total / count, count


def test_eval_loss_is_the_heldout_token_mean_and_leaves_training_unchanged(tiny_qwen3, data, tmp_path):
    """17 held-out conversations packed into several 256-token batches; eval at steps 2 and 3 (the
    last step). The step-3 value is the exported model's loss, token-weighted over the whole set."""
    res = run_job(JobConfig.model_validate(_job(tiny_qwen3, data, tmp_path / "eval", 3, eval_every=2, schedule="constant")))
    evals = _evals(tmp_path / "eval")
    assert sorted(evals) == [2, 3] and set(evals[3]) == {"eval/loss"}
    want, targets = hf_heldout_loss(tmp_path / "eval" / "hf", data[1])
    assert targets > 150
    assert abs(evals[3]["eval/loss"] - want) < 1e-5, (evals[3], want)
    assert evals[3]["eval/loss"] < evals[2]["eval/loss"]
    assert res["best"]["step"] == 3 and json.loads((tmp_path / "eval" / "best.json").read_text())["step"] == 3
    # the same run without evaluation: the same losses and weights, bit for bit
    plain = run_job(JobConfig.model_validate(_job(tiny_qwen3, data, tmp_path / "plain", 3, schedule="constant")))
    assert plain["losses"] == res["losses"]
    a, b = load_file(tmp_path / "eval" / "hf" / "model.safetensors"), load_file(tmp_path / "plain" / "hf" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_eval_max_batches_caps_each_worker(tiny_qwen3, data, tmp_path):
    full = _job(tiny_qwen3, data, tmp_path / "a", 1, eval_every=1)
    capped = _job(tiny_qwen3, data, tmp_path / "b", 1, eval_every=1, eval_max_batches=1)
    engines = []
    for job in (full, capped):
        cfg = JobConfig.model_validate(job)
        engines.append(Engine.setup(cfg, cfg.compute.output_dir))
    batches = [e._read_held_out(None) for e in engines]
    assert len(batches[0]) > 1 and len(batches[1]) == 1
    assert torch.equal(batches[0][0]["input_ids"], batches[1][0]["input_ids"])


def _early_stop_job(model, data, out):
    """best_mode: max on a falling eval loss: the first evaluation (step 2) stays the best, so the
    evaluations at 4, 6, 8 spend the patience of 3 and the run stops after step 8 of 40."""
    return _job(model, data, out, 40, eval_every=2, best_mode="max", early_stopping_patience=3,
                compute={"checkpoint_every": 2, "keep_checkpoints": 1})


def test_best_checkpoint_outlives_retention_and_early_stopping_resumes_exactly(tiny_qwen3, data, tmp_path, capsys):
    ref = run_job(JobConfig.model_validate(_early_stop_job(tiny_qwen3, data, tmp_path / "ref")))
    ckpts = tmp_path / "ref" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000008"]  # best + final
    assert "early stopping: eval/loss did not improve in 3 evaluations" in ref["stopped_early"]
    assert ref["steps"] == 8 and "stopped after step 8 of 40" in capsys.readouterr().err
    best = json.loads((tmp_path / "ref" / "best.json").read_text())
    assert best["step"] == 2 and best["checkpoint"] == "checkpoints/step_00000002"
    assert best["evaluations_without_improvement"] == 3
    assert json.loads((tmp_path / "ref" / "hf" / "posttrain.json").read_text())["steps"] == 8
    ref_evals = _evals(tmp_path / "ref")
    assert sorted(ref_evals) == [2, 4, 6, 8]
    assert ref_evals[2]["eval/loss"] > ref_evals[4]["eval/loss"] > ref_evals[6]["eval/loss"] > ref_evals[8]["eval/loss"]

    # SIGTERM after step 5, inside the patience window (1 of 3 spent): checkpoint, stop, resume
    out = tmp_path / "run"
    add_sink(lambda m: m["step"] == 5 and signal.raise_signal(signal.SIGTERM))
    try:
        with pytest.raises(Interrupted, match="SIGTERM after step 5"):
            run_job(JobConfig.model_validate(_early_stop_job(tiny_qwen3, data, out)))
    finally:
        _SINKS.clear()
    assert json.loads((out / "best.json").read_text())["evaluations_without_improvement"] == 1
    res = run_job(JobConfig.model_validate(_early_stop_job(tiny_qwen3, data, out)))
    assert res["start_step"] == 5 and res["steps"] == 8 and res["stopped_early"] == ref["stopped_early"]
    assert _evals(out) == ref_evals and [r["loss"] for r in _rows(out)] == [r["loss"] for r in _rows(tmp_path / "ref")]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000008"]
    assert json.loads((out / "best.json").read_text()) == best
    # run again: it resumes at the stop, trains nothing more and exports the same model
    again = run_job(JobConfig.model_validate(_early_stop_job(tiny_qwen3, data, out)))
    assert again["start_step"] == 8 and again["stopped_early"] == ref["stopped_early"] and again["losses"] == []


def sft_with_a_constant_suite(cfg, run_dir):
    """SFT whose evaluations also run a 'suite' (an eval hook) that always scores 0.5."""
    from posttrain.model.loss import ce_sum

    job = Engine.setup(cfg, run_dir)
    job.eval_hooks.append(lambda engine, step: {"suite/score": 0.5})
    for step in job.steps(job.loader(), eval_fn=lambda b: {"loss": job.forward(ce_sum, b, job.vocab)}):
        n = step.targets()
        for b in step.micro:
            step.backward(job.forward(ce_sum, b, job.vocab)[0] / n)
        step.update()
    return job.finish()


def test_eval_hook_metrics_join_and_patience_one_on_a_metric_that_cannot_improve(tiny_qwen3, data, tmp_path):
    job = _job(tiny_qwen3, data, tmp_path / "r", 10, eval_every=2, best_metric="eval/suite/score", best_mode="max",
               early_stopping_patience=1)
    job["recipe"] = f"{__file__}:sft_with_a_constant_suite"
    job["export"] = {"best": True}
    res = run_job(JobConfig.model_validate(job))
    evals = _evals(tmp_path / "r")
    assert sorted(evals) == [2, 4] and evals[4] == {"eval/loss": evals[4]["eval/loss"], "eval/suite/score": 0.5}
    assert res["steps"] == 4 and res["best"]["step"] == 2 and "eval/suite/score did not improve in 1 evaluation" in res["stopped_early"]
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    # export.best: the best checkpoint (step 2) in hf-best beside the final model (step 4) in hf
    assert res["best_export_dir"] == str(tmp_path / "r" / "hf-best")
    assert json.loads((tmp_path / "r" / "hf-best" / "posttrain.json").read_text())["steps"] == 2
    assert json.loads((tmp_path / "r" / "hf" / "posttrain.json").read_text())["steps"] == 4
    best, final = load_file(tmp_path / "r" / "hf-best" / "model.safetensors"), load_file(tmp_path / "r" / "hf" / "model.safetensors")
    assert best.keys() == final.keys() and any(not torch.equal(best[k], final[k]) for k in final)


def test_missing_or_unsupported_evaluation_is_a_clear_error(tiny_qwen3, data, tmp_path):
    job = _job(tiny_qwen3, data, tmp_path / "r", 2)
    path = tmp_path / "job.yaml"

    def error(**sections):
        j = json.loads(json.dumps(job))
        for section, values in sections.items():
            j.setdefault(section, {}).update(values) if isinstance(values, dict) else j.__setitem__(section, values)
        path.write_text(yaml.safe_dump(j))
        with pytest.raises(ConfigError) as e:
            load_config(path)
        return str(e.value)

    assert error(train={"eval_every": 5}).startswith(f"{path}:")  # the line of the key
    assert "train.eval_every is set but data.eval_sources is not" in error(train={"eval_every": 5})
    assert "data.eval_sources is set but train.eval_every is not" in error(data={"eval_sources": [{"path": str(data[1])}]})
    assert "train.early_stopping_patience needs evaluations" in error(train={"early_stopping_patience": 2})
    assert "train.best_metric: 'loss' is not an evaluation metric" in error(train={"best_metric": "loss"})
    assert "train.best_mode" in error(train={"best_mode": "lowest"})
    assert "export.best needs a best checkpoint" in error(export={"best": True})
    grpo = error(recipe="grpo", train={"eval_every": 2}, data={"eval_sources": [{"path": str(data[1])}]})
    assert "data.eval_sources: recipe 'grpo' has no evaluation during training" in grpo
    # a metric the evaluation does not produce, found at the first evaluation
    bad = _job(tiny_qwen3, data, tmp_path / "m", 2, eval_every=1, best_metric="eval/accuracy")
    with pytest.raises(ConfigError, match=r"train.best_metric: 'eval/accuracy' is not among the evaluation's metrics \(eval/loss\)"):
        run_job(JobConfig.model_validate(bad))
    # a custom recipe that passes no eval_fn
    custom = _job(tiny_qwen3, data, tmp_path / "c", 2, eval_every=1)
    custom["recipe"] = f"{__file__}:recipe_without_eval"
    with pytest.raises(ConfigError, match=r"train.eval_every: recipe .* does not evaluate during training"):
        run_job(JobConfig.model_validate(custom))


def recipe_without_eval(cfg, run_dir):
    job = Engine.setup(cfg, run_dir)
    for step in job.steps(job.loader()):
        step.update()
    return job.finish()


# --------------------------------------------------------------------------------------- DPO
def naive_side_logp(model, ids, labels, vocab):
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1, :vocab].float()
    y = torch.tensor(labels[1:])
    keep = y != -100
    return float(torch.log_softmax(logits, -1)[keep].gather(1, y[keep][:, None]).sum())


def test_dpo_eval_is_the_loss_over_all_heldout_pairs(tiny_qwen3, tmp_path):
    """Full fine-tuning, reference precomputed for the training pairs: the held-out pairs' reference
    is computed live. Against plain transformers on the export and the base model, one side at a time."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(48)[:32])
    heldout = write_jsonl(tmp_path / "heldout.jsonl", make_pairs(48, seed=1)[32:])
    job = job_dict(tiny_qwen3, pairs, tmp_path / "run", recipe="dpo", train={"steps": 2, "lr": 1e-3, "eval_every": 2},
                   data={"max_tokens_per_batch": 256, "eval_sources": [{"path": str(heldout)}]})
    job["dpo"] = {"precompute_reference": True, "beta": 0.5}
    cfg = JobConfig.model_validate(job)
    run_job(cfg)
    got = _evals(tmp_path / "run")[2]
    tok = load_tokenizer(cfg.model)
    V = len(tok)
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf", dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    loader = DataLoader(cfg.data.model_copy(update={"sources": cfg.data.eval_sources, "max_epochs": 1}), tok, seed=0,
                        background=False, encode=encode_pair_record)
    losses, margins, batches = [], [], 0
    with torch.no_grad():
        for batch in loader:
            batches += 1
            ids, labels, at = batch["input_ids"][0].tolist(), batch["labels"][0].tolist(), 0
            docs = []
            for n in batch["doc_lens"]:
                docs.append((ids[at:at + n], labels[at:at + n]))
                at += n
            for k in range(0, len(docs), 2):
                pc, pr = naive_side_logp(policy, *docs[k], V), naive_side_logp(policy, *docs[k + 1], V)
                rc, rr = naive_side_logp(ref, *docs[k], V), naive_side_logp(ref, *docs[k + 1], V)
                h = 0.5 * ((pc - rc) - (pr - rr))
                losses.append(float(-F.logsigmoid(torch.tensor(h))))
                margins.append(h)
    assert batches > 1 and len(losses) == 16
    assert abs(got["eval/loss"] - sum(losses) / len(losses)) < 1e-5
    assert abs(got["eval/rewards/margin"] - sum(margins) / len(margins)) < 1e-5
    assert got["eval/rewards/accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
