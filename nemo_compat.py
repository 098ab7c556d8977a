"""Run NeMo 2.7.3 + Megatron-Core 0.15.3 correctly without Transformer Engine (TE) and, for checkpoint work,
without CUDA.

`pip install` users, CPU conversion nodes, CI and our own H100 have no TE, yet the pinned NeMo/Megatron quietly
assume it, and assume CUDA even for checkpoint import/export, which is CPU work by design. Every adaptation here is a
runtime shim (installed files are never edited), is applied only when the environment needs it, logs what it did,
and names the upstream behaviour it works around and when it can go. With TE and CUDA present nothing is changed.

Every shim, the upstream defect it works around and when it can go: `SHIMS` below. Entry points:
    prepare_process()           once per process, before NeMo/Megatron are imported (scripts call it first)
    model_config_overrides()    model-config fields that must change without TE (fusions)
    optimizer_config_overrides()
    cpu_checkpoint_io()         context manager around llm.import_ckpt / export_ckpt on a CPU host
    install_worker_hooks()      the same inside NeMo-Run's torchrun workers (via startup/sitecustomize.py), plus the
                                training-only shims (compiled RoPE, sync-free packed RoPE, fused LoRA, torch's
                                optimizer kernels and weight-gradient accumulation) and, with or without TE, the
                                fix of Megatron-Core 0.15's asynchronous checkpoint save; log_to_worker_output()
                                puts their `compat:` lines in the run's log; WORKER_SKIP_ENV leaves optional ones out;
                                `trial=` adds shims still being measured (TRIAL_WORKER_SHIMS: Liger-Kernel's RMSNorm);
                                `cuda_graphs=` (CUDA_GRAPHS_ENV, --cuda_graphs) graphs the layers of the model the
                                worker builds, with Megatron's graph-safe RNG tracker
    scoped(), undo()            take shims back (tests apply theirs in a scope)
    check_versions()            the shims refuse NeMo / Megatron-Core releases they were not written for
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.abc
import importlib.util
import logging
import sys
import types
from collections.abc import Iterator

log = logging.getLogger("peft_megatron.compat")

# Megatron's local layer spec names its norms differently from TE's fused LayerNormLinear. NeMo's HF connectors map
# only to the fused names, so without TE the import leaves every RMSNorm at 1.0 and the export crashes.
# Remove when the connectors pick names from the target's layer spec (NeMo > 2.7.3).
TE_TO_LOCAL_NORM_KEYS = {
    ".self_attention.linear_qkv.layer_norm_weight": ".input_layernorm.weight",
    ".self_attention.linear_qkv.layer_norm_bias": ".input_layernorm.bias",
    ".mlp.linear_fc1.layer_norm_weight": ".pre_mlp_layernorm.weight",
    ".mlp.linear_fc1.layer_norm_bias": ".pre_mlp_layernorm.bias",
}

# Fusions whose kernels come from TE, apex or CUDA extensions the pip wheels lack
# (`No module named 'scaled_masked_softmax_cuda'` for the first).
NO_TE_MODEL_OVERRIDES = {
    "masked_softmax_fusion": False,
    "apply_rope_fusion": False,
    "gradient_accumulation_fusion": False,
    "persist_layer_norm": False,
}
# Fusions Megatron compiles with torch.compile (`megatron/core/jit.py` jit_fuser; `fusions/fused_bias_swiglu.py`,
# `fused_bias_dropout.py`): no TE needed, only Triton. Training turns them on (Qwen3-8B LoRA on the H100: 8,847 vs
# 8,515 tokens/s, and 39.7 vs 46.4 GiB; benchmarks/train_throughput.py); inference leaves them off, because the
# dynamic engine captures CUDA graphs and a compilation inside a capture fails. The third torch-compiled fusion,
# cross_entropy_loss_fusion with the "native" implementation, stays off: it made the same step 4.4x slower
# (2,021 tokens/s).
COMPILED_FUSIONS = {"bias_activation_fusion": True, "bias_dropout_fusion": True}
# Off by measurement, not because TE is missing: set by model_config_overrides only, so that a benchmark can still
# turn it on (the config patch below forces NO_TE_MODEL_OVERRIDES on every config a process builds).
SLOWER_FUSIONS_OFF = {"cross_entropy_loss_fusion": False}
# Training turns it back on: the training workers accumulate weight gradients with torch's GEMM in apex's place
# (accumulate_wgrad_with_torch); a worker told to leave that shim out keeps it off.
WGRAD_FUSION = "gradient_accumulation_fusion"


@dataclasses.dataclass(frozen=True)
class Shim:
    where: str  # the processes it applies to
    upstream: str  # what the pinned release does wrong without TE / CUDA / flash-attn
    remove_when: str


# Every shim of this module, in one place (each function's docstring gives the detail and the measurements).
SHIMS = {
    "unified-memory-stub": Shim(
        "every process (not with TE and CUDA)",
        "megatron.core.inference.unified_memory compiles a managed-memory allocator with nvcc at import time: "
        "IndexError on CPU hosts, ~30 s per fresh GPU worker",
        "Megatron-Core builds it lazily (> 0.15.3)",
    ),
    "no-te-fusion-defaults": Shim(
        "every process without TE",
        "NeMo's model configs default to TE-only fusions, which TransformerConfig.__post_init__ then refuses",
        "NeMo picks fusion defaults from the environment (> 2.7.3)",
    ),
    "peft-te-guards": Shim(
        "every process without TE",
        "NeMo's LoRA transform compares modules with te.Linear unguarded; peft/utils trusts TE placeholder flags",
        "NeMo guards both (> 2.7.3)",
    ),
    "local-spec-norm-mapping": Shim(
        "every process without TE",
        "NeMo's HF connectors map RMSNorm weights only to TE's fused names: imports leave norms at 1.0",
        "the connectors follow the target's layer spec (> 2.7.3)",
    ),
    "cpu-checkpoint-io": Shim(
        "inside cpu_checkpoint_io() on a host without CUDA",
        "checkpoint import/export call torch.cuda functions although every tensor is on the CPU",
        "NeMo's converters run without CUDA",
    ),
    "compiled-rope": Shim(
        "training workers without TE",
        "Megatron's unfused RoPE is ~12 elementwise kernels per q/k per layer (the fused one needs TE)",
        "Megatron fuses RoPE without TE",
    ),
    "sync-free-packed-rope": Shim(
        "training workers without TE",
        "Megatron's packed-sequence RoPE copies sequence lengths to the host (a device sync) for q and k per layer",
        "Megatron's thd RoPE stops syncing",
    ),
    "fused-lora-output": Shim(
        "training workers without TE",
        "NeMo's LoRA scales and adds full-width outputs in separate kernels (its fused LoRA needs TE's op fuser)",
        "NeMo's LoRALinear fuses without TE",
    ),
    "torch-optimizer-kernels": Shim(
        "training workers without TE or apex",
        "Megatron's optimizer fallbacks without apex: torch's AdamW in its default (foreach) mode, and per-tensor "
        "loops for the gradient norm (a host sync per tensor) and the master-weight copy",
        "Megatron uses torch's fused AdamW and foreach ops when apex is absent (> 0.15.3)",
    ),
    "torch-wgrad-accumulation": Shim(
        "training workers without TE or apex",
        "without apex's fused_weight_gradient_mlp_cuda, gradient_accumulation_fusion must be off: every weight "
        "gradient is written in bf16 and then added to the fp32 main_grad by a separate kernel",
        "Megatron falls back to torch's GEMM with an fp32 output when apex is absent (> 0.15.3)",
    ),
    "liger-rmsnorm": Shim(
        "training workers without TE, on trial (TRIAL_WORKER_SHIMS)",
        "without TE or apex the local layer spec normalises with torch.nn.RMSNorm: its weight gradient is a separate "
        "reduction kernel (GammaBetaBackward, 9 ms of the Qwen3-1.7B full fine-tuning step on the H200)",
        "Megatron's local spec has a fused RMSNorm without TE or apex",
    ),
    "graph-safe-rng": Shim(
        "training workers of a --cuda_graphs run (with or without TE)",
        "NeMo seeds Megatron's default RNG tracker, and Megatron's local CUDA graphs (CudaGraphManager) refuse any but "
        "a graph-safe one; Megatron-LM's own training loop makes that one (use_cudagraphable_rng)",
        "NeMo makes the graph-safe tracker when cuda_graph_impl is 'local'",
    ),
    "local-cuda-graphs": Shim(
        "training workers of a --cuda_graphs run (with or without TE)",
        "NeMo keeps a model config's constructor arguments in every checkpoint's context, so a recipe's "
        "cuda_graph_impl='local' would reach every loader (the HF exporter, generation), whose CudaGraphManager per "
        "layer then asserts a graph-safe RNG tracker and makes CUDA streams: CPU exports and eager generation fail",
        "NeMo keeps execution settings out of checkpoint contexts, or its loaders reset cuda_graph_impl",
    ),
    "async-save-staged-buffers": Shim(
        "training workers (with or without TE) on Megatron-Core 0.15 / 0.16",
        "TemporalAsyncCaller (NeMo's asynchronous checkpoint save, on by default) drops the pinned host copies of the "
        "checkpoint's tensors once its writer is forked; torch reuses them while the writer reads them",
        "Megatron-Core >= 0.17.0 (Megatron-LM #2288 holds them until the writer is joined)",
    ),
    "paged-attention-triton": Shim(
        "test_checkpoint.py without flash-attn",
        "Megatron-Core's dynamic-batching attention calls only flash-attn's paged kernels",
        "Megatron ships a dynamic attention path without flash-attn",
    ),
}

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

# Training-worker shims on trial: applied only where a run asks for them (install_worker_hooks(trial=...); the training
# benchmark's variants), until their gain is measured on the GPU and they join the defaults.
TRIAL_WORKER_SHIMS = ("liger-rmsnorm",)

# The releases whose functions the no-TE shims replace by name and signature (requirements.txt pins them).
WRITTEN_FOR = {"nemo_toolkit": "2.7.", "megatron-core": "0.15."}

_applied: set[str] = set()
# Set by peft_megatron's executor, read by startup/sitecustomize.py: "1" applies every worker hook (no TE or no
# CUDA), CHECKPOINT_ONLY only the asynchronous-checkpoint fix (TE and CUDA, where nothing else needs changing).
WORKER_ENV_FLAG = "PEFT_MEGATRON_WORKER_COMPAT"
CHECKPOINT_ONLY = "checkpoint"
# OPTIONAL_WORKER_SHIMS the training workers leave out, comma-separated (unset: none).
WORKER_SKIP_ENV = "PEFT_MEGATRON_WORKER_SKIP"
# "1" when the run trains with CUDA graphs (--cuda_graphs): the workers graph their model's layers, with Megatron's
# graph-safe RNG tracker.
CUDA_GRAPHS_ENV = "PEFT_MEGATRON_CUDA_GRAPHS"


def worker_flag(env: Environment) -> str:
    """WORKER_ENV_FLAG's value for training workers in environment `env`."""
    return CHECKPOINT_ONLY if env.has_te and env.has_cuda else "1"


def skipped_in_workers(environ) -> frozenset[str]:
    """The OPTIONAL_WORKER_SHIMS that `environ`'s WORKER_SKIP_ENV asks the training workers to leave out; ValueError
    for a name that is not one."""
    names = frozenset(name.strip() for name in environ.get(WORKER_SKIP_ENV, "").split(",") if name.strip())
    if names - set(OPTIONAL_WORKER_SHIMS):
        raise ValueError(
            f"{WORKER_SKIP_ENV}={environ[WORKER_SKIP_ENV]!r} names {sorted(names - set(OPTIONAL_WORKER_SHIMS))}, "
            f"which the training workers cannot leave out; give a comma-separated list of "
            f"{list(OPTIONAL_WORKER_SHIMS)}, or unset it"
        )
    return names


@dataclasses.dataclass(frozen=True)
class Environment:
    has_te: bool
    has_cuda: bool

    def describe(self) -> str:
        return f"transformer_engine={'yes' if self.has_te else 'no'}, cuda={'yes' if self.has_cuda else 'no'}"


def detect_environment() -> Environment:
    """TE counts only if its torch extension imports: Megatron defines placeholder TE names when it is missing."""
    has_te = False
    if importlib.util.find_spec("transformer_engine") is not None:
        try:
            import transformer_engine.pytorch  # noqa: F401

            has_te = True
        except Exception as e:  # a broken TE install is treated as absent, loudly
            log.warning("transformer_engine is installed but does not import (%s); running without it", e)
    import torch

    return Environment(has_te=has_te, has_cuda=torch.cuda.is_available())


def applied() -> frozenset[str]:
    """Names of the shims applied in this process (for logs and tests)."""
    return frozenset(_applied)


_undo: list[tuple[str, object, str, object]] = []  # (shim, owner, attribute, the value it replaced), oldest first
_MISSING = object()


def _replace(shim: str, owner, attribute: str, value) -> None:
    """Set owner.attribute for `shim`, remembering what it replaces so that undo() can put it back."""
    _undo.append((shim, owner, attribute, getattr(owner, attribute, _MISSING)))
    setattr(owner, attribute, value)


def undo(shim: str | None = None, since: int = 0) -> None:
    """Put back what the shims (or the one named), applied after the first `since` replacements, replaced; newest
    first. The unified-memory stub stays: modules that imported it hold it, and the real module would compile."""
    for index in reversed(range(since, len(_undo))):
        name, owner, attribute, previous = _undo[index]
        if shim is not None and name != shim:
            continue
        if previous is _MISSING:
            delattr(owner, attribute)
        else:
            setattr(owner, attribute, previous)
        del _undo[index]
        if not any(other[0] == name for other in _undo):
            _applied.discard(name)


@contextlib.contextmanager
def scoped() -> Iterator[None]:
    """Shims applied inside the block are taken back when it ends (tests; the scripts keep theirs for the process)."""
    since = len(_undo)
    try:
        yield
    finally:
        undo(since=since)


def _mark(name: str, why: str) -> None:
    assert name in SHIMS, f"shim {name!r} is not listed in nemo_compat.SHIMS"
    if name not in _applied:
        _applied.add(name)
        log.info("compat: %s (%s)", name, why)


def prepare_process(env: Environment | None = None) -> Environment:
    """Apply the process-wide adaptations the environment needs; idempotent."""
    env = env or detect_environment()
    if env.has_te and env.has_cuda:
        return env
    skip_unified_memory_build(env)
    if not env.has_te:
        check_versions()
        _patch_config_fusions()
        _patch_peft_te_checks()
        _patch_norm_mapping()
    return env


@functools.cache
def _installed_versions() -> dict[str, str]:
    """The installed releases of WRITTEN_FOR's distributions, read once per process (prepare_process runs often)."""
    import importlib.metadata as metadata

    installed = {}
    for dist in WRITTEN_FOR:
        try:
            installed[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            installed[dist] = "not installed"
    return installed


def check_versions(installed: dict[str, str] | None = None) -> None:
    """The no-TE shims replace NeMo / Megatron-Core functions of the releases in WRITTEN_FOR; on other releases they
    could silently patch the wrong thing, so they refuse, naming what is installed and the fix."""
    installed = _installed_versions() if installed is None else installed
    wrong = {d: v for d, v in installed.items() if d in WRITTEN_FOR and not v.startswith(WRITTEN_FOR[d])}
    if wrong:
        found = ", ".join(f"{d} {v}" for d, v in wrong.items())
        wanted = ", ".join(f"{d} {p}x" for d, p in WRITTEN_FOR.items())
        raise RuntimeError(
            f"nemo_compat's shims for running without Transformer Engine were written for {wanted}; found {found}. "
            "Install the pinned stack (pip install -r requirements.txt), or install Transformer Engine, with which "
            "no shim is needed."
        )


def model_config_overrides(env: Environment, training: bool = False, skip: frozenset[str] = frozenset()) -> dict:
    """Model-config fields to set without TE: TE-only fusions off; for `training`, the torch-compiled ones on, and
    the weight-gradient accumulation fusion on unless the workers leave its shim out (`skip`, as
    skipped_in_workers gives it)."""
    if env.has_te:
        return {}
    compiled = COMPILED_FUSIONS if training else {name: False for name in COMPILED_FUSIONS}
    wgrad = {WGRAD_FUSION: training and "torch-wgrad-accumulation" not in skip}
    return {**NO_TE_MODEL_OVERRIDES, **SLOWER_FUSIONS_OFF, **compiled, **wgrad}


def optimizer_config_overrides(env: Environment) -> dict:
    # Without TE or apex, Megatron falls back to torch's Adam, and its distributed optimizer then fails at the first
    # checkpoint save (distrib_optimizer.py sharding assertion, mcore 0.15.3).
    return {} if env.has_te else {"use_distributed_optimizer": False}


def skip_unified_memory_build(env: Environment | None = None) -> None:
    """megatron/core/inference/unified_memory.py compiles a cudaMallocManaged allocator with nvcc at import time.

    It is used only by dynamic inference with `unified_memory_level > 0`, which we never request. On CPU hosts the
    build raises IndexError out of the import (not caught upstream); on GPU hosts it is a compile per fresh machine.
    A stub module with the same public names stands in. Remove when Megatron builds it lazily (mcore > 0.15.3)."""
    name = "megatron.core.inference.unified_memory"
    if name in sys.modules:
        return
    stub = types.ModuleType(name, "stub installed by nemo_compat: managed-memory allocator not built")
    stub.has_unified_memory = False
    stub._alloc = None

    def create_unified_mempool():
        raise RuntimeError("unified memory was not built (nemo_compat); use unified_memory_level=0")

    stub.create_unified_mempool = create_unified_mempool
    sys.modules[name] = stub
    _mark("unified-memory-stub", f"no build of the managed-memory allocator; {env.describe() if env else 'worker'}")


def _patch_config_fusions() -> None:
    """NeMo's model configs default to TE-only fusions (LlamaConfig: apply_rope_fusion=True), and Megatron's
    TransformerConfig.__post_init__ raises "apply_rope_fusion is not available. Please install TE" - even inside
    the HF importer, which builds such a config before any recipe override can apply. Without TE, switch those
    fusions off as every config is constructed. Remove when NeMo picks fusion defaults from the environment."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    original = TransformerConfig.__post_init__
    if getattr(original, "_nemo_compat", False):
        return

    def __post_init__(self):
        for name, value in NO_TE_MODEL_OVERRIDES.items():
            if name == WGRAD_FUSION and wgrad_accumulation_available():
                continue
            if getattr(self, name, value) != value:
                setattr(self, name, value)
        original(self)

    __post_init__._nemo_compat = True
    _replace("no-te-fusion-defaults", TransformerConfig, "__post_init__", __post_init__)
    _mark("no-te-fusion-defaults", "TE-only fusions are switched off as model configs are built")


def _patch_peft_te_checks() -> None:
    """NeMo's LoRA transform compares `m.__class__ == te.Linear` without a TE guard (lora.py), and peft/utils.py
    trusts HAVE_TE flags computed from Megatron's TE placeholder names. Remove when NeMo guards both (> 2.7.3)."""
    from nemo.collections.llm.peft import lora, utils

    absent = types.SimpleNamespace(
        Linear=type("TransformerEngineAbsentLinear", (), {}),
        LayerNormLinear=type("TransformerEngineAbsentLayerNormLinear", (), {}),
    )
    if not isinstance(lora.te, types.SimpleNamespace):
        _replace("peft-te-guards", lora, "te", absent)
    if utils.HAVE_TE:
        _replace("peft-te-guards", utils, "HAVE_TE", False)
    _mark("peft-te-guards", "LoRA wraps Megatron's local ColumnParallel/RowParallel linears")


def remap_norm_keys(mapping: dict, nemo_keys, nemo_is_target: bool) -> dict:
    """Rewrite an HF<->NeMo key mapping for a NeMo model built with the local (non-TE) layer spec."""
    keys = list(nemo_keys)
    uses_fused = any(k.endswith(te) for k in keys for te in TE_TO_LOCAL_NORM_KEYS)
    uses_local = any(k.endswith(local) for k in keys for local in TE_TO_LOCAL_NORM_KEYS.values())
    if uses_fused or not uses_local:
        return mapping

    def rename(key: str) -> str:
        for te, local in TE_TO_LOCAL_NORM_KEYS.items():
            if key.endswith(te):
                return key[: -len(te)] + local
        return key

    if nemo_is_target:
        return {src: rename(dst) for src, dst in mapping.items()}
    return {rename(src): dst for src, dst in mapping.items()}


def _state_keys(obj) -> list[str]:
    state_dict = getattr(obj, "state_dict", None)
    return list(state_dict().keys()) if callable(state_dict) else []


def _dominant_dtype(module):
    counts: dict = {}
    for p in module.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else None


def _is_nemo_side(keys: list[str]) -> bool:
    return any(".decoder.layers." in f".{k}" for k in keys)


def _patch_norm_mapping() -> None:
    from nemo.lightning import io
    from nemo.lightning.io import state

    original = state.apply_transforms
    if getattr(io.apply_transforms, "_nemo_compat", False):
        return

    def apply_transforms(source, target, mapping, *args, **kwargs):
        target_keys = _state_keys(target)
        if _is_nemo_side(target_keys):
            mapping = remap_norm_keys(mapping, target_keys, nemo_is_target=True)
        else:
            source_keys = _state_keys(source)
            if _is_nemo_side(source_keys):
                mapping = remap_norm_keys(mapping, source_keys, nemo_is_target=False)
                # Local-spec checkpoints trained in bf16 keep their RMSNorm weights in float32 while the exporter
                # builds a bf16 HF model, and apply_transforms then asserts "dtype mismatch"; cast to the target's
                # dtype, as NeMo's own cast_dtype option does.
                if kwargs.get("cast_dtype") is None and len(args) < 3:
                    kwargs["cast_dtype"] = _dominant_dtype(target)
        return original(source, target, mapping, *args, **kwargs)

    apply_transforms._nemo_compat = True
    _replace("local-spec-norm-mapping", io, "apply_transforms", apply_transforms)
    _replace("local-spec-norm-mapping", state, "apply_transforms", apply_transforms)
    _mark("local-spec-norm-mapping", "HF<->NeMo conversion maps RMSNorm weights to the local layer spec")


@contextlib.contextmanager
def cpu_checkpoint_io(env: Environment | None = None) -> Iterator[None]:
    """Let NeMo's checkpoint import/export/merge run on a host without CUDA.

    Megatron's async checkpoint writer and NeMo's loader call torch.cuda.synchronize(), current_device(), Stream()
    and assert torch.cuda.is_initialized() although every tensor is on the CPU (filesystem_async.py,
    state_dict_saver.py, async_utils.py, megatron_parallel.py, nemo/lightning/io/pl.py). Inside this context those
    calls are CPU no-ops; outside it torch is untouched. With CUDA present it does nothing."""
    env = env or detect_environment()
    if env.has_cuda:
        yield
        return
    import nemo.lightning.io.pl as nemo_pl
    import torch

    since = len(_undo)
    cpu_no_ops = {
        "synchronize": lambda *a, **k: None,
        "current_device": lambda: "cpu",
        "Stream": lambda *a, **k: None,
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "is_initialized": lambda: True,
    }
    for name, no_op in cpu_no_ops.items():
        _replace("cpu-checkpoint-io", torch.cuda, name, no_op)
    _replace("cpu-checkpoint-io", nemo_pl, "_fix_tensors_device", lambda ckpt: ckpt)
    _mark("cpu-checkpoint-io", "checkpoint conversion on a host without CUDA")
    try:
        yield
    finally:
        undo("cpu-checkpoint-io", since=since)


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs `patch()` right after `module` is imported (for patches that must land before first use)."""

    def __init__(self, module: str, patch):
        self.module, self.patch = module, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module, patch = spec.loader.exec_module, self.patch

        def exec_then_patch(module):
            exec_module(module)
            patch()

        spec.loader.exec_module = exec_then_patch
        return spec


def _after_import(module: str, patch) -> None:
    if module in sys.modules:
        patch()
    else:
        sys.meta_path.insert(0, _PostImportHook(module, patch))


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
) -> None:
    """For the training workers (startup/sitecustomize.py; benchmarks/train_throughput.py in its own process): stub
    the allocator build now; apply the PEFT guards, the compiled RoPE and the fused LoRA output as soon as their
    modules load, and keep asynchronous checkpoint saves intact (hold_async_save_buffers, with or without TE), with no
    NeMo import of our own (torchrun's launcher process runs this too). `skip` names OPTIONAL_WORKER_SHIMS to leave
    out; the benchmark measures each against its absence. `trial` names TRIAL_WORKER_SHIMS to apply as well.
    `cuda_graphs` (a --cuda_graphs run, with or without TE): Megatron's local CUDA graphs on the model NeMo builds
    here, and its graph-safe RNG tracker.
    `checkpoint_only` (TE and CUDA present): the checkpoint fix (and the tracker) alone."""
    unknown = set(skip) - set(OPTIONAL_WORKER_SHIMS)
    if unknown:
        raise ValueError(f"no optional worker shims named {sorted(unknown)}; OPTIONAL_WORKER_SHIMS lists them")
    unknown = set(trial) - set(TRIAL_WORKER_SHIMS)
    if unknown:
        raise ValueError(f"no trial worker shims named {sorted(unknown)}; TRIAL_WORKER_SHIMS lists them")

    staged_buffers_dropped = _installed_versions()["megatron-core"].startswith(STAGED_BUFFERS_DROPPED_IN)
    if "async-save-staged-buffers" not in skip and staged_buffers_dropped:
        _after_import(ASYNC_SAVE_MODULE, hold_async_save_buffers)
    if cuda_graphs:
        _after_import(RNG_MODULE, make_rng_tracker_graph_safe)
        _after_import(GPT_MODEL_MODULE, graph_layers_as_the_model_is_built)
    if checkpoint_only:
        return
    skip_unified_memory_build()
    if importlib.util.find_spec("transformer_engine") is None:
        check_versions()
        _after_import(LORA_MODULE, _patch_peft_te_checks)
        if "compiled-rope" not in skip:
            _after_import(ROPE_MODULE, compile_unfused_rope)
        if "sync-free-packed-rope" not in skip:
            _after_import(ROPE_MODULE, install_sync_free_packed_rope)
        if "fused-lora-output" not in skip:
            _after_import(LORA_MODULE, fuse_lora_output)
        if "torch-optimizer-kernels" not in skip:
            _after_import(OPTIMIZER_MODULE, use_torch_optimizer_kernels)
        if "torch-wgrad-accumulation" not in skip:
            _after_import(LINEAR_MODULE, accumulate_wgrad_with_torch)
        if "liger-rmsnorm" in trial:
            _after_import(NORM_MODULE, fuse_rmsnorm_with_liger)


ROPE_MODULE = "megatron.core.models.common.embeddings.rope_utils"
LORA_MODULE = "nemo.collections.llm.peft.lora"
OPTIMIZER_MODULE = "megatron.core.optimizer"
LINEAR_MODULE = "megatron.core.tensor_parallel.layers"
NORM_MODULE = "megatron.core.transformer.torch_norm"
RNG_MODULE = "megatron.core.tensor_parallel.random"
GPT_MODEL_MODULE = "nemo.collections.llm.gpt.model.base"


def make_rng_tracker_graph_safe() -> None:
    """Megatron's CudaGraphManager, made in every transformer layer when cuda_graph_impl is "local", asserts an RNG
    tracker whose CUDA generators are graph-safe. NeMo's setup seeds whichever tracker exists and makes the default
    one if none does; Megatron keeps the first tracker a process makes, so the graph-safe one is made here, when
    Megatron's RNG module loads, before NeMo's setup. Megatron-LM's training loop passes use_cudagraphable_rng itself.
    Remove when NeMo makes it for cuda_graph_impl="local"."""
    import torch

    if not hasattr(torch.Generator, "graphsafe_get_state") or not torch.cuda.is_available():
        raise RuntimeError(
            f"--cuda_graphs needs a CUDA GPU and a CUDA build of torch; this worker has torch {torch.__version__} "
            f"with CUDA {'available' if torch.cuda.is_available() else 'unavailable'}: drop --cuda_graphs"
        )
    module = importlib.import_module(RNG_MODULE)
    module.initialize_rng_tracker(use_cudagraphable_rng=True, force_reset=True)
    _mark("graph-safe-rng", "Megatron's graph-safe RNG tracker for the local CUDA graphs (training workers)")


def graph_layers_as_the_model_is_built() -> None:
    """--cuda_graphs: Megatron's local CUDA graphs (cuda_graph_impl="local") set on the model config when NeMo builds
    the Megatron model from it (`GPTConfig.configure_model`, which Qwen3, Llama and Mistral use), not in the recipe.
    The checkpoint context holds the config as the LightningModule took it at construction (its constructor
    arguments, or a snapshot of its fields where NeMo's init wrapper skipped the class), so checkpoints keep "none"
    and load anywhere; a recipe setting would make every loader (the HF exporter on CPU, eager generation) build a
    CudaGraphManager per layer, which asserts a graph-safe RNG tracker and makes CUDA streams. Megatron's config
    check has run by then, so its refusals for graphs (recomputation, CPU offloading) are made here. Remove when NeMo
    keeps execution settings out of checkpoint contexts or its loaders reset them."""
    from nemo.collections.llm.gpt.model.base import GPTConfig

    original = GPTConfig.configure_model
    if getattr(original, "_nemo_compat", False):
        return

    def configure_model(self, *args, **kwargs):
        if self.cuda_graph_impl == "none":
            uncapturable = [name for name in ("recompute_granularity", "cpu_offloading") if getattr(self, name, None)]
            if uncapturable:  # what TransformerConfig.__post_init__ refuses for graphs, which ran before this
                raise ValueError(
                    f"--cuda_graphs: the model config sets {' and '.join(uncapturable)}, which Megatron's CUDA graphs "
                    "do not support; drop --cuda_graphs"
                )
            self.cuda_graph_impl = "local"
        return original(self, *args, **kwargs)

    configure_model._nemo_compat = True
    _replace("local-cuda-graphs", GPTConfig, "configure_model", configure_model)
    _mark("local-cuda-graphs", "every transformer layer runs Megatron's local CUDA graphs (training workers)")


def compile_unfused_rope() -> None:
    """Without TE (`apply_rope_fusion` needs it), Megatron-Core 0.15.3 applies RoPE as ~12 unfused elementwise
    kernels per q/k per layer and pass (`rope_utils._apply_rotary_pos_emb_bshd`: cos, sin, casts, chunk, neg, cat,
    multiplies, add); torch.compile fuses them, as Megatron's own jit_fuser does for SwiGLU. Qwen3-8B LoRA on the
    H100, one job: 9,603 vs 7,719 tokens/s (benchmarks/train_throughput.py, docs/BENCHMARKS.md). Training workers only:
    inference captures CUDA graphs, where a first compilation fails. Remove when Megatron fuses RoPE without TE."""
    import inspect

    import torch

    module = importlib.import_module(ROPE_MODULE)
    original = getattr(module, "_apply_rotary_pos_emb_bshd", None)
    if getattr(original, "_nemo_compat", False):
        return
    expected = ["t", "freqs", "rotary_interleaved", "multi_latent_attention", "mscale"]
    if original is None or list(inspect.signature(original).parameters) != expected:
        log.warning(
            "compat: RoPE left uncompiled: %s._apply_rotary_pos_emb_bshd is not Megatron-Core 0.15's", ROPE_MODULE
        )
        return
    compiled = torch.compile(original)
    compiled._nemo_compat = True
    _replace("compiled-rope", module, "_apply_rotary_pos_emb_bshd", compiled)
    _mark("compiled-rope", "Megatron's unfused RoPE compiled with torch.compile (training workers)")


def install_sync_free_packed_rope() -> None:
    """Megatron-Core 0.15.3's unfused RoPE for packed sequences (`rope_utils._apply_rotary_pos_emb_thd`) copies the
    sequence lengths to the host (`.tolist()`, a device sync) and slices freqs per sequence, for q and for k in every
    layer; each sync costs a host-bound step its lead on the GPU. This one finds each token's position inside its
    sequence on the device (searchsorted over cu_seqlens, once per batch) and applies the bshd RoPE once — Megatron's
    own "traditional mapping" (freqs per position, CP = 1); its offset mapping (freqs covering every packed token)
    and CP > 1 still go to Megatron's function. Remove when Megatron's thd RoPE stops syncing."""
    import inspect

    module = importlib.import_module(ROPE_MODULE)
    original = getattr(module, "_apply_rotary_pos_emb_thd", None)
    if getattr(original, "_nemo_compat", False):
        return
    expected = ["t", "cu_seqlens", "freqs", "rotary_interleaved", "multi_latent_attention", "mscale", "cp_group"]
    if original is None or list(inspect.signature(original).parameters) != expected:
        log.warning(
            "compat: packed RoPE left as is: %s._apply_rotary_pos_emb_thd is not Megatron-Core 0.15's", ROPE_MODULE
        )
        return

    def apply_rotary_pos_emb_thd(
        t, cu_seqlens, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0, cp_group=None
    ):
        if cp_group is None or cp_group.size() != 1 or freqs.size(0) == t.size(0):
            return original(
                t,
                cu_seqlens,
                freqs,
                rotary_interleaved=rotary_interleaved,
                multi_latent_attention=multi_latent_attention,
                mscale=mscale,
                cp_group=cp_group,
            )
        freqs_packed = freqs[positions_in_sequence(cu_seqlens, t.size(0))]
        return module._apply_rotary_pos_emb_bshd(  # looked up per call: the compiled one where installed
            t.unsqueeze(1),
            freqs_packed,
            rotary_interleaved=rotary_interleaved,
            multi_latent_attention=multi_latent_attention,
            mscale=mscale,
        ).squeeze(1)

    apply_rotary_pos_emb_thd._nemo_compat = True
    _replace("sync-free-packed-rope", module, "_apply_rotary_pos_emb_thd", apply_rotary_pos_emb_thd)
    _mark("sync-free-packed-rope", "Megatron's packed-sequence RoPE without host syncs (training workers)")


_last_positions: tuple = (lambda: None, -1, 0, None)  # (weakref to cu_seqlens, its version, tokens, positions)


def positions_in_sequence(cu_seqlens, tokens: int):
    """Each packed token's position inside its own sequence, on cu_seqlens' device; every layer (q and k) gets the
    same cu_seqlens tensor, so it is computed once per batch. Not while a CUDA graph is capturing (--cuda_graphs):
    each layer's graph must compute them from its own cu_seqlens buffer, which every replay refills; a cached tensor
    would be baked into the graph with the capture batch's positions."""
    import weakref

    import torch

    from sdpa_attention import capturing

    global _last_positions
    in_capture = capturing()
    ref, version, size, positions = _last_positions
    if not in_capture and ref() is cu_seqlens and version == cu_seqlens._version and size == tokens:
        return positions
    index = torch.arange(tokens, device=cu_seqlens.device)
    starts = cu_seqlens.to(index.dtype)
    positions = index - starts[torch.searchsorted(starts, index, right=True) - 1]
    if not in_capture:
        _last_positions = (weakref.ref(cu_seqlens), cu_seqlens._version, tokens, positions)
    return positions


def fuse_lora_output() -> None:
    """NeMo 2.7.3's LoRA (`LoRALinear.forward`, `ParallelLinearAdapter.forward`) runs the frozen linear and the
    adapter's two linears each through Megatron's parallel-linear machinery, scales the adapter's full-width output
    by alpha/dim, adds it to the base output, and in backward scales the gradient and adds the two input gradients:
    four elementwise passes over full-width tensors per adapted linear, 576 kernels of a Qwen3-8B step (~30 ms of the
    GPU's 337; profile in docs/BENCHMARKS.md), plus the host time of launching them. On one tensor-parallel rank, for
    a plain LoRA (identity activation, no dropout, no expert or sequence-parallel communication) on a frozen
    bias-free linear, `LoRALinearFunction` computes the same in matmuls alone: the scale moves to the rank-r
    intermediate, ((x A^T) s) B^T = s (x A^T B^T), and both sums go into the matmuls (`addmm`). Everything else keeps
    NeMo's forward. Qwen3-8B LoRA on the H200, one job: 12,269 vs 10,228 tokens/s, same losses (run 43). TE's op fuser
    (NeMo's TEFusedLoRALinear) fuses the same with TE. Training workers only; remove when NeMo's LoRALinear fuses
    without TE."""
    module = importlib.import_module(LORA_MODULE)
    original = getattr(getattr(module, "LoRALinear", None), "forward", None)
    if getattr(original, "_nemo_compat", False):
        return
    if original is None:
        log.warning("compat: LoRA left as is: %s has no LoRALinear.forward (not NeMo 2.7's)", LORA_MODULE)
        return

    def forward(self, x, *args, **kwargs):
        fused = self.__dict__.get("_fused_lora_output")
        if fused is None:  # decided once per module: its layers, groups and frozen weights do not change
            fused = self.__dict__["_fused_lora_output"] = _plain_lora(self)
        if not fused or args or kwargs:
            return original(self, x, *args, **kwargs)
        adapter = self.adapter
        scale = adapter.alpha / adapter.dim
        out = _lora_linear_function().apply(
            x, self.to_wrap.weight, adapter.linear_in.weight, adapter.linear_out.weight, scale
        )
        return out, None

    forward._nemo_compat = True
    _replace("fused-lora-output", module.LoRALinear, "forward", forward)
    _mark("fused-lora-output", "LoRA as one matmul-only autograd function on one TP rank (training workers)")


def _plain_lora(wrapper) -> bool:
    """What LoRALinearFunction computes exactly: Megatron's own linear, frozen, bias-free, unsharded, under NeMo's
    plain LoRA adapter."""
    import torch
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from nemo.collections.llm.peft.utils import ParallelLinearAdapter

    base, adapter = wrapper.to_wrap, wrapper.adapter
    linears = (base, adapter.linear_in, adapter.linear_out)
    return (
        type(base) in (ColumnParallelLinear, RowParallelLinear)
        and base.bias is None
        and not base.weight.requires_grad
        and not base.config.sequence_parallel
        and type(adapter) is ParallelLinearAdapter
        and isinstance(adapter.activation, torch.nn.Identity)
        and adapter.dropout is None
        and not adapter.is_expert
        and not adapter.config.cpu_offloading
        and all(torch.distributed.get_world_size(linear.tp_group) == 1 for linear in linears)
    )


@functools.cache
def _lora_linear_function():
    import torch

    class LoRALinearFunction(torch.autograd.Function):
        """y = x W^T + (s x A^T) B^T with W frozen; backward dx = g W + (s g B) A, dA = (s g B)^T x, dB = g^T (s x A^T).
        Five matmuls and two rank-r scalings, no full-width elementwise pass."""

        @staticmethod
        def forward(ctx, x, weight, lora_a, lora_b, scale):
            rows = x.reshape(-1, x.shape[-1])
            low = torch.mm(rows, lora_a.t()).mul_(scale)
            out = torch.addmm(torch.mm(rows, weight.t()), low, lora_b.t())
            ctx.save_for_backward(x, weight, lora_a, lora_b, low)
            ctx.scale = scale
            return out.view(*x.shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            x, weight, lora_a, lora_b, low = ctx.saved_tensors
            rows, grad_rows = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
            grad_low = torch.mm(grad_rows, lora_b).mul_(ctx.scale)
            grad_x = torch.addmm(torch.mm(grad_rows, weight), grad_low, lora_a)
            return grad_x.view_as(x), None, grad_low.t().mm(rows), grad_rows.t().mm(low), None

    return LoRALinearFunction


# --------------------------------------------------------------------------------------------------------------------
# Fused RMSNorm from Liger-Kernel (training workers, on trial)
# --------------------------------------------------------------------------------------------------------------------
def fuse_rmsnorm_with_liger() -> None:
    """Without TE or apex, Megatron-Core 0.15.3's local layer spec builds every norm through WrappedTorchNorm, which
    returns torch.nn.RMSNorm: the layers' input and pre-MLP norms, Qwen3's q/k norms and the final norm, 113 in the
    Qwen3-1.7B step. Its backward is two kernels, the input gradient and a separate weight-gradient reduction
    (GammaBetaBackward: 9 of the 16 ms per step of norms in GPU run 63's profile; Qwen3's q/k norms reduce 65,536
    and 32,768 rows of 128). Liger-Kernel's RMSNorm (a maintained Triton kernel library) does the backward in one
    kernel whose programs each sum their rows' weight gradient in fp32, then adds the per-SM partials.
    WrappedTorchNorm's norms become liger_rmsnorm_class() — the same parameters and state dict, torch's maths —
    wherever a local spec is built after this. On trial (TRIAL_WORKER_SHIMS): the training benchmark's `liger_norm`
    variant measures it before it joins the defaults. Remove when Megatron's local spec has a fused norm without TE
    or apex."""
    import inspect

    module = importlib.import_module(NORM_MODULE)
    wrapper = getattr(module, "WrappedTorchNorm", None)
    original = getattr(wrapper, "__new__", None)
    if getattr(original, "_nemo_compat", False):
        return
    expected = ["cls", "config", "hidden_size", "eps", "persist_layer_norm", "zero_centered_gamma", "normalization"]
    if original is None or list(inspect.signature(original).parameters) != expected:
        log.warning("compat: norms left as torch's: %s.WrappedTorchNorm is not Megatron-Core 0.15's", NORM_MODULE)
        return
    if importlib.util.find_spec("liger_kernel") is None:
        log.warning("compat: norms left as torch's: liger-kernel is not installed (requirements-dev.txt pins it)")
        return
    import torch

    fused = liger_rmsnorm_class()

    def new(cls, *args, **kwargs):
        norm = original(cls, *args, **kwargs)  # Megatron's own checks of the config
        if type(norm) is not torch.nn.RMSNorm:  # LayerNorm / L2Norm models keep theirs
            return norm
        return fused(norm.normalized_shape, eps=norm.eps)

    new._nemo_compat = True
    _replace("liger-rmsnorm", wrapper, "__new__", new)
    _mark("liger-rmsnorm", "RMSNorm forward and backward in Liger-Kernel's Triton kernels (training workers, trial)")


@functools.cache
def liger_rmsnorm_class():
    """The norm module fuse_rmsnorm_with_liger builds, defined on first use (it imports torch and Liger-Kernel)."""
    import torch
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    class LigerRMSNorm(torch.nn.RMSNorm):
        """torch.nn.RMSNorm whose CUDA forward and backward are Liger-Kernel's kernels. Its "gemma" casting with
        offset 0 is torch's maths: statistics and the weight multiply in fp32, the output cast to the input's dtype.
        The backward writes the input gradient to a fresh tensor (Liger's in-place default would overwrite the
        incoming gradient, which autograd may share). Other devices, or no weight / eps: torch's forward."""

        def forward(self, x):
            if not x.is_cuda or self.weight is None or self.eps is None:
                return super().forward(x)
            return LigerRMSNormFunction.apply(x, self.weight, self.eps, 0.0, "gemma", False)

    return LigerRMSNorm


# --------------------------------------------------------------------------------------------------------------------
# Asynchronous checkpoint save (training workers, with or without TE)
# --------------------------------------------------------------------------------------------------------------------
ASYNC_SAVE_MODULE = "megatron.core.dist_checkpointing.strategies.async_utils"
STAGED_BUFFERS_DROPPED_IN = ("0.15.", "0.16.")  # the Megatron-Core releases before Megatron-LM #2288


def hold_async_save_buffers() -> None:
    """NeMo saves checkpoints asynchronously (MegatronStrategy's ckpt_async_save defaults to True) through
    Megatron-Core's TemporalAsyncCaller: the checkpoint's tensors are copied into pinned host memory, a writer
    process is forked to write them, and the caller drops its references to those copies as soon as the writer
    starts. Pinned pages are shared with a forked child, not copied on write, and torch's pinned-memory cache hands
    the freed buffers to the trainer's next pinned allocations (the data loader pins every batch), so the writer can
    save whatever has been put there since. GPU runs 51 and 53: the demo's best checkpoint, written mid-training,
    read back one LoRA output matrix as all zero (exact match 0.000 instead of 0.947). The caller now holds the
    copies until the writer has been joined, as Megatron-LM #2288 does. Remove with Megatron-Core >= 0.17.0."""
    caller = importlib.import_module(ASYNC_SAVE_MODULE).TemporalAsyncCaller
    schedule, close = caller.schedule_async_call, caller.close
    if getattr(schedule, "_nemo_compat", False):
        return

    @functools.wraps(schedule)
    def schedule_async_call(self, async_req):
        stage = async_req.preload_fn
        if stage is not None:

            def stage_and_hold():
                self._nemo_compat_staged = stage()
                return self._nemo_compat_staged

            async_req = async_req._replace(preload_fn=stage_and_hold)
        return schedule(self, async_req)

    @functools.wraps(close)
    def close_after_writer(self, abort: bool = False):
        result = close(self, abort)
        self._nemo_compat_staged = None  # the writer has been joined (or killed)
        return result

    schedule_async_call._nemo_compat = True
    _replace("async-save-staged-buffers", caller, "schedule_async_call", schedule_async_call)
    _replace("async-save-staged-buffers", caller, "close", close_after_writer)
    _mark("async-save-staged-buffers", "asynchronous checkpoint saves keep their pinned copies until written")


# --------------------------------------------------------------------------------------------------------------------
# Optimizer kernels without apex (training workers)
# --------------------------------------------------------------------------------------------------------------------
def use_torch_optimizer_kernels() -> None:
    """Without TE or apex, Megatron-Core 0.15.3 builds torch's AdamW in its default foreach mode (several passes
    over the fp32 master weights and both moments per step) and replaces apex's multi-tensor kernels with per-tensor
    loops: `local_multi_tensor_l2_norm` copies every gradient's norm to the host (a device sync per tensor) and
    `local_multi_tensor_scale` runs two kernels and an fp32 temporary per tensor for the master-weight copy and the
    gradient clipping. Here torch's fused AdamW (switched on as each optimizer is built, while its state is empty;
    NeMo's checkpoints do not save param groups, and torch moves a resumed step counter to the device the fused
    kernel needs) and torch's foreach norm and copy, with apex's contracts, take their place. Qwen3-1.7B full
    fine-tuning on the H200, one job: +39%, 23,377 vs 16,817 tokens/s (run 55). Suspended after runs 51-53 lost an
    adapter from a checkpoint written mid-training; the cause was Megatron-Core's asynchronous save
    (hold_async_save_buffers), and with that fix every checkpoint written during training was intact, with and
    without these kernels (run 57). Remove when Megatron uses torch's fused kernels without apex."""
    package = importlib.import_module(OPTIMIZER_MODULE)
    if not getattr(package, "USING_PYTORCH_OPTIMIZER", False):
        return  # TE's or apex's fused optimizer and kernels
    build = package._get_megatron_optimizer_based_on_param_groups
    if getattr(build, "_nemo_compat", False):
        return
    clip_grads = importlib.import_module(f"{OPTIMIZER_MODULE}.clip_grads")
    mixed_precision = importlib.import_module(f"{OPTIMIZER_MODULE}.optimizer")

    @functools.wraps(build)
    def build_fused(*args, **kwargs):
        built = build(*args, **kwargs)
        _fuse_adam(getattr(built, "optimizer", None))
        return built

    build_fused._nemo_compat = True
    _replace("torch-optimizer-kernels", package, "_get_megatron_optimizer_based_on_param_groups", build_fused)
    _replace("torch-optimizer-kernels", clip_grads, "l2_norm_impl", foreach_l2_norm)
    _replace("torch-optimizer-kernels", clip_grads, "multi_tensor_scale_impl", foreach_scale)
    _replace("torch-optimizer-kernels", mixed_precision, "multi_tensor_scale_impl", foreach_scale)
    _mark("torch-optimizer-kernels", "torch's fused AdamW and foreach norm / copy in place of per-tensor loops")


def _fuse_adam(optimizer) -> None:
    import torch

    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) or optimizer.state:
        return  # SGD, or already stepped: leave it as built
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if all(p.is_floating_point() and p.device.type in ("cuda", "cpu") for p in params):
        for group in optimizer.param_groups:
            group.update(fused=True, foreach=False)


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale) -> None:
    """amp_C.multi_tensor_scale's contract, dst = src * scale, in torch's foreach kernels."""
    import torch

    sources, targets = tensor_lists
    torch._foreach_copy_(targets, sources if scale == 1.0 else torch._foreach_mul(sources, scale))


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """amp_C.multi_tensor_l2norm's contract: the total L2 norm as a float32 [1] tensor on the tensors' device (no host
    round trip), and None for the per-tensor norms (Megatron asks for none)."""
    import torch

    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


# --------------------------------------------------------------------------------------------------------------------
# Weight-gradient accumulation without apex (training workers)
# --------------------------------------------------------------------------------------------------------------------
def accumulate_wgrad_with_torch() -> None:
    """With gradient_accumulation_fusion, Megatron's linear layers add each weight gradient straight into the fp32
    `main_grad` buffer that its DDP reduces and the optimizer reads, in one GEMM (apex's fused_weight_gradient_mlp_cuda:
    cuBLAS with bf16 inputs, an fp32 output and beta 1). Without apex, Megatron-Core 0.15.3 refuses the fusion, so
    every weight gradient is first written in bf16 and then added to main_grad by DDP's backward hook in a separate
    kernel: 10 bytes of memory traffic per parameter per step, ~12 ms of the Qwen3-1.7B full fine-tuning step on the
    H200 (CUDAFunctor_add<float>, 226 calls per step; profile of GPU run 63), and the bf16 gradients round before they
    are summed. torch's addmm with out_dtype=float32 is that GEMM; it takes the extension's place. Run 64, one job:
    202 vs 207 ms per step (+2.6%, within that host-bound node's spread), same losses, fp32 sums. Frozen weights
    (LoRA's base) compute no weight gradient either way. Remove when Megatron falls back to torch's GEMM without
    apex."""
    layers = importlib.import_module(LINEAR_MODULE)
    if layers._grad_accum_fusion_available:
        return  # apex's extension, or this shim already
    kernels = types.SimpleNamespace(
        wgrad_gemm_accum_fp32=wgrad_gemm_accumulate, wgrad_gemm_accum_fp16=wgrad_gemm_accumulate
    )
    _replace("torch-wgrad-accumulation", layers, "fused_weight_gradient_mlp_cuda", kernels)
    _replace("torch-wgrad-accumulation", layers, "_grad_accum_fusion_available", True)
    _mark("torch-wgrad-accumulation", "weight gradients accumulate into main_grad in the GEMM (torch's addmm)")


def wgrad_accumulation_available() -> bool:
    """Whether Megatron's linear layers, if loaded, can fuse weight-gradient accumulation (apex, or the shim)."""
    layers = sys.modules.get(LINEAR_MODULE)
    return bool(getattr(layers, "_grad_accum_fusion_available", False))


def wgrad_gemm_accumulate(input, grad_output, main_grad) -> None:
    """fused_weight_gradient_mlp_cuda's contract: main_grad += grad_output^T @ input for 2-D [tokens, in] and
    [tokens, out], accumulated in main_grad's precision (fp32 for bf16 inputs, as cuBLAS does in apex's kernel)."""
    import torch

    if main_grad.is_cuda and main_grad.dtype == torch.float32 and input.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(main_grad, grad_output.t(), input, out_dtype=torch.float32, out=main_grad)
    else:  # same dtypes, or CPU torch, which has no mixed-precision addmm
        main_grad.addmm_(grad_output.t().to(main_grad.dtype), input.to(main_grad.dtype))


# --------------------------------------------------------------------------------------------------------------------
# Paged attention without flash-attn (dynamic inference)
# --------------------------------------------------------------------------------------------------------------------
def install_paged_attention_fallback() -> bool:
    """Megatron-Core 0.15.3's dynamic-batching attention calls only flash-attn's paged kernels (attention.py,
    `flash_decode_and_prefill`); without flash-attn those names are None. Point them at paged_attention.py's Triton
    kernel, which has the same signatures and output shapes. Returns True if installed; with flash-attn (2 or 3)
    present nothing changes. Remove when Megatron ships a non-flash-attn dynamic attention path."""
    from megatron.core.transformer import attention

    if getattr(attention, "HAVE_FA3", False) or (
        attention.flash_attn_varlen_func is not None and attention.flash_attn_with_kvcache is not None
    ):
        return False
    import paged_attention

    _replace("paged-attention-triton", attention, "flash_attn_varlen_func", paged_attention.flash_attn_varlen_func)
    _replace("paged-attention-triton", attention, "flash_attn_with_kvcache", paged_attention.flash_attn_with_kvcache)
    # Attention.forward asserts flash-attn >= 2.7.3 for dynamic batching by asking flash_attn's version; the
    # stand-ins implement that version's paged API (block_table). Scoped to Megatron's attention module.
    _replace("paged-attention-triton", attention, "is_fa_min_version", lambda version, *args, **kwargs: True)
    _mark("paged-attention-triton", "flash-attn is not installed; dynamic inference uses paged_attention.py's kernel")
    return True
