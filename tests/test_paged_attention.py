"""paged_attention.py (flash-attn's paged entry points on one Triton kernel) against a plain float64 attention.

On CPU the kernel runs under Triton's interpreter; on a CUDA machine the same tests run the compiled kernel, in
bfloat16 too (the interpreter has no bfloat16 arithmetic).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="Triton is needed for the paged-attention kernel (requirements-dev.txt)")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # relative L2 error


@pytest.fixture(scope="module")
def pa():
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and Triton's interpreter is off (conftest turns it on before Triton is imported)")
    from nemo_finetune.kernels import paged_attention

    return paged_attention


def reference(q, k_cache, v_cache, q_lens, k_lens, block_table, scale):
    """Each request's queries are the last q_len of its k_len tokens; float64, GQA by repeating KV heads."""
    tokens, heads, dim = q.shape
    page = k_cache.shape[1]
    out = torch.zeros(tokens, heads, dim, dtype=torch.float64)
    start = 0
    for q_len, k_len, blocks in zip(q_lens, k_lens, block_table.cpu(), strict=True):
        if q_len == 0:
            continue
        positions = torch.arange(k_len)
        physical = blocks[positions // page].long()
        keys = k_cache.cpu()[physical, positions % page].double()
        values = v_cache.cpu()[physical, positions % page].double()
        group = heads // keys.shape[1]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[start : start + q_len].cpu().double(), keys) * scale
        visible = positions[None, :] <= torch.arange(q_len)[:, None] + (k_len - q_len)
        scores = scores.masked_fill(~visible[None], float("-inf"))
        out[start : start + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
        start += q_len
    return out


def paged_cache(k_lens, kv_heads, dim, page, dtype, generator):
    """Random K/V caches whose requests own shuffled, non-contiguous blocks (plus unused ones)."""
    blocks_per_request = max(1, -(-max(k_lens) // page))
    num_blocks = blocks_per_request * len(k_lens) + 3
    k_cache = torch.randn(num_blocks, page, kv_heads, dim, generator=generator).to(dtype)
    v_cache = torch.randn(num_blocks, page, kv_heads, dim, generator=generator).to(dtype)
    order = torch.randperm(num_blocks, generator=generator)[: blocks_per_request * len(k_lens)]
    block_table = order.view(len(k_lens), blocks_per_request).to(torch.int32)
    return k_cache.to(DEVICE), v_cache.to(DEVICE), block_table.to(DEVICE)


def relative_error(out, ref):
    return ((out.cpu().double() - ref).norm() / ref.norm()).item()


def run_varlen(pa, q_lens, k_lens, heads, kv_heads, dim, dtype, padding, page=16, scale=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    k_cache, v_cache, block_table = paged_cache(k_lens, kv_heads, dim, page, dtype, generator)
    real = sum(q_lens)
    q = torch.randn(real + padding, heads, dim, generator=generator).to(dtype).to(DEVICE)
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    out = pa.flash_attn_varlen_func(
        q,
        k_cache,
        v_cache,
        cu_q,
        cu_k,
        max(q_lens),
        max(k_lens),
        softmax_scale=scale,
        causal=True,
        block_table=block_table,
    )
    ref = reference(q, k_cache, v_cache, q_lens, k_lens, block_table, scale or dim**-0.5)
    return q, out, ref, real


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "heads,kv_heads,dim",
    [(4, 2, 128), (8, 2, 64), (6, 2, 128), (4, 4, 80), (32, 8, 128)],
    ids=["gqa2-d128", "gqa4-d64", "gqa3-d128", "mha-d80", "qwen3-8b-heads"],
)
def test_prefill_of_several_requests_with_padded_token_count(pa, dtype, heads, kv_heads, dim):
    q_lens = [1, 5, 37, 70, 16]
    q, out, ref, real = run_varlen(pa, q_lens, q_lens, heads, kv_heads, dim, dtype, padding=12)
    assert out.shape == q.shape and out.dtype == q.dtype  # like flash-attn: one row per row of q, padding included
    assert relative_error(out[:real], ref[:real]) < TOLERANCE[dtype]
    assert torch.equal(out[real:].cpu(), torch.zeros_like(out[real:].cpu()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_prefill_and_decode_mixed_in_one_step(pa, dtype):
    """Decode requests (1 query over a long history), a second prefill chunk (history before the queries) and a
    fresh prefill share one step, as in the dynamic engine's mixed steps."""
    q_lens = [1, 10, 1, 33, 1]
    k_lens = [40, 45, 17, 33, 129]
    q, out, ref, real = run_varlen(pa, q_lens, k_lens, 4, 2, 128, dtype, padding=5, page=32, seed=1)
    assert relative_error(out[:real], ref[:real]) < TOLERANCE[dtype]
    assert not out[real:].any()


def test_explicit_softmax_scale_is_used(pa):
    _, out, ref, real = run_varlen(pa, [7, 9], [7, 20], 4, 2, 64, torch.float32, padding=0, scale=0.3, seed=2)
    assert relative_error(out, ref) < TOLERANCE[torch.float32]
    _, default_scale, _, _ = run_varlen(pa, [7, 9], [7, 20], 4, 2, 64, torch.float32, padding=0, seed=2)
    assert relative_error(default_scale, ref) > 0.01


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_with_kvcache_including_empty_padded_requests(pa, dtype):
    """flash_attn_with_kvcache's call from Megatron's decode steps: q [b, 1, h, d]; requests past the real batch
    have cache length 0 (CUDA-graph padding) and must come back as zeros, not NaN."""
    generator = torch.Generator().manual_seed(3)
    k_lens = [1, 9, 300, 64, 0, 0]
    heads, kv_heads, dim = 8, 2, 128
    k_cache, v_cache, block_table = paged_cache([max(k, 1) for k in k_lens], kv_heads, dim, 64, dtype, generator)
    q = torch.randn(len(k_lens), 1, heads, dim, generator=generator).to(dtype).to(DEVICE)
    cache_seqlens = torch.tensor(k_lens, dtype=torch.int32, device=DEVICE)
    out = pa.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=cache_seqlens, causal=True, block_table=block_table
    )
    assert out.shape == q.shape
    ref = reference(q.squeeze(1), k_cache, v_cache, [1 if k else 0 for k in k_lens], k_lens, block_table, dim**-0.5)
    assert relative_error(out[:4, 0], ref[:4]) < TOLERANCE[dtype]
    assert torch.isfinite(out.float()).all() and not out[4:].any()


def test_zero_length_requests_inside_the_batch_are_skipped(pa):
    """CUDA-graph steps pad the request list with q_len = k_len = 0 entries."""
    q, out, ref, real = run_varlen(pa, [3, 0, 4, 0], [8, 0, 4, 0], 4, 2, 64, torch.float32, padding=9, seed=4)
    assert relative_error(out[:real], ref[:real]) < TOLERANCE[torch.float32]
    assert not out[real:].any()


def test_refuses_what_it_does_not_implement(pa):
    q = torch.zeros(4, 2, 16)
    cache = torch.zeros(2, 4, 2, 16)
    seqlens = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="causal"):
        pa.flash_attn_varlen_func(q, cache, cache, seqlens, seqlens, 4, 4, causal=False, block_table=seqlens[None])
    with pytest.raises(NotImplementedError, match="dropout"):
        pa.flash_attn_varlen_func(
            q, cache, cache, seqlens, seqlens, 4, 4, dropout_p=0.1, causal=True, block_table=seqlens[None]
        )
    with pytest.raises(ValueError, match="multiple"):
        pa.paged_attention(torch.zeros(4, 3, 16), cache, cache, seqlens, seqlens[1:], seqlens[None])
