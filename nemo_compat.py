"""Run NeMo 2.7.3 + Megatron-Core 0.15.3 correctly without Transformer Engine (TE) and, for checkpoint work,
without CUDA.

`pip install` users, CPU conversion nodes, CI and our own H100 have no TE, yet the pinned NeMo/Megatron quietly
assume it, and assume CUDA even for checkpoint import/export, which is CPU work by design. Every adaptation here is a
runtime shim (installed files are never edited), is applied only when the environment needs it, logs what it did,
and names the upstream behaviour it works around and when it can go. With TE and CUDA present nothing is changed.

Entry points:
    prepare_process()           once per process, before NeMo/Megatron are imported (scripts call it first)
    model_config_overrides()    model-config fields that must change without TE (fusions)
    optimizer_config_overrides()
    cpu_checkpoint_io()         context manager around llm.import_ckpt / export_ckpt on a CPU host
    install_worker_hooks()      the same inside NeMo-Run's torchrun workers (via startup/sitecustomize.py)
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.abc
import importlib.util
import logging
import sys
import types
from typing import Iterator, Optional

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

# Fusions whose kernels come from TE or from CUDA extensions the pip wheels lack
# (`No module named 'scaled_masked_softmax_cuda'` for the first).
NO_TE_MODEL_OVERRIDES = {
    "masked_softmax_fusion": False,
    "cross_entropy_loss_fusion": False,
    "apply_rope_fusion": False,
    "gradient_accumulation_fusion": False,
    "bias_activation_fusion": False,
    "bias_dropout_fusion": False,
    "persist_layer_norm": False,
}

_applied: set[str] = set()
WORKER_ENV_FLAG = "PEFT_MEGATRON_WORKER_COMPAT"  # set by peft_megatron's executor; read by startup/sitecustomize.py


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


def _mark(name: str, why: str) -> None:
    if name not in _applied:
        _applied.add(name)
        log.info("compat: %s (%s)", name, why)


def prepare_process(env: Optional[Environment] = None) -> Environment:
    """Apply the process-wide adaptations the environment needs; idempotent."""
    env = env or detect_environment()
    if env.has_te and env.has_cuda:
        return env
    skip_unified_memory_build(env)
    if not env.has_te:
        _patch_config_fusions()
        _patch_peft_te_checks()
        _patch_norm_mapping()
    return env


def model_config_overrides(env: Environment) -> dict:
    return {} if env.has_te else dict(NO_TE_MODEL_OVERRIDES)


def optimizer_config_overrides(env: Environment) -> dict:
    # Without TE or apex, Megatron falls back to torch's Adam, and its distributed optimizer then fails at the first
    # checkpoint save (distrib_optimizer.py sharding assertion, mcore 0.15.3).
    return {} if env.has_te else {"use_distributed_optimizer": False}


def skip_unified_memory_build(env: Optional[Environment] = None) -> None:
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
            if getattr(self, name, value) != value:
                setattr(self, name, value)
        original(self)

    __post_init__._nemo_compat = True
    TransformerConfig.__post_init__ = __post_init__
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
        lora.te = absent
    utils.HAVE_TE = False
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
    io.apply_transforms = apply_transforms
    state.apply_transforms = apply_transforms
    _mark("local-spec-norm-mapping", "HF<->NeMo conversion maps RMSNorm weights to the local layer spec")


@contextlib.contextmanager
def cpu_checkpoint_io(env: Optional[Environment] = None) -> Iterator[None]:
    """Let NeMo's checkpoint import/export/merge run on a host without CUDA.

    Megatron's async checkpoint writer and NeMo's loader call torch.cuda.synchronize(), current_device(), Stream()
    and assert torch.cuda.is_initialized() although every tensor is on the CPU (filesystem_async.py,
    state_dict_saver.py, async_utils.py, megatron_parallel.py, nemo/lightning/io/pl.py). Inside this context those
    calls are CPU no-ops; outside it torch is untouched. With CUDA present it does nothing."""
    env = env or detect_environment()
    if env.has_cuda:
        yield
        return
    import torch
    import nemo.lightning.io.pl as nemo_pl

    saved = {
        "synchronize": torch.cuda.synchronize,
        "current_device": torch.cuda.current_device,
        "Stream": torch.cuda.Stream,
        "stream": torch.cuda.stream,
        "is_initialized": torch.cuda.is_initialized,
    }
    saved_fix = nemo_pl._fix_tensors_device
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.Stream = lambda *a, **k: None
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.is_initialized = lambda: True
    nemo_pl._fix_tensors_device = lambda ckpt: ckpt
    _mark("cpu-checkpoint-io", "checkpoint conversion on a host without CUDA")
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.cuda, name, fn)
        nemo_pl._fix_tensors_device = saved_fix


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


def install_worker_hooks() -> None:
    """For torchrun workers (startup/sitecustomize.py): stub the allocator build now and apply the PEFT guards as
    soon as NeMo's PEFT module loads, with no NeMo import of our own (torchrun's launcher process runs this too)."""
    skip_unified_memory_build()
    if importlib.util.find_spec("transformer_engine") is None:
        sys.meta_path.insert(0, _PostImportHook("nemo.collections.llm.peft.lora", _patch_peft_te_checks))


# --------------------------------------------------------------------------------------------------------------------
# Paged attention without flash-attn (dynamic inference)
# --------------------------------------------------------------------------------------------------------------------
def _gather_paged(cache, block_table, lengths):
    """[num_blocks, block, kv_heads, dim] cache -> [batch, max_len, kv_heads, dim] and a [batch, max_len] valid mask."""
    import torch

    batch, blocks_per_seq = block_table.shape
    block = cache.shape[1]
    gathered = cache[block_table.clamp(min=0).long()].reshape(batch, blocks_per_seq * block, *cache.shape[2:])
    max_len = int(lengths.max())
    positions = torch.arange(max_len, device=cache.device)
    return gathered[:, :max_len], positions[None, :] < lengths[:, None].long()


def _attend(q, k, v, valid, causal_offset, scale):
    """q [b, sq, h, d]; k, v [b, sk, hk, d]; valid [b, sk]; query i sees keys < causal_offset[b] + i + 1."""
    import torch

    b, sq, h, d = q.shape
    repeat = h // k.shape[2]
    k = k.repeat_interleave(repeat, dim=2)
    v = v.repeat_interleave(repeat, dim=2)
    key_pos = torch.arange(k.shape[1], device=q.device)[None, None, :]
    query_pos = causal_offset[:, None, None] + torch.arange(sq, device=q.device)[None, :, None]
    mask = valid[:, None, :] & (key_pos <= query_pos)  # [b, sq, sk]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(),
        attn_mask=mask[:, None], scale=scale,
    )
    return out.transpose(1, 2).to(q.dtype)


def paged_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                           causal=True, block_table=None):
    """flash_attn_varlen_func(..., block_table=...) in torch: q [total_q, h, d], paged k/v; bottom-right causal."""
    import torch

    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    k_lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    keys, valid = _gather_paged(k, block_table, k_lens)
    values, _ = _gather_paged(v, block_table, k_lens)
    batch, max_q = q_lens.numel(), int(q_lens.max())
    padded = q.new_zeros(batch, max_q, *q.shape[1:])
    for i in range(batch):
        padded[i, : q_lens[i]] = q[cu_seqlens_q[i] : cu_seqlens_q[i + 1]]
    out = _attend(padded, keys, values, valid, k_lens - q_lens, softmax_scale)
    return torch.cat([out[i, : q_lens[i]] for i in range(batch)], dim=0)


def paged_decode_attention(q, k_cache, v_cache, cache_seqlens, causal=True, block_table=None, softmax_scale=None):
    """flash_attn_with_kvcache(q [b, 1, h, d], paged caches, cache_seqlens, block_table) in torch."""
    keys, valid = _gather_paged(k_cache, block_table, cache_seqlens)
    values, _ = _gather_paged(v_cache, block_table, cache_seqlens)
    return _attend(q, keys, values, valid, cache_seqlens.long() - q.shape[1], softmax_scale)


def install_paged_attention_fallback() -> bool:
    """Megatron's dynamic-batching attention calls flash-attn's paged kernels (attention.py); without flash-attn
    those names are None. Install torch implementations (SDPA over gathered blocks): correct, slower than the
    kernels. Returns True if installed. Remove when Megatron ships a non-flash dynamic attention path."""
    from megatron.core.transformer import attention

    if attention.flash_attn_varlen_func is not None and attention.flash_attn_with_kvcache is not None:
        return False
    attention.flash_attn_varlen_func = paged_varlen_attention
    attention.flash_attn_with_kvcache = paged_decode_attention
    # attention.forward asserts flash-attn >= 2.7.3 for dynamic batching by importing flash_attn; the functions
    # above implement that version's paged API (block_table).
    attention.is_fa_min_version = lambda version, *args, **kwargs: True
    _mark("paged-attention-fallback", "flash-attn is not installed; dynamic inference uses torch SDPA over KV blocks")
    return True
