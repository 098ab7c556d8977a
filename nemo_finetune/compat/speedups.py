"""Measured speed-ups of the training workers without TE or apex: each replaces a slow fallback of the pinned release
with the same maths in fewer kernels or without host syncs (docs/BENCHMARKS.md has the measurements). A run can leave
each out (apply.OPTIONAL_WORKER_SHIMS); those on trial apply only where asked (apply.TRIAL_WORKER_SHIMS)."""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.util
import logging
import sys
import types

from nemo_finetune.compat.base import Shim, mark, register, replace_attribute

log = logging.getLogger("peft_megatron.compat")

SHIMS = register(
    {
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
        "fused-decode-rope": Shim(
            "generation (the dynamic inference engine) without TE, on trial: the generation benchmark's "
            "cuda_graphs+fused_rope mode",
            "DynamicInferenceContext rotates each layer's queries and keys with Megatron's unfused RoPE: a gather, "
            "cos, sin, casts, chunk/neg/cat, multiplies and adds, ~24 kernels a layer of every decode step",
            "Megatron fuses RoPE in inference without TE or FlashInfer",
        ),
        "liger-rmsnorm": Shim(
            "training workers without TE, on trial (TRIAL_WORKER_SHIMS); the generation benchmark's +liger_norm modes",
            "without TE or apex the local layer spec normalises with torch.nn.RMSNorm: its weight gradient is a "
            "separate reduction kernel (GammaBetaBackward)",
            "Megatron's local spec has a fused RMSNorm without TE or apex",
        ),
    }
)


# Fusions Megatron compiles with torch.compile (`megatron/core/jit.py` jit_fuser; `fusions/fused_bias_swiglu.py`,
# `fused_bias_dropout.py`): no TE needed, only Triton. Training turns them on (faster and smaller, measured in
# docs/BENCHMARKS.md); inference leaves them off, because the dynamic engine captures CUDA graphs and a compilation
# inside a capture fails. The third torch-compiled fusion, cross_entropy_loss_fusion with the "native"
# implementation, stays off: it made the step several times slower.
COMPILED_FUSIONS = {"bias_activation_fusion": True, "bias_dropout_fusion": True}

# Off by measurement, not because TE is missing: set by model_config_overrides only, so that a benchmark can still
# turn it on (the config patch below forces NO_TE_MODEL_OVERRIDES on every config a process builds).
SLOWER_FUSIONS_OFF = {"cross_entropy_loss_fusion": False}

# Training turns it back on: the training workers accumulate weight gradients with torch's GEMM in apex's place
# (accumulate_wgrad_with_torch); a worker told to leave that shim out keeps it off.
WGRAD_FUSION = "gradient_accumulation_fusion"

ROPE_MODULE = "megatron.core.models.common.embeddings.rope_utils"

LORA_MODULE = "nemo.collections.llm.peft.lora"

OPTIMIZER_MODULE = "megatron.core.optimizer"

DYNAMIC_CONTEXT_MODULE = "megatron.core.inference.contexts.dynamic_context"

LINEAR_MODULE = "megatron.core.tensor_parallel.layers"

NORM_MODULE = "megatron.core.transformer.torch_norm"


def compile_unfused_rope() -> None:
    """Without TE (`apply_rope_fusion` needs it), Megatron-Core 0.15.3 applies RoPE as ~12 unfused elementwise
    kernels per q/k per layer and pass (`rope_utils._apply_rotary_pos_emb_bshd`: cos, sin, casts, chunk, neg, cat,
    multiplies, add); torch.compile fuses them, as Megatron's own jit_fuser does for SwiGLU (gain: docs/BENCHMARKS.md).
    Training workers only:
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
    replace_attribute("compiled-rope", module, "_apply_rotary_pos_emb_bshd", compiled)
    mark("compiled-rope", "Megatron's unfused RoPE compiled with torch.compile (training workers)")


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
    replace_attribute("sync-free-packed-rope", module, "_apply_rotary_pos_emb_thd", apply_rotary_pos_emb_thd)
    mark("sync-free-packed-rope", "Megatron's packed-sequence RoPE without host syncs (training workers)")


def positions_in_sequence(cu_seqlens, tokens: int):
    """Each packed token's position inside its own sequence, on cu_seqlens' device; computed once per batch for every
    layer's q and k (kernels.sdpa_attention.PerBatch, which a CUDA-graph capture bypasses)."""
    import torch

    def compute():
        index = torch.arange(tokens, device=cu_seqlens.device)
        starts = cu_seqlens.to(index.dtype)
        return index - starts[torch.searchsorted(starts, index, right=True) - 1]

    return _packed_positions().get(cu_seqlens, tokens, compute)


@functools.cache
def _packed_positions():
    from nemo_finetune.kernels.sdpa_attention import PerBatch  # imports torch: only in processes that train packed

    return PerBatch()


def fuse_decode_rope() -> None:
    """The dynamic inference engine's RoPE (`DynamicInferenceContext.apply_rotary_emb_query` / `_key`) through
    kernels.rope.rope_in_place: one kernel a tensor, with Megatron's maths and roundings, cos and sin computed once
    per angle table. Interleaved or multi-latent RoPE, packed queries (cu_seqlens), context parallelism and
    tensors the kernel does not take go to Megatron's functions. On trial: the generation benchmark measures it
    against Megatron's before it joins the defaults."""
    import inspect

    context = importlib.import_module(DYNAMIC_CONTEXT_MODULE).DynamicInferenceContext
    query_rope, key_rope = context.apply_rotary_emb_query, context.apply_rotary_emb_key
    if getattr(query_rope, "_nemo_compat", False):
        return
    expected = {
        "apply_rotary_emb_query": ["self", "query", "query_emb", "config", "cu_seqlens_q", "cp_group", "mscale"],
        "apply_rotary_emb_key": ["self", "key", "key_emb", "config", "cp_group", "mscale"],
    }
    if any(list(inspect.signature(getattr(context, n)).parameters) != p for n, p in expected.items()):
        log.warning("compat: decode RoPE left as is: %s is not Megatron-Core 0.15's", DYNAMIC_CONTEXT_MODULE)
        return
    from nemo_finetune.kernels import rope

    def fused(t, emb, config, cp_group) -> bool:
        plain = not config.rotary_interleaved and not config.multi_latent_attention
        return plain and (cp_group is None or cp_group.size() == 1) and rope.unsupported_reason(t, emb) is None

    def apply_rotary_emb_query(self, query, query_emb, config, cu_seqlens_q, cp_group, mscale=1.0):
        n = self.padded_active_token_count
        if cu_seqlens_q is not None or not fused(query[:n], query_emb, config, cp_group):
            return query_rope(self, query, query_emb, config, cu_seqlens_q, cp_group, mscale)
        rope.rope_in_place(query[:n], query_emb, self.token_to_pos_ids[:n], mscale)
        return query

    def apply_rotary_emb_key(self, key, key_emb, config, cp_group, mscale=1.0):
        n = self.padded_active_token_count
        if not fused(key[:n], key_emb, config, cp_group):
            return key_rope(self, key, key_emb, config, cp_group, mscale)
        rotated = rope.rope_in_place(key[:n], key_emb, self.token_to_position_in_request[:n], mscale)
        return rotated if self.is_decode_only() else key  # as Megatron's: its decode step returns key[:n]

    apply_rotary_emb_query._nemo_compat = True
    replace_attribute("fused-decode-rope", context, "apply_rotary_emb_query", apply_rotary_emb_query)
    replace_attribute("fused-decode-rope", context, "apply_rotary_emb_key", apply_rotary_emb_key)
    mark("fused-decode-rope", "the dynamic engine's RoPE in one Triton kernel per tensor (generation, on trial)")


def fuse_lora_output() -> None:
    """NeMo 2.7.3's LoRA (`LoRALinear.forward`, `ParallelLinearAdapter.forward`) runs the frozen linear and the
    adapter's two linears each through Megatron's parallel-linear machinery, scales the adapter's full-width output
    by alpha/dim, adds it to the base output, and in backward scales the gradient and adds the two input gradients:
    four elementwise passes over full-width tensors per adapted linear (hundreds of kernels per step; profile in
    docs/BENCHMARKS.md), plus the host time of launching them. On one tensor-parallel rank, for
    a plain LoRA (identity activation, no dropout, no expert or sequence-parallel communication) on a frozen
    bias-free linear, `LoRALinearFunction` computes the same in matmuls alone: the scale moves to the rank-r
    intermediate, ((x A^T) s) B^T = s (x A^T B^T), and both sums go into the matmuls (`addmm`). Everything else keeps
    NeMo's forward; same losses, the gain in docs/BENCHMARKS.md. TE's op fuser
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
    replace_attribute("fused-lora-output", module.LoRALinear, "forward", forward)
    mark("fused-lora-output", "LoRA as one matmul-only autograd function on one TP rank (training workers)")


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
    (GammaBetaBackward, most of the norms' time in the profile of docs/BENCHMARKS.md). Liger-Kernel's RMSNorm (a
    maintained Triton kernel library) does the backward in one kernel whose programs each sum their rows' weight
    gradient in fp32, then adds the per-SM partials. WrappedTorchNorm's norms become liger_rmsnorm_class() — the same
    parameters and state dict, torch's maths — wherever a local spec is built after this. On trial (TRIAL_WORKER_SHIMS):
    the training benchmark's `liger_norm` variant measures it before it joins the defaults. Remove when Megatron's local
    spec has a fused norm without TE or apex."""
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
    replace_attribute("liger-rmsnorm", wrapper, "__new__", new)
    mark("liger-rmsnorm", "RMSNorm forward and backward in Liger-Kernel's Triton kernels (training workers, trial)")


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
# Optimizer kernels without apex (training workers)
# --------------------------------------------------------------------------------------------------------------------
def use_torch_optimizer_kernels() -> None:
    """Without TE or apex, Megatron-Core 0.15.3 builds torch's AdamW in its default foreach mode (several passes
    over the fp32 master weights and both moments per step) and replaces apex's multi-tensor kernels with per-tensor
    loops: `local_multi_tensor_l2_norm` copies every gradient's norm to the host (a device sync per tensor) and
    `local_multi_tensor_scale` runs two kernels and an fp32 temporary per tensor for the master-weight copy and the
    gradient clipping. Here torch's fused AdamW (switched on as each optimizer is built, while its state is empty;
    NeMo's checkpoints do not save param groups, and torch moves a resumed step counter to the device the fused
    kernel needs) and torch's foreach norm and copy, with apex's contracts, take their place (gain and the
    checkpoint checks in docs/BENCHMARKS.md and docs/gpu-validation.md). Remove when Megatron uses torch's fused
    kernels without apex."""
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
    replace_attribute("torch-optimizer-kernels", package, "_get_megatron_optimizer_based_on_param_groups", build_fused)
    replace_attribute("torch-optimizer-kernels", clip_grads, "l2_norm_impl", foreach_l2_norm)
    replace_attribute("torch-optimizer-kernels", clip_grads, "multi_tensor_scale_impl", foreach_scale)
    replace_attribute("torch-optimizer-kernels", mixed_precision, "multi_tensor_scale_impl", foreach_scale)
    mark("torch-optimizer-kernels", "torch's fused AdamW and foreach norm / copy in place of per-tensor loops")


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
    kernel: 10 bytes of memory traffic per parameter per step (CUDAFunctor_add<float> in the profile of
    docs/BENCHMARKS.md), and the bf16 gradients round before they are summed. torch's addmm with out_dtype=float32
    is that GEMM; it takes the extension's place (same losses, fp32 sums). Frozen weights
    (LoRA's base) compute no weight gradient either way. Remove when Megatron falls back to torch's GEMM without
    apex."""
    layers = importlib.import_module(LINEAR_MODULE)
    if layers._grad_accum_fusion_available:
        return  # apex's extension, or this shim already
    kernels = types.SimpleNamespace(
        wgrad_gemm_accum_fp32=wgrad_gemm_accumulate, wgrad_gemm_accum_fp16=wgrad_gemm_accumulate
    )
    replace_attribute("torch-wgrad-accumulation", layers, "fused_weight_gradient_mlp_cuda", kernels)
    replace_attribute("torch-wgrad-accumulation", layers, "_grad_accum_fusion_available", True)
    mark("torch-wgrad-accumulation", "weight gradients accumulate into main_grad in the GEMM (torch's addmm)")


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
