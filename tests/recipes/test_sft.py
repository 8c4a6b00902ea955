"""SFT end to end on tiny Qwen3 and Llama: loss falls, export round-trips, LoRA, padded vocab."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.cli import main, run_job
from posttrain.config import JobConfig
from posttrain.data.loader import load_samples
from posttrain.data.tokenizer import load_tokenizer
from posttrain.model.export import export_hf
from posttrain.model.load import load_model

from conftest import DEMO_DATA, job_dict, write_jsonl


def run(job: dict):
    return run_job(JobConfig.model_validate(job))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    lines = DEMO_DATA.read_text().splitlines()[:64]
    return write_jsonl(tmp_path_factory.mktemp("data") / "d.jsonl", lines)


def test_loss_falls_and_export_round_trips(tiny_model, data, tmp_path):
    res = run(job_dict(tiny_model, data, tmp_path / "run", train={"steps": 24, "lr": 3e-3}))
    losses = res["losses"]
    assert len(losses) == 24 and losses[-1] < 0.8 * losses[0], losses
    out = tmp_path / "run"
    assert (out / "config.yaml").exists() and len((out / "metrics.jsonl").read_text().splitlines()) == 24
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 24 and resolved["data"]["on_bad_record"] == "error"
    # plain transformers loads the export; vocab padded to 64; fingerprint recorded
    exported = AutoModelForCausalLM.from_pretrained(out / "hf")
    tok = AutoTokenizer.from_pretrained(out / "hf")
    assert exported.config.vocab_size % 64 == 0
    meta = json.loads((out / "hf" / "posttrain.json").read_text())
    assert meta["real_vocab_size"] == len(tok)


def test_exported_logits_equal_training_model(tiny_model, data, tmp_path):
    """Train a few steps in-process, export, reload with plain from_pretrained: same logits."""
    # pad_vocab_to_multiple_of=1: an adapter-only export needs the base's own vocabulary size
    lora = {"lora": {"rank": 4, "alpha": 8}, "pad_vocab_to_multiple_of": 1}
    cfg = JobConfig.model_validate(job_dict(tiny_model, data, tmp_path, model=lora))
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tok, device=torch.device("cpu"), dtype=torch.float32)
    # make the LoRA adapters non-zero so merging matters
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    samples, _ = load_samples(cfg.data, tok)
    ids = torch.tensor([samples[0].input_ids])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    for merge in (True, False):
        out = export_hf(model, tok, tmp_path / f"hf-{merge}", merge_lora=merge)
        assert (out / "adapter_config.json").exists() != merge
        loaded = AutoModelForCausalLM.from_pretrained(out).eval()  # an adapter dir loads via peft
        with torch.no_grad():
            got = loaded(input_ids=ids).logits
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # the training model still has its adapters after a merged export
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_padded_vocab_rows_never_sampled(tiny_qwen3, data, tmp_path):
    cfg = JobConfig.model_validate(job_dict(tiny_qwen3, data, tmp_path, model={"add_tokens": ["<item_1>", "<item_2>"]}))
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tok, device=torch.device("cpu"), dtype=torch.float32)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows > len(tok)
    ids = torch.tensor([tok("Add 1 and 2.")["input_ids"]])
    with torch.no_grad():  # make every padded row beat the best real token at the first step
        logits = model(input_ids=ids).logits[0, -1]
        top = int(logits[: len(tok)].argmax())
        assert logits[top] > 0
        head = model.get_output_embeddings().weight
        head[len(tok):] = head[top] * 5
    out = export_hf(model, tok, tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert int(loaded(input_ids=ids).logits[0, -1].argmax()) >= len(tok)  # raw logits prefer padding...
    for do_sample in (False, True):
        gen = loaded.generate(input_ids=ids, max_new_tokens=8, do_sample=do_sample, min_new_tokens=8)
        assert int(gen[0, ids.shape[1]:].max()) < len(tok)  # ...but generation never emits it


def test_grad_accum_and_lora_and_checkpointing_run(tiny_qwen3, data, tmp_path):
    res = run(job_dict(
        tiny_qwen3, data, tmp_path / "run",
        model={"lora": {"rank": 4}, "gradient_checkpointing": True, "pad_vocab_to_multiple_of": 1},
        train={"steps": 3, "grad_accum": 2},
        export={"merge_lora": False, "sample_prompts": ["Add 1 and 2."], "max_new_tokens": 4},
    ))
    assert len(res["losses"]) == 3 and all(l > 0 for l in res["losses"])
    assert (tmp_path / "run" / "hf" / "adapter_model.safetensors").exists()


def test_cli_run_refuses_to_overwrite_and_reports_bad_records(tiny_qwen3, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "{oops"])
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_dict(tiny_qwen3, bad, tmp_path / "run")))
    assert main(["run", str(job)]) == 2
    assert f"{bad}:2: invalid JSON" in capsys.readouterr().err
    assert main(["run", str(job), "data.on_bad_record=skip", "train.steps=1", "export.enabled=false"]) == 0
    assert main(["run", str(job), "data.on_bad_record=skip"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["run", str(job), "data.on_bad_record=skip", "train.steps=1", "export.enabled=false", "--overwrite"]) == 0


def test_adapter_only_export_with_resized_vocab_is_refused_before_training(tiny_qwen3, data, tmp_path):
    from posttrain.config import ConfigError

    job = job_dict(tiny_qwen3, data, tmp_path / "run", model={"lora": {"rank": 4}}, export={"merge_lora": False})
    with pytest.raises(ConfigError, match="export.merge_lora"):
        run(job)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_bf16_weights_train_with_fp32_loss(tiny_qwen3, data, tmp_path):
    cfg = JobConfig.model_validate(job_dict(tiny_qwen3, data, tmp_path / "run", model={"dtype": "bfloat16"}, train={"steps": 2}))
    res = run_job(cfg)
    assert len(res["losses"]) == 2 and all(l == l and l > 0 for l in res["losses"])  # finite
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf")
    assert loaded.config.dtype == torch.bfloat16 or next(loaded.parameters()).dtype == torch.bfloat16


def test_metrics_sinks_mfu_and_tensorboard(tiny_qwen3, data, tmp_path):
    import posttrain.compute.metrics as M
    from posttrain.metrics import add_sink

    seen = []
    add_sink(seen.append)
    try:
        run(job_dict(tiny_qwen3, data, tmp_path / "run", train={"steps": 2}, compute={"tensorboard": True, "peak_flops": 1e12}))
    finally:
        M._SINKS.remove(seen.append)
    assert [m["step"] for m in seen] == [1, 2]
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "data_wait", "mfu", "hfu", "peak_mem_gb"):
            assert isinstance(r[key], float), key
        # with a fixed 1 TFLOP/s peak, MFU is this step's model FLOPs / time / 1e12: positive and tiny
        assert 0 < r["mfu"] <= r["hfu"] < 1
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
