"""Phase 2: the job's data: dataset_module's JSONL splits (and packed rows), checked against one global batch."""

from __future__ import annotations

import dataclasses
import logging
import math

from dataset_module import DataTarget, fingerprint, format_summary, prepare_dataset
from nemo_finetune.errors import ConfigError, PipelineError
from nemo_finetune.recipe import configure_data
from nemo_finetune.records import data_files
from nemo_finetune.resolve import tokenizer_source

log = logging.getLogger("peft_megatron")


def data_target(config) -> DataTarget:
    """Where and for which tokenizer the job's data is prepared (the imported checkpoint's tokenizer once there)."""
    return DataTarget(
        config.data_path,
        tokenizer_source(config),
        config.max_seq_length,
        tokenizer_identity=config.hf_model_id,
        trust_remote_code=config.trust_remote_code,
        global_rank=config.node_rank,
        wait_timeout_s=config.wait_timeout_s,
    )


def prepare_data(config) -> dict:
    """JSONL splits (and packed rows) for the job; refused when validation would run no batch."""
    summary = prepare_dataset(config.data, data_target(config))
    if config.packed_sequence:
        import fiddle as fdl

        summary["packed"] = fdl.build(configure_data(config)).prepare_packed(global_rank=config.node_rank)
    print(format_summary(summary), flush=True)
    problem = validation_problem(config, summary)
    if problem:
        raise PipelineError(problem)
    return summary


def prepared_summary(config) -> dict | None:
    """The summary of data already prepared in --data_dir with these settings (what a re-run would reuse), else None."""
    record = data_files(config.data_path).read() or {}
    summary = record.get("summary")
    if not isinstance(summary, dict) or not isinstance(summary.get("rows"), dict):
        return None
    if config.data.dataset_name is None:  # the JSONL there is the data, whatever made it
        return summary
    recorded = record.get("fingerprint")
    expected = fingerprint(config.data, config.hf_model_id)["sha256"]
    return summary if isinstance(recorded, dict) and recorded.get("sha256") == expected else None


def validation_problem(config, summary: dict) -> str | None:
    """Why validation would run no batch with this data (no val_loss, so no checkpoint), or None. Megatron's
    validation sampler drops the incomplete last global batch."""
    val_rows = summary["packed"]["val"]["packs"] if config.packed_sequence else summary["rows"].get("val", 0)
    if val_rows >= config.global_batch_size:
        return None
    what = "packs into" if config.packed_sequence else "has"
    return (
        f"the validation split {what} {val_rows} rows, fewer than one global batch ({config.global_batch_size}): "
        "validation would run no batch, so no val_loss and no checkpoint. Raise --val_fraction or lower "
        "--micro_batch_size/--accumulate_grad_batches"
    )


def training_rows(config, summary: dict) -> int:
    """The rows one epoch trains on: the training split's samples, or its packed rows with --packed_sequence."""
    return summary["packed"]["train"]["packs"] if config.packed_sequence else summary["rows"].get("train", 0)


def with_epoch_steps(config, summary: dict):
    """`config` with --max_steps from --num_train_epochs over the prepared rows (unchanged without epochs): enough
    global batches to show every training row `num_train_epochs` times."""
    if config.num_train_epochs is None or config.max_steps is not None:
        return config
    rows = training_rows(config, summary)
    steps = max(1, math.ceil(config.num_train_epochs * rows / config.global_batch_size))
    log.info(
        "--num_train_epochs %g over %d training rows at %d rows per step: %d steps",
        config.num_train_epochs,
        rows,
        config.global_batch_size,
        steps,
    )
    if config.val_check_interval > steps:
        raise ConfigError(
            [
                f"--num_train_epochs {config.num_train_epochs:g} is {steps} steps over {rows} training rows, fewer "
                f"than --val_check_interval {config.val_check_interval}: validation (and so checkpointing) would "
                f"never run; give --val_check_interval {steps} or less"
            ]
        )
    return dataclasses.replace(config, max_steps=steps)


def tokens_per_row(config, summary: dict) -> float | None:
    """The real (non-padding) tokens a training row holds on average: a packed row's filled share of
    --max_seq_length, or the training split's mean prompt+answer length after truncation; None when the data's
    record predates the mean."""
    if config.packed_sequence:
        return summary["packed"]["train"]["fill"] * config.max_seq_length
    return (summary.get("tokens") or {}).get("mean")
