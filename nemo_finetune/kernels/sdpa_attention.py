"""Fast training attention for Megatron-Core's local (no Transformer Engine) layer spec, on torch's
`scaled_dot_product_attention` (flash / cuDNN / memory-efficient kernels).

Megatron-Core 0.15.3 has no fused attention without TE: the local spec's `DotProductAttention` repeats K/V for GQA
and materialises a full `[b*heads, sq, sk]` score tensor per layer (`transformer/dot_product_attention.py`), which at
sequence 4096 costs ~2 GiB per layer and forces recompute. `SDPADotProductAttention` is a drop-in `core_attention`
with the same constructor and forward contract (`transformer/attention.py` builds and calls it), and `layer_spec`
is a NeMo `transformer_layer_spec` that uses it. `peft_megatron.py` selects it when TE is absent
(`--core_attention sdpa`, the default); with TE present TE's own attention is left alone.

Semantics kept from `DotProductAttention`: Megatron masks are True where attention is *not* allowed; a causal layer
given no mask is causal; a causal layer given a mask uses that mask; one query row attends to every key; scale is
`softmax_scale` or 1/sqrt(kv_channels); dropout runs under the model-parallel RNG tracker.
Fast path: a causal layer whose mask is the plain lower-triangular one (what NeMo's SFT collate builds) runs with
`is_causal=True` and no mask tensor, which keeps SDPA on its flash kernel; GQA goes to SDPA with `enable_gqa=True`
(no repeated K/V). Any other mask is honoured exactly, on a slower SDPA kernel.

Packed sequences (`--packed_sequence`: NeMo's packed SFT batches, Megatron's `thd` format with `cu_seqlens`) attend
causally within each sequence and never across: on CUDA with torch's flash-attention `varlen_attn`
(`torch.nn.attention.varlen`), elsewhere (CPU, or a torch without it) with SDPA and the block-diagonal causal mask.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import weakref

import torch
import torch.nn.functional as F

log = logging.getLogger("peft_megatron.sdpa")


def unsupported_reason(config) -> str | None:
    """Why SDPA cannot stand in for the local spec's attention with this model config (None if it can)."""
    if getattr(config, "context_parallel_size", 1) != 1:
        return "context parallelism needs Transformer Engine's attention"
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        return f"softmax_type={config.softmax_type!r} (SDPA computes a vanilla softmax)"
    if getattr(config, "window_size", None) is not None:
        return "sliding-window attention"
    if getattr(config, "multi_latent_attention", False):
        return "multi-latent attention"
    return None


def layer_spec(config, vp_stage: int | None = None):
    """NeMo `transformer_layer_spec`: Megatron's local GPT layer spec with SDPA as core attention.

    Falls back to the plain local spec (logged) where SDPA would change the model's maths."""
    from nemo.collections.llm.gpt.model.base import local_layer_spec

    spec = local_layer_spec(config)
    reason = unsupported_reason(config)
    if reason:
        log.warning("core attention: Megatron's unfused DotProductAttention (%s)", reason)
        return spec
    spec.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
    return spec


class SDPADotProductAttention(torch.nn.Module):
    """`core_attention` for Megatron's local spec: q `[sq, b, np, hn]`, k/v `[sk, b, ng, hn]` -> `[sq, b, np*hn]`."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__()
        reason = unsupported_reason(config)
        if reason:
            raise ValueError(f"SDPADotProductAttention does not support {reason}; use --core_attention unfused")
        self.config = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        # The local spec's (scale / layer_number) then (* layer_number) of apply_query_key_layer_scaling cancels.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by SDPADotProductAttention")
        if packed_seq_params is not None:
            return self._forward_packed(query, key, value, packed_seq_params)
        sq, b, heads, head_dim = query.shape
        sk = key.shape[0]
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        mask, is_causal = sdpa_mask(attention_mask, mask_type, sq, sk, query.device)
        dropout = self.dropout_p if self.training else 0.0
        # [s, b, h, d] -> [b, h, s, d]: strided views; SDPA's kernels need only the head dimension contiguous.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        gqa = k.shape[1] != heads
        if dropout > 0.0 and not self.config.sequence_parallel:
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = self._attend(q, k, v, mask, is_causal, dropout, gqa)
        else:
            out = self._attend(q, k, v, mask, is_causal, dropout, gqa)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * head_dim)

    def _attend(self, q, k, v, mask, is_causal, dropout, gqa):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=self.softmax_scale, enable_gqa=gqa
        )

    def _forward_packed(self, query, key, value, params) -> torch.Tensor:
        """thd: q `[t, np, hn]`, k/v `[t, ng, hn]` holding sequences back to back at `cu_seqlens` -> `[t, np*hn]`."""
        from megatron.core.transformer.enums import AttnMaskType

        if params.qkv_format != "thd":
            raise NotImplementedError(f"packed qkv_format {params.qkv_format!r} (only 'thd' is supported)")
        mask_type = self.attn_mask_type
        if mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise NotImplementedError(f"packed sequences with {mask_type} attention (only causal is supported)")
        cu_q = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        cu_k = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None else params.cu_seqlens_kv
        t, heads, head_dim = query.shape
        dropout = self.dropout_p if self.training else 0.0
        varlen = varlen_kernel() if query.is_cuda and dropout == 0.0 else None
        if varlen is not None:
            max_q, max_k = varlen_max_lengths(params, t)
            out = varlen(
                query, key, value, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, self.softmax_scale
            )
            return out.reshape(t, heads * head_dim)
        if cu_q is not cu_k and not torch.equal(cu_q, cu_k):
            raise NotImplementedError("packed cross-attention (cu_seqlens_q differs from cu_seqlens_kv)")
        allowed = block_causal_mask(cu_q, t)
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))  # [1, heads, t, hn]
        if k.shape[1] != heads:
            # SDPA with GQA and a mask falls back to its math kernel; repeated K/V keep the efficient one.
            k, v = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (k, v))
        if dropout > 0.0 and not self.config.sequence_parallel:
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = self._attend(q, k, v, allowed, False, dropout, False)
        else:
            out = self._attend(q, k, v, allowed, False, dropout, False)
        return out[0].transpose(0, 1).reshape(t, heads * head_dim)


def varlen_max_lengths(params, t: int) -> tuple[int, int]:
    """The longest query and key sequence of a packed row, for the varlen kernel's launch grid. NeMo's collate gives
    them as host tensors, so reading them costs no device sync. Inside a CUDA-graph capture (--cuda_graphs) they
    would be baked into the graph, which Megatron captures with the first batch's inputs (or zeroed ones), so the
    row's length, an upper bound for every batch the graph replays, is used there."""
    if capturing():
        return t, t
    return tuple(int(m) if m is not None else t for m in (params.max_seqlen_q, params.max_seqlen_kv))


@functools.lru_cache(maxsize=1)
def varlen_kernel():
    """torch's flash-attention varlen call with Megatron's causal, GQA and scale, or None where the installed torch
    has no usable `varlen_attn`. Its keyword set changed between releases (2.10: `is_causal`; later: `window_size`
    and `enable_gqa`), so the signature decides, once."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        log.warning(
            "packed sequences: torch %s has no varlen_attn; SDPA with a block-diagonal mask is used (slower)",
            torch.__version__,
        )
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        log.warning(
            "packed sequences: varlen_attn%s has no causal option; using SDPA with a block-diagonal mask",
            inspect.signature(varlen_attn),
        )
        return None
    native_gqa = "enable_gqa" in params
    has_scale = "scale" in params

    def attend(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        kwargs = dict(causal)
        if k.shape[1] != q.shape[1]:
            if native_gqa:
                kwargs["enable_gqa"] = True
            else:
                k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
        if has_scale:
            kwargs["scale"] = scale
        elif not math.isclose(scale, 1.0 / math.sqrt(q.shape[-1])):
            q = q * (scale * math.sqrt(q.shape[-1]))
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)

    return attend


class PerBatch:
    """A value computed from a packed batch's `cu_seqlens`, kept for the batch: every layer gets the same tensor, so
    the value is computed once per batch (keyed by the tensor's identity, version and the size asked for) - except
    inside a CUDA-graph capture, where each graph must compute it from the cu_seqlens buffer its replays refill (a
    kept tensor would be baked into the graph with the capture batch's values)."""

    def __init__(self) -> None:
        self._key: tuple = (lambda: None, -1, 0)
        self._value = None

    def get(self, cu_seqlens: torch.Tensor, size: int, compute):
        in_capture = capturing()
        ref, version, kept_size = self._key
        if not in_capture and ref() is cu_seqlens and version == cu_seqlens._version and kept_size == size:
            return self._value
        value = compute()
        if not in_capture:
            self._key, self._value = (weakref.ref(cu_seqlens), cu_seqlens._version, size), value
        return value


_block_masks = PerBatch()


def block_causal_mask(cu_seqlens: torch.Tensor, t: int) -> torch.Tensor:
    """SDPA mask `[t, t]` (True = attend) letting each token of a packed row see its own sequence's earlier tokens;
    built once per batch (PerBatch)."""

    def build() -> torch.Tensor:
        positions = torch.arange(t, device=cu_seqlens.device)
        sequence = torch.searchsorted(cu_seqlens.to(positions.dtype), positions, right=True)
        causal = torch.ones(t, t, dtype=torch.bool, device=positions.device).tril()
        return (sequence[:, None] == sequence[None, :]) & causal

    return _block_masks.get(cu_seqlens, t, build)


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (Megatron's --cuda_graphs layers): per-batch
    caches (PerBatch) must neither serve nor keep a capture's tensors."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def sdpa_mask(attention_mask, mask_type, sq: int, sk: int, device) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for SDPA from Megatron's mask (True = masked out); SDPA's mask is True = attend."""
    from megatron.core.transformer.enums import AttnMaskType

    causal = mask_type == AttnMaskType.causal
    if attention_mask is None:
        if not causal or sq == 1:
            return None, False
        if sq == sk:
            return None, True
        # SDPA's is_causal aligns to the top-left corner; queries continuing a longer key sequence need the
        # bottom-right alignment.
        return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq), False
    if causal and sq == sk and is_plain_causal(attention_mask):
        return None, True
    return ~attention_mask.bool(), False


_last_checked: tuple = (lambda: None, -1, False)  # (weakref to a mask, its version, plain causal?)
_warned_not_causal = False


def is_plain_causal(attention_mask: torch.Tensor) -> bool:
    """Whether a Megatron mask `[b or 1, 1, s, s]` masks exactly the future in every row. Every layer of a forward
    pass receives the same mask tensor, so it is checked once (one host sync per batch), keyed on the tensor object
    and its version counter, never on its address (a new batch may reuse the memory)."""
    global _last_checked, _warned_not_causal
    ref, version, result = _last_checked
    if ref() is attention_mask and version == attention_mask._version:
        return result
    s = attention_mask.shape[-1]
    result = attention_mask.dim() == 4 and attention_mask.shape[1] == 1 and attention_mask.shape[-2] == s
    if result:
        future = torch.ones(s, s, dtype=torch.bool, device=attention_mask.device).triu(diagonal=1)
        result = bool(torch.equal(attention_mask.bool(), future.expand_as(attention_mask)))
    if not result and not _warned_not_causal:
        log.warning("attention mask is not plain causal: SDPA attends with the explicit mask (a slower kernel)")
        _warned_not_causal = True
    _last_checked = (weakref.ref(attention_mask), attention_mask._version, result)
    return result
