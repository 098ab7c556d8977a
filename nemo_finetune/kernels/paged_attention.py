"""Paged attention for Megatron-Core's dynamic inference engine when flash-attn is not installed.

Megatron-Core 0.15.3 runs dynamic-batching attention only through flash-attn's two paged entry points
(`transformer/attention.py`, `flash_decode_and_prefill`). flash-attn is source-only on PyPI and takes far longer to
build than a fresh GPU machine allows, so pip-installed stacks have neither. This module provides both entry points,
with flash-attn's signatures and output shapes, on one Triton kernel:

    flash_attn_varlen_func(q [T, h, d], k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale=None, causal=True, block_table=...)        -> [T, h, d]
    flash_attn_with_kvcache(q [b, s, h, d], k_cache, v_cache, cache_seqlens=..., block_table=..., causal=True,
                            softmax_scale=None)                                     -> [b, s, h, d]

k_cache / v_cache are Megatron's paged buffers `[num_blocks, block_size, kv_heads, head_dim]`; `block_table[i, j]` is
the j-th block of request i. Request i's queries are the *last* q_len_i of its k_len_i tokens (prefill, chunked
prefill and decode alike), so causality is bottom-right aligned, as in flash-attn. Rows of `q` past
`cu_seqlens_q[-1]` are padding (Megatron rounds the step's token count up) and come back as zeros.

Why a kernel rather than torch ops: the kernel reads every length from device memory, so a step never waits for the
host (no `.item()`), which is what makes CUDA-graph capture possible, and it reads each KV block once per
(request, KV head, query tile), with the query heads that share a KV head (GQA) stacked in one tile.
The tiling follows vLLM's unified Triton attention: a flat grid of query tiles over all requests
(`T // BLOCK_Q + num_requests` programs, an upper bound known from shapes alone), each finding its request by
binary search over `cu_seqlens_q`; an online softmax in float32 over key tiles.

On CPU the kernel runs under Triton's interpreter (`TRITON_INTERPRET=1`, set before this module is imported); the
tests compare it there with a plain attention.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
PREFILL_BLOCK_M = 64  # query rows (tokens x heads of one KV group) per program for prefill / mixed steps
DECODE_BLOCK_M = 16  # decode steps have one query token per request: the smallest tile tl.dot accepts
BLOCK_N = 64  # keys per inner iteration


@triton.jit
def _find_request(cu_seqlens_q, tile, num_requests, BLOCK_Q: tl.constexpr):
    """The request whose range of query tiles holds `tile`: request r owns tiles from cu_seqlens_q[r] // BLOCK_Q + r."""
    lo = 0
    hi = num_requests
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(cu_seqlens_q + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_attention_kernel(
    out,
    q,
    k_cache,
    v_cache,
    cu_seqlens_q,
    seqused_k,
    block_table,
    scale_log2,
    num_requests,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    PAGE: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    request = _find_request(cu_seqlens_q, tile, num_requests, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q + request)
    q_len = tl.load(cu_seqlens_q + request + 1) - q_start
    q_tile = tile - (q_start // BLOCK_Q + request)
    if q_tile * BLOCK_Q >= q_len:
        return
    k_len = tl.load(seqused_k + request)
    history = k_len - q_len  # keys before this step's first query

    rows = tl.arange(0, BLOCK_M)
    q_pos = q_tile * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (q_pos < q_len)
    dims = tl.arange(0, HEAD_DIM_P)
    dim_ok = dims < HEAD_DIM
    token = (q_start + q_pos).to(tl.int64)
    q_tile_data = tl.load(
        q + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    # The last query of this tile sees the most keys; no key tile past its causal limit is read.
    k_end = tl.minimum(history + tl.minimum(q_tile * BLOCK_Q + BLOCK_Q, q_len), k_len)
    for start in range(0, k_end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < k_end
        block = tl.load(block_table + request * stride_bt + keys // PAGE, mask=key_ok, other=0).to(tl.int64)
        slot = keys % PAGE
        k_t = tl.load(
            k_cache + block[None, :] * stride_kb + slot[None, :] * stride_ks + kv_head * stride_kh + dims[:, None],
            mask=key_ok[None, :] & dim_ok[:, None],
            other=0.0,
        )
        scores = tl.dot(q_tile_data, k_t) * scale_log2
        visible = key_ok[None, :] & (keys[None, :] <= (history + q_pos)[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet stay at zero
        p = tl.exp2(scores - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_tile = tl.load(
            v_cache + block[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh + dims[None, :],
            mask=key_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile)
        m_i = m_new
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
        acc.to(out.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )


def paged_attention(
    q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table, softmax_scale=None, block_m: int = PREFILL_BLOCK_M
):
    """Causal (bottom-right) attention of q [T, h, d] over paged KV; returns [T, h, d], padding rows zero.

    cu_seqlens_q [B + 1] and seqused_k [B] (keys per request, this step's included) are int32 device tensors;
    block_table [B, max_blocks]."""
    tokens, heads, head_dim = q.shape
    kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    if q.stride(-1) != 1:
        q = q.contiguous()
    group = heads // kv_heads
    block_m = max(block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    num_requests = cu_seqlens_q.shape[0] - 1
    out = torch.zeros_like(q)
    if tokens == 0 or num_requests == 0:
        return out
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    grid = (tokens // block_q + num_requests, kv_heads)
    _paged_attention_kernel[grid](
        out,
        q,
        k_cache,
        v_cache,
        cu_seqlens_q,
        seqused_k,
        block_table,
        scale * LOG2E,
        num_requests,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_table.stride(0),
        GROUP=group,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=BLOCK_N,
        HEAD_DIM=head_dim,
        HEAD_DIM_P=max(16, triton.next_power_of_2(head_dim)),
        PAGE=page,
        num_warps=4,
        num_stages=2,
    )
    return out


def _require_paged_causal(causal: bool, block_table) -> None:
    if not causal or block_table is None:
        raise NotImplementedError("this flash-attn stand-in implements only causal attention over a paged KV cache")


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    block_table=None,
    **unsupported,
):
    """flash_attn.flash_attn_varlen_func for paged KV (prefill and mixed prefill/decode steps)."""
    _require_paged_causal(causal, block_table)
    if dropout_p or unsupported:
        raise NotImplementedError(f"unsupported flash-attn options: dropout_p={dropout_p}, {sorted(unsupported)}")
    seqused_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    return paged_attention(q, k, v, cu_seqlens_q, seqused_k, block_table, softmax_scale, PREFILL_BLOCK_M)


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    cache_seqlens=None,
    softmax_scale=None,
    causal=False,
    block_table=None,
    **unsupported,
):
    """flash_attn.flash_attn_with_kvcache for paged KV that already holds this step's keys (decode steps)."""
    _require_paged_causal(causal, block_table)
    if k is not None or v is not None or cache_seqlens is None or unsupported:
        raise NotImplementedError("only attention over an already-appended paged cache with cache_seqlens is supported")
    batch, seqlen = q.shape[:2]
    cu_seqlens_q = torch.arange(batch + 1, device=q.device, dtype=torch.int32) * seqlen
    out = paged_attention(
        q.reshape(batch * seqlen, *q.shape[2:]),
        k_cache,
        v_cache,
        cu_seqlens_q,
        cache_seqlens.to(torch.int32),
        block_table,
        softmax_scale,
        DECODE_BLOCK_M,
    )
    return out.view(q.shape)
