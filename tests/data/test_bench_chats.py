"""The data of the SFT benchmark against TRL (benchmarks/vs_trl.py): the skewed set is skewed and the
uniform one is not, and the generation-marked ChatML that TRL trains with (assistant_only_loss) gives
exactly posttrain's token ids and loss mask, so both sides train on the same targets."""

import json
import statistics
import sys
from pathlib import Path

from posttrain.config import ModelConfig
from posttrain.data.chat import encode_messages
from posttrain.data.tokenizer import load_tokenizer
from posttrain.tiny import CHATML_GENERATION_TEMPLATE

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _vs_trl():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import vs_trl
    finally:
        sys.path.remove(str(BENCHMARKS))
    return vs_trl


def test_skewed_and_uniform_lengths(tiny_qwen3, tmp_path):
    vs_trl = _vs_trl()
    tok = load_tokenizer(ModelConfig(path=str(tiny_qwen3)))
    sets = {name: vs_trl.make_chats(tmp_path / f"{name}.jsonl", tok, tokens=30_000, max_len=1600, seed=1, **spec)
            for name, spec in vs_trl.DATASETS.items()}
    for info in sets.values():
        assert 30_000 <= sum(info["lens"]) < 30_000 + 1600 and max(info["lens"]) <= 1600
    sk, un = sets["skewed"]["lens"], sets["uniform"]["lens"]
    # skewed: from tens of tokens to many times the median (over 1,000 at the benchmark's size); uniform: p95 / p5 < 1.5
    assert min(sk) < 60 and max(sk) > 600 and max(sk) / statistics.median(sk) > 5
    q = statistics.quantiles(un, n=20)
    assert q[18] / q[0] < 1.5 and max(un) / min(un) < 2
    assert 0.6 < statistics.mean(sk) / statistics.mean(un) < 1.4  # about the same mean: comparable steps

    records = [json.loads(ln)["messages"] for ln in (tmp_path / "skewed.jsonl").read_text().splitlines()[:25]]
    for msgs in records:
        enc = encode_messages(tok, msgs)
        trl = tok.apply_chat_template(msgs, chat_template=CHATML_GENERATION_TEMPLATE, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        assert list(trl["input_ids"]) == list(enc.input_ids)
        assert list(trl["assistant_masks"]) == list(enc.loss_mask)
