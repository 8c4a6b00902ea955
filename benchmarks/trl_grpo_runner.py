"""One GRPO run with Hugging Face TRL's GRPOTrainer, for benchmarks/grpo_vs_trl.py.

Runs in benchmarks/.trl-venv (TRL needs a newer transformers than posttrain pins; see
benchmarks/setup_trl_venv.sh), never imports posttrain, and writes one JSON file of per-step
measurements that the benchmark reads:

    benchmarks/.trl-venv/bin/python benchmarks/trl_grpo_runner.py --model DIR --data prompts.jsonl \
        --reward benchmarks/grpo_vs_trl.py:length_reward --out result.json --steps 10 --prompts 8 \
        --group 8 --max-new 32 --lr 1e-5 --threads 2

Rollouts with transformers `generate` (`use_vllm=False`), one generation per optimizer step
(`steps_per_generation=1`, `num_iterations=1`: on-policy, no old-log-prob pass), `beta=0` (no
reference model), the whole step's P x G completions in one micro-batch. Per optimizer step it records
the wall-clock begin and end (`on_step_begin` .. `on_step_end`: generation, rewards, forward, backward,
clip and AdamW), the seconds spent in generation (`_generate_single_turn`) and in the reward functions
(`_calculate_rewards`), the generated tokens (EOS included, as posttrain counts them), the step's loss,
mean reward and mean completion length, and the prompt token ids it generated from (the benchmark checks
they are exactly posttrain's rendering).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def load_fn(spec: str):
    """path/to/file.py:fn -> the function (the benchmark's reward, shared with posttrain's run)."""
    path, name = spec.rsplit(":", 1)
    mod_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return getattr(mod, name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="JSONL of {prompt: [messages]} records")
    ap.add_argument("--reward", required=True, help="path/to/file.py:fn")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--prompts", type=int, required=True, help="prompts per optimizer step")
    ap.add_argument("--group", type=int, required=True, help="completions per prompt (num_generations)")
    ap.add_argument("--max-new", type=int, required=True, help="max_completion_length")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    import datasets
    import transformers
    import trl
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    datasets.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    reward = load_fn(args.reward)
    tok = AutoTokenizer.from_pretrained(args.model)
    ds = load_dataset("json", data_files=args.data, split="train")
    rec: dict = {"step_begin": [], "step_end": [], "generate_s": [], "reward_s": [], "gen_tokens": [], "completions": [],
                 "prompt_ids": [], "loss": [], "reward": [], "completion_len": []}

    class Trainer(GRPOTrainer):
        def _generate_single_turn(self, prompt_ids, *a, **k):
            t0 = time.perf_counter()
            out = super()._generate_single_turn(prompt_ids, *a, **k)
            rec["generate_s"].append(time.perf_counter() - t0)
            completion_ids = out[0]
            rec["gen_tokens"].append(sum(len(c) for c in completion_ids))
            rec["completions"].append(len(completion_ids))
            if len(rec["prompt_ids"]) < 2:  # the first steps' prompts, for the benchmark's same-prompts check
                rec["prompt_ids"].append([list(map(int, p)) for p in prompt_ids])
            return out

        def _calculate_rewards(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return super()._calculate_rewards(*a, **k)
            finally:
                rec["reward_s"].append(time.perf_counter() - t0)

    class StepClock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            rec["threads_at_train"] = torch.get_num_threads()

        def on_step_begin(self, a, state, control, **kw):
            rec["step_begin"].append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            rec["step_end"].append(time.perf_counter())

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                rec["loss"].append(logs["loss"])
                rec["reward"].append(logs.get("reward"))
                rec["completion_len"].append(logs.get("completions/mean_length"))

    n = args.prompts * args.group
    config = GRPOConfig(
        output_dir=os.path.join(os.path.dirname(os.path.abspath(args.out)), "trl-out"),
        # one optimizer step = one generation of P prompts x G completions, trained in one micro-batch
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=args.group,
        num_iterations=1,
        max_completion_length=args.max_new,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        use_vllm=False,
        # the GRPO objective as posttrain's defaults: no KL (no reference model), group-std advantages,
        # token-mean loss over the step ("dapo" = posttrain's token_mean), symmetric clip 0.2
        beta=0.0,
        scale_rewards="group",
        loss_type="dapo",
        epsilon=0.2,
        mask_truncated_completions=False,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=0,
        # prompts in file order, like posttrain's `data.shuffle: false`: the same prompts in every step
        shuffle_dataset=False,
        # fp32 like posttrain's run (TRL's default is bf16 mixed precision)
        bf16=False,
        fp16=False,
        model_init_kwargs={"dtype": "float32"},
        # TRL's GRPO defaults to gradient checkpointing; posttrain's run does not recompute activations
        gradient_checkpointing=False,
        use_cpu=True,
        dataloader_pin_memory=False,
        logging_steps=1,
        log_completions=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Trainer(model=args.model, reward_funcs=[reward], args=config, train_dataset=ds, processing_class=tok,
                      callbacks=[StepClock()])
    rec["threads"] = torch.get_num_threads()
    rec["startup_s"] = time.perf_counter() - t_start
    t_train = time.perf_counter()
    trainer.train()
    rec["train_s"] = time.perf_counter() - t_train
    rec["attn_implementation"] = trainer.model.config._attn_implementation
    rec["optim"] = getattr(config.optim, "value", str(config.optim))
    rec["generation_batch_size"] = config.generation_batch_size
    rec["versions"] = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                       "datasets": datasets.__version__}
    with open(args.out, "w") as f:
        json.dump(rec, f)


if __name__ == "__main__":
    main()
