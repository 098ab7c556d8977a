"""The GPU path through the real CLI and NeMo-Run's torchrun launcher, on a tiny model (1 GPU).

Run on a CUDA machine: `python -m pytest -m gpu tests/test_gpu.py`; skipped elsewhere with a reason (conftest).
The record of the runs on the lent H100 is docs/gpu-validation.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_script

pytestmark = pytest.mark.gpu


def tiny_job(assets, out: Path, *extra: str) -> list[str]:
    return [
        "--hf_model_id", str(assets["qwen3"]), "--recipe_cls_name", "qwen3_600m", "--gpus_per_node", "1",
        "--tensor_parallel_size", "1", "--dataset_name", str(assets["data"]), "--input_column", "question",
        "--output_column", "answer", "--val_fraction", "0.2", "--micro_batch_size", "8", "--accumulate_grad_batches",
        "1", "--limit_val_batches", "2", "--max_seq_length", "64", "--output_dir", str(out),
        "--nemo_ckpt_dir", str(out.parent / "imported"), *extra,
    ]


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in (out / "nemo_logs" / "checkpoints").iterdir() if (p / "weights").is_dir())


def test_lora_trains_checkpoints_logs_profiles_and_resumes(assets, tmp_path):
    out = tmp_path / "lora"
    first = run_script("peft_megatron.py", *tiny_job(
        assets, out, "--max_steps", "30", "--val_check_interval", "10", "--learning_rate", "5e-3",
        "--enable_memory_monitor", "--enable_speed_monitor", "--enable_runtime_estimator",
        "--enable_megatron_progress_bar", "--enable_pytorch_profiler"))
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    val = scalars(out, "val_loss")
    assert len(val) >= 3 and val[max(val)] < val[min(val)], val
    train = scalars(out, "reduced_train_loss")
    assert max(train) == 29 and all(v == v and v > 0 for v in train.values())
    names = [p.name for p in checkpoints(out)]
    best = [n for n in names if not n.endswith("-last")]
    assert len(best) == 1 and f"val_loss={min(val.values()):.4f}" in best[0]
    assert any(n.endswith("-last") and "step=29" in n for n in names)
    assert list((out / "profiles").rglob("*.json")) or list((out / "profiles").rglob("*.pt.trace.json*"))

    resumed = run_script("peft_megatron.py", *tiny_job(
        assets, out, "--max_steps", "40", "--val_check_interval", "10", "--learning_rate", "5e-3"))
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert "Restoring states from the checkpoint path" in resumed.stdout
    assert "`max_steps=40` reached" in resumed.stdout
    train_after = scalars(out, "reduced_train_loss")
    assert min(s for s in train_after if s not in train) == 30  # continues at step 30, not from 0
    # the optimizer and data position came back: no jump back towards the random-init loss
    assert train_after[30] < 1.5 * train[29] and train_after[30] < 0.8 * train[0]


def test_full_fine_tuning_reduces_val_loss_and_exports(assets, tmp_path):
    out = tmp_path / "full"
    result = run_script("peft_megatron.py", *tiny_job(
        assets, out, "--full_ft", "--max_steps", "30", "--val_check_interval", "10", "--learning_rate", "1e-4"))
    assert result.returncode == 0, result.stdout[-4000:]
    val = scalars(out, "val_loss")
    assert val[max(val)] < val[min(val)], val
    export = run_script("convert_checkpoint_to_hf.py", "--nemo_logs_dir", str(out / "nemo_logs"))
    assert export.returncode == 0, export.stderr[-4000:]
    assert list(out.rglob("*.hf_model/model.safetensors"))


def test_early_stopping_ends_a_run_that_cannot_improve(assets, tmp_path):
    out = tmp_path / "stop"
    result = run_script("peft_megatron.py", *tiny_job(
        assets, out, "--max_steps", "200", "--val_check_interval", "5", "--learning_rate", "1e-12",
        "--early_stopping_patience", "2"))
    assert result.returncode == 0, result.stdout[-4000:]
    assert "did not improve in the last 2 records" in result.stdout
    assert max(scalars(out, "reduced_train_loss")) < 30


def test_training_failure_exits_non_zero_with_the_error(assets, tmp_path):
    result = run_script("peft_megatron.py", *tiny_job(
        assets, tmp_path / "oom", "--max_steps", "10", "--val_check_interval", "5", "--max_seq_length", "131072",
        "--micro_batch_size", "64", "--val_fraction", "0.7"))
    assert result.returncode == 1
    assert "OutOfMemoryError" in result.stdout + result.stderr or "out of memory" in result.stdout + result.stderr
    assert "training failed (job states" in result.stderr


DEMO_RUN = Path(__file__).resolve().parents[1] / "demo" / "run"


@pytest.mark.skipif(not list(DEMO_RUN.glob("nemo_logs/checkpoints/*.hf_model")), reason="run `python peft_megatron.py --demo` first")
def test_demo_greedy_predictions_match_hf_generate_on_the_export():
    """The dynamic engine's greedy outputs equal transformers' generate() on the exported merged model."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = next(DEMO_RUN.glob("nemo_logs/checkpoints/*.hf_model"))
    rows = [json.loads(l) for l in (DEMO_RUN / "predictions_after.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export, torch_dtype=torch.bfloat16).cuda().eval()
    same = 0
    for row in rows:
        ids = tok(row["input"], add_special_tokens=False, return_tensors="pt").input_ids.cuda()
        out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        same += text == row["prediction"]
    print(f"HF generate agreement: {same}/{len(rows)}")
    assert same >= 0.9 * len(rows)
