r"""Run peft_megatron.py as an Amazon SageMaker training job: a `sagemaker.pytorch.PyTorch` estimator whose
hyperparameters come from peft_megatron.py's own Config.

    pip install "sagemaker>=2.250,<3"   # SDK v2 (v3 replaced the framework estimators with ModelTrainer)

    # two ml.p5.48xlarge instances (16 H100s), data prepared as JSONL in S3 (the `training` channel)
    python examples/sagemaker_job.py --role arn:aws:iam::123456789012:role/SageMakerRole \
        --image_uri 123456789012.dkr.ecr.us-east-1.amazonaws.com/nemo:25.09 --instance_count 2 \
        --training_data s3://my-bucket/prepared/ -- --hf_model_id Qwen/Qwen3-8B --recipe_cls_name qwen3_8b \
        --max_steps 2000 --output_dir /opt/ml/input/data/fsx/qwen3-8b   # FSx for Lustre, shared by both

    # print what would be submitted (hyperparameters, the command each instance runs); submit nothing, contact no
    # AWS service, need no AWS configuration
    python examples/sagemaker_job.py --role ... --image_uri ... --dry_run -- --hf_model_id Qwen/Qwen3-8B

    # --output_dir on FSx for Lustre, mounted read-write on every instance (the job runs in your VPC)
    python examples/sagemaker_job.py --role ... --image_uri ... --instance_count 2 \
        --file_system_id fs-0123456789abcdef0 --file_system_path /fsxmount/runs \
        --subnets subnet-0abc --security_group_ids sg-0abc -- --hf_model_id Qwen/Qwen3-8B ...

The flags after `--` are peft_megatron.py's. They are parsed here by its own parser, so a misspelled flag or a bad
value fails before any instance starts, and only the flags given travel: on each instance SageMaker's environment
fills the rest (SM_HOSTS / SM_CURRENT_HOST -> --num_nodes / --node_rank, the first host being the rendezvous;
SM_NUM_GPUS -> --gpus_per_node; SM_CHANNEL_TRAINING -> --data_dir; SM_MODEL_DIR -> --output_dir, which SageMaker
uploads when the job ends). A job of several instances needs --output_dir on a filesystem they all mount (FSx for
Lustre or EFS): global rank 0 imports and prepares data once for every node, and checkpoints are written from all
nodes. --file_system_id attaches one as the `fsx` channel (SageMaker's FileSystemInput, read-write, in the VPC of
--subnets / --security_group_ids) at /opt/ml/input/data/fsx, and --output_dir defaults to it.
peft_megatron.py starts torchrun on every instance itself, so the estimator runs the entry point once per instance
(no `distribution`). The image must hold requirements.txt's stack; SageMaker
pip-installs requirements.txt from the uploaded source directory when the job starts (what is present is kept).
`--forward_env HF_TOKEN,WANDB_API_KEY` copies those variables from this shell into the job (values never printed).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import peft_megatron as pm  # noqa: E402  (the repository root is not a package)
from nemo_finetune.cli import flags_of, iter_fields, parse_dataclass_args, run_cli, with_config_file  # noqa: E402
from nemo_finetune.console import setup_logging  # noqa: E402
from nemo_finetune.errors import ConfigError  # noqa: E402

FSX_MOUNT = "/opt/ml/input/data/fsx"  # where SageMaker mounts the `fsx` channel on every instance

# Set by SageMaker on the instances; given explicitly they would fight what the cluster really is.
SAGEMAKER_OWNED = ("node_rank", "dry_run", "demo", "import_only", "prepare_data_only")


@dataclass
class JobConfig:
    """The SageMaker side of the job; peft_megatron.py's flags follow `--`."""

    role: str = field(default="", metadata={"group": "SageMaker", "help": "IAM role ARN the job runs as (required)"})
    image_uri: str = field(default="", metadata={"help": "training image with requirements.txt's stack (required)"})
    instance_type: str = field(default="ml.p5.48xlarge", metadata={"help": "instance type (GPUs per instance)"})
    instance_count: int = field(default=1, metadata={"help": "instances (nodes)"})
    training_data: str | None = field(
        default=None, metadata={"help": "S3 URI of prepared JSONL (the `training` channel -> --data_dir)"}
    )
    output_path: str | None = field(default=None, metadata={"help": "S3 URI for model.tar.gz (default: SDK's)"})
    volume_size_gb: int = field(default=500, metadata={"help": "EBS volume per instance (model, data, checkpoints)"})
    max_run_hours: float = field(default=24.0, metadata={"help": "stop the job after this many hours"})
    job_name: str = field(default="peft-megatron", metadata={"help": "base job name"})
    forward_env: str = field(default="", metadata={"help": "comma-separated variables copied into the job"})
    region: str | None = field(
        default=None, metadata={"help": "AWS region (default: your AWS configuration's; a dry run needs none)"}
    )
    file_system_id: str | None = field(
        default=None, metadata={"help": "FSx for Lustre or EFS file system for --output_dir (the `fsx` channel)"}
    )
    file_system_type: str = field(
        default="FSxLustre", metadata={"help": "type of --file_system_id", "choices": ("FSxLustre", "EFS")}
    )
    file_system_path: str = field(
        default="/", metadata={"help": "directory of the file system to mount (FSx for Lustre: /<mount name>/...)"}
    )
    subnets: str = field(default="", metadata={"help": "comma-separated VPC subnets (required by a file system)"})
    security_group_ids: str = field(
        default="", metadata={"help": "comma-separated security groups (required by a file system)"}
    )
    wait: bool = field(default=True, metadata={"help": "stream the job's logs until it ends"})
    dry_run: bool = field(default=False, metadata={"help": "print what would be submitted; submit nothing"})


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this script's flags, peft_megatron.py's flags after `--`)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def training_hyperparameters(train_argv: list[str]) -> dict:
    """peft_megatron.py's explicitly given flags as {name: value}, parsed by its own parser (argparse exits 2 on a
    bad flag). `auto` stays `auto`: it is resolved on the instance, for the instance's GPUs."""
    # A --config file's settings travel as flags (the instances do not have the file).
    config, explicit = parse_dataclass_args(pm.Config, with_config_file(pm.Config, train_argv), pm.__doc__)
    explicit -= {"config", "write_config"}
    owners = {f.name: parent for f, _, parent in iter_fields(pm.Config)}
    flags = flags_of(pm.Config)
    values = {}
    for name in sorted(explicit):
        value = getattr(getattr(config, owners[name]) if owners[name] else config, name)
        values[flags[name]] = "auto" if value is None else value
    return values


def validate_job(job: JobConfig, hyperparameters: dict) -> None:
    problems = []
    for flag in ("role", "image_uri"):
        if not getattr(job, flag):
            problems.append(f"--{flag} is required")
    if job.instance_count < 1 or job.volume_size_gb < 1 or job.max_run_hours <= 0:
        problems.append("--instance_count, --volume_size_gb and --max_run_hours must be positive")
    if "num_nodes" in hyperparameters and hyperparameters["num_nodes"] != job.instance_count:
        problems.append(
            f"--num_nodes {hyperparameters['num_nodes']} (after --) differs from --instance_count "
            f"{job.instance_count}; drop --num_nodes (SageMaker sets it from the instances)"
        )
    if job.file_system_id:
        if not (job.subnets and job.security_group_ids):
            problems.append(
                f"--file_system_id {job.file_system_id}: a file system is reached from your VPC; give --subnets and "
                "--security_group_ids that can reach it"
            )
        output_dir = str(hyperparameters.get("output_dir", FSX_MOUNT))
        if output_dir != FSX_MOUNT and not output_dir.startswith(FSX_MOUNT + "/"):
            problems.append(
                f"--output_dir {output_dir} (after --) is not on the file system; give a directory under {FSX_MOUNT}, "
                "where every instance mounts it, or leave it out"
            )
    if job.instance_count > 1 and "output_dir" not in hyperparameters and not job.file_system_id:
        # Global rank 0 imports and prepares once for all nodes, and Megatron's distributed checkpoints are written
        # by ranks on every node: SM_MODEL_DIR, local to each instance, would leave the other nodes waiting.
        problems.append(
            f"--instance_count {job.instance_count}: give --output_dir (after --) on a filesystem every "
            "instance mounts at the same path, such as an FSx for Lustre channel; SM_MODEL_DIR is local "
            "to each instance"
        )
    owned = [f"--{n}" for n in SAGEMAKER_OWNED if n in hyperparameters]
    if owned:
        problems.append(
            f"{', '.join(owned)} (after --): SageMaker sets these on each instance (or they select a "
            "local mode); drop them"
        )
    missing = [n for n in job.forward_env.split(",") if n.strip() and n.strip() not in os.environ]
    if missing:
        problems.append(f"--forward_env: {', '.join(missing)} not set in this shell")
    if problems:
        raise ConfigError(problems)


def stage_source(target: Path) -> Path:
    """The files the instances need (the scripts, the nemo_finetune package, the worker start-up hook,
    requirements.txt), not the whole checkout: SageMaker uploads the source directory as it is, virtual environment
    and all."""
    for path in REPO.glob("*.py"):
        shutil.copy2(path, target / path.name)
    shutil.copytree(REPO / "nemo_finetune", target / "nemo_finetune", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "requirements.txt", target / "requirements.txt")
    return target


def aws_session(job: JobConfig):
    """The SageMaker session of a real submission, from the user's AWS configuration; a ConfigError naming what is
    missing rather than the SDK's traceback."""
    import boto3
    import sagemaker

    boto = boto3.Session(region_name=job.region)
    problems = []
    if boto.region_name is None:
        problems.append("no AWS region: give --region, set AWS_DEFAULT_REGION, or run `aws configure`")
    if boto.get_credentials() is None:
        problems.append("no AWS credentials: run `aws configure` (or set AWS_PROFILE / AWS_ACCESS_KEY_ID)")
    if problems:
        raise ConfigError([*problems, "--dry_run prints the job without any AWS configuration"])
    return sagemaker.Session(boto_session=boto)


def offline_session(job: JobConfig):
    """A session that builds the estimator and calls no AWS service (a dry run): placeholder credentials, the region
    from --region, the environment or the image URI."""
    import boto3
    import sagemaker

    region = job.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region is None and ".dkr.ecr." in job.image_uri:
        region = job.image_uri.split(".dkr.ecr.", 1)[1].split(".", 1)[0]
    boto = boto3.Session(
        region_name=region or "us-east-1", aws_access_key_id="dry-run", aws_secret_access_key="dry-run"
    )
    return sagemaker.Session(boto_session=boto)


def job_inputs(job: JobConfig) -> dict:
    """The job's channels: `training` (prepared JSONL in S3) and `fsx` (the file system for --output_dir)."""
    inputs: dict = {}
    if job.training_data:
        inputs["training"] = job.training_data
    if job.file_system_id:
        from sagemaker.inputs import FileSystemInput

        inputs["fsx"] = FileSystemInput(
            file_system_id=job.file_system_id,
            file_system_type=job.file_system_type,
            directory_path=job.file_system_path,
            file_system_access_mode="rw",
        )
    return inputs


def build_estimator(job: JobConfig, hyperparameters: dict, source_dir: Path, session=None):
    from sagemaker.pytorch import PyTorch

    environment = {n.strip(): os.environ[n.strip()] for n in job.forward_env.split(",") if n.strip()}
    if job.file_system_id and "output_dir" not in hyperparameters:
        hyperparameters = {**hyperparameters, "output_dir": FSX_MOUNT}
    return PyTorch(
        entry_point="peft_megatron.py",
        source_dir=str(source_dir),
        role=job.role,
        image_uri=job.image_uri,
        instance_type=job.instance_type,
        instance_count=job.instance_count,
        volume_size=job.volume_size_gb,
        max_run=int(job.max_run_hours * 3600),
        base_job_name=job.job_name,
        output_path=job.output_path,
        hyperparameters=hyperparameters,
        environment=environment,
        sagemaker_session=session,
        subnets=[n.strip() for n in job.subnets.split(",") if n.strip()] or None,
        security_group_ids=[n.strip() for n in job.security_group_ids.split(",") if n.strip()] or None,
        disable_profiler=True,  # SageMaker Debugger's hooks do not know Megatron's training loop
        debugger_hook_config=False,
    )


def container_argv(estimator_hyperparameters: dict) -> list[str]:
    """The arguments the instances give peft_megatron.py: the SDK stores each hyperparameter JSON-encoded; the
    training toolkit decodes each (sagemaker_training.environment), drops its own `sagemaker_*` entries and turns
    the rest into `--name str(value)` in sorted order (sagemaker_training.mapping.to_cmd_args)."""
    decoded = {k: json.loads(v) for k, v in estimator_hyperparameters.items() if not k.startswith("sagemaker_")}
    return [arg for key in sorted(decoded) for arg in (f"--{key}", str(decoded[key]))]


def main(argv: list[str] | None = None) -> int:
    own, train = split_argv(sys.argv[1:] if argv is None else argv)
    job, _ = parse_dataclass_args(JobConfig, own, __doc__)
    setup_logging("INFO")
    hyperparameters = training_hyperparameters(train)
    validate_job(job, hyperparameters)
    session = offline_session(job) if job.dry_run else aws_session(job)
    inputs = job_inputs(job)
    with tempfile.TemporaryDirectory(prefix="peft_megatron_source_") as tmp:
        estimator = build_estimator(job, hyperparameters, stage_source(Path(tmp)), session)
        if job.dry_run:
            print(f"image: {job.image_uri}\ninstances: {job.instance_count} x {job.instance_type}")
            channels = [f"training -> {job.training_data}"] if job.training_data else []
            if job.file_system_id:
                channels.append(
                    f"fsx -> {job.file_system_type} {job.file_system_id}:{job.file_system_path} (read-write, at "
                    f"{FSX_MOUNT}; subnets {job.subnets}, security groups {job.security_group_ids})"
                )
            print(f"channels: {'; '.join(channels) or 'none'}")
            print(f"environment: {', '.join(estimator.environment) or 'none'} (values not shown)")
            print(
                "each instance runs: "
                + shlex.join(["python", "peft_megatron.py", *container_argv(estimator.hyperparameters())])
            )
            return 0
        estimator.fit(inputs or None, wait=job.wait)
    print(f"submitted training job {estimator.latest_training_job.name}")
    return 0


if __name__ == "__main__":
    run_cli(main)
