"""Model and template: a model that cannot be there fails at once (in `posttrain validate` too);
`model.chat_template` supplies or replaces the tokenizer's template and is exported with it."""

import json

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from posttrain.cli import main, run_job
from posttrain.config import ConfigError, JobConfig, ModelConfig, load_config
from posttrain.data.tokenizer import load_tokenizer
from posttrain.model.load import load_model
from posttrain.tiny import CHATML_TEMPLATE, build_tiny_model, build_tokenizer

from conftest import DEMO_DATA, _corpus, job_dict, write_jsonl


def write_job(path, job):
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "d.jsonl", DEMO_DATA.read_text().splitlines()[:16])


@pytest.mark.parametrize("path", ["./models/nope", "nope-model", "/no/such/model/dir", "a/b/c"])
def test_missing_local_model_fails_in_validate_and_at_load(tmp_path, data, capsys, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    job = write_job(tmp_path / "job.yaml", job_dict(path, data, tmp_path / "run"))
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {job}:3: model.path: no such directory {path!r} (relative paths start at {tmp_path}; a hub id is 'org/name')"
    with pytest.raises(ConfigError, match="model.path: no such directory"):
        load_model(ModelConfig(path=path), None, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ConfigError, match="model.tokenizer: no such directory 'tok/x/y'"):
        load_tokenizer(ModelConfig(path=path, tokenizer="tok/x/y"))


def test_hub_ids_are_left_to_the_hub_unless_offline(tiny_qwen3, tmp_path, data, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    job = write_job(tmp_path / "job.yaml", job_dict("some-org/some-model", data, tmp_path / "run"))
    assert main(["validate", str(job)]) == 0  # may be downloaded: not refused before the hub is asked
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["validate", str(job)]) == 2
    assert "model.path: no such directory 'some-org/some-model', and as a hub id it is not in the Hugging Face cache while the hub is offline" \
        in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not in the Hugging Face cache while the hub is offline"):
        load_tokenizer(ModelConfig(path="some-org/some-model"))
    # a directory shaped like a hub id that exists here is local
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "tiny").symlink_to(tiny_qwen3)
    assert load_tokenizer(ModelConfig(path="org/tiny")).chat_template == CHATML_TEMPLATE


@pytest.fixture(scope="module")
def no_template_model(tmp_path_factory):
    """A base model whose tokenizer has no chat template."""
    base = tmp_path_factory.mktemp("base")
    tok = build_tokenizer(base / "tok", chat_template=None, corpus=_corpus())
    return build_tiny_model(base / "model", tok)


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1 and 2."}, {"role": "assistant", "content": "3."}]


def test_chat_template_file_trains_a_base_model_and_is_exported(no_template_model, data, tmp_path, monkeypatch):
    assert AutoTokenizer.from_pretrained(no_template_model).chat_template is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chatml.jinja").write_text(CHATML_TEMPLATE)
    job = job_dict(no_template_model, data, tmp_path / "run", train={"steps": 2})
    with pytest.raises(Exception, match="chat template"):  # conversations need a template
        run_job(JobConfig.model_validate(job))
    job["model"]["chat_template"] = "chatml.jinja"  # relative to the current directory
    job["compute"]["output_dir"] = str(tmp_path / "run2")
    cfg = load_config(write_job(tmp_path / "job.yaml", job))
    assert cfg.model.chat_template == str(tmp_path / "chatml.jinja")  # stored absolute in the resolved config
    res = run_job(cfg)
    assert len(res["losses"]) == 2
    exported = AutoTokenizer.from_pretrained(res["export_dir"])
    base = AutoTokenizer.from_pretrained(no_template_model)
    assert exported.chat_template == CHATML_TEMPLATE
    for gen in (False, True):
        got = exported.apply_chat_template(CHAT[:-1] if gen else CHAT, tokenize=False, add_generation_prompt=gen)
        assert got == base.apply_chat_template(CHAT[:-1] if gen else CHAT, tokenize=False, add_generation_prompt=gen, chat_template=CHATML_TEMPLATE)
    assert exported.apply_chat_template(CHAT, tokenize=False).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_inline_and_json_templates_replace_the_tokenizers_and_bad_ones_fail_in_validate(tiny_qwen3, data, tmp_path, capsys, monkeypatch):
    inline = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>{% endfor %}"
    assert load_tokenizer(ModelConfig(path=str(tiny_qwen3), chat_template=inline)).chat_template == inline
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": inline}))
    assert load_tokenizer(ModelConfig(path=str(tiny_qwen3), chat_template=str(tmp_path / "chat_template.json"))).chat_template == inline
    monkeypatch.chdir(tmp_path)
    job = job_dict(tiny_qwen3, data, tmp_path / "run", model={"chat_template": "templates/missing.jinja"})
    assert main(["validate", str(write_job(tmp_path / "job.yaml", job))]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'job.yaml'}:5: model.chat_template: no such template file "
                                               f"'templates/missing.jinja' (relative paths start at {tmp_path}; an inline template contains '{{{{' or '{{%')")


@pytest.mark.parametrize("recipe,section,key", [("distill", {"teacher": "runs/no-teacher/hf"}, "teacher"),
                                                 ("dpo", {"reference": "./no-reference"}, "reference")])
def test_recipe_sections_naming_a_missing_model_fail_in_validate(tiny_qwen3, data, tmp_path, capsys, monkeypatch, recipe, section, key):
    monkeypatch.chdir(tmp_path)
    job = job_dict(tiny_qwen3, data, tmp_path / "run", recipe=recipe)
    job[recipe] = section
    path = write_job(tmp_path / "job.yaml", job)
    assert main(["validate", str(path)]) == 2
    line = next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if ln.strip().startswith(f"{key}:"))
    assert capsys.readouterr().err.strip() == f"error: {path}:{line}: {recipe}.{key}: no such directory {section[key]!r} " \
        f"(relative paths start at {tmp_path}; a hub id is 'org/name')"
    job[recipe] = {key: str(tiny_qwen3)}
    assert main(["validate", str(write_job(path, job))]) == 0
