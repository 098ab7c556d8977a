#!/usr/bin/env bash
# Driver for a run on an offline GPU node: install the carried wheel bundle, record versions, then run each command
# given as an argument under a shared deadline, logging to $OUT/<n>.log. Used for docs/gpu-validation.md.
#   bash tools/gpu_session.sh "python peft_megatron.py --demo" "python -m pytest -m gpu tests"
#   EXTRA_WHEELS="/path/wandb-*.whl" bash tools/gpu_session.sh "..."   # on a warm node: add wheels to its /tmp/site
set -uo pipefail
START=$(date +%s); DEADLINE=${DEADLINE:-560}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
gpu_health() {
  { nvidia-smi --query-gpu=uuid,serial,ecc.errors.uncorrected.volatile.total,ecc.errors.uncorrected.aggregate.total,remapped_rows.uncorrectable,remapped_rows.pending,remapped_rows.failure --format=csv \
      || nvidia-smi --query-gpu=uuid --format=csv; } 2>&1 | sed 's/^/   gpu: /'
}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
{
  echo "== host $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  gpu_health  # which card, and its memory errors: a fault seen on one card only shows here
  t=$(date +%s)
  if [ -n "${EXTRA_WHEELS:-}" ]; then
    # A warm machine whose /tmp/site holds the bundle from an earlier call gets only these wheels (one call carries
    # at most 64 MiB; the bundle with wandb is larger).
    [ -d /tmp/site/nemo ] || { echo "BUNDLE_INSTALL_FAILED: EXTRA_WHEELS needs /tmp/site from an earlier call"; exit 1; }
    python3 -m pip install -q --no-deps --no-index --target /tmp/site $EXTRA_WHEELS || { echo BUNDLE_INSTALL_FAILED; exit 1; }
  else
    bash .whl/install.sh /tmp/site || { echo BUNDLE_INSTALL_FAILED; exit 1; }
  fi
  echo "== bundle install: $(( $(date +%s) - t ))s"
} 2>&1 | tee "$OUT/session.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1  # the block's `exit` ends only its own subshell of the pipeline
export PYTHONPATH=/tmp/site
python3 - <<'PY' 2>&1 | tee -a "$OUT/session.log"
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name(0))
for d in ["torch", "nemo_toolkit", "megatron-core", "nemo_run", "lightning", "transformers", "tokenizers",
          "huggingface_hub", "peft", "datasets", "numpy", "transformer_engine", "apex"]:
    try: print(f"  {d:18s} {md.version(d)}")
    except md.PackageNotFoundError: print(f"  {d:18s} (absent)")
PY
n=0
for cmd in "$@"; do
  n=$((n+1)); left=$(( DEADLINE - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then echo "== [$n] SKIPPED (${left}s left): $cmd" | tee -a "$OUT/session.log"; continue; fi
  echo "== [$n] $cmd (timeout ${left}s)" | tee -a "$OUT/session.log"
  t=$(date +%s); timeout "$left" bash -c "$cmd" > "$OUT/$n.log" 2>&1; rc=$?
  echo "== [$n] rc=$rc wall=$(( $(date +%s) - t ))s" | tee -a "$OUT/session.log"
  grep -E "RESULT|passed|failed|error|Error|demo:|exact match|STEP|val_loss|Traceback" "$OUT/$n.log" | grep -v -i "warn" | tail -25 | cut -c1-300 | tee -a "$OUT/session.log"
done
gpu_health | tee -a "$OUT/session.log"
echo "== total $(( $(date +%s) - START ))s" | tee -a "$OUT/session.log"
