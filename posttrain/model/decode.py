"""Batched sampling with a KV cache, for the HF rollout engine: the model's own forward (any family:
its masks, sliding windows, soft-capping), one prefill over the distinct prompts, then one token per
row per step, without transformers `generate`'s per-step machinery.

The same results as `generate(..., do_sample=..., num_return_sequences=n)` with left padding:
positions from the attention mask's cumsum (pads at 0), then +1 a step; greedy = argmax of the
logits over the real vocabulary. Sampling: logits / T, then top-k, then top-p (HF's warpers, in that
order), over the real vocabulary only (padded embedding rows are never sampled), from a
`torch.Generator` seeded per call (the global RNG is untouched). Each sampled token's log-prob is
the log-softmax of that processed distribution.

Rows that stopped leave the batch once a quarter of it has (their KV cache rows are copied out then,
not at every stop), so a step computes only rows still generating; every row gets one uniform per step
whatever the batch holds, so the rows that go on sample exactly what they would have. The demo's
16 prompts x 8 (completions of ~8 tokens, a few run to 24): 159 instead of 189 ms per call.

With `compiled=True` (the HF engine's `compile`), FastForward's decode steps run through one
torch.compile'd function over the whole KV buffers (their unwritten positions masked), whose shapes do
not change from step to step; rows that stop then stay in the batch. The choice of the next token
(`_pick`) is compiled too, and on CPU both use inductor's C++ wrapper. Each step but the last is one
compiled call (`FastForward._advance`: pick, record, mark the key, decode): 102.2 vs 107.6 ms per
generation (session 14, interleaved in-process A/B of 16 calls each; the same tokens and log-probs). The benchmark's generation (8
prompts x 8 samples x 32 tokens, the demo model, interleaved A/Bs of 8-16 calls): 138 instead of 193 ms
(session 12), then 143 vs 156 with the C++ wrapper and 138.5 vs 140.6 with `_pick` compiled (session
13); the same tokens, log-probs within 1e-6; the first call compiles (~8-12 s on 2 CPU cores). Its
attention is two batched matmuls and a softmax (`_one_query_attention`): compiled, 139 ms against 153
with the CPU flash kernel.

Attention: `ATTN`, SDPA with grouped-query heads passed to the kernel as they are. transformers'
`sdpa` repeats every cached K/V head for a GQA model whenever there is a padding mask (needed for
CUDA kernels), which on CPU is most of a decode step; on CPU this one lets the kernel broadcast
(the same values), elsewhere it is transformers' `sdpa`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTN = "posttrain_sdpa"


def _sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    groups = getattr(module, "num_key_value_groups", 1)
    if (query.device.type != "cpu" or groups == 1 or attention_mask is None or kwargs.get("position_bias") is not None
            or kwargs.get("cache") is not None or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                                           scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Register `ATTN` (attention and its mask: transformers' SDPA mask) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN, _sdpa)
    AttentionMaskInterface.register(ATTN, sdpa_mask)
    return ATTN


class PreallocLayer(DynamicLayer):
    """A full-attention cache layer that writes into a buffer of its final length (`capacity`)
    instead of concatenating the whole cache every step."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, key_states.device
            b, h, _, d = key_states.shape
            self.kbuf = key_states.new_empty(b, h, self.capacity, d)
            self.vbuf = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
            self.size, self.is_initialized = 0, True
        end = self.size + key_states.shape[-2]
        self.kbuf[:, :, self.size : end] = key_states
        self.vbuf[:, :, self.size : end] = value_states
        self.size = end
        self.keys, self.values = self.kbuf[:, :, :end], self.vbuf[:, :, :end]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.kbuf, self.vbuf = self.kbuf.repeat_interleave(repeats, 0), self.vbuf.repeat_interleave(repeats, 0)
            self.keys, self.values = self.kbuf[:, :, : self.size], self.vbuf[:, :, : self.size]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.kbuf, self.vbuf = self.kbuf[indices], self.vbuf[indices]
            self.keys, self.values = self.kbuf[:, :, : self.size], self.vbuf[:, :, : self.size]


def process_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """HF's warpers, in generate's order: / temperature, top-k, top-p (filtered logits -> -inf)."""
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        s, idx = torch.sort(logits, descending=False)
        drop = s.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False  # keep at least the most likely
        logits = logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    return logits


class HFForward:
    """The model's own forward with a KV cache (any family: its masks, sliding windows, soft-capping)."""

    def __init__(self, model, capacity: int):
        self.model = model
        self.cache = DynamicCache(config=model.config)  # full-attention layers write into a buffer of the final length
        self.cache.layers = [PreallocLayer(capacity) if type(layer) is DynamicLayer else layer for layer in self.cache.layers]

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self.cache,
                          use_cache=True, logits_to_keep=1).logits[:, -1]

    def repeat(self, n: int) -> None:
        self.cache.batch_repeat_interleave(n)

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)


FAST_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def fast_supported(model) -> bool:
    """A plain pre-norm decoder that `FastForward` computes exactly like the model's own forward: a
    Llama / Mistral / Qwen2 / Qwen3 with full attention in every layer, SiLU MLP, RMSNorm and no
    logit soft-capping. Anything else decodes through `HFForward`."""
    cfg = model.config
    full = all(t == "full_attention" for t in getattr(cfg, "layer_types", None) or ["full_attention"])
    windows = getattr(cfg, "use_sliding_window", False) or cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None)
    return (cfg.model_type in FAST_FAMILIES and getattr(cfg, "hidden_act", None) == "silu" and full and not windows
            and getattr(cfg, "pretraining_tp", 1) == 1 and getattr(cfg, "final_logit_softcapping", None) is None)


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    # transformers' LlamaRMSNorm: normalised in fp32, cast back, then scaled
    return F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon).to(x.dtype) * norm.weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


def _fused(*linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = torch.cat([m.weight for m in linears])
    return w, torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None


class FastForward:
    """The decoder of a `fast_supported` model as a few tensor ops per layer: q/k/v and gate/up as one
    matmul each (weights concatenated once per call), K/V written into preallocated buffers, SDPA with
    grouped-query heads as they are. Per decode step it runs about half the ops of the model's own
    forward (no cache objects, no mask construction, no module hooks), which on CPU is where a small
    model's decode time goes; the same logits to ~1e-6 (tests/workflow/test_rollout.py). vLLM's model
    code does the same for speed; it is written here because the HF engine is what runs where vLLM
    does not, and the reference vLLM is tested against."""

    def __init__(self, model, capacity: int, compiled: bool = False):
        inner = model.model
        self.embed, self.final_norm, self.head = inner.embed_tokens, inner.norm, model.lm_head
        if compiled:  # static shapes: a few capacities, each compiled once (see _compiled)
            capacity = -(-capacity // CAPACITY_STEP) * CAPACITY_STEP
        cfg = model.config
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            qkv, qkv_b = _fused(a.q_proj, a.k_proj, a.v_proj)
            gu, gu_b = _fused(m.gate_proj, m.up_proj)
            self.layers.append((layer.input_layernorm, qkv, qkv_b, getattr(a, "q_norm", None), getattr(a, "k_norm", None), a.o_proj,
                                layer.post_attention_layernorm, gu, gu_b, m.down_proj, a.scaling))
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.inter = cfg.intermediate_size
        w = self.embed.weight
        self.cos, self.sin = (t[0] for t in inner.rotary_emb(w[:1], torch.arange(capacity, device=w.device)[None]))
        self.capacity = capacity
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits of the last position of every row; `ids`, `pos` [rows, T] are the newest T tokens,
        `mask` [rows, cached + T] marks real (1) and padding (0) keys, as for the model's forward."""
        rows, T = ids.shape
        end = mask.shape[1]
        KV, D = self.kv_heads, self.head_dim
        if not self.k:
            self.k = [self.embed.weight.new_zeros(rows, KV, self.capacity, D) for _ in self.layers]
            self.v = [self.embed.weight.new_zeros(rows, KV, self.capacity, D) for _ in self.layers]
        keys = mask[:, None, None, :].bool()
        if T > 1:  # causal over the newest T; a padding query attends to itself (never to nothing: NaN)
            q_at = torch.arange(end - T, end, device=ids.device)[:, None]
            k_at = torch.arange(end, device=ids.device)[None, :]
            keys = keys & (k_at <= q_at) | (k_at == q_at)

        def kv(i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            self.k[i][:, :, end - T : end] = k
            self.v[i][:, :, end - T : end] = v
            return self.k[i][:, :, :end], self.v[i][:, :, :end]

        return self._logits(ids, pos, keys, kv)

    def _advance(self, logits: torch.Tensor, u: torch.Tensor | None, t: torch.Tensor, at: torch.Tensor, pos: torch.Tensor,
                 keys: torch.Tensor, toks: torch.Tensor, lps: torch.Tensor, done: torch.Tensor, stop: torch.Tensor,
                 ks: list, vs: list, vocab: int, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
        """One step of a compiled generation, as one compiled call: token `t` [1] of every row picked
        from `logits` (`_pick`) and recorded (`toks`, `lps` column t; `done` where it is a `stop` id),
        then decoded at KV position `at` [1] (marked in `keys`), as position `pos + t` ([rows, 1]: the
        rows' first generated positions). Returns the next logits. The loop around it is then one
        uniform draw and one call a step: the bookkeeping between two compiled calls (indexing,
        writes, the mask, the position) cost more than the compiled step's own ops."""
        tok, lp = _pick(logits, u, vocab, temperature, top_k, top_p)
        toks.index_copy_(1, t, tok)
        lps.index_copy_(1, t, lp)
        done.logical_or_(torch.isin(tok[:, 0], stop))
        keys.index_fill_(3, at, True)
        return self._decode(tok, keys, pos + t, at, ks, vs)

    def _decode(self, ids: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor, at: torch.Tensor, ks: list, vs: list) -> torch.Tensor:
        """One decode step (T = 1) over the whole KV buffers: `keys` [rows, 1, 1, capacity] marks the
        real keys written so far, `at` [1] the position this step writes. The same arithmetic as
        `__call__`, in shapes that do not change from step to step, so that torch.compile builds it
        once (the buffers' unwritten positions are masked, as padding is)."""

        def kv(i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            ks[i].index_copy_(2, at, k)
            vs[i].index_copy_(2, at, v)
            return ks[i], vs[i]

        return self._logits(ids, pos, keys, kv, attend=_one_query_attention)

    def _logits(self, ids: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor, kv, attend=None) -> torch.Tensor:
        """The decoder over the newest tokens `ids` [rows, T] at positions `pos`, attending where `keys`
        says; `kv(layer, k, v)` stores a layer's new keys and values [rows, KV, T, D] and returns those
        to attend to. Logits of the last position of every row."""
        rows, T = ids.shape
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [rows, 1, T, D]
        x = self.embed(ids)
        for i, (n1, qkv, qkv_b, qn, kn, o, n2, gu, gu_b, down, scale) in enumerate(self.layers):
            q, k, v = F.linear(_rms(x, n1), qkv, qkv_b).view(rows, T, H + 2 * KV, D).split([H, KV, KV], 2)
            if qn is not None:
                q, k = _rms(q, qn), _rms(k, kn)
            q, k = _rotate(q.transpose(1, 2), cos, sin), _rotate(k.transpose(1, 2), cos, sin)
            keys_i, values_i = kv(i, k, v.transpose(1, 2))
            if attend is not None:
                a = attend(q, keys_i, values_i, keys, scale)
            else:
                a = F.scaled_dot_product_attention(q, keys_i, values_i, attn_mask=keys, scale=scale, enable_gqa=KV != H)
            x = x + o(a.transpose(1, 2).reshape(rows, T, H * D))
            g, u = F.linear(_rms(x, n2), gu, gu_b).split([self.inter, self.inter], -1)
            x = x + down(F.silu(g) * u)
        return self.head(_rms(x[:, -1:], self.final_norm))[:, -1]

    def repeat(self, n: int) -> None:
        self.k = [t.repeat_interleave(n, 0) for t in self.k]
        self.v = [t.repeat_interleave(n, 0) for t in self.v]

    def keep(self, rows: torch.Tensor) -> None:
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]


def _one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one query per row, q [rows, H, 1, D], over k, v [rows, KV, L, D] where `keys`
    [rows, 1, 1, L] is true, as two batched matmuls and a softmax: query head h reads key/value head
    h // (H / KV), as SDPA's enable_gqa does. Compiled, a generation of the benchmark's took 139 ms
    with it against 153 with SDPA (the CPU flash kernel, ~0.2 ms a call for one query)."""
    rows, H, T, D = q.shape
    KV = k.shape[1]
    qg = q.reshape(rows, KV, H // KV * T, D)
    s = (qg @ k.transpose(-1, -2)) * scale  # [rows, KV, G, L]
    s = s.masked_fill(~keys, float("-inf"))
    return (s.softmax(-1) @ v).reshape(rows, H, T, D)


# Compiled decode steps (`sample(..., compiled=True)`): KV buffers of a multiple of this many positions,
# so calls whose prompts differ a little in width share one compiled step
CAPACITY_STEP = 64
_STEP: dict = {}  # (function, device type) -> compiled


def _compiled(fn, device: torch.device):
    """`fn` (`FastForward._advance`, `_pick`) compiled once per process and device type, for static
    shapes: symbolic ones made the decode step slower than eager here (215 vs 189 ms per generation;
    static 141, with SDPA). torch compiles it again for each new (rows, capacity), which sample()
    keeps few: its rows stay in the batch when they stop, and capacities are rounded up to
    CAPACITY_STEP.

    On CPU with inductor's C++ wrapper: the compiled step's own code (a few dozen kernel calls and
    buffer allocations per step) runs as C++ instead of Python. A generation of the benchmark's
    (8 prompts x 8 x 32 tokens, the demo model, interleaved in-process A/B): 143 vs 156 ms; its first
    compile takes ~8 s instead of ~3."""
    key = (fn.__name__, device.type)
    if key not in _STEP:
        options = {"cpp_wrapper": True} if device.type == "cpu" else None
        _STEP[key] = torch.compile(fn, dynamic=False, options=options)
    return _STEP[key]


def _pick(logits: torch.Tensor, u: torch.Tensor | None, vocab: int, temperature: float, top_k: int, top_p: float):
    """The next token [rows, 1] of every row and its log-prob [rows, 1] under the distribution it was
    drawn from, over the real vocabulary: the most likely one (temperature 0; log-prob at T = 1), or by
    inverse CDF at the uniforms `u` [rows, 1] (multinomial draws one exponential per vocabulary entry):
    a zero-probability id is never the first cdf entry above u, and u rounded up to the total
    (searchsorted past the end) takes the most likely id."""
    x = logits[:, :vocab].float()
    if temperature == 0:
        logp = torch.log_softmax(x, -1)
        tok = x.argmax(-1, keepdim=True)
    else:
        logp = torch.log_softmax(process_logits(x, temperature, top_k, top_p), -1)
        probs = logp.exp()
        cdf = probs.cumsum(-1)
        tok = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
        tok = torch.where(tok < vocab, tok, probs.argmax(-1, keepdim=True))
    return tok, logp.gather(1, tok)


@torch.inference_mode()
def sample(model, prompts: list[list[int]], *, n: int, max_new_tokens: int, vocab: int, stops: list[int], pad: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, fast: bool = True,
           compiled: bool = False) -> list[tuple[list[int], list[float], bool]]:
    """n completions of every prompt (prompt-major: rows k*n .. k*n+n-1 are prompt k's), each as
    (token ids, log-probs, stopped): cut after the first stop id (included), else max_new_tokens long.
    temperature 0 is greedy (log-probs then at T = 1). `fast`: `FastForward` where the family allows.
    `compiled`: its decode steps through torch.compile (static shapes: rows that stop stay in the batch;
    the same tokens, log-probs to float rounding; the first call of each shape compiles)."""
    device = next(model.parameters()).device
    P, B, width = len(prompts), len(prompts) * n, max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.zeros(P, width + max_new_tokens, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        mask[i, width - len(p):] = 1  # the prompt, and every generated position
    pos = (mask[:, :width].cumsum(-1) - 1).clamp_(min=0)
    fast = fast and fast_supported(model)
    compiled = fast and compiled  # only FastForward's steps compile
    forward = FastForward(model, width + max_new_tokens, compiled=compiled) if fast else HFForward(model, width + max_new_tokens)
    drop = not compiled  # a compiled step keeps its shapes
    logits = forward(ids, mask[:, :width], pos)
    if n > 1:  # the n samples of a prompt share its prefill
        forward.repeat(n)
        logits, mask, pos = (x.repeat_interleave(n, 0) for x in (logits, mask, pos))
    pos = pos[:, -1:]
    gen = torch.Generator(device).manual_seed(seed)
    stop = torch.tensor(stops or [-1], device=device)
    toks = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    lps = torch.empty(B, max_new_tokens, dtype=torch.float32, device=device)
    # `rows`: the rows still in the batch (a row that stopped is dropped once a quarter of the batch has:
    # its KV cache rows are copied out then, so not at every stop)
    rows = torch.arange(B, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    steps = max_new_tokens
    pick = _compiled(_pick, device) if compiled else _pick
    if compiled:  # every step but the last one call (`FastForward._advance`); every row stays in the batch
        advance = _compiled(FastForward._advance, device)
        keys = torch.zeros(B, 1, 1, forward.capacity, dtype=torch.bool, device=device)
        keys[..., :width] = mask[:, None, None, :width].bool()
        ts, ats = torch.arange(max_new_tokens, device=device), torch.arange(width, width + max_new_tokens, device=device)
        first = pos + 1  # the rows' first generated positions
    for t in range(max_new_tokens):
        # one uniform per row for the inverse CDF, drawn for all B rows every step, so a row gets the
        # same draws whichever rows were dropped
        u = torch.rand(B, 1, device=device, generator=gen) if temperature else None
        if u is not None and drop:
            u = u[rows]
        if compiled and t + 1 < max_new_tokens:
            logits = advance(forward, logits, u, ts[t : t + 1], ats[t : t + 1], first, keys, toks, lps, done, stop,
                             forward.k, forward.v, vocab, temperature, top_k, top_p)
            if bool(done.all()):  # (its decode ran in the same call: one step of no use, at the end)
                steps = t + 1
                break
            continue
        tok, lp = pick(logits, u, vocab, temperature, top_k, top_p)
        toks[rows, t] = tok[:, 0]
        lps[rows, t] = lp[:, 0]
        done[rows] |= torch.isin(tok[:, 0], stop)
        if t + 1 == max_new_tokens or bool(done.all()):
            steps = t + 1
            break
        live = ~done[rows]
        if drop and 4 * int(live.sum()) <= 3 * len(rows):
            keep = live.nonzero()[:, 0]
            forward.keep(keep)
            rows, tok, mask, pos = rows[keep], tok[keep], mask[keep], pos[keep]
        pos = pos + 1
        logits = forward(tok, mask[:, : width + t + 1], pos)
    out = []
    stop_set = set(stops)  # a dropped row's slots past its stop were never written: cut below
    for row, lp in zip(toks[:, :steps].tolist(), lps[:, :steps].tolist()):
        end = next((j + 1 for j, tk in enumerate(row) if tk in stop_set), None)
        out.append((row[:end], lp[:end], end is not None) if end is not None else (row, lp, False))
    return out
