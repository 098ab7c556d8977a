"""The console shows our lines and what matters; other libraries' chatter goes to the run's log file."""

from __future__ import annotations

import logging
import warnings

import pytest

from conftest import REPO, run_script
from nemo_finetune.console import log_to_file, phase, prints_to_log_file, setup_logging

# Lines users met at the default level before (issue 15), each from another library.
CHATTER = [
    "fused_indices_to_multihot has reached end of life",
    "No exporters were provided",
    "The deploy module could not be imported",
    "Detected Megatron Core, using Megatron-FSDP",
]


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
        warnings.warn("The pynvml package is deprecated", FutureWarning, stacklevel=1)

    console = capsys.readouterr().out
    assert "INFO peft_megatron.data] prepared 19 test rows" in console
    assert "ERROR megatron.core.dist_checkpointing] shard 3 is truncated" in console  # others' errors still show
    assert not any(line in console for line in [*CHATTER[:3], "pynvml"])
    kept = log_file.read_text()
    assert all(line in kept for line in [*CHATTER[:3], "prepared 19 test rows", "shard 3 is truncated", "pynvml"])


@pytest.mark.parametrize("level, shown", [("INFO", False), ("DEBUG", True)])
def test_the_shims_lines_go_to_the_log_file_and_reach_the_console_at_debug(
    isolated_logging, tmp_path, capsys, level, shown
):
    setup_logging(level)
    log_file = log_to_file(tmp_path / "run.log")
    shim = logging.getLogger("peft_megatron.compat")
    shim.info("compat: peft-te-guards (LoRA wraps Megatron's local linears)")
    shim.warning("compat: megatron-core 0.16.0 is newer than the version these shims were written for")
    console = capsys.readouterr().out
    assert ("compat: peft-te-guards" in console) is shown and "compat: megatron-core 0.16.0" in console
    assert "compat: peft-te-guards" in log_file.read_text()


def test_library_prints_go_to_the_log_file_and_stay_on_the_console_without_one(isolated_logging, tmp_path, capsys):
    setup_logging("INFO")
    with prints_to_log_file("nemo.import_ckpt", "INFO"):  # --import_only writes no log file: nothing is lost
        print("Imported Checkpoint (no log file)")
    log_file = log_to_file(tmp_path / "run.log")
    with prints_to_log_file("nemo.import_ckpt", "INFO"):
        print("Imported Checkpoint\n\x1b[1m├── context/\x1b[0m")  # rich's colours on a terminal
        logging.getLogger("peft_megatron").info("imported checkpoint written")
        print("└── weights/", end="")  # an unfinished line is kept too
    with prints_to_log_file("nemo.import_ckpt", "DEBUG"):
        print("shown at DEBUG")
    console = capsys.readouterr().out
    assert "Imported Checkpoint (no log file)" in console and "shown at DEBUG" in console
    assert "├── context/" not in console and "└── weights/" not in console
    assert "INFO peft_megatron] imported checkpoint written" in console
    kept = log_file.read_text(encoding="utf-8")
    assert "INFO nemo.import_ckpt] ├── context/" in kept and "INFO nemo.import_ckpt] └── weights/" in kept


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
    assert out.stdout.splitlines()[0].strip(), out.stdout[:500]  # no blank lines before our first one
    assert "Generating train split" not in console and "compat: " not in console
    kept = (REPO / "demo" / "run" / "peft_megatron.log").read_text()
    assert [line for line in CHATTER if line in kept]  # the chatter is in the log file, not lost


# A training worker's output, as NeMo 2.7.3 / Lightning / Megatron print it (run 44 of docs/gpu-validation.md),
# ending in an error; run through torchrun by NeMo-Run's LocalExecutor, which tails it to the console.
WORKER = r"""
import sys
print("[NeMo I 2026-12-02 01:08:14 megatron_init:1] Rank 0 has tensor model parallel rank: 0")
print("WARNING:megatron.core.utils:fused_indices_to_multihot has reached end of life.")
print("[08:14:02 INFO peft_megatron.compat] compat: torch-optimizer-kernels (torch's fused AdamW)", file=sys.stderr)
print("Restoring states from the checkpoint path at /run/nemo_logs/checkpoints/x-last")
for i in range(25):
    print(f"Training epoch 0, iteration {i}/24 | lr: 0.001 | global_step: {i} | reduced_train_loss: {6 - i / 10:.2f}")
print("INFO:pytorch_lightning.utilities.rank_zero:Epoch 0, global step 24: 'val_loss' reached 1.52945 (best 1.52945), "
      "saving model to '/run/nemo_logs/checkpoints/x.ckpt' as top 1")
print("INFO:pytorch_lightning.utilities.rank_zero:`Trainer.fit` stopped: `max_steps=24` reached.")
print("[NeMo I 2026-12-02 01:10:49 model_checkpoint:677] Async checkpoint save for step 25 finalized successfully.")
# A failed kernel assertion, as CUDA prints it: a line per GPU thread (docs/gpu-validation.md, run 93).
for thread in range(29, 32):
    print("/pytorch/aten/src/ATen/native/cuda/IndexKernelUtils.cu:16: vectorized_gather_kernel: block: [448,0,0], "
          f"thread: [{thread},0,0] Assertion `ind >=0 && ind < ind_dim_size` failed.", file=sys.stderr)
raise RuntimeError("CUDA error: device-side assert triggered")
"""
LAUNCH = r"""
import gc, logging, sys
import nemo_run as run
from nemo_finetune.compat.fixes import experiment
from nemo_finetune.console import log_to_file, quiet_workers, setup_logging
setup_logging(sys.argv[1])
log_to_file(sys.argv[2] + "/peft_megatron.log")
script = run.Script(path=sys.argv[2] + "/worker.py", entrypoint="python")
executor = run.LocalExecutor(ntasks_per_node=1, launcher="torchrun")
with quiet_workers("qwen3_600m", sys.argv[1], 10), experiment("t", executor=executor, base_dir=sys.argv[2]) as exp:
    exp.add(script, tail_logs=True, name="qwen3_600m")
    exp.run(detach=False)
states = [str(job.state) for job in exp.jobs]
del exp
gc.collect()
logging.getLogger("peft_megatron").info("after the launch")
print("states", states)
"""


def launch_worker(tmp_path, level: str) -> tuple[list[str], list[str]]:
    """The worker's lines on the console of a real NeMo-Run launch (torchrun), without their role/rank prefix, and
    the console's other lines."""
    import os
    import re
    import subprocess
    import sys

    (tmp_path / "worker.py").write_text(WORKER)
    env = {
        **os.environ,
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "NEMORUN_HOME": str(tmp_path / "home"),
    }
    out = subprocess.run(
        [sys.executable, "-c", LAUNCH, level, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=240,
    )
    assert out.returncode == 0 and "FAILED" in out.stdout.splitlines()[-1], out.stdout[-3000:] + out.stderr[-3000:]
    # NeMo-Run swaps the root logger's handlers for its own: our lines after the launch keep our format and file
    assert re.search(r"^\[[\d:]+ INFO peft_megatron\] after the launch$", out.stdout, re.M), out.stdout[-2000:]
    assert "INFO peft_megatron] after the launch" in (tmp_path / "peft_megatron.log").read_text()
    worker = re.compile(r"^(?:\x1b\[[0-9;:]*m)?qwen3_600m/0(?:\x1b\[[0-9;:]*m)? (?:\[default0\]:)?")
    lines = out.stdout.splitlines()
    others = [line for line in lines if not worker.match(line)]
    return [worker.sub("", line) for line in lines if worker.match(line)], others


NEMO_RUN_CHATTER = ("Entering Experiment", "Waiting for Experiment", "Experiment Status", "Experiment.from_id")


def test_console_shows_workers_progress_checkpoints_and_errors_and_the_file_has_all(tmp_path):
    shown, others = launch_worker(tmp_path, "INFO")
    for chatter in NEMO_RUN_CHATTER:  # NeMo-Run's banner and status blocks: in the log file only
        assert not any(chatter in line for line in others), (chatter, others)
    assert not any(line.strip() == "" for line in others), others
    progress = [line.split(" |")[0] for line in shown if line.startswith("Training epoch")]
    assert progress == [f"Training epoch 0, iteration {i}/24" for i in (0, 10, 20, 24)]  # every 10th, and the last
    decisions = ("Restoring states from the checkpoint path", "'val_loss' reached 1.52945", "`max_steps=24` reached")
    for decision in decisions:
        assert any(decision in line for line in shown), decision
    error = shown.index("Traceback (most recent call last):")  # the failing worker's traceback, whole
    assert "RuntimeError: CUDA error: device-side assert triggered" in shown[error:]
    assertions = [line for line in shown if "Assertion `" in line]  # the first; the other threads' are counted
    assert assertions == [
        "/pytorch/aten/src/ATen/native/cuda/IndexKernelUtils.cu:16: vectorized_gather_kernel: block: [448,0,0], "
        "thread: [29,0,0] Assertion `ind >=0 && ind < ind_dim_size` failed."
    ]
    assert "(2 more kernel assertion lines like it, one per GPU thread, in the logs)" in others
    assert any("ChildFailedError" in line for line in shown[error:])
    for hidden in ("megatron_init", "fused_indices_to_multihot", "finalized successfully", "nproc_per_node", "compat:"):
        assert not any(hidden in line for line in shown), hidden
    logged = (tmp_path / "peft_megatron.log").read_text()
    for line in (
        "megatron_init",
        "compat: torch-optimizer-kernels",
        "fused_indices_to_multihot",
        "finalized successfully",
        "iteration 7/24",
        "RuntimeError: CUDA error: device-side assert triggered",
        "thread: [31,0,0] Assertion",
        *NEMO_RUN_CHATTER,
    ):
        assert line in logged, line


def test_debug_console_shows_every_worker_line(tmp_path):
    shown, others = launch_worker(tmp_path, "DEBUG")
    assert all(any(chatter in line for line in others) for chatter in NEMO_RUN_CHATTER), others
    assert sum(line.startswith("Training epoch") for line in shown) == 25
    assert any("fused_indices_to_multihot" in line for line in shown)
