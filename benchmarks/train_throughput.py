"""Training throughput on one GPU: the project's own training path (configure_recipe: the recipe, the
model-config overrides, NeMo's trainer) against Hugging Face transformers + PEFT, in the same job.

    python benchmarks/train_throughput.py --case qwen3_8b_lora           # Qwen3-8B shape, LoRA r16, seq 4096, mbs 1
    python benchmarks/train_throughput.py --case qwen3_1p7b_full         # Qwen3-1.7B shape, full fine-tuning
    python benchmarks/train_throughput.py --case qwen3_8b_lora --micro_batch_size 2   # both stacks at mbs 2
    python benchmarks/train_throughput.py --case qwen3_8b_lora --variants unfused_recompute sdpa default \\
        --profile default --out /tmp/ablation.json                    # each lever on its own, and a trace split
    python benchmarks/train_throughput.py --case qwen3_8b_lora_varlen --variants default packed \\
        --out benchmarks/results/training_packed.json                 # variable-length samples, unpacked vs packed
    python benchmarks/train_throughput.py --case qwen3_1p7b_full --variants default liger_norm cuda_graphs \\
        cuda_graphs+liger_norm                                        # a lever alone and on top of another ('+')
    python benchmarks/train_throughput.py --case qwen3_1p7b_full_varlen --variants packed packed+cuda_graphs \\
        --hf_pythonpath ''                                            # --cuda_graphs' padded packed rows

Both stacks get the named shape with random weights (no download), bf16, the same synthetic token sequences, the
same LoRA rank / alpha / target modules (every linear layer of attention and MLP) or full fine-tuning, the same
learning rate (constant, Adam), sequence length and micro-batch. Full fine-tuning measures HF twice: bf16 weights
updated in place (the headline baseline) and fp32 weights + bf16 autocast (HF Trainer's bf16=True on a float32
model: the numerics of Megatron's fp32 master weights). Each measurement runs in its own process (a clean
GPU); steps are timed with a CUDA sync at both ends, the first --warmup_steps are excluded, the median of the
others is reported. A run counts only if it trained: the synthetic task is learnable (each sequence counts up
through a 97-token cycle from a random start), so the loss of the last three timed steps must be below that of
the first three, and the trainable weights must have moved (LoRA's B matrices start at zero).

Model FLOPs: NeMo's own formula for the family (`nemo.utils.flops_formulas.qwen3`, forward + both backward GEMMs,
causal attention halved); for LoRA x 2/3, as NeMo AutoModel counts LoRA (frozen weights have no weight-gradient
GEMM; with this convention its published Llama3-8B LoRA run, 12,473 tokens/s, is the 402 TFLOP/s it quotes).
MFU is model TFLOP/s over a bf16 8192^3 matmul measured in the same job. Writes --out (default
benchmarks/results/training.json, one row per variant); docs/BENCHMARKS.md holds the table.

Variable-length case (`*_varlen`): sample lengths are log-uniform in [256, seq_length] (a fixed pool, the same for
every stack). Unpacked runs (ours, HF) take one sample per micro-batch; `packed` takes one row of NeMo's packer
(`create_packing_strategy` / `fill_packing_strategy` over the pool, first-fit, as --packed_sequence packs) through
NeMo's own packed dataset and collate. Throughput counts only real tokens (the positions with a loss), summed over
the timed steps and divided by their summed time; model FLOPs are those of the full sequence length (an upper bound
on attention FLOPs for shorter samples), so compare tokens/s there.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from nemo_finetune.recipe import assign, configure_recipe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from generation_throughput import QWEN3_COMMON, SHAPES  # noqa: E402

from nemo_finetune.files import atomic_write_text  # noqa: E402

CYCLE, FIRST_TOKEN = 97, 1000  # the learnable task: token ids FIRST_TOKEN + (start + i) % CYCLE


@dataclass(frozen=True)
class Case:
    recipe: str
    shape: str
    peft: bool
    seq_length: int = 4096
    micro_batch_size: int = 1
    learning_rate: float = 1e-4  # NeMo's LoRA default; at 1e-3 NeMo's Adam (beta2 0.98) diverged on this task
    lora_dim: int = 16
    lora_alpha: int = 32
    variable_lengths: bool = False  # samples of log-uniform length in [MIN_SAMPLE, seq_length] (mbs 1)


CASES = {
    "qwen3_8b_lora": Case(recipe="qwen3_8b", shape="qwen3_8b", peft=True, learning_rate=1e-4),
    "qwen3_1p7b_full": Case(recipe="qwen3_1p7b", shape="qwen3_1p7b", peft=False, learning_rate=1e-5),
    "qwen3_8b_lora_varlen": Case(
        recipe="qwen3_8b", shape="qwen3_8b", peft=True, learning_rate=1e-4, variable_lengths=True
    ),
    "qwen3_1p7b_full_varlen": Case(
        recipe="qwen3_1p7b", shape="qwen3_1p7b", peft=False, learning_rate=1e-5, variable_lengths=True
    ),
}
MIN_SAMPLE, POOL = 256, 400  # variable-length samples: shortest length, and how many the packer packs


@dataclass(frozen=True)
class Variant:
    help: str
    flags: dict = field(default_factory=dict)  # peft_megatron Config fields
    model: dict = field(default_factory=dict)  # model-config fields set after configure_recipe
    skip_shims: frozenset = frozenset()  # training-worker shims left out (compat.OPTIONAL_WORKER_SHIMS)
    trial_shims: frozenset = frozenset()  # shims on trial applied as well (compat.TRIAL_WORKER_SHIMS)


VARIANTS = {
    "default": Variant("what peft_megatron.py runs without flags"),
    "unfused_recompute": Variant(
        "before issue 13: Megatron's unfused attention, selective recompute (OOM without), compiled fusions off",
        flags={"core_attention": "unfused"},
        model={
            "recompute_granularity": "selective",
            "bias_activation_fusion": False,
            "bias_dropout_fusion": False,
            "cross_entropy_loss_fusion": False,
        },
    ),
    "sdpa": Variant(
        "SDPA core attention, no recompute, compiled SwiGLU / bias-dropout-add fusions off",
        model={"bias_activation_fusion": False, "bias_dropout_fusion": False},
    ),
    "native_ce": Variant(
        "the default + Megatron's torch-compiled cross-entropy fusion (cross_entropy_fusion_impl='native')",
        model={"cross_entropy_loss_fusion": True, "cross_entropy_fusion_impl": "native"},
    ),
    "mbs2": Variant("the default at micro-batch 2 (tokens per step doubled)", flags={"micro_batch_size": 2}),
    "eager_rope": Variant(
        "the default with Megatron's unfused RoPE left eager (as before the compiled RoPE)",
        skip_shims=frozenset({"compiled-rope"}),
    ),
    "nemo_lora": Variant(
        "the default with NeMo's own LoRA forward (full-width scale and add; as before the fused LoRA output)",
        skip_shims=frozenset({"fused-lora-output"}),
    ),
    "packed": Variant(
        "the default with --packed_sequence (variable-length case: NeMo's packer, one packed row per micro-batch)",
        flags={"packed_sequence": True},
    ),
    "cuda_graphs": Variant(
        "the default with Megatron's local CUDA graphs: each transformer layer's forward and backward captured after "
        "the first step and replayed (one launch per layer instead of its kernels; a graph-safe RNG tracker)",
        model={"cuda_graph_impl": "local"},
    ),
    "megatron_wgrad": Variant(
        "the default with weight gradients written in bf16 and added to main_grad by Megatron's DDP hook (as before "
        "the torch-wgrad-accumulation shim)",
        model={"gradient_accumulation_fusion": False},
        skip_shims=frozenset({"torch-wgrad-accumulation"}),
    ),
    "megatron_optimizer": Variant(
        "the default with Megatron's apex-less optimizer fallbacks (foreach AdamW, per-tensor norm and copy loops; "
        "as before the torch-optimizer-kernels shim)",
        skip_shims=frozenset({"torch-optimizer-kernels"}),
    ),
    "liger_norm": Variant(
        "the default with Liger-Kernel's RMSNorm (Triton forward, one-kernel backward with the weight gradient) for "
        "every norm: the liger-rmsnorm shim, on trial",
        trial_shims=frozenset({"liger-rmsnorm"}),
    ),
}


def resolve_variant(name: str) -> Variant:
    """A variant by name; "a+b" measures variants together (their flags, model fields and shims), e.g.
    cuda_graphs+liger_norm. ValueError for an unknown name or two parts that set one field differently."""
    parts = name.split("+")
    unknown = [part for part in parts if part not in VARIANTS]
    if unknown or len(set(parts)) != len(parts):
        raise ValueError(f"{name!r}: give one of {list(VARIANTS)}, or several joined by '+', each once")
    chosen = [VARIANTS[part] for part in parts]
    merged = {}
    for attribute in ("flags", "model"):
        merged[attribute] = {}
        for part, one in zip(parts, chosen, strict=True):
            for key, value in getattr(one, attribute).items():
                if merged[attribute].get(key, value) != value:
                    raise ValueError(f"{name!r}: {part} sets {key}={value!r}, another part {merged[attribute][key]!r}")
                merged[attribute][key] = value
    return Variant(
        " + ".join(one.help for one in chosen),
        **merged,
        skip_shims=frozenset().union(*(one.skip_shims for one in chosen)),
        trial_shims=frozenset().union(*(one.trial_shims for one in chosen)),
    )


def variant_name(name: str) -> str:
    """argparse type of the variant flags: the name, once resolve_variant() accepts it."""
    try:
        resolve_variant(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), default="qwen3_8b_lora")
    parser.add_argument(
        "--variants",
        nargs="+",
        type=variant_name,
        default=["default"],
        help=f"configurations of ours to measure, from {list(VARIANTS)}; 'a+b' measures variants together; the first "
        "is the headline row",
    )
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run")
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--micro_batch_size", type=int, help="both stacks' micro-batch (default: the case's, 1)")
    parser.add_argument("--skip_hf", action="store_true", help="measure ours only (no ratio)")
    parser.add_argument(
        "--profile",
        type=variant_name,
        help="also trace this variant: 2 steps under torch.profiler (GPU kernels, host time in torch ops, CUDA runtime "
        "calls), then 2 under cProfile (Python hotspots)",
    )
    parser.add_argument("--timeout_s", type=int, default=900, help="per measurement process")
    parser.add_argument(
        "--hf_pythonpath",
        help="PYTHONPATH for the baseline's process (e.g. '' to measure the "
        "machine's own transformers/peft instead of the versions this project pins)",
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "training.json"))
    parser.add_argument("--worker", choices=["ours", "hf", "hf_amp", "matmul"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", type=variant_name, default="default", help=argparse.SUPPRESS)
    parser.add_argument("--result_file", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        parser.error("--micro_batch_size must be at least 1")
    if args.profile and args.profile not in args.variants:
        parser.error(f"--profile {args.profile} must be one of --variants (its row carries the trace)")
    case = CASES[args.case]
    if case.variable_lengths and (args.micro_batch_size or 1) != 1:
        parser.error(f"--case {args.case} runs one sample (or one packed row) per micro-batch; drop --micro_batch_size")
    if any(resolve_variant(name).flags.get("packed_sequence") for name in args.variants) and not case.variable_lengths:
        parser.error("--variants packed needs a variable-length case (e.g. --case qwen3_8b_lora_varlen)")
    if args.steps < 6 or args.warmup_steps < 1:
        parser.error(
            "--steps must be at least 6 (the loss check compares the first and last three) and "
            "--warmup_steps at least 1"
        )
    return args


# ---------------------------------------------------------------------------------------------------------------
# What both stacks train on
# ---------------------------------------------------------------------------------------------------------------
def counting_sequence(index: int, length: int):
    """length + 1 token ids counting up through the cycle from a start fixed by `index` (same for both stacks)."""
    import torch

    start = torch.randint(0, CYCLE, (1,), generator=torch.Generator().manual_seed(index)).item()
    return FIRST_TOKEN + (start + torch.arange(length + 1)) % CYCLE


def sample_length(index: int, case: Case) -> int:
    """Tokens trained on in sample `index` of the case (fixed for every stack)."""
    import math
    import random

    if not case.variable_lengths:
        return case.seq_length
    rng = random.Random(1_000_003 * index + 7)
    return min(case.seq_length, int(math.exp(rng.uniform(math.log(MIN_SAMPLE), math.log(case.seq_length)))))


def write_packed_pool(case: Case, path: Path) -> Path:
    """NeMo's packing of the case's sample pool (what --packed_sequence's pack_dataset writes), as a .npy file, and
    its packing metadata beside it (what padding rows to one shape reads); returns the metadata's path."""
    import numpy as np
    from nemo.utils.sequence_packing_utils import create_hist, create_packing_strategy, fill_packing_strategy

    np.random.seed(1234)  # fill_packing_strategy shuffles with numpy's global generator
    samples = [
        {"input_ids": counting_sequence(i, sample_length(i, case)).tolist(), "answer_start_idx": 0} for i in range(POOL)
    ]
    sequences, histogram = create_hist(samples, case.seq_length)
    assignments, metadata = create_packing_strategy(histogram, case.seq_length, "first_fit_shuffle")
    np.save(path, fill_packing_strategy(assignments, sequences, case.seq_length, 0))
    metadata_path = path.with_name("metadata.jsonl")
    metadata_path.write_text(json.dumps([metadata]))  # a JSON list, as NeMo's packer writes it
    return metadata_path


def make_synthetic_data_module(
    case_name: str, micro_batch_size: int, global_batch_size: int, packed: bool = False, one_shape: bool = False
):
    """A NeMo data module (MockDataModule's sampler and loaders) whose batches are what NeMo's SFT collate gives
    peft_megatron's model (tokens, labels, loss mask, positions, Megatron's causal mask: True = masked out), or with
    `packed` what NeMo's packed dataset gives it (`one_shape`: rows and sequence boundaries padded to one shape, as
    --cuda_graphs has them). Every collated batch's trained-token count is kept in
    `module.batch_tokens` (loaded in this process: num_workers 0), in the order the steps consume them."""
    import functools

    import torch
    from nemo.collections.llm.gpt.data.mock import MockDataModule

    case = CASES[case_name]
    seq_length = case.seq_length
    batch_tokens: list = []
    causal_mask = functools.lru_cache(maxsize=4)(lambda n: torch.ones(1, n, n, dtype=torch.bool).triu(1))

    class CountingDataset(torch.utils.data.Dataset):
        def __init__(self, length: int):
            self.length = length

        def __len__(self):
            return self.length

        def __getitem__(self, index):
            if case.variable_lengths:
                index %= POOL
            n = sample_length(index, case)
            ids = counting_sequence(index, n)
            return {
                "tokens": ids[:-1],
                "labels": ids[1:],
                "loss_mask": torch.ones(n),
                "position_ids": torch.arange(n),
                "attention_mask": causal_mask(n),
            }

        @staticmethod
        def collate_fn(batch):
            collated = torch.utils.data.default_collate(batch)
            batch_tokens.append(int(collated["loss_mask"].sum()))
            return collated

    def packed_dataset():
        from nemo.collections.llm.gpt.data.core import GPTSFTPackedDataset, create_sft_dataset

        path = Path(tempfile.mkdtemp(prefix="packed_pool_")) / "training.npy"
        metadata = write_packed_pool(case, path)
        padding = dict(pad_to_max_length=True, pad_cu_seqlens=True, pack_metadata_file_path=metadata)
        # as NeMo's module builds it
        dataset = create_sft_dataset(
            path, SyntheticTokenizer(), seq_length=seq_length, seed=1234, **(padding if one_shape else {})
        )
        assert isinstance(dataset, GPTSFTPackedDataset)
        collate = dataset.collate_fn

        def counted(batch):
            collated = collate(batch)
            batch_tokens.append(int(collated["loss_mask"].sum()))
            return collated

        dataset.collate_fn = counted
        return dataset

    class SyntheticTokenizer:
        vocab_size = QWEN3_COMMON["vocab_size"]
        eos_id = bos_id = pad_id = 0

    class CountingDataModule(MockDataModule):
        def setup(self, stage: str = "") -> None:
            self._train_ds = packed_dataset() if packed else CountingDataset(self.num_train_samples)
            self._validation_ds = self._test_ds = CountingDataset(self.global_batch_size)

    module = CountingDataModule(
        seq_length=seq_length,
        tokenizer=SyntheticTokenizer(),
        micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size,
        num_train_samples=100_000,
        num_workers=0 if case.variable_lengths else 2,
        pin_memory=True,
    )
    module.batch_tokens = batch_tokens
    return module


# ---------------------------------------------------------------------------------------------------------------
# Measurement processes
# ---------------------------------------------------------------------------------------------------------------
class StepRecorder:
    """Per-step wall time (CUDA-synchronised), loss and peak memory; trainable weights before and after."""

    def __init__(self):
        self.seconds, self.losses, self.snapshot = [], [], {}
        self.tokens: list = []  # trained tokens per step, where they vary (variable-length case)

    def start_training(self, parameters):
        import torch

        torch.cuda.reset_peak_memory_stats()
        self.snapshot = {name: p.detach().flatten()[:4096].float().clone() for name, p in parameters if p.requires_grad}

    def moved(self, parameters) -> dict:
        import torch

        trainable = {name: p for name, p in parameters if p.requires_grad}
        if set(trainable) != set(self.snapshot):
            raise RuntimeError(
                f"trainable parameters changed during training: {sorted(set(trainable) ^ set(self.snapshot))[:5]}"
            )
        changed = sum(
            not torch.equal(self.snapshot[n], trainable[n].detach().flatten()[:4096].float()) for n in self.snapshot
        )
        return {
            "trainable_tensors": len(self.snapshot),
            "trainable_tensors_changed": int(changed),
            "trainable_parameters": sum(p.numel() for p in trainable.values()),
        }


def benchmark_recipe(case_name: str, case: Case, variant: Variant, max_steps: int, env, callbacks: list):
    """peft_megatron's recipe for this case (configure_recipe, as a job would get it), then only what a benchmark
    must change: random init instead of a restore, synthetic data, a constant learning rate, no validation,
    checkpoints or TensorBoard."""
    import nemo_run as run
    from nemo import lightning as nl

    import peft_megatron

    out = Path(tempfile.mkdtemp(prefix="train_throughput_"))
    flags = dict(
        hf_model_id="random-init",
        recipe_cls_name=case.recipe,
        gpus_per_node=1,
        tensor_parallel_size=1,
        micro_batch_size=case.micro_batch_size,
        accumulate_grad_batches=1,
        max_seq_length=case.seq_length,
        full_ft=not case.peft,
        max_steps=max_steps,
        limit_val_batches=0,
        learning_rate=case.learning_rate,
        output_dir=str(out),
        nemo_ckpt_dir=str(out / "none"),
    )
    if case.peft:
        flags.update(lora_dim=case.lora_dim, lora_alpha=case.lora_alpha)
    config = peft_megatron.Config(**{**flags, **variant.flags})
    recipe = configure_recipe(config, env)
    assign(recipe.model.config, **variant.model)
    recipe.resume = None
    recipe.optim.lr_scheduler = None
    recipe.log = run.Config(nl.NeMoLogger, log_dir=str(out), ckpt=None, tensorboard=None)
    assign(
        recipe.trainer,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        val_check_interval=None,
        log_every_n_steps=1,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    recipe.data = run.Config(
        make_synthetic_data_module,
        case_name=case_name,
        micro_batch_size=config.micro_batch_size,
        global_batch_size=config.global_batch_size,
        packed=config.packed_sequence,
        one_shape=config.packed_sequence and graphed(variant),
    )
    return recipe, config


def graphed(variant: Variant) -> bool:
    """Whether the variant trains with Megatron's local CUDA graphs (what a --cuda_graphs run's workers set on the
    model config as they build it)."""
    return variant.model.get("cuda_graph_impl") == "local"


def run_ours(args, case: Case, variant: Variant) -> dict:
    import time

    import lightning.pytorch as pl
    import nemo_run as run
    import torch

    from nemo_finetune import compat

    env = compat.prepare_process()
    # as nemo_finetune/startup/sitecustomize.py does in the workers
    compat.install_worker_hooks(skip=variant.skip_shims, trial=variant.trial_shims, cuda_graphs=graphed(variant))
    recorder = StepRecorder()

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not recorder.seconds:  # NeMo applies LoRA (and freezes the base) when training starts: after it
                recorder.start_training(pl_module.named_parameters())
            torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.cuda.synchronize()
            recorder.seconds.append(time.perf_counter() - self.started)
            loss = trainer.callback_metrics.get("reduced_train_loss")
            recorder.losses.append(float(loss) if loss is not None else float("nan"))
            if args.trace and len(recorder.seconds) == args.warmup_steps:
                self.profiler = start_trace()
            if args.trace and len(recorder.seconds) == args.warmup_steps + 2:
                recorder.trace = finish_trace(self.profiler, recorder.seconds[-2:])
                self.python_profile = start_python_profile()  # the next 2 steps, apart: each profiler slows the other
            if args.trace and len(recorder.seconds) == args.warmup_steps + 4:
                recorder.trace["python_hotspots"] = finish_python_profile(self.python_profile, 2)

        def on_train_end(self, trainer, pl_module):
            recorder.moved_info = recorder.moved(pl_module.named_parameters())
            if case.variable_lengths:
                recorder.tokens = list(trainer.datamodule.batch_tokens[: len(recorder.seconds)])

    recipe, config = benchmark_recipe(
        args.case, case, variant, args.warmup_steps + args.steps, env, [run.Config(Timer)]
    )
    run.run(recipe, direct=True)
    missing = variant.trial_shims - compat.applied()
    if missing:  # a shim that could not apply (its log line says why) would time the default under this name
        raise RuntimeError(f"variant {args.variant}: shims {sorted(missing)} were not applied; see the compat: lines")
    result = {
        "stack": "ours",
        "variant": args.variant,
        "environment": env.describe(),
        "compat": sorted(compat.applied()),
        "core_attention": config.core_attention,
        "micro_batch_size": config.micro_batch_size,
        **summarize(args, recorder, config.micro_batch_size * case.seq_length),
        **recorder.moved_info,
    }
    if getattr(recorder, "trace", None):
        result["profile"] = recorder.trace
    return result


def run_hf(args, case: Case, amp: bool = False) -> dict:
    """amp=False: bf16 weights updated in place (what loading with dtype=bfloat16 gives); amp=True: fp32 weights
    and optimizer, bf16 autocast (HF Trainer's bf16=True on a float32 model: the numerics of Megatron's fp32 master
    weights, and the like-for-like baseline for full fine-tuning, where bf16 in-place updates lose small steps)."""
    import contextlib
    import time

    import torch
    import transformers
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**QWEN3_COMMON, **SHAPES[case.shape][1])
    torch.manual_seed(0)
    dtype = {
        "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32
        if amp
        else torch.bfloat16
    }
    with torch.device("cuda"):
        model = Qwen3ForCausalLM._from_config(config, attn_implementation="sdpa", **dtype)
    if case.peft:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(
            model, LoraConfig(r=case.lora_dim, lora_alpha=case.lora_alpha, lora_dropout=0.0, target_modules=targets)
        )
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=case.learning_rate, weight_decay=0.0, fused=True)
    recorder = StepRecorder()
    recorder.start_training(model.named_parameters())
    batch = case.micro_batch_size
    for step in range(args.warmup_steps + args.steps):
        index = [step * batch + i for i in range(batch)]
        if case.variable_lengths:
            index = [i % POOL for i in index]  # as CountingDataset reads the pool
        ids = torch.stack([counting_sequence(i, sample_length(i, case)) for i in index]).cuda()
        if case.variable_lengths:
            recorder.tokens.append(ids.shape[1] - 1)
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1], use_cache=False).loss  # HF shifts labels itself
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        recorder.seconds.append(time.perf_counter() - started)
        recorder.losses.append(loss.item())
    import peft

    return {
        "stack": "hf_amp" if amp else "hf",
        "versions": f"transformers {transformers.__version__}, peft {peft.__version__}",
        "micro_batch_size": batch,
        **summarize(args, recorder, batch * case.seq_length),
        **recorder.moved(model.named_parameters()),
    }


def summarize(args, recorder: StepRecorder, tokens_per_step: int) -> dict:
    import torch

    timed = recorder.seconds[args.warmup_steps :]
    losses = recorder.losses[args.warmup_steps :]
    step = statistics.median(timed)
    if recorder.tokens:  # steps of different lengths: all timed tokens over all timed time
        if len(recorder.tokens) != len(recorder.seconds):
            raise RuntimeError(f"{len(recorder.tokens)} token counts for {len(recorder.seconds)} steps")
        tokens = recorder.tokens[args.warmup_steps :]
        throughput = {"tokens_per_s_per_gpu": sum(tokens) / sum(timed), "tokens_per_step": tokens}
    else:
        throughput = {"tokens_per_s_per_gpu": tokens_per_step / step}
    return {
        "median_step_s": step,
        **throughput,
        "step_seconds": timed,
        "losses": losses,
        "loss_first3": statistics.mean(losses[:3]),
        "loss_last3": statistics.mean(losses[-3:]),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
    }


def measure_matmul() -> dict:
    import torch

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            a @ b
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1000 / 20)
    return {
        "matmul_tflops": 2 * n**3 / best / 1e12,
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


# ---------------------------------------------------------------------------------------------------------------
# Profile: where a training step's time goes
# ---------------------------------------------------------------------------------------------------------------
KERNEL_KINDS = (  # first match wins; names of the kernels torch 2.11 / cuBLAS / Triton launch on an H100
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa", "softmax")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas", "splitK")),
    ("loss (cross-entropy)", ("cross_entropy", "log_softmax", "nll_loss", "logsumexp")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "l2norm")),
    ("norms", ("rms", "norm", "rsqrt", "pow_", "mean")),
    ("copies / casts", ("copy", "Memcpy", "Memset", "cat", "index")),
    ("compiled fusions (Triton)", ("triton_",)),
)


def start_trace():
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    profiler.__enter__()
    return profiler


def finish_trace(profiler, step_seconds: list) -> dict:
    import torch

    torch.cuda.synchronize()
    profiler.__exit__(None, None, None)
    # GPU-side copies of user annotations (e.g. "Optimizer.step#AdamW.step") span kernels already counted
    kernels = [
        e
        for e in profiler.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
        and not getattr(e, "is_user_annotation", False)
        and "#" not in e.name
    ]
    wall = sum(step_seconds)
    split = {kind: 0.0 for kind, _ in KERNEL_KINDS}
    split["other kernels"] = 0.0
    by_name: dict = {}
    for event in kernels:
        seconds = event.time_range.elapsed_us() / 1e6
        name = event.name.lower()
        kind = next((k for k, names in KERNEL_KINDS if any(n.lower() in name for n in names)), "other kernels")
        split[kind] += seconds
        total = by_name.setdefault(event.name[:100], [0.0, 0])
        total[0] += seconds
        total[1] += 1
    busy = sum(split.values())
    top = sorted(by_name.items(), key=lambda item: item[1][0], reverse=True)[:25]
    return {
        "steps": len(step_seconds),
        "wall_s": wall,
        "kernel_seconds": split,
        "gpu_busy_s": busy,
        "host_gap_s": wall - busy,
        "kernels_per_step": len(kernels) / len(step_seconds),
        "top_kernels": [{"name": n, "gpu_s": t, "calls": c} for n, (t, c) in top],
        "host": summarize_host(profiler.events(), len(step_seconds)),
    }


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
RUNTIME_CALL = re.compile(r"cu(da)?[A-Z]")  # CUDA runtime (cudaLaunchKernel) and driver (Triton's cuLaunchKernel)


def summarize_host(events, steps: int) -> dict:
    """Where a host-bound step's CPU time goes, from a torch.profiler trace: the time the host spent inside torch
    ops (the union of their intervals; the rest of the step is Python between ops: Megatron, NeMo, Lightning), the
    CUDA runtime calls per step (kernel launches, and the synchronisations that drain the GPU's queue) and the ops
    with the most host time of their own."""
    import torch

    ops = [
        e
        for e in events
        if e.device_type == torch.autograd.DeviceType.CPU and not getattr(e, "is_user_annotation", False)
    ]
    spans = sorted((e.time_range.start, e.time_range.end) for e in ops)
    inside, reach = 0.0, float("-inf")
    for start, end in spans:  # union of intervals: nested ops (an aten op inside another) count once
        if end > reach:
            inside += end - max(start, reach)
            reach = end
    runtime: dict = {}
    own: dict = {}
    for e in ops:
        if RUNTIME_CALL.match(e.name):
            calls = runtime.setdefault(e.name, [0, 0.0])
            calls[0] += 1
            calls[1] += e.time_range.elapsed_us()
        else:
            total = own.setdefault(e.name[:100], [0, 0.0])
            total[0] += 1
            total[1] += e.self_cpu_time_total
    per_step = 1000.0 * steps  # microseconds over the steps -> ms per step
    return {
        "in_torch_ops_ms_per_step": inside / per_step,
        "runtime_calls_per_step": {
            name: {"calls": calls / steps, "host_ms": us / per_step}
            for name, (calls, us) in sorted(runtime.items(), key=lambda item: item[1][1], reverse=True)[:8]
        },
        "syncs_per_step": sum(runtime.get(name, [0])[0] for name in SYNC_CALLS) / steps,
        "top_ops_self_host": [
            {"name": name, "calls_per_step": calls / steps, "self_host_ms_per_step": us / per_step}
            for name, (calls, us) in sorted(own.items(), key=lambda item: item[1][1], reverse=True)[:15]
        ],
    }


def start_python_profile():
    import cProfile

    profile = cProfile.Profile()
    profile.enable()
    return profile


def finish_python_profile(profile, steps: int, top: int = 30) -> list[dict]:
    """The Python functions with the most time of their own (cProfile's tottime) per step, named by package path.
    cProfile's per-call cost inflates small Python functions against C calls: compare functions, not milliseconds
    with the unprofiled step."""
    import pstats

    profile.disable()
    stats = pstats.Stats(profile).stats
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [
        {
            "function": f"{short_path(path)}:{line}({name})",
            "calls_per_step": calls / steps,
            "own_ms_per_step": 1000 * own / steps,
            "cumulative_ms_per_step": 1000 * cumulative / steps,
        }
        for (path, line, name), (_, calls, own, cumulative, _) in rows
    ]


def short_path(path: str) -> str:
    """`.../site-packages/megatron/core/x.py` -> `megatron/core/x.py`; the repository's own files relative to it."""
    for marker in ("site-packages/", "dist-packages/", f"{REPO}/"):
        if marker in path:
            return path.rsplit(marker, 1)[1]
    return path


# ---------------------------------------------------------------------------------------------------------------
# The job: one process per measurement, then rows
# ---------------------------------------------------------------------------------------------------------------
def model_flops_per_token(case: Case) -> float:
    from nemo.utils import flops_formulas

    shape = SHAPES[case.shape][1]
    flops = flops_formulas.qwen3(
        flops_formulas.FLOPSConfig(
            gbs=1,
            enc_seq_len=case.seq_length,
            hs=shape["hidden_size"],
            layers=shape["num_hidden_layers"],
            ffn_hs=shape["intermediate_size"],
            attention_heads=shape["num_attention_heads"],
            query_groups=shape["num_key_value_heads"],
            kv_channels=QWEN3_COMMON["head_dim"],
            vocab_size=QWEN3_COMMON["vocab_size"],
        )
    )
    return flops / case.seq_length * (2 / 3 if case.peft else 1)


def measure(args, worker: str, variant: str = "default", trace: bool = False) -> dict:
    """Run one measurement in a fresh process; its result, or {"error": ...} with the log's tail."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = Path(f.name)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        worker,
        "--case",
        args.case,
        "--variant",
        variant,
        "--steps",
        str(args.steps),
        "--warmup_steps",
        str(args.warmup_steps),
        *(["--micro_batch_size", str(args.micro_batch_size)] if args.micro_batch_size else []),
        "--result_file",
        str(result_file),
        *(["--trace"] if trace else []),
    ]
    print(f"\n== {worker} {variant if worker == 'ours' else ''}: {' '.join(command)}", flush=True)
    env = dict(os.environ)
    if worker.startswith("hf") and args.hf_pythonpath is not None:
        env["PYTHONPATH"] = args.hf_pythonpath
    try:
        proc = subprocess.run(
            command,
            cwd=REPO,
            timeout=args.timeout_s,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        output = proc.stdout
        failed = proc.returncode != 0
    except subprocess.TimeoutExpired as e:
        output, failed = (
            (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""),
            True,
        )
    tail = "\n".join(output.splitlines()[-40:])
    if failed or not result_file.stat().st_size:
        print(tail, flush=True)
        return {"error": tail[-3000:]}
    result = json.loads(result_file.read_text())
    result_file.unlink()
    if "median_step_s" in result:
        print(
            f"   {result['tokens_per_s_per_gpu']:,.0f} tokens/s, median step {1000 * result['median_step_s']:.0f} ms, "
            f"peak {result['peak_mem_gib']:.1f} GiB, loss {result['loss_first3']:.3f} -> {result['loss_last3']:.3f}",
            flush=True,
        )
    else:
        print(f"   {result}", flush=True)
    return result


def trained(result: dict, peft: bool) -> bool:
    """The loss fell over the timed steps and the weights moved: with LoRA every adapter tensor (B starts at zero,
    so any gradient moves it); in full fine-tuning some (a bf16 copy of a weight near 1.0, such as an RMSNorm
    scale, moves by less than one bf16 step in a dozen steps at lr 1e-5, while its fp32 master copy does move)."""
    if "error" in result or not result.get("trainable_tensors"):
        return False
    moved = result["trainable_tensors_changed"]
    return result["loss_last3"] < result["loss_first3"] and (
        moved == result["trainable_tensors"] if peft else moved > 0
    )


def result_rows(args, case: Case, matmul: dict, hf: dict, ours: dict, hf_amp: dict) -> list[dict]:
    flops = model_flops_per_token(case)
    date = datetime.date.today().isoformat()
    rows = []
    for name, result in ours.items():
        row = {
            "gpu": matmul.get("gpu"),
            "date": date,
            "case": args.case,
            "model": f"{case.shape} shape (random init)",
            "recipe": case.recipe,
            "variant": name,
            "variant_help": resolve_variant(name).help,
            "seq_length": case.seq_length,
            "peft": f"lora r{case.lora_dim} alpha {case.lora_alpha}" if case.peft else None,
            "micro_batch_size": result.get("micro_batch_size"),
            "learning_rate": case.learning_rate,
        }
        if "error" in result:
            rows.append({**row, "error": result["error"]})
            continue
        tokens = result["tokens_per_s_per_gpu"]
        row.update(
            trainable_tensors_moved=f"{result['trainable_tensors_changed']}/{result['trainable_tensors']}",
            tokens_per_s_per_gpu=round(tokens, 1),
            model_tflops_per_gpu=round(tokens * flops / 1e12, 1),
            mfu=round(tokens * flops / 1e12 / matmul["matmul_tflops"], 4),
            peak_mem_gib=round(result["peak_mem_gib"], 2),
            median_step_ms=round(1000 * result["median_step_s"], 1),
            trained=trained(result, case.peft),
            loss_first3=round(result["loss_first3"], 4),
            loss_last3=round(result["loss_last3"], 4),
            baseline_tokens_per_s_per_gpu=round(hf["tokens_per_s_per_gpu"], 1)
            if "tokens_per_s_per_gpu" in hf
            else None,
            ratio_vs_baseline=round(tokens / hf["tokens_per_s_per_gpu"], 3) if "tokens_per_s_per_gpu" in hf else None,
            baseline_model_tflops_per_gpu=round(hf["tokens_per_s_per_gpu"] * flops / 1e12, 1)
            if "tokens_per_s_per_gpu" in hf
            else None,
            baseline_peak_mem_gib=round(hf["peak_mem_gib"], 2) if "peak_mem_gib" in hf else None,
            baseline_trained=trained(hf, case.peft) if hf else None,
            matmul_tflops=round(matmul["matmul_tflops"], 1),
            model_flops_per_token=flops,
            flops_formula="nemo.utils.flops_formulas.qwen3" + (" x 2/3 (LoRA)" if case.peft else ""),
            versions={"torch": matmul.get("torch"), "cuda": matmul.get("cuda"), "hf": hf.get("versions")},
            ours=result,
            baseline=hf,
        )
        if "tokens_per_s_per_gpu" in hf_amp:
            row.update(
                amp_baseline_tokens_per_s_per_gpu=round(hf_amp["tokens_per_s_per_gpu"], 1),
                ratio_vs_amp_baseline=round(tokens / hf_amp["tokens_per_s_per_gpu"], 3),
                amp_baseline_peak_mem_gib=round(hf_amp["peak_mem_gib"], 2),
                amp_baseline_trained=trained(hf_amp, case.peft),
                amp_baseline=hf_amp,
            )
        rows.append(row)
    return rows


def table_line(name: str, tokens: float, tflops: float, mfu: str, mem: float, step_ms: float, ratio: str, ok) -> str:
    return f"{name:20s} {tokens:8,.0f} {tflops:8.1f} {mfu:>6s} {mem:9.1f} {step_ms:8.1f} {ratio:>6s} {str(ok):>8s}"


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'variant':20s} {'tok/s':>8s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>9s} {'ms/step':>8s} "
        f"{'x HF':>6s} {'trained':>8s}"
    )
    for row in rows:
        if "error" in row:
            print(f"{row['variant']:20s} ERROR")
            continue
        ratio = f"{row['ratio_vs_baseline']:.2f}" if row["ratio_vs_baseline"] else "-"
        print(
            table_line(
                row["variant"],
                row["tokens_per_s_per_gpu"],
                row["model_tflops_per_gpu"],
                f"{row['mfu']:.3f}",
                row["peak_mem_gib"],
                row["median_step_ms"],
                ratio,
                row["trained"],
            )
        )
    first = rows[0]
    hf, amp = first.get("baseline") or {}, first.get("amp_baseline") or {}
    baselines = [("HF + PEFT (SDPA)", hf, "baseline_trained"), ("HF, fp32 + autocast", amp, "amp_baseline_trained")]
    for name, base, trained_key in baselines:
        if "tokens_per_s_per_gpu" not in base:
            continue
        tokens = base["tokens_per_s_per_gpu"]
        print(
            table_line(
                name,
                tokens,
                tokens * first["model_flops_per_token"] / 1e12,
                "",
                base["peak_mem_gib"],
                1000 * base["median_step_s"],
                f"{tokens / hf['tokens_per_s_per_gpu']:.2f}",
                first[trained_key],
            )
        )


def selected_case(args) -> Case:
    case = CASES[args.case]
    return dataclasses.replace(case, micro_batch_size=args.micro_batch_size) if args.micro_batch_size else case


def run_worker(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 1
    case = selected_case(args)
    if args.worker == "matmul":
        result = measure_matmul()
    elif args.worker in ("hf", "hf_amp"):
        result = run_hf(args, case, amp=args.worker == "hf_amp")
    else:
        result = run_ours(args, case, resolve_variant(args.variant))
    Path(args.result_file).write_text(json.dumps(result))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    case = selected_case(args)
    matmul = measure(args, "matmul")
    if "error" in matmul:
        return 1
    hf = {} if args.skip_hf else measure(args, "hf")
    hf_amp = {} if args.skip_hf or case.peft else measure(args, "hf_amp")
    ours: dict = {}
    for name in args.variants:  # rows are rewritten after every measurement: a job cut short keeps what it measured
        ours[name] = measure(args, "ours", name)
        atomic_write_text(
            Path(args.out), json.dumps(result_rows(args, case, matmul, hf, ours, hf_amp), indent=2) + "\n"
        )
    if args.profile:
        traced = measure(args, "ours", args.profile, trace=True)
        ours[args.profile].setdefault("profile", traced.get("profile") or traced.get("error"))
    rows = result_rows(args, case, matmul, hf, ours, hf_amp)
    atomic_write_text(Path(args.out), json.dumps(rows, indent=2) + "\n")
    print_table(rows)
    print(f"written to {args.out}")
    return 0 if all(row.get("trained") for row in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
