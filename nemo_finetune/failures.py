"""Why the training workers failed, read from their log: the one line a user needs first. A CUDA kernel's assertion
(an index out of range, printed once per failing GPU thread) comes before the exceptions it causes, which only say
"device-side assert triggered"; otherwise the workers' last exception is the reason."""

from __future__ import annotations

import re
from pathlib import Path

# torchrun's per-rank prefixes ([default0]:[rank0]:), then an exception line: `torch.AcceleratorError: CUDA error`.
WORKER_ERROR = re.compile(r"^(?:\[\w+\]:)*\s*(?:[\w.]+\.)?(\w+(?:Error|Exception)\b.*)$")
# `/pytorch/aten/src/ATen/native/cuda/IndexKernelUtils.cu:16: vectorized_gather_kernel: block: [448,0,0], thread:
# [29,0,0] Assertion `ind >=0 && ind < ind_dim_size && "vectorized gather kernel index out of bounds"` failed.`
KERNEL_ASSERTION = re.compile(r"([\w./-]+\.cuh?:\d+): (\w+): block: .*Assertion `(.*)` failed")
NOT_A_REASON = ("ChildFailedError",)  # torchrun's report that a worker failed, not why
# An index gather out of range in a training worker: most often a token id the embedding has no row for.
GATHER_HINT = (
    "a token id outside the model's vocabulary does this; PEFT_MEGATRON_WORKER_TRIAL=token-id-check names the ids "
    "that reached the GPU and where they came from: docs/GUIDE.md, Troubleshooting"
)


def failure_reason(log_file: Path | None) -> str | None:
    """The first kernel assertion in `log_file` (with how many GPU threads hit one), else the last worker exception
    line (`MisconfigurationException: No supported gpu backend found!`); None without either."""
    if log_file is None or not Path(log_file).is_file():
        return None
    assertion, assertions, exception = None, 0, None
    with open(log_file, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            kernel = KERNEL_ASSERTION.search(line)
            if kernel:
                assertion = assertion or kernel
                assertions += 1
                continue
            match = WORKER_ERROR.match(line)
            if match and not match[1].startswith(NOT_A_REASON):
                exception = match[1]
    if assertion:
        where, name, condition = assertion.groups()
        threads = f"{assertions} GPU threads" if assertions > 1 else "a GPU thread"
        reason = f"a CUDA kernel's assertion failed in {threads}: {name} ({where}): {condition}"
        if "gather" in name and "out of bounds" in condition:
            reason += f" ({GATHER_HINT})"
        return reason
    return exception


def local_worker_log(jobs_dir: Path, since: float) -> Path | None:
    """The workers' own log (NeMo-Run writes combined.log for each local job) of the newest job started at `since`
    (a timestamp) or later; None if there is none."""
    logs = [path for path in Path(jobs_dir).glob("experiments/**/combined.log") if path.stat().st_mtime >= since]
    return max(logs, key=lambda path: path.stat().st_mtime, default=None)
