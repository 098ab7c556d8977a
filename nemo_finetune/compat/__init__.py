"""Runtime shims of NeMo 2.7.3 and Megatron-Core 0.15.3, one module per kind, each shim an entry of SHIMS that names
the upstream defect and when it can go (installed files are never edited; every shim logs a `compat:` line):

    no_te        correctness without Transformer Engine, CUDA or flash-attn (without them a process fails or
                 writes a wrong model)
    speedups     measured speed-ups of the training workers without TE or apex (each can be left out; some on trial)
    cuda_graphs  --cuda_graphs: Megatron's local CUDA graphs in NeMo's training workers
    fixes        upstream bugs that bite with or without TE
    diagnostics  checks a training run asks for (PEFT_MEGATRON_WORKER_TRIAL) to find where a failure comes from
    moved        old module names that checkpoints of earlier versions of this project refer to
    apply        which process applies which set: prepare_process() in the scripts, install_worker_hooks() in the
                 training workers (startup/sitecustomize.py), model_config_overrides() for the recipe
    base         the table's entry type, applied() / scoped() / undo(), the releases the shims were written for

Importing this package imports nothing heavy (NeMo, Megatron-Core and torch load inside the shims)."""

from __future__ import annotations

from nemo_finetune.compat import apply, base, cuda_graphs, diagnostics, fixes, moved, no_te, speedups
from nemo_finetune.compat.apply import (
    CHECKPOINT_ONLY,
    CUDA_GRAPHS_ENV,
    OPTIONAL_WORKER_SHIMS,
    SEED_ENV,
    TRIAL_WORKER_SHIMS,
    WORKER_ENV_FLAG,
    WORKER_SKIP_ENV,
    WORKER_TRIAL_ENV,
    install_from_environment,
    install_worker_hooks,
    log_to_worker_output,
    model_config_overrides,
    prepare_process,
    skipped_in_workers,
    trials_in_workers,
    worker_environment,
    worker_flag,
)
from nemo_finetune.compat.base import (
    SHIMS,
    Environment,
    Shim,
    applied,
    check_versions,
    detect_environment,
    scoped,
    undo,
)
from nemo_finetune.compat.no_te import cpu_checkpoint_io, install_paged_attention_fallback, optimizer_config_overrides

__all__ = [
    "base",
    "no_te",
    "speedups",
    "cuda_graphs",
    "fixes",
    "diagnostics",
    "moved",
    "apply",
    "SHIMS",
    "Shim",
    "Environment",
    "detect_environment",
    "applied",
    "scoped",
    "undo",
    "check_versions",
    "cpu_checkpoint_io",
    "install_paged_attention_fallback",
    "optimizer_config_overrides",
    "OPTIONAL_WORKER_SHIMS",
    "TRIAL_WORKER_SHIMS",
    "WORKER_ENV_FLAG",
    "CHECKPOINT_ONLY",
    "WORKER_SKIP_ENV",
    "WORKER_TRIAL_ENV",
    "CUDA_GRAPHS_ENV",
    "SEED_ENV",
    "worker_flag",
    "skipped_in_workers",
    "trials_in_workers",
    "prepare_process",
    "model_config_overrides",
    "log_to_worker_output",
    "install_worker_hooks",
    "worker_environment",
    "install_from_environment",
]
