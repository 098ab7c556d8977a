"""Generation throughput on one GPU: Megatron-Core's DynamicInferenceEngine, built and driven by the same code as
test_checkpoint.py (`nemo_finetune.generation`), against Hugging Face `generate` (SDPA) in the same job.

    python benchmarks/generation_throughput.py --profile_batch 64      # Qwen3-8B shape, batches 1 16 64 128
    python benchmarks/generation_throughput.py --shape qwen3_1p7b --batch_sizes 64 --modes eager --out /tmp/g.json

Both models have the named shape, random weights (no download) and bf16 parameters; prompts are the same random
token ids for both; greedy decoding; every request generates exactly --new_tokens tokens (no early stop: the
dynamic engine gets no termination id, HF gets min_new_tokens). The dynamic engine runs in two modes:
`cuda_graphs` (test_checkpoint.py's default: decode steps replay CUDA graphs) and `eager` (`--num_cuda_graphs 0`);
`cuda_graphs+fused_rope`, `+liger_norm` and `+fused_rope+liger_norm` are the first with generation trials (the
fused-decode-rope shim, Liger-Kernel's RMSNorm), `cuda_graphs+full_iteration` with one graph of the whole block
per decode step (Megatron's `cuda_graph_scope="full_iteration"`), each in its own run (one graph mode a process).
Each row records a digest of the generated tokens per mode (`tokens_sha256`): a trial must generate the same.
Each measurement follows a warm-up run of the same batch (Triton compilation, cuBLAS handles and allocator growth
stay out of it). Reported per batch size: generated tokens/s, requests/s, median ms per engine step (decode steps
dominate: 1 prefill step vs --new_tokens decode steps), peak GPU memory, and ours/HF. HF runs first, so its peak
memory is its own; the dynamic engine's includes its preallocated paged KV buffer (--buffer_size_gb), sized for
the largest batch. Writes JSON (--out, default benchmarks/results/generation.json); docs/BENCHMARKS.md holds the
table.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> (NeMo config class, HF Qwen3 config fields)
SHAPES = {
    "qwen3_8b": (
        "Qwen3Config8B",
        dict(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
        ),
    ),
    "qwen3_1p7b": (
        "Qwen3Config1P7B",
        dict(
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
        ),
    ),
}
# mode -> (--num_cuda_graphs of test_checkpoint.py, whose default is 8; generation shims on trial it applies;
# model-config settings on trial)
MODES = {
    "cuda_graphs": (8, (), {}),
    "eager": (0, (), {}),
    "cuda_graphs+fused_rope": (8, ("fused-decode-rope",), {}),
    "cuda_graphs+liger_norm": (8, ("liger-rmsnorm",), {}),
    "cuda_graphs+fused_rope+liger_norm": (8, ("fused-decode-rope", "liger-rmsnorm"), {}),
    # One graph of the whole transformer block per decode step instead of one per layer (Megatron's own scope)
    "cuda_graphs+full_iteration": (8, (), {"cuda_graph_scope": "full_iteration"}),
}
DEFAULT_MODES = ["cuda_graphs", "eager"]
QWEN3_COMMON = dict(
    vocab_size=151936,
    head_dim=128,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=40960,
    tie_word_embeddings=False,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3_8b")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16, 64, 128])
    parser.add_argument("--prompt_tokens", type=int, default=256)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--buffer_size_gb", type=float, default=12.0)
    parser.add_argument("--skip_hf", action="store_true", help="measure the dynamic engine only")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=DEFAULT_MODES,
        help="dynamic-engine modes to measure; the first gives the headline columns (cuda_graphs+...: with "
        "generation shims on trial, one CUDA-graph mode per run)",
    )
    parser.add_argument(
        "--profile_batch",
        type=int,
        default=0,
        help="torch.profiler over a run at this batch size (one of --batch_sizes), in each mode: "
        "kernel time by kind vs wall time, and the busiest host operators",
    )
    parser.add_argument("--profile_tokens", type=int, default=16, help="tokens generated in the profiled run")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "generation.json"))
    args = parser.parse_args(argv)
    if min(args.batch_sizes) <= 0 or args.prompt_tokens <= 0 or args.new_tokens <= 0:
        parser.error("--batch_sizes, --prompt_tokens and --new_tokens must be positive")
    graphed = [m for m in args.modes if MODES[m][0]]
    if len(graphed) > 1:
        parser.error(
            f"--modes {' '.join(graphed)}: one CUDA-graph mode per run (Megatron keeps a process's graphs and the "
            "model they were captured from); run each in its own invocation and compare their tokens_sha256"
        )
    if args.profile_batch and args.profile_batch not in args.batch_sizes:
        parser.error(f"--profile_batch {args.profile_batch} must be one of --batch_sizes {args.batch_sizes}")
    return args


class TokenIds:
    """The tokenizer interface the engine touches (detokenize finished requests; eod); prompts are token ids."""

    eod = -1

    def detokenize(self, ids, **_):
        return ""


def init_megatron():
    import os

    import torch
    from megatron.core import parallel_state

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    torch.distributed.init_process_group("nccl", world_size=1, rank=0)
    parallel_state.initialize_model_parallel(1, 1)


def build_megatron_model(shape: str, cuda_graphs: bool, settings_on_trial: dict | None = None):
    """The Megatron GPT model NeMo builds for this recipe shape (same config class and no-TE overrides as a
    restored checkpoint in test_checkpoint.py, and the same CUDA-graph overrides, then `settings_on_trial`), random
    weights, bf16, on the GPU."""
    import torch
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from nemo.collections.llm.gpt.model import qwen3

    from nemo_finetune import compat
    from nemo_finetune.generation import cuda_graph_model_overrides

    env = compat.detect_environment()
    overrides = compat.model_config_overrides(env)
    if cuda_graphs:
        overrides.update(cuda_graph_model_overrides())
    overrides.update(settings_on_trial or {})
    model_parallel_cuda_manual_seed(1234)
    config = getattr(qwen3, SHAPES[shape][0])(bf16=True, params_dtype=torch.bfloat16, **overrides)
    model = config.configure_model(tokenizer=None).cuda().eval()
    wrapper_config = InferenceWrapperConfig(
        hidden_size=config.hidden_size,
        params_dtype=torch.bfloat16,
        inference_batch_times_seqlen_threshold=1000,
        padded_vocab_size=config.vocab_size,
        inference_max_seq_length=2048,
    )
    return model, wrapper_config


def timed(fn):
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


def engine_settings(args, num_cuda_graphs: int):
    from nemo_finetune.generation import EngineSettings

    return EngineSettings(
        max_batch_size=max(args.batch_sizes),
        inference_max_seq_length=args.prompt_tokens + args.new_tokens + 1,
        buffer_size_gb=args.buffer_size_gb,
        num_cuda_graphs=num_cuda_graphs,
    )


def greedy(new_tokens: int):
    from nemo_finetune.generation import Sampling

    return Sampling(num_tokens_to_generate=new_tokens, top_k=1)


def measure_dynamic_engine(args, all_prompts, mode: str) -> dict:
    """{batch size: measurement} and, with --profile_batch, {"profile": ...} for one of MODES: one model and one
    engine for every batch size, as test_checkpoint.py builds and drives them (the engine is built for the largest
    batch; with graphs, it captures them once, for 8 batch sizes up to the largest). Each batch is measured on its
    second run; the first is its warm-up."""
    from nemo_finetune.compat import speedups
    from nemo_finetune.generation import GenerationLoop, build_engine

    num_cuda_graphs, trials, settings_on_trial = MODES[mode]
    shims = {"fused-decode-rope": speedups.fuse_decode_rope, "liger-rmsnorm": speedups.fuse_rmsnorm_with_liger}
    for trial in trials:
        shims[trial]()  # before the model is built; main() takes them back after the mode
    model, wrapper_config = build_megatron_model(args.shape, bool(num_cuda_graphs), settings_on_trial)
    settings = engine_settings(args, num_cuda_graphs)
    engine, build_seconds, _ = timed(
        lambda: build_engine(model, wrapper_config, TokenIds(), settings, termination_id=-1)
    )
    print(
        f"{mode}: engine built in {build_seconds:.1f}s, decode graphs for "
        f"{engine.context.cuda_graph_token_counts or 'no'} batch sizes",
        flush=True,
    )
    results = {}
    for batch in args.batch_sizes:
        for _attempt in ("warm-up", "measured"):
            loop = GenerationLoop(engine, greedy(args.new_tokens), settings.inference_max_seq_length)
            finished, seconds, peak = timed(functools.partial(loop.run, all_prompts[:batch]))
        tokens = [list(map(int, r.generated_tokens)) for r in finished]
        results[batch] = {
            "seconds": seconds,
            "generated_tokens": sum(len(t) for t in tokens),
            "tokens_sha256": hashlib.sha256(json.dumps(tokens).encode()).hexdigest(),
            "peak_mem_gib": peak,
            "ms_per_step": 1000 * statistics.median(loop.step_seconds),
            "steps": len(loop.step_seconds),
            "engine_build_seconds": build_seconds,
        }
        print(
            f"{mode} batch {batch}: {results[batch]['generated_tokens'] / seconds:.0f} tokens/s "
            f"({results[batch]['ms_per_step']:.1f} ms/step)",
            flush=True,
        )
    if args.profile_batch:
        results["profile"] = profile_engine(
            engine, model, settings, greedy(args.profile_tokens), all_prompts[: args.profile_batch], mode
        )
    return results


KERNEL_KINDS = (
    ("attention (paged_attention.py)", ("_paged_attention_kernel",)),
    ("RoPE (rope.py, fused_rope modes)", ("_rope_in_place",)),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas")),
)


def time_model_forward(engine, model, settings, sampling, prompts) -> dict:
    """Median per decode step, without a profiler's overhead: the step's wall time, the host time spent inside the
    model's forward call (Python and kernel launches; with graphs, replays) and the GPU time of that forward (CUDA
    events, no sync). Step minus forward host time is the engine's own host work (scheduling, sampling, request
    bookkeeping) plus waiting for the GPU."""
    import torch

    from nemo_finetune.generation import GenerationLoop

    pending, host, events = [], [], []

    def before(module, args, kwargs):
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        pending.append((time.perf_counter(), start))

    def after(module, args, kwargs, output):
        started, start = pending.pop()
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        host.append(time.perf_counter() - started)
        events.append((start, end))

    hooks = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        loop = GenerationLoop(engine, sampling, settings.inference_max_seq_length)
        loop.run(prompts)
        torch.cuda.synchronize()
    finally:
        for hook in hooks:
            hook.remove()
    gpu = [start.elapsed_time(end) / 1000 for start, end in events]
    decode = slice(1, None)  # the first step is the prefill
    return {
        "median_decode_step_ms": 1000 * statistics.median(loop.step_seconds[decode]),
        "median_forward_host_ms": 1000 * statistics.median(host[decode]),
        "median_forward_gpu_ms": 1000 * statistics.median(gpu[decode]),
        "prefill_step_ms": 1000 * loop.step_seconds[0],
    }


def profile_engine(engine, model, settings, sampling, prompts, mode: str) -> dict:
    """Where a run's wall time goes: the model forward's host and GPU time per decode step (time_model_forward);
    then, under torch.profiler, GPU kernel time by kind, the rest (host work the GPU waits for), and the host-side
    operators that take the most CPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from nemo_finetune.generation import GenerationLoop

    forward = time_model_forward(engine, model, settings, sampling, prompts)
    print(
        f"\n{mode}, batch {len(prompts)}, per decode step (median): step {forward['median_decode_step_ms']:.1f} ms, "
        f"model forward {forward['median_forward_host_ms']:.1f} ms on the host, "
        f"{forward['median_forward_gpu_ms']:.1f} ms on the GPU; prefill step {forward['prefill_step_ms']:.1f} ms"
    )
    loop = GenerationLoop(engine, sampling, settings.inference_max_seq_length)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        loop.run(prompts)
        torch.cuda.synchronize()
    decode = sorted(loop.step_seconds)[: max(1, len(loop.step_seconds) - 1)]  # all but the slowest (prefill) step
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    wall = sum(loop.step_seconds)
    split = {kind: 0.0 for kind, _ in KERNEL_KINDS}
    split["other kernels"] = 0.0
    for event in kernels:
        kind = next((k for k, names in KERNEL_KINDS if any(n in event.name for n in names)), "other kernels")
        split[kind] += event.time_range.elapsed_us() / 1e6
    busy = sum(split.values())
    by_name: dict[str, list[float]] = {}
    for event in kernels:
        total = by_name.setdefault(event.name[:100], [0.0, 0])
        total[0] += event.time_range.elapsed_us() / 1e6
        total[1] += 1
    top_kernels = sorted(by_name.items(), key=lambda item: item[1][0], reverse=True)[:20]
    host_ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    summary = {
        "mode": mode,
        "batch_size": len(prompts),
        "steps": len(loop.step_seconds),
        "wall_s": wall,
        "median_decode_step_ms": 1000 * statistics.median(decode),
        "kernel_seconds": split,
        "gpu_busy_fraction": busy / wall,
        "host_gap_s": wall - busy,
        "kernels_per_step": len(kernels) / len(loop.step_seconds),
        "top_host_ops": [
            {"name": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in host_ops
        ],
        "unprofiled": forward,
        "top_kernels": [{"name": name, "gpu_s": t, "calls": n} for name, (t, n) in top_kernels],
    }
    print(
        f"\nprofile, {mode}, batch {len(prompts)}: {len(loop.step_seconds)} steps, wall {wall:.3f}s, GPU busy "
        f"{busy:.3f}s ({100 * busy / wall:.0f}%), {summary['kernels_per_step']:.0f} kernels/step, median decode "
        f"step {summary['median_decode_step_ms']:.1f} ms"
    )
    for kind, seconds in split.items():
        print(f"  {kind:32s} {seconds:.3f}s ({100 * seconds / wall:.0f}% of wall)")
    print("  kernels by GPU time (name, seconds, calls):")
    for name, (seconds, calls) in top_kernels:
        print(f"    {seconds:.4f}s {calls:6d}  {name}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    return summary


def measure_hf(args, all_prompts) -> dict:
    import torch

    model = build_hf_model(args.shape)
    results = {}
    for batch in args.batch_sizes:
        ids = torch.tensor(all_prompts[:batch], device="cuda")

        def generate(ids=ids):
            return model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

        for _attempt in ("warm-up", "measured"):
            out, seconds, peak = timed(generate)
        results[batch] = {
            "seconds": seconds,
            "generated_tokens": (out.shape[1] - ids.shape[1]) * out.shape[0],
            "peak_mem_gib": peak,
            "ms_per_step": 1000 * seconds / args.new_tokens,
            "steps": args.new_tokens,
        }
        print(f"HF generate batch {batch}: {results[batch]['generated_tokens'] / seconds:.0f} tokens/s", flush=True)
    return results


def build_hf_model(shape: str):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**QWEN3_COMMON, **SHAPES[shape][1])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM._from_config(config, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def result_rows(args, engine: dict, hf: dict) -> list[dict]:
    """One row per batch size. The headline columns (tokens_per_s, ratio_vs_baseline, ...) are the first of
    --modes; every measured mode also has its own prefixed columns."""
    import importlib.metadata as md

    import torch

    versions = {d: md.version(d) for d in ("torch", "megatron-core", "nemo_toolkit", "transformers", "triton")}
    rows = []
    for batch in args.batch_sizes:
        h = hf.get(batch)
        row = {
            "gpu": torch.cuda.get_device_name(0),
            "date": datetime.date.today().isoformat(),
            "model": args.shape,
            "dtype": "bfloat16",
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "batch_size": batch,
            "engine_mode": args.modes[0],
            "kv_buffer_gb": args.buffer_size_gb,
            "baseline": "transformers generate, SDPA",
            "baseline_tokens_per_s": h["generated_tokens"] / h["seconds"] if h else None,
            "baseline_requests_per_s": batch / h["seconds"] if h else None,
            "baseline_ms_per_step": h["ms_per_step"] if h else None,
            "baseline_peak_mem_gib": h["peak_mem_gib"] if h else None,
        }
        for mode in args.modes:
            measured = engine[mode]
            if "error" in measured:
                row[f"{mode}_error"] = measured["error"]
                continue
            m = measured[batch]
            tokens_per_s = m["generated_tokens"] / m["seconds"]
            row.update(
                {
                    f"{mode}_tokens_per_s": tokens_per_s,
                    f"{mode}_requests_per_s": batch / m["seconds"],
                    f"{mode}_ms_per_step": m["ms_per_step"],
                    f"{mode}_peak_mem_gib": m["peak_mem_gib"],
                    f"{mode}_engine_build_seconds": m["engine_build_seconds"],
                    f"{mode}_tokens_sha256": m["tokens_sha256"],
                    f"{mode}_ratio_vs_baseline": tokens_per_s / row["baseline_tokens_per_s"] if h else None,
                }
            )
            if measured.get("profile", {}).get("batch_size") == batch:
                row[f"{mode}_profile"] = measured["profile"]
        headline = args.modes[0]
        for key in ("tokens_per_s", "requests_per_s", "ms_per_step", "peak_mem_gib", "ratio_vs_baseline"):
            row[key] = row.get(f"{headline}_{key}")
        row["versions"] = versions
        rows.append(row)
    return rows


def print_table(args, rows: list[dict]) -> None:
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    columns = []
    for title, key, fmt in (
        ("tok/s", "tokens_per_s", ".0f"),
        ("/HF", "ratio_vs_baseline", ".2f"),
        ("ms/step", "ms_per_step", ".1f"),
        ("GiB", "peak_mem_gib", ".1f"),
    ):
        columns += [(f"{m} {title}", f"{m}_{key}", fmt) for m in args.modes]
        if key != "ratio_vs_baseline":
            columns.append((f"HF {title}", f"baseline_{key}", fmt))
    print("\n" + " | ".join(["batch"] + [title for title, _, _ in columns]))
    for r in rows:
        print(" | ".join([str(r["batch_size"])] + [cell(r.get(key), fmt) for _, key, fmt in columns]))


def release_gpu_memory() -> None:
    """Give back what the last phase's model, engine and KV buffer held (they went out of scope on return)."""
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 1
    from nemo_finetune import compat

    compat.prepare_process()  # before Megatron's inference modules are imported (see nemo_compat)
    gen = torch.Generator().manual_seed(0)
    all_prompts = torch.randint(1000, 100_000, (max(args.batch_sizes), args.prompt_tokens), generator=gen).tolist()
    hf = {} if args.skip_hf else measure_hf(args, all_prompts)  # first: its peak memory is its own
    release_gpu_memory()
    init_megatron()
    engine = {}
    # Eager first: Megatron keeps the graphs' memory pool, and the model they were captured from, for the process.
    for mode in sorted(args.modes, key=lambda m: MODES[m][0] > 0):
        try:
            engine[mode] = measure_dynamic_engine(args, all_prompts, mode)
        except Exception as e:  # measured and reported, never hidden: the other mode's rows stand on their own
            import traceback

            traceback.print_exc()
            engine[mode] = {"error": f"{type(e).__name__}: {e}"}
        for trial in MODES[mode][1]:
            compat.undo(trial)
        release_gpu_memory()
    rows = result_rows(args, engine, hf)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print_table(args, rows)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
