"""A job on an existing Ray cluster started with `ray start --head` (its own module: `ray stop`
ends every Ray process of this machine, so it must not run while another module's cluster is up)."""

import os
import socket
import subprocess
import sys

import pytest
import yaml

pytest.importorskip("ray")

from test_spmd import _job, _losses, fixed_len_data  # noqa: E402,F401

from conftest import ROOT  # noqa: E402


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_existing_cluster_via_ray_start(tiny_qwen3, fixed_len_data, tmp_path):
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    port = _free_port()
    # token auth off on both sides: a throwaway cluster on 127.0.0.1 for this test only
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "RAY_AUTH_MODE": "disabled"}
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                    "--include-dashboard=false", "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=120)
    try:
        job_file = tmp_path / "job.yaml"
        job_file.write_text(yaml.safe_dump(_job(tiny_qwen3, fixed_len_data, tmp_path / "run", 2, 1, steps=2)))
        out = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(job_file), "--ray-address", f"127.0.0.1:{port}"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert len(_losses(tmp_path / "run")) == 2 and (tmp_path / "run" / "hf" / "model.safetensors").exists()
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


