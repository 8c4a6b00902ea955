"""Data-parallel helpers: rank/world, reductions, FSDP2 sharding, gathering full weights."""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return rank_world()[1] > 1


def all_reduce(value: float | int, op: str = "sum") -> float:
    """Reduce a python number over ranks (identity in one process)."""
    return all_reduce_many([value], op)[0] if is_distributed() else value


def all_reduce_many(values: list[float], op: str = "sum") -> list[float]:
    """Reduce several python numbers over ranks in one collective (float64)."""
    if not is_distributed() or not values:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t.tolist()


class Root(torch.nn.Module):
    """The FSDP2 root around a model: `root(fn, *args)` runs `fn(model, *args)`, so FSDP2 gathers the
    root-level weights (embeddings, final norm, head) around *any* loss function (decoder + chunked
    head outside the model's own forward) and reduce-scatters their gradients, exactly as for a plain
    `model(...)` call. Without sharding it is a plain call."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def shard_fsdp2(
    model: torch.nn.Module, layers: list[torch.nn.Module], *, param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype = torch.float32,
) -> Root:
    """FSDP2 (`fully_shard`) over a 1-D DeviceMesh: each of `layers` (the decoder blocks), then a
    `Root` around the model; returns the root. Parameters stay in their loaded dtype; `param_dtype`
    (e.g. bf16 on GPU) is the compute dtype, gradients are reduced in `reduce_dtype`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _, world = rank_world()
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    root = Root(model)
    fully_shard(root, mesh=mesh, mp_policy=mp)
    return root


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every rank calls this (collective); rank 0 gets the full, unsharded weights on CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local_scalar(t) -> float:
    """A (possibly DTensor) scalar as a python float."""
    full = getattr(t, "full_tensor", None)
    return float(full() if full is not None else t)
