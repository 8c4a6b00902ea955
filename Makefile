# The two Quickstart commands. Each sets up .venv (scripts/setup_env.sh) and then runs.
.PHONY: demo test setup clean

setup:
	@bash scripts/setup_env.sh

demo: setup
	.venv/bin/python examples/build_tiny_model.py examples/.cache/tiny-qwen3
	.venv/bin/posttrain run examples/sft_demo.yaml --overwrite

test: setup
	.venv/bin/ruff check posttrain tests examples benchmarks scripts
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf runs examples/.cache
