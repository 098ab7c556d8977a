"""The run report: what a finished run did, in one file and one picture, under <output_dir>/report/.

    summary.json     steps, tokens seen (real tokens, and the padded slots beside them), best val_loss and its
                     checkpoint, the last checkpoint, wall time, tokens/s,
                     peak GPU memory, early-stopped or not, the exact command; `evaluations` from test_checkpoint.py
    loss_curve.png   training and validation loss against step, the best checkpoint marked

peft_megatron.py writes it when training ends (also after a resumed run: the event files of every attempt are read);
test_checkpoint.py adds each evaluation of one of the run's checkpoints. The numbers come from what the run logged
to TensorBoard (`reduced_train_loss`, `val_loss`, NeMo's `train_step_timing in s`, `memory/peak_allocated_mem`) and
from the checkpoint names.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shlex
import statistics
import sys
from pathlib import Path

from nemo_finetune.checkpoints import checkpoint_val_loss, is_nemo_checkpoint
from nemo_finetune.files import atomic_write_bytes, atomic_write_text
from nemo_finetune.layout import RunLayout
from nemo_finetune.records import report_files

log = logging.getLogger("peft_megatron")

TRAIN_LOSS, VAL_LOSS = "reduced_train_loss", "val_loss"
STEP_TIME = "train_step_timing in s"  # NeMo's TimingCallback, in every fine-tuning recipe
PEAK_MEMORY = "memory/peak_allocated_mem"  # NeMo's MemoryMonitor, in GB (1e9 bytes)
LOCK_TIMEOUT_S = 600.0
_STEP = re.compile(r"(?:^|-)step=(\d+)")
_CONSUMED = re.compile(r"consumed_samples=([0-9.]+)")


def read_scalars(root: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from every TensorBoard event file under `root`, older files first, so the values a
    resumed run logged again for a step replace the first attempt's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    for events in sorted(Path(root).rglob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, str(p))):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})  # 0: keep every point
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return scalars


def run_checkpoints(output_dir: Path) -> dict:
    """The best-val_loss checkpoint and the last one under the run's checkpoints/, with their steps."""
    root = RunLayout(Path(output_dir)).checkpoints
    found = sorted(p for p in root.iterdir() if is_nemo_checkpoint(p)) if root.is_dir() else []
    scored = [p for p in found if not p.name.endswith("-last") and checkpoint_val_loss(p) is not None]
    last = [p for p in found if p.name.endswith("-last")]
    best = min(scored, key=lambda p: (checkpoint_val_loss(p), _step(p))) if scored else None
    latest = max(last, key=_step) if last else None
    return {
        "best": None
        if best is None
        else {"path": str(best), "val_loss": checkpoint_val_loss(best), "step": _step(best)},
        "last": None
        if latest is None
        else {"path": str(latest), "step": _step(latest), "consumed_samples": _consumed(latest)},
    }


def _step(path: Path) -> int:
    m = _STEP.search(path.name)
    return int(m.group(1)) if m else -1


def _consumed(path: Path) -> int | None:
    m = _CONSUMED.search(path.name)
    return int(float(m.group(1).rstrip("."))) if m else None


def summarize_training(output_dir: Path, run: dict, scalars: dict[str, dict[int, float]]) -> dict:
    """The training part of summary.json. `run` holds what only the launcher knows: model, mode, max_steps,
    global_batch_size, max_seq_length, tokens_per_row (the real tokens a training row holds on average, None when
    unknown), world_size, wall_time_s and command. Real tokens are what the model reads; token slots count every
    row as --max_seq_length long (rows are padded to their batch's longest, so slots bound what was computed)."""
    ckpts = run_checkpoints(output_dir)
    train, val = scalars.get(TRAIN_LOSS, {}), scalars.get(VAL_LOSS, {})
    consumed = (ckpts["last"] or {}).get("consumed_samples")
    # Megatron counts consumed samples exactly; the logged steps are only every --log_every_n_steps. A checkpoint
    # saved by a validation right after the first step names consumed_samples=0 (seen on the GPU), so the logged
    # steps are a floor.
    logged = max(train) + 1 if train else 0
    steps = max(consumed // run["global_batch_size"], logged) if consumed is not None else logged
    slots_per_step = run["global_batch_size"] * run["max_seq_length"]
    per_row = round(run["tokens_per_row"], 2) if run.get("tokens_per_row") else None
    tokens_per_step = run["global_batch_size"] * per_row if per_row else None
    step_times = sorted(scalars.get(STEP_TIME, {}).items())[1:]  # the first logged step includes start-up
    median_step_s = statistics.median(v for _, v in step_times) if step_times else None
    peak = scalars.get(PEAK_MEMORY)

    def per_s(count, gpus=1):
        return count / median_step_s / gpus if count and median_step_s else None

    return {
        "model": run["model"],
        "mode": run["mode"],
        "steps": steps,
        "max_steps": run["max_steps"],
        "early_stopped": steps < run["max_steps"],
        "world_size": run["world_size"],
        "global_batch_size": run["global_batch_size"],
        "max_seq_length": run["max_seq_length"],
        "tokens_per_row": per_row,
        "tokens_seen": round(steps * tokens_per_step) if tokens_per_step else None,
        "token_slots_seen": steps * slots_per_step,
        "train_loss": {"first": train[min(train)], "last": train[max(train)]} if train else None,
        "val_loss": {str(step): value for step, value in sorted(val.items())},
        "best_checkpoint": ckpts["best"],
        "last_checkpoint": ckpts["last"],
        "wall_time_s": round(run["wall_time_s"], 1),
        "median_step_time_s": median_step_s,
        "tokens_per_s": per_s(tokens_per_step),
        "tokens_per_s_per_gpu": per_s(tokens_per_step, run["world_size"]),
        "token_slots_per_s": per_s(slots_per_step),
        "peak_gpu_mem_gib": max(peak.values()) * 1e9 / 2**30 if peak else None,
        "command": run["command"],
        "loss_curve": "loss_curve.png" if train else None,
    }


def plot_loss_curve(scalars: dict[str, dict[int, float]], best: dict | None, title: str):
    """A matplotlib Figure of the training and validation loss (no pyplot: no display, no global state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    train, val = sorted(scalars.get(TRAIN_LOSS, {}).items()), sorted(scalars.get(VAL_LOSS, {}).items())
    if train:
        ax.plot(*zip(*train, strict=True), color="tab:blue", linewidth=1, label="training loss")
    if val:
        ax.plot(*zip(*val, strict=True), color="tab:orange", marker="o", markersize=4, label="validation loss")
    if best is not None:
        # The checkpoint's step counts from 0 while NeMo logs val_loss at the step count; mark the logged point.
        step = min(val, key=lambda sv: abs(sv[0] - best["step"]))[0] if val else best["step"]
        ax.plot(
            [step],
            [best["val_loss"]],
            linestyle="none",
            marker="*",
            markersize=16,
            color="tab:red",
            label=f"best checkpoint: val_loss {best['val_loss']:.4f}, step {best['step']}",
        )
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def write_training_report(output_dir: Path, run: dict) -> dict:
    """Write summary.json and loss_curve.png for the run in `output_dir`; evaluations already in the report stay."""
    out = RunLayout(Path(output_dir)).report
    scalars = read_scalars(Path(output_dir))
    summary = summarize_training(output_dir, run, scalars)
    with report_files(out).locked(LOCK_TIMEOUT_S, "run report"):
        summary["evaluations"] = _read(out).get("evaluations", {})
        if summary["loss_curve"]:
            png = io.BytesIO()
            plot_loss_curve(scalars, summary["best_checkpoint"], f"{run['model']}: {run['mode']}").savefig(png)
            atomic_write_bytes(out / "loss_curve.png", png.getvalue())
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def add_evaluation(output_dir: Path, name: str, evaluation: dict) -> None:
    """Record one evaluation (test_checkpoint.py's metrics for a checkpoint) in the run's summary.json."""
    out = RunLayout(Path(output_dir)).report
    with report_files(out).locked(LOCK_TIMEOUT_S, "run report"):
        summary = _read(out)
        summary.setdefault("evaluations", {})[name] = evaluation
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")


def _read(out: Path) -> dict:
    path = out / "summary.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        # Only our atomic writes make this file; an unreadable one was edited by hand. Start afresh, say so.
        log.warning("%s is not JSON; writing a new report", path)
        return {}


def summary_lines(summary: dict) -> list[str]:
    """The essentials, as printed at the end of a run."""
    best = summary["best_checkpoint"]
    lines = [
        f"steps: {summary['steps']} of {summary['max_steps']}"
        + (" (early-stopped)" if summary["early_stopped"] else ""),
        f"best: val_loss {best['val_loss']:.4f} at step {best['step']}: {best['path']}"
        if best
        else "best: no checkpoint with a val_loss (no validation ran)",
        f"wall time: {summary['wall_time_s']:.0f} s",
    ]
    if summary["tokens_per_s"]:
        lines.append(
            f"speed: {summary['median_step_time_s'] * 1000:.0f} ms/step, {summary['tokens_per_s']:,.0f} tokens/s "
            f"({summary['tokens_per_s_per_gpu']:,.0f} per GPU; rows of {summary['tokens_per_row']:,.1f} tokens on "
            f"average, {summary['token_slots_per_s']:,.0f} token slots/s at --max_seq_length "
            f"{summary['max_seq_length']})"
        )
    elif summary["token_slots_per_s"]:
        lines.append(
            f"speed: {summary['median_step_time_s'] * 1000:.0f} ms/step, at most {summary['token_slots_per_s']:,.0f} "
            "tokens/s (token slots at --max_seq_length; the rows' real length is not recorded with this data)"
        )
    if summary["peak_gpu_mem_gib"]:
        lines.append(f"peak GPU memory (global rank 0): {summary['peak_gpu_mem_gib']:.1f} GiB")
    return lines


def write_report(config, data: dict, wall_time_s: float) -> dict:
    """<output_dir>/report/: summary.json and loss_curve.png of the finished run (`data`: the data phase's summary);
    prints the gist."""
    from nemo_finetune.data import tokens_per_row

    summary = write_training_report(
        config.output_path,
        {
            "model": config.hf_model_id,
            "mode": "full fine-tuning" if config.full_ft else f"PEFT ({config.peft_scheme})",
            "max_steps": config.max_steps,
            "world_size": config.world_size,
            "global_batch_size": config.global_batch_size,
            "max_seq_length": config.max_seq_length,
            "tokens_per_row": tokens_per_row(config, data),
            "wall_time_s": wall_time_s,
            "command": shlex.join(sys.orig_argv),
        },
    )
    print(f"report: {config.layout.report}", flush=True)
    for line in summary_lines(summary):
        print(f"  {line}", flush=True)
    return summary
