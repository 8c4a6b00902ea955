"""The per-family table: which architectures are verified, and what their parts are called.

A family is *supported* when `posttrain verify` passes for it (packed and unpacked, chunked head,
LoRA, padded vocabulary, export) and a tiny model of its real transformers config class is in the
test suite. How to add one: docs/models.md.

Per family:
- `architectures`: the `config.architectures` / model class names that map to it.
- LoRA roles -> module-name suffixes (`attention`, `mlp`, `head`), so a job says
  `lora: {target: [attention, mlp]}` and never needs to know `q_proj` naming.
- `experts`: MoE expert weights. In transformers 5.x they are fused 3-D nn.Parameters
  ([num_experts, out, in]) inside one `experts` module, not nn.Linear modules, so peft targets them
  with `target_parameters` (a LoRA per parameter, shared across experts' stacked matrices).
- `router`: the router module (never LoRA-targeted: a low-rank update of a tiny [E, H] matrix buys
  nothing and destabilises routing).
- `quirks`: what the training path must honour (documented, and exercised by the verifier).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import ConfigError
from .hf import unwrap

ROLES = ("attention", "mlp", "head")
# module names shared by the verified families (and used by the FLOP counter, model/flops.py)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
EXPERT_PARAMS = ("experts.gate_up_proj", "experts.down_proj")  # fused MoE expert weights in a layer's mlp


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    attention: tuple[str, ...] = ATTENTION
    mlp: tuple[str, ...] = MLP
    head: tuple[str, ...] = ("lm_head",)
    experts: tuple[str, ...] = ()  # parameter paths relative to a decoder layer, for target_parameters
    router: str | None = None
    quirks: tuple[str, ...] = field(default_factory=tuple)

    def role_suffixes(self, role: str) -> tuple[str, ...]:
        return getattr(self, role)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", ("LlamaForCausalLM",), quirks=("Llama 3.x rope scaling comes from the config",)),
        Family("qwen3", ("Qwen3ForCausalLM",), quirks=("q/k RMSNorm inside attention",)),
        Family(
            "gemma3",
            ("Gemma3ForCausalLM",),
            quirks=(
                "final_logit_softcapping: logits = cap * tanh(logits / cap), applied by our head",
                "tied input/output embeddings (LoRA 'head' refused: merging would change the embeddings)",
                "embeddings scaled by sqrt(hidden) inside the decoder; sliding-window + full layers",
            ),
        ),
        Family(
            "qwen3_moe",
            ("Qwen3MoeForCausalLM",),
            # peft 0.21 rewrites every `*.gate_proj/up_proj/down_proj` target of a Qwen3-MoE model to the
            # fused expert parameters (its transformers v4->v5 adapter conversion), also for the dense
            # MLP layers of `mlp_only_layers`, so the 'mlp' role cannot be honoured: refused when asked.
            mlp=(),
            experts=tuple(f"mlp.{p}" for p in EXPERT_PARAMS),
            router="mlp.gate",
            quirks=(
                "experts are fused 3-D parameters (LoRA via peft target_parameters)",
                "router load-balancing loss (router_aux_loss_coef) when output_router_logits is on",
                "no 'mlp' role (see above): the MLP weights are adapted through the 'experts' option",
            ),
        ),
    )
}


def supported_architectures() -> list[str]:
    return sorted(a for f in FAMILIES.values() for a in f.architectures)


def family_of(model_or_config) -> Family | None:
    """The family of a model (or its config), by class name / config.architectures."""
    names = []
    if isinstance(model_or_config, torch.nn.Module):
        base = unwrap(model_or_config)
        names.append(type(base).__name__)
        cfg = base.config
    else:
        cfg = model_or_config
    names += list(getattr(cfg, "architectures", None) or [])
    for f in FAMILIES.values():
        if any(n in f.architectures for n in names):
            return f
    return None


def check_supported(model: torch.nn.Module, *, allow_unverified: bool) -> Family | None:
    fam = family_of(model)
    if fam is None and not allow_unverified:
        raise ConfigError(
            f"model.path: architecture {type(model).__name__} is not a verified family; supported: "
            f"{', '.join(supported_architectures())}. Set model.allow_unverified: true to train it anyway "
            "(first run `posttrain verify MODEL_DIR`; see docs/models.md to add a family)."
        )
    return fam


def _tied(model: torch.nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight is inp.weight


def lora_targets(
    model: torch.nn.Module, fam: Family | None, roles: list[str], experts: bool, *, explicit: bool = True
) -> tuple[list[str], list[str]]:
    """Roles -> (peft target_modules as full module names, peft target_parameters).

    Only nn.Linear modules are matched, by suffix, so a role that a family lacks in some layers
    (e.g. dense 'mlp' in an all-MoE Qwen3-MoE) simply matches fewer modules; a selection that
    matches nothing at all is refused."""
    if fam is None:
        raise ConfigError(
            "model.lora.target: roles need a verified family to map them to module names; this model is "
            "unverified (model.allow_unverified), so give model.lora.target_modules (peft names) instead"
        )
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise ConfigError(f"model.lora.target: unknown role(s) {bad}; choose from {list(ROLES)}")
    if "head" in roles and _tied(model):
        raise ConfigError(
            f"model.lora.target: 'head' on {fam.name}: the output head is tied to the input embeddings, so a "
            "merged LoRA on it would also change the embeddings; drop 'head' from the roles"
        )
    missing = [r for r in roles if not fam.role_suffixes(r)]
    if missing and explicit:
        hint = " (its MLPs are experts: use model.lora.experts: true)" if fam.experts and "mlp" in missing else ""
        raise ConfigError(f"model.lora.target: {fam.name} has no LoRA-targetable {missing} modules{hint}")
    suffixes = {s for r in roles for s in fam.role_suffixes(r)}
    modules = [
        name for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in suffixes
    ]
    params: list[str] = []
    if experts:
        if not fam.experts:
            raise ConfigError(f"model.lora.experts: true, but {fam.name} has no MoE experts")
        names = {n for n, _ in model.named_parameters()}
        params = list(fam.experts)
        for p in params:
            if not any(n.endswith(p) for n in names):
                raise ConfigError(f"model.lora.experts: expected expert parameters '*.{p}' in {fam.name}, found none")
    if not modules and not params:
        raise ConfigError(f"model.lora.target: roles {roles} match no linear module of this {fam.name} model")
    return modules, params
