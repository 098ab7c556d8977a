"""examples/sagemaker_job.py: the SageMaker estimator's hyperparameters, turned into the command line a training
instance runs, parse back with peft_megatron.py's parser to the Config the user asked for. The AWS session is
faked (a real sagemaker.Session on made-up credentials; nothing is submitted): it cannot exist here."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO, run_script

sys.path.insert(0, str(REPO / "examples"))
sagemaker = pytest.importorskip("sagemaker", reason="the SageMaker SDK v2 is in requirements-dev.txt")

import sagemaker_job as sj  # noqa: E402

import peft_megatron as pm  # noqa: E402

FAKE_AWS = {
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKE",
    "AWS_SECRET_ACCESS_KEY": "fake",
    "SAGEMAKER_SUPPRESS_V2_WARNING": "1",
}
TRAIN = [
    "--hf_model_id",
    "Qwen/Qwen3-8B",
    "--recipe_cls_name",
    "qwen3_8b",
    "--full_ft",
    "--max_steps",
    "2000",
    "--learning_rate",
    "1e-5",
    "--prompt_template",
    "### Question:\n{question}\n\n### Answer:",
    "--input_column",
    "question",
    "--packed_sequence",
    "--micro_batch_size",
    "1",
    "--tensor_parallel_size",
    "auto",
    "--save_weights_only",
    "false",
    "--output_dir",
    "/fsx/run",
]
JOB = [
    "--role",
    "arn:aws:iam::123456789012:role/SageMakerRole",
    "--image_uri",
    "123456789012.dkr.ecr.us-east-1.amazonaws.com/nemo:25.09",
    "--instance_count",
    "2",
]
# What SageMaker sets on the second of two ml.p5.48xlarge instances.
INSTANCE_ENV = {
    "SM_HOSTS": json.dumps(["algo-1", "algo-2"]),
    "SM_CURRENT_HOST": "algo-2",
    "SM_NUM_GPUS": "8",
    "SM_CHANNEL_TRAINING": "/opt/ml/input/data/training",
    "SM_MODEL_DIR": "/opt/ml/model",
}


@pytest.fixture
def session():
    import boto3

    return sagemaker.Session(
        boto_session=boto3.Session(region_name="us-east-1", aws_access_key_id="AKIAFAKE", aws_secret_access_key="fake")
    )


def test_hyperparameters_round_trip_through_sagemakers_command_line_to_the_same_config(session, tmp_path):
    job, _ = sj.parse_dataclass_args(sj.JobConfig, JOB, "")
    estimator = sj.build_estimator(job, sj.training_hyperparameters(TRAIN), sj.stage_source(tmp_path), session)

    argv = sj.container_argv(estimator.hyperparameters())
    assert argv[argv.index("--full_ft") + 1] == "True" and argv[argv.index("--learning_rate") + 1] == "1e-05"
    on_instance = pm.parse_config(argv, environ=INSTANCE_ENV, visible_gpus=lambda: 8)
    assert on_instance == pm.parse_config(TRAIN, environ=INSTANCE_ENV, visible_gpus=lambda: 8)
    assert (on_instance.num_nodes, on_instance.node_rank, on_instance.gpus_per_node) == (2, 1, 8)
    assert on_instance.tensor_parallel_size == 8  # auto, resolved on the instance
    assert on_instance.data.prompt_template == "### Question:\n{question}\n\n### Answer:"
    assert (on_instance.output_dir, on_instance.data_dir) == ("/fsx/run", "/opt/ml/input/data/training")
    assert on_instance.full_ft and on_instance.packed_sequence and not on_instance.save_weights_only

    assert (estimator.entry_point, estimator.instance_count, estimator.instance_type) == (
        "peft_megatron.py",
        2,
        "ml.p5.48xlarge",
    )
    staged = sorted(p.name for p in tmp_path.iterdir())
    assert {"peft_megatron.py", "dataset_module.py", "nemo_finetune", "requirements.txt"} <= set(staged)
    assert (tmp_path / "nemo_finetune" / "compat" / "apply.py").is_file()
    assert (tmp_path / "nemo_finetune" / "startup" / "sitecustomize.py").is_file()
    assert not {"tests", ".venv", ".git", "examples"} & set(staged)


def test_only_the_given_flags_travel_so_sagemakers_environment_fills_the_rest():
    assert sj.training_hyperparameters(["--max_steps", "10", "--gpus_per_node", "auto"]) == {
        "max_steps": 10,
        "gpus_per_node": "auto",
    }


def test_hyperparameters_carry_flag_names_and_a_settings_files_values(tmp_path):
    settings = tmp_path / "run.yaml"
    settings.write_text("learning_rate: 1.0e-5\nglobal_batch_size: 64\n")
    given = sj.training_hyperparameters(["--config", str(settings), "--max_steps", "20"])
    assert given == {"learning_rate": 1e-5, "global_batch_size": 64, "max_steps": 20}  # no file path travels


def test_flags_sagemaker_owns_or_a_node_count_that_disagrees_are_refused():
    job, _ = sj.parse_dataclass_args(sj.JobConfig, JOB, "")
    with pytest.raises(sj.ConfigError) as err:
        sj.validate_job(job, sj.training_hyperparameters(["--num_nodes", "3", "--node_rank", "1", "--dry_run"]))
    assert err.value.problems == [
        "--num_nodes 3 (after --) differs from --instance_count 2; drop --num_nodes (SageMaker sets it from the "
        "instances)",
        "--instance_count 2: give --output_dir (after --) on a filesystem every instance mounts at the same path, "
        "such as an FSx for Lustre channel; SM_MODEL_DIR is local to each instance",
        "--node_rank, --dry_run (after --): SageMaker sets these on each instance (or they select a local mode); "
        "drop them",
    ]


def test_cli_dry_run_prints_the_instance_command_and_never_a_forwarded_secret():
    out = run_script(
        "examples/sagemaker_job.py",
        *JOB,
        "--dry_run",
        "--forward_env",
        "HF_TOKEN",
        "--",
        *TRAIN[:7],
        "--output_dir",
        "/fsx/run",
        env={**FAKE_AWS, "HF_TOKEN": "hf_s3cr3t_value"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "instances: 2 x ml.p5.48xlarge" in out.stdout
    assert "environment: HF_TOKEN (values not shown)" in out.stdout
    assert (
        "each instance runs: python peft_megatron.py --full_ft True --hf_model_id Qwen/Qwen3-8B --max_steps 2000 "
        "--output_dir /fsx/run --recipe_cls_name qwen3_8b"
    ) in out.stdout
    assert "hf_s3cr3t_value" not in out.stdout + out.stderr


# A shell with no AWS configuration at all (no files, no variables, no instance metadata to ask).
NO_AWS = {
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
    "SAGEMAKER_SUPPRESS_V2_WARNING": "1",
}
FSX = [
    *("--file_system_id", "fs-0123456789abcdef0", "--file_system_path", "/abcdefgh/runs"),
    *("--subnets", "subnet-0abc,subnet-0def", "--security_group_ids", "sg-0abc"),
]


def test_a_dry_run_needs_no_aws_configuration_and_attaches_the_file_system_for_output_dir():
    out = run_script("examples/sagemaker_job.py", *JOB, *FSX, "--dry_run", "--", *TRAIN[:4], env=NO_AWS)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (
        "channels: fsx -> FSxLustre fs-0123456789abcdef0:/abcdefgh/runs (read-write, at /opt/ml/input/data/fsx; "
        "subnets subnet-0abc,subnet-0def, security groups sg-0abc)"
    ) in out.stdout
    assert (
        "each instance runs: python peft_megatron.py --hf_model_id Qwen/Qwen3-8B --output_dir /opt/ml/input/data/fsx "
        "--recipe_cls_name qwen3_8b"
    ) in out.stdout
    assert "Traceback" not in out.stderr


def test_a_submission_without_aws_configuration_is_refused_in_one_message():
    out = run_script("examples/sagemaker_job.py", *JOB, "--", *TRAIN[:4], "--output_dir", "/fsx/run", env=NO_AWS)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "no AWS region: give --region, set AWS_DEFAULT_REGION, or run `aws configure`" in out.stderr
    assert "--dry_run prints the job without any AWS configuration" in out.stderr


def test_a_file_system_needs_its_vpc_and_holds_output_dir():
    hyperparameters = sj.training_hyperparameters([*TRAIN[:4], "--output_dir", "/fsx/run"])
    job, _ = sj.parse_dataclass_args(sj.JobConfig, [*JOB, "--file_system_id", "fs-1"], "")
    with pytest.raises(sj.ConfigError) as refused:
        sj.validate_job(job, hyperparameters)
    assert [str(p) for p in refused.value.problems] == [
        "--file_system_id fs-1: a file system is reached from your VPC; give --subnets and --security_group_ids "
        "that can reach it",
        "--output_dir /fsx/run (after --) is not on the file system; give a directory under /opt/ml/input/data/fsx, "
        "where every instance mounts it, or leave it out",
    ]


def test_the_file_system_channel_and_vpc_reach_the_estimator(session, tmp_path):
    job, _ = sj.parse_dataclass_args(sj.JobConfig, [*JOB, *FSX, "--file_system_type", "EFS"], "")
    estimator = sj.build_estimator(job, sj.training_hyperparameters(TRAIN[:4]), sj.stage_source(tmp_path), session)
    assert (estimator.subnets, estimator.security_group_ids) == (["subnet-0abc", "subnet-0def"], ["sg-0abc"])
    assert json.loads(estimator.hyperparameters()["output_dir"]) == "/opt/ml/input/data/fsx"
    assert sj.job_inputs(job)["fsx"].config == {
        "DataSource": {
            "FileSystemDataSource": {
                "FileSystemId": "fs-0123456789abcdef0",
                "FileSystemType": "EFS",
                "DirectoryPath": "/abcdefgh/runs",
                "FileSystemAccessMode": "rw",
            }
        }
    }


def test_cli_refuses_a_misspelled_training_flag_before_building_anything():
    out = run_script("examples/sagemaker_job.py", *JOB, "--", "--max_stepz", "3", env=FAKE_AWS)
    assert out.returncode == 2 and "unknown flag --max_stepz (did you mean --max_steps?)" in out.stderr
    missing = run_script("examples/sagemaker_job.py", "--", "--max_steps", "3", env=FAKE_AWS)
    assert (
        missing.returncode == 2
        and "--role is required" in missing.stderr
        and "--image_uri is required" in missing.stderr
    )
