"""nemo_compat: adapts NeMo/Megatron to no-TE / no-CUDA hosts, and changes nothing when TE and CUDA are there."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from conftest import REPO

import nemo_compat


def run_python(code: str, env_extra: dict | None = None) -> str:
    import os

    env = {**os.environ, **(env_extra or {})}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_noop_when_transformer_engine_and_cuda_are_present():
    probe = (
        "import sys, json, nemo_compat\n"
        "env = nemo_compat.prepare_process(nemo_compat.Environment(has_te=True, has_cuda=True))\n"
        "import megatron.core.transformer.transformer_config as tc, nemo.lightning.io as io\n"
        "from nemo.collections.llm.peft import lora, utils\n"
        "print(json.dumps({'applied': sorted(nemo_compat.applied()),"
        " 'stub': 'stub' in (sys.modules['megatron.core.inference.unified_memory'].__doc__ or ''),"
        " 'post_init': getattr(tc.TransformerConfig.__post_init__, '_nemo_compat', False),"
        " 'mapping': getattr(io.apply_transforms, '_nemo_compat', False), 'te_guard': type(lora.te).__name__}))"
    )
    result = json.loads(run_python(probe))
    assert result == {"applied": [], "stub": False, "post_init": False, "mapping": False, "te_guard": "UnavailableMeta"}
    te = nemo_compat.Environment(has_te=True, has_cuda=True)
    assert nemo_compat.model_config_overrides(te) == {} and nemo_compat.optimizer_config_overrides(te) == {}


def test_cpu_host_imports_nemo_without_compiling_anything(tmp_path):
    probe = (
        "import sys, json, nemo_compat\n"
        "nemo_compat.prepare_process()\n"
        "import nemo.collections.llm, megatron.core.inference.contexts.dynamic_context\n"
        "m = sys.modules['megatron.core.inference.unified_memory']\n"
        "print(json.dumps({'stub': 'stub' in m.__doc__, 'applied': sorted(nemo_compat.applied())}))"
    )
    result = json.loads(run_python(probe, {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}))
    assert result["stub"] is True
    assert set(result["applied"]) == {"unified-memory-stub", "no-te-fusion-defaults", "peft-te-guards", "local-spec-norm-mapping"}
    assert not (tmp_path / "ext").exists()  # no torch extension build was attempted


def test_worker_startup_hook_applies_guards_before_nemo_runs():
    probe = (
        "import sys, nemo.collections.llm\n"
        "from nemo.collections.llm.peft import lora\n"
        "print(type(lora.te).__name__, 'stub' in sys.modules['megatron.core.inference.unified_memory'].__doc__)"
    )
    out = run_python(probe, {"PYTHONPATH": f"{REPO / 'startup'}:{REPO}", nemo_compat.WORKER_ENV_FLAG: "1"})
    assert out == "SimpleNamespace True"


def test_fusion_defaults_switch_off_only_without_te():
    probe = (
        "import nemo_compat\n"
        "nemo_compat.prepare_process(nemo_compat.Environment(has_te=False, has_cuda=False))\n"
        "from nemo.collections.llm import LlamaConfig\n"
        "c = LlamaConfig(num_layers=2, hidden_size=64, num_attention_heads=4)\n"
        "print(c.apply_rope_fusion, c.masked_softmax_fusion, c.bias_activation_fusion)"
    )
    assert run_python(probe) == "False False False"


def test_norm_mapping_targets_the_local_layer_spec():
    mapping = {"**.input_layernorm.weight": "**.self_attention.linear_qkv.layer_norm_weight",
               "**.post_attention_layernorm.weight": "**.mlp.linear_fc1.layer_norm_weight",
               "model.norm.weight": "decoder.final_layernorm.weight"}
    local = ["decoder.layers.0.input_layernorm.weight", "decoder.layers.0.pre_mlp_layernorm.weight"]
    fused = ["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"]
    imported = nemo_compat.remap_norm_keys(mapping, local, nemo_is_target=True)
    assert imported["**.input_layernorm.weight"] == "**.input_layernorm.weight"
    assert imported["**.post_attention_layernorm.weight"] == "**.pre_mlp_layernorm.weight"
    assert nemo_compat.remap_norm_keys(mapping, fused, nemo_is_target=True) == mapping  # TE layer spec: unchanged
    export = {v: k for k, v in mapping.items()}
    exported = nemo_compat.remap_norm_keys(export, local, nemo_is_target=False)
    assert exported["**.input_layernorm.weight"] == "**.input_layernorm.weight"


def reference_attention(q_seqs, k_seqs, v_seqs):
    """Causal attention with queries aligned to the end of each key sequence, one sequence at a time."""
    outs = []
    for q, k, v in zip(q_seqs, k_seqs, v_seqs):
        h, hk = q.shape[1], k.shape[1]
        k, v = k.repeat_interleave(h // hk, 1), v.repeat_interleave(h // hk, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
        offset = k.shape[0] - q.shape[0]
        mask = torch.arange(k.shape[0])[None, :] <= (offset + torch.arange(q.shape[0]))[:, None]
        scores = scores.masked_fill(~mask, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
    return outs


def make_paged(k_seqs, block=4, num_blocks=16, seed=0):
    """Scatter sequences into a shuffled block pool, as the dynamic context does."""
    gen = torch.Generator().manual_seed(seed)
    hk, d = k_seqs[0].shape[1:]
    pool = torch.randn(num_blocks, block, hk, d, generator=gen)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(-(-len(s) // block) for s in k_seqs)
    table = torch.full((len(k_seqs), max_blocks), -1, dtype=torch.int32)
    for b, seq in enumerate(k_seqs):
        for j in range(-(-len(seq) // block)):
            blk = free.pop()
            table[b, j] = blk
            chunk = seq[j * block : (j + 1) * block]
            pool[blk, : len(chunk)] = chunk
    return pool, table


def test_paged_attention_fallback_matches_reference():
    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, dim = 4, 2, 8
    k_lens, q_lens = [7, 3, 10], [7, 1, 4]  # a full prefill, a decode step, a chunked prefill
    ks = [torch.randn(n, kv_heads, dim, generator=gen) for n in k_lens]
    vs = [torch.randn(n, kv_heads, dim, generator=gen) for n in k_lens]
    qs = [torch.randn(n, heads, dim, generator=gen) for n in q_lens]
    k_pool, table = make_paged(ks)
    v_pool, table_v = make_paged(vs)
    assert torch.equal(table, table_v)
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32)
    out = nemo_compat.paged_varlen_attention(torch.cat(qs), k_pool, v_pool, cu_q, cu_k, max(q_lens), max(k_lens),
                                             softmax_scale=dim ** -0.5, causal=True, block_table=table)
    torch.testing.assert_close(out, torch.cat(reference_attention(qs, ks, vs)), rtol=1e-5, atol=1e-5)
    decode_q = torch.stack([torch.randn(1, heads, dim, generator=gen) for _ in k_lens])
    decoded = nemo_compat.paged_decode_attention(decode_q, k_pool, v_pool, torch.tensor(k_lens, dtype=torch.int32),
                                                 causal=True, block_table=table)
    expected = reference_attention(list(decode_q), ks, vs)
    torch.testing.assert_close(decoded, torch.stack(expected), rtol=1e-5, atol=1e-5)
