"""Tiny models and tokenizers built locally, for tests, the demo and benchmarks (no downloads).

Both are *saved to a directory* and meant to be loaded back through the real loading path
(`AutoTokenizer.from_pretrained`, `AutoModelForCausalLM.from_pretrained`), exactly like a user's
downloaded checkpoint. The tokenizer is a byte-level BPE (the Qwen / Llama-3 scheme) trained with
`tokenizers` on a small corpus, so any text is encodable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# ChatML with {% generation %} markers around what the assistant generates (content + <|im_end|>).
CHATML_GENERATION_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

LLAMA3_GENERATION_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

CHATML_SPECIALS = {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "extra": ["<|im_start|>"]}
LLAMA3_SPECIALS = {
    "bos": "<|begin_of_text|>",
    "eos": "<|eot_id|>",
    "pad": "<|finetune_right_pad_id|>",
    "extra": ["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"],
}

_DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ? ! , . ; : ' \" ( ) [ ] { }",
    "You are a helpful assistant. What is the capital of France? The capital of France is Paris.",
    "Reverse the word hello: olleh. Add 12 and 30: 42. Translate to uppercase: HELLO WORLD.",
    "system user assistant tool function call result think reasoning answer question",
]


def build_tokenizer(
    out_dir: str | Path,
    *,
    chat_template: str | None = CHATML_TEMPLATE,
    bos: str | None = CHATML_SPECIALS["bos"],
    eos: str | None = CHATML_SPECIALS["eos"],
    pad: str | None = CHATML_SPECIALS["pad"],
    unk: str | None = None,
    special_tokens: Iterable[str] = tuple(CHATML_SPECIALS["extra"]),
    corpus: Iterable[str] | None = None,
    vocab_size: int = 600,
    add_bos_token: bool = False,
) -> Path:
    """Train a byte-level BPE tokenizer, save it HF-style to `out_dir`, return the path.

    `special_tokens` (plus bos/eos/pad/unk) are registered as *special added tokens*, i.e. each is a
    single id that is never split, like the control markers of real chat models.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = [t for t in (bos, eos, pad, unk) if t] + [t for t in special_tokens if t]
    specials = list(dict.fromkeys(specials))  # de-duplicate, keep order

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus or _DEFAULT_CORPUS) * 4, trainer=trainer)
    if bos and add_bos_token:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        additional_special_tokens=[t for t in special_tokens if t not in (bos, eos, pad, unk)],
    )
    if chat_template is not None:
        hf.chat_template = chat_template
    hf.save_pretrained(out)
    return out


TINY_FAMILIES = ("qwen3", "llama", "gemma3", "qwen3_moe")


def build_tiny_model(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    *,
    family: str = "qwen3",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    final_logit_softcapping: float | None = 2.0,
    num_experts: int = 4,
    output_router_logits: bool = True,
) -> Path:
    """Build a randomly initialised tiny causal LM of a real transformers family from its config
    class, sized to the tokenizer in `tokenizer_dir`, and save model + tokenizer to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig, LlamaConfig, Qwen3Config, Qwen3MoeConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if family == "qwen3":
        cfg = Qwen3Config(head_dim=hidden_size // num_heads, **common)
    elif family == "llama":
        cfg = LlamaConfig(head_dim=hidden_size // num_heads, **common)
    elif family == "gemma3":
        # Gemma3 text: tied embeddings, final logit soft-capping (set so the softcap path runs), one
        # sliding-window layer (window 16) and one full-attention layer.
        common["tie_word_embeddings"] = True
        cfg = Gemma3TextConfig(
            head_dim=hidden_size // num_heads, query_pre_attn_scalar=hidden_size // num_heads,
            final_logit_softcapping=final_logit_softcapping, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"][:num_layers] + ["full_attention"] * max(0, num_layers - 2),
            **common,
        )
    elif family == "qwen3_moe":
        # layer 0 dense MLP, the others sparse MoE (num_experts experts, top-2)
        cfg = Qwen3MoeConfig(
            head_dim=hidden_size // num_heads, num_experts=num_experts, num_experts_per_tok=2,
            moe_intermediate_size=intermediate_size // 2, decoder_sparse_step=1, mlp_only_layers=[0],
            output_router_logits=output_router_logits, router_aux_loss_coef=0.01, **common,
        )
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose from {TINY_FAMILIES}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
