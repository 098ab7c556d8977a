"""Packed sequences (--packed_sequence) without Transformer Engine: a real Megatron-Core GPT model with the project's
layer spec (SDPA core attention, RoPE, QK-norm, GQA) gives every sample of a packed row exactly the logits it gets
alone — attention never crosses samples and positions restart — with Megatron's own RoPE and with the training
workers' sync-free one; and the data path packs a prepared dataset atomically, reusing it while nothing changed.
The CUDA case runs the flash-attention varlen kernel in bf16 on a GPU."""

from __future__ import annotations

import pytest

from conftest import CURRENT, tiny_gpt

torch = pytest.importorskip("torch")

LENGTHS = (7, 12, 1, 9, 3)  # a pack of five samples, one of a single token; the row is padded to 40 tokens
PACK = 40


def packed_batch(device: str):
    """NeMo's packed collate for LENGTHS: tokens back to back, positions restarting per sample, cu_seqlens ending at
    the padded row length, max_seqlen as a host tensor; and the samples on their own."""
    from megatron.core.packed_seq_params import PackedSeqParams

    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, 97, (n,), generator=g) for n in LENGTHS]
    used = sum(LENGTHS)
    tokens = torch.cat([*samples, torch.zeros(PACK - used, dtype=torch.long)])
    positions = torch.cat([torch.arange(n) for n in (*LENGTHS, PACK - used)])
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist(), PACK], dtype=torch.int32)
    max_seqlen = (cu[1:] - cu[:-1]).max()  # a 0-d host tensor, as get_packed_seq_params passes it on
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu.to(device),
        cu_seqlens_kv=cu.to(device),
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )
    return samples, tokens[None].to(device), positions[None].to(device), params


def alone_and_packed(model, device):
    CURRENT[0] = device
    samples, tokens, positions, params = packed_batch(device)
    with torch.no_grad():
        packed = model(tokens, positions, attention_mask=None, packed_seq_params=params)[0]
        alone = [
            model(s[None].to(device), torch.arange(len(s), device=device)[None], attention_mask=None)[0]
            for s in samples
        ]
    return packed, alone


def assert_each_sample_matches(packed, alone, atol):
    start = 0
    for n, logits in zip(LENGTHS, alone, strict=True):
        got = packed[start : start + n].float()
        want = logits.float()
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=atol, rtol=0), (n, (got - want).abs().max().item())
        start += n


@pytest.mark.parametrize("sync_free_rope", [False, True], ids=["megatron_rope", "sync_free_rope"])
def test_packed_row_gives_each_sample_its_own_logits(model_parallel, monkeypatch, sync_free_rope):
    from nemo_finetune import compat

    if sync_free_rope:
        from megatron.core.models.common.embeddings import rope_utils

        monkeypatch.setattr(rope_utils, "_apply_rotary_pos_emb_thd", rope_utils._apply_rotary_pos_emb_thd)
        compat.speedups.install_sync_free_packed_rope()
        assert getattr(rope_utils._apply_rotary_pos_emb_thd, "_nemo_compat", False)
    packed, alone = alone_and_packed(tiny_gpt("cpu", torch.float32), "cpu")
    assert_each_sample_matches(packed, alone, atol=2e-5)


def test_packed_row_backward_matches_separate_samples(model_parallel):
    """The gradient of the packed loss is the sum of the samples' gradients (no sample sees another's tokens)."""
    model = tiny_gpt("cpu", torch.float32).train()
    CURRENT[0] = "cpu"
    samples, tokens, positions, params = packed_batch("cpu")
    model(tokens, positions, attention_mask=None, packed_seq_params=params)[
        0, : sum(LENGTHS)
    ].float().square().sum().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for s in samples:
        model(s[None], torch.arange(len(s))[None], attention_mask=None)[0].float().square().sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(packed[name], p.grad, atol=1e-4, rtol=1e-4), name


def test_sync_free_positions_restart_per_sequence_and_are_cached_per_batch():
    from nemo_finetune import compat

    cu = torch.tensor([0, 3, 3, 7, 8, 8], dtype=torch.int32)  # an empty sequence inside and at the end
    positions = compat.speedups.positions_in_sequence(cu, 8)
    assert positions.tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert compat.speedups.positions_in_sequence(cu, 8) is positions
    cu[1] = 2  # an in-place change of the same tensor is a new batch
    assert compat.speedups.positions_in_sequence(cu, 8).tolist() == [0, 1, 0, 0, 1, 2, 3, 0]


def test_block_causal_mask_keeps_each_token_inside_its_sequence():
    from nemo_finetune.kernels import sdpa_attention

    mask = sdpa_attention.block_causal_mask(torch.tensor([0, 2, 5], dtype=torch.int32), 5)
    assert mask.int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]


@pytest.mark.gpu
def test_packed_row_on_cuda_uses_flash_varlen_and_matches_separate_samples(model_parallel, monkeypatch):
    from nemo_finetune import compat
    from nemo_finetune.kernels import sdpa_attention

    assert sdpa_attention.varlen_kernel() is not None, "torch on this GPU machine has no usable varlen_attn"
    from megatron.core.models.common.embeddings import rope_utils

    monkeypatch.setattr(rope_utils, "_apply_rotary_pos_emb_thd", rope_utils._apply_rotary_pos_emb_thd)
    compat.speedups.install_sync_free_packed_rope()
    model = tiny_gpt("cuda", torch.bfloat16)
    packed, alone = alone_and_packed(model, "cuda")
    assert_each_sample_matches(packed, alone, atol=0.08)  # bf16 logits of magnitude ~1: a few bf16 steps
    reference, _ = alone_and_packed(tiny_gpt("cpu", torch.float32), "cpu")  # same initial weights, fp32 maths
    assert (packed.float().cpu() - reference).abs().max() < 0.08


@pytest.mark.gpu
def test_packed_positions_and_mask_follow_every_replay_of_a_cuda_graph():
    """--cuda_graphs: the per-batch caches already hold this very cu_seqlens when Megatron captures a layer, yet the
    graph must compute positions and mask from the buffer that each replay refills, not bake the capture batch's."""
    from nemo_finetune import compat
    from nemo_finetune.kernels import sdpa_attention

    cu = torch.tensor([0, 3, 8, 8], dtype=torch.int32, device="cuda")
    compat.speedups.positions_in_sequence(cu, 8), sdpa_attention.block_causal_mask(cu, 8)  # cached, as after warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        positions = compat.speedups.positions_in_sequence(cu, 8)
        mask = sdpa_attention.block_causal_mask(cu, 8)
    cu.copy_(torch.tensor([0, 5, 6, 8], dtype=torch.int32))  # the next batch, as Megatron's replay copies it in
    graph.replay()
    torch.cuda.synchronize()
    assert positions.tolist() == [0, 1, 2, 3, 4, 0, 0, 1]
    assert torch.equal(mask.cpu(), sdpa_attention.block_causal_mask(cu.cpu(), 8))
