"""Evaluate a fine-tuned NeMo checkpoint: batched generation on the test split with Megatron-Core's
DynamicInferenceEngine (in-flight batching, paged KV cache, decode steps replayed from CUDA graphs), a predictions
JSONL, and BERTScore / exact match / ROUGE-L.

    # best val_loss checkpoint of a run, its test split, greedy, 1 GPU
    python test_checkpoint.py --nemo_logs_dir outputs/Qwen/Qwen3-8B/nemo_logs --data_dir outputs/Qwen/Qwen3-8B/data

    # eager decode steps, no CUDA-graph capture (quicker overall for a handful of prompts)
    python test_checkpoint.py --nemo_logs_dir outputs/Qwen/Qwen3-8B/nemo_logs --num_cuda_graphs 0

    # tensor parallel generation
    torchrun --nproc_per_node 2 test_checkpoint.py --nemo_checkpoint_path CKPT --tensor_parallel_size 2 --data_dir D

    # re-score an existing predictions file, no GPU (BERTScore from a local model directory)
    python test_checkpoint.py --evaluate_only --predictions_file preds.jsonl --bertscore_model ./roberta-large

Outputs: the predictions JSONL (input, label, prediction, prompt_tokens, generated_tokens, generated_token_ids)
and, next to it, <predictions>.metrics.json with num_samples, bertscore_f1/precision/recall, exact_match and rouge_l;
for a checkpoint of a peft_megatron.py run the metrics are also added to <run>/report/summary.json.
Exit codes: 0 ok, 1 failure (no GPU for generation, bad predictions file, ...), 2 invalid arguments.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from nemo_finetune.checkpoints import (
    checkpoint_damage,
    find_checkpoint,
    is_nemo_checkpoint,
    warn_damaged_adapters,
)
from nemo_finetune.cli import parse_dataclass_args, run_cli
from nemo_finetune.console import setup_logging
from nemo_finetune.errors import ConfigError, PipelineError
from nemo_finetune.files import atomic_write_jsonl, atomic_write_text, iter_jsonl, overlap, overlap_problems
from nemo_finetune.hub import hub_problem
from nemo_finetune.layout import RunLayout
from nemo_finetune.records import output_files
from nemo_finetune.scoring import exact_match, load_test_examples, rouge_l

log = logging.getLogger("peft_megatron.eval")

BERTSCORE_DEFAULT = "roberta-large"  # bert_score's default model for lang="en"
PREDICTION_FIELDS = ("input", "label", "prediction")
# Far beyond any real setting: they catch typos and stray exponents (1e21) before a model is loaded.
UPPER_BOUNDS = {
    "max_samples": (10**12, "more rows than any test split holds"),
    "temperature": (100.0, "sampling temperatures are around 0.1 to 2"),
    "top_k": (1 << 24, "more tokens than any vocabulary holds"),
    "num_tokens_to_generate": (1 << 20, "no supported model has a context over 1,048,576 tokens"),
    "inference_max_seq_length": (1 << 20, "no supported model has a context over 1,048,576 tokens"),
    "tensor_parallel_size": (1024, "GPUs of one evaluation"),
    "buffer_size_gb": (1e4, "more memory than any GPU has"),
    "block_size_tokens": (1 << 16, "KV cache blocks hold tens to hundreds of tokens"),
    "max_batch_size": (1 << 16, "requests in flight on one engine"),
    "num_cuda_graphs": (1024, "batch sizes with a graph of their own"),
    "bertscore_num_layers": (1024, "layers of an encoder"),
}
# ROUGE-L's cost grows with the product of two texts' lengths (a 21 MB prediction took 24 GB); generated answers
# are at most --num_tokens_to_generate tokens, so a longer label or prediction is no evaluation's.
MAX_SCORED = 1 << 16  # characters of one label or prediction
OUTPUT_LOCK_TIMEOUT_S = 3600.0  # BERTScore over a large split takes minutes; a second evaluation waits


@dataclass
class EvalConfig:
    nemo_checkpoint_path: str | None = field(default=None, metadata={"help": "checkpoint to evaluate"})
    nemo_logs_dir: str | None = field(
        default=None, metadata={"help": "training run's nemo_logs dir: evaluate its best val_loss checkpoint"}
    )
    data_dir: str | None = field(default=None, metadata={"help": "directory holding test.jsonl (prepared data)"})
    max_samples: int = field(default=1024, metadata={"help": "evaluate at most this many test rows"})
    predictions_file: str | None = field(
        default=None, metadata={"help": "output predictions JSONL (input with --evaluate_only)"}
    )
    metrics_file: str | None = field(default=None, metadata={"help": "default: <predictions>.metrics.json"})
    evaluate_only: bool = field(default=False, metadata={"help": "score --predictions_file; no generation, no GPU"})
    bertscore_model: str = field(
        default=BERTSCORE_DEFAULT, metadata={"help": "hub name or local directory for BERTScore; 'none' to skip"}
    )
    bertscore_num_layers: int | None = field(
        default=None, metadata={"help": "layer of --bertscore_model to use (required for a local directory)"}
    )
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (used when --top_k != 1)"})
    top_k: int = field(default=1, metadata={"help": "1 = greedy (default); 0 = no top-k limit"})
    top_p: float = field(default=0.0, metadata={"help": "nucleus sampling threshold (0 = off)"})
    num_tokens_to_generate: int = field(default=128, metadata={"help": "maximum new tokens per prompt"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "tensor parallelism (launch with torchrun)"})
    buffer_size_gb: float = field(default=8.0, metadata={"help": "GPU memory for the paged KV cache"})
    block_size_tokens: int = field(default=256, metadata={"help": "KV cache block size in tokens"})
    inference_max_seq_length: int = field(default=2048, metadata={"help": "longest prompt + generation"})
    max_batch_size: int = field(default=64, metadata={"help": "most requests in flight at once"})
    num_cuda_graphs: int = field(
        default=8, metadata={"help": "decode steps replay CUDA graphs captured for this many batch sizes; 0 = eager"}
    )
    random_seed: int = field(default=1234, metadata={"help": "sampling seed"})
    log_level: str = field(default="INFO", metadata={"help": "logging level"})


def validate(cfg: EvalConfig) -> None:
    problems = []
    if cfg.evaluate_only:
        if not cfg.predictions_file:
            problems.append("--evaluate_only needs --predictions_file (the JSONL to score)")
    elif (cfg.nemo_checkpoint_path is None) == (cfg.nemo_logs_dir is None):
        problems.append("give exactly one of --nemo_checkpoint_path or --nemo_logs_dir")
    for name in (
        "max_samples",
        "num_tokens_to_generate",
        "tensor_parallel_size",
        "block_size_tokens",
        "inference_max_seq_length",
        "max_batch_size",
    ):
        if getattr(cfg, name) <= 0:
            problems.append(f"--{name} {getattr(cfg, name)} must be positive")
    if cfg.num_cuda_graphs < 0:
        problems.append(f"--num_cuda_graphs {cfg.num_cuda_graphs} must be 0 (eager) or positive")
    if cfg.buffer_size_gb <= 0:
        problems.append(f"--buffer_size_gb {cfg.buffer_size_gb} must be positive")
    for name, (bound, why) in UPPER_BOUNDS.items():
        if getattr(cfg, name) is not None and getattr(cfg, name) > bound:
            problems.append(f"--{name} {getattr(cfg, name)} is above {bound:,} ({why}); check the value")
    if not 0 <= cfg.random_seed <= 2**32 - 1:
        problems.append(f"--random_seed {cfg.random_seed} must be 0 to {2**32 - 1}")
    if cfg.num_tokens_to_generate >= cfg.inference_max_seq_length:
        problems.append("--num_tokens_to_generate must be smaller than --inference_max_seq_length")
    if cfg.temperature <= 0 or cfg.top_k < 0 or not 0 <= cfg.top_p <= 1:
        problems.append("--temperature must be > 0, --top_k >= 0 and --top_p in [0, 1]")
    for flag in ("predictions_file", "metrics_file"):
        if getattr(cfg, flag) and Path(getattr(cfg, flag)).is_dir():
            problems.append(f"--{flag} {getattr(cfg, flag)} is a directory; give a file path")
    if cfg.predictions_file:
        predictions = Path(cfg.predictions_file)
        metrics = metrics_path(cfg, predictions)
        if overlap(metrics, predictions) == "is":
            flag = "--metrics_file" if cfg.metrics_file else "--predictions_file (its default metrics file)"
            problems.append(
                f"{flag} {metrics} is the predictions file: the metrics would replace the predictions; give a "
                "--metrics_file of its own"
            )
    if cfg.bertscore_num_layers is not None and cfg.bertscore_num_layers < 1:
        problems.append(f"--bertscore_num_layers {cfg.bertscore_num_layers} must be a layer number, 1 or more")
    if cfg.bertscore_model != "none" and Path(cfg.bertscore_model).is_dir():
        problems.extend(_local_bertscore_problems(Path(cfg.bertscore_model), cfg.bertscore_num_layers))
    elif cfg.bertscore_model != "none" and not problems:  # asked before generation, not after it
        fix = "pass a local directory with --bertscore_model DIR --bertscore_num_layers N (or none)"
        problems.extend(p for p in [hub_problem("--bertscore_model", cfg.bertscore_model, fix)] if p)
    if problems:
        raise ConfigError(problems)


def _local_bertscore_problems(model_dir: Path, num_layers: int | None) -> list[str]:
    flag = f"--bertscore_model {model_dir}"
    if num_layers is None:
        return [f"{flag} is a local directory: also give --bertscore_num_layers (e.g. 17 for roberta-large)"]
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        layers = int(config["num_hidden_layers"])
    except FileNotFoundError:
        return [f"{flag}: no config.json there; give a directory saved with save_pretrained (e.g. roberta-large)"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        return [f"{flag}: config.json does not describe a transformer encoder ({type(e).__name__}: {e})"]
    if num_layers > layers:
        return [f"--bertscore_num_layers {num_layers} is beyond the {layers} layers of {model_dir}; give 1-{layers}"]
    return []


# --------------------------------------------------------------------------------------------------------------------
# Test rows and predictions files
# --------------------------------------------------------------------------------------------------------------------
def prompt_ids(example: dict, tokenizer) -> list[int]:
    """The prompt's token ids as training saw them: a plain prompt starts with BOS where the tokenizer adds one
    (dataset_module.adds_bos); a chat prompt's template writes its own."""
    from dataset_module import adds_bos

    ids = tokenizer.tokenize(example["input"])
    hf = tokenizer.tokenizer.tokenizer
    return [hf.bos_token_id, *ids] if not example.get("chat") and adds_bos(hf) else ids


# --------------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------------
def bertscore(predictions: list[str], labels: list[str], model: str, num_layers: int | None) -> dict:
    from bert_score import score

    kwargs = {"model_type": model, "num_layers": num_layers} if num_layers is not None else {"model_type": model}
    try:
        precision, recall, f1 = score(predictions, labels, lang="en", verbose=False, **kwargs)
    except OSError as e:
        raise PipelineError(
            f"could not load BERTScore model {model!r} ({e}); offline, pass a local directory with "
            "--bertscore_model DIR --bertscore_num_layers N, or --bertscore_model none"
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError) as e:  # a model it cannot use
        raise PipelineError(
            f"--bertscore_model {model}: bert_score cannot score with this model ({type(e).__name__}: {e}); give "
            "an encoder such as roberta-large or bert-base-uncased, or --bertscore_model none"
        ) from None
    return {
        "bertscore_precision": float(precision.mean()),
        "bertscore_recall": float(recall.mean()),
        "bertscore_f1": float(f1.mean()),
    }


def compute_metrics(rows: list[dict], cfg: EvalConfig) -> dict:
    predictions = [r["prediction"] for r in rows]
    labels = [r["label"] for r in rows]
    metrics = {
        "num_samples": len(rows),
        "exact_match": exact_match(predictions, labels),
        "rouge_l": rouge_l(predictions, labels),
    }
    if cfg.bertscore_model != "none":
        metrics.update(bertscore(predictions, labels, cfg.bertscore_model, cfg.bertscore_num_layers))
    else:
        metrics.update(bertscore_precision=None, bertscore_recall=None, bertscore_f1=None)
    return metrics


def metrics_path(cfg: EvalConfig, predictions: Path) -> Path:
    return Path(cfg.metrics_file) if cfg.metrics_file else predictions.with_suffix(".metrics.json")


def evaluate(cfg: EvalConfig, predictions: Path, extra: dict | None = None) -> dict:
    rows = list(iter_jsonl(predictions, PREDICTION_FIELDS, text=("label", "prediction"), max_text_chars=MAX_SCORED))
    if not rows:
        raise PipelineError(f"{predictions} holds no predictions")
    metrics = {**compute_metrics(rows, cfg), **(extra or {})}
    out = metrics_path(cfg, predictions)
    atomic_write_text(out, json.dumps(metrics, indent=2) + "\n")
    f1 = metrics["bertscore_f1"]
    print(
        f"num_samples {metrics['num_samples']} | exact_match {metrics['exact_match']:.4f} | rouge_l "
        f"{metrics['rouge_l']:.4f} | BERTScore F1: {'n/a' if f1 is None else f'{f1:.4f}'}"
    )
    print(f"metrics written to {out}")
    return metrics


# --------------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------------
def load_model_and_tokenizer(ckpt: Path, cfg: EvalConfig):
    """Restore a NeMo checkpoint for inference: (Megatron GPT model in eval mode, its InferenceWrapperConfig, the
    NeMo tokenizer)."""
    import torch

    from nemo_finetune import compat, generation

    env = compat.prepare_process()
    if not env.has_cuda:
        raise PipelineError(
            "generation needs a CUDA GPU and this machine has none; score an existing predictions file with "
            "--evaluate_only --predictions_file FILE"
        )
    from nemo import lightning as nl
    from nemo.collections.llm.inference.base import setup_model_and_tokenizer

    trainer = nl.Trainer(
        accelerator="gpu",
        devices=cfg.tensor_parallel_size,
        strategy=nl.MegatronStrategy(tensor_model_parallel_size=cfg.tensor_parallel_size, ckpt_load_strictness=False),
        plugins=nl.MegatronMixedPrecision(precision="bf16-mixed", params_dtype=torch.bfloat16),
    )
    overrides = compat.model_config_overrides(env)
    if cfg.num_cuda_graphs:
        overrides.update(generation.cuda_graph_model_overrides())
    wrapped, tokenizer = setup_model_and_tokenizer(
        ckpt, trainer, params_dtype=torch.bfloat16, inference_max_seq_length=cfg.inference_max_seq_length, **overrides
    )
    model = wrapped.model
    model.eval()  # NeMo's restore leaves the module in training mode; Megatron's dynamic attention asserts eval
    return model, wrapped.inference_wrapper_config, tokenizer


def settings_of(cls, cfg: EvalConfig, **overrides):
    """The generation settings `cls` (a dataclass of nemo_finetune.generation) from the flags of the same names."""
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)} | overrides)


def generate_predictions(cfg: EvalConfig, ckpt: Path, data_dir: Path) -> tuple[list[dict], dict]:
    """Predictions for the test split (every rank takes part) and generation statistics."""
    import torch
    from tqdm import tqdm

    from nemo_finetune import generation

    model, wrapper_config, tokenizer = load_model_and_tokenizer(ckpt, cfg)
    examples = load_test_examples(data_dir, tokenizer.tokenizer.tokenizer, cfg.max_samples)
    prompts = [prompt_ids(e, tokenizer) for e in examples]
    # No more requests in flight than there are prompts: fewer CUDA graphs to capture for a small test split.
    settings = settings_of(generation.EngineSettings, cfg, max_batch_size=min(cfg.max_batch_size, len(prompts)))
    engine = generation.build_engine(model, wrapper_config, tokenizer, settings, termination_id=int(tokenizer.eod))
    loop = generation.GenerationLoop(engine, settings_of(generation.Sampling, cfg), cfg.inference_max_seq_length)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with tqdm(total=len(prompts), desc="generating", unit="req", disable=None) as bar:  # none without a terminal
        finished = loop.run(prompts, bar)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    eod = int(tokenizer.eod)
    rows, generated = [], 0
    for example, prompt, request in zip(examples, prompts, finished, strict=True):
        all_tokens = [int(t) for t in request.generated_tokens]
        tokens = [t for t in all_tokens if t != eod]
        generated += len(all_tokens)
        rows.append(
            {
                "input": example["input"],
                "label": example["label"],
                "prediction": tokenizer.detokenize(tokens).strip(),
                "prompt_tokens": len(prompt),
                "generated_tokens": len(all_tokens),
                "generated_token_ids": all_tokens,
            }
        )
    stats = {
        "requests_per_s": len(rows) / seconds,
        "generated_tokens_per_s": generated / seconds,
        "generation_seconds": seconds,
        "truncated_prompts": loop.truncated,
        "cuda_graph_batch_sizes": engine.context.cuda_graph_token_counts,
        "checkpoint": str(ckpt),
    }
    print(
        f"generated {len(rows)} predictions in {seconds:.1f}s | {stats['requests_per_s']:.1f} requests/s | "
        f"{stats['generated_tokens_per_s']:.0f} generated tokens/s | truncated prompts: {loop.truncated} | "
        f"decode CUDA graphs: {stats['cuda_graph_batch_sizes'] or 'off'}"
    )
    return rows, stats


def write_and_evaluate(cfg: EvalConfig, out: Path, rows: list[dict] | None, stats: dict | None = None) -> dict:
    """Write the predictions (unless scoring an existing file) and their metrics as one pair: two evaluations
    writing the same files take turns, so a metrics file always scores the predictions beside it."""
    with output_files(out).locked(OUTPUT_LOCK_TIMEOUT_S, "evaluation output"):
        if rows is not None:
            atomic_write_jsonl(out, rows)
        return evaluate(cfg, out, extra=stats)


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_dataclass_args(EvalConfig, argv, __doc__)
    setup_logging(cfg.log_level)
    validate(cfg)
    if cfg.evaluate_only:
        path = Path(cfg.predictions_file)
        if not path.exists():
            raise PipelineError(f"--predictions_file {path} does not exist")
        write_and_evaluate(cfg, path, rows=None)
        return 0
    ckpt = find_checkpoint(Path(cfg.nemo_logs_dir)) if cfg.nemo_logs_dir else Path(cfg.nemo_checkpoint_path)
    if not is_nemo_checkpoint(ckpt):
        raise PipelineError(f"{ckpt} is not a complete NeMo checkpoint; train or import with peft_megatron.py first")
    damage = checkpoint_damage(ckpt)
    if damage:
        raise PipelineError(
            f"{ckpt} is damaged: {damage}; evaluate another checkpoint of the run (e.g. its -last "
            "one, --nemo_checkpoint_path), or re-run the training that writes it"
        )
    run = RunLayout.of_checkpoint(ckpt)
    if not cfg.data_dir and run is None:
        raise PipelineError(
            f"{ckpt} is not a checkpoint of a peft_megatron.py run (<output_dir>/nemo_logs/checkpoints/), so its "
            "test split is unknown; pass --data_dir (the directory holding test.jsonl)"
        )
    data_dir = Path(cfg.data_dir) if cfg.data_dir else run.data
    out = Path(cfg.predictions_file) if cfg.predictions_file else ckpt.with_name(ckpt.name + ".predictions.jsonl")
    outputs = [("--predictions_file", out), ("--metrics_file", metrics_path(cfg, out))]
    inputs = [("the checkpoint", ckpt), ("the test split", data_dir / "test.jsonl")]
    problems = overlap_problems(outputs, inputs, "writing there would change or replace it")
    if problems:
        raise ConfigError(problems)
    damaged = warn_damaged_adapters(
        ckpt,
        log,
        "its metrics do not measure the trained adapter there; evaluate another checkpoint of the run (e.g. -last)",
    )
    rows, stats = generate_predictions(cfg, ckpt, data_dir)
    stats |= damaged  # in the metrics file: what these metrics did not measure
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        metrics = write_and_evaluate(cfg, out, rows, stats)
        report_evaluation(ckpt, out, metrics)
    return 0


def report_evaluation(ckpt: Path, predictions: Path, metrics: dict) -> None:
    """Add the metrics to the run report of the run that wrote `ckpt` (nemo_finetune/report.py), if a run did."""
    from nemo_finetune import report as run_report

    run = RunLayout.of_checkpoint(ckpt)
    if run is not None:
        evaluation = {"checkpoint": str(ckpt), "predictions": str(predictions), **metrics}
        run_report.add_evaluation(run.root, ckpt.name, evaluation)
        print(f"metrics added to {run.report / 'summary.json'}")


def cli() -> None:
    """The console entry point of an installed copy (pyproject.toml), the same as running this file."""
    run_cli(main)


if __name__ == "__main__":
    cli()
