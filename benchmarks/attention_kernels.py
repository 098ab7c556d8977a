"""Causal GQA attention forward + backward on one GPU, by torch SDPA backend, at a training shape; which kernel
sdpa_attention.py should reach, measured rather than assumed.

    python benchmarks/attention_kernels.py    # Qwen3-8B: 32 query / 8 KV heads, head_dim 128, seq 4096

Rows: SDPA with `enable_gqa=True` (K/V not repeated) under each backend that accepts it, and SDPA on K/V repeated
to the query heads (what a backend without GQA support needs) under each backend; plus Megatron's unfused
arithmetic (baddbmm, softmax, bmm) for reference. Packed rows (--packed_sequences N: the row holds N sequences
of random lengths, as --packed_sequence trains): torch's flash varlen kernel as sdpa_attention.py calls it, and SDPA
with the block-diagonal causal mask (its fallback). Median of 20 forward+backward passes after 5 warm-ups.
"""

from __future__ import annotations

import argparse
import json
import statistics


def main(argv=None) -> int:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv_heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--packed_sequences", type=int, default=8, help="sequences in the packed-row cases")
    args = parser.parse_args(argv)
    b, s, h, g, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    make = lambda heads: torch.randn(b, heads, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa
    q, k, v = make(h), make(g), make(g)
    grad = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
    flops = 4 * b * h * s * s * d / 2 * 3.5  # causal: half the scores; backward ~2.5x forward

    def timed(fn) -> float:
        times = []
        for i in range(25):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn().backward(grad)
            end.record()
            torch.cuda.synchronize()
            if i >= 5:
                times.append(start.elapsed_time(end) / 1000)
        return statistics.median(times)

    def repeated():
        return (t.repeat_interleave(h // g, dim=1) for t in (k, v))

    def unfused():
        kr, vr = repeated()
        scores = torch.baddbmm(
            torch.empty(b * h, s, s, device="cuda", dtype=q.dtype),
            q.reshape(b * h, s, d),
            kr.reshape(b * h, s, d).transpose(1, 2),
            beta=0.0,
            alpha=d**-0.5,
        )
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
        return torch.bmm(scores.float().softmax(-1).to(q.dtype), vr.reshape(b * h, s, d)).view(b, h, s, d)

    cases = {}
    for name, backend in (
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        cases[f"{name}, enable_gqa"] = (
            backend,
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        )
        cases[f"{name}, K/V repeated"] = (
            backend,
            lambda: F.scaled_dot_product_attention(q, *repeated(), is_causal=True),
        )
    cases["default choice, enable_gqa"] = (
        None,
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
    )
    cases["unfused (Megatron local)"] = (None, unfused)

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from nemo_finetune.kernels import sdpa_attention

    cuts = torch.randperm(s - 1, generator=torch.Generator().manual_seed(0))[: args.packed_sequences - 1] + 1
    cu = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([s])]).to("cuda", torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    thd = lambda t: t[0].transpose(0, 1)  # noqa: E731  [1, heads, s, d] -> [s, heads, d]
    varlen = sdpa_attention.varlen_kernel()
    if varlen is not None:
        cases[f"varlen, {args.packed_sequences} packed sequences"] = (
            None,
            lambda: varlen(thd(q), thd(k), thd(v), cu, cu, max_len, max_len, d**-0.5).transpose(0, 1)[None],
        )
    block = sdpa_attention.block_causal_mask(cu, s)
    cases[f"SDPA block mask, {args.packed_sequences} packed"] = (
        None,
        lambda: F.scaled_dot_product_attention(q, *repeated(), attn_mask=block),
    )
    rows = []
    for name, (backend, fn) in cases.items():
        try:
            if backend is None:
                seconds = timed(fn)
            else:
                with sdpa_kernel([backend]):
                    seconds = timed(fn)
            rows.append({"case": name, "ms": round(1000 * seconds, 3), "tflops": round(flops / seconds / 1e12, 1)})
        except RuntimeError as e:
            rows.append({"case": name, "error": str(e).splitlines()[0][:160]})
        torch.cuda.empty_cache()
    for row in rows:
        print(
            f"{row['case']:32s} "
            + (
                f"{row['ms']:8.3f} ms  {row['tflops']:6.1f} TFLOP/s"
                if "ms" in row
                else f"not available: {row['error']}"
            )
        )
    print(
        json.dumps(
            {"shape": vars(args), "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "rows": rows}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
