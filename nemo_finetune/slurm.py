"""A run's Slurm job once NeMo-Run has submitted it: its record in the run directory, its state as Slurm's own
commands report it (squeue while it is known there, sacct after), the wait for its end, and where its workers' log
is (failures.py reads the reason from it)."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path

from nemo_finetune.errors import PipelineError
from nemo_finetune.files import atomic_write_text

log = logging.getLogger("peft_megatron")

RECORD = "slurm_job.json"  # in the run's jobs/ directory: the last job submitted for it
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}  # fmt: skip


def record_path(jobs_dir: Path) -> Path:
    return Path(jobs_dir) / RECORD


def write_record(jobs_dir: Path, job_id: str, experiment_dir: Path) -> None:
    record = {"job_id": job_id, "experiment_dir": str(experiment_dir), "submitted": time.time()}
    atomic_write_text(record_path(jobs_dir), json.dumps(record, indent=2) + "\n")


def read_record(jobs_dir: Path) -> dict | None:
    try:
        record = json.loads(record_path(jobs_dir).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("job_id"), str) else None


def _run(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def state(job_id: str) -> str | None:
    """The job's state (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...), or None when Slurm knows no such job:
    squeue's while the job is queued or running there, else sacct's (its accounting keeps ended jobs)."""
    queued = _run(["squeue", "-h", "-j", job_id, "-o", "%T"]).split()
    if queued:
        return queued[0]
    accounted = _run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State"]).split()
    return accounted[0].rstrip("+") if accounted else None  # "CANCELLED by 0" -> CANCELLED


def active_state(job_id: str) -> str | None:
    """The state of a job still queued or running (PENDING, RUNNING, ...); None once it has ended or is unknown."""
    current = state(job_id)
    return current if current is not None and current not in ENDED else None


def wait(job_id: str, poll_s: float = 5.0, unknown_polls: int = 24) -> str:
    """Poll until the job has ended; its final state. A job neither squeue nor sacct knows for `unknown_polls` polls
    in a row (no accounting on the cluster, or the job purged) is an error, not a wait without end."""
    unknown = 0
    while True:
        current = state(job_id)
        if current in ENDED:
            return current
        unknown = unknown + 1 if current is None else 0
        if unknown >= unknown_polls:
            raise PipelineError(
                f"Slurm knows no job {job_id} (squeue lists it no longer and sacct has no record: is accounting on "
                "for this cluster?); its outcome is in its log"
            )
        time.sleep(poll_s)


def worker_log(experiment_dir: Path, job_id: str) -> Path | None:
    """The training workers' log of the job (srun writes it beside the job's files), if written."""
    logs = sorted(Path(experiment_dir).glob(f"*/log-*_{job_id}_*.out"))
    return logs[-1] if logs else None


def expected_log(experiment_dir: Path, job_id: str) -> str:
    """Where the workers' log will be, as a shell pattern (srun names it after the job's name and id)."""
    return f"{experiment_dir}/*/log-*_{job_id}_0.out"


def how_to_follow(job_id: str, log_file: Path | str) -> str:
    return f"follow it: squeue -j {job_id}; tail -f {log_file}; cancel it: scancel {job_id}"
