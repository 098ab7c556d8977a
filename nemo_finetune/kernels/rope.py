"""RoPE for the dynamic inference engine's steps in one Triton kernel per tensor, in place.

Megatron-Core 0.15.3 without TE rotates each layer's queries and keys in `DynamicInferenceContext.apply_rotary_emb_
query/key` with its unfused RoPE: a gather of the angles by position, cos, sin, casts, chunk/neg/cat, two
multiplies, an add and a cat, for q and for k in every layer (~24 kernels a layer of a decode step; the profile in
docs/BENCHMARKS.md). Here the cos and sin tables are computed once for the angle table the model hands every layer
(`rope_tables`), and one kernel a tensor gathers its rows by position and rotates in place.

The maths and its roundings are Megatron's (`rope_utils._apply_rotary_pos_emb_bshd`, non-interleaved): the tables
are (cos(angles) * mscale) and (sin(angles) * mscale) cast to the tensor's dtype, and each product and the sum are
rounded to that dtype as torch's elementwise kernels round them, so bf16 and fp16 results equal Megatron's
bit for bit (fp32 may differ in the last bit where the compiler fuses the multiply and add)."""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["stride_token", "stride_head", "stride_table", "heads"])
def _rope_in_place(
    x_ptr,
    cos_ptr,
    sin_ptr,
    positions_ptr,
    stride_token,
    stride_head,
    stride_table,
    heads,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROUND: tl.constexpr,
):
    """One program per token: x[token, h, :2*HALF] = x * cos + rotate_half(x) * sin at the token's position."""
    token = tl.program_id(0)
    position = tl.load(positions_ptr + token).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    h = tl.arange(0, BLOCK_H)
    in_half = d < HALF
    mask = (h[:, None] < heads) & in_half[None, :]
    row = position * stride_table
    cos1 = tl.load(cos_ptr + row + d, mask=in_half, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + row + HALF + d, mask=in_half, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + row + d, mask=in_half, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + row + HALF + d, mask=in_half, other=0.0).to(tl.float32)[None, :]
    first = x_ptr + token.to(tl.int64) * stride_token + h[:, None] * stride_head + d[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    # rotate_half(x) = cat(-x2, x1): out1 = x1*cos1 + (-x2)*sin1, out2 = x2*cos2 + x1*sin2
    a1, b1 = x1 * cos1, -x2 * sin1
    a2, b2 = x2 * cos2, x1 * sin2
    if ROUND:  # torch rounds each elementwise result to the tensor's dtype
        a1, b1 = a1.to(dtype).to(tl.float32), b1.to(dtype).to(tl.float32)
        a2, b2 = a2.to(dtype).to(tl.float32), b2.to(dtype).to(tl.float32)
    tl.store(first, (a1 + b1).to(dtype), mask=mask)
    tl.store(first + HALF, (a2 + b2).to(dtype), mask=mask)


def unsupported_reason(t: torch.Tensor, freqs: torch.Tensor) -> str | None:
    """Why rope_in_place cannot rotate `t` [tokens, 1, heads, dim] with the angle table `freqs` [positions, 1, 1,
    rotary dim] (None if it can)."""
    if t.dim() != 4 or t.shape[1] != 1 or t.stride(-1) != 1:
        return f"a tensor of shape {tuple(t.shape)} and strides {t.stride()} (needs [tokens, 1, heads, dim], dim last)"
    if t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {t.dtype}"
    if freqs.dim() != 4 or freqs.shape[1:3] != (1, 1) or freqs.dtype != torch.float32 or freqs.stride(-1) != 1:
        return f"an angle table of shape {tuple(freqs.shape)}, {freqs.dtype} (needs [positions, 1, 1, dim], float32)"
    if freqs.shape[-1] % 2 or freqs.shape[-1] > t.shape[-1]:
        return f"a rotary dimension of {freqs.shape[-1]} for heads of {t.shape[-1]}"
    if freqs.device != t.device:
        return "the angle table on another device"
    return None


_tables: dict[tuple, tuple] = {}  # (id of an angle table, dtype, mscale) -> (its version, cos, sin)


def rope_tables(freqs: torch.Tensor, dtype: torch.dtype, mscale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos(freqs) * mscale, sin(freqs) * mscale) in `dtype`, as `[positions, rotary dim]`; computed once per angle
    table (the model hands every layer the same one) and kept while that table lives, since CUDA graphs captured
    with them read them at every replay; inside a capture nothing new is kept (its tensors are the graph's own)."""
    from nemo_finetune.kernels.sdpa_attention import capturing

    key = (id(freqs), dtype, float(mscale))
    kept = _tables.get(key)
    if kept is not None and kept[0] == freqs._version:
        return kept[1], kept[2]
    angles = freqs.reshape(freqs.shape[0], freqs.shape[-1])
    cos, sin = (torch.cos(angles) * mscale).to(dtype), (torch.sin(angles) * mscale).to(dtype)
    if not capturing():
        if key not in _tables:
            weakref.finalize(freqs, _tables.pop, key, None)  # an id is reused only after its tensor is gone
        _tables[key] = (freqs._version, cos, sin)
    return cos, sin


def rope_in_place(t: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor, mscale: float = 1.0) -> torch.Tensor:
    """Rotate `t` [tokens, 1, heads, dim] in place, token i at angle row positions[i] of `freqs` [positions, 1, 1,
    rotary dim] (non-interleaved; dims past the rotary dimension are left as they are), as Megatron's
    `_apply_rotary_pos_emb_bshd(t, freqs[positions], mscale=mscale)` computes it. Returns `t`."""
    reason = unsupported_reason(t, freqs)
    if reason:
        raise ValueError(f"rope_in_place: {reason}")
    if t.shape[0] == 0:
        return t
    cos, sin = rope_tables(freqs, t.dtype, mscale)
    half, heads = freqs.shape[-1] // 2, t.shape[2]
    _rope_in_place[(t.shape[0],)](
        t,
        cos,
        sin,
        positions,
        t.stride(0),
        t.stride(2),
        cos.stride(0),
        heads,
        HALF=half,
        BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_D=triton.next_power_of_2(half),
        ROUND=t.dtype != torch.float32,
    )
    return t
