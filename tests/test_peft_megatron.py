"""peft_megatron.py: flags from the Config dataclass, validation, SageMaker, recipe assembly, dry run."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

import peft_megatron as pm
from conftest import REPO, fake_checkpoint, fake_nvidia_smi, qa_flags, qa_job, run_script
from nemo_finetune.checks import validate_config
from nemo_finetune.cli import flag_names
from nemo_finetune.data import with_epoch_steps
from nemo_finetune.errors import ConfigError
from nemo_finetune.launch import configure_executor, install_torchrun
from nemo_finetune.plan import plan_lines
from nemo_finetune.recipe import assign, configure_recipe
from nemo_finetune.rendezvous import rendezvous_environ, scoped_environ
from nemo_finetune.resolve import visible_gpu_count

SEED_EXAMPLES = [
    "",
    '--hf_model_id "meta-llama/Llama-3.1-8B" --recipe_cls_name "llama31_8b"',
    "--num_nodes 4 --gpus_per_node 8 --tensor_parallel_size 8 --pipeline_parallel_size 2",
    "--full_ft",
    "--enable_megatron_progress_bar --enable_memory_monitor --enable_speed_monitor",
    # SageMaker passes hyperparameters as --key value
    "--hf_model_id Qwen/Qwen3-8B --recipe_cls_name qwen3_8b --num_nodes 4 --gpus_per_node 8 "
    "--tensor_parallel_size 8 --pipeline_parallel_size 2 --full_ft True",
]


def parse(args: str = "", environ: dict | None = None, gpus: int = 0) -> pm.Config:
    """Parse as on a machine that shows `gpus` GPUs (0: a CPU machine such as CI's)."""
    return pm.parse_config(shlex.split(args), environ=environ or {}, visible_gpus=lambda: gpus)


@pytest.mark.parametrize("args", SEED_EXAMPLES)
def test_every_seed_example_parses_and_validates(args, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    config = parse(args)
    validate_config(config)
    assert config.full_ft == ("--full_ft" in args)


def test_every_config_field_is_a_flag_with_help():
    parser_help = run_script("peft_megatron.py", "--help").stdout
    for name in flag_names(pm.Config):
        assert f"--{name}" in parser_help, name
    for seed_flag in (
        "--hf_model_id",
        "--context_parallel_size",
        "--limit_val_batches",
        "--enable_nsys_callback",
        "--early_stopping_threshold",
        "--node_rank",
        "--dry_run",
        "--trust_remote_code",
        "--dataset_name",
        "--prompt_template",
        "--overwrite_data",
        "--prepare_data_only",
        "--import_only",
    ):
        assert seed_flag in parser_help


def test_help_is_fast_and_imports_no_heavy_module():
    start = time.perf_counter()
    out = run_script("peft_megatron.py", "--help")
    assert out.returncode == 0
    assert time.perf_counter() - start < 3.0
    probe = (
        "import sys, peft_megatron, convert_checkpoint_to_hf, test_checkpoint, dataset_module;"
        "print(sorted(m for m in ('torch','nemo','megatron','transformers','datasets') if m in sys.modules))"
    )
    import subprocess

    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO).stdout.strip()
    assert loaded == "[]"


def test_boolean_flags_accept_sagemaker_values_and_negation():
    assert parse("--full_ft false").full_ft is False
    assert parse("--full_ft").full_ft is True
    assert parse("--use_wandb --no-use_wandb").use_wandb is False
    out = run_script("peft_megatron.py", "--full_ft", "maybe")
    assert out.returncode == 2 and "expected true or false" in out.stderr


@pytest.mark.parametrize(
    "args, dp, gbs",
    [
        # the seed guide's two worked examples (micro 8 x accumulate 8)
        ("--num_nodes 1 --gpus_per_node 8 --tensor_parallel_size 8", 1, 64),
        ("--num_nodes 4 --gpus_per_node 8 --tensor_parallel_size 8 --pipeline_parallel_size 2", 2, 128),
        # context parallelism takes GPUs from data parallelism too (Megatron: world = TP x PP x CP x DP)
        ("--num_nodes 1 --gpus_per_node 8 --tensor_parallel_size 2 --context_parallel_size 2", 2, 128),
    ],
)
def test_global_batch_size(args, dp, gbs):
    config = parse(args)
    assert (config.data_parallel_size, config.global_batch_size) == (dp, gbs)


VALIDATION_CASES = [
    ("--gpus_per_node 6 --tensor_parallel_size 4", "is not divisible by --tensor_parallel_size x"),
    ("--recipe_cls_name qwen3_8bb", "close matches: qwen3_8b"),
    ("--peft_scheme ia3", "--peft_scheme 'ia3' is not one of ['lora', 'dora']"),
    ("--micro_batch_size 0", "--micro_batch_size 0 must be a positive integer"),
    ("--max_steps 10 --val_check_interval 20", "--val_check_interval 20 > --max_steps 10"),
    ("--enable_pytorch_profiler --enable_nsys_callback", "mutually exclusive profilers"),
    ("--hf_model_id ./no/such/model", "--hf_model_id ./no/such/model: no such directory"),
    ("--context_parallel_size 2 --tensor_parallel_size 4", "--context_parallel_size 2 needs Transformer Engine"),
    (
        "--context_parallel_size 2 --tensor_parallel_size 4 --max_seq_length 1001",
        "divisible by 2 x --context_parallel_size",
    ),
    ("--val_fraction 0.6 --test_fraction 0.5", "leaves no training rows"),
    ("--node_rank 3", "--node_rank 3 must be in [0, --num_nodes 1)"),
    ("--learning_rate 1e21", "--learning_rate 1e+21 is above 1.0 (fine-tuning learning rates"),
    ("--micro_batch_size 100000000000000000000000", "--micro_batch_size 100000000000000000000000 is above 65,536"),
    ("--max_seq_length 4194304", "--max_seq_length 4194304 is above 1,048,576"),
    ("--lora_dim 1000000", "--lora_dim 1000000 is above 65,536"),
    ("--full_ft --lora_dim 8", "--lora_dim 8 set LoRA, which --full_ft does not train"),
    ("--full_ft --lora_dropout 0.1", "--lora_dropout 0.1 set LoRA, which --full_ft does not train"),
    ("--lora_dropout 1", "--lora_dropout 1.0 must be below 1"),
    ("--warmup_steps -1", "--warmup_steps -1 must be >= 0"),
    ("--weight_decay 2", "--weight_decay 2.0 is above 1.0 (AdamW's decay"),
    ("--learning_rate 1e-4 --min_learning_rate 1e-3", "--min_learning_rate 0.001 is above --learning_rate 0.0001"),
    ("--lora_target_modules linear_qkv,q_proj", "--lora_target_modules 'linear_qkv,q_proj': q_proj is not one of"),
    ("--lora_target_modules ,", "--lora_target_modules ',': no layer is not one of"),
    ("--wait_timeout_s 1e9", "--wait_timeout_s 1000000000.0 is above 604,800.0"),
    ("--save_top_k 0", "--save_top_k 0 must be a positive integer, or -1 to keep every checkpoint"),
    ("--save_top_k -2", "--save_top_k -2 must be a positive integer, or -1 to keep every checkpoint"),
    ("--cuda_graphs", "--cuda_graphs without --packed_sequence: Megatron's CUDA graphs replay the shapes"),
    ("--max_steps 1000000000000000000000", "--max_steps 1000000000000000000000 is above 1,000,000,000 (more steps"),
    ("--early_stopping_threshold 1e21", "--early_stopping_threshold 1e+21 is above 100.0 (the least val_loss"),
    ("--early_stopping_patience 1000000000000000000000", "--early_stopping_patience 1000000000000000000000 is above"),
    ("--log_every_n_steps 1000000000000000000000", "--log_every_n_steps 1000000000000000000000 is above"),
    ("--limit_val_batches 1000000000000000000000", "--limit_val_batches 1000000000000000000000 is above"),
    ("--save_top_k 1000000000000000000000", "--save_top_k 1000000000000000000000 is above 1,000,000 (checkpoints"),
    ("--lora_alpha 1000000000000000000000", "--lora_alpha 1000000000000000000000 is above 1,000,000 (alpha / rank"),
    ("--max_samples 1000000000000000000000", "--max_samples 1000000000000000000000 must be 1 to 1e+12"),
    ("--gpus_per_node 100000", "--gpus_per_node 100000 is above 1,024 (GPUs of one node)"),
    ("--seed -1", "--seed -1 must be between 1 and 4294967295"),
    ("--detach", "--detach apply to --executor slurm only; add it or drop them"),
]


@pytest.mark.parametrize("port", ["notaport", "99999", "0", "-1"])
def test_a_rendezvous_port_that_is_no_port_is_refused_by_the_plan(port):
    with pytest.raises(ConfigError) as err:
        validate_config(parse("--dry_run --num_nodes 2 --gpus_per_node 8"), environ={"MASTER_PORT": port})
    assert f"MASTER_PORT={port!r} in the environment is not a TCP port; set it to a number 1 to 65535" in str(err.value)
    validate_config(parse("--dry_run --num_nodes 2 --gpus_per_node 8"), environ={"MASTER_PORT": "29500"})


@pytest.mark.parametrize(
    "flag", ["--learning_rate", "--wait_timeout_s", "--early_stopping_threshold", "--val_fraction", "--test_fraction"]
)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(f"{flag}={value}")
    assert exit_.value.code == 2
    assert f"argument {flag}: expected a finite number, got '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", VALIDATION_CASES)
def test_validation_names_the_flag(args, message):
    with pytest.raises(ConfigError) as err:
        validate_config(parse(args))
    assert message in str(err.value)


def test_all_problems_reported_together_with_exit_code_2():
    out = run_script("peft_megatron.py", "--num_nodes", "0", "--peft_scheme", "x", "--recipe_cls_name", "nope")
    assert out.returncode == 2
    for fragment in ("--num_nodes 0", "--peft_scheme 'x'", "--recipe_cls_name 'nope'"):
        assert fragment in out.stderr
    assert "Traceback" not in out.stderr


def test_worker_shims_named_in_the_environment_that_do_not_exist_are_refused_before_launch():
    environ = {
        "PEFT_MEGATRON_WORKER_SKIP": "torch-optimizer-kernels,peft-te-guards",
        "PEFT_MEGATRON_WORKER_TRIAL": "token-id-check,token-check",
    }
    with pytest.raises(ConfigError) as err:
        validate_config(parse(), None, environ)
    assert "PEFT_MEGATRON_WORKER_SKIP='torch-optimizer-kernels,peft-te-guards' names ['peft-te-guards']" in str(
        err.value
    )
    assert "PEFT_MEGATRON_WORKER_TRIAL='token-id-check,token-check' names ['token-check']" in str(err.value)
    validate_config(parse(), None, {"PEFT_MEGATRON_WORKER_SKIP": " torch-optimizer-kernels "})
    validate_config(parse(), None, {"PEFT_MEGATRON_WORKER_TRIAL": "token-id-check"})


@pytest.mark.parametrize(
    "model, recipe, refused",
    [
        ("meta-llama/Llama-3.1-8B", "qwen3_8b", r"imports qwen3 models but .* names a llama model; .* e\.g\. "
         r"--recipe_cls_name llama31_8b \(or "),
        ("Qwen/Qwen2.5-7B", "qwen3_8b", r"imports qwen3 models but .* names a qwen2 model; .* qwen25_7b"),
        ("Qwen/Qwen3-8B", "qwen25_7b", r"imports qwen2 models but .* names a qwen3 model; .* qwen3_8b"),
        ("mistralai/Mistral-7B-v0.3", "mixtral_8x7b", r"imports mixtral models but .* names a mistral model; "
         r".* mistral_7b"),
        ("Qwen/Qwen-7B", "llama31_8b", r"imports llama models but .* names a qwen model; .* qwen2_7b"),
        ("Qwen/Qwen3-0.6B", "qwen3_8b", None),
        ("mistralai/Mixtral-8x7B-v0.1", "mixtral_8x7b", None),
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "qwen25_7b", None),  # a fine-tune named after its base
        ("nvidia/Llama-3.1-Nemotron-Nano-8B-v1", "llama31_nemotron_nano_8b", None),
        ("myorg/support-bot", "qwen3_8b", None),  # a name that says no family
    ],
)  # fmt: skip
def test_a_hub_id_whose_name_says_another_family_than_the_recipe_is_refused(model, recipe, refused):
    config = parse(f"--hf_model_id {model} --recipe_cls_name {recipe} --dry_run")
    if refused is None:
        validate_config(config)
    else:
        with pytest.raises(ConfigError, match=f"--recipe_cls_name {recipe} {refused}"):
            validate_config(config)


def test_a_launch_is_refused_where_no_gpu_will_run_it():
    config = parse("--cuda_graphs --packed_sequence --micro_batch_size 1 --gpus_per_node 1")
    with pytest.raises(ConfigError, match="training needs CUDA GPUs and this machine shows none") as refused:
        validate_config(config, visible_gpus=0, environ={"CUDA_VISIBLE_DEVICES": "-1"})
    assert refused.value.problems == [
        "training needs CUDA GPUs and this machine shows none (nvidia-smi lists no GPU, CUDA_VISIBLE_DEVICES=-1): "
        "plan the job with --dry_run, run the CPU phases with --import_only or --prepare_data_only, or submit it to "
        "GPU nodes with --executor slurm"
    ]
    validate_config(config, visible_gpus=1)
    validate_config(config, visible_gpus=None)  # not launching here (--dry_run, Slurm)


def test_a_launch_on_a_machine_without_gpus_stops_before_any_work_with_one_line(assets, tmp_path):
    out = run_script(
        "peft_megatron.py", *qa_flags(tmp_path / "out", dataset=assets["data"]), env=fake_nvidia_smi(tmp_path, 0)
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.splitlines() == [
        "error: invalid arguments:",
        "  - training needs CUDA GPUs and this machine shows none (nvidia-smi lists no GPU): plan the job with "
        "--dry_run, run the CPU phases with --import_only or --prepare_data_only, or submit it to GPU nodes with "
        "--executor slurm",
    ]
    assert not (tmp_path / "out").exists()  # no import, no data: nothing written


def test_the_launch_runs_this_pythons_torch_whether_or_not_its_environment_is_activated(tmp_path):
    own_bin = Path(sys.executable).parent
    decoy = tmp_path / "other-env" / "bin"  # another environment's torchrun, first on the user's PATH
    decoy.mkdir(parents=True)
    (decoy / "torchrun").write_text("#!/bin/sh\necho another environment >&2; exit 9\n")
    (decoy / "torchrun").chmod(0o755)
    bare_path = os.pathsep.join([str(decoy), *(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != own_bin)])
    out = run_script("peft_megatron.py", "--dry_run", "--output_dir", str(tmp_path / "run"), env={"PATH": bare_path})
    assert out.returncode == 0, out.stderr[-3000:]
    launch = next(line for line in out.stdout.splitlines() if line.startswith("  launch: "))
    assert launch.startswith(f"  launch: {sys.executable} -m torch.distributed.run --rdzv-backend c10d")
    assert "--nproc-per-node 8" in launch
    assert not (tmp_path / "run").exists()  # the dry run wrote nothing

    # The launch: NeMo-Run starts `torchrun` by name with the executor's PATH; the one it finds runs this Python.
    from nemo_finetune import compat

    config = parse(f"--output_dir {tmp_path / 'run'}")
    executor = configure_executor(config, compat.Environment(has_te=False, has_cuda=True))
    install_torchrun(config)
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, sys, torch\n"
        "open(os.path.join(sys.argv[1], os.environ['RANK']), 'w').write(sys.executable + ' ' + torch.__file__)\n"
    )
    workers_path = os.pathsep.join([executor.env_vars["PATH"], bare_path])
    ran = subprocess.run(
        ["torchrun", "--standalone", "--nproc-per-node", "2", str(worker), str(tmp_path)],
        env={**os.environ, "PATH": workers_path},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    import torch

    for rank in ("0", "1"):
        assert (tmp_path / rank).read_text() == f"{sys.executable} {torch.__file__}"


def test_a_python_without_torch_is_refused_before_the_launch(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # what `import torch` meets in an environment without it
    with pytest.raises(ConfigError, match=r"torch is not installed for this Python \(.*\), which launches"):
        validate_config(parse(f"--output_dir {tmp_path}"))
    validate_config(parse(f"--output_dir {tmp_path} --prepare_data_only"))  # the CPU phases need no torchrun


@pytest.mark.parametrize("seed", ["0", "-1", "4294967296"])
def test_a_seed_the_generators_cannot_take_is_refused(seed, tmp_path):
    with pytest.raises(ConfigError, match=rf"--seed {seed} must be between 1 and 4294967295"):
        validate_config(parse(f"--output_dir {tmp_path} --seed {seed}"))


def test_flags_are_never_taken_by_prefix_and_a_mistake_gets_one_line():
    out = run_script("peft_megatron.py", "--learning_rat", "1e-4")
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == "error: unknown flag --learning_rat (did you mean --learning_rate?); see --help\n"
    out = run_script("peft_megatron.py", "--max_step", "3", "--bogus_flag")
    assert out.stderr == (
        "error: unknown flag --max_step (did you mean --max_steps?); unknown flag --bogus_flag; see --help\n"
    )
    help_text = " ".join(run_script("peft_megatron.py", "--help").stdout.split())
    assert "peak learning rate (default: recipe's) --min_learning_rate" in help_text  # one default, not two
    assert "--core_attention {sdpa,unfused}" in help_text and "--log_level {DEBUG,INFO,WARNING,ERROR}" in help_text


def test_multi_node_needs_a_rendezvous_address(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match="set MASTER_ADDR"):
        validate_config(parse("--num_nodes 2"))
    validate_config(parse("--num_nodes 2 --dry_run"))


def test_local_model_directory_problems_are_named_before_any_import(assets, tmp_path):
    import shutil

    empty, not_json, a_list, a_file = (tmp_path / n for n in ("empty", "not_json", "a_list", "model.bin"))
    for d in (empty, not_json, a_list):
        d.mkdir()
    (not_json / "config.json").write_text("{'model_type': 'qwen3',")
    (a_list / "config.json").write_text("[1, 2]")
    a_file.write_text("x")
    expected = {
        empty: "no config.json in that directory",
        not_json: "config.json is not readable JSON",
        a_list: "config.json holds a list",
        a_file: "is a file; give the model's directory",
    }
    truncated = shutil.copytree(assets["qwen3"], tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    expected[truncated] = "model.safetensors is unreadable .*incomplete metadata.*copy or download the model again"
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "my_net", "auto_map": {"AutoConfig": "x.C"}}))
    expected[custom] = "model_type 'my_net', which transformers does not know, .* pass --trust_remote_code"
    # (the recipe check names the family mismatch too; the default recipe is qwen3_8b)
    for model, message in expected.items():
        with pytest.raises(ConfigError, match=message):
            validate_config(parse(f"--hf_model_id {model} --dry_run"))
    with pytest.raises(
        ConfigError,
        match=r"--recipe_cls_name llama31_8b imports llama models but .* says "
        r"model_type 'qwen3'; choose the recipe of the model's family",
    ):
        validate_config(
            parse(
                f"--hf_model_id {assets['qwen3']} --recipe_cls_name llama31_8b --gpus_per_node 1 "
                "--tensor_parallel_size 1 --import_only"
            )
        )
    validate_config(
        parse(
            f"--hf_model_id {assets['llama']} --recipe_cls_name llama31_8b --gpus_per_node 1 "
            "--tensor_parallel_size 1 --import_only"
        )
    )
    for name in ("model.safetensors", "tokenizer.json"):  # a complete directory from here on
        shutil.copy(assets["qwen3"] / name, custom)
    recipe = "llama31_nemotron_nano_8b"  # a recipe whose family the checks do not map
    validate_config(parse(f"--hf_model_id {custom} --recipe_cls_name {recipe} --trust_remote_code --dry_run"))
    known = shutil.copytree(custom, tmp_path / "known")
    (known / "config.json").write_text(json.dumps({"model_type": "qwen3", "auto_map": {"AutoConfig": "x.C"}}))
    validate_config(parse(f"--hf_model_id {known} --dry_run"))  # transformers' own Qwen3 code runs: no flag needed
    tokenizer_config = json.loads((assets["qwen3"] / "tokenizer_config.json").read_text())
    remote_tokenizer = shutil.copytree(assets["qwen3"], tmp_path / "remote_tokenizer")
    auto_map = {"AutoTokenizer": ["tokenization_my.MyTokenizer", None]}
    (remote_tokenizer / "tokenizer_config.json").write_text(
        json.dumps({**tokenizer_config, "tokenizer_class": "MyTokenizer", "auto_map": auto_map})
    )
    with pytest.raises(ConfigError) as refused:
        validate_config(parse(f"--hf_model_id {remote_tokenizer} --dry_run"))
    assert refused.value.problems == [
        f"--hf_model_id {remote_tokenizer}: tokenizer_config.json points the tokenizer 'MyTokenizer', which "
        "transformers does not know, to code in the model repository (auto_map); pass --trust_remote_code if you "
        "trust that code"
    ]
    validate_config(parse(f"--hf_model_id {remote_tokenizer} --trust_remote_code --dry_run"))
    (remote_tokenizer / "tokenizer_config.json").write_text(
        json.dumps({**tokenizer_config, "tokenizer_class": "Qwen2Tokenizer", "auto_map": auto_map})
    )
    validate_config(parse(f"--hf_model_id {remote_tokenizer} --dry_run"))  # transformers' own class: no flag needed
    (remote_tokenizer / "tokenizer_config.json").write_text('{"tokenizer_class": ')
    with pytest.raises(ConfigError, match="tokenizer_config.json is not readable JSON .* re-save the tokenizer"):
        validate_config(parse(f"--hf_model_id {remote_tokenizer} --dry_run"))


def test_local_model_shape_must_fit_the_parallel_layout(assets):
    with pytest.raises(ConfigError, match="must divide the model's 4 attention heads and 2 KV heads"):
        validate_config(parse(f"--hf_model_id {assets['qwen3']} --gpus_per_node 8 --tensor_parallel_size 8"))


def test_sagemaker_environment_fills_settings_and_flags_win():
    env = {
        "SM_CHANNEL_TRAINING": "/opt/ml/input/data/training",
        "SM_MODEL_DIR": "/opt/ml/model",
        "SM_HOSTS": json.dumps(["algo-1", "algo-2", "algo-3"]),
        "SM_CURRENT_HOST": "algo-2",
        "SM_NUM_GPUS": "4",
    }
    config = parse("", env)
    assert (config.data_dir, config.output_dir) == ("/opt/ml/input/data/training", "/opt/ml/model")
    assert config.nemo_ckpt_dir == "/opt/ml/model/imported_hf_ckpt"
    assert (config.num_nodes, config.node_rank, config.gpus_per_node) == (3, 1, 4)
    explicit = parse("--output_dir /mine --num_nodes 1 --node_rank 0", env)
    assert (explicit.output_dir, explicit.num_nodes, explicit.node_rank) == ("/mine", 1, 0)


def test_a_sagemaker_instance_without_gpus_is_named_as_such():
    with pytest.raises(ConfigError, match="SM_NUM_GPUS=0: this SageMaker instance has no GPU; choose a GPU"):
        parse("", {"SM_NUM_GPUS": "0"})
    assert parse("--gpus_per_node 2 --tensor_parallel_size 1", {"SM_NUM_GPUS": "0"}).gpus_per_node == 2  # flag wins


@pytest.mark.parametrize("hosts", ["algo-1", "[]", '{"a": 1}', "[1, 2]"])
def test_malformed_sm_hosts_is_a_clear_error(hosts):
    with pytest.raises(ConfigError, match="SM_HOSTS=.* is not a JSON list of host names"):
        parse("", {"SM_HOSTS": hosts, "SM_CURRENT_HOST": "algo-1"})
    out = run_script("peft_megatron.py", "--dry_run", env={"SM_HOSTS": hosts, "SM_CURRENT_HOST": "algo-1"})
    assert out.returncode == 2 and "SM_HOSTS" in out.stderr


# ---- defaults that fit the machine --------------------------------------------------------------------------------
def test_visible_gpus_are_nvidia_smis_list_narrowed_by_cuda_visible_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, 4)["PATH"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpu_count() == 4
    for visible, count in (("1,3", 2), ("0,-1,2", 1), ("", 0), ("-1", 0), ("0,1,2,3,4,5", 4), ("GPU-00000002", 1)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert visible_gpu_count() == count, visible
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert visible_gpu_count() == 0  # no driver tools: a CPU machine


def test_auto_gpus_and_tensor_parallel_size_fit_the_machine_and_the_models_heads(assets):
    def sizes(args: str, gpus: int) -> tuple[int, int]:
        config = parse(args, gpus=gpus)
        return config.gpus_per_node, config.tensor_parallel_size

    assert sizes("", gpus=1) == (1, 1)
    assert sizes("", gpus=2) == (2, 2)  # a hub id: heads unknown until import, so the GPU count alone
    assert sizes(f"--hf_model_id {assets['qwen3']}", gpus=8) == (8, 2)  # 4 attention heads, 2 KV heads
    assert sizes("--gpus_per_node auto --tensor_parallel_size auto", gpus=4) == (4, 4)
    assert sizes("--tensor_parallel_size 1", gpus=4) == (4, 1)
    assert sizes("--gpus_per_node 8", gpus=1) == (8, 8)  # explicit flags win (and the launch check refuses it)
    assert sizes("", gpus=0) == (8, 8)  # a CPU machine plans the seed's 8-GPU node
    assert parse("", {"SM_NUM_GPUS": "4"}, gpus=0).gpus_per_node == 4  # SageMaker says what the instance has


def test_a_launch_asking_for_more_gpus_than_the_machine_shows_is_refused(assets, tmp_path):
    args = ["--gpus_per_node", "4", "--tensor_parallel_size", "1", *qa_flags(tmp_path / "out", dataset=assets["data"])]
    out = run_script("peft_megatron.py", *args, env=fake_nvidia_smi(tmp_path, 2))
    assert out.returncode == 2, out.stderr[-2000:]
    assert (
        "--gpus_per_node 4: this machine shows 2 GPU(s) (CUDA_VISIBLE_DEVICES=unset); give at most 2 or leave "
        "the flag out (auto)" in out.stderr
    )
    assert not (tmp_path / "out").exists()  # refused before any work
    validate_config(parse(shlex.join(args), gpus=2), visible_gpus=None)  # a --dry_run plans any node


@pytest.mark.parametrize(
    "top_k, kept", [(1, "best val_loss + last"), (3, "3 best val_loss + last"), (-1, "every validation's + last")]
)
def test_the_plan_says_which_checkpoints_are_kept(tmp_path, top_k, kept):
    lines = plan_lines(parse(f"--save_top_k {top_k} --output_dir {tmp_path}"))
    checkpoints = tmp_path / "nemo_logs" / "checkpoints"
    assert [line for line in lines if line.startswith("checkpoints:")] == [f"checkpoints: {checkpoints} ({kept})"]
    lines = plan_lines(parse(f"--save_top_k {top_k} --output_dir {tmp_path} --sync_checkpoint_save"))
    assert f"checkpoints: {checkpoints} ({kept}); each written before training goes on" in lines


def test_dry_run_on_a_gpu_machine_plans_the_gpus_it_shows(tmp_path):
    out = run_script("peft_megatron.py", "--dry_run", "--output_dir", str(tmp_path), env=fake_nvidia_smi(tmp_path, 2))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "nodes x gpus: 1 x 2 (world size 2" in out.stdout and "parallelism: TP 2 | PP 1 | CP 1 | DP 1" in out.stdout


def test_parallel_size_flags_take_integers_or_auto():
    out = run_script("peft_megatron.py", "--gpus_per_node", "x")
    assert out.returncode == 2 and "--gpus_per_node: expected an integer or 'auto', got 'x'" in out.stderr
    help_text = " ".join(run_script("peft_megatron.py", "--help").stdout.split())
    assert "GPUs (processes) per node; auto: the GPUs this machine shows" in help_text
    assert "(default: auto)" in help_text


# ---- Slurm ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nodes", [1, 4])
def test_slurm_dry_run_prints_nemo_runs_sbatch_script(tmp_path, nodes):
    out_dir = tmp_path / "shared" / "run"
    out = run_script(
        "peft_megatron.py",
        "--dry_run",
        "--executor",
        "slurm",
        "--slurm_account",
        "llm",
        "--slurm_partition",
        "batch",
        "--slurm_time",
        "1-00:00:00",
        "--num_nodes",
        str(nodes),
        "--gpus_per_node",
        "8",
        "--container_image",
        "nvcr.io/nvidia/nemo:25.09",
        "--output_dir",
        str(out_dir),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    script = out.stdout
    for line in (
        "#SBATCH --account=llm",
        "#SBATCH --partition=batch",
        "#SBATCH --time=1-00:00:00",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --ntasks-per-node=1",
    ):
        assert line in script.splitlines(), line
    srun = next(line for line in script.splitlines() if line.startswith("srun --output"))
    rendezvous = "--rdzv-endpoint $head_node_ip:29500" if nodes > 1 else "--rdzv-endpoint localhost:0"
    assert rendezvous in srun
    node_rank = "$SLURM_NODEID" if nodes > 1 else "0"
    assert f"--nnodes {nodes} --nproc-per-node 8 --node-rank {node_rank}" in srun
    assert srun.endswith("-m nemo_run.core.runners.fdl_runner -n qwen3_8b /nemo_run/configs/qwen3_8b_fn_or_script")
    assert "--container-image nvcr.io/nvidia/nemo:25.09" in srun
    mounts = srun.split("--container-mounts ")[1].split()[0].split(",")
    assert {f"{out_dir}:{out_dir}", f"{REPO}:{REPO}"} <= set(mounts)  # the workers import this repository
    assert "environment (the Slurm nodes): transformer_engine=yes, cuda=yes" in script
    assert not (tmp_path / "shared").exists()  # NeMo-Run's dry-run files are removed: a dry run touches nothing


def test_a_slurm_job_without_a_container_starts_this_pythons_torch_on_its_nodes(tmp_path):
    out_dir = tmp_path / "shared" / "run"
    flags = f"--dry_run --executor slurm --slurm_account llm --num_nodes 2 --gpus_per_node 8 --output_dir {out_dir}"
    out = run_script("peft_megatron.py", *flags.split())
    assert out.returncode == 0, out.stderr[-3000:]
    exports = [line for line in out.stdout.splitlines() if line.startswith("export PATH=")]
    assert len(exports) == 1 and exports[0].startswith(f"export PATH={out_dir / 'jobs' / 'bin'}:"), exports
    assert not (tmp_path / "shared").exists()
    # The job writes that torchrun (on the shared --output_dir) before it is submitted; a container brings its own.
    config = parse(f"--executor slurm --slurm_account llm --output_dir {out_dir}")
    install_torchrun(config)
    script = (out_dir / "jobs" / "bin" / "torchrun").read_text()
    assert script == f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m torch.distributed.run "$@"\n'
    from nemo_finetune import compat

    with_image = parse(f"--executor slurm --slurm_account llm --container_image img --output_dir {out_dir}")
    assert "PATH" not in configure_executor(with_image, compat.Environment(has_te=True, has_cuda=True)).env_vars


def test_a_slurm_job_script_keeps_its_paths_or_the_plan_is_refused(tmp_path):
    """NeMo-Run rewrites every '/nemo_run' of a container-less job script: the run's job directory is not named so,
    and an --output_dir holding it is refused before anything is written."""
    out_dir = tmp_path / "shared" / "run"
    flags = f"--dry_run --executor slurm --slurm_account llm --output_dir {out_dir}"
    out = run_script("peft_megatron.py", *flags.split())
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"#SBATCH --output={out_dir / 'jobs'}/" in out.stdout
    assert f"--chdir {out_dir / 'jobs'}/" in out.stdout
    bad = tmp_path / "nemo_runs" / "a"
    out = run_script("peft_megatron.py", *flags.replace(str(out_dir), str(bad)).split())
    assert out.returncode == 2 and out.stderr.splitlines()[1:] == [
        f"  - --executor slurm without --container_image: NeMo-Run rewrites every '/nemo_run' in the job script, "
        f"which would break {bad} (--output_dir, this repository, PATH, PYTHONPATH); move them to a path without "
        "it, or give --container_image"
    ]
    assert not (tmp_path / "nemo_runs").exists()
    validate_config(parse(f"--executor slurm --slurm_account llm --container_image img --output_dir {bad}"))


def test_slurm_settings_are_validated_together():
    with pytest.raises(ConfigError) as err:
        validate_config(parse("--executor slurm --slurm_time 4h --container_mounts /data --num_nodes 2"))
    assert err.value.problems[-3:] == [
        "--executor slurm needs --slurm_account (the account sbatch charges)",
        "--slurm_time '4h' is not [D-]HH:MM:SS (e.g. 04:00:00 or 1-12:00:00)",
        "--container_mounts /data: each mount is host_path:container_path",
    ]  # and no MASTER_ADDR demand: NeMo-Run's sbatch script finds the first node itself
    with pytest.raises(ConfigError, match="--slurm_account, --container_image apply to --executor slurm only"):
        validate_config(parse("--slurm_account llm --container_image img"))


# ---- recipe assembly (real NeMo objects) ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def no_te():
    from nemo_finetune import compat

    return compat.Environment(has_te=False, has_cuda=False)


def _callback_targets(recipe):
    return [c.__fn_or_cls__.__name__ for c in recipe.trainer.callbacks]


def test_configure_recipe_lora(tmp_path, no_te):
    from nemo.collections.llm.peft import LoRA

    config = parse(
        f"--recipe_cls_name qwen3_8b --num_nodes 2 --gpus_per_node 8 --tensor_parallel_size 4 "
        f"--pipeline_parallel_size 2 --context_parallel_size 1 --max_steps 500 --val_check_interval 50 "
        f"--limit_val_batches 7 --micro_batch_size 2 --accumulate_grad_batches 4 --max_seq_length 1024 "
        f"--lora_dim 16 --lora_alpha 32 --learning_rate 2e-4 --output_dir {tmp_path} --dataset_name x.jsonl"
    )
    recipe = configure_recipe(config, no_te)
    strategy, trainer = recipe.trainer.strategy, recipe.trainer
    assert (strategy.tensor_model_parallel_size, strategy.pipeline_model_parallel_size) == (4, 2)
    assert strategy.context_parallel_size == 1 and strategy.ckpt_load_strictness is False
    assert strategy.ckpt_async_save is True  # NeMo's default: written by a forked process while training goes on
    assert (trainer.max_steps, trainer.val_check_interval, trainer.limit_val_batches) == (500, 50, 7)
    assert trainer.accumulate_grad_batches == 1  # accumulation lives in the global batch
    assert (trainer.num_nodes, trainer.devices) == (2, 8)
    assert recipe.peft.__fn_or_cls__ is LoRA and (recipe.peft.dim, recipe.peft.alpha) == (16, 32)
    assert recipe.optim.config.lr == 2e-4 and recipe.optim.config.use_distributed_optimizer is False
    assert recipe.model.config.seq_length == 1024 and recipe.model.config.masked_softmax_fusion is False
    data = recipe.data
    assert (data.micro_batch_size, data.global_batch_size, data.seq_length) == (2, 2 * 4 * 2, 1024)
    assert data.dataset_config["dataset_name"] == "x.jsonl"
    assert recipe.resume.restore_config.path == str((tmp_path / "imported_hf_ckpt").resolve())
    assert recipe.resume.resume_if_exists is True
    ckpt = recipe.log.ckpt
    assert (ckpt.monitor, ckpt.mode, ckpt.save_last, ckpt.save_top_k) == ("val_loss", "min", "link", 1)
    assert ckpt.save_weights_only is False and ckpt.save_optim_on_train_end is True
    assert ckpt.filename == "nemo_logs--{val_loss:.4f}-{step}-{consumed_samples:.0f}"
    assert recipe.log.use_datetime_version is False and recipe.log.wandb is None
    assert recipe.log.tensorboard is not None
    assert recipe.tokenizer == "data"
    assert _callback_targets(recipe) == ["TimingCallback", "EarlyStopping", "MemoryMonitor"]
    early, memory = recipe.trainer.callbacks[1:]
    assert (early.monitor, early.patience, early.min_delta, early.mode) == ("val_loss", 3, 0.001, "min")
    assert memory.memory_keys == {"allocated_bytes.all.peak": "peak_allocated_mem"}  # the run report's peak memory


def test_configure_recipe_full_ft_and_optional_callbacks(tmp_path, no_te, monkeypatch):
    config = parse(
        f"--full_ft --gpus_per_node 8 --tensor_parallel_size 2 --context_parallel_size 2 --output_dir {tmp_path} "
        "--enable_megatron_progress_bar --enable_memory_monitor --enable_speed_monitor --enable_runtime_estimator "
        "--enable_pytorch_profiler --use_wandb --save_top_k -1 --sync_checkpoint_save"
    )
    recipe = configure_recipe(config, no_te)
    assert recipe.peft is None and recipe.log.ckpt.save_top_k == -1
    assert recipe.trainer.strategy.ckpt_async_save is False
    assert recipe.trainer.strategy.context_parallel_size == 2
    assert _callback_targets(recipe) == [
        "TimingCallback",
        "EarlyStopping",
        "MegatronProgressBar",
        "MemoryMonitor",
        "SpeedMonitor",
        "RuntimeEstimator",
        "PytorchProfilerCallback",
    ]
    assert recipe.log.wandb.__fn_or_cls__.__name__ == "WandbLogger"


def test_cuda_graphs_graph_the_layers_pad_packed_rows_to_one_shape_and_tell_the_workers(tmp_path, no_te):
    from nemo_finetune import compat

    graphed = parse(f"--packed_sequence --micro_batch_size 1 --cuda_graphs --output_dir {tmp_path}")
    recipe = configure_recipe(graphed, no_te)
    # The workers graph the layers (compat.cuda_graphs.graph_layers_as_the_model_is_built); checkpoints keep "none".
    assert getattr(recipe.model.config, "cuda_graph_impl", "none") == "none" and recipe.data.one_shape is True
    assert recipe.trainer.num_sanity_val_steps == 0  # the first graphed layer calls must be a training step's
    assert configure_executor(graphed, no_te).env_vars[compat.CUDA_GRAPHS_ENV] == "1"

    eager = parse(f"--packed_sequence --micro_batch_size 1 --output_dir {tmp_path}")
    recipe = configure_recipe(eager, no_te)
    assert getattr(recipe.model.config, "cuda_graph_impl", "none") == "none" and recipe.data.one_shape is False
    assert recipe.trainer.num_sanity_val_steps == 1
    assert compat.CUDA_GRAPHS_ENV not in configure_executor(eager, no_te).env_vars


def test_checkpoints_are_named_as_the_seed_shows_them(tmp_path, no_te):
    """NeMo's ModelCheckpoint, built from the recipe's config, names a checkpoint directory this way."""
    import fiddle as fdl
    import torch
    from nemo.lightning.ckpt_utils import ckpt_to_dir

    checkpoint = fdl.build(configure_recipe(parse(f"--output_dir {tmp_path}"), no_te).log.ckpt)
    metrics = {"val_loss": torch.tensor(0.54321), "step": torch.tensor(799), "consumed_samples": torch.tensor(12800.0)}
    name = Path(ckpt_to_dir(checkpoint.format_checkpoint_name(metrics))).name
    assert name == "nemo_logs--val_loss=0.5432-step=799-consumed_samples=12800"


def test_recipe_with_transformer_engine_keeps_nemo_defaults(tmp_path):
    from nemo_finetune import compat

    recipe = configure_recipe(parse(f"--output_dir {tmp_path}"), compat.Environment(has_te=True, has_cuda=True))
    assert recipe.model.config.masked_softmax_fusion is True
    assert recipe.optim.config.use_distributed_optimizer is True
    from nemo.collections.llm.gpt.model.base import default_layer_spec

    assert recipe.model.config.transformer_layer_spec is default_layer_spec  # TE's attention, untouched


def test_without_te_training_uses_sdpa_attention_unless_asked_for_megatrons(tmp_path, no_te):
    from nemo.collections.llm.gpt.model.base import default_layer_spec

    from nemo_finetune.kernels import sdpa_attention

    recipe = configure_recipe(parse(f"--output_dir {tmp_path}"), no_te)
    assert recipe.model.config.transformer_layer_spec is sdpa_attention.layer_spec
    assert recipe.model.config.bias_activation_fusion and not recipe.model.config.cross_entropy_loss_fusion
    unfused = configure_recipe(parse(f"--output_dir {tmp_path} --core_attention unfused"), no_te)
    assert unfused.model.config.transformer_layer_spec is default_layer_spec


def test_assign_refuses_attributes_the_target_does_not_take(no_te, tmp_path):
    recipe = configure_recipe(parse(f"--output_dir {tmp_path}"), no_te)
    with pytest.raises(TypeError, match="takes no \\['tensor_parallel_size'\\]"):
        assign(recipe.trainer.strategy, tensor_parallel_size=2)  # the real name is tensor_model_parallel_size
    assign(recipe.trainer.strategy, sequence_parallel=True)


def test_dry_run_of_the_seed_multi_node_example_prints_the_plan(tmp_path):
    out = run_script(
        "peft_megatron.py",
        "--dry_run",
        "--num_nodes",
        "4",
        "--gpus_per_node",
        "8",
        "--tensor_parallel_size",
        "8",
        "--pipeline_parallel_size",
        "2",
        "--output_dir",
        str(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "global_batch_size: 128" in out.stdout
    assert "parallelism: TP 8 | PP 2 | CP 1 | DP 2" in out.stdout
    assert (
        f"launch: {sys.executable} -m torch.distributed.run " in out.stdout
        and "--nnodes 4 --nproc-per-node 8" in out.stdout
    )
    assert not (tmp_path / "imported_hf_ckpt").exists()  # a dry run touches nothing


def test_output_paths_that_are_files_are_refused_naming_the_flag(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for flag, value in (("--output_dir", a_file), ("--data_dir", a_file / "data"), ("--nemo_ckpt_dir", a_file)):
        with pytest.raises(ConfigError) as err:
            validate_config(parse(f"{flag} {value}"))
        assert f"{flag} {value}: {a_file} is a file, not a directory; choose another {flag}" in str(err.value)
    assert a_file.read_text() == "mine"


def test_an_output_directory_this_user_cannot_write_is_refused_before_any_work(tmp_path):
    """A read-only directory (root ignores permission bits, so only where the tests do not run as root) and a kernel
    filesystem (where root's access check says yes and the first write fails)."""
    cases = {Path("/proc/sys"): "is on the kernel's proc filesystem; choose a directory on disk"}
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases[locked] = "is not writable by this user"
    for directory, message in cases.items():
        out = run_script("peft_megatron.py", "--dry_run", "--output_dir", str(directory / "run"))
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert f"--output_dir {directory / 'run'}: {directory} {message}" in out.stderr


def test_a_symbolic_link_loop_on_a_path_flag_is_named_before_anything_resolves_it(assets, tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for flag in ("--output_dir", "--data_dir", "--nemo_ckpt_dir", "--hf_model_id", "--dataset_name"):
        with pytest.raises(ConfigError) as err:
            validate_config(parse(f"--dry_run {flag} {tmp_path / 'a' / 'x'}"))
        assert err.value.problems == [
            f"{flag} {tmp_path / 'a' / 'x'}: a symbolic link on the way loops; fix the link or give another path"
        ]
    out = run_script("peft_megatron.py", *qa_job(assets["qwen3"], tmp_path / "a"), "--dataset_name",
                     str(assets["data"]), "--prepare_data_only")  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr + out.stdout
    assert "a symbolic link on the way loops" in out.stderr


def test_model_directories_without_weights_or_tokenizer_or_with_impossible_sizes_are_refused(assets, tmp_path):
    import shutil

    def variant(name: str, drop: tuple[str, ...] = (), **sizes) -> Path:
        model = shutil.copytree(assets["qwen3"], tmp_path / name)
        for file in drop:
            (model / file).unlink()
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, **sizes}))
        return model

    expected = {
        variant("no_weights", ("model.safetensors",)): r"no weights in that directory \(no \*.safetensors or "
        r"pytorch_model\*.bin\); copy the model's weight files there",
        variant("no_tokenizer", ("tokenizer.json",)): r"no tokenizer in that directory \(none of tokenizer.json, "
        r"tokenizer.model, vocab.json, vocab.txt, spiece.model\); save the tokenizer beside the model",
        variant("zero_heads", num_attention_heads=0): r"config.json: num_attention_heads 0: a model's sizes are whole "
        r"numbers above 0; fix config.json",
        variant("text_sizes", num_hidden_layers="two", vocab_size=1.5): r"config.json: num_hidden_layers 'two', "
        r"vocab_size 1.5: a model's sizes",
        variant(
            "uneven_kv", num_key_value_heads=3
        ): r"num_attention_heads 4 is not a multiple of num_key_value_heads 3",
        variant("short_embedding", vocab_size=400): r"its tokenizer has token ids up to 442, past the model's 400 "
        r"embedding rows \(config.json vocab_size\); a row with such a token would stop training with a CUDA index "
        r"error. Resize the embeddings to the tokenizer \(model.resize_token_embeddings\(len\(tokenizer\)\)",
    }
    for model, message in expected.items():
        for phase in ("--dry_run", "--import_only"):
            with pytest.raises(ConfigError, match=message):
                validate_config(parse(f"--hf_model_id {model} --recipe_cls_name qwen3_600m {phase}"))
    data_only = f"--prepare_data_only --dataset_name {assets['data']} {' '.join(qa_flags(tmp_path / 'o'))}"
    validate_config(parse(f"--hf_model_id {tmp_path / 'no_weights'} --recipe_cls_name qwen3_600m {data_only}"))
    out = run_script("peft_megatron.py", *qa_job(tmp_path / "zero_heads", tmp_path / "run"), "--dataset_name",
                     str(assets["data"]), "--recipe_cls_name", "qwen3_600m", "--import_only")  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "run").exists()


def test_a_tokenizers_highest_id_counts_its_added_tokens_wherever_they_are_saved(assets, tmp_path):
    import shutil

    from nemo_finetune.checks import tokenizer_highest_id

    model = shutil.copytree(assets["qwen3"], tmp_path / "model")
    assert tokenizer_highest_id(model) == 442  # the demo tokenizer's 443 ids, as config.json's vocab_size
    settings = json.loads((model / "tokenizer_config.json").read_text())
    settings["added_tokens_decoder"]["450"] = {"content": "<tool>", "special": True}
    (model / "tokenizer_config.json").write_text(json.dumps(settings))
    assert tokenizer_highest_id(model) == 450
    (model / "added_tokens.json").write_text(json.dumps({"<call>": 451}))
    assert tokenizer_highest_id(model) == 451
    for name in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json"):
        (model / name).unlink()
    assert tokenizer_highest_id(model) is None  # nothing readable: no check
    (model / "vocab.json").write_text(json.dumps({"a": 0, "b": 7}))
    assert tokenizer_highest_id(model) == 7


@pytest.mark.parametrize("recipe", ["t5_220m", "mamba2_130m", "nemotron_nano_9b_v2"])
def test_recipes_that_are_not_a_gpt_decoders_fine_tuning_are_refused_by_the_dry_run(assets, tmp_path, recipe):
    out = run_script("peft_megatron.py", *qa_job(assets["qwen3"], tmp_path / "run"), "--dataset_name",
                     str(assets["data"]), "--recipe_cls_name", recipe, "--dry_run")  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr + out.stdout
    assert f"--recipe_cls_name {recipe}: NeMo's recipe is not a GPT-style decoder's fine-tuning recipe" in out.stderr


def test_a_recipe_of_another_decoder_family_is_refused_for_the_model(assets):
    with pytest.raises(ConfigError, match=r"--recipe_cls_name phi3_mini_4k_instruct imports phi3 models but .* says "
                                          r"model_type 'qwen3'"):  # fmt: skip
        validate_config(parse(f"--hf_model_id {assets['qwen3']} --recipe_cls_name phi3_mini_4k_instruct --dry_run"))


def test_the_multi_node_rendezvous_is_returned_and_set_only_around_the_launch(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    config = parse("--num_nodes 2 --node_rank 1 --gpus_per_node 8 --tensor_parallel_size 8")
    sagemaker = {"SM_HOSTS": '["algo-1", "algo-2"]'}
    expected = {"NODE_RANK": "1", "MASTER_PORT": "29500", "MASTER_ADDR": "algo-1"}
    assert rendezvous_environ(config, sagemaker) == expected
    given = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "6000"}
    assert rendezvous_environ(config, given) == {"NODE_RANK": "1", "MASTER_PORT": "6000"}
    assert rendezvous_environ(parse("--gpus_per_node 8 --tensor_parallel_size 8"), {}) == {}
    configure_executor(config)
    with scoped_environ(rendezvous_environ(config, sagemaker)):
        assert (os.environ["NODE_RANK"], os.environ["MASTER_ADDR"]) == ("1", "algo-1")
    assert not {"MASTER_ADDR", "MASTER_PORT", "NODE_RANK"} & set(os.environ)  # nothing left behind


# The flags, by --help section, that peft_megatron.py offers (grouping Config into dataclasses changed none of them).
HELP_SECTIONS = {
    "model": ["hf_model_id", "recipe_cls_name", "trust_remote_code"],
    "parallelism": [
        "num_nodes", "gpus_per_node", "tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size",
    ],
    "training": [
        "max_steps", "num_train_epochs", "val_check_interval", "log_every_n_steps", "micro_batch_size",
        "accumulate_grad_batches", "global_batch_size", "limit_val_batches", "max_seq_length", "packed_sequence",
        "cuda_graphs", "learning_rate", "min_learning_rate", "warmup_steps", "weight_decay", "max_grad_norm",
        "early_stopping_threshold", "early_stopping_patience", "core_attention", "save_weights_only", "save_top_k",
        "sync_checkpoint_save", "resume_from", "no_resume",
    ],
    "PEFT": ["peft_scheme", "full_ft", "lora_dim", "lora_alpha", "lora_dropout", "lora_target_modules"],
    "monitoring": [
        "enable_megatron_progress_bar", "enable_memory_monitor", "enable_speed_monitor", "enable_runtime_estimator",
        "enable_memory_profile", "enable_pytorch_profiler", "enable_nsys_callback", "use_wandb", "wandb_project",
    ],
    "paths": ["output_dir", "data_dir", "nemo_ckpt_dir"],
    "data": [
        "dataset_name", "dataset_subset", "dataset_revision", "input_column", "output_column", "system_column",
        "prompt_template", "chat", "val_fraction", "test_fraction", "seed", "max_samples", "overwrite_data",
    ],
    "run control": [
        "log_level", "node_rank", "wait_timeout_s", "config", "write_config", "dry_run", "import_only",
        "prepare_data_only", "demo",
    ],
    "cluster": [
        "executor", "slurm_account", "slurm_partition", "slurm_time", "container_image", "container_mounts", "detach",
    ],
}  # fmt: skip


def test_help_lists_every_flag_in_its_section():
    import re

    out = run_script("peft_megatron.py", "--help")
    assert out.returncode == 0, out.stderr
    sections: dict[str, list[str]] = {}
    current = None
    for line in out.stdout.splitlines():
        if re.fullmatch(r"[A-Za-z][\w ]*:", line):
            current = sections.setdefault(line[:-1], [])
        elif current is not None and (flag := re.match(r"  --(\w+)", line)):
            current.append(flag[1])
    assert sections.pop("options") == [] and "  -h, --help" in out.stdout  # argparse's own section: help only
    assert sections == HELP_SECTIONS


def test_config_is_its_groups_flattened():
    assert [g.GROUP for g in pm.Config.__bases__ if hasattr(g, "GROUP")] == [s for s in HELP_SECTIONS if s != "data"]
    assert flag_names(pm.Config) == [name for names in HELP_SECTIONS.values() for name in names]
    config = pm.Config(hf_model_id="m", max_steps=5, lora_dim=8)  # one flat namespace, as the flags are
    assert isinstance(config, pm.TrainingSettings) and (config.hf_model_id, config.max_steps) == ("m", 5)


def test_the_plan_shows_the_schedule_what_is_trained_tokens_per_step_and_epochs(assets, tmp_path):
    job = qa_job(
        assets["qwen3"],
        tmp_path / "run",
        *("--recipe_cls_name", "qwen3_600m", "--learning_rate", "3e-4", "--lora_dim", "8", "--lora_alpha", "16"),
        *("--max_steps", "40", "--val_check_interval", "20", "--micro_batch_size", "2", "--accumulate_grad_batches"),
        *("2", "--max_seq_length", "64", "--val_fraction", "0.2", "--test_fraction", "0.1"),
        dataset=assets["data"],
    )
    before = run_script("peft_megatron.py", "--dry_run", *job)
    assert before.returncode == 0, before.stderr[-3000:]
    assert "  epochs: known once the data is prepared (--prepare_data_only prints the split sizes)" in before.stdout
    assert run_script("peft_megatron.py", "--prepare_data_only", *job).returncode == 0
    plan = run_script("peft_megatron.py", "--dry_run", *job)
    assert plan.returncode == 0, plan.stderr[-3000:]
    lines = [line.strip() for line in plan.stdout.splitlines()]
    train_rows = json.loads((tmp_path / "run" / "data" / ".data_ready.json").read_text())["summary"]["rows"]["train"]
    assert {
        "optimizer: adam (peak lr 0.0003, betas 0.9/0.98, eps 1e-05, weight decay 0.1, gradient clip 1)",
        "learning rate: CosineAnnealingScheduler over 40 steps, 50 warm-up steps, down to 0; the warm-up is longer "
        "than the run, so the peak is never reached",
        "trained: LoRA adapters, rank 8, alpha 16 (scale 2), dropout 0, on linear_qkv, linear_proj, linear_fc1, "
        "linear_fc2",
        "tokens per step: at most 256 (4 rows of 64); padding to each batch's longest row is not trained",
        f"epochs: {40 * 4 / train_rows:,.1f} over {train_rows:,} training rows (40 steps x 4 rows)",
    } <= set(lines)


def test_a_multi_node_plan_shows_the_rendezvous_host_and_says_what_it_could_not_check(tmp_path):
    args = ["--dry_run", "--num_nodes", "2", "--gpus_per_node", "8", "--output_dir", str(tmp_path)]
    out = run_script("peft_megatron.py", *args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--rdzv-endpoint $MASTER_ADDR:29500" in out.stdout and "head_node_ip_var" not in out.stdout
    assert [line for line in out.stdout.splitlines() if line.startswith("  not checked here: ")] == [
        "  not checked here: --hf_model_id Qwen/Qwen3-8B: the hub is asked at the import (offline, give a local "
        "directory)",
        "  not checked here: the rendezvous host: set MASTER_ADDR (node 0's address) and MASTER_PORT on every node",
        "  not checked here: the validation split against one global batch: the data is not prepared yet",
    ]
    out = run_script("peft_megatron.py", *args, env={"MASTER_ADDR": "10.1.2.3"})
    assert "--rdzv-endpoint 10.1.2.3:29500" in out.stdout and "the rendezvous host" not in out.stdout


def test_a_dry_run_refuses_context_parallelism_that_the_launch_would_refuse():
    with pytest.raises(ConfigError, match="--context_parallel_size 2 needs Transformer Engine's attention"):
        validate_config(parse("--dry_run --context_parallel_size 2 --tensor_parallel_size 4"))
    slurm = "--dry_run --executor slurm --slurm_account a --container_image nvcr.io/nvidia/nemo:25.09"
    validate_config(parse(f"{slurm} --context_parallel_size 2 --tensor_parallel_size 4"))  # nodes with TE


def test_the_optimizer_schedule_and_lora_knobs_reach_the_recipe_and_the_plan(tmp_path, no_te):
    flags = (
        "--learning_rate 3e-4 --min_learning_rate 3e-5 --warmup_steps 7 --weight_decay 0.01 --max_grad_norm 0 "
        "--lora_dim 8 --lora_alpha 16 --lora_dropout 0.05 --lora_target_modules linear_qkv,*.layers.1.*.linear_fc2 "
        f"--max_steps 100 --val_check_interval 50 --output_dir {tmp_path}"
    )
    config = parse(flags)
    recipe = configure_recipe(config, no_te)
    optim, schedule, lora = recipe.optim.config, recipe.optim.lr_scheduler, recipe.peft
    assert (optim.lr, optim.weight_decay, optim.clip_grad) == (3e-4, 0.01, 0)
    assert (schedule.warmup_steps, schedule.min_lr) == (7, 3e-5)
    assert (lora.dim, lora.alpha, lora.dropout) == (8, 16, 0.05)
    assert lora.target_modules == ["linear_qkv", "*.layers.1.*.linear_fc2"]
    untouched = configure_recipe(parse(f"--output_dir {tmp_path}"), no_te)  # unset flags keep the recipe's values
    assert (untouched.optim.config.weight_decay, untouched.optim.config.clip_grad) == (0.1, 1.0)
    assert untouched.optim.lr_scheduler.warmup_steps == 50 and untouched.peft.dropout == 0.0
    out = run_script("peft_megatron.py", "--dry_run", *shlex.split(flags))
    assert out.returncode == 0, out.stderr[-3000:]
    assert (
        "  optimizer: adam (peak lr 0.0003, betas 0.9/0.98, eps 1e-05, weight decay 0.01, gradient clip 0)"
        in out.stdout
    )
    assert "  learning rate: CosineAnnealingScheduler over 100 steps, 7 warm-up steps, down to 3e-05" in out.stdout
    assert (
        "  trained: LoRA adapters, rank 8, alpha 16 (scale 2), dropout 0.05, on linear_qkv, *.layers.1.*.linear_fc2"
        in out.stdout
    )


def test_num_train_epochs_sets_the_steps_from_the_prepared_rows(assets, tmp_path, no_te):
    job = qa_job(
        assets["qwen3"],
        tmp_path / "run",
        *("--recipe_cls_name", "qwen3_600m", "--num_train_epochs", "2.5", "--val_check_interval", "5"),
        *("--micro_batch_size", "2", "--accumulate_grad_batches", "2", "--max_seq_length", "64"),
        *("--val_fraction", "0.2", "--test_fraction", "0.1"),
        dataset=assets["data"],
    )
    before = run_script("peft_megatron.py", "--dry_run", *job)
    assert before.returncode == 0, before.stderr[-3000:]
    assert (
        "  max_steps: from --num_train_epochs 2.5 once the data is prepared (--prepare_data_only, then this plan "
        "shows them) (validate every 5, 80 batches)" in before.stdout
    )
    assert run_script("peft_megatron.py", "--prepare_data_only", *job).returncode == 0
    rows = json.loads((tmp_path / "run" / "data" / ".data_ready.json").read_text())["summary"]["rows"]["train"]
    steps = math.ceil(2.5 * rows / 4)  # 4 rows per step
    plan = run_script("peft_megatron.py", "--dry_run", *job)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert f"  max_steps: {steps} (validate every 5, 80 batches)" in plan.stdout
    assert f"  epochs: {steps * 4 / rows:,.1f} over {rows:,} training rows ({steps} steps x 4 rows)" in plan.stdout
    # what the launch builds after its data phase: the trainer and the schedule run for those steps
    config = with_epoch_steps(parse(shlex.join(job)), {"rows": {"train": rows}})
    assert configure_recipe(config, no_te).trainer.max_steps == steps
    # a run too short to validate once, and both lengths at once, are refused by the plan as by the launch
    short = run_script("peft_megatron.py", "--dry_run", *job, "--val_check_interval", str(steps + 1))
    assert short.returncode == 2 and "Traceback" not in short.stderr
    assert f"is {steps} steps over {rows} training rows, fewer than --val_check_interval {steps + 1}" in short.stderr
    both = run_script("peft_megatron.py", "--dry_run", *job, "--max_steps", "40")
    assert both.returncode == 2
    assert "--max_steps 40 and --num_train_epochs 2.5 both set the length of the run; give one of them" in both.stderr


def test_resume_control_reaches_the_recipe_and_refuses_what_would_mix_runs(tmp_path, no_te):
    out = tmp_path / "run"
    default = configure_recipe(parse(f"--output_dir {out}"), no_te).resume
    assert (default.resume_if_exists, default.resume_from_path) == (True, None)
    fresh = configure_recipe(parse(f"--output_dir {out} --no_resume"), no_te).resume
    assert fresh.resume_if_exists is False
    ckpt = out / "nemo_logs" / "checkpoints" / "nemo_logs--val_loss=1.0-step=9-consumed_samples=80"
    fake_checkpoint(ckpt, adapter=True)
    chosen = parse(f"--output_dir {tmp_path / 'next'} --resume_from {ckpt}")
    validate_config(chosen)
    assert configure_recipe(chosen, no_te).resume.resume_from_path == str(ckpt.resolve())
    problems = {
        f"--output_dir {out} --no_resume": f"--no_resume: {out / 'nemo_logs' / 'checkpoints'} holds checkpoints",
        f"--resume_from {tmp_path}": f"--resume_from {tmp_path}: not a complete NeMo checkpoint",
        f"--resume_from {ckpt} --full_ft": "is a LoRA checkpoint and this is a --full_ft run",
        f"--resume_from {ckpt} --no_resume": "--resume_from and --no_resume contradict each other",
    }
    for flags, problem in problems.items():
        result = run_script("peft_megatron.py", "--dry_run", *shlex.split(flags))
        assert result.returncode == 2 and problem in result.stderr, (flags, result.stderr[-2000:])
    plan = run_script(
        "peft_megatron.py", "--dry_run", "--output_dir", str(tmp_path / "next"), "--resume_from", str(ckpt)
    )
    assert f"  resume: from {ckpt}" in plan.stdout


def test_a_settings_file_gives_the_plan_its_flags_and_the_flags_given_override_it(tmp_path):
    flags = [
        *("--output_dir", str(tmp_path / "run"), "--learning_rate", "3e-4", "--lora_dim", "8", "--num_nodes", "2"),
        *("--packed_sequence", "--micro_batch_size", "1", "--num_train_epochs", "2", "--input_column", "prompt"),
    ]
    settings = tmp_path / "run.yaml"
    first = run_script("peft_megatron.py", "--dry_run", *flags, "--write_config", str(settings))
    assert first.returncode == 0, first.stderr[-3000:]
    import yaml

    written = yaml.safe_load(settings.read_text())
    assert {k: written[k] for k in ("learning_rate", "lora_dim", "num_nodes", "packed_sequence", "input_column")} == {
        "learning_rate": 3e-4,
        "lora_dim": 8,
        "num_nodes": 2,
        "packed_sequence": True,
        "input_column": "prompt",
    }
    assert written["gpus_per_node"] == 8 and "max_steps" not in written  # resolved here; the epochs set the steps
    assert not {"dry_run", "write_config", "config"} & set(written)
    again = run_script("peft_megatron.py", "--dry_run", "--config", str(settings))
    assert again.returncode == 0, again.stderr[-3000:]
    plan = [line for line in first.stdout.splitlines() if line.startswith("  ")]
    assert [line for line in again.stdout.splitlines() if line.startswith("  ")] == plan
    override = run_script("peft_megatron.py", "--dry_run", "--config", str(settings), "--learning_rate", "1e-4")
    assert "  optimizer: adam (peak lr 0.0001," in override.stdout
    bad = {
        "learnin_rate: 1e-4\n": "unknown key 'learnin_rate' (did you mean learning_rate?)",
        "lora_target_modules: [linear_qkv]\n": "lora_target_modules must be one value, as its flag takes",
        "- 1\n- 2\n": "expected a mapping of flag names to values, found list",
        "learning_rate: [\n": "cannot read it as YAML",
    }
    for text, problem in bad.items():
        settings.write_text(text)
        out = run_script("peft_megatron.py", "--dry_run", "--config", str(settings))
        assert out.returncode == 2 and f"--config {settings}: {problem}" in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr
    missing = run_script("peft_megatron.py", "--dry_run", "--config", str(tmp_path / "none.yaml"))
    assert missing.returncode == 2 and "cannot read it as YAML (No such file or directory)" in missing.stderr


def test_global_batch_size_sets_the_accumulation_and_must_agree_with_it(tmp_path, no_te):
    layout = f"--gpus_per_node 8 --tensor_parallel_size 2 --micro_batch_size 2 --output_dir {tmp_path}"  # DP 4
    config = parse(f"{layout} --global_batch_size 64")
    assert (config.accumulate_grad_batches, config.global_batch_size) == (8, 64)
    assert configure_recipe(config, no_te).data.global_batch_size == 64
    validate_config(parse(f"{layout} --global_batch_size 64 --accumulate_grad_batches 8"))  # both, agreeing
    refused = {
        "--global_batch_size 60": "2 x --accumulate_grad_batches 8 x data-parallel size 4 = 64",
        "--global_batch_size 64 --accumulate_grad_batches 2": "x data-parallel size 4 = 16",
    }
    for flags, product in refused.items():
        out = run_script("peft_megatron.py", "--dry_run", *shlex.split(f"{layout} {flags}"))
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert f"--global_batch_size {flags.split()[1]} is not --micro_batch_size " in out.stderr
        assert product in out.stderr and "give a multiple of 8 and leave out --accumulate_grad_batches" in out.stderr
    settings = tmp_path / "run.yaml"
    flags = shlex.split(f"{layout} --global_batch_size 32")
    plan = run_script("peft_megatron.py", "--dry_run", *flags, "--write_config", str(settings))
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "  global_batch_size: 32" in plan.stdout and "  accumulate_grad_batches: 4" in plan.stdout
    assert "global_batch_size: 32\n" in settings.read_text()
    again = run_script("peft_megatron.py", "--dry_run", "--config", str(settings))
    assert again.returncode == 0 and "  global_batch_size: 32" in again.stdout, again.stderr[-2000:]


def test_an_unreachable_hub_fails_the_import_in_seconds_with_the_fix(tmp_path):
    offline_shell = {
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens there: what a machine without network meets
        "HF_HOME": str(tmp_path / "hf"),  # an empty cache
    }
    started = time.monotonic()
    out = run_script(
        "peft_megatron.py",
        *("--import_only", "--hf_model_id", "someorg/somemodel", "--output_dir", str(tmp_path / "run")),
        env=offline_shell,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert time.monotonic() - started < 60
    assert (
        "--hf_model_id someorg/somemodel: the Hugging Face hub (http://127.0.0.1:9) could not be reached "
        "(ConnectionError" in out.stderr
    )
    assert "point --hf_model_id at a local directory (save_pretrained output) or set HF_HUB_OFFLINE=1" in out.stderr
    assert not (tmp_path / "run" / "imported_hf_ckpt").exists()


def test_a_flag_that_is_a_negation_has_no_double_negative_twin(tmp_path):
    assert parse("--no_resume").no_resume and not parse("--no-full_ft").full_ft
    out = run_script("peft_megatron.py", "--dry_run", "--no-no_resume", "--output_dir", str(tmp_path))
    assert out.returncode == 2 and "unknown flag --no-no_resume (did you mean --no_resume?)" in out.stderr


def test_chat_data_with_a_tokenizer_without_a_chat_template_is_refused_by_the_dry_run_and_the_launch(assets, tmp_path):
    import shutil

    model = tmp_path / "base-model"
    shutil.copytree(assets["qwen3"], model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config_file = model / "tokenizer_config.json"
    config_file.write_text(
        json.dumps({k: v for k, v in json.loads(config_file.read_text()).items() if k != "chat_template"})
    )
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    )
    job = ["--hf_model_id", str(model), "--recipe_cls_name", "qwen3_600m", "--dataset_name", str(chats), "--chat"]
    for mode in ("--dry_run", "--prepare_data_only"):
        out = run_script("peft_megatron.py", mode, *job, "--output_dir", str(tmp_path / "run"))
        assert out.returncode == 2, out.stderr[-2000:]
        assert f"--chat: the tokenizer of --hf_model_id {model} has no chat template" in out.stderr
        assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()
    job[1] = str(assets["qwen3"])  # the same model with its chat template
    out = run_script("peft_megatron.py", "--dry_run", *job, "--output_dir", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_disk_too_small_for_the_import_is_refused_before_it_and_a_full_one_named_without_a_traceback(
    assets, tmp_path, small_disk
):
    job = [*qa_job(assets["qwen3"], tmp_path / "run"), "--dataset_name", str(assets["data"])]
    out = run_script("peft_megatron.py", *job, "--nemo_ckpt_dir", str(small_disk / "imported"), "--import_only")
    assert out.returncode == 2 and "Traceback" not in out.stderr + out.stdout
    assert f"--nemo_ckpt_dir {small_disk / 'imported'}: the import needs about" in out.stderr
    assert f"the filesystem of {small_disk} has 2.1 MB free; free space there or choose another" in out.stderr
    with open(small_disk / "filler", "wb", buffering=0) as fh:  # fill it to the last byte
        with contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 4096)
    before = assets["data"].read_bytes()
    out = run_script("peft_megatron.py", *job, "--data_dir", str(small_disk / "data"), "--prepare_data_only")
    assert out.returncode == 1 and "Traceback" not in out.stderr + out.stdout
    assert "error: the disk is full (No space left on device); free space there or choose another output" in out.stderr
    assert assets["data"].read_bytes() == before
