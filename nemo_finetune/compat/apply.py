"""Which process applies which shims, in one place:
- the scripts (peft_megatron.py, test_checkpoint.py, convert_checkpoint_to_hf.py): prepare_process() first, then
  cpu_checkpoint_io() around checkpoint conversion on a host without CUDA, and install_paged_attention_fallback()
  for generation without flash-attn;
- the training workers: the launcher sets worker_environment() in their environment and startup/sitecustomize.py
  calls install_from_environment() before NeMo loads (install_worker_hooks: the no-TE shims, the speed-ups a run
  does not leave out, CUDA graphs for --cuda_graphs, the checkpoint and val_loss fixes with or without TE);
- the recipe: model_config_overrides() and optimizer_config_overrides() name the fields a process must set."""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.util
import logging
import sys

from nemo_finetune.compat.base import (
    Environment,
    after_import,
    check_versions,
    detect_environment,
    installed_versions,
)
from nemo_finetune.compat.cuda_graphs import (
    GPT_MODEL_MODULE,
    RNG_MODULE,
    graph_layers_as_the_model_is_built,
    make_rng_tracker_graph_safe,
)
from nemo_finetune.compat.diagnostics import EMBEDDING_MODULE, check_token_ids
from nemo_finetune.compat.fixes import (
    ASYNC_SAVE_MODULE,
    STAGED_BUFFERS_DROPPED_IN,
    STRATEGY_LIB_MODULE,
    STRATEGY_MODULE,
    hold_async_save_buffers,
    seed_model_init,
    weigh_validation_batches_equally,
)
from nemo_finetune.compat.moved import alias_moved_modules
from nemo_finetune.compat.no_te import (
    NO_TE_MODEL_OVERRIDES,
    patch_config_fusions,
    patch_norm_mapping,
    patch_peft_te_checks,
    skip_unified_memory_build,
)
from nemo_finetune.compat.speedups import (
    COMPILED_FUSIONS,
    LINEAR_MODULE,
    LORA_MODULE,
    NORM_MODULE,
    OPTIMIZER_MODULE,
    ROPE_MODULE,
    SLOWER_FUSIONS_OFF,
    WGRAD_FUSION,
    accumulate_wgrad_with_torch,
    compile_unfused_rope,
    fuse_lora_output,
    fuse_rmsnorm_with_liger,
    install_sync_free_packed_rope,
    use_torch_optimizer_kernels,
)

log = logging.getLogger("peft_megatron.compat")


# The training-worker shims a run can leave out, for a run that must show one's effect or do without one
# (WORKER_SKIP_ENV; the training benchmark measures each against its absence).
OPTIONAL_WORKER_SHIMS = (
    "compiled-rope",
    "sync-free-packed-rope",
    "fused-lora-output",
    "torch-optimizer-kernels",
    "torch-wgrad-accumulation",
    "async-save-staged-buffers",
)

# Training-worker shims on trial: applied only where a run asks for them (install_worker_hooks(trial=...): the training
# benchmark's variants, or WORKER_TRIAL_ENV): speed-ups until their gain is measured on the GPU and they join the
# defaults, and diagnostics.
TRIAL_WORKER_SHIMS = ("liger-rmsnorm", "token-id-check")

# Set by peft_megatron's executor, read by startup/sitecustomize.py: "1" applies every worker hook (no TE or no
# CUDA), CHECKPOINT_ONLY only the fixes needed with TE too (asynchronous checkpoints, val_loss; TE and CUDA).
WORKER_ENV_FLAG = "PEFT_MEGATRON_WORKER_COMPAT"

CHECKPOINT_ONLY = "checkpoint"

# OPTIONAL_WORKER_SHIMS the training workers leave out, comma-separated (unset: none).
WORKER_SKIP_ENV = "PEFT_MEGATRON_WORKER_SKIP"

# TRIAL_WORKER_SHIMS the training workers apply as well, comma-separated (unset: none).
WORKER_TRIAL_ENV = "PEFT_MEGATRON_WORKER_TRIAL"

# "1" when the run trains with CUDA graphs (--cuda_graphs): the workers graph their model's layers, with Megatron's
# graph-safe RNG tracker.
CUDA_GRAPHS_ENV = "PEFT_MEGATRON_CUDA_GRAPHS"

# The run's --seed: the workers seed Megatron's generators with it (model and adapter initialisation, dropout).
SEED_ENV = "PEFT_MEGATRON_SEED"


def worker_flag(env: Environment) -> str:
    """WORKER_ENV_FLAG's value for training workers in environment `env`."""
    return CHECKPOINT_ONLY if env.has_te and env.has_cuda else "1"


def skipped_in_workers(environ) -> frozenset[str]:
    """The OPTIONAL_WORKER_SHIMS that `environ`'s WORKER_SKIP_ENV asks the training workers to leave out; ValueError
    for a name that is not one."""
    return _named_in(environ, WORKER_SKIP_ENV, OPTIONAL_WORKER_SHIMS, "which the training workers cannot leave out")


def trials_in_workers(environ) -> frozenset[str]:
    """The TRIAL_WORKER_SHIMS that `environ`'s WORKER_TRIAL_ENV asks the training workers to apply; ValueError for a
    name that is not one."""
    return _named_in(environ, WORKER_TRIAL_ENV, TRIAL_WORKER_SHIMS, "which are no trial shims of the training workers")


def _named_in(environ, variable: str, choices: tuple[str, ...], which: str) -> frozenset[str]:
    names = frozenset(name.strip() for name in environ.get(variable, "").split(",") if name.strip())
    if names - set(choices):
        raise ValueError(
            f"{variable}={environ[variable]!r} names {sorted(names - set(choices))}, {which}; give a "
            f"comma-separated list of {list(choices)}, or unset it"
        )
    return names


def prepare_process(env: Environment | None = None) -> Environment:
    """Apply the process-wide adaptations the environment needs; idempotent."""
    alias_moved_modules()
    env = env or detect_environment()
    if env.has_te and env.has_cuda:
        return env
    skip_unified_memory_build(env)
    if not env.has_te:
        check_versions()
        patch_config_fusions()
        patch_peft_te_checks()
        patch_norm_mapping()
    return env


def model_config_overrides(env: Environment, training: bool = False, skip: frozenset[str] = frozenset()) -> dict:
    """Model-config fields to set without TE: TE-only fusions off; for `training`, the torch-compiled ones on, and
    the weight-gradient accumulation fusion on unless the workers leave its shim out (`skip`, as
    skipped_in_workers gives it)."""
    if env.has_te:
        return {}
    compiled = COMPILED_FUSIONS if training else {name: False for name in COMPILED_FUSIONS}
    wgrad = {WGRAD_FUSION: training and "torch-wgrad-accumulation" not in skip}
    return {**NO_TE_MODEL_OVERRIDES, **SLOWER_FUSIONS_OFF, **compiled, **wgrad}


def log_to_worker_output() -> None:
    """The training workers' `compat:` lines on their stderr, which NeMo-Run tails into the run's log file (the
    console leaves them out: common.WorkerConsole); nothing else configures logging in a worker this early."""
    from nemo_finetune.console import LOG_FORMAT

    if not any(getattr(h, "_nemo_compat", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        handler._nemo_compat = True
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # whatever NeMo later puts on the root logger would print them twice


def install_worker_hooks(
    skip: frozenset[str] = frozenset(),
    checkpoint_only: bool = False,
    trial: frozenset[str] = frozenset(),
    cuda_graphs: bool = False,
    seed: int | None = None,
) -> None:
    """For the training workers (startup/sitecustomize.py; benchmarks/train_throughput.py in its own process): stub
    the allocator build now; apply the PEFT guards, the compiled RoPE and the fused LoRA output as soon as their
    modules load, keep asynchronous checkpoint saves intact (hold_async_save_buffers) and weigh val_loss's batches
    equally (weigh_validation_batches_equally), both with or without TE, with no
    NeMo import of our own (torchrun's launcher process runs this too). `skip` names OPTIONAL_WORKER_SHIMS to leave
    out; the benchmark measures each against its absence. `trial` names TRIAL_WORKER_SHIMS to apply as well.
    `cuda_graphs` (a --cuda_graphs run, with or without TE): Megatron's local CUDA graphs on the model NeMo builds
    here, and its graph-safe RNG tracker. `seed`: the run's, for Megatron's generators (NeMo's 1234 otherwise).
    `checkpoint_only` (TE and CUDA present): the checkpoint and val_loss fixes (and the tracker) alone."""
    unknown = set(skip) - set(OPTIONAL_WORKER_SHIMS)
    if unknown:
        raise ValueError(f"no optional worker shims named {sorted(unknown)}; OPTIONAL_WORKER_SHIMS lists them")
    unknown = set(trial) - set(TRIAL_WORKER_SHIMS)
    if unknown:
        raise ValueError(f"no trial worker shims named {sorted(unknown)}; TRIAL_WORKER_SHIMS lists them")

    alias_moved_modules()  # a resumed run's checkpoint context may name them
    staged_buffers_dropped = installed_versions()["megatron-core"].startswith(STAGED_BUFFERS_DROPPED_IN)
    if "async-save-staged-buffers" not in skip and staged_buffers_dropped:
        after_import(ASYNC_SAVE_MODULE, hold_async_save_buffers)
    if cuda_graphs:
        after_import(RNG_MODULE, make_rng_tracker_graph_safe)
        after_import(GPT_MODEL_MODULE, graph_layers_as_the_model_is_built)
    if seed is not None:
        after_import(STRATEGY_LIB_MODULE, functools.partial(seed_model_init, seed))
    after_import(STRATEGY_MODULE, weigh_validation_batches_equally)
    if "token-id-check" in trial:
        after_import(EMBEDDING_MODULE, check_token_ids)
    if checkpoint_only:
        return
    skip_unified_memory_build()
    if importlib.util.find_spec("transformer_engine") is None:
        check_versions()
        after_import(LORA_MODULE, patch_peft_te_checks)
        if "compiled-rope" not in skip:
            after_import(ROPE_MODULE, compile_unfused_rope)
        if "sync-free-packed-rope" not in skip:
            after_import(ROPE_MODULE, install_sync_free_packed_rope)
        if "fused-lora-output" not in skip:
            after_import(LORA_MODULE, fuse_lora_output)
        if "torch-optimizer-kernels" not in skip:
            after_import(OPTIMIZER_MODULE, use_torch_optimizer_kernels)
        if "torch-wgrad-accumulation" not in skip:
            after_import(LINEAR_MODULE, accumulate_wgrad_with_torch)
        if "liger-rmsnorm" in trial:
            after_import(NORM_MODULE, fuse_rmsnorm_with_liger)


def worker_environment(env: Environment, cuda_graphs: bool = False, seed: int | None = None) -> dict[str, str]:
    """What the launcher puts in the training workers' environment so that startup/sitecustomize.py applies their
    shims (install_from_environment reads it back): all of them without TE or CUDA, with both only the fixes TE needs
    too; CUDA graphs for a --cuda_graphs run; the run's seed. WORKER_SKIP_ENV and WORKER_TRIAL_ENV, when the user
    sets them, are inherited as they are."""
    values = {WORKER_ENV_FLAG: worker_flag(env)}
    if cuda_graphs:
        values[CUDA_GRAPHS_ENV] = "1"
    if seed is not None:
        values[SEED_ENV] = str(seed)
    return values


def install_from_environment(environ) -> bool:
    """In a training worker at start-up (startup/sitecustomize.py): install the hooks that worker_environment asked
    for; False (nothing done) in any other process."""
    flag = environ.get(WORKER_ENV_FLAG)
    if flag not in ("1", CHECKPOINT_ONLY):
        return False
    log_to_worker_output()
    install_worker_hooks(
        skip=skipped_in_workers(environ),
        trial=trials_in_workers(environ),
        checkpoint_only=flag == CHECKPOINT_ONLY,
        cuda_graphs=environ.get(CUDA_GRAPHS_ENV) == "1",
        seed=int(environ[SEED_ENV]) if environ.get(SEED_ENV) else None,
    )
    return True
