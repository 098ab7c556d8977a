"""--use_wandb: the W&B logger the recipe configures, offline (WANDB_MODE=offline), keeps what it is given."""

from __future__ import annotations

import shlex

import pytest

import peft_megatron as pm
from conftest import wandb_history
from nemo_finetune.recipe import configure_recipe


def test_the_recipes_wandb_logger_writes_an_offline_run_with_the_losses(tmp_path, monkeypatch):
    import fiddle as fdl

    from nemo_finetune import compat

    wandb = pytest.importorskip("wandb", reason="W&B is optional (requirements.txt installs it)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = pm.parse_config(shlex.split(f"--use_wandb --output_dir {tmp_path}"), environ={}, visible_gpus=lambda: 0)
    env = compat.Environment(has_te=False, has_cuda=False)
    logger = fdl.build(configure_recipe(config, env).log.wandb)
    logger.log_metrics({"reduced_train_loss": 2.5}, step=9)
    logger.log_metrics({"val_loss": 1.25}, step=9)
    assert logger.experiment.name == "peft_lora"  # the run is named after the mode
    logger.experiment.finish()
    # finish() returns before wandb-core's writer has flushed the run file (CI read a header-only file); the service
    # flushes when it shuts down, which a training process's exit does and teardown() does here.
    wandb.teardown()

    (run_dir,) = tmp_path.rglob("offline-run-*")
    rows = wandb_history(run_dir)
    assert [r["reduced_train_loss"] for r in rows if "reduced_train_loss" in r] == [2.5]
    assert [r["val_loss"] for r in rows if "val_loss" in r] == [1.25]
