"""A small layer over Ray actors, shaped like verl's single-controller API.

    pool  = ResourcePool(workers=4, cpus_per_worker=2, gpus_per_worker=1)   # one placement group
    group = WorkerGroup(MyWorker, pool, init_args=(cfg,))                   # N actors, one torch.distributed group
    group.call_all("setup")                  # same arguments to every rank -> list of results
    group.call_split("score", items)         # items split evenly across ranks, results gathered in order
    group.call_rank0("export", path)         # rank 0 only

Every worker class gets `rank`, `world_size` and an initialised process group (gloo on CPU, nccl
when its actor has a GPU), with the master address and a free port picked by rank 0. Only public
Ray APIs are used (actors, placement groups, scheduling strategies).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class DistributedWorker:
    """Base for worker classes: joins the group's torch.distributed process group."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), _free_port()

    def init_process_group(self, master_addr: str, master_port: int) -> str:
        import torch
        import torch.distributed as dist

        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
            RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
        )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(0)  # Ray exposes exactly this actor's GPU(s) as device 0..
        dist.init_process_group(backend, rank=self.rank, world_size=self.world_size)
        return backend

    def pid(self) -> int:
        return os.getpid()


@dataclass
class ResourcePool:
    workers: int
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0

    def placement_group(self):
        import ray
        from ray.util.placement_group import placement_group

        bundle = {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.gpus_per_worker else {})}
        pg = placement_group([bundle] * self.workers, strategy="PACK")
        ray.get(pg.ready(), timeout=300)
        return pg


class WorkerGroup:
    def __init__(self, cls: type, pool: ResourcePool, *, init_args: tuple = (), init_kwargs: dict | None = None,
                 env: dict[str, str] | None = None):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.pool = pool
        self.pg = pool.placement_group()
        remote = ray.remote(cls)
        self.workers = [
            remote.options(
                num_cpus=pool.cpus_per_worker,
                num_gpus=pool.gpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
                runtime_env={"env_vars": dict(env or {})},
            ).remote(r, pool.workers, *init_args, **(init_kwargs or {}))
            for r in range(pool.workers)
        ]
        addr, port = ray.get(self.workers[0].address.remote())
        self.backend = ray.get([w.init_process_group.remote(addr, port) for w in self.workers])[0]

    @property
    def world_size(self) -> int:
        return len(self.workers)

    def call_all_async(self, method: str, *args, **kwargs) -> list:
        return [getattr(w, method).remote(*args, **kwargs) for w in self.workers]

    def call_all(self, method: str, *args, **kwargs) -> list[Any]:
        import ray

        return ray.get(self.call_all_async(method, *args, **kwargs))

    def call_split(self, method: str, items: list, **kwargs) -> list[Any]:
        """Split `items` into contiguous, near-equal chunks (one per rank), call, concatenate results."""
        import ray

        n, k = len(items), self.world_size
        bounds = [n * r // k for r in range(k + 1)]
        refs = [getattr(w, method).remote(items[bounds[r]:bounds[r + 1]], **kwargs) for r, w in enumerate(self.workers)]
        return [x for part in ray.get(refs) for x in part]

    def call_rank0(self, method: str, *args, **kwargs) -> Any:
        import ray

        return ray.get(getattr(self.workers[0], method).remote(*args, **kwargs))

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for w in self.workers:
            ray.kill(w, no_restart=True)
        remove_placement_group(self.pg)
