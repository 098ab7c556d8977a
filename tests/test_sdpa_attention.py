"""sdpa_attention.py against a float64 reference attention written from Megatron's semantics (mask True = masked
out, scale 1/sqrt(kv_channels), GQA groups sharing K/V), on CPU; and its selection by peft_megatron's recipe."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")


def megatron_config(heads=4, groups=2, head_dim=16, **extra):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        attention_dropout=0.0,
        **extra,
    )


def core_attention(config, mask_type="causal", softmax_scale=None):
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_finetune.kernels.sdpa_attention import SDPADotProductAttention

    return SDPADotProductAttention(
        config,
        layer_number=3,
        attn_mask_type=getattr(AttnMaskType, mask_type),
        attention_type="self",
        softmax_scale=softmax_scale,
    ).eval()


def reference(q, k, v, masked_out, scale):
    """q [sq, b, np, hn], k/v [sk, b, ng, hn], masked_out broadcastable to [b, np, sq, sk] -> [sq, b, np*hn]."""
    sq, b, heads, hn = q.shape
    repeat = heads // k.shape[2]
    q64, k64, v64 = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))
    k64, v64 = k64.repeat_interleave(repeat, dim=1), v64.repeat_interleave(repeat, dim=1)
    scores = q64 @ k64.transpose(-1, -2) * scale
    if masked_out is not None:
        scores = scores.masked_fill(masked_out, float("-inf"))
    out = scores.softmax(-1) @ v64
    return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)


def qkv(sq, sk, b, heads, groups, hn, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    make = lambda s, h: torch.randn(s, b, h, hn, generator=g).requires_grad_(requires_grad)  # noqa: E731
    return make(sq, heads), make(sk, groups), make(sk, groups)


def future(s):
    return torch.ones(s, s, dtype=torch.bool).triu(1)


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (8, 2), (6, 1)])
@pytest.mark.parametrize("with_mask", [True, False])
def test_causal_attention_matches_the_reference_for_mha_and_gqa(heads, groups, with_mask):
    q, k, v = qkv(12, 12, 2, heads, groups, 16)
    attention = core_attention(megatron_config(heads, groups))
    mask = future(12).expand(2, 1, 12, 12) if with_mask else None  # what NeMo's SFT collate builds
    out = attention(q, k, v, mask)
    assert out.shape == (12, 2, heads * 16)
    torch.testing.assert_close(out.double(), reference(q, k, v, future(12), 1 / math.sqrt(16)), atol=1e-5, rtol=1e-5)


def test_gradients_match_the_reference():
    q, k, v = qkv(10, 10, 2, 4, 2, 8, requires_grad=True)
    core_attention(megatron_config(4, 2, 8)).train()(q, k, v, future(10)[None, None]).square().sum().backward()
    ours = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference(q, k, v, future(10), 1 / math.sqrt(8)).square().sum().backward()
    for mine, theirs in zip(ours, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(mine, theirs.float(), atol=1e-4, rtol=1e-4)


def test_a_mask_that_is_not_plain_causal_is_honoured_exactly():
    q, k, v = qkv(9, 9, 2, 4, 2, 16, seed=1)
    masked = future(9).repeat(2, 1, 1, 1)
    masked[0, 0, :, 6:] = True  # sample 0: the last three keys are padding nobody may see
    masked[0, 0, 6:, 0] = False
    masked[1, 0, 8, :] = False  # sample 1: the last row sees the whole sequence
    masked[0, 0, 6:, 6] = False  # keep a key visible to every padded row (no row fully masked)
    out = core_attention(megatron_config())(q, k, v, masked)
    torch.testing.assert_close(out.double(), reference(q, k, v, masked, 1 / math.sqrt(16)), atol=1e-5, rtol=1e-5)


def test_softmax_scale_is_used_and_layer_scaling_cancels():
    q, k, v = qkv(7, 7, 1, 4, 2, 16, seed=2)
    config = megatron_config(apply_query_key_layer_scaling=True, fp16=True)
    out = core_attention(config, softmax_scale=0.05)(q, k, v, None)
    torch.testing.assert_close(out.double(), reference(q, k, v, future(7), 0.05), atol=1e-5, rtol=1e-5)


def test_one_query_attends_every_key_and_continued_queries_are_bottom_right_causal():
    attention = core_attention(megatron_config())
    q, k, v = qkv(1, 6, 2, 4, 2, 16, seed=3)
    torch.testing.assert_close(attention(q, k, v, None).double(), reference(q, k, v, None, 0.25), atol=1e-5, rtol=1e-5)
    q, k, v = qkv(3, 8, 2, 4, 2, 16, seed=4)
    bottom_right = torch.ones(3, 8, dtype=torch.bool).triu(1 + 8 - 3)
    torch.testing.assert_close(
        attention(q, k, v, None).double(), reference(q, k, v, bottom_right, 0.25), atol=1e-5, rtol=1e-5
    )


def test_a_padding_layer_without_mask_attends_everything():
    q, k, v = qkv(5, 5, 2, 4, 2, 16, seed=5)
    out = core_attention(megatron_config(), mask_type="padding")(q, k, v, None)
    torch.testing.assert_close(out.double(), reference(q, k, v, None, 0.25), atol=1e-5, rtol=1e-5)


def test_plain_causal_check_is_per_mask_object_and_version():
    from nemo_finetune.kernels import sdpa_attention

    plain = future(6).expand(2, 1, 6, 6).clone()
    assert sdpa_attention.is_plain_causal(plain)
    plain[1, 0, 5, 0] = True  # an in-place change bumps the version: checked again
    assert not sdpa_attention.is_plain_causal(plain)
    assert sdpa_attention.is_plain_causal(future(6)[None, None])


def test_unsupported_packed_formats_and_configs_are_refused_by_name():
    from megatron.core.packed_seq_params import PackedSeqParams

    from nemo_finetune.kernels import sdpa_attention

    q, k, v = qkv(4, 4, 1, 4, 2, 16)
    with pytest.raises(NotImplementedError, match="packed qkv_format 'sbhd'"):
        core_attention(megatron_config())(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd"))
    thd = PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 4]), cu_seqlens_kv=torch.tensor([0, 4]))
    with pytest.raises(NotImplementedError, match="packed sequences with AttnMaskType.no_mask attention"):
        core_attention(megatron_config(), mask_type="no_mask")(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=thd)
    windowed = megatron_config(window_size=(8, 0))
    with pytest.raises(ValueError, match="sliding-window attention; use --core_attention unfused"):
        core_attention(windowed)
    assert sdpa_attention.unsupported_reason(megatron_config()) is None


def test_the_varlen_grid_takes_the_batchs_longest_sequence_from_the_host():
    """Outside a CUDA-graph capture the kernel's max lengths are the collate's host tensors (no device sync), or the
    row's length where the batch gives none; inside one (GPU suite) the row's length."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from nemo_finetune.kernels import sdpa_attention

    cu = torch.tensor([0, 5, 12, 12], dtype=torch.int32)
    given = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=torch.tensor(7))
    given.max_seqlen_kv = torch.tensor(7)
    assert sdpa_attention.varlen_max_lengths(given, 12) == (7, 7)
    assert sdpa_attention.varlen_max_lengths(PackedSeqParams(qkv_format="thd"), 12) == (12, 12)


def test_layer_spec_swaps_only_the_core_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from nemo.collections.llm.gpt.model.base import local_layer_spec
    from nemo.collections.llm.gpt.model.qwen3 import Qwen3Config600M

    from nemo_finetune.kernels import sdpa_attention

    config = Qwen3Config600M()
    ours, theirs = sdpa_attention.layer_spec(config), local_layer_spec(config)
    assert ours.submodules.self_attention.submodules.core_attention is sdpa_attention.SDPADotProductAttention
    assert theirs.submodules.self_attention.submodules.core_attention is DotProductAttention
    ours.submodules.self_attention.submodules.core_attention = DotProductAttention
    assert repr(ours) == repr(theirs)  # everything else (norms, QK-norm, linears, MLP) is the local spec's
