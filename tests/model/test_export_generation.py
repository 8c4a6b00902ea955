"""Export keeps the base model's generation config: every end-of-sequence id (Llama 3 stops on
`<|eot_id|>`, `<|eom_id|>` and `<|end_of_text|>`), its pad and sampling defaults, plus posttrain's
suppression of padded vocabulary rows."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor, LogitsProcessorList

from posttrain.config import ModelConfig
from posttrain.data.tokenizer import load_tokenizer
from posttrain.model.export import export_hf
from posttrain.model.load import load_model
from posttrain.tiny import LLAMA3_TEMPLATE, build_tiny_model, build_tokenizer

EOS = ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"]


@pytest.fixture(scope="module")
def llama3_base(tmp_path_factory):
    """A tiny Llama with a Llama-3.x-style tokenizer and generation_config.json (eos list, sampling)."""
    base = tmp_path_factory.mktemp("llama3")
    tok = build_tokenizer(base / "tok", chat_template=LLAMA3_TEMPLATE, bos="<|begin_of_text|>", eos="<|eot_id|>",
                          pad="<|finetune_right_pad_id|>", add_bos_token=True,
                          special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|end_of_text|>"])
    model_dir = build_tiny_model(base / "model", tok, family="llama")
    t = AutoTokenizer.from_pretrained(model_dir)
    ids = [t.convert_tokens_to_ids(x) for x in EOS]
    GenerationConfig(bos_token_id=t.bos_token_id, eos_token_id=ids, do_sample=True, temperature=0.6, top_p=0.9).save_pretrained(model_dir)
    return model_dir, ids


class ForceAt(LogitsProcessor):
    """Make `token` the only choice at the `step`-th new token."""

    def __init__(self, prompt_len: int, step: int, token: int):
        self.at, self.token = prompt_len + step, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.at:
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.token] = 0.0
            return forced
        return scores


def test_export_keeps_every_eos_id_and_generate_stops_on_each(llama3_base, tmp_path):
    model_dir, eos_ids = llama3_base
    cfg = ModelConfig(path=str(model_dir), pad_vocab_to_multiple_of=64)
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok, device=torch.device("cpu"), dtype=torch.float32)
    out = export_hf(model, tok, tmp_path / "hf")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == eos_ids
    assert (gen["do_sample"], gen["temperature"], gen["top_p"]) == (True, 0.6, 0.9)  # the base's sampling defaults
    assert gen["pad_token_id"] == tok.pad_token_id
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows > len(tok) and gen["suppress_tokens"] == list(range(len(tok), rows))
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    enc = tok2.apply_chat_template([{"role": "user", "content": "Add 1 and 2."}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)
    n = enc["input_ids"].shape[1]
    for eos in eos_ids:
        with torch.no_grad():
            seq = exported.generate(**enc, max_new_tokens=12, do_sample=False, logits_processor=LogitsProcessorList([ForceAt(n, 3, eos)]))
        assert seq.shape[1] == n + 4 and seq[0, -1].item() == eos, (eos, seq[0, n:].tolist())


def test_tokenizer_eos_joins_a_base_config_that_lacks_it(llama3_base, tmp_path):
    """A base whose generation config stops only on <|end_of_text|> (a Llama 3 *base* model) trained
    on chats that end turns with the tokenizer's <|eot_id|>: the export stops on both."""
    model_dir, (eot, _, end_of_text) = llama3_base
    cfg = ModelConfig(path=str(model_dir))
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok, device=torch.device("cpu"), dtype=torch.float32)
    model.generation_config.eos_token_id = end_of_text
    gen = json.loads((export_hf(model, tok, tmp_path / "hf") / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [end_of_text, eot]
