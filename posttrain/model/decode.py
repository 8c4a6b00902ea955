"""Batched sampling with a KV cache, for the HF rollout engine: the model's own forward (any family:
its masks, sliding windows, soft-capping), one prefill over the distinct prompts, then one token per
row per step, without transformers `generate`'s per-step machinery.

The same results as `generate(..., do_sample=..., num_return_sequences=n)` with left padding:
positions from the attention mask's cumsum (pads at 0), then +1 a step; greedy = argmax of the
logits over the real vocabulary. Sampling: logits / T, then top-k, then top-p (HF's warpers, in that
order), over the real vocabulary only (padded embedding rows are never sampled), from a
`torch.Generator` seeded per call (the global RNG is untouched). Each sampled token's log-prob is
the log-softmax of that processed distribution.

Attention: `ATTN`, SDPA with grouped-query heads passed to the kernel as they are. transformers'
`sdpa` repeats every cached K/V head for a GQA model whenever there is a padding mask (needed for
CUDA kernels), which on CPU is most of a decode step; on CPU this one lets the kernel broadcast
(the same values), elsewhere it is transformers' `sdpa`.
"""

from __future__ import annotations

import torch
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


@torch.inference_mode()
def sample(model, prompts: list[list[int]], *, n: int, max_new_tokens: int, vocab: int, stops: list[int], pad: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
           ) -> list[tuple[list[int], list[float], bool]]:
    """n completions of every prompt (prompt-major: rows k*n .. k*n+n-1 are prompt k's), each as
    (token ids, log-probs, stopped): cut after the first stop id (included), else max_new_tokens long.
    temperature 0 is greedy (log-probs then at T = 1)."""
    device = next(model.parameters()).device
    P, B, width = len(prompts), len(prompts) * n, max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.zeros(P, width + max_new_tokens, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        mask[i, width - len(p):] = 1  # the prompt, and every generated position
    pos = (mask[:, :width].cumsum(-1) - 1).clamp_(min=0)
    cache = DynamicCache(config=model.config)  # full-attention layers write into a buffer of the final length
    cache.layers = [PreallocLayer(width + max_new_tokens) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    logits = model(input_ids=ids, attention_mask=mask[:, :width], position_ids=pos, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    if n > 1:  # the n samples of a prompt share its prefill
        cache.batch_repeat_interleave(n)
        logits, mask, pos = (x.repeat_interleave(n, 0) for x in (logits, mask, pos))
    pos = pos[:, -1:]
    gen = torch.Generator(device).manual_seed(seed)
    stop = torch.tensor(stops or [-1], device=device)
    toks = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    lps = torch.empty(B, max_new_tokens, dtype=torch.float32, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    steps = max_new_tokens
    for t in range(max_new_tokens):
        x = logits[:, :vocab].float()
        if temperature == 0:
            logp = torch.log_softmax(x, -1)
            tok = x.argmax(-1, keepdim=True)
        else:
            logp = torch.log_softmax(process_logits(x, temperature, top_k, top_p), -1)
            # inverse CDF: one uniform per row (multinomial draws one exponential per vocabulary entry);
            # a zero-probability id is never the first cdf entry above u; u rounded up to the total
            # (searchsorted past the end) takes the most likely id
            probs = logp.exp()
            cdf = probs.cumsum(-1)
            u = torch.rand(B, 1, device=device, generator=gen) * cdf[:, -1:]
            tok = torch.searchsorted(cdf, u, right=True)
            tok = torch.where(tok < vocab, tok, probs.argmax(-1, keepdim=True))
        toks[:, t : t + 1] = tok
        lps[:, t : t + 1] = logp.gather(1, tok)
        done |= torch.isin(tok[:, 0], stop)
        if t + 1 == max_new_tokens or bool(done.all()):
            steps = t + 1
            break
        pos = pos + 1
        logits = model(input_ids=tok, attention_mask=mask[:, : width + t + 1], position_ids=pos, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
    out = []
    stop_set = set(stops)
    for row, lp in zip(toks[:, :steps].tolist(), lps[:, :steps].tolist()):
        end = next((j + 1 for j, tk in enumerate(row) if tk in stop_set), None)
        out.append((row[:end], lp[:end], end is not None) if end is not None else (row, lp, False))
    return out
