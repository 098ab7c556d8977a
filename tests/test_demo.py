"""demo.py: the demo's pieces that can run without a GPU (the whole demo on CPU prepares and exits 3: test_logging.py;
on the GPU: docs/gpu-validation.md)."""

from __future__ import annotations

import json

import pytest

from nemo_finetune import demo
from nemo_finetune.errors import PipelineError


def test_background_script_reports_success_failure_with_its_log_and_can_be_stopped(tmp_path):
    """The demo evaluates the base model beside the training launch through BackgroundScript."""
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"input": "q", "label": "Blue", "prediction": "blue"}) + "\n")
    ok = demo.BackgroundScript.start(
        tmp_path / "ok.log",
        "test_checkpoint.py",
        "--evaluate_only",
        "--predictions_file",
        str(preds),
        "--bertscore_model",
        "none",
    )
    ok.wait()
    assert json.loads(preds.with_suffix(".metrics.json").read_text())["exact_match"] == 1.0
    assert "exact_match 1.0000" in (tmp_path / "ok.log").read_text()

    bad = demo.BackgroundScript.start(tmp_path / "bad.log", "test_checkpoint.py", "--evaluate_only")
    with pytest.raises(PipelineError, match=r"test_checkpoint.py failed \(exit 2; full log: .*bad.log"):
        bad.wait()
    assert "--evaluate_only needs --predictions_file" in (tmp_path / "bad.log").read_text()

    slow = demo.BackgroundScript.start(tmp_path / "slow.log", "peft_megatron.py", "--dry_run")  # imports NeMo: ~10 s
    slow.stop()
    assert slow.process.returncode == -15  # SIGTERM, not a finished run


def test_the_demo_fails_unless_fine_tuning_raised_exact_match_with_every_adapter_trained_and_intact():
    before, good = {"exact_match": 0.0}, {"exact_match": 0.947, "untrained_adapters": []}
    assert demo.demo_failure(before, good) is None
    assert "did not raise exact match" in demo.demo_failure(before, {"exact_match": 0.0, "untrained_adapters": []})
    lost = {"exact_match": 0.3, "untrained_adapters": ["decoder.layers.0.self_attention.linear_proj.adapter"]}
    assert "1 LoRA adapter(s) with all-zero weights (decoder.layers.0" in demo.demo_failure(before, lost)
    damaged = {"exact_match": 0.9, "adapters_unlike_master_copies": ["decoder.layers.1.mlp.linear_fc1.adapter"]}
    assert "1 LoRA matrix(es) unlike the fp32 master copies saved beside them (decoder.layers.1" in demo.demo_failure(
        before, damaged
    )
