"""SPMD launch: N identical Ray workers each run the recipe on their data shard.

The driver stays thin: it starts (or joins) a Ray cluster, forms a worker group whose actors share
a torch.distributed process group, calls the recipe on every rank and returns rank 0's result. If a
worker dies, the group is torn down and started again; the recipe resumes from the newest complete
checkpoint (compute.resume: auto), up to compute.max_restarts times, each restart logged.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .. import atomic
from ..compute import interrupt
from ..compute.metrics import console
from ..compute.rundir import RunDir
from ..config import JobConfig, load_recipe
from .worker_group import DistributedWorker, ResourcePool, WorkerGroup


def prepare_worker(cfg_json: str, threads: int) -> JobConfig:
    """In a worker process: torch threads, quiet transformers, the job config."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return JobConfig.model_validate_json(cfg_json)


def run_recipe(cfg: JobConfig, run_dir: str) -> dict:
    """Run the job's recipe on this rank, then leave the process group."""
    try:
        return load_recipe(cfg)(cfg, Path(run_dir))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class RecipeWorker(DistributedWorker):
    def __init__(self, rank: int, world_size: int, cfg_json: str, threads: int):
        super().__init__(rank, world_size)
        self.cfg = prepare_worker(cfg_json, threads)

    def run(self, run_dir: str) -> dict:
        return run_recipe(self.cfg, run_dir)


def _ray_init(address: str | None, cfg: JobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH", "")] if p)}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        # a recipe's own actors (e.g. a rollout engine placed apart) declare what they need
        extra = getattr(cfg.section, "ray_resources", dict)()
        cpus = max(cfg.compute.workers * cfg.compute.cpus_per_worker + extra.get("CPU", 0), os.cpu_count() or 1)
        ray.init(num_cpus=math.ceil(cpus), include_dashboard=False, runtime_env=env, log_to_driver=True)


def _gather(refs: list) -> list:
    """Results in rank order; the first failure is raised at once (the other ranks may be blocked in a
    collective waiting for a dead peer, so waiting for all of them could hang)."""
    import ray

    index = {r: i for i, r in enumerate(refs)}
    results, pending = [None] * len(refs), list(refs)
    while pending:
        # with a timeout, so that the driver's signal handler (Ctrl-C: a stop request) runs meanwhile
        done, pending = ray.wait(pending, num_returns=1, timeout=0.1)
        if not done:
            continue
        try:
            results[index[done[0]]] = ray.get(done[0])
        except ray.exceptions.RayTaskError:
            # A rank whose peer died fails in its collective (a gloo/nccl error) and may be seen first:
            # if another actor died, that death is the cause to report (and to restart from).
            for ref in ray.wait(pending, num_returns=len(pending), timeout=30)[0] if pending else []:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:
                    raise
                except Exception:
                    pass
            raise
    return results


def launch(cfg: JobConfig, run_dir: Path, *, ray_address: str | None = None) -> dict:

    _ray_init(ray_address, cfg)
    c = cfg.compute
    pool = ResourcePool(workers=c.workers, cpus_per_worker=c.cpus_per_worker, gpus_per_worker=c.gpus_per_worker)
    threads = c.threads or max(1, int(c.cpus_per_worker))
    stop = RunDir(run_dir).stop_request
    # Ctrl-C / SIGTERM here: the workers stop after the same step and checkpoint (Engine.steps reads
    # the request); a second signal shuts the group down at once.
    with interrupt.deferred(on_request=lambda signum: atomic.write_text(stop, str(signum))):
        try:
            return _run_group(cfg, run_dir, pool, threads)
        finally:
            stop.unlink(missing_ok=True)


def _run_group(cfg: JobConfig, run_dir: Path, pool: ResourcePool, threads: int) -> dict:
    import ray

    c = cfg.compute
    attempt = 0
    while True:
        if c.worker_group == "verl":  # the same workers as actors of Verl's RayWorkerGroup
            from .verl_group import VerlGroup

            group = VerlGroup(pool, cfg.model_dump_json(), threads)
        else:
            group = WorkerGroup(RecipeWorker, pool, init_args=(cfg.model_dump_json(), threads))
        try:
            return _gather(group.call_all_async("run", str(run_dir)))[0]
        except ray.exceptions.RayTaskError as e:  # the recipe raised: a bug or bad input, not a crash
            raise e.cause if isinstance(e.cause, Exception) else e
        except ray.exceptions.RayActorError as e:
            attempt += 1
            if attempt > c.max_restarts:
                raise RuntimeError(
                    f"a worker died {attempt} times (compute.max_restarts={c.max_restarts}); last cause: {e}"
                ) from e
            console.print(f"[bold red]worker died[/] ({type(e).__name__}); restart {attempt}/{c.max_restarts} "
                          "from the newest checkpoint")
        finally:
            group.shutdown()
