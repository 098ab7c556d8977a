"""Where a run keeps what it writes under --output_dir: every script finds its files here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]  # the four scripts; the workers import from here
STARTUP_DIR = Path(__file__).resolve().parent / "startup"  # the training workers' sitecustomize.py
RUN_NAME = "nemo_logs"  # NeMoLogger's name: <output_dir>/nemo_logs/checkpoints/nemo_logs--val_loss=...-step=...


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """Where a run keeps what it writes under --output_dir (README, "Outputs"); every script finds it here."""

    root: Path

    data = property(lambda self: self.root / "data")  # training/validation/test JSONL and .data_ready.json
    imported = property(lambda self: self.root / "imported_hf_ckpt")  # the HF model as a NeMo checkpoint
    logs = property(lambda self: self.root / RUN_NAME)  # NeMoLogger's directory
    checkpoints = property(lambda self: self.logs / "checkpoints")  # best val_loss and -last
    exports = property(lambda self: self.logs / "exports")  # HF exports; never inside checkpoints/
    tensorboard = property(lambda self: self.root / "tb_logs")
    report = property(lambda self: self.root / "report")  # summary.json, loss_curve.png
    log_file = property(lambda self: self.root / "peft_megatron.log")
    # NeMo-Run's experiments and the workers' logs. Not "nemo_run": NeMo-Run 0.11 rewrites every "/nemo_run" in the
    # sbatch script of a job without a container image (checks.py refuses such paths).
    jobs = property(lambda self: self.root / "jobs")
    launcher = property(lambda self: self.jobs / "bin")  # the `torchrun` NeMo-Run starts (launch.py)
    profiles = property(lambda self: self.root / "profiles")

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunLayout | None:
        """The run of a checkpoint peft_megatron.py wrote (<run>/nemo_logs/checkpoints/<name>), else None."""
        checkpoint = Path(checkpoint).resolve()
        if checkpoint.parent.name == "checkpoints" and checkpoint.parents[1].name == RUN_NAME:
            return cls(checkpoint.parents[2])
        return None
