"""Misspelled keys: the error names the closest valid key, in the job file and in overrides."""

import pytest

from posttrain.cli import main
from posttrain.config import ConfigError, JobConfig, keys_at, load_config

GOOD = """\
recipe: {recipe}
model:
  path: some/model
  lora: {{rank: 8}}
data:
  sources:
    - path: data.jsonl
train:
  lr: 1.0e-4
  steps: 10
"""


def err(tmp_path, text, overrides=()):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p, list(overrides))
    return p, str(e.value)


def test_misspelled_key_in_file_suggests_closest(tmp_path):
    text = GOOD.format(recipe="sft").replace("  lr: 1.0e-4", "  lr: 1.0e-4\n  warmup_step: 5")
    text = text.replace("    - path: data.jsonl", "    - path: data.jsonl\n      wieght: 2\n  max_seq_length: 512")
    text = text.replace("  lora: {rank: 8}", "  lora: {rank: 8, alfa: 16}")
    p, msg = err(tmp_path, text)
    assert "train.warmup_step: unknown key; did you mean `warmup_steps`?" in msg, msg
    assert "data.sources[0].wieght: unknown key; did you mean `weight`?" in msg, msg
    assert f"{p}:9: data.max_seq_length: unknown key; did you mean `max_seq_len`?" in msg, msg
    assert "model.lora.alfa: unknown key; did you mean `alpha`?" in msg, msg


def test_misspelled_key_in_override_suggests_closest(tmp_path):
    _, msg = err(tmp_path, GOOD.format(recipe="sft"), ["data.max_seq_lenn=512"])
    assert "override 'data.max_seq_lenn=512': data.max_seq_lenn: unknown key; did you mean `max_seq_len`?" in msg, msg
    _, msg = err(tmp_path, GOOD.format(recipe="sft"), ["compute.checkpoint_evry=5"])
    assert "did you mean `checkpoint_every`?" in msg, msg


def test_misspelled_section_and_recipe_section_keys(tmp_path):
    _, msg = err(tmp_path, GOOD.format(recipe="sft") + "exprt: {enabled: false}\n")
    assert "exprt: unknown key; did you mean `export`?" in msg, msg
    _, msg = err(tmp_path, GOOD.format(recipe="dpo") + "dpo: {betta: 0.2}\n")
    assert "dpo.betta: unknown key; did you mean `beta`?" in msg, msg
    _, msg = err(tmp_path, GOOD.format(recipe="dpo"), ["dpo.precompute_ref=true"])
    assert "override 'dpo.precompute_ref=true': dpo.precompute_ref: unknown key; did you mean `precompute_reference`?" in msg, msg
    _, msg = err(tmp_path, GOOD.format(recipe="dpo") + "dop: {beta: 0.2}\n")  # the recipe's section is a candidate
    assert "dop: unknown key; did you mean `dpo`?" in msg, msg


def test_no_suggestion_when_nothing_is_close(tmp_path):
    _, msg = err(tmp_path, GOOD.format(recipe="sft"), ["train.zzzzqqq=1"])
    assert "train.zzzzqqq: unknown key (check the spelling" in msg and "did you mean" not in msg, msg


def test_keys_at_walks_optional_and_list_fields():
    assert "alpha" in keys_at(JobConfig, ("model", "lora")) and "rank" in keys_at(JobConfig, ("model", "lora"))
    assert "weight" in keys_at(JobConfig, ("data", "sources", 0))
    assert keys_at(JobConfig, ()) == sorted(JobConfig.model_fields)


def test_cli_validate_prints_the_suggestion(tmp_path, capsys):
    p = tmp_path / "job.yaml"
    p.write_text(GOOD.format(recipe="sft"))
    assert main(["validate", str(p), "train.gradient_accum=2"]) == 2
    assert "did you mean `grad_accum`?" in capsys.readouterr().err
