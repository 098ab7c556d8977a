"""nemo_finetune.checkpoints and .layout: shared pieces with no script of their own to be tested through."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from conftest import fake_checkpoint, lora_tensors
from nemo_finetune.checkpoints import (
    adapter_matrices,
    adapters_unlike_their_master_copies,
    attention_head_dim,
    read_adapter_tensors,
    untrained_adapters,
)
from nemo_finetune.layout import RunLayout


def test_attention_head_dim_reads_megatron_and_hf_configs():
    megatron = SimpleNamespace(kv_channels=128, hidden_size=1024, num_attention_heads=16)  # Qwen3: not 1024 / 16
    hf = SimpleNamespace(head_dim=64, hidden_size=2048, num_attention_heads=16)
    plain = SimpleNamespace(kv_channels=None, head_dim=None, hidden_size=4096, num_attention_heads=32)
    assert [attention_head_dim(c) for c in (megatron, hf, plain)] == [128, 64, 128]


def test_run_layout_finds_the_run_of_its_checkpoints_only(tmp_path):
    run = RunLayout(tmp_path / "run")
    checkpoint = run.checkpoints / "nemo_logs--val_loss=1.0-step=9-consumed_samples=80"
    assert RunLayout.of_checkpoint(checkpoint) == RunLayout((tmp_path / "run").resolve())
    assert run.exports == run.checkpoints.parent / "exports"  # beside checkpoints/, never inside it
    assert RunLayout.of_checkpoint(run.imported) is None
    assert RunLayout.of_checkpoint(Path("/elsewhere/checkpoints/x")) is None  # another logger's name


def test_adapter_tensors_are_the_models_and_an_all_zero_output_matrix_is_named_per_layer(tmp_path):
    written = lora_tensors(untrained_layer=0)
    ckpt = fake_checkpoint(tmp_path / "lora", adapter=True, tensors=written)
    adapter = read_adapter_tensors(ckpt)
    assert sorted(adapter) == sorted(k for k in written if k.startswith("module."))  # not the optimizer's state
    assert all(adapter[k].equal(written[k]) for k in adapter)
    assert untrained_adapters(adapter) == ["decoder.layers.0.self_attention.linear_proj.adapter.linear_out.weight"]
    trained = fake_checkpoint(tmp_path / "trained", adapter=True, tensors=lora_tensors())
    assert untrained_adapters(read_adapter_tensors(trained)) == []
    masters = read_adapter_tensors(ckpt, optimizer_state="fp32_param")  # under the weights' own keys
    assert sorted(masters) == sorted(adapter)
    assert all(masters[k].equal(written[f"optimizer.state.fp32_param.{k}"]) for k in masters)
    names = [name for name, _ in adapter_matrices(adapter)]
    assert len(names) == 8 and names[:2] == [
        "decoder.layers.0.mlp.linear_fc1.adapter.linear_in.weight",
        "decoder.layers.1.mlp.linear_fc1.adapter.linear_in.weight",
    ]


def test_an_adapter_matrix_unlike_the_master_copy_saved_beside_it_is_named_per_layer(tmp_path):
    intact = fake_checkpoint(tmp_path / "intact", adapter=True, tensors=lora_tensors(untrained_layer=0))
    assert adapters_unlike_their_master_copies(intact, read_adapter_tensors(intact)) == []
    damaged = fake_checkpoint(tmp_path / "damaged", adapter=True, tensors=lora_tensors(damaged_layer=1))
    assert adapters_unlike_their_master_copies(damaged, read_adapter_tensors(damaged)) == [
        "decoder.layers.1.mlp.linear_fc1.adapter.linear_in.weight"
    ]
    # No master copies saved (fp32 training, the distributed optimizer's layout): nothing to compare, nothing named
    weights_only = {k: v for k, v in lora_tensors(damaged_layer=1).items() if k.startswith("module.")}
    bare = fake_checkpoint(tmp_path / "bare", adapter=True, tensors=weights_only)
    assert read_adapter_tensors(bare, optimizer_state="fp32_param") == {}
    assert adapters_unlike_their_master_copies(bare, read_adapter_tensors(bare)) == []
