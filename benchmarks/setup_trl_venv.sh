#!/usr/bin/env bash
# Create (or reuse) benchmarks/.trl-venv with Hugging Face TRL, for benchmarks/dpo_vs_trl.py.
#
# TRL 1.16 needs a newer transformers than posttrain pins (< 5.20), so it lives in its own venv; the
# benchmark runs benchmarks/trl_dpo_runner.py with this venv's python. As in scripts/setup_env.sh,
# torch is installed FIRST and explicitly (CPU build from the PyTorch CPU index, or a local wheel /
# find-links if pip is configured with one), so resolving TRL's deps never pulls a CUDA build.
# Idempotent: re-running after a change of this file reinstalls, otherwise it returns at once.
# Override with TORCH_VERSION=..., TRL_SPEC=..., PYTHON=...
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.trl-venv}
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TRL_SPEC=${TRL_SPEC:-trl==1.16.*}
stamp="$VENV/.trl-installed"
want="$(sha256sum setup_trl_venv.sh | cut -c1-16) $TORCH_VERSION $TRL_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip --disable-pip-version-check -q"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # --retries 0: where that index is unreachable (offline mirror, local wheels) fail over at once.
  $pip install --retries 0 "torch==$TORCH_VERSION" --extra-index-url "${TRL_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
fi
# torch pinned to the build just installed, so no dependency can swap it.
$pip install "$TRL_SPEC" "torch==$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
echo "$want" > "$stamp"
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
print("trl venv:", ", ".join(f"{p} {md.version(p)}" for p in ("torch", "transformers", "trl", "accelerate", "datasets", "tokenizers")))
EOF
echo "trl venv ready in $(pwd)/$VENV ($(( $(date +%s) - start )) s)"
