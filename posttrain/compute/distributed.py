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
    if not is_distributed():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t.item()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of an HF causal LM (through a peft wrapper)."""
    from ..model.load import unwrap

    decoder = unwrap(model).get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(decoder).__name__} has no .layers; cannot shard it per decoder layer")
    return list(layers)


class LossModule(torch.nn.Module):
    """The FSDP2 root: its forward is our loss (decoder + chunked head outside the model's own
    forward), so FSDP2 gathers the root-level weights (embeddings, final norm, head) around it and
    reduce-scatters their gradients, exactly as for a plain `model(...)` call."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, vocab_size: int | None, *, chunk_tokens: int | None = None):
        from ..model.loss import lm_loss

        return lm_loss(self.model, batch, vocab_size, chunk_tokens=chunk_tokens)


def shard_fsdp2(model: torch.nn.Module, *, param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype = torch.float32) -> LossModule:
    """FSDP2 (`fully_shard`) over a 1-D DeviceMesh: each decoder layer, then a `LossModule` root around
    the model; returns the root (call it as the loss function). Parameters stay in their loaded dtype;
    `param_dtype` (e.g. bf16 on GPU) is the compute dtype, gradients are reduced in `reduce_dtype`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _, world = rank_world()
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    root = LossModule(model)
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
