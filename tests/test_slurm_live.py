"""The Slurm path against a live one-node cluster (the `slurm_cluster` fixture): peft_megatron.py imports and
prepares on this "login node", submits through NeMo-Run's SlurmExecutor and LocalTunnel, and then waits, or detaches;
the job's states are Slurm's own (squeue, sacct). The node's GPUs are only a count: the workers find none."""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest

from conftest import qa_job, run_script

pytest.importorskip("nemo_run")


def slurm_job(assets, output_dir, *extra: str) -> list[str]:
    return [*qa_job(assets["qwen3"], output_dir, dataset=assets["data"]), "--recipe_cls_name", "qwen3_600m",
            "--executor", "slurm", "--slurm_account", "root", "--slurm_partition", "debug",
            "--micro_batch_size", "1", "--global_batch_size", "1", "--max_steps", "5", "--val_check_interval", "5",
            "--limit_val_batches", "1", *extra]  # fmt: skip


def slurm(command: str, cluster: dict) -> str:
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", **cluster}
    return subprocess.run(shlex.split(command), capture_output=True, text=True, env=env, timeout=60, check=True).stdout


def job_state(job_id: str, cluster: dict) -> str:
    """The job's state in Slurm's accounting; "" while sacct has no record of it yet (a cancelled job that never
    started can reach the accounting a moment after scancel returns)."""
    return (slurm(f"sacct -n -P -X -j {job_id} -o State", cluster).split() or [""])[0]


def test_a_job_runs_under_slurm_and_its_failure_comes_back_as_a_local_runs_does(assets, slurm_cluster, tmp_path):
    out = tmp_path / "run"
    result = run_script("peft_megatron.py", *slurm_job(assets, out), env=slurm_cluster)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = re.search(r"submitted Slurm job (\d+); its log: ", result.stdout)[1]
    recorded = json.loads((out / "jobs" / "slurm_job.json").read_text())
    assert recorded["job_id"] == job_id
    message = re.search(rf"error: Slurm job {job_id} ended FAILED: (.*); the job's log: (\S+)", result.stderr)
    assert message, result.stderr[-3000:]
    assert message[1] == "MisconfigurationException: No supported gpu backend found!"  # the worker's own reason
    log = message[2]
    assert f"_{job_id}_0.out" in log and "No supported gpu backend found" in open(log).read()
    assert "Traceback" not in result.stderr and "nemo experiment" not in result.stdout  # NeMo-Run's banner: the log's
    assert job_state(job_id, slurm_cluster) == "FAILED"
    steps = slurm(f"sacct -n -P -j {job_id} -o JobName,State", slurm_cluster).split()
    assert "torchrun|FAILED" in steps  # torchrun ran as a step of the job: under Slurm, with its SLURM_JOB_ID
    script = next((out / "jobs" / "experiments").rglob("*_sbatch.sh")).read_text()
    assert "--nnodes 1 --nproc-per-node 1" in script and "--gpus-per-node=1" in script


def test_detach_returns_with_the_job_and_its_cancel_command_and_one_run_has_one_job(assets, slurm_cluster, tmp_path):
    blocker = slurm("sbatch --parsable --exclusive -o /dev/null --wrap 'sleep 600'", slurm_cluster).strip()
    try:
        out = tmp_path / "run"
        detached = run_script("peft_megatron.py", *slurm_job(assets, out, "--detach"), env=slurm_cluster)
        assert detached.returncode == 0, detached.stdout[-3000:] + detached.stderr[-3000:]
        job_id = re.search(r"submitted Slurm job (\d+); its log: ", detached.stdout)[1]
        assert f"squeue -j {job_id}" in detached.stdout
        cancel = re.search(rf"cancel it: (scancel {job_id})$", detached.stdout, re.M)[1]
        assert slurm(f"squeue -h -j {job_id} -o %T", slurm_cluster).strip() == "PENDING"  # behind the blocker

        again = run_script("peft_megatron.py", *slurm_job(assets, out), env=slurm_cluster)
        assert again.returncode == 2
        assert f"Slurm job {job_id} of this run ({out}) is still PENDING" in again.stderr
        assert f"scancel {job_id}" in again.stderr
        plan = run_script("peft_megatron.py", *slurm_job(assets, out), "--dry_run", env=slurm_cluster)
        assert plan.returncode == 2 and f"Slurm job {job_id} of this run" in plan.stderr  # the plan checks it too

        slurm(cancel, slurm_cluster)
        for _ in range(60):
            if job_state(job_id, slurm_cluster) == "CANCELLED":
                break
            subprocess.run(["sleep", "0.5"])
        assert job_state(job_id, slurm_cluster) == "CANCELLED"
    finally:
        slurm(f"scancel {blocker}", slurm_cluster)


def test_waiting_for_a_job_slurm_does_not_know_ends_with_a_message_not_a_hang():
    """squeue and sacct both silent (no such job, or a cluster without accounting): the wait stops with the reason.
    Runs anywhere: without Slurm's commands, Slurm knows no job either."""
    from nemo_finetune import slurm
    from nemo_finetune.errors import PipelineError

    with pytest.raises(PipelineError, match="Slurm knows no job 999999999 .*is accounting on"):
        slurm.wait("999999999", poll_s=0.01, unknown_polls=3)
