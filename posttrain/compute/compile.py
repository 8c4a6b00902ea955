"""`compute.compile`: every decoder layer compiled with `torch.compile`, in place.

Per-layer compilation (as torchtitan does) keeps compile time to one layer's graph, which every layer
of the model then shares (torch inlines the module's parameters as graph inputs instead of guarding
on each layer), and leaves everything around the layers eager: the model's embedding, mask and
rotary setup, the chunked head and loss, FSDP2's per-layer hooks. `module.compile()` rather than
`torch.compile(module)`: the layer stays the same object under the same name, so state-dict keys,
checkpoints, LoRA and export see no wrapper.

The per-document attention (`posttrain_packed`) reads the packing plan from the data (`.tolist()`);
it runs eager between the two compiled halves of each layer (it is excluded from tracing in
`model/attention.py`). What the compiler gains is the fusion of the rest: RMSNorm, rotary, SiLU and
the residual adds, forward and backward.

The last layer, where it runs at the target positions only (`model/tail.py`), is not compiled whole:
its two norms and its MLP are, each on its own with a symbolic length (the number of targets changes
every step), and so is the final norm. Measured on the demo model (fwd + bwd of uniform 1,664-token
rows, interleaved in-process A/Bs on the AVX-512 CPU of session 12, 48-72 calls each): eager 288 ms,
layers compiled without the last 251 ms (1.15x), with the last one's parts (q/k norms included) and
the final norm 236 ms (1.22x); in a second A/B eager 236 ms, with those parts 207 (1.14x), without the
q/k norms 201 (1.17x), without the input norm either 210 (1.12x).

Row lengths vary from step to step (packed rows end at a multiple of data.pack_to_multiple_of):
torch compiles the first shape statically and the second time with a symbolic length, then again
where a guard on that length fails and once more for held-out evaluation, which runs without grad: a
few compilations of 1-10 s each early in a run. The length guards come from inductor's C++ code,
which sums more than 4,096 floats in chunks (for precision): a q/k norm's weight gradient over 2
heads x 2,049+ positions, or 4 heads x 1,025+, is generated differently, so the first row on the
other side of such a length compiles the layers again (~0.6 s on 2 cores for the demo model).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..model.hf import decoder_layers, unwrap
from ..model.tail import pruned_layer


def backend_problem(device: torch.device) -> str | None:
    """Why torch.compile's default backend (inductor) cannot build code on `device`, or None. A tiny
    function is compiled and run: a missing C++ compiler (CPU) or Triton (GPU) shows up here, at
    setup, instead of as a traceback inside the first training step."""
    try:
        fn = torch.compile(lambda x: torch.nn.functional.silu(x) * 2 + 1, dynamic=False)
        x = torch.linspace(-1, 1, 8, device=device)
        if not torch.allclose(fn(x), torch.nn.functional.silu(x) * 2 + 1):
            return "the compiled probe computed a different result"
    except Exception as e:  # noqa: BLE001 - any failure means: do not compile here
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first[:300]}"
    return None


def usable(device: torch.device, say: Callable[[str], None], key: str = "compute.compile",
           instead: str = "training runs eager") -> bool:
    """Whether code can be compiled on `device` for the setting `key`; if not, say why and what runs
    `instead` (eager)."""
    problem = backend_problem(device)
    if problem is not None:
        say(f"{key}: torch.compile cannot build code on {device.type} here ({problem}); {instead}. On CPU inductor "
            f"needs a C++ compiler (g++ or clang++ on PATH, or CXX); on GPU, Triton. Set {key}: false to skip this check.")
    return problem is None


def compile_layers(model: torch.nn.Module, say: Callable[[str], None]) -> None:
    """Compile each decoder layer in place (after `usable` said yes). The last one cannot be compiled
    whole where losses run it at the target positions only (model/tail.py: a different forward per
    call, which the compiler would re-trace as the number of targets changes): its norms and MLP are
    compiled instead, with a symbolic length, and so is the final norm after it."""
    layers = decoder_layers(model)
    eager = pruned_layer(model)
    for layer in layers:
        if layer is not eager:
            layer.compile()
    parts = _tail_parts(model, eager)
    for part in parts:
        part.compile(dynamic=True)
    done = len(layers) - (eager is not None)
    say(f"compute.compile: {done} of {len(layers)} decoder layers compiled (torch.compile, per layer; the first steps compile)"
        + (f"; the last one's norms and MLP compiled on their own ({len(parts)} modules with the final norm), as it "
           "runs at the target positions only after its attention" if parts else ""))


def _tail_parts(model: torch.nn.Module, layer: torch.nn.Module | None) -> list[torch.nn.Module]:
    """The pruned last layer's modules that run whole whatever rows they get (its two norms and its MLP),
    and the decoder's final norm; none without a pruned layer. Not the q/k norms inside its attention
    (Qwen3): compiled on their own too, they made the step slower in the A/B of this module's
    docstring, each compiled region costing its guards and autograd wrapper per call."""
    if layer is None:
        return []
    parts = [layer.input_layernorm, layer.post_attention_layernorm, layer.mlp, getattr(unwrap(model).get_decoder(), "norm", None)]
    return [p for p in parts if isinstance(p, torch.nn.Module)]
