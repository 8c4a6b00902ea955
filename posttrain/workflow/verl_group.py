"""posttrain's workers as actors of Verl's `RayWorkerGroup` (`compute.worker_group: verl`).

For teams whose Ray clusters run Verl: the same recipe (SFT, DPO, distillation, GRPO with its
rollout engine beside rank 0) runs on workers that Verl's single controller created, placed by
Verl's `RayResourcePool` (one bundle per worker; on CPU `use_gpu=False`, `max_colocate_count=1`,
`device_name="cpu"`). Verl's `Worker` base class provides rank, world size and the master address
in the environment; the worker joins a torch.distributed group from it (gloo on CPU, nccl on GPU),
so everything after that is identical to posttrain's own worker group (`worker_group.py`).

Install: `pip install --no-deps verl` (its pins, e.g. transformers < 5.11, clash with ours; the
controller API used here does not need them) plus `pip install posttrain[verl]` (omegaconf,
tensordict). Tested with verl 0.9.1.
"""

from __future__ import annotations

import os

import ray
import torch
import torch.distributed as dist
from verl.single_controller.base import Worker
from verl.single_controller.base.decorator import Dispatch, register
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup

from .spmd import prepare_worker, run_recipe
from .worker_group import ResourcePool


class VerlRecipeWorker(Worker):
    def __init__(self, cfg_json: str, threads: int):
        super().__init__()  # rank / world size / master address from Verl's environment
        self.cfg = prepare_worker(cfg_json, threads)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(0)
        dist.init_process_group(backend, rank=self.rank, world_size=self.world_size,
                                init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def run(self, run_dir: str) -> dict:
        return run_recipe(self.cfg, run_dir)


class VerlGroup:
    """The face `spmd.launch` uses (`call_all_async`, `shutdown`) over a Verl RayWorkerGroup."""

    def __init__(self, pool: ResourcePool, cfg_json: str, threads: int):
        gpu = pool.gpus_per_worker > 0
        self.pool = RayResourcePool(process_on_nodes=[pool.workers], use_gpu=gpu, max_colocate_count=1)
        cls = RayClassWithInitArgs(cls=ray.remote(VerlRecipeWorker), cfg_json=cfg_json, threads=threads)
        self.group = RayWorkerGroup(resource_pool=self.pool, ray_cls_with_init=cls, device_name="cuda" if gpu else "cpu")

    def call_all_async(self, method: str, *args, **kwargs) -> list:
        return self.group.execute_all_async(method, *args, **kwargs)

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for w in self.group.workers:
            ray.kill(w, no_restart=True)
        for pg in self.pool.pgs or []:
            remove_placement_group(pg)
