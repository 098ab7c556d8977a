"""common.py's small shared pieces that have no script of their own to be tested through."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from common import RunLayout, attention_head_dim


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
