"""Phase 4: the launch through NeMo-Run: torchrun on this node, or an sbatch job through its SlurmExecutor."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from pathlib import Path

from nemo_finetune import slurm
from nemo_finetune.compat.fixes import experiment
from nemo_finetune.console import prints_to_log_file, quiet_workers
from nemo_finetune.errors import PipelineError
from nemo_finetune.failures import failure_reason, local_worker_log
from nemo_finetune.files import atomic_write_text
from nemo_finetune.layout import REPO_DIR, STARTUP_DIR
from nemo_finetune.rendezvous import rendezvous_environ, scoped_environ

log = logging.getLogger("peft_megatron")


def configure_executor(config, env=None):
    import nemo_run as run

    from nemo_finetune import compat

    env = env or compat.detect_environment()
    pythonpath = os.pathsep.join(p for p in (str(REPO_DIR), os.environ.get("PYTHONPATH", "")) if p)
    env_vars = {
        "PYTHONPATH": pythonpath,  # the workers import dataset_module and nemo_finetune from this repository
        "TOKENIZERS_PARALLELISM": "false",
    }
    # nemo_finetune/startup/sitecustomize.py applies the workers' shims before NeMo loads (compat.apply says which).
    env_vars["PYTHONPATH"] = os.pathsep.join([str(STARTUP_DIR), pythonpath])
    if runs_own_torchrun(config):
        # NeMo-Run starts `torchrun` by name: the first on the workers' PATH is install_torchrun's.
        env_vars["PATH"] = os.pathsep.join([str(config.layout.launcher.resolve()), os.environ.get("PATH", "")])
    env_vars.update(compat.worker_environment(env, cuda_graphs=config.cuda_graphs, seed=config.data.seed))
    if config.executor == "slurm":
        return _slurm_executor(config, env_vars)
    return run.LocalExecutor(
        ntasks_per_node=config.gpus_per_node, nodes=config.num_nodes, launcher="torchrun", env_vars=env_vars
    )


def runs_own_torchrun(config) -> bool:
    """Whether the workers start with this Python's torch; a Slurm job's container image brings its own torchrun."""
    return not (config.executor == "slurm" and config.container_image)


def own_torchrun_command() -> str:
    """torchrun of the Python that runs this script, whether or not its environment is activated or has a
    `torchrun` script (a venv that sees a system torch has none); another environment's torchrun would train with
    other packages."""
    return f"{shlex.quote(sys.executable)} -m torch.distributed.run"


def install_torchrun(config) -> None:
    """Write the `torchrun` that configure_executor puts first on the workers' PATH (under the run's directory, so a
    Slurm job's nodes see it on the shared file system)."""
    script = config.layout.launcher / "torchrun"
    script.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(script, f'#!/bin/sh\nexec {own_torchrun_command()} "$@"\n')
    script.chmod(0o755)


def target_environment(config, local):
    """Where the training workers run: this machine for --executor local; for Slurm the compute nodes, which have
    GPUs, and TE when they run a container image (NeMo's images hold it) or this environment has it."""
    if config.executor == "local":
        return local
    from nemo_finetune import compat

    return compat.Environment(has_te=local.has_te or bool(config.container_image), has_cuda=True)


def _slurm_executor(config, env_vars: dict):
    import nemo_run as run

    mounts = [m.strip() for m in config.container_mounts.split(",") if m.strip()]
    if config.container_image:
        # The workers import this repository's modules and read and write the run's files at the same paths.
        run_dirs = (config.output_path, config.data_path, config.nemo_ckpt_path)
        shared = sorted({REPO_DIR, *(p.resolve() for p in run_dirs)})
        shared = [p for p in shared if not any(q != p and q in p.parents for q in shared)]
        mounts += [f"{p}:{p}" for p in shared]
    executor = run.SlurmExecutor(
        account=config.slurm_account,
        partition=config.slurm_partition,
        time=config.slurm_time,
        nodes=config.num_nodes,
        ntasks_per_node=config.gpus_per_node,
        gpus_per_node=config.gpus_per_node,
        container_image=config.container_image,
        container_mounts=mounts,
        env_vars=env_vars,
        # Where the experiment writes the job's files (NeMo-Run's <base_dir>/experiments): sbatch reads the script
        # and the job writes its logs there, on the file system it shares with this node.
        tunnel=run.LocalTunnel(job_dir=str(config.layout.jobs.resolve() / "experiments")),
    )
    executor.launcher = "torchrun"  # one torchrun per node, rendezvous at the first node (NeMo-Run's sbatch script)
    return executor


def run_experiment(config, executor):
    """The run's NeMo-Run experiment (entered with `with`), its files under the run's jobs/ directory."""
    return experiment(
        config.experiment_title,
        executor=executor,
        log_level=config.log_level,
        base_dir=str(config.layout.jobs.resolve()),
    )


def submit_training(config, recipe, executor) -> float | None:
    """--executor slurm: submit the job, record its id in the run directory (checks.py refuses a second one while it
    is queued or running), then wait for its end (its wall time in seconds) or, with --detach, return None."""
    from torchx.specs.api import parse_app_handle

    if runs_own_torchrun(config):
        install_torchrun(config)
    started = time.monotonic()
    with (
        prints_to_log_file("nemo_run", config.log_level),  # NeMo-Run's experiment banner and how-to-inspect block
        run_experiment(config, executor) as exp,
    ):
        exp.add(recipe, tail_logs=False, name=config.recipe_cls_name)
        exp.run(detach=True)
    (job,) = exp.jobs
    job_id = parse_app_handle(job.handle).app_id
    experiment_dir = Path(exp._exp_dir)  # NeMo-Run names no public accessor
    slurm.write_record(config.layout.jobs, job_id, experiment_dir)
    log_file = slurm.worker_log(experiment_dir, job_id) or slurm.expected_log(experiment_dir, job_id)
    print(f"submitted Slurm job {job_id}; its log: {log_file}", flush=True)
    if config.detach:
        print(slurm.how_to_follow(job_id, log_file), flush=True)
        return None
    log.info("waiting for Slurm job %s to end (%s)", job_id, slurm.how_to_follow(job_id, log_file))
    try:
        final = slurm.wait(job_id)
    except PipelineError as e:
        raise PipelineError(f"{e}: {log_file}") from None
    log_file = slurm.worker_log(experiment_dir, job_id) or log_file
    if final != "COMPLETED":
        reason = failure_reason(log_file) or "no error line in the log"
        raise PipelineError(f"Slurm job {job_id} ended {final}: {reason}; the job's log: {log_file}")
    log.info("Slurm job %s completed; checkpoints under %s", job_id, config.layout.checkpoints)
    return time.monotonic() - started


def launch_training(config, recipe, executor) -> float:
    """Run the experiment to its end; returns its wall time in seconds."""
    from torchx.specs.api import AppState

    started, launched = time.monotonic(), time.time()
    if config.enable_pytorch_profiler or config.enable_memory_profile:
        config.layout.profiles.mkdir(parents=True, exist_ok=True)  # the callbacks require it to exist
    log.info("training workers' output: in full in %s; here, what matters", config.layout.log_file)
    install_torchrun(config)
    # A single job's workers are waited for (and their output tailed) when the experiment's context exits.
    with (
        quiet_workers(config.recipe_cls_name, config.log_level, config.log_every_n_steps),
        scoped_environ(rendezvous_environ(config, os.environ)),  # NeMo-Run reads them while it builds the launch
        run_experiment(config, executor) as exp,
    ):
        exp.add(recipe, tail_logs=True, name=config.recipe_cls_name)
        exp.run(detach=False)
    states = {job.id: job.state for job in exp.jobs}  # final only once the context has waited for the jobs
    failed = {jid: str(state) for jid, state in states.items() if state != AppState.SUCCEEDED}
    if failed:
        worker_log = local_worker_log(config.layout.jobs, since=launched - 2)  # 2 s: file systems' time steps
        reason = failure_reason(worker_log) or f"job states {failed}, no error line in the workers' log"
        raise PipelineError(f"training failed: {reason}; the workers' log: {worker_log or config.layout.jobs}")
    log.info("fine-tuning finished; checkpoints under %s", config.layout.checkpoints)
    return time.monotonic() - started


def launch_command(config, recipe, executor) -> str:
    """The torchrun command NeMo-Run would run on this node (the serialized recipe argument abbreviated), as the
    `torchrun` first on the workers' PATH runs it: with this Python's torch."""
    from nemo_run.run.torchx_backend.packaging import package

    role = package(config.recipe_cls_name, recipe, executor, serialize_to_file=False).roles[0]
    args = [a if len(a) < 200 else f"<serialized recipe, {len(a)} chars>" for a in role.args]
    entrypoint = role.entrypoint
    if entrypoint == "torchrun" and runs_own_torchrun(config):
        entrypoint = own_torchrun_command()
    return " ".join([entrypoint, *args])


def slurm_script(config, recipe, executor) -> str:
    """The sbatch script NeMo-Run would submit, from NeMo-Run's own dry run; the files it writes are removed."""
    import shutil

    base = config.layout.jobs.resolve()
    created = [p for p in (base, *base.parents) if not p.exists()]
    exp = None
    try:
        with experiment(config.experiment_title, executor=executor, base_dir=str(base), log_level="WARN") as exp:
            exp.add(recipe, tail_logs=False, name=config.recipe_cls_name)
            exp.dryrun(log=False, delete_exp_dir=False)
            return next(Path(exp._exp_dir).glob("*_sbatch.sh")).read_text()  # NeMo-Run names no public accessor
    finally:
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)
        elif exp is not None:
            shutil.rmtree(exp._exp_dir, ignore_errors=True)
