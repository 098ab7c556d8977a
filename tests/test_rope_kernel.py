"""kernels/rope.py (the dynamic engine's RoPE in one Triton kernel) against Megatron-Core's own unfused RoPE, and the
fused-decode-rope trial that routes DynamicInferenceContext's RoPE through it.

On CPU the kernel runs under Triton's interpreter (float32, float16); on a CUDA machine the same tests run the
compiled kernel, in bfloat16 too. Equality is exact: the kernel rounds as torch's elementwise kernels do."""

from __future__ import annotations

import os
import re
import types

import pytest
import torch

pytest.importorskip("triton", reason="Triton is needed for the RoPE kernel (requirements-dev.txt)")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


@pytest.fixture(scope="module")
def rope():
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and Triton's interpreter is off (conftest turns it on before Triton is imported)")
    from nemo_finetune.kernels import rope

    return rope


def angle_table(positions: int, rotary_dim: int) -> torch.Tensor:
    """Megatron's RotaryEmbedding output for inference: [positions, 1, 1, rotary_dim], float32, halves repeated."""
    inverse = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), inverse)
    return torch.cat((angles, angles), dim=-1)[:, None, None, :].to(DEVICE)


def megatrons(t, freqs, positions, mscale):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    return _apply_rotary_pos_emb_bshd(t, freqs[positions], mscale=mscale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "dim", "rotary_dim", "mscale"), [(5, 16, 12, 1.3), (8, 128, 128, 1.0)])
def test_rotates_in_place_exactly_as_megatrons_rope(rope, dtype, heads, dim, rotary_dim, mscale):
    g = torch.Generator().manual_seed(heads)
    tokens, freqs = 9, angle_table(64, rotary_dim)
    # q as the engine slices it: every third head of a wider projection buffer (strided tokens and heads)
    buffer = torch.randn(tokens + 3, 1, 3 * heads, dim, generator=g).to(dtype).to(DEVICE)
    query = buffer[:, :, ::3]
    positions = torch.randint(0, 64, (tokens + 3,), generator=g).to(DEVICE)
    before = buffer.clone()
    expected = megatrons(query[:tokens], freqs, positions[:tokens], mscale)

    assert rope.rope_in_place(query[:tokens], freqs, positions[:tokens], mscale).data_ptr() == query.data_ptr()
    assert torch.equal(query[:tokens], expected)
    untouched = torch.ones_like(buffer, dtype=torch.bool)
    untouched[:tokens, :, ::3] = False
    assert torch.equal(buffer[untouched], before[untouched])  # other heads, the tokens past n


def test_cos_and_sin_are_computed_once_per_angle_table(rope):
    freqs = angle_table(32, 16)
    first = rope.rope_tables(freqs, torch.float16, 1.0)
    assert all(a is b for a, b in zip(first, rope.rope_tables(freqs, torch.float16, 1.0), strict=True))
    assert torch.equal(first[0], torch.cos(freqs).reshape(32, 16).to(torch.float16))
    freqs.mul_(2)  # changed in place: computed again
    assert torch.equal(rope.rope_tables(freqs, torch.float16, 1.0)[1], torch.sin(freqs).reshape(32, 16).half())
    assert rope.rope_tables(freqs, torch.float16, 0.5)[0] is not first[0]  # another mscale, another table
    # Every live angle table keeps its own (graphs captured with them read them at each replay) until it is gone
    kept = rope.rope_tables(freqs, torch.float16, 1.0)
    other = angle_table(16, 16)
    rope.rope_tables(other, torch.float16, 1.0)
    assert rope.rope_tables(freqs, torch.float16, 1.0)[0] is kept[0]
    entries = len(rope._tables)
    del other
    assert len(rope._tables) == entries - 1


def test_tensors_the_kernel_does_not_take_are_named(rope):
    freqs = angle_table(8, 16)
    cases = {
        "needs [tokens, 1, heads, dim], dim last": torch.zeros(4, 2, 3, 16, device=DEVICE),
        "dtype torch.float64": torch.zeros(4, 1, 3, 16, dtype=torch.float64, device=DEVICE),
        "a rotary dimension of 16 for heads of 8": torch.zeros(4, 1, 3, 8, device=DEVICE),
    }
    for message, t in cases.items():
        with pytest.raises(ValueError, match=f"rope_in_place: .*{re.escape(message)}"):
            rope.rope_in_place(t, freqs, torch.zeros(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="an angle table of shape \\(8, 1, 1, 16\\), torch.float16"):
        rope.rope_in_place(torch.zeros(4, 1, 3, 16, device=DEVICE), freqs.half(), torch.zeros(4, device=DEVICE))


def engine_context(tokens: int, decode_only: bool):
    """What DynamicInferenceContext's two RoPE methods read of the engine's state: the padded token count, each
    token's position and whether the step only decodes."""
    g = torch.Generator().manual_seed(tokens)
    positions = torch.randint(0, 64, (tokens + 4,), generator=g).to(DEVICE)
    return types.SimpleNamespace(
        padded_active_token_count=tokens,
        token_to_pos_ids=positions,
        token_to_position_in_request=positions.flip(0),
        is_decode_only=lambda: decode_only,
    )


@pytest.mark.parametrize("decode_only", [True, False])
def test_the_trial_gives_the_engines_rope_for_queries_and_keys(rope, decode_only, model_parallel, monkeypatch):
    from megatron.core import parallel_state
    from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nemo_finetune import compat
    from nemo_finetune.compat.speedups import fuse_decode_rope

    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4)
    freqs, dtype = angle_table(64, 16), DTYPES[-1]
    g = torch.Generator().manual_seed(3)
    query = torch.randn(8, 1, 4, 16, generator=g).to(dtype).to(DEVICE)
    key = torch.randn(6 if decode_only else 8, 1, 2, 16, generator=g).to(dtype).to(DEVICE)
    context, cp = engine_context(6, decode_only), parallel_state.get_context_parallel_group()
    megatron_query = DynamicInferenceContext.apply_rotary_emb_query(context, query.clone(), freqs, config, None, cp)
    megatron_key = DynamicInferenceContext.apply_rotary_emb_key(context, key.clone(), freqs, config, cp)
    with compat.scoped():
        fuse_decode_rope()
        assert "fused-decode-rope" in compat.applied()
        ours_query = DynamicInferenceContext.apply_rotary_emb_query(context, query.clone(), freqs, config, None, cp)
        ours_key = DynamicInferenceContext.apply_rotary_emb_key(context, key.clone(), freqs, config, cp)
        calls = []
        monkeypatch.setattr(rope, "rope_in_place", lambda t, *a: calls.append(t.shape) or t)
        DynamicInferenceContext.apply_rotary_emb_query(context, query.clone(), freqs, config, None, cp)
        assert calls == [(6, 1, 4, 16)]  # the kernel rotated the padded active tokens
        interleaved = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, rotary_interleaved=True)
        DynamicInferenceContext.apply_rotary_emb_query(context, query.clone(), freqs, interleaved, None, cp)
        assert len(calls) == 1  # Megatron's own function rotates what the kernel does not take
    assert torch.equal(ours_query, megatron_query) and torch.equal(ours_key, megatron_key)
    assert not getattr(DynamicInferenceContext.apply_rotary_emb_query, "_nemo_compat", False)  # taken back


def test_the_generation_benchmark_measures_the_trial_in_a_run_of_its_own():
    import subprocess
    import sys

    from conftest import REPO

    benchmark = [sys.executable, str(REPO / "benchmarks" / "generation_throughput.py")]
    both = subprocess.run(
        [*benchmark, "--modes", "cuda_graphs", "cuda_graphs+fused_rope"], capture_output=True, text=True
    )
    assert both.returncode == 2 and "one CUDA-graph mode per run" in both.stderr
    assert "compare their tokens_sha256" in both.stderr
