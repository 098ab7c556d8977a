"""nemo_finetune.compat: adapts NeMo/Megatron to no-TE / no-CUDA hosts, and changes nothing when TE and CUDA are
there."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from nemo_finetune import compat


def run_python(code: str, env_extra: dict | None = None, output: str = "last line") -> str:
    """Run `code` in a fresh interpreter; its stdout's last line, or (output="stderr") all of its stderr."""
    env = {**os.environ, **(env_extra or {})}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr if output == "stderr" else out.stdout.strip().splitlines()[-1]


def test_noop_when_transformer_engine_and_cuda_are_present():
    probe = (
        "import sys, json\nfrom nemo_finetune import compat\n"
        "env = compat.prepare_process(compat.Environment(has_te=True, has_cuda=True))\n"
        "import megatron.core.transformer.transformer_config as tc, nemo.lightning.io as io\n"
        "from nemo.collections.llm.peft import lora, utils\n"
        "print(json.dumps({'applied': sorted(compat.applied()),"
        " 'stub': 'stub' in (sys.modules['megatron.core.inference.unified_memory'].__doc__ or ''),"
        " 'post_init': getattr(tc.TransformerConfig.__post_init__, '_nemo_compat', False),"
        " 'mapping': getattr(io.apply_transforms, '_nemo_compat', False), 'te_guard': type(lora.te).__name__}))"
    )
    result = json.loads(run_python(probe))
    assert result == {
        "applied": [],
        "stub": False,
        "post_init": False,
        "mapping": False,
        "te_guard": "UnavailableMeta",
    }
    te = compat.Environment(has_te=True, has_cuda=True)
    assert compat.model_config_overrides(te) == {} and compat.optimizer_config_overrides(te) == {}


def test_cpu_host_imports_nemo_without_compiling_anything(tmp_path):
    probe = (
        "import sys, json\nfrom nemo_finetune import compat\n"
        "compat.prepare_process()\n"
        "import nemo.collections.llm, megatron.core.inference.contexts.dynamic_context\n"
        "m = sys.modules['megatron.core.inference.unified_memory']\n"
        "print(json.dumps({'stub': 'stub' in m.__doc__, 'applied': sorted(compat.applied())}))"
    )
    result = json.loads(run_python(probe, {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}))
    assert result["stub"] is True
    assert set(result["applied"]) == {
        "unified-memory-stub",
        "no-te-fusion-defaults",
        "peft-te-guards",
        "local-spec-norm-mapping",
    }
    assert not (tmp_path / "ext").exists()  # no torch extension build was attempted


def test_worker_startup_hook_applies_guards_before_nemo_runs():
    probe = (
        "import sys, nemo.collections.llm\n"
        "from nemo.collections.llm.peft import lora\n"
        "from megatron.core.models.common.embeddings import rope_utils\n"
        "print(type(lora.te).__name__, 'stub' in (sys.modules['megatron.core.inference.unified_memory'].__doc__ or ''),"
        " getattr(rope_utils._apply_rotary_pos_emb_bshd, '_nemo_compat', False),"
        " getattr(rope_utils._apply_rotary_pos_emb_thd, '_nemo_compat', False),"
        " getattr(lora.LoRALinear.forward, '_nemo_compat', False))"
    )
    worker = {"PYTHONPATH": f"{REPO / 'nemo_finetune' / 'startup'}:{REPO}", compat.WORKER_ENV_FLAG: "1"}
    out = run_python(probe, worker)
    assert out == "SimpleNamespace True True True True"
    # Each shim a `compat:` line on the worker's stderr
    load = (
        "from megatron.core import optimizer; from megatron.core.dist_checkpointing.strategies import async_utils\n"
        "print(async_utils.TemporalAsyncCaller.schedule_async_call._nemo_compat)"
    )
    stderr = run_python(load, worker, output="stderr")
    assert "INFO peft_megatron.compat] compat: unified-memory-stub (" in stderr, stderr[-2000:]
    assert "compat: async-save-staged-buffers (" in stderr
    assert "compat: torch-optimizer-kernels (" in stderr
    # Without the launcher's flag (test_checkpoint.py, conversions: CUDA-graph inference) RoPE and LoRA stay upstream's.
    out = run_python(probe, {"PYTHONPATH": f"{REPO / 'nemo_finetune' / 'startup'}:{REPO}", compat.WORKER_ENV_FLAG: "0"})
    assert out.endswith(" False False False")


def test_compiled_rope_gives_megatrons_rope_and_its_gradient(monkeypatch):
    from megatron.core.models.common.embeddings import rope_utils

    eager = rope_utils._apply_rotary_pos_emb_bshd
    monkeypatch.setattr(rope_utils, "_apply_rotary_pos_emb_bshd", eager)  # restored after the test
    compat.speedups.compile_unfused_rope()
    compiled = rope_utils._apply_rotary_pos_emb_bshd
    assert compiled is not eager and compiled._nemo_compat
    compat.speedups.compile_unfused_rope()
    assert rope_utils._apply_rotary_pos_emb_bshd is compiled  # idempotent: never compiled twice
    torch.manual_seed(0)
    freqs = torch.randn(16, 1, 1, 32)
    for interleaved in (False, True):
        t = torch.randn(16, 2, 4, 32, requires_grad=True)  # [s, b, heads, head_dim]
        expected = eager(t, freqs, rotary_interleaved=interleaved)
        got = compiled(t, freqs, rotary_interleaved=interleaved)
        assert torch.allclose(got, expected, atol=1e-5)
        (grad_eager,) = torch.autograd.grad(expected.square().sum(), t)
        (grad_compiled,) = torch.autograd.grad(got.square().sum(), t)
        assert torch.allclose(grad_compiled, grad_eager, atol=1e-4)


def test_te_only_fusions_switch_off_without_te_and_torch_compiled_ones_stay():
    probe = (
        "from nemo_finetune import compat\n"
        "compat.prepare_process(compat.Environment(has_te=False, has_cuda=False))\n"
        "from nemo.collections.llm import LlamaConfig\n"
        "c = LlamaConfig(num_layers=2, hidden_size=64, num_attention_heads=4)\n"
        "print(c.apply_rope_fusion, c.masked_softmax_fusion, c.gradient_accumulation_fusion, c.bias_activation_fusion,"
        " LlamaConfig(num_layers=2, hidden_size=64, num_attention_heads=4, cross_entropy_loss_fusion=True)"
        ".cross_entropy_loss_fusion, end=' ')\n"
        "compat.speedups.accumulate_wgrad_with_torch()\n"
        "print(LlamaConfig(num_layers=2, hidden_size=64, num_attention_heads=4, gradient_accumulation_fusion=True)"
        ".gradient_accumulation_fusion)"
    )
    # SwiGLU is torch.compile'd (no TE needed); the native cross-entropy fusion is off only by the recipe's override,
    # so train_throughput.py's native_ce variant really measures it; the weight-gradient accumulation fusion stays
    # once torch's GEMM stands in for apex's kernel.
    assert run_python(probe) == "False False False True True True"
    no_te = compat.Environment(has_te=False, has_cuda=True)
    training = compat.model_config_overrides(no_te, training=True)
    inference = compat.model_config_overrides(no_te)
    assert training["bias_activation_fusion"] and training["bias_dropout_fusion"]
    assert not inference["bias_activation_fusion"] and not inference["bias_dropout_fusion"]
    assert not training["cross_entropy_loss_fusion"]  # the native one measured 4.4x slower
    assert not training["apply_rope_fusion"] and not inference["apply_rope_fusion"]


def test_norm_mapping_targets_the_local_layer_spec():
    mapping = {
        "**.input_layernorm.weight": "**.self_attention.linear_qkv.layer_norm_weight",
        "**.post_attention_layernorm.weight": "**.mlp.linear_fc1.layer_norm_weight",
        "model.norm.weight": "decoder.final_layernorm.weight",
    }
    local = ["decoder.layers.0.input_layernorm.weight", "decoder.layers.0.pre_mlp_layernorm.weight"]
    fused = ["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"]
    imported = compat.no_te.remap_norm_keys(mapping, local, nemo_is_target=True)
    assert imported["**.input_layernorm.weight"] == "**.input_layernorm.weight"
    assert imported["**.post_attention_layernorm.weight"] == "**.pre_mlp_layernorm.weight"
    assert compat.no_te.remap_norm_keys(mapping, fused, nemo_is_target=True) == mapping  # TE layer spec: unchanged
    export = {v: k for k, v in mapping.items()}
    exported = compat.no_te.remap_norm_keys(export, local, nemo_is_target=False)
    assert exported["**.input_layernorm.weight"] == "**.input_layernorm.weight"


def test_dynamic_attention_gets_the_triton_stand_ins_only_without_flash_attn():
    """Megatron's flash_decode_and_prefill looks the two flash-attn functions up in its module at call time."""
    probe = (
        "import json\nfrom nemo_finetune import compat\nfrom nemo_finetune.kernels import paged_attention\n"
        "compat.no_te.skip_unified_memory_build()\n"
        "from megatron.core.transformer import attention\n"
        "before = attention.flash_attn_varlen_func is None and attention.flash_attn_with_kvcache is None\n"
        "install = compat.install_paged_attention_fallback\n"
        "first, second = install(), install()\n"
        "print(json.dumps({'absent_before': before, 'installed': [first, second],"
        " 'varlen': attention.flash_attn_varlen_func is paged_attention.flash_attn_varlen_func,"
        " 'kvcache': attention.flash_attn_with_kvcache is paged_attention.flash_attn_with_kvcache,"
        " 'version_check': attention.is_fa_min_version('2.7.3')}))"
    )
    result = json.loads(run_python(probe, {"TRITON_INTERPRET": "1"}))
    assert result == {
        "absent_before": True,
        "installed": [True, False],
        "varlen": True,
        "kvcache": True,
        "version_check": True,
    }


def lora_model(dropout: float = 0.0, dropout_position: str = "pre"):
    """tiny_gpt with NeMo's own LoRA on every attention and MLP linear, its B matrices made non-zero so that the
    adapter's path counts in the output."""
    from nemo.collections.llm import fn
    from nemo.collections.llm.peft.lora import LoRA, LoRALinear

    from conftest import tiny_gpt

    compat.prepare_process()  # NeMo's LoRA transform needs the no-TE guards, as every script applies them
    model = tiny_gpt("cpu", torch.float32).train()
    model.requires_grad_(False)
    model = fn.walk(model, LoRA(dim=4, alpha=8, dropout=dropout, dropout_position=dropout_position).transform)
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    torch.manual_seed(1)
    for m in wrapped:
        torch.nn.init.normal_(m.adapter.linear_out.weight, std=0.5)
    return model, wrapped


def loss_and_gradients(model):
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    logits = model(tokens, torch.arange(16)[None].expand(2, -1), attention_mask=None)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), tokens[:, 1:].reshape(-1))
    trained = [p for p in model.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, trained)


@pytest.fixture
def shims_in_scope():
    """The shims a test applies are taken back after it (compat.scoped)."""
    with compat.scoped():
        yield


def test_fused_lora_output_gives_nemos_lora_loss_and_gradients(model_parallel, shims_in_scope):
    from nemo.collections.llm.peft.lora import LoRALinear

    model, wrapped = lora_model()
    assert len(wrapped) == 8  # linear_qkv, linear_proj, linear_fc1, linear_fc2 in each of 2 layers
    expected_loss, expected_grads = loss_and_gradients(model)
    with compat.scoped():
        compat.speedups.fuse_lora_output()
        assert LoRALinear.forward._nemo_compat and "fused-lora-output" in compat.applied()
        loss, grads = loss_and_gradients(model)
        assert all(m.__dict__["_fused_lora_output"] for m in wrapped)  # every adapter took the fused path
    assert not getattr(LoRALinear.forward, "_nemo_compat", False) and "fused-lora-output" not in compat.applied()
    assert len(grads) == 16 and all(g.abs().sum() > 0 for g in grads)  # A and B of each adapter
    assert torch.allclose(loss, expected_loss, rtol=1e-6, atol=0), (loss.item(), expected_loss.item())
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (got - want).abs().max().item()


def test_lora_with_dropout_after_the_adapter_keeps_nemos_forward(model_parallel, shims_in_scope):
    model, wrapped = lora_model(dropout=0.5, dropout_position="post")
    model.eval()  # dropout off, so both forwards are deterministic
    with compat.scoped():
        compat.speedups.fuse_lora_output()
        loss, _ = loss_and_gradients(model)
        assert not any(m.__dict__["_fused_lora_output"] for m in wrapped)  # dropout on the full output: NeMo's path
    assert torch.allclose(loss, loss_and_gradients(model)[0], rtol=0, atol=0)


def test_shims_refuse_releases_they_were_not_written_for():
    compat.check_versions()  # the pinned stack installed here
    compat.check_versions({"nemo_toolkit": "2.7.3", "megatron-core": "0.15.3"})
    with pytest.raises(RuntimeError) as refused:
        compat.check_versions({"nemo_toolkit": "2.7.3", "megatron-core": "0.16.0"})
    message = str(refused.value)
    assert "megatron-core 0.16.0" in message and "nemo_toolkit" not in message.split("found")[1]
    assert "pip install -r requirements.txt" in message and "Transformer Engine" in message


def test_every_shim_is_listed_with_its_upstream_defect_and_when_it_can_go():
    import re

    kinds = (compat.no_te, compat.speedups, compat.cuda_graphs, compat.fixes, compat.moved, compat.diagnostics)
    for kind in kinds:  # each kind's module lists exactly the shims it applies
        marked = set(re.findall(r'\bmark\(\s*"([\w-]+)"', Path(kind.__file__).read_text()))
        assert marked == set(kind.SHIMS), kind.__name__
    assert set(compat.SHIMS) == {name for kind in kinds for name in kind.SHIMS}
    assert all(shim.where and shim.upstream and shim.remove_when for shim in compat.SHIMS.values())
    with pytest.raises(ValueError, match="no optional worker shims named"):
        compat.install_worker_hooks(skip=frozenset({"compiled-ropes"}))
    with pytest.raises(ValueError, match="no optional worker shims named"):
        compat.install_worker_hooks(skip=frozenset({"peft-te-guards"}))  # LoRA cannot build without it
    assert set(compat.OPTIONAL_WORKER_SHIMS) <= set(compat.SHIMS)


def test_an_optional_worker_shim_is_left_out_when_skipped():
    def optimizer_kernels_applied(skip: str) -> str:
        return run_python(
            f"from nemo_finetune import compat; compat.install_worker_hooks(skip=frozenset({skip}))\n"
            "from megatron.core import optimizer\n"
            "print(getattr(optimizer._get_megatron_optimizer_based_on_param_groups, '_nemo_compat', False))"
        )

    assert optimizer_kernels_applied("") == "True"
    assert optimizer_kernels_applied("['torch-optimizer-kernels']") == "False"
    # The launched workers take the same request from their environment
    load = (
        "from megatron.core import optimizer; from megatron.core.dist_checkpointing.strategies import async_utils\n"
        "print(hasattr(async_utils.TemporalAsyncCaller.schedule_async_call, '_nemo_compat'))"
    )
    worker = {"PYTHONPATH": f"{REPO / 'nemo_finetune' / 'startup'}:{REPO}", compat.WORKER_ENV_FLAG: "1"}
    skip = {**worker, compat.WORKER_SKIP_ENV: " torch-optimizer-kernels,async-save-staged-buffers "}
    out = subprocess.run(
        [sys.executable, "-c", load], capture_output=True, text=True, cwd=REPO, env={**os.environ, **skip}
    )
    assert out.stdout.strip() == "False" and "compat: compiled-rope (" in out.stderr, out.stderr[-2000:]
    assert "torch-optimizer-kernels" not in out.stderr and "async-save-staged-buffers" not in out.stderr
    assert compat.skipped_in_workers({}) == frozenset()
    # A worker that cannot be prepared stops, naming why, instead of training without its shims
    bad = {**worker, compat.WORKER_SKIP_ENV: "peft-te-guards"}
    out = subprocess.run(
        [sys.executable, "-c", "print('trained')"], capture_output=True, text=True, cwd=REPO, env={**os.environ, **bad}
    )
    assert (out.returncode, out.stdout) == (1, "")
    assert (
        "error: could not prepare this training worker's shims (nemo_finetune.compat): PEFT_MEGATRON_WORKER_SKIP="
        in out.stderr
    )
    with pytest.raises(ValueError, match="names \\['peft-te-guards'\\], which the training workers cannot leave out"):
        compat.skipped_in_workers({compat.WORKER_SKIP_ENV: "peft-te-guards"})


SEEDED_DRAWS = (
    "import random, types\nimport numpy as np, torch\n"
    "from lightning.pytorch.plugins.environments import LightningEnvironment\n"
    "from megatron.core.model_parallel_config import ModelParallelConfig\n"
    "from nemo.lightning.pytorch.strategies.utils import setup_parallel_ranks\n"
    "setup_parallel_ranks(types.SimpleNamespace(cluster_environment=LightningEnvironment(), "
    "parallelism=ModelParallelConfig()))\n"
    "print(torch.rand(2).tolist(), random.random(), float(np.random.rand()))"
)


def draws_after_seeding(seed: int) -> str:
    import random

    import numpy as np

    torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
    return f"{torch.rand(2).tolist()} {random.random()} {float(np.random.rand())}"


@pytest.mark.parametrize("flag", ["1", compat.CHECKPOINT_ONLY])
def test_the_workers_seed_megatrons_generators_with_the_runs_seed(flag):
    """NeMo's strategy sets the generators up (the adapters' initialisation, dropout) with 1234 whatever the run's
    --seed; in the workers, with or without TE, it is the run's."""
    environment = compat.worker_environment(compat.Environment(has_te=flag != "1", has_cuda=True), seed=77)
    assert environment == {compat.WORKER_ENV_FLAG: flag, compat.SEED_ENV: "77"}
    worker = {"PYTHONPATH": f"{REPO / 'nemo_finetune' / 'startup'}:{REPO}", **environment}
    assert run_python(SEEDED_DRAWS, worker) == draws_after_seeding(77)
    assert run_python(SEEDED_DRAWS, {"PYTHONPATH": str(REPO)}) == draws_after_seeding(1234)  # NeMo's own


def test_with_te_and_cuda_the_workers_get_only_the_checkpoint_fix():
    te = compat.Environment(has_te=True, has_cuda=True)
    assert compat.worker_flag(te) == compat.CHECKPOINT_ONLY
    assert compat.worker_flag(compat.Environment(has_te=False, has_cuda=True)) == "1"
    probe = (
        "import sys\nfrom nemo_finetune import compat\n"
        "from megatron.core.dist_checkpointing.strategies import async_utils\n"
        "print(sorted(compat.applied()), 'stub' in (sys.modules['megatron.core.inference.unified_memory'].__doc__"
        " or ''))"
    )
    worker = {
        "PYTHONPATH": f"{REPO / 'nemo_finetune' / 'startup'}:{REPO}",
        compat.WORKER_ENV_FLAG: compat.CHECKPOINT_ONLY,
    }
    assert run_python(probe, worker) == "['async-save-staged-buffers'] False"


def test_shims_applied_in_a_scope_are_taken_back_after_it():
    from megatron.core.transformer.transformer_config import TransformerConfig
    from nemo.collections.llm.peft import lora, utils

    before = (TransformerConfig.__post_init__, lora.te, utils.HAVE_TE, lora.LoRALinear.forward)
    applied_before = compat.applied() - {"unified-memory-stub"}  # the stub stays once made (compat.undo)
    with compat.scoped():
        compat.prepare_process(compat.Environment(has_te=False, has_cuda=False))
        compat.speedups.fuse_lora_output()
        assert TransformerConfig.__post_init__._nemo_compat and lora.LoRALinear.forward._nemo_compat
        assert {"no-te-fusion-defaults", "fused-lora-output"} <= compat.applied()
    assert (TransformerConfig.__post_init__, lora.te, utils.HAVE_TE, lora.LoRALinear.forward) == before
    assert compat.applied() - {"unified-memory-stub"} == applied_before


def test_foreach_kernels_keep_the_multi_tensor_contracts_megatron_calls():
    from megatron.core.utils import local_multi_tensor_applier, local_multi_tensor_scale

    torch.manual_seed(0)
    grads = [torch.randn(7, 5), torch.randn(130), torch.randn(3, 3, 3)]
    norm, per_tensor = local_multi_tensor_applier(compat.speedups.foreach_l2_norm, None, [grads], False)
    assert per_tensor is None and norm.shape == (1,) and norm.dtype == torch.float32
    assert norm.item() == pytest.approx(torch.cat([g.flatten() for g in grads]).norm().item(), rel=1e-6)
    for scale in (1.0, 0.25):
        main = [g.clone() for g in grads]
        ours, megatrons = ([torch.empty_like(g, dtype=torch.bfloat16) for g in grads] for _ in range(2))
        local_multi_tensor_applier(compat.speedups.foreach_scale, None, [main, ours], scale)
        local_multi_tensor_applier(local_multi_tensor_scale, None, [main, megatrons], scale)
        assert all(torch.equal(a, b) for a, b in zip(ours, megatrons, strict=True))


def test_torch_optimizer_kernels_replace_what_megatron_looks_up_and_go_back(shims_in_scope):
    from megatron.core import optimizer as package
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mixed_precision

    assert package.USING_PYTORCH_OPTIMIZER  # no TE or apex here, as on the GPU machine of docs/gpu-validation.md
    lookups = (package.get_megatron_optimizer.__globals__, clip_grads.__dict__, mixed_precision.__dict__)
    names = ("_get_megatron_optimizer_based_on_param_groups", "l2_norm_impl", "multi_tensor_scale_impl")
    before = [namespace[name] for namespace, name in zip(lookups, names, strict=True)]
    with compat.scoped():
        compat.speedups.use_torch_optimizer_kernels()
        compat.speedups.use_torch_optimizer_kernels()  # idempotent
        builder, norm, scale = (namespace[name] for namespace, name in zip(lookups, names, strict=True))
        assert builder._nemo_compat and builder.__wrapped__ is before[0]  # what get_megatron_optimizer calls
        assert (norm, scale, clip_grads.multi_tensor_scale_impl) == (
            compat.speedups.foreach_l2_norm,
            compat.speedups.foreach_scale,
            compat.speedups.foreach_scale,
        )
        assert "torch-optimizer-kernels" in compat.applied()
    assert [namespace[name] for namespace, name in zip(lookups, names, strict=True)] == before


def test_fused_adam_is_switched_on_only_while_the_state_is_empty():
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    fresh, stepped = (torch.optim.AdamW(params, lr=1e-2) for _ in range(2))
    for p in params:
        p.grad = torch.ones_like(p)
    stepped.step()
    compat.speedups._fuse_adam(fresh)
    compat.speedups._fuse_adam(stepped)
    compat.speedups._fuse_adam(torch.optim.SGD(params, lr=1e-2))
    compat.speedups._fuse_adam(None)  # a rank without trainable parameters
    assert all(g["fused"] and not g["foreach"] for g in fresh.param_groups)
    assert not any(g["fused"] for g in stepped.param_groups)


def test_torch_wgrad_accumulation_adds_each_weight_gradient_into_main_grad(model_parallel, shims_in_scope):
    """Megatron's linear layers with gradient_accumulation_fusion (refused without apex until the shim) add each
    micro-batch's weight gradient into the main_grad buffer DDP reduces and hand autograd a placeholder that DDP's
    hook then skips: after two micro-batches main_grad holds the sum the unfused layer's .grad holds."""
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, layers

    def linear(fused: bool):
        config = ModelParallelConfig(gradient_accumulation_fusion=fused, use_cpu_initialization=True)
        torch.manual_seed(0)
        return ColumnParallelLinear(16, 24, config=config, init_method=torch.nn.init.normal_, bias=False)

    with pytest.raises(RuntimeError, match="fused_weight_gradient_mlp_cuda"):
        linear(fused=True)
    with compat.scoped():
        compat.speedups.accumulate_wgrad_with_torch()
        compat.speedups.accumulate_wgrad_with_torch()  # idempotent
        assert "torch-wgrad-accumulation" in compat.applied() and compat.speedups.wgrad_accumulation_available()
        fused, unfused = linear(fused=True), linear(fused=False)
        assert torch.equal(fused.weight, unfused.weight)
        start = torch.randn(24, 16)  # what earlier micro-batches left there
        fused.weight.main_grad, fused.weight.grad_added_to_main_grad = start.clone(), False  # as Megatron's DDP sets
        for micro_batch in range(2):
            x = torch.randn(5, 2, 16, generator=torch.Generator().manual_seed(micro_batch))
            for layer in (fused, unfused):
                output, _ = layer(x)
                output.square().sum().backward()
        assert fused.weight.grad_added_to_main_grad  # DDP's hook adds nothing more
        assert torch.allclose(fused.weight.main_grad - start, unfused.weight.grad, rtol=1e-5, atol=1e-4)
        assert unfused.weight.grad.abs().sum() > 0
    assert not layers._grad_accum_fusion_available and not compat.speedups.wgrad_accumulation_available()
    no_te = compat.Environment(has_te=False, has_cuda=True)
    assert compat.model_config_overrides(no_te, training=True)["gradient_accumulation_fusion"]
    skipped = frozenset({"torch-wgrad-accumulation"})
    assert not compat.model_config_overrides(no_te, training=True, skip=skipped)["gradient_accumulation_fusion"]
    assert not compat.model_config_overrides(no_te)["gradient_accumulation_fusion"]  # inference: no backward


@pytest.mark.gpu
def test_torch_wgrad_gemm_accumulates_bf16_weight_gradients_in_fp32_on_the_gpu():
    """The CUDA branch (torch's addmm with an fp32 output): in place, and closer to the exact fp32 sum than a bf16
    gradient added afterwards (what Megatron's DDP hook does without the fusion)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    x, grad_output = (torch.randn(4096, n, device="cuda", generator=generator).bfloat16() for n in (512, 256))
    main_grad = torch.randn(256, 512, device="cuda", generator=generator)
    start, address = main_grad.clone(), main_grad.data_ptr()
    compat.speedups.wgrad_gemm_accumulate(x, grad_output, main_grad)
    exact = start + grad_output.double().t().matmul(x.double()).float()
    unfused = start + grad_output.t().matmul(x).float()  # the bf16 .grad, then DDP's add
    assert main_grad.data_ptr() == address and main_grad.dtype == torch.float32
    assert (main_grad - exact).abs().max() < 1e-3 < (unfused - exact).abs().max()
    bf16_main_grad = start.bfloat16()
    compat.speedups.wgrad_gemm_accumulate(x, grad_output, bf16_main_grad)  # wgrad_gemm_accum_fp16's contract
    assert torch.allclose(bf16_main_grad.float(), exact, rtol=2e-2, atol=0.5)


@pytest.mark.gpu
def test_megatron_optimizer_with_torch_kernels_steps_clips_and_resumes_like_megatrons(module_model_parallel):
    """Megatron's mixed-precision optimizer (bf16 weights, fp32 master weights, clipping) as NeMo builds it without
    TE: with torch's fused AdamW and foreach kernels it takes the same steps, and its state dict resumes it."""
    from megatron.core import optimizer as package
    from megatron.core.optimizer import OptimizerConfig

    def build(params):
        config = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, clip_grad=0.5, bf16=True)
        group = {"params": params, "wd_mult": 1.0, "lr_mult": 1.0, "is_expert_parallel": False}
        group |= {"is_decoupled_lr": False, "default_config": True, "max_lr": 1e-2, "min_lr": 0.0}
        return package._get_megatron_optimizer_based_on_param_groups(config, model_chunks=[], param_groups=[group])

    def train(steps: int, shim: bool, resume_from=None):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=torch.bfloat16)) for s in SHAPES]
        grads = torch.Generator(device="cuda").manual_seed(1)
        with compat.scoped():
            if shim:
                compat.speedups.use_torch_optimizer_kernels()
            optimizer = build(params)
            if resume_from is not None:
                optimizer.load_state_dict(resume_from["state"])
                for p, saved in zip(params, resume_from["params"], strict=True):
                    p.data.copy_(saved)
                for _, shape in itertools.product(range(resume_from["steps"]), SHAPES):  # the steps already taken
                    torch.randn(shape, device="cuda", generator=grads)
            norms = []
            for _ in range(steps):
                for p in params:
                    p.main_grad = torch.randn(p.shape, device="cuda", generator=grads)
                norms.append(optimizer.step()[1])
        fused = [g.get("fused") for g in optimizer.optimizer.param_groups]
        masters = [p.detach().clone() for p in optimizer.fp32_from_float16_groups[0]]
        params = [p.detach().clone() for p in params]
        return {"params": params, "masters": masters, "norms": norms, "fused": fused, "opt": optimizer}

    megatrons, ours = train(4, shim=False), train(4, shim=True)
    assert megatrons["fused"] == [None] and ours["fused"] == [True]
    assert ours["norms"] == pytest.approx(megatrons["norms"], rel=1e-5) and max(ours["norms"]) > 0.5  # clipped
    for a, b in zip(ours["masters"], megatrons["masters"], strict=True):  # fp32: torch's kernels round alike
        assert a.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()
    first = train(2, shim=True)
    saved = {"state": first["opt"].state_dict(), "params": first["params"], "steps": 2}
    resumed = train(2, shim=True, resume_from=saved)
    assert resumed["fused"] == [True] and resumed["norms"] == pytest.approx(ours["norms"][2:], rel=1e-5)
    for a, b in zip(resumed["params"] + resumed["masters"], ours["params"] + ours["masters"], strict=True):
        assert torch.equal(a, b)


def test_liger_rmsnorm_trial_builds_every_norm_of_a_local_spec_gpt_with_the_same_state(model_parallel, shims_in_scope):
    """On trial, the training workers' norms come from Liger-Kernel: every RMSNorm of Megatron's local spec (input,
    pre-MLP, Qwen3's q/k, final) is a LigerRMSNorm with torch.nn.RMSNorm's parameters and state-dict keys, and on
    CPU it computes what torch's does; a LayerNorm model keeps torch's norm, and scoped() puts Megatron's back."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig

    from conftest import tiny_gpt

    def norms(model) -> dict:
        names = ("input_layernorm", "q_layernorm", "k_layernorm", "pre_mlp_layernorm", "final_layernorm")
        return {name: type(module) for name, module in model.named_modules() if name.endswith(names)}

    torch_model = tiny_gpt("cpu", torch.float32)
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(16)[None].expand(2, -1)
    with compat.scoped():
        compat.speedups.fuse_rmsnorm_with_liger()
        compat.speedups.fuse_rmsnorm_with_liger()  # idempotent
        assert "liger-rmsnorm" in compat.applied()
        liger_model = tiny_gpt("cpu", torch.float32)
        layer_norm = WrappedTorchNorm(TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1), 8)
    fused = compat.speedups.liger_rmsnorm_class()
    assert set(norms(liger_model).values()) == {fused} and issubclass(fused, torch.nn.RMSNorm)
    assert len(norms(liger_model)) == 9  # 4 in each of 2 layers + the final norm
    assert type(layer_norm) is torch.nn.LayerNorm
    assert liger_model.state_dict().keys() == torch_model.state_dict().keys()
    with torch.no_grad():  # scales unlike the initial ones, loaded into both
        for name in norms(torch_model):
            module = torch_model.get_submodule(name)
            module.weight.copy_(torch.linspace(0.5, 1.5, module.weight.numel()))
    liger_model.load_state_dict(torch_model.state_dict())
    assert torch.equal(liger_model(tokens, positions, None), torch_model(tokens, positions, None))
    assert "liger-rmsnorm" not in compat.applied()
    assert set(norms(tiny_gpt("cpu", torch.float32)).values()) == {torch.nn.RMSNorm}


def test_trial_worker_shims_are_applied_only_where_asked_for():
    probe = (
        "from nemo_finetune import compat; compat.install_worker_hooks(trial=frozenset({trial}))\n"
        "from megatron.core.transformer.torch_norm import WrappedTorchNorm\n"
        "from megatron.core.transformer.transformer_config import TransformerConfig\n"
        "config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, normalization='RMSNorm')\n"
        "print(type(WrappedTorchNorm(config, 8)).__name__, sorted(compat.applied() & {{'liger-rmsnorm'}}))"
    )
    assert run_python(probe.format(trial="")) == "RMSNorm []"
    assert run_python(probe.format(trial="['liger-rmsnorm']")) == "LigerRMSNorm ['liger-rmsnorm']"
    assert set(compat.TRIAL_WORKER_SHIMS) <= set(compat.SHIMS)
    assert not set(compat.TRIAL_WORKER_SHIMS) & set(compat.OPTIONAL_WORKER_SHIMS)
    with pytest.raises(ValueError, match="no trial worker shims named \\['compiled-rope'\\]"):
        compat.install_worker_hooks(trial=frozenset({"compiled-rope"}))
    # A launched worker applies those its environment names
    probe = (
        "from megatron.core.models.common.embeddings import language_model_embedding as m\n"
        "print(hasattr(m.LanguageModelEmbedding.forward, '_token_id_check'))"
    )
    worker = {"PYTHONPATH": f"{REPO / 'nemo_finetune' / 'startup'}:{REPO}", compat.WORKER_ENV_FLAG: "1"}
    for trial, applied in ("", "False"), ("token-id-check", "True"):
        environ = {**os.environ, **worker, compat.WORKER_TRIAL_ENV: trial}
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=environ)
        assert out.stdout.strip() == applied, out.stderr[-2000:]


def test_token_id_check_stops_the_next_lookup_naming_the_ids_and_the_data_loaders_row(
    model_parallel, shims_in_scope, monkeypatch
):
    """A GPT's embedding lookup with an id outside the vocabulary (97 here) goes on with id 0 there, and the next
    lookup stops, naming the id, the GPU's row and the row of the data loader's batch it matches. torch's pinning
    needs CUDA: the pin thread's function is replaced by one that returns the batch as it is."""
    import importlib

    from conftest import tiny_gpt
    from nemo_finetune.compat import diagnostics

    pinning = importlib.import_module(diagnostics.PIN_MEMORY_MODULE)
    monkeypatch.setattr(pinning, "pin_memory", lambda data, device=None: data)
    compat.install_worker_hooks(trial=frozenset({"token-id-check"}))
    model = tiny_gpt("cpu", torch.float32).train()
    assert "token-id-check" in compat.applied()
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(16)[None].expand(2, -1)
    for batch in (tokens + 1) % 97, tokens:
        pinning.pin_memory({"tokens": batch, "labels": batch}, None)  # as the data loader's pin thread does
    expected = model(tokens, positions, attention_mask=None)

    changed = tokens.clone()
    changed[1, 5] = 97  # one past the vocabulary
    zeroed = tokens.clone()
    zeroed[1, 5] = 0
    with torch.no_grad():
        with_zero = model(zeroed, positions, attention_mask=None)
        assert torch.equal(model(changed, positions, attention_mask=None), with_zero)  # lookup 3: goes on
    with pytest.raises(RuntimeError) as stopped:
        model(tokens, positions, attention_mask=None)
    assert str(stopped.value) == (
        "token-id-check: embedding lookup 3 (training) got 1 of 32 token ids outside the vocabulary of 97: "
        f"[1, 5] = 97. The GPU's row 1: {changed[1].tolist()}. The data loader made this batch (number 1 counting "
        f"back from its newest) with row 1 = {tokens[1].tolist()}: 31 of 32 ids the same, id {int(tokens[1, 5])} at "
        "[1, 5]; the ids changed between the data loader and the embedding."
    )
    assert torch.equal(model(tokens, positions, attention_mask=None), expected)  # reported once; the check goes on
    unknown = {compat.WORKER_TRIAL_ENV: "token-id-check, liger-norm"}
    with pytest.raises(ValueError, match="names \\['liger-norm'\\], which are no trial shims of the training"):
        compat.trials_in_workers(unknown)


def test_token_id_check_says_whether_the_data_loader_made_the_ids_outside_or_had_no_such_batch():
    from nemo_finetune.compat.diagnostics import TokenIdCheck

    check = TokenIdCheck()
    ids = torch.tensor([[3, 4, 5], [6, -1, 8]])
    assert torch.equal(check.before_lookup(ids, 9, training=False), torch.tensor([[3, 4, 5], [6, 0, 8]]))
    with pytest.raises(
        RuntimeError,
        match="lookup 1 \\(validation\\) got 1 of 6 token ids outside the vocabulary of "
        "9: \\[1, 1\\] = -1\\. .*No batch of the data loader's last 0 has this shape and rows\\.",
    ):
        check.before_lookup(ids.clamp(min=0), 9, training=False)
    check.keep(torch.tensor([[1, 4, 5], [6, 9, 8]]))  # the data loader's own batch has an id outside
    check.keep(torch.tensor([[1, 2], [3, 4], [5, 6]]))  # another shape
    check.before_lookup(torch.tensor([[3, 4, 5], [6, 9, 8]]), 9, training=True)
    with pytest.raises(
        RuntimeError,
        match="\\(number 2 counting back from its newest\\) with row 1 = \\[6, 9, 8\\]: 5 of "
        "6 ids the same, id 9 at \\[1, 1\\]; the data loader made the ids outside the vocabulary\\.$",
    ):
        check.report()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal a worker without CUDA gives")
def test_a_cuda_graphs_worker_without_cuda_stops_with_the_fix():
    probe = (
        "from nemo_finetune import compat\n"
        "compat.install_worker_hooks(cuda_graphs=True)\n"
        "import megatron.core.tensor_parallel.random"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300)
    stderr = out.stderr
    assert out.returncode == 1 and "RuntimeError: --cuda_graphs needs a CUDA GPU and a CUDA build of torch" in stderr
    assert "drop --cuda_graphs" in stderr
    assert "graph-safe-rng" in compat.SHIMS


def test_cuda_graphs_workers_graph_the_layers_they_build_and_checkpoints_load_without(tmp_path, model_parallel):
    """--cuda_graphs: the workers turn Megatron's local CUDA graphs on as NeMo builds the model (Megatron's
    CudaGraphManager, made for each layer, refuses this CPU process's RNG tracker: the layers were being graphed),
    while the context NeMo writes into each checkpoint keeps cuda_graph_impl at "none", so exports and generation
    build the model without graphs; outside the workers nothing changes."""
    from nemo.collections import llm
    from nemo.collections.llm.gpt.model.qwen3 import Qwen3Config600M
    from nemo.lightning.io import load_context

    shape = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2)
    shape.update(use_cpu_initialization=True)  # no CUDA RNG tracker here
    config = Qwen3Config600M(**shape, vocab_size=128, seq_length=64)
    model = llm.GPTModel(config)  # checkpoints take their context from here
    with compat.scoped():
        compat.cuda_graphs.graph_layers_as_the_model_is_built()
        with pytest.raises(AssertionError, match="RNG tracker does not support cudagraphs"):
            config.configure_model(tokenizer=None)
        assert config.cuda_graph_impl == "local" and "local-cuda-graphs" in compat.applied()
        recomputing = Qwen3Config600M(**shape, vocab_size=128, recompute_granularity="selective")
        with pytest.raises(ValueError, match="sets recompute_granularity, which Megatron's CUDA graphs do not support"):
            recomputing.configure_model(tokenizer=None)
    model.io_dump(tmp_path, yaml_attrs=[])
    saved = load_context(tmp_path, subpath="config")
    assert type(saved) is Qwen3Config600M and saved.seq_length == 64 and saved.cuda_graph_impl == "none"
    built = Qwen3Config600M(**shape, vocab_size=128).configure_model(tokenizer=None)
    assert built.config.cuda_graph_impl == "none" and "local-cuda-graphs" not in compat.applied()


@pytest.mark.gpu
def test_liger_rmsnorm_gives_torchs_norm_and_gradients_in_bf16_on_the_gpu():
    """The CUDA path (Liger-Kernel's Triton kernels) against torch.nn.RMSNorm on the shapes of the Qwen3 step: the
    hidden-size norms (4,096 rows of 2,048) and the q/k norms (65,536 rows of 128, a strided view of the fused QKV
    output); the incoming gradient is left as it was."""
    fused = compat.speedups.liger_rmsnorm_class()
    generator = torch.Generator(device="cuda").manual_seed(0)
    for shape, width in (((4096, 1, 2048), 2048), ((4096, 1, 16, 3 * 128), 128)):
        base = torch.randn(shape, device="cuda", generator=generator).bfloat16()
        weight = torch.rand(width, device="cuda", generator=generator) + 0.5
        grad = torch.randn((*shape[:-1], width), device="cuda", generator=generator).bfloat16()
        results = []
        for cls in (torch.nn.RMSNorm, fused):
            norm = cls(width, eps=1e-6).cuda().bfloat16()
            with torch.no_grad():
                norm.weight.copy_(weight)
            leaf = base.clone().requires_grad_()
            x = leaf[..., :width]  # q/k: a non-contiguous slice of the QKV output
            given = grad.clone()
            out = norm(x)
            out.backward(given)
            assert torch.equal(given, grad)  # not overwritten in place
            results.append((out, leaf.grad[..., :width], norm.weight.grad))
        (want_y, want_dx, want_dw), (y, dx, dw) = results
        assert y.dtype == dx.dtype == dw.dtype == torch.bfloat16
        assert torch.allclose(y.float(), want_y.float(), rtol=1e-2, atol=1e-2), (y - want_y).abs().max()
        assert torch.allclose(dx.float(), want_dx.float(), rtol=2e-2, atol=2e-2), (dx - want_dx).abs().max()
        scale = want_dw.float().abs().max()
        assert (dw.float() - want_dw.float()).abs().max() < 1e-2 * scale, ((dw - want_dw).abs().max(), scale)


SHAPES = [(64, 32), (32,), (3, 5, 7)]


def _write_sum(path, staged):
    """The forked writer of the test below: what it reads from the staged tensors, once the trainer has moved on."""
    import time

    time.sleep(1.0)
    path.write_text(str(float(sum(t.sum() for t in staged))))


def test_async_save_holds_its_staged_copies_until_the_writer_is_joined(module_model_parallel, monkeypatch, tmp_path):
    import gc
    import weakref

    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest, TemporalAsyncCaller

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)  # after the D2H copies; no CUDA here
    staged = []

    def stage():
        copy = torch.full((4, 4), 2.0)  # stands for the pinned host copy of a GPU tensor
        staged.append(weakref.ref(copy))
        return [copy]

    def save(with_fix: bool) -> tuple[bool, bool, str]:
        """(staged copy alive while the writer runs, alive after the join, what the writer wrote)"""
        out = tmp_path / f"written_{with_fix}"
        with compat.scoped():
            if with_fix:
                compat.fixes.hold_async_save_buffers()
            caller = TemporalAsyncCaller()
            caller.schedule_async_call(AsyncRequest(_write_sum, (out, None), [], preload_fn=stage))
            gc.collect()
            while_writing = staged[-1]() is not None
            caller.is_current_async_call_done(blocking=True, no_dist=True)
            gc.collect()
            return while_writing, staged[-1]() is not None, out.read_text()

    # Megatron-Core 0.15.3 drops the pinned copies while its writer still reads them (torch may reuse them); the
    # fix holds them for exactly the writer's lifetime.
    assert save(with_fix=False) == (False, False, "32.0")
    assert save(with_fix=True) == (True, False, "32.0")
    assert "async-save-staged-buffers" not in compat.applied()


def test_checkpoints_of_earlier_versions_find_the_moved_kernels_under_their_old_names():
    probe = (
        "import importlib, json, sys\n"
        "from nemo_finetune import compat\n"
        "compat.prepare_process()\n"
        "from nemo_finetune.kernels import sdpa_attention\n"
        "assert 'moved-modules' not in compat.applied()\n"  # nothing to say until an old name is imported
        "old = importlib.import_module('sdpa_attention')\n"  # what a context saved before the move names
        "print(json.dumps({'same': old is sdpa_attention, 'spec': old.layer_spec is sdpa_attention.layer_spec,"
        " 'applied': 'moved-modules' in compat.applied()}))"
    )
    assert json.loads(run_python(probe)) == {"same": True, "spec": True, "applied": True}


def validation_loss_as_lightning_logs_it(losses: list[float], rows: int, fix: bool) -> float:
    """val_loss after one validation of len(losses) batches of `rows` rows, in a real Lightning Trainer whose strategy
    logs each batch's loss as NeMo's MegatronStrategy.validation_step does (one pipeline stage), its step taking the
    dataloader's iterator as NeMo's does; `fix`: that step wrapped by the val-loss-batch-weights shim."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import SingleDeviceStrategy
    from torch.utils.data import DataLoader

    class LogsLikeMegatronStrategy(SingleDeviceStrategy):
        def validation_step(self, dataloader_iter, *args, **kwargs):
            batch, _, _ = next(dataloader_iter)
            out = batch["loss"]
            self.lightning_module.log("val_loss", out, prog_bar=True, on_epoch=True)  # NeMo 2.7.3's call
            return out

    if fix:
        LogsLikeMegatronStrategy.validation_step = compat.fixes.equal_batch_weights(
            LogsLikeMegatronStrategy.validation_step
        )

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch):
            return (self.weight**2).sum()

        def validation_step(self, dataloader_iter):  # never called: the strategy's step runs
            raise AssertionError

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    batches = [{"tokens": torch.zeros(rows, 16), "loss": torch.tensor(loss)} for loss in losses]
    trainer = pl.Trainer(
        strategy=LogsLikeMegatronStrategy(device=torch.device("cpu")),
        max_steps=1,
        val_check_interval=1,
        limit_val_batches=len(losses),
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Model(), DataLoader(batches, batch_size=None), DataLoader(batches, batch_size=None))
    return float(trainer.callback_metrics["val_loss"])


def test_val_loss_is_the_plain_mean_of_its_validation_batches():
    """Lightning weighs a logged value by a batch size it infers from the batch fetched before the step: none for the
    first validation batch (1), the micro-batch size for the others. The shim counts each batch once."""
    losses, rows = [4.0, 1.0, 1.0, 1.0], 8
    assert validation_loss_as_lightning_logs_it(losses, rows, fix=False) == pytest.approx((4 + 8 * 3) / (1 + 8 * 3))
    assert validation_loss_as_lightning_logs_it(losses, rows, fix=True) == pytest.approx(sum(losses) / len(losses))
    assert validation_loss_as_lightning_logs_it(losses, 1, fix=False) == pytest.approx(1.75)  # micro-batch 1: no bias


def test_the_val_loss_fix_wraps_nemos_strategy_in_every_training_worker(shims_in_scope):
    from nemo.lightning.pytorch.strategies.megatron_strategy import MegatronStrategy

    nemos = MegatronStrategy.validation_step
    compat.fixes.weigh_validation_batches_equally()
    compat.fixes.weigh_validation_batches_equally()  # idempotent
    assert MegatronStrategy.validation_step.__wrapped__ is nemos and "val-loss-batch-weights" in compat.applied()
    compat.undo("val-loss-batch-weights")
    assert MegatronStrategy.validation_step is nemos
    probe = (
        "from nemo_finetune import compat\n"
        "from nemo.lightning.pytorch.strategies.megatron_strategy import MegatronStrategy\n"
        "print(getattr(MegatronStrategy.validation_step, '_nemo_compat', False),"
        " 'val-loss-batch-weights' in compat.applied())"
    )
    for flag in ("1", compat.CHECKPOINT_ONLY):  # without TE, and with TE and CUDA
        worker = {"PYTHONPATH": f"{REPO / 'nemo_finetune' / 'startup'}:{REPO}", compat.WORKER_ENV_FLAG: flag}
        assert run_python(probe, worker) == "True True"
    assert run_python(probe, {"PYTHONPATH": str(REPO)}) == "False False"  # the scripts validate nothing
