"""The reason a failed training run gives: read from the workers' own log, the root cause first."""

from __future__ import annotations

import os
import re
from pathlib import Path

from conftest import fake_nvidia_smi, qa_job, run_script
from nemo_finetune.failures import failure_reason, local_worker_log

# The lines of a worker that hit an out-of-range index on an H100 (torch 2.11), shortened to three GPU threads.
KERNEL_ASSERT_LOG = """\
[default0]:/pytorch/aten/src/ATen/native/cuda/IndexKernelUtils.cu:16: vectorized_gather_kernel: block: [448,0,0], \
thread: [29,0,0] Assertion `ind >=0 && ind < ind_dim_size && "vectorized gather kernel index out of bounds"` failed.
[default0]:/pytorch/aten/src/ATen/native/cuda/IndexKernelUtils.cu:16: vectorized_gather_kernel: block: [448,0,0], \
thread: [30,0,0] Assertion `ind >=0 && ind < ind_dim_size && "vectorized gather kernel index out of bounds"` failed.
[default0]:/pytorch/aten/src/ATen/native/cuda/IndexKernelUtils.cu:16: vectorized_gather_kernel: block: [448,0,0], \
thread: [31,0,0] Assertion `ind >=0 && ind < ind_dim_size && "vectorized gather kernel index out of bounds"` failed.
[default0]:[rank0]: torch.AcceleratorError: CUDA error: device-side assert triggered
[default0]:terminate called after throwing an instance of 'c10::DistBackendError'
[default0]:  what():  [PG ID 0 PG GUID 0(default_pg) Rank 0] Process group watchdog thread terminated with exception
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
"""


def test_a_kernel_assertion_is_the_reason_before_the_errors_it_causes(tmp_path):
    log = tmp_path / "combined.log"
    log.write_text(KERNEL_ASSERT_LOG)
    assert failure_reason(log) == (
        "a CUDA kernel's assertion failed in 3 GPU threads: vectorized_gather_kernel "
        "(/pytorch/aten/src/ATen/native/cuda/IndexKernelUtils.cu:16): "
        'ind >=0 && ind < ind_dim_size && "vectorized gather kernel index out of bounds" (a token id outside the '
        "model's vocabulary does this; PEFT_MEGATRON_WORKER_TRIAL=token-id-check names the ids that reached the GPU "
        "and where they came from: docs/GUIDE.md, Troubleshooting)"
    )
    log.write_text(KERNEL_ASSERT_LOG.replace("vectorized_gather_kernel", "scatter_kernel").replace("gather ", ""))
    assert failure_reason(log).endswith('"vectorized kernel index out of bounds"')  # no hint for other kernels


def test_otherwise_the_reason_is_the_workers_last_exception_not_torchruns_report(tmp_path):
    log = tmp_path / "combined.log"
    log.write_text(
        "[default0]:[rank0]: Traceback (most recent call last):\n"
        "[default0]:[rank0]: ValueError: an early problem\n"
        "[default0]:[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
    )
    assert failure_reason(log) == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    log.write_text("[default0]:Training epoch 0, iteration 3/9\n")
    assert failure_reason(log) is None and failure_reason(tmp_path / "absent.log") is None


def test_the_workers_log_is_the_newest_job_of_this_launch(tmp_path):
    jobs = tmp_path / "jobs"
    older, newer = (jobs / "experiments" / name / "role" / "0" / "combined.log" for name in ("a_1", "a_2"))
    for path, mtime in ((older, 1_000), (newer, 2_000)):
        path.parent.mkdir(parents=True)
        path.write_text("x\n")
        os.utime(path, (mtime, mtime))
    assert local_worker_log(jobs, since=0) == newer
    assert local_worker_log(jobs, since=1_500) == newer
    assert local_worker_log(jobs, since=2_500) is None  # an earlier launch's log is not this one's


def test_a_local_launch_whose_workers_fail_names_their_reason_and_their_log(assets, tmp_path):
    """A real launch (NeMo-Run, torchrun, the workers) on a machine whose nvidia-smi lists a GPU that torch cannot
    use: the workers fail as on a broken GPU node, and the error is their own reason, not torchrun's report."""
    job = ["--max_steps", "2", "--val_check_interval", "2", "--micro_batch_size", "1", "--global_batch_size", "1",
           "--limit_val_batches", "1"]  # fmt: skip
    out = run_script(
        "peft_megatron.py", *qa_job(assets["qwen3"], tmp_path / "out", *job, dataset=assets["data"]),
        env=fake_nvidia_smi(tmp_path, 1),
    )  # fmt: skip
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    message = re.search(r"^error: training failed: (.*); the workers' log: (\S+)$", out.stderr, re.M)
    assert message, out.stderr[-3000:]
    assert message[1] == "MisconfigurationException: No supported gpu backend found!"
    log = Path(message[2])
    assert log.name == "combined.log" and log.is_relative_to(tmp_path / "out" / "jobs")
    assert "No supported gpu backend found" in log.read_text()
    assert "Traceback" not in out.stderr
