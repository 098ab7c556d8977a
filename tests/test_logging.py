"""The console shows our lines and what matters; other libraries' chatter goes to the run's log file."""

from __future__ import annotations

import logging
import warnings

import pytest

from conftest import REPO, run_script

from common import log_to_file, phase, setup_logging

# Lines users met at the default level before (issue 15), each from another library.
CHATTER = ["fused_indices_to_multihot has reached end of life", "No exporters were provided",
           "The deploy module could not be imported", "Detected Megatron Core, using Megatron-FSDP"]


@pytest.fixture
def isolated_logging():
    """setup_logging changes process-wide state (root handlers, warnings capture, NeMo's logger): undo it."""
    root, nemo = logging.getLogger(), logging.getLogger("nemo_logger")
    saved = (list(root.handlers), root.level, list(nemo.filters))
    yield
    for handler in [h for h in root.handlers if h not in saved[0]]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(saved[1])
    nemo.filters[:] = saved[2]
    logging.captureWarnings(False)


def test_console_keeps_our_lines_and_errors_and_the_file_keeps_everything(isolated_logging, tmp_path, capsys):
    setup_logging("INFO")
    log_file = log_to_file(tmp_path / "run.log")
    logging.getLogger("peft_megatron.data").info("prepared 19 test rows")
    logging.getLogger("megatron.core.utils").warning(CHATTER[0])
    logging.getLogger("nv_one_logger.training_telemetry").warning(CHATTER[1])
    logging.getLogger("nemo_logger").warning(CHATTER[2])  # NeMo's own logger, which does not propagate
    logging.getLogger("megatron.core.dist_checkpointing").error("shard 3 is truncated")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("The pynvml package is deprecated", FutureWarning)

    console = capsys.readouterr().out
    assert "INFO peft_megatron.data] prepared 19 test rows" in console
    assert "ERROR megatron.core.dist_checkpointing] shard 3 is truncated" in console  # others' errors still show
    assert not any(line in console for line in [*CHATTER[:3], "pynvml"])
    kept = log_file.read_text()
    assert all(line in kept for line in [*CHATTER[:3], "prepared 19 test rows", "shard 3 is truncated", "pynvml"])


def test_phases_are_console_landmarks_with_their_duration(isolated_logging, capsys):
    setup_logging("INFO")
    with phase("data preparation"):
        pass
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("INFO peft_megatron] == data preparation")
    assert lines[1].endswith("INFO peft_megatron] == data preparation: done in 0.0 s")


def test_debug_shows_every_librarys_lines(isolated_logging, capsys):
    setup_logging("DEBUG")
    logging.getLogger("megatron.core.utils").warning(CHATTER[0])
    logging.getLogger("nemo_logger").info(CHATTER[2])
    console = capsys.readouterr().out
    assert CHATTER[0] in console and CHATTER[2] in console


def test_the_demo_on_a_machine_without_gpu_prints_our_plan_not_the_libraries_chatter():
    """The README's first command on a CPU machine: prepares the demo, prints the plan, exits 3."""
    out = run_script("peft_megatron.py", "--demo", timeout=900)
    assert out.returncode == 3, out.stderr[-3000:]
    console = out.stdout + out.stderr
    assert "demo: prepared" in console and "plan:" in console
    assert "full log, every library's messages:" in console
    assert not [line for line in CHATTER if line in console], console[-3000:]
    kept = (REPO / "demo" / "run" / "peft_megatron.log").read_text()
    assert [line for line in CHATTER if line in kept]  # the chatter is in the log file, not lost
