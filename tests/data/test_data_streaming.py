"""Streaming for real: an S3 round trip against a local S3 server, and flat memory on a large file."""

import gc
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from posttrain.config import ConfigError
from posttrain.data.sources import Source


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto server did not start")
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    proc.terminate()
    proc.wait(10)
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_s3_round_trip_with_resume(s3_server, tmp_path):
    import s3fs

    opts = {"endpoint_url": s3_server}
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("posttrain-test")
    for name, rng in (("a.jsonl", range(0, 30)), ("b.jsonl", range(30, 50))):
        with fs.open(f"posttrain-test/chat/{name}", "wb") as f:
            f.write("".join(json.dumps({"i": i}) + "\n" for i in rng).encode())
    src = Source("s3://posttrain-test/chat/*.jsonl", window=8, seed=2, storage_options={"client_kwargs": opts})
    head = [json.loads(src.next()[1])["i"] for _ in range(21)]
    where, raw = src.next()
    head.append(json.loads(raw)["i"])
    assert where.startswith("s3://posttrain-test/chat/") and ".jsonl:" in where
    resumed = Source("s3://posttrain-test/chat/*.jsonl", window=8, seed=2, storage_options={"client_kwargs": opts})
    resumed.load_state_dict(src.state_dict())
    rest = []
    while (item := resumed.next()) is not None:
        rest.append(json.loads(item[1])["i"])
    everything = head + rest
    assert sorted(everything) == list(range(50))
    with pytest.raises(ConfigError, match="s3://posttrain-test/missing"):
        Source("s3://posttrain-test/missing/*.jsonl", storage_options={"client_kwargs": opts})
    with pytest.raises(ConfigError, match="s3://no-such-bucket"):
        Source("s3://no-such-bucket/x.jsonl", storage_options={"client_kwargs": opts})


def _rss_mb():
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def test_streaming_a_large_file_keeps_memory_flat(tmp_path):
    pytest.importorskip("psutil")
    path = tmp_path / "big.jsonl"
    line = json.dumps({"messages": [{"role": "user", "content": "x" * 900}, {"role": "assistant", "content": "y" * 900}]}) + "\n"
    with open(path, "w") as f:
        for _ in range(60):
            f.write(line * 2000)  # ~230 MB in all
    size_mb = path.stat().st_size / 2**20
    gc.collect()
    src = Source(str(path), window=1024)
    n, base = 0, None
    while src.next() is not None:
        n += 1
        if n == 5000:
            base = _rss_mb()
    growth = _rss_mb() - base
    assert n == 120_000 and size_mb > 200
    assert growth < 30, f"RSS grew {growth:.0f} MB while streaming a {size_mb:.0f} MB file"
