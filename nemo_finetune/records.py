"""The files that make a phase safe to re-run and to run on many nodes, one naming scheme for every phase (import,
data preparation, packing, export, evaluation, the run report). In the directory of the phase's output:

    .<name>.lock     one job at a time (an flock, released when the holder dies)
    .<name>.failed   why global rank 0's last attempt failed, for the nodes waiting on it
    <record>         what the output was made from, written last: present = complete (each phase names its own)

Global rank 0 runs `attempt()`; the other nodes `wait()` for the record (or the failure marker). Whether a record
still matches the inputs is each phase's own check (its fingerprint)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from nemo_finetune.files import (
    STALE_FAILURE_GRACE_S,
    atomic_write_text,
    exclusive_lock,
    rank_zero_attempt,
    wait_for_file,
)


@dataclasses.dataclass(frozen=True)
class PhaseFiles:
    directory: Path
    name: str  # the phase's output (a directory or file name) or the phase itself ("data", "packing")
    record_name: str | None = None  # relative to `directory`; None: the phase keeps no record
    shares_lock_with: str | None = None  # another phase's name whose lock this one takes (packing reads the data)

    @property
    def lock(self) -> Path:
        return self.directory / f".{self.shares_lock_with or self.name}.lock"

    @property
    def failed(self) -> Path:
        return self.directory / f".{self.name}.failed"

    @property
    def record(self) -> Path:
        if self.record_name is None:
            raise ValueError(f"the {self.name} phase keeps no record")
        return self.directory / self.record_name

    def locked(self, timeout_s: float, what: str) -> contextlib.AbstractContextManager[None]:
        """The lock alone (phases without other nodes waiting on them: export, evaluation, the report)."""
        return exclusive_lock(self.lock, timeout_s, what)

    def attempt(self, timeout_s: float, what: str) -> contextlib.AbstractContextManager[None]:
        """Global rank 0's side: under the lock, the last failure marker removed; a failure of this attempt written
        to it for the waiting nodes."""
        return rank_zero_attempt(self.lock, self.failed, timeout_s, what)

    def wait(self, timeout_s: float, what: str, is_done: Callable[[], bool] | None = None) -> None:
        """The other nodes' side: until the record is there (or `is_done()`), failing fast on a fresh failure
        marker (an older one is believed after the grace period, STALE_FAILURE_GRACE_S)."""
        wait_for_file(self.record, self.failed, timeout_s, what, is_done=is_done, stale_grace_s=STALE_FAILURE_GRACE_S)

    def read(self) -> dict | None:
        """The record's contents; None when it is missing or is not a JSON object (a damaged record is no record)."""
        try:
            content = json.loads(self.record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return content if isinstance(content, dict) else None

    def write(self, content: dict) -> None:
        """Write the record atomically, last: its presence says the output is complete."""
        atomic_write_text(self.record, json.dumps(content, indent=2) + "\n")


IMPORT_RECORD = ".import_source.json"  # inside an imported checkpoint: the model and recipe it was made from
DATA_RECORD = ".data_ready.json"  # the settings' fingerprint, the summary, each split file's size and hash
PACKED_RECORD = ".packed_ready.json"  # inside a packed directory renamed into place whole: its key and files


def import_files(target: Path) -> PhaseFiles:
    """The HF -> NeMo import into `target` (a checkpoint directory, written whole): its record lives inside it."""
    return PhaseFiles(target.parent, target.name, record_name=f"{target.name}/{IMPORT_RECORD}")


def data_files(data_dir: Path) -> PhaseFiles:
    return PhaseFiles(data_dir, "data", record_name=DATA_RECORD)


def packing_files(data_dir: Path, packed_dir: Path) -> PhaseFiles:
    """Packing writes `packed_dir` (under `data_dir`) while holding the data's lock: the splits it reads stay put."""
    return PhaseFiles(
        data_dir, "packing", record_name=f"{packed_dir.relative_to(data_dir)}/{PACKED_RECORD}", shares_lock_with="data"
    )


def output_files(output: Path) -> PhaseFiles:
    """An export directory or a predictions file: a lock beside it, no record here (the phase checks its content)."""
    return PhaseFiles(output.parent, output.name)


def report_files(report_dir: Path) -> PhaseFiles:
    return PhaseFiles(report_dir, "report")
