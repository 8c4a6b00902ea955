"""Shared fixtures: tiny models + tokenizers built locally and saved, loaded back via from_pretrained."""

import json
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.tiny import (
    CHATML_TEMPLATE,
    LLAMA3_SPECIALS,
    LLAMA3_TEMPLATE,
    build_tiny_model,
    build_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = ROOT / "examples" / "data" / "demo_chat.jsonl"


def _corpus():
    lines = DEMO_DATA.read_text().splitlines()[:300]
    return [m["content"] for ln in lines for m in json.loads(ln)["messages"]]


def _build(tmp_path_factory, family):
    base = tmp_path_factory.mktemp(f"tiny-{family}")
    if family != "llama":
        tok = build_tokenizer(base / "tok", chat_template=CHATML_TEMPLATE, corpus=_corpus())
    else:
        tok = build_tokenizer(
            base / "tok", chat_template=LLAMA3_TEMPLATE, bos=LLAMA3_SPECIALS["bos"], eos=LLAMA3_SPECIALS["eos"],
            pad=LLAMA3_SPECIALS["pad"], special_tokens=LLAMA3_SPECIALS["extra"], add_bos_token=True, corpus=_corpus(),
        )
    return build_tiny_model(base / "model", tok, family=family)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "qwen3")


@pytest.fixture(scope="session")
def tiny_qwen3_h32(tmp_path_factory) -> Path:
    """Qwen3 with head_dim 32: the smallest head size vLLM's CPU attention supports (16 is not)."""
    base = tmp_path_factory.mktemp("tiny-qwen3-h32")
    tok = build_tokenizer(base / "tok", chat_template=CHATML_TEMPLATE, corpus=_corpus())
    return build_tiny_model(base / "model", tok, family="qwen3", hidden_size=64, num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "llama")


@pytest.fixture(params=["qwen3", "llama"])
def tiny_model(request) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> Path:
    """Gemma3ForCausalLM: tied embeddings, final_logit_softcapping=2, sliding + full attention."""
    return _build(tmp_path_factory, "gemma3")


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory) -> Path:
    """Qwen3MoeForCausalLM: layer 0 dense, layer 1 with 4 experts (top-2), output_router_logits on."""
    return _build(tmp_path_factory, "qwen3_moe")


ALL_FAMILIES = ["qwen3", "llama", "gemma3", "qwen3_moe"]


@pytest.fixture(params=ALL_FAMILIES)
def any_family(request) -> tuple[str, Path]:
    """(family name, tiny model dir) for every supported family."""
    return request.param, request.getfixturevalue(f"tiny_{request.param}")


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def job_dict(model_dir, data_path, out_dir, **sections) -> dict:
    """A small SFT job as a dict (the YAML file's content); `sections` update it per section.
    Periodic checkpoints are off (`checkpoint_every: null`): the default, auto, would write one after
    nearly every step of these few-step runs (~80 ms each); tests of checkpointing set it."""
    job = {
        "recipe": "sft",
        "model": {"path": str(model_dir), "dtype": "float32"},
        "data": {"sources": [{"path": str(data_path)}], "max_seq_len": 128, "max_tokens_per_batch": 512},
        "train": {"lr": 1e-3, "steps": 4, "seed": 0},
        "compute": {"device": "cpu", "output_dir": str(out_dir), "progress": False, "checkpoint_every": None},
    }
    for k, v in sections.items():
        job.setdefault(k, {}).update(v) if isinstance(v, dict) else job.__setitem__(k, v)
    return job


def qa_to_messages(rec):
    """A user transform plugged in by import path in tests: {q, a} -> messages."""
    return {"messages": [{"role": "user", "content": rec["q"]}, {"role": "assistant", "content": rec["a"]}]}


_seen = {"n": 0}


def explode_on_third(rec):
    """A transform that fails inside the background data thread."""
    _seen["n"] += 1
    if _seen["n"] == 3:
        raise RuntimeError("boom on record 3")
    return rec


def kill_once(rec):
    """A transform that SIGKILLs its own (worker) process the first time it meets a record carrying
    `kill_marker`, then never again (the marker file remembers): a worker crash in the middle of a run."""
    import os
    import signal
    from pathlib import Path

    marker = rec.pop("kill_marker", None)
    if marker and not Path(marker).exists():
        Path(marker).write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)
    return rec


def sigterm_once(rec):
    """A transform that sends SIGTERM to its own (worker) process the first time it meets a record
    carrying `sigterm_marker` (a scheduler stopping one worker), then never again."""
    import os
    import signal
    from pathlib import Path

    marker = rec.pop("sigterm_marker", None)
    if marker and not Path(marker).exists():
        Path(marker).write_text("signalled")
        os.kill(os.getpid(), signal.SIGTERM)
    return rec


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """Prompt = the last user turn of a demo conversation; chosen its answer; rejected a wrong one."""
    rng = random.Random(seed)
    recs = []
    for ln in DEMO_DATA.read_text().splitlines()[:n]:
        m = json.loads(ln)["messages"]
        q, a = m[-2]["content"], m[-1]["content"]
        wrong = a[:-1] + rng.choice([" maybe.", "!", " or not."])
        prompt = q if rng.random() < 0.5 else m[:-1]  # a string, or the conversation so far
        recs.append({"prompt": prompt, "chosen": a, "rejected": {"role": "assistant", "content": wrong}})
    return recs


def run_and_kill(job_file, run_dir, kill_at, sig=signal.SIGKILL, returncode=None) -> str:
    """Start `posttrain run` in a subprocess; send it `sig` (SIGKILL) once metrics show step >=
    kill_at; check its exit status (default: killed by `sig`); return its stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "run", str(job_file)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(l)["step"] >= kill_at for l in metrics.read_text().splitlines() if l.endswith("}")):
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == (-sig if returncode is None else returncode), err[-3000:]
    return err


def load_padded(path, pad_rows=0, seed=0):
    """A tiny model through plain from_pretrained (sdpa), with `pad_rows` padded vocabulary rows made
    large so that they would matter if they leaked into a softmax; returns (model, real vocab)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    real = m.config.vocab_size
    if pad_rows:
        m.resize_token_embeddings(real + pad_rows, mean_resizing=False)
        with torch.no_grad():
            m.get_output_embeddings().weight[real:] = m.get_output_embeddings().weight[:pad_rows] * 3
    return m, real


def random_batch(V, seed=0):
    """Two unpacked rows of 30 random ids with some -100 labels: 49 targets after the shift (a chunk
    of 3 or 7 does not divide them)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 30), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, :3] = -100
    labels[1, 20:22] = -100
    return {"input_ids": ids, "labels": labels}


# Every file layout a source reads (posttrain/data/layouts.py), written from the same records.
LAYOUTS = ["jsonl_folder", "json_array", "json_lines", "parquet", "arrow_stream", "arrow_file", "hf_dataset", "hf_dataset_dict",
           "txt_lines", "txt_documents"]


def write_layout(root: Path, layout: str, records: list[dict]) -> dict:
    """Write `records` under `root` in `layout`; return the `data.sources` entry that reads them.
    The txt layouts take each record's "text"."""
    root.mkdir(parents=True, exist_ok=True)
    if layout == "jsonl_folder":  # shards in a folder (one gzipped, one nested) beside files that are not data
        import gzip

        third = -(-len(records) // 3)
        write_jsonl(root / "part-0.jsonl", records[:third])
        with gzip.open(root / "part-1.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in records[third: 2 * third])
        (root / "more").mkdir(exist_ok=True)
        write_jsonl(root / "more" / "part-2.jsonl", records[2 * third:])
        (root / "README.md").write_text("# my data\n")
        (root / ".cache.jsonl").write_text("not data\n")
        return {"path": str(root)}
    if layout == "json_array":
        (root / "data.json").write_text(json.dumps(records, indent=2))
        return {"path": str(root / "data.json")}
    if layout == "json_lines":
        write_jsonl(root / "data.json", records)
        return {"path": str(root / "data.json")}
    if layout == "txt_lines":
        (root / "data.txt").write_text("".join(r["text"].replace("\n", " ") + "\n\n" for r in records))  # blank lines skipped
        return {"path": str(root / "data.txt")}
    if layout == "txt_documents":
        for i, r in enumerate(records):
            (root / f"doc-{i:04d}.txt").write_text(r["text"])
        return {"path": str(root), "sample_by": "document"}
    import pyarrow as pa

    if layout == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), root / "data.parquet", row_group_size=max(1, len(records) // 3))
        return {"path": str(root / "data.parquet")}
    if layout == "arrow_file":  # Arrow IPC file format
        table = pa.Table.from_pylist(records)
        with pa.ipc.new_file(root / "data.arrow", table.schema) as w:
            w.write_table(table, max_chunksize=7)
        return {"path": str(root / "data.arrow")}
    import datasets

    ds = datasets.Dataset.from_list(records)
    if layout == "arrow_stream":  # the IPC stream file `datasets` writes (its cache and save_to_disk shards)
        ds.save_to_disk(root / "saved")
        (shard,) = (root / "saved").glob("*.arrow")
        shard.rename(root / "train.arrow")
        return {"path": str(root / "train.arrow")}
    if layout == "hf_dataset":
        ds.save_to_disk(root / "ds", num_shards=2)
        return {"path": str(root / "ds")}
    if layout == "hf_dataset_dict":
        datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(root / "dd")
        return {"path": str(root / "dd")}
    raise ValueError(layout)


def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (`run-<id>.wandb`): a 7-byte file header, then
    LevelDB-log chunks (checksum, length, type) in 32 KiB blocks; each record a protobuf Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, buf, out = path.read_bytes(), 7, b"", []
    assert raw[:4] == b":W&B", path
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos: pos + 7])
        if kind == 0:
            break
        buf += raw[pos + 7: pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def wandb_offline_runs(root: Path) -> dict[str, dict]:
    """{offline run dir name: {"id", "project", "name", "tags", "history": {step: {key: value}}}}."""
    runs = {}
    for d in sorted((root / "wandb").glob("offline-run-*")):
        (log,) = d.glob("run-*.wandb")
        info = {"history": {}}
        for rec in wandb_records(log):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                info.update(id=rec.run.run_id, project=rec.run.project, name=rec.run.display_name, tags=list(rec.run.tags))
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                info["history"][rec.history.step.num] = items
        runs[d.name] = info
    return runs
