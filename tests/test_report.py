"""The run report and its callers: summary.json and loss_curve.png from a run directory laid out as NeMo writes it
(TensorBoard event files from torch's SummaryWriter, checkpoint directories named by NeMo's ModelCheckpoint)."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest

from conftest import fake_checkpoint
from nemo_finetune import report as run_report
from nemo_finetune.layout import RunLayout

GBS, SEQ, ROW = 16, 64, 20.5  # global batch, --max_seq_length, real tokens per row
TRAIN = {s: 4.0 - 0.03 * s for s in range(0, 100, 10)}  # logged every 10 steps
VAL = {49: 2.5, 99: 1.25}
STEP_TIMES = {0: 9.0, 10: 0.2, 20: 0.25, 30: 0.3, 40: 0.22}  # the first includes start-up
NAME = "nemo_logs--val_loss={:.4f}-step={}-consumed_samples={}"  # as peft_megatron.py names them


def log_scalars(run_dir: Path, version: int, scalars: dict[str, dict[int, float]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tb_logs" / "peft_megatron" / f"version_{version}"))
    for tag, points in scalars.items():
        for step, value in points.items():
            writer.add_scalar(tag, value, step)
    writer.close()


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A finished 100-step run of max_steps 200 (early-stopped): two validations, best at step 99, and -last."""
    out = tmp_path / "run"
    log_scalars(
        out,
        0,
        {
            "reduced_train_loss": TRAIN,
            "val_loss": VAL,
            "train_step_timing in s": STEP_TIMES,
            "memory/peak_allocated_mem": {0: 3.0, 10: 3.2214},
        },
    )
    ckpts = out / "nemo_logs" / "checkpoints"
    fake_checkpoint(ckpts / NAME.format(2.5, 49, 50 * GBS))
    fake_checkpoint(ckpts / NAME.format(1.25, 99, 100 * GBS))
    fake_checkpoint(ckpts / (NAME.format(1.25, 99, 100 * GBS) + "-last"))
    (ckpts / "nemo_logs--val_loss=0.1000-step=98-consumed_samples=1584").mkdir()  # incomplete: never "best"
    return out


def training_run(**overrides) -> dict:
    return {
        "model": "tiny/qwen3",
        "mode": "PEFT (lora)",
        "max_steps": 200,
        "world_size": 2,
        "global_batch_size": GBS,
        "max_seq_length": SEQ,
        "tokens_per_row": ROW,
        "wall_time_s": 123.456,
        "command": "python peft_megatron.py --max_steps 200",
        **overrides,
    }


def test_summary_counts_steps_tokens_speed_memory_and_names_the_best_and_last_checkpoints(run_dir):
    summary = run_report.write_training_report(run_dir, training_run())

    assert summary == json.loads((run_dir / "report" / "summary.json").read_text())
    ckpts = run_dir / "nemo_logs" / "checkpoints"
    median = statistics.median([0.2, 0.25, 0.3, 0.22])
    assert summary["steps"] == 100 and summary["early_stopped"] is True
    assert summary["tokens_seen"] == round(100 * GBS * ROW) and summary["token_slots_seen"] == 100 * GBS * SEQ
    assert summary["train_loss"] == {"first": pytest.approx(4.0), "last": pytest.approx(4.0 - 0.03 * 90)}
    assert summary["val_loss"] == {"49": 2.5, "99": 1.25}
    assert summary["best_checkpoint"] == {
        "path": str(ckpts / NAME.format(1.25, 99, 1600)),
        "val_loss": 1.25,
        "step": 99,
    }
    assert summary["last_checkpoint"]["path"] == str(ckpts / (NAME.format(1.25, 99, 1600) + "-last"))
    assert summary["median_step_time_s"] == pytest.approx(median)
    assert summary["tokens_per_s"] == pytest.approx(GBS * ROW / median)  # real tokens, not padding
    assert summary["tokens_per_s_per_gpu"] == pytest.approx(GBS * ROW / median / 2)
    assert summary["token_slots_per_s"] == pytest.approx(GBS * SEQ / median)
    assert summary["peak_gpu_mem_gib"] == pytest.approx(3.2214e9 / 2**30, rel=1e-6)
    assert summary["wall_time_s"] == 123.5 and summary["command"] == "python peft_megatron.py --max_steps 200"
    assert summary["evaluations"] == {}


def test_data_prepared_before_the_mean_row_length_was_recorded_gives_token_slots_only(run_dir):
    summary = run_report.write_training_report(run_dir, training_run(tokens_per_row=None))
    assert (summary["tokens_seen"], summary["tokens_per_s"]) == (None, None)
    assert summary["token_slots_seen"] == 100 * GBS * SEQ
    assert run_report.summary_lines(summary)[3] == (
        "speed: 235 ms/step, at most 4,357 tokens/s (token slots at --max_seq_length; the rows' real length is not "
        "recorded with this data)"
    )


def test_a_run_that_reached_max_steps_is_not_early_stopped(run_dir):
    assert run_report.write_training_report(run_dir, training_run(max_steps=100))["early_stopped"] is False


def test_loss_curve_is_a_png_of_both_losses_with_the_best_checkpoint_marked(run_dir):
    from matplotlib.image import imread

    run_report.write_training_report(run_dir, training_run())
    png = run_dir / "report" / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(png).shape[:2] == (540, 960)  # 8 x 4.5 inches at 120 dpi

    scalars = run_report.read_scalars(run_dir)
    fig = run_report.plot_loss_curve(scalars, {"val_loss": 1.25, "step": 99}, "t")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["training loss"].get_xdata()) == sorted(TRAIN)
    assert list(lines["validation loss"].get_ydata()) == [2.5, 1.25]
    best = lines["best checkpoint: val_loss 1.2500, step 99"]
    assert (list(best.get_xdata()), list(best.get_ydata())) == ([99], [1.25])


def test_a_resumed_runs_later_values_replace_the_first_attempts(run_dir):
    log_scalars(run_dir, 1, {"reduced_train_loss": {90: 0.5, 100: 0.4}})
    later = next((run_dir / "tb_logs" / "peft_megatron" / "version_1").iterdir())
    os.utime(later, (later.stat().st_atime, later.stat().st_mtime + 10))
    scalars = run_report.read_scalars(run_dir)
    assert scalars["reduced_train_loss"][90] == 0.5 and scalars["reduced_train_loss"][80] == pytest.approx(1.6)


def test_evaluations_are_kept_when_the_training_report_is_rewritten(run_dir):
    run_report.add_evaluation(run_dir, "ckpt-a", {"exact_match": 0.5})
    run_report.write_training_report(run_dir, training_run())
    run_report.add_evaluation(run_dir, "ckpt-b", {"exact_match": 1.0})
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    assert summary["evaluations"] == {"ckpt-a": {"exact_match": 0.5}, "ckpt-b": {"exact_match": 1.0}}
    assert summary["steps"] == 100


def test_without_validation_or_logged_losses_the_report_says_so(tmp_path):
    summary = run_report.write_training_report(tmp_path, training_run())
    assert summary["best_checkpoint"] is None and summary["loss_curve"] is None and summary["steps"] == 0
    assert not (tmp_path / "report" / "loss_curve.png").exists()
    assert "best: no checkpoint with a val_loss (no validation ran)" in run_report.summary_lines(summary)


def test_summary_lines_print_the_essentials(run_dir):
    lines = run_report.summary_lines(run_report.write_training_report(run_dir, training_run()))
    assert lines[0] == "steps: 100 of 200 (early-stopped)"
    assert lines[1].startswith("best: val_loss 1.2500 at step 99: ")
    assert lines[1].endswith("-step=99-consumed_samples=1600")
    assert lines[2] == "wall time: 124 s"  # 123.456 s recorded as 123.5
    # 16 rows of 20.5 real tokens per step: 328 tokens in 0.235 s; 1,024 token slots at --max_seq_length 64
    assert lines[3] == (
        "speed: 235 ms/step, 1,396 tokens/s (698 per GPU; rows of 20.5 tokens on average, 4,357 token slots/s at "
        "--max_seq_length 64)"
    )
    assert lines[4] == "peak GPU memory (global rank 0): 3.0 GiB"


def test_evaluations_of_a_runs_checkpoint_land_in_its_report(run_dir, tmp_path):
    import test_checkpoint as tc

    best = run_dir / "nemo_logs" / "checkpoints" / NAME.format(1.25, 99, 1600)
    tc.report_evaluation(best, tmp_path / "p.jsonl", {"exact_match": 0.75, "num_samples": 4})
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    assert summary["evaluations"][best.name] == {
        "checkpoint": str(best),
        "predictions": str(tmp_path / "p.jsonl"),
        "exact_match": 0.75,
        "num_samples": 4,
    }
    imported = fake_checkpoint(tmp_path / "imported_hf_ckpt")
    assert RunLayout.of_checkpoint(imported) is None  # not a run's checkpoint: no report to add to


def test_a_one_step_run_whose_checkpoint_names_no_consumed_samples_yet_ran_its_step(tmp_path):
    """NeMo names the checkpoint a validation after the first step saves `step=0-consumed_samples=0`: the logged
    training loss of step 0 says the step ran."""
    log_scalars(tmp_path, 0, {"reduced_train_loss": {0: 6.7}, "val_loss": {0: 4.16}})
    ckpts = tmp_path / "nemo_logs" / "checkpoints"
    fake_checkpoint(ckpts / NAME.format(4.1555, 0, 0))
    fake_checkpoint(ckpts / (NAME.format(4.1555, 0, 0) + "-last"))
    summary = run_report.write_training_report(tmp_path, training_run(max_steps=1))
    assert (summary["steps"], summary["early_stopped"]) == (1, False)
    assert run_report.summary_lines(summary)[0] == "steps: 1 of 1"
