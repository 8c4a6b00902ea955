"""Config: typed sections, errors naming file/line/key, typed overrides, import paths, the CLI."""

import subprocess
import sys

import pytest
import yaml

from posttrain.cli import main
from posttrain.config import ConfigError, load_config, resolve_import_path

GOOD = """\
recipe: sft
model:
  path: some/model
data:
  sources:
    - path: data.jsonl
train:
  lr: 1.0e-4
  steps: 10
"""


def write(tmp_path, text, name="job.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def err(path, overrides=()):
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    return str(e.value)


def test_good_file_and_defaults(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.train.lr == 1e-4 and cfg.train.steps == 10
    assert cfg.model.pad_vocab_to_multiple_of == 64 and cfg.data.on_bad_record == "error"


def test_wrong_type_names_file_line_and_key(tmp_path):
    p = write(tmp_path, GOOD.replace("lr: 1.0e-4", "lr: fast"))
    msg = err(p)
    assert msg.startswith(f"{p}:8: train.lr: input should be a valid number"), msg


def test_unknown_key_names_full_path(tmp_path):
    p = write(tmp_path, GOOD.replace("  path: some/model", "  path: some/model\n  lora: {rank: 4, alfa: 8}"))
    msg = err(p)
    assert f"{p}:4: model.lora.alfa: unknown key" in msg, msg


def test_missing_required_key(tmp_path):
    msg = err(write(tmp_path, GOOD.replace("  path: some/model\n", "  dtype: float32\n")))
    assert "model.path: field required" in msg, msg
    msg = err(write(tmp_path, "recipe: sft\nmodel: {path: m}\n"))
    assert "data: field required" in msg


def test_list_index_in_key_path(tmp_path):
    msg = err(write(tmp_path, GOOD.replace("    - path: data.jsonl", "    - path: data.jsonl\n    - {pth: x}")))
    assert "data.sources[1].pth: unknown key" in msg and "data.sources[1].path: field required" in msg, msg


def test_overrides_are_typed_and_named(tmp_path):
    p = write(tmp_path, GOOD)
    cfg = load_config(p, ["train.lr=3e-4", "train.grad_accum=4", "model.lora={rank: 8}", "data.shuffle=false"])
    assert cfg.train.lr == 3e-4 and cfg.train.grad_accum == 4 and cfg.model.lora.rank == 8 and not cfg.data.shuffle
    msg = err(p, ["train.lr=abc"])
    assert msg.startswith("override 'train.lr=abc': train.lr: input should be a valid number"), msg
    assert "override 'train.lrr=1': train.lrr: unknown key" in err(p, ["train.lrr=1"])
    assert "expected key.path=value" in err(p, ["train.lr"])
    assert "train.lr is not a section" in err(p, ["train.lr.x=1"])


def test_unknown_recipe_and_import_paths(tmp_path):
    p = write(tmp_path, GOOD)
    assert "unknown recipe 'dpoo'" in err(p, ["recipe=dpoo"])
    msg = err(p, ["data.transform=no_such_mod_xyz:fn"])
    assert "data.transform: cannot import module 'no_such_mod_xyz'" in msg and "override" in msg
    assert "module 'json' has no attribute 'nope'" in err(p, ["data.transform=json:nope"])
    assert load_config(p, ["data.transform=json:loads"]).data.transform == "json:loads"
    assert resolve_import_path("os.path:join", key="k") is __import__("os").path.join


def test_invalid_yaml_and_non_mapping(tmp_path):
    assert "invalid YAML" in err(write(tmp_path, "recipe: [sft\n"))
    assert "must be a mapping" in err(write(tmp_path, "- a\n- b\n"))
    assert "cannot read job file" in err(tmp_path / "missing.yaml")


def test_cli_validate(tmp_path, capsys):
    p = write(tmp_path, GOOD)
    assert main(["validate", str(p)]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["validate", str(p), "train.lr=abc"]) == 2
    assert "train.lr: input should be a valid number" in capsys.readouterr().err
    assert main(["validate", "--schema"]) == 0
    schema = __import__("json").loads(capsys.readouterr().out)
    assert {"recipe", "model", "data", "train", "compute"} <= set(schema["properties"])


def test_console_script_and_demo_job_validate(tiny_qwen3):
    # validate checks that the model directory exists: the demo's is built by `make demo`, so point it at a tiny one
    out = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "validate", "examples/sft_demo.yaml", f"model.path={tiny_qwen3}"],
        capture_output=True, text=True, cwd=__import__("pathlib").Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr
    assert "examples/sft_demo.yaml: ok" in out.stdout


def test_resolved_config_dump_round_trips(tmp_path):
    from posttrain.config import dump_config

    cfg = load_config(write(tmp_path, GOOD), ["train.grad_accum=2"])
    dump_config(cfg, tmp_path / "resolved.yaml")
    data = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    assert data["train"]["grad_accum"] == 2 and data["model"]["pad_vocab_to_multiple_of"] == 64
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_a_python_file_by_path_imports_modules_beside_it(tmp_path):
    """`path/to/rewards.py:fn` whose file imports a helper module next to it (as `python rewards.py` could)."""
    d = tmp_path / "user_code"
    d.mkdir()
    (d / "helper_beside_xyz.py").write_text("SCALE = 3\n")
    (d / "rewards_xyz.py").write_text("from helper_beside_xyz import SCALE\n\ndef fn(x):\n    return x * SCALE\n")
    assert resolve_import_path(f"{d / 'rewards_xyz.py'}:fn", key="grpo.rewards[0].fn")(2) == 6
