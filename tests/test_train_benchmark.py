"""benchmarks/train_throughput.py on CPU: the recipe it times is peft_megatron's (with the SDPA attention and the
variant's overrides), its synthetic batches are what the model expects, and its FLOP count is NeMo's."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

pytest.importorskip("nemo")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import train_throughput as bench  # noqa: E402


def test_lora_flops_are_two_thirds_of_nemos_training_formula():
    from nemo.utils import flops_formulas

    lora, full = bench.CASES["qwen3_8b_lora"], bench.CASES["qwen3_1p7b_full"]
    per_token = bench.model_flops_per_token(lora)
    nemo = flops_formulas.qwen3(
        flops_formulas.FLOPSConfig(
            gbs=1,
            enc_seq_len=4096,
            hs=4096,
            layers=36,
            ffn_hs=12288,
            attention_heads=32,
            query_groups=8,
            kv_channels=128,
            vocab_size=151936,
        )
    )
    assert per_token == pytest.approx(nemo / 4096 * 2 / 3)
    assert 32e9 < per_token < 33e9  # ~6 x 8.2B params x 2/3, plus causal attention at 4096
    assert bench.model_flops_per_token(full) > 6 * 1.7e9


@pytest.fixture(autouse=True)
def tiny_cases(monkeypatch):
    monkeypatch.setitem(
        bench.CASES, "tiny", bench.Case(recipe="qwen3_600m", shape="qwen3_8b", peft=True, seq_length=32)
    )
    monkeypatch.setitem(
        bench.CASES,
        "tiny_varlen",
        bench.Case(recipe="qwen3_600m", shape="qwen3_8b", peft=True, seq_length=2048, variable_lengths=True),
    )


def test_synthetic_batches_are_learnable_and_causal():
    module = bench.make_synthetic_data_module("tiny", micro_batch_size=2, global_batch_size=2)
    module.setup()
    sample = module._train_ds[5]
    assert sample["tokens"].shape == sample["labels"].shape == (32,)
    assert (sample["labels"][:-1] == sample["tokens"][1:]).all()
    steps = (sample["labels"] - sample["tokens"]) % bench.CYCLE
    assert (steps == 1).all()  # every next token is the current one plus one, around the cycle
    assert ((sample["tokens"] >= bench.FIRST_TOKEN) & (sample["tokens"] < bench.FIRST_TOKEN + bench.CYCLE)).all()
    assert sample["attention_mask"].shape == (1, 32, 32) and sample["attention_mask"][0, 0, 1]
    assert not sample["attention_mask"][0, 1, 0]  # Megatron's polarity: True = masked out (the future)
    assert not (module._train_ds[5]["tokens"] != sample["tokens"]).any()
    assert (module._train_ds[6]["tokens"] != sample["tokens"]).any()


@pytest.mark.parametrize(
    "variant", ["default", "unfused_recompute", "native_ce", "cuda_graphs", "megatron_wgrad", "liger_norm"]
)
def test_the_timed_recipe_is_peft_megatrons_with_only_the_benchmark_changes(variant):
    from nemo_finetune import compat
    from nemo_finetune.kernels import sdpa_attention

    env = compat.Environment(has_te=False, has_cuda=True)
    recipe, config = bench.benchmark_recipe(
        "qwen3_8b_lora", bench.CASES["qwen3_8b_lora"], bench.VARIANTS[variant], 15, env, []
    )
    model = recipe.model.config
    assert model.seq_length == 4096 and model.num_layers == 36 and model.hidden_size == 4096
    assert recipe.peft.dim == 16 and recipe.peft.alpha == 32 and recipe.optim.config.lr == 1e-4
    assert recipe.resume is None and recipe.optim.lr_scheduler is None and recipe.trainer.max_steps == 15
    assert recipe.data.case_name == "qwen3_8b_lora" and recipe.data.micro_batch_size == 1 and not recipe.data.packed
    assert model.gradient_accumulation_fusion == (variant != "megatron_wgrad")  # torch's GEMM accumulates
    if variant in ("default", "megatron_wgrad", "liger_norm"):  # megatron_wgrad: the fusion above; liger_norm: a shim
        assert model.transformer_layer_spec is sdpa_attention.layer_spec
        assert model.bias_activation_fusion and model.bias_dropout_fusion and not model.cross_entropy_loss_fusion
    elif variant == "native_ce":
        assert model.cross_entropy_loss_fusion and model.cross_entropy_fusion_impl == "native"
    elif variant == "cuda_graphs":  # Megatron refuses CUDA graphs with recompute; the default recomputes nothing
        assert model.transformer_layer_spec is sdpa_attention.layer_spec
        assert model.cuda_graph_impl == "local" and model.recompute_granularity is None
    else:
        assert model.transformer_layer_spec is not sdpa_attention.layer_spec
        assert model.recompute_granularity == "selective" and not model.bias_activation_fusion
    assert not model.apply_rope_fusion and not model.masked_softmax_fusion  # TE-only: always off without TE


@pytest.mark.gpu
def test_the_cuda_graph_variant_gives_megatron_the_rng_tracker_its_graphed_layers_need(
    module_model_parallel, monkeypatch
):
    """Every transformer layer of a cuda_graph_impl="local" model makes a CudaGraphManager, which refuses NeMo's
    default RNG tracker; the variant makes a graph-safe one first (CUDA torch only), and NeMo's setup keeps it."""
    import megatron.core.tensor_parallel.random as megatron_random
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from nemo_finetune import compat

    monkeypatch.setattr(megatron_random, "_CUDA_RNG_STATE_TRACKER", None)  # restored after the test
    monkeypatch.setattr(megatron_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False)
    config = TransformerConfig(
        num_layers=1, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True, cuda_graph_impl="local"
    )
    layer_spec = get_gpt_layer_local_spec().submodules
    megatron_random.initialize_rng_tracker()  # what NeMo's setup makes
    with pytest.raises(AssertionError, match="RNG tracker does not support cudagraphs"):
        TransformerLayer(config, layer_spec)

    compat.cuda_graphs.make_rng_tracker_graph_safe()  # the variant's, and a --cuda_graphs run's workers'
    megatron_random.initialize_rng_tracker(use_te_rng_tracker=False)  # NeMo's setup, after it
    assert megatron_random.get_cuda_rng_tracker().use_cudagraphable_rng
    assert TransformerLayer(config, layer_spec).cudagraph_manager is not None


def test_variants_combine_with_a_plus_and_refuse_what_they_cannot_mean(capsys):
    from nemo_finetune import compat

    both = bench.resolve_variant("cuda_graphs+liger_norm")
    assert both.model == {"cuda_graph_impl": "local"} and both.trial_shims == {"liger-rmsnorm"} and not both.skip_shims
    assert "CUDA graphs" in both.help and "Liger-Kernel" in both.help
    skipping = bench.resolve_variant("megatron_wgrad+eager_rope")
    assert skipping.skip_shims == {"torch-wgrad-accumulation", "compiled-rope"}
    assert skipping.model == {"gradient_accumulation_fusion": False}
    assert bench.resolve_variant("liger_norm") == bench.VARIANTS["liger_norm"]
    for one in bench.VARIANTS.values():  # every shim a variant names is one the workers know
        assert one.skip_shims <= set(compat.OPTIONAL_WORKER_SHIMS)
        assert one.trial_shims <= set(compat.TRIAL_WORKER_SHIMS)
    with pytest.raises(ValueError, match="native_ce sets cross_entropy_loss_fusion=True, another part False"):
        bench.resolve_variant("unfused_recompute+native_ce")
    for wrong in ("default+default", "cuda_graph", "cuda_graphs+"):
        with pytest.raises(ValueError, match="joined by '\\+', each once"):
            bench.resolve_variant(wrong)
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "default", "liger_norm+liger"])
    assert "'liger_norm+liger': give one of" in capsys.readouterr().err
    args = bench.parse_args(["--variants", "default", "cuda_graphs+liger_norm", "--profile", "cuda_graphs+liger_norm"])
    assert args.variants == ["default", "cuda_graphs+liger_norm"]
    env = compat.Environment(has_te=False, has_cuda=True)
    case = bench.CASES["qwen3_1p7b_full"]
    recipe, _ = bench.benchmark_recipe("qwen3_1p7b_full", case, skipping, 15, env, [])
    assert not recipe.model.config.gradient_accumulation_fusion and recipe.model.config.num_layers == 28
    graphed, _ = bench.benchmark_recipe("qwen3_1p7b_full", case, both, 15, env, [])
    assert graphed.model.config.cuda_graph_impl == "local" and graphed.model.config.gradient_accumulation_fusion


def test_a_run_that_did_not_train_is_not_a_result():
    good = {"loss_first3": 11.9, "loss_last3": 11.2, "trainable_tensors": 4, "trainable_tensors_changed": 4}
    assert bench.trained(good, peft=True) and bench.trained(good, peft=False)
    assert not bench.trained({**good, "loss_last3": 11.95}, peft=True)
    assert not bench.trained({**good, "trainable_tensors_changed": 3}, peft=True)  # an adapter got no gradient
    assert bench.trained({**good, "trainable_tensors_changed": 2}, peft=False)  # bf16 norm scales may not move
    assert not bench.trained({**good, "trainable_tensors_changed": 0}, peft=False)
    assert not bench.trained({"error": "OOM"}, peft=True)


def test_micro_batch_override_applies_to_both_stacks_and_is_validated():
    args = bench.parse_args(["--case", "qwen3_8b_lora", "--micro_batch_size", "2"])
    assert bench.selected_case(args).micro_batch_size == 2
    assert bench.selected_case(bench.parse_args([])).micro_batch_size == 1
    with pytest.raises(SystemExit):
        bench.parse_args(["--micro_batch_size", "0"])


def test_profile_must_name_a_measured_variant(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "default", "--profile", "sdpa"])
    assert "--profile sdpa must be one of --variants" in capsys.readouterr().err


def test_host_summary_counts_time_in_torch_ops_once_and_leaves_python_between_them_out():
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(128, 128)
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        for _ in range(2):
            torch.nn.functional.gelu(x @ x)  # aten::matmul holds aten::mm: nested ops
            time.sleep(0.05)  # host time outside torch
    events = trace.events()
    host = bench.summarize_host(events, steps=2)

    top_level_ms = sum(e.time_range.elapsed_us() for e in events if e.cpu_parent is None) / 1000 / 2
    assert host["in_torch_ops_ms_per_step"] == pytest.approx(top_level_ms)
    assert host["in_torch_ops_ms_per_step"] < 50
    ops = {op["name"]: op for op in host["top_ops_self_host"]}
    assert ops["aten::mm"]["calls_per_step"] == 1 and ops["aten::gelu"]["calls_per_step"] == 1
    assert host["runtime_calls_per_step"] == {} and host["syncs_per_step"] == 0  # no CUDA here


def test_cuda_runtime_calls_are_told_apart_from_ops():
    runtime = ["cudaLaunchKernel", "cudaStreamSynchronize", "cuLaunchKernelEx", "cudaMemcpyAsync"]
    assert all(bench.RUNTIME_CALL.match(name) for name in runtime)
    assert not any(bench.RUNTIME_CALL.match(name) for name in ["aten::cumsum", "aten::cudnn_convolution", "cutlass"])


def _square_sum(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def test_python_hotspots_name_the_function_that_spent_the_time():
    profile = bench.start_python_profile()
    for _ in range(2):
        _square_sum(300_000)
    rows = bench.finish_python_profile(profile, steps=2, top=3)
    assert rows[0]["function"].startswith("tests/test_train_benchmark.py:")
    assert rows[0]["function"].endswith("(_square_sum)") and rows[0]["calls_per_step"] == 1
    assert rows[0]["own_ms_per_step"] > 1 and rows[0]["cumulative_ms_per_step"] >= rows[0]["own_ms_per_step"]
    assert bench.short_path("/x/lib/python3.12/site-packages/megatron/core/y.py") == "megatron/core/y.py"


def test_variable_length_samples_are_fixed_and_unpacked_batches_count_their_tokens():
    case = bench.CASES["tiny_varlen"]
    lengths = [bench.sample_length(i, case) for i in range(bench.POOL)]
    assert lengths == [bench.sample_length(i, case) for i in range(bench.POOL)]
    assert min(lengths) >= bench.MIN_SAMPLE and max(lengths) <= 2048 and len(set(lengths)) > 50
    assert bench.sample_length(3, bench.CASES["tiny"]) == 32
    module = bench.make_synthetic_data_module("tiny_varlen", micro_batch_size=1, global_batch_size=1)
    module.setup()
    loader = module.train_dataloader()
    batches = list(itertools.islice(loader, 3))
    assert module.batch_tokens == lengths[:3] == [b["tokens"].shape[1] for b in batches]
    assert all(b["attention_mask"].shape[-1] == b["tokens"].shape[1] for b in batches)


def test_packed_rows_come_from_nemos_packer_and_collate_with_their_real_token_counts():
    case = bench.CASES["tiny_varlen"]
    module = bench.make_synthetic_data_module("tiny_varlen", micro_batch_size=1, global_batch_size=1, packed=True)
    module.setup()
    dataset = module._train_ds
    assert sum(len(dataset[i]["seq_boundaries"]) - 1 for i in range(len(dataset))) == bench.POOL
    loader = module.train_dataloader()
    batches = list(itertools.islice(loader, 3))
    assert len(module.batch_tokens) == 3
    for j, (batch, counted) in enumerate(zip(batches, module.batch_tokens, strict=True)):
        bounds = dataset[j]["seq_boundaries"]  # a sample of n ids trains on n - 1 positions
        assert counted == int(batch["loss_mask"].sum()) == sum(e - s - 1 for s, e in itertools.pairwise(bounds))
        assert batch["tokens"].shape[1] <= case.seq_length and "cu_seqlens" in batch
        assert len(bounds) > 2  # several samples per row
    padded = bench.make_synthetic_data_module(
        "tiny_varlen", micro_batch_size=1, global_batch_size=1, packed=True, one_shape=True
    )
    padded.setup()
    shapes = set()
    for batch in itertools.islice(padded.train_dataloader(), 6):
        cu = batch["cu_seqlens"][0, : int(batch["cu_seqlens_argmin"][0])]
        shapes.add((tuple(batch["tokens"].shape), len(cu), int(batch["max_seqlen"].flatten()[0])))
    assert len(shapes) == 1 and next(iter(shapes))[0] == (1, case.seq_length)
    assert padded.batch_tokens[:3] == module.batch_tokens  # the same rows; their padding trains nothing
    assert bench.graphed(bench.resolve_variant("packed+cuda_graphs")) and not bench.graphed(bench.VARIANTS["packed"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--case", "qwen3_8b_lora", "--variants", "packed"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--case", "qwen3_8b_lora_varlen", "--micro_batch_size", "2"])
