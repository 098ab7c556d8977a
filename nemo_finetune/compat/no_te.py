"""Correctness without Transformer Engine, CUDA or flash-attn: NeMo 2.7.3 and Megatron-Core 0.15.3 assume TE (fusion
defaults, LoRA guards, norm names in the HF connectors), CUDA (checkpoint conversion, an allocator compiled at import)
and flash-attn (paged decode attention). Without these shims such a process fails or writes a wrong model."""

from __future__ import annotations

import contextlib
import logging
import sys
import types
from collections.abc import Iterator

from nemo_finetune.compat.base import (
    Environment,
    Shim,
    detect_environment,
    mark,
    register,
    replace_attribute,
    replacement_count,
    undo,
)
from nemo_finetune.compat.speedups import WGRAD_FUSION, wgrad_accumulation_available

log = logging.getLogger("peft_megatron.compat")

SHIMS = register(
    {
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
        "paged-attention-triton": Shim(
            "test_checkpoint.py without flash-attn",
            "Megatron-Core's dynamic-batching attention calls only flash-attn's paged kernels",
            "Megatron ships a dynamic attention path without flash-attn",
        ),
    }
)


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
    mark("unified-memory-stub", f"no build of the managed-memory allocator; {env.describe() if env else 'worker'}")


def patch_config_fusions() -> None:
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
    replace_attribute("no-te-fusion-defaults", TransformerConfig, "__post_init__", __post_init__)
    mark("no-te-fusion-defaults", "TE-only fusions are switched off as model configs are built")


def patch_peft_te_checks() -> None:
    """NeMo's LoRA transform compares `m.__class__ == te.Linear` without a TE guard (lora.py), and peft/utils.py
    trusts HAVE_TE flags computed from Megatron's TE placeholder names. Remove when NeMo guards both (> 2.7.3)."""
    from nemo.collections.llm.peft import lora, utils

    absent = types.SimpleNamespace(
        Linear=type("TransformerEngineAbsentLinear", (), {}),
        LayerNormLinear=type("TransformerEngineAbsentLayerNormLinear", (), {}),
    )
    if not isinstance(lora.te, types.SimpleNamespace):
        replace_attribute("peft-te-guards", lora, "te", absent)
    if utils.HAVE_TE:
        replace_attribute("peft-te-guards", utils, "HAVE_TE", False)
    mark("peft-te-guards", "LoRA wraps Megatron's local ColumnParallel/RowParallel linears")


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


def patch_norm_mapping() -> None:
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
    replace_attribute("local-spec-norm-mapping", io, "apply_transforms", apply_transforms)
    replace_attribute("local-spec-norm-mapping", state, "apply_transforms", apply_transforms)
    mark("local-spec-norm-mapping", "HF<->NeMo conversion maps RMSNorm weights to the local layer spec")


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

    since = replacement_count()
    cpu_no_ops = {
        "synchronize": lambda *a, **k: None,
        "current_device": lambda: "cpu",
        "Stream": lambda *a, **k: None,
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "is_initialized": lambda: True,
    }
    for name, no_op in cpu_no_ops.items():
        replace_attribute("cpu-checkpoint-io", torch.cuda, name, no_op)
    replace_attribute("cpu-checkpoint-io", nemo_pl, "_fix_tensors_device", lambda ckpt: ckpt)
    mark("cpu-checkpoint-io", "checkpoint conversion on a host without CUDA")
    try:
        yield
    finally:
        undo("cpu-checkpoint-io", since=since)


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
    from nemo_finetune.kernels import paged_attention

    replace_attribute(
        "paged-attention-triton", attention, "flash_attn_varlen_func", paged_attention.flash_attn_varlen_func
    )
    replace_attribute(
        "paged-attention-triton", attention, "flash_attn_with_kvcache", paged_attention.flash_attn_with_kvcache
    )
    # Attention.forward asserts flash-attn >= 2.7.3 for dynamic batching by asking flash_attn's version; the
    # stand-ins implement that version's paged API (block_table). Scoped to Megatron's attention module.
    replace_attribute("paged-attention-triton", attention, "is_fa_min_version", lambda version, *args, **kwargs: True)
    mark("paged-attention-triton", "flash-attn is not installed; dynamic inference uses paged_attention.py's kernel")
    return True
