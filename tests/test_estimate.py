"""The plan's parameter counts and memory estimate (nemo_finetune/estimate.py) against real models: Megatron's GPT
with NeMo's own LoRA, and a Hugging Face model through the plan."""

from __future__ import annotations

import json

import pytest

from conftest import qa_job, run_script, tiny_gpt
from nemo_finetune import compat, estimate


def tiny_shape(vocab_size: int = 97) -> estimate.Shape:
    """conftest.tiny_gpt's sizes, as the plan reads them from a model config."""
    return estimate.Shape.of(
        {
            "num_layers": 2,
            "hidden_size": 64,
            "ffn_hidden_size": 128,
            "num_attention_heads": 4,
            "num_query_groups": 2,
            "kv_channels": 32,
            "gated_linear_unit": True,
            "qk_layernorm": True,
            "add_bias_linear": False,
            "normalization": "RMSNorm",
            "vocab_size": vocab_size,
        }
    )


@pytest.mark.parametrize(
    "targets",
    [
        ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
        ["linear_proj", "*.layers.1.*.linear_fc1"],
    ],
)
def test_counts_equal_megatrons_gpt_with_nemos_lora(model_parallel, targets):
    import torch
    from nemo.collections.llm import fn
    from nemo.collections.llm.peft.lora import LoRA

    with compat.scoped():
        compat.prepare_process()  # NeMo's LoRA transform needs the no-TE guards
        model = tiny_gpt("cpu", torch.float32)
        shape = tiny_shape()
        assert shape.parameters(97) == sum(p.numel() for p in model.parameters())
        model.requires_grad_(False)
        model = fn.walk(model, LoRA(dim=4, alpha=8, target_modules=targets).transform)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trained > 0 and estimate.adapter_parameters(shape, targets, rank=4) == trained


def test_configs_it_does_not_cover_give_no_estimate():
    assert (
        estimate.Shape.of({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_moe_experts": 8}) is None
    )
    assert estimate.Shape.of({"num_layers": 2, "hidden_size": 64}) is None  # not a GPT's config


def test_memory_budget_follows_its_formula():
    shape = tiny_shape(vocab_size=128)
    memory = estimate.memory_per_gpu(shape, 1000, 100, 128, 2, 16, 2, 1, 4)
    assert (memory.weights, memory.gradients, memory.optimizer) == (1000.0, 200.0, 150.0)  # 2, 4, 12/DP bytes / TP
    assert memory.activations == 16 * 2 * 64 * 2 * (10 + 24 / 2)
    assert memory.logits == 2 * 16 * 128 * 6 / 2
    assert estimate.padded_vocab(97, 128, 2) == 256 and estimate.padded_vocab(None, 128, 1) is None


def test_the_plan_counts_a_local_models_parameters_as_hugging_face_does(assets, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    job = qa_job(assets["qwen3"], tmp_path / "run", "--recipe_cls_name", "qwen3_600m", "--lora_dim", "8")
    out = run_script("peft_megatron.py", "--dry_run", *job, "--micro_batch_size", "2", "--max_seq_length", "64")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {line.split(": ", 1)[0].strip(): line.split(": ", 1)[1] for line in out.stdout.splitlines() if ": " in line}
    hf = json.loads((assets["qwen3"] / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(assets["qwen3"], torch_dtype=torch.float32)
    vocab, padded = hf["vocab_size"], estimate.padded_vocab(hf["vocab_size"], 128, 1)
    embeddings = 1 if hf.get("tie_word_embeddings") else 2
    base = sum(p.numel() for p in model.parameters()) + (padded - vocab) * hf["hidden_size"] * embeddings
    q, kv = hf["num_attention_heads"] * hf["head_dim"], hf["num_key_value_heads"] * hf["head_dim"]
    h, f = hf["hidden_size"], hf["intermediate_size"]
    lora = hf["num_hidden_layers"] * 8 * ((h + q + 2 * kv) + (q + h) + (h + 2 * f) + (f + h))
    assert lines["parameters"].startswith(f"{base + lora:,} (the model's config.json; vocabulary {vocab:,} padded")
    assert lines["trainable parameters"] == f"{lora:,} ({100 * lora / (base + lora):.2f}%)"
    assert lines["memory per GPU, rough"].startswith(f"{2 * (base + lora) / 2**30:,.1f} weights + ")
