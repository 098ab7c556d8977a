"""Fixes of upstream bugs that bite with or without TE: each names the defect and the release that fixes it."""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.util
import inspect
import itertools
import logging
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nemo_finetune.compat.base import Shim, mark, register, replace_attribute, replacement_count, undo

log = logging.getLogger("peft_megatron.compat")

SHIMS = register(
    {
        "async-save-staged-buffers": Shim(
            "training workers (with or without TE) on Megatron-Core 0.15 / 0.16",
            "TemporalAsyncCaller (NeMo's asynchronous checkpoint save, on by default) drops the pinned host copies "
            "of the checkpoint's tensors once its writer is forked; torch reuses them while the writer reads them",
            "Megatron-Core >= 0.17.0 (Megatron-LM #2288 holds them until the writer is joined)",
        ),
        "model-init-seed": Shim(
            "training workers (with or without TE) on NeMo 2.7.3",
            "MegatronStrategy sets up Megatron's generators through init_parallel_ranks without a seed, which then "
            "defaults to 1234: the initialisation of LoRA adapters (and of any new weight) and dropout ignore --seed",
            "NeMo's strategy passes a configurable seed to init_parallel_ranks",
        ),
        "val-loss-batch-weights": Shim(
            "training workers (with or without TE) on NeMo 2.7.3 with Lightning 2.4",
            "MegatronStrategy.validation_step logs val_loss without a batch size (its training step passes 1), and "
            "Lightning's mean over a validation then weighs each batch by the size it infers from the batch fetched "
            "before it (the step takes the dataloader's iterator): 1 for the first, the micro-batch size for the rest",
            "NeMo passes batch_size to that log call (an explicit one already wins over this shim's)",
        ),
        "private-tokenizer-assets": Shim(
            "the HF -> NeMo import (global rank 0) on NeMo 2.7.3",
            "the HF importers save the model's tokenizer into /tmp/nemo_tokenizer (ModelConnector."
            "save_hf_tokenizer_assets' default), one directory for every import on the machine, and the checkpoint "
            "copies it from there only when it is written, minutes later for a large model: an import running beside "
            "another can take the other model's tokenizer, and files an earlier import left there join the next "
            "one's; it also loads the tokenizer with trust_remote_code=True whatever --trust_remote_code says",
            "NeMo saves the tokenizer into a directory of each import's own",
        ),
        "nemo-run-root-logger": Shim(
            "the launching process (peft_megatron.py), around each NeMo-Run Experiment",
            "NeMo-Run 0.11.1 replaces the root logger's handlers when an Experiment is built and removes the first "
            "one when it is garbage-collected: the console policy and the log file would be lost after a launch",
            "NeMo-Run leaves the root logger alone",
        ),
        "seeded-packing-shuffle": Shim(
            "data preparation with --packed_sequence",
            "NeMo 2.7.3's first_fit_shuffle draws its order from numpy's global generator, which nothing seeds: "
            "two runs of one command pack different rows",
            "NeMo seeds the packing shuffle (prepare_packed_sequence_data's seed reaches it)",
        ),
        "chat-eos-id-zero": Shim(
            "the data module with --chat (training workers, packing) on NeMo 2.7.3",
            "_chat_preprocess appends EOS to a conversation only `if tokenizer.eos_id`: with a tokenizer whose EOS id "
            "is 0 (GPT-NeoX's, Pythia's, the demo's) chat rows train without it, so the model never learns to stop",
            "NeMo tests `tokenizer.eos_id is not None`",
        ),
        "stale-memmap-index": Shim(
            "data preparation",
            "NeMo's JSONL reader reuses the newline index beside a file (<file>.idx.npy) without checking it against "
            "the file: after a re-prepare it would cut the new rows at the old offsets",
            "NeMo checks the index against the file's size and time",
        ),
        "decode-graph-count": Shim(
            "test_checkpoint.py's generation with CUDA graphs",
            "Megatron-Core 0.15.3's DynamicInferenceContext fails with IndexError (dynamic_context.py:385) when its "
            "spacing of decode graphs is not below max_requests, e.g. for a test split of 4 prompts",
            "Megatron-Core guards the graph spacing",
        ),
        "module-name-warning": Shim(
            "convert_checkpoint_to_hf.py's verification load",
            "transformers 4.57's from_pretrained looks for custom generation code under a module named after the "
            "directory and warns that a checkpoint's name (`...val_loss=0.5432...`) is no Python identifier, "
            "although nothing is imported from there",
            "transformers stops deriving module names for local directories without custom code",
        ),
    }
)


# --------------------------------------------------------------------------------------------------------------------
# Asynchronous checkpoint save (training workers, with or without TE)
# --------------------------------------------------------------------------------------------------------------------
ASYNC_SAVE_MODULE = "megatron.core.dist_checkpointing.strategies.async_utils"

STAGED_BUFFERS_DROPPED_IN = ("0.15.", "0.16.")  # the Megatron-Core releases before Megatron-LM #2288


def hold_async_save_buffers() -> None:
    """NeMo saves checkpoints asynchronously (MegatronStrategy's ckpt_async_save defaults to True) through
    Megatron-Core's TemporalAsyncCaller: the checkpoint's tensors are copied into pinned host memory, a writer
    process is forked to write them, and the caller drops its references to those copies as soon as the writer
    starts. Pinned pages are shared with a forked child, not copied on write, and torch's pinned-memory cache hands
    the freed buffers to the trainer's next pinned allocations (the data loader pins every batch), so the writer can
    save whatever has been put there since (a LoRA output matrix read back as all zero: docs/gpu-validation.md).
    The caller now holds the
    copies until the writer has been joined, as Megatron-LM #2288 does. Remove with Megatron-Core >= 0.17.0."""
    caller = importlib.import_module(ASYNC_SAVE_MODULE).TemporalAsyncCaller
    schedule, close = caller.schedule_async_call, caller.close
    if getattr(schedule, "_nemo_compat", False):
        return

    @functools.wraps(schedule)
    def schedule_async_call(self, async_req):
        stage = async_req.preload_fn
        if stage is not None:

            def stage_and_hold():
                self._nemo_compat_staged = stage()
                return self._nemo_compat_staged

            async_req = async_req._replace(preload_fn=stage_and_hold)
        return schedule(self, async_req)

    @functools.wraps(close)
    def close_after_writer(self, abort: bool = False):
        result = close(self, abort)
        self._nemo_compat_staged = None  # the writer has been joined (or killed)
        return result

    schedule_async_call._nemo_compat = True
    replace_attribute("async-save-staged-buffers", caller, "schedule_async_call", schedule_async_call)
    replace_attribute("async-save-staged-buffers", caller, "close", close_after_writer)
    mark("async-save-staged-buffers", "asynchronous checkpoint saves keep their pinned copies until written")


# --------------------------------------------------------------------------------------------------------------------
# The model's initialisation seed (training workers, with or without TE)
# --------------------------------------------------------------------------------------------------------------------
STRATEGY_LIB_MODULE = "nemo.lightning._strategy_lib"


def seed_model_init(seed: int) -> None:
    """init_parallel_ranks seeds Python's, numpy's, torch's and Megatron's CUDA generators (the tensor-parallel RNG
    tracker) before the model and its adapters are built; NeMo's strategies call it without a seed. A call that
    gives none now gets the run's. Remove when NeMo's MegatronStrategy passes a seed of its own."""
    lib = importlib.import_module(STRATEGY_LIB_MODULE)
    init = lib.init_parallel_ranks
    if getattr(init, "_nemo_compat", False):
        return

    @functools.wraps(init)
    def init_parallel_ranks(*args, **kwargs):
        if len(args) < 5 and "seed" not in kwargs:  # (world_size, global_rank, local_rank, parallel_config, seed)
            kwargs["seed"] = seed
        return init(*args, **kwargs)

    init_parallel_ranks._nemo_compat = True
    replace_attribute("model-init-seed", lib, "init_parallel_ranks", init_parallel_ranks)
    mark("model-init-seed", f"Megatron's generators seeded with --seed {seed}")


# --------------------------------------------------------------------------------------------------------------------
# The validation loss (training workers, with or without TE)
# --------------------------------------------------------------------------------------------------------------------
STRATEGY_MODULE = "nemo.lightning.pytorch.strategies.megatron_strategy"


def weigh_validation_batches_equally() -> None:
    """val_loss, which picks the best checkpoint and stops early, is the mean of its validation batches' losses, each
    batch counted once. NeMo's MegatronStrategy logs each batch's loss without a batch size, so Lightning infers one
    from the batch its fetcher handed out before the step: none for the first batch (weight 1), the previous batch
    for the others (weight --micro_batch_size); at the default 8 the first batch counted 1/8 as much as each other.
    Remove when NeMo passes batch_size to that log call."""
    strategy = importlib.import_module(STRATEGY_MODULE).MegatronStrategy
    if getattr(strategy.validation_step, "_nemo_compat", False):
        return
    replace_attribute(
        "val-loss-batch-weights", strategy, "validation_step", equal_batch_weights(strategy.validation_step)
    )
    mark("val-loss-batch-weights", "val_loss is the plain mean of its validation batches' losses")


def equal_batch_weights(validation_step):
    """`validation_step` (a Lightning strategy's) with every value it logs counted as one batch of weight 1."""

    @functools.wraps(validation_step)
    def step(self, *args, **kwargs):
        module = self.lightning_module
        module.log = functools.partial(module.log, batch_size=1)  # an instance attribute over the method, this step
        try:
            return validation_step(self, *args, **kwargs)
        finally:
            del module.log

    step._nemo_compat = True
    return step


# --------------------------------------------------------------------------------------------------------------------
# The HF -> NeMo import
# --------------------------------------------------------------------------------------------------------------------
CONNECTOR_MODULE = "nemo.lightning.io.connector"


@contextlib.contextmanager
def private_tokenizer_assets(trust_remote_code: bool) -> Iterator[None]:
    """Inside the block each tokenizer NeMo's importers save goes into a new directory of this import's own (under
    the system's temporary directory, removed at the end) instead of the machine-wide /tmp/nemo_tokenizer, and is
    loaded with `trust_remote_code` as the user gave it."""
    connector = importlib.import_module(CONNECTOR_MODULE).ModelConnector
    parameters = list(inspect.signature(connector.save_hf_tokenizer_assets).parameters)
    if parameters != ["self", "tokenizer_name_or_path", "save_path"]:
        log.warning("compat: the import's tokenizer directory left as is: %s is not NeMo 2.7.3's", CONNECTOR_MODULE)
        yield
        return
    since = replacement_count()
    with tempfile.TemporaryDirectory(prefix="nemo_tokenizer_") as root:
        saved = itertools.count()

        def save_hf_tokenizer_assets(self, tokenizer_name_or_path, save_path=None):
            from transformers import AutoTokenizer

            if save_path is None:  # the checkpoint keeps the directory's name: context/nemo_tokenizer, as NeMo's
                save_path = str(Path(root) / str(next(saved)) / "nemo_tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path, trust_remote_code=trust_remote_code)
            tokenizer.save_pretrained(save_path)
            return save_path

        replace_attribute("private-tokenizer-assets", connector, "save_hf_tokenizer_assets", save_hf_tokenizer_assets)
        mark("private-tokenizer-assets", "the imported tokenizer is saved into a directory of this import's own")
        try:
            yield
        finally:
            undo("private-tokenizer-assets", since=since)


# --------------------------------------------------------------------------------------------------------------------
# NeMo-Run's root logger (the launching process)
# --------------------------------------------------------------------------------------------------------------------
_EXPERIMENTS: list[Any] = []  # see experiment(): kept alive so that their __del__ runs only at exit


@contextlib.contextmanager
def experiment(title: str, **kwargs: Any) -> Iterator[Any]:
    """`nemo_run.Experiment(title, **kwargs)`, entered, with the root logger's handlers and level left as they were:
    NeMo-Run 0.11.1 replaces them when an Experiment is built (`logging.basicConfig(force=True)`) and removes the
    first one when it is garbage-collected (`Experiment.__del__`). Ours go back once it is built; keeping the object
    alive defers its __del__ to interpreter exit."""
    import nemo_run as run

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def restore() -> None:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        for handler in [h for h in handlers if h not in root.handlers]:
            root.addHandler(handler)
        root.setLevel(level)

    try:
        exp = run.Experiment(title, **kwargs)
        restore()
        mark("nemo-run-root-logger", "NeMo-Run's experiments leave the root logger's handlers as they were")
        _EXPERIMENTS.append(exp)
        with exp:
            yield exp
    finally:
        restore()


# --------------------------------------------------------------------------------------------------------------------
# Data preparation
# --------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def seeded_numpy(seed: int) -> Iterator[None]:
    """numpy's global generator seeded with `seed`, and given back as it was, around NeMo's packing (its
    first_fit_shuffle draws from that generator and nothing seeds it)."""
    import numpy as np

    mark("seeded-packing-shuffle", "NeMo's packing order is drawn from a generator seeded with --seed")
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def chat_eos_for_id_zero() -> None:
    """Chat rows end with EOS whatever its id: NeMo's _chat_preprocess skips the EOS it appends when the id is 0
    (a false value); the wrapper appends it there as NeMo does for any other id (loss on it, answer extended)."""
    import torch

    core = importlib.import_module("nemo.collections.llm.gpt.data.core")
    preprocess = core._chat_preprocess
    if getattr(preprocess, "_nemo_compat", False):
        return

    @functools.wraps(preprocess)
    def _chat_preprocess(source, tokenizer, tool_schemas=None):
        result = preprocess(source, tokenizer, tool_schemas)
        if tokenizer.eos_id == 0 and int(result["input_ids"][-1]) != 0:
            eos = torch.zeros(1, dtype=torch.long)
            part = "context_ids" if bool(result["loss_mask"].all()) else "answer_ids"  # NeMo's split of the row
            result["input_ids"] = torch.cat([result["input_ids"], eos])
            result["loss_mask"] = torch.cat([result["loss_mask"], torch.ones(1, dtype=torch.bool)])
            result[part] = torch.cat([result[part], eos])
        return result

    _chat_preprocess._nemo_compat = True
    replace_attribute("chat-eos-id-zero", core, "_chat_preprocess", _chat_preprocess)
    mark("chat-eos-id-zero", "chat rows end with EOS whatever its id")


def remove_memmap_indexes(paths: list[Path]) -> None:
    """Remove the newline index NeMo's JSONL reader keeps beside each file (`<file>.idx.npy`, `.idx.info`) before
    new files are written there: NeMo reuses an index without checking it, and rebuilds it on first read."""
    mark("stale-memmap-index", "NeMo's JSONL indexes are rebuilt after each preparation")
    for path in paths:
        for suffix in (".idx.npy", ".idx.info"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------------
# Generation and export
# --------------------------------------------------------------------------------------------------------------------
def decode_graph_count(requested: int, max_batch_size: int, tensor_parallel_size: int) -> int:
    """How many decode CUDA graphs to ask DynamicInferenceContext for. Megatron-Core 0.15.3 rounds max_requests up
    to a multiple of 4 and of the TP size from 4 requests on (REQUEST_ROUNDER), spaces the graphs' batch sizes by
    max_requests / count rounded up to a multiple of 8 and of the TP size, and fails when that step is not below
    max_requests. One graph, at max_requests, is what it would use there."""
    tp = tensor_parallel_size
    max_requests = max_batch_size
    if max_batch_size >= 4:
        rounder = math.ceil(4 / tp) * tp
        max_requests = math.ceil(max_batch_size / rounder) * rounder
    step = math.ceil(max_requests / min(requested, max_requests) / 8) * 8
    step = math.ceil(step / tp) * tp
    if step < max_requests:
        return requested
    mark("decode-graph-count", "one decode CUDA graph where Megatron's spacing of several would fail")
    return 1


def _not_the_module_name_warning(record: logging.LogRecord) -> bool:
    return "is not a valid Python identifier" not in record.getMessage()


@contextlib.contextmanager
def without_module_name_warning() -> Iterator[None]:
    """transformers' warning that a checkpoint directory's name is no Python identifier, silenced for one load."""
    module_logger = logging.getLogger("transformers.dynamic_module_utils")
    module_logger.addFilter(_not_the_module_name_warning)
    mark("module-name-warning", "transformers' module-name warning silenced for local checkpoint loads")
    try:
        yield
    finally:
        module_logger.removeFilter(_not_the_module_name_warning)
