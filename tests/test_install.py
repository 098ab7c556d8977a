"""`pip install .`: the console commands of an installed copy run the same code as the four scripts, and the
training workers' start-up hook travels with the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, run_script, script_env

COMMANDS = {
    "peft-megatron": "peft_megatron.py",
    "nemo-finetune-evaluate": "test_checkpoint.py",
    "nemo-finetune-export": "convert_checkpoint_to_hf.py",
    "nemo-finetune-data": "dataset_module.py",
}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The project installed with pip from a copy of its sources (no dependencies: they are this environment's)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "README.md", *COMMANDS.values()):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "nemo_finetune", source / "nemo_finetune", ignore=shutil.ignore_patterns("__pycache__"))
    target = root / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target)]
    subprocess.run([*pip, str(source)], check=True, capture_output=True, text=True, timeout=600)
    return target


def run_installed(target, command: str, *args: str, cwd=None):
    env = script_env({"PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])})
    return subprocess.run(
        [str(target / "bin" / command), *args], capture_output=True, text=True, env=env, timeout=600, cwd=cwd
    )


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_console_command_is_its_script(installed, command, tmp_path):
    ours = run_installed(installed, command, "--help", cwd=tmp_path)
    script = run_script(COMMANDS[command], "--help")
    assert ours.returncode == script.returncode == 0, ours.stderr[-2000:]
    normalised = ours.stdout.replace(command, COMMANDS[command])
    # argparse wraps the usage block by the program name's length; the flags and their help are the same
    assert normalised.split("\n\n", 1)[1] == script.stdout.split("\n\n", 1)[1]


def test_an_installed_copy_plans_a_job_and_carries_the_workers_start_up_hook(installed, tmp_path):
    out = run_installed(installed, "peft-megatron", "--dry_run", "--output_dir", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "  launch: " in out.stdout and "Traceback" not in out.stderr
    probe = "from nemo_finetune.layout import STARTUP_DIR; print(STARTUP_DIR)"
    env = script_env({"PYTHONPATH": str(installed)})
    startup = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert startup.stdout.strip() == str(installed / "nemo_finetune" / "startup")
    assert (installed / "nemo_finetune" / "startup" / "sitecustomize.py").is_file()
    bad = run_installed(installed, "nemo-finetune-data", "--dataset_name", "x.jsonl", cwd=tmp_path)
    assert bad.returncode == 2 and "--data_dir is required" in bad.stderr  # run_cli's exit codes, no traceback
