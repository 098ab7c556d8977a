"""Phase 3: the NeMo recipe of a job (model, strategy, trainer, data, logging, callbacks, optimizer, PEFT), by plain
assignment over the NeMo recipe module's `finetune_recipe` defaults."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from nemo_finetune.checkpoints import is_nemo_checkpoint
from nemo_finetune.choices import lora_targets
from nemo_finetune.layout import RUN_NAME
from nemo_finetune.resolve import tokenizer_source

log = logging.getLogger("peft_megatron")


def recipe_module(name: str):
    from importlib import import_module

    return import_module(f"nemo.collections.llm.recipes.{name}")


def _accepted_params(target) -> set[str]:
    """Parameter names `target` really accepts: fiddle configs silently take misspelled attributes on classes
    whose __init__ has **kwargs (MegatronStrategy), so follow **kwargs up the MRO and stop where it ends."""
    import inspect

    if not inspect.isclass(target):
        return set(inspect.signature(target).parameters)
    names: set[str] = set()
    for cls in target.__mro__:
        if "__init__" not in vars(cls) or cls is object:
            continue
        params = inspect.signature(vars(cls)["__init__"]).parameters
        names.update(n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self")
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return names


def given(**values) -> dict:
    """The settings the user gave (None: the recipe's own value stays)."""
    return {name: value for name, value in values.items() if value is not None}


def assign(cfg, **values) -> None:
    """Set fields on a fiddle config, refusing names its target does not take (a typo would only fail on GPU)."""
    unknown = sorted(set(values) - _accepted_params(cfg.__fn_or_cls__))
    if unknown:
        raise TypeError(f"{cfg.__fn_or_cls__.__qualname__} takes no {unknown}")
    for name, value in values.items():
        setattr(cfg, name, value)


def configure_recipe(config, env=None):
    """The NeMo recipe for this job, by plain assignment over `finetune_recipe`'s defaults."""
    import fiddle as fdl
    import nemo_run as run

    from nemo_finetune import compat

    env = env or compat.detect_environment()
    recipe = recipe_module(config.recipe_cls_name).finetune_recipe(
        dir=str(config.output_path),
        name=RUN_NAME,
        num_nodes=config.num_nodes,
        num_gpus_per_node=config.gpus_per_node,
        peft_scheme=None if config.full_ft else config.peft_scheme.lower(),
        packed_sequence=False,
    )
    if is_nemo_checkpoint(config.nemo_ckpt_path):
        # The architecture is the imported model's (sizes come from its HF config), not the recipe's default size.
        from nemo.lightning.io import load_context

        imported = load_context(config.nemo_ckpt_path / "context", subpath="model.config", build=False)
        recipe.model.config = fdl.cast(run.Config, imported)
    # Sequence length settings in the model and the data must agree.
    skipped = compat.skipped_in_workers(os.environ)  # the workers inherit this environment
    overrides = compat.model_config_overrides(env, training=True, skip=skipped)
    assign(recipe.model.config, seq_length=config.max_seq_length, **overrides)
    configure_attention(config, recipe.model.config, env)
    recipe.data = configure_data(config)

    assign(
        recipe.trainer.strategy,
        tensor_model_parallel_size=config.tensor_parallel_size,
        pipeline_model_parallel_size=config.pipeline_parallel_size,
        context_parallel_size=config.context_parallel_size,
        ckpt_load_strictness=False,  # LoRA adapters are absent from the base checkpoint
        ckpt_async_save=not config.sync_checkpoint_save,
    )
    assign(
        recipe.trainer,
        # None only in a plan whose steps come from --num_train_epochs over data not prepared yet (-1: unbounded).
        max_steps=-1 if config.max_steps is None else config.max_steps,
        # Megatron's local CUDA graphs capture whichever layer calls come first. NeMo's LoRA set-up puts the model
        # back in train mode after Lightning's eval() for the sanity check, so those no-grad calls would be captured
        # as forward-only graphs that training steps then replay and cannot run backward through.
        num_sanity_val_steps=0 if config.cuda_graphs else 1,
        val_check_interval=config.val_check_interval,
        limit_val_batches=config.limit_val_batches,
        log_every_n_steps=config.log_every_n_steps,
        # Megatron accumulates the micro-batches of one global batch inside a step; Lightning's accumulation would
        # multiply it again, so gradient accumulation lives in global_batch_size only.
        accumulate_grad_batches=1,
    )
    recipe.trainer.callbacks = list(recipe.trainer.callbacks or []) + configure_callbacks(config)
    recipe.log = configure_logger(config)

    # By default a run continues from its -last checkpoint where there is one (a restarted job loses nothing).
    if config.resume_from is not None:
        assign(recipe.resume, resume_from_path=str(Path(config.resume_from).expanduser().resolve()))
    assign(recipe.resume, resume_if_exists=not config.no_resume, resume_ignore_no_checkpoint=True)
    assign(recipe.resume.restore_config, path=str(config.nemo_ckpt_path.resolve()))

    optim = given(lr=config.learning_rate, weight_decay=config.weight_decay, clip_grad=config.max_grad_norm)
    assign(recipe.optim.config, **optim, **compat.optimizer_config_overrides(env))
    schedule = given(warmup_steps=config.warmup_steps, min_lr=config.min_learning_rate)
    if schedule:
        assign(recipe.optim.lr_scheduler, **schedule)
    if not config.full_ft:
        targets = lora_targets(config.lora_target_modules)
        lora = given(dim=config.lora_dim, alpha=config.lora_alpha, dropout=config.lora_dropout, target_modules=targets)
        assign(recipe.peft, **lora)
    recipe.tokenizer = "data"
    return recipe


def configure_attention(config, model_config, env) -> None:
    """Without TE, train with SDPA core attention (sdpa_attention.py) unless --core_attention unfused; a model
    family with its own layer spec keeps it."""
    if env.has_te or config.core_attention != "sdpa":
        return
    from nemo.collections.llm.gpt.model.base import default_layer_spec, local_layer_spec

    from nemo_finetune.kernels import sdpa_attention

    if model_config.transformer_layer_spec in (default_layer_spec, local_layer_spec, sdpa_attention.layer_spec):
        assign(model_config, transformer_layer_spec=sdpa_attention.layer_spec)
    else:
        log.warning(
            "this model has its own layer spec (%s); its attention is kept", model_config.transformer_layer_spec
        )


def configure_data(config):
    import nemo_run as run

    from dataset_module import GeneralizedHFDataModule

    return run.Config(
        GeneralizedHFDataModule,
        dataset_config=dataclasses.asdict(config.data),
        tokenizer_name_or_path=tokenizer_source(config),
        dataset_root=str(config.data_path.resolve()),
        seq_length=config.max_seq_length,
        micro_batch_size=config.micro_batch_size,
        global_batch_size=config.global_batch_size,
        trust_remote_code=config.trust_remote_code,
        wait_timeout_s=config.wait_timeout_s,
        tokenizer_identity=config.hf_model_id,
        packed_sequence=config.packed_sequence,
        one_shape=config.cuda_graphs,
        num_workers=2,
    )


def configure_logger(config):
    import nemo_run as run
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
    from nemo import lightning as nl

    wandb = None
    if config.use_wandb:
        wandb = run.Config(
            WandbLogger, project=config.wandb_project, name=config.experiment_title, save_dir=str(config.output_path)
        )
    checkpoint = run.Config(
        nl.ModelCheckpoint,
        monitor="val_loss",
        mode="min",
        save_last="link",
        save_top_k=config.save_top_k,
        save_weights_only=config.save_weights_only,
        # NeMo's default drops the optimizer from the checkpoint written at the end of training, so a run resumed
        # from `last` could not continue; keep it unless the user asked for weights only.
        save_optim_on_train_end=not config.save_weights_only,
        # Saved when validation ends, so the val_loss in the name is the one just measured.
        every_n_train_steps=None,
        # Lightning formats every {field} as field=value and would print an unknown {model_name} as model_name=0.
        filename=f"{RUN_NAME}--{{val_loss:.4f}}-{{step}}-{{consumed_samples:.0f}}",
    )
    return run.Config(
        nl.NeMoLogger,
        name=RUN_NAME,
        log_dir=str(config.output_path.resolve()),
        use_datetime_version=False,  # a stable checkpoint directory is what lets a restarted run resume
        # Relative to log_dir, which NeMoLogger resolves it against: <output_dir>/tb_logs.
        tensorboard=run.Config(TensorBoardLogger, save_dir=config.layout.tensorboard.name, name="peft_megatron"),
        wandb=wandb,
        ckpt=checkpoint,
    )


def configure_callbacks(config) -> list:
    import nemo_run as run
    from lightning.pytorch.callbacks import EarlyStopping
    from nemo.lightning.pytorch import callbacks as cb

    callbacks = [
        run.Config(
            EarlyStopping,
            monitor="val_loss",
            min_delta=config.early_stopping_threshold,
            patience=config.early_stopping_patience,
            mode="min",
            verbose=True,
        )
    ]
    if config.enable_megatron_progress_bar:
        callbacks.append(run.Config(cb.MegatronProgressBar, refresh_rate=config.log_every_n_steps))
    if config.enable_memory_monitor:
        callbacks.append(run.Config(cb.MemoryMonitor))
    else:  # the run report's peak memory: one statistic, logged like the loss
        callbacks.append(run.Config(cb.MemoryMonitor, memory_keys={"allocated_bytes.all.peak": "peak_allocated_mem"}))
    if config.enable_speed_monitor:
        callbacks.append(run.Config(cb.SpeedMonitor, window_size=100))
    if config.enable_runtime_estimator:
        callbacks.append(run.Config(cb.RuntimeEstimator))
    profile_dir = str(config.layout.profiles.resolve())
    if config.enable_memory_profile:
        callbacks.append(run.Config(cb.MemoryProfileCallback, dir=profile_dir, ranks=[0]))
    if config.enable_pytorch_profiler:
        callbacks.append(run.Config(cb.PytorchProfilerCallback, start_step=1, end_step=2, trace_dir=profile_dir))
    if config.enable_nsys_callback:
        callbacks.append(run.Config(cb.NsysCallback, start_step=1, end_step=2, ranks=[0]))
    return callbacks
