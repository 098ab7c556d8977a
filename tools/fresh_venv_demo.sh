#!/usr/bin/env bash
# The README's GPU-machine demo command in a fresh venv that is not activated, on an offline GPU node whose image
# keeps its CUDA torch in its own environment (/opt/torch/.venv), with no torchrun on PATH:
#   python3 -m venv --system-site-packages .venv && .venv/bin/pip install -r requirements.txt && .venv/bin/python peft_megatron.py --demo
# Two stand-ins, because the node has no package index: the image's site-packages join the venv through a .pth
# file (what --system-site-packages gives where torch is the system Python's), and pip installs from the offline
# bundle (.whl) — with its resolver when the bundle and the image satisfy requirements.txt, else wheel by wheel.
# Usage, from the repository root with the offline bundle in .whl (tools/gpu_session.sh runs it as one command):
#   bash tools/fresh_venv_demo.sh [LOG_DIR]
set -uo pipefail
log_dir=${1:-/tmp/out}; mkdir -p "$log_dir"
unset PYTHONPATH VIRTUAL_ENV WANDB_MODE HF_HUB_OFFLINE TRANSFORMERS_OFFLINE  # a new user's environment
image_site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
rm -rf .venv
# --without-pip where the base Python lacks ensurepip; pip then comes from the image's site-packages.
python3 -m venv --system-site-packages .venv 2>/dev/null || python3 -m venv --system-site-packages --without-pip .venv || exit 1
echo "$image_site" > "$(.venv/bin/python -c 'import site; print(site.getsitepackages()[0])')/image_site.pth"
PATH=$(printf %s "$PATH" | tr : '\n' | grep -v -x "$(dirname "$(command -v python3)")" | paste -sd:)
export PATH  # the image's bin (its torchrun) is no longer on PATH
pip=(.venv/bin/python -m pip)
if timeout 120 "${pip[@]}" install --no-index --find-links .whl -r requirements.txt > "$log_dir/pip-resolve.log" 2>&1; then
  echo "== pip install -r requirements.txt: resolved from the bundle and the image"
else
  echo "== pip install -r requirements.txt did not resolve offline ($(grep -m1 -E 'ERROR' "$log_dir/pip-resolve.log"));"
  echo "   installing the bundle's wheels without dependency resolution"
  "${pip[@]}" install -q --no-index --no-deps .whl/*.whl || exit 1
fi
echo "== torchrun on PATH: $(command -v torchrun || echo none); python: $(.venv/bin/python -c 'import sys, torch; print(sys.executable, torch.__version__)')"
.venv/bin/python peft_megatron.py --demo
