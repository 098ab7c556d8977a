"""Generation throughput on one GPU: Megatron-Core's DynamicInferenceEngine, built and driven by the same code as
test_checkpoint.py (build_engine, GenerationLoop), against Hugging Face `generate` (SDPA) in the same job.

    python benchmarks/generation_throughput.py                                  # Qwen3-8B shape, batches 1 16 64 128
    python benchmarks/generation_throughput.py --shape qwen3_1p7b --batch_sizes 64 --out /tmp/generation.json

Both models have the named shape, random weights (no download) and bf16 parameters; prompts are the same random
token ids for both; greedy decoding; every request generates exactly --new_tokens tokens (no early stop: the
dynamic engine gets no termination id, HF gets min_new_tokens). Each measurement follows a warm-up run of the same
batch (Triton compilation, cuBLAS handles and allocator growth stay out of it). Reported per batch size: generated
tokens/s, requests/s, median ms per engine step (decode steps dominate: 1 prefill step vs --new_tokens decode
steps), peak GPU memory, and ours/HF. Peak memory of the dynamic engine includes its preallocated paged KV buffer
(--buffer_size_gb), which is sized for the largest batch. Writes JSON (--out, default
benchmarks/results/generation.json); docs/BENCHMARKS.md holds the table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> (NeMo config class, HF Qwen3 config fields)
SHAPES = {
    "qwen3_8b": ("Qwen3Config8B", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                       num_attention_heads=32, num_key_value_heads=8)),
    "qwen3_1p7b": ("Qwen3Config1P7B", dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                           num_attention_heads=16, num_key_value_heads=8)),
}
QWEN3_COMMON = dict(vocab_size=151936, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                    max_position_embeddings=40960, tie_word_embeddings=False)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3_8b")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16, 64, 128])
    parser.add_argument("--prompt_tokens", type=int, default=256)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--buffer_size_gb", type=float, default=12.0)
    parser.add_argument("--skip_hf", action="store_true", help="measure the dynamic engine only")
    parser.add_argument("--cuda_graphs", action="store_true",
                        help="also measure the dynamic engine with CUDA graphs for decode steps (cuda_graph_impl=local)")
    parser.add_argument("--profile_batch", type=int, default=0,
                        help="torch.profiler over a run at this batch size: kernel time by kind vs wall time")
    parser.add_argument("--profile_tokens", type=int, default=16, help="tokens generated in the profiled run")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "generation.json"))
    return parser.parse_args(argv)


class TokenIds:
    """The tokenizer interface the engine touches (detokenize finished requests; eod); prompts are token ids."""

    eod = -1

    def detokenize(self, ids, **_):
        return ""


def init_megatron():
    import os

    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    torch.distributed.init_process_group("nccl", world_size=1, rank=0)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)


def build_megatron_model(shape: str, cuda_graphs: bool = False):
    """The Megatron GPT model NeMo builds for this recipe shape (same config class and no-TE overrides as a
    restored checkpoint in test_checkpoint.py), random weights, bf16, on the GPU. With `cuda_graphs`, every
    transformer layer gets Megatron's CudaGraphManager, which needs the inference RNG tracker."""
    import torch
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
    from nemo.collections.llm.gpt.model import qwen3

    import nemo_compat

    env = nemo_compat.detect_environment()
    extra = {"cuda_graph_impl": "local"} if cuda_graphs else {}
    if cuda_graphs:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234, inference_rng_tracker=True, force_reset_rng=True)
    config = getattr(qwen3, SHAPES[shape][0])(
        bf16=True, params_dtype=torch.bfloat16, **nemo_compat.model_config_overrides(env), **extra
    )
    model = config.configure_model(tokenizer=None).cuda().eval()
    wrapper_config = InferenceWrapperConfig(
        hidden_size=config.hidden_size, params_dtype=torch.bfloat16, inference_batch_times_seqlen_threshold=1000,
        padded_vocab_size=config.vocab_size, inference_max_seq_length=2048,
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


def run_dynamic_engine(model, wrapper_config, prompts, args) -> dict:
    """One measured run at len(prompts) requests, after a warm-up of the same batch."""
    import torch

    from test_checkpoint import EvalConfig, GenerationLoop, build_engine, sampling_params

    cfg = EvalConfig(num_tokens_to_generate=args.new_tokens, max_batch_size=len(prompts),
                     inference_max_seq_length=args.prompt_tokens + args.new_tokens + 1,
                     buffer_size_gb=args.buffer_size_gb, top_k=1)
    result = {}
    for attempt in ("warm-up", "measured"):
        engine = build_engine(model, wrapper_config, TokenIds(), cfg, termination_id=-1)
        loop = GenerationLoop(engine, sampling_params(cfg), cfg.inference_max_seq_length, cfg.num_tokens_to_generate)
        finished, seconds, peak = timed(lambda: loop.run(prompts))
        generated = sum(len(r.generated_tokens) for r in finished)
        result = {"seconds": seconds, "generated_tokens": generated, "peak_mem_gib": peak,
                  "ms_per_step": 1000 * statistics.median(loop.step_seconds), "steps": len(loop.step_seconds)}
        engine = loop = finished = None  # free the KV buffer before the next engine allocates its own
        gc.collect()
        torch.cuda.empty_cache()
    return result


def run_dynamic_engine_with_graphs(model, wrapper_config, all_prompts, args) -> dict:
    """One engine for every batch size (Megatron captures its graphs once, against one KV buffer): decode steps
    replay graphs captured for 8 batch sizes up to the largest batch (a batch runs in the next larger one);
    prefill runs eagerly."""
    from test_checkpoint import EvalConfig, GenerationLoop, build_engine, sampling_params

    largest = max(args.batch_sizes)
    cfg = EvalConfig(num_tokens_to_generate=args.new_tokens, max_batch_size=largest,
                     inference_max_seq_length=args.prompt_tokens + args.new_tokens + 1,
                     buffer_size_gb=args.buffer_size_gb, top_k=1)
    (engine, capture_seconds, _) = timed(lambda: build_engine(model, wrapper_config, TokenIds(), cfg, termination_id=-1,
                                                              num_cuda_graphs=8))
    print(f"captured CUDA graphs for {engine.context.cuda_graph_token_counts} in {capture_seconds:.1f}s", flush=True)
    results = {}
    for batch in args.batch_sizes:
        for attempt in ("warm-up", "measured"):
            loop = GenerationLoop(engine, sampling_params(cfg), cfg.inference_max_seq_length,
                                  cfg.num_tokens_to_generate)
            finished, seconds, peak = timed(lambda: loop.run(all_prompts[:batch]))
            results[batch] = {"seconds": seconds, "generated_tokens": sum(len(r.generated_tokens) for r in finished),
                              "peak_mem_gib": peak, "ms_per_step": 1000 * statistics.median(loop.step_seconds),
                              "steps": len(loop.step_seconds), "capture_seconds": capture_seconds}
        print(f"dynamic engine + CUDA graphs batch {batch}: "
              f"{results[batch]['generated_tokens'] / results[batch]['seconds']:.0f} tokens/s "
              f"({results[batch]['ms_per_step']:.1f} ms/step)", flush=True)
    return results


KERNEL_KINDS = (
    ("attention (paged_attention.py)", ("_paged_attention_kernel",)),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas")),
)


def profile_dynamic_engine(model, wrapper_config, prompts, args) -> dict:
    """Where a run's wall time goes: GPU kernel time by kind, and the rest (host work the GPU waits for)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from test_checkpoint import EvalConfig, GenerationLoop, build_engine, sampling_params

    cfg = EvalConfig(num_tokens_to_generate=args.profile_tokens, max_batch_size=len(prompts),
                     inference_max_seq_length=args.prompt_tokens + args.profile_tokens + 1,
                     buffer_size_gb=args.buffer_size_gb, top_k=1)
    for attempt in ("warm-up", "profiled"):
        engine = build_engine(model, wrapper_config, TokenIds(), cfg, termination_id=-1)
        loop = GenerationLoop(engine, sampling_params(cfg), cfg.inference_max_seq_length, cfg.num_tokens_to_generate)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            loop.run(prompts)
            torch.cuda.synchronize()
        del engine
    decode = sorted(loop.step_seconds)[: max(1, len(loop.step_seconds) - 1)]  # all but the slowest (prefill) step
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    wall = sum(loop.step_seconds)
    split = {kind: 0.0 for kind, _ in KERNEL_KINDS}
    split["other kernels"] = 0.0
    for event in kernels:
        seconds = event.time_range.elapsed_us() / 1e6
        kind = next((k for k, names in KERNEL_KINDS if any(n in event.name for n in names)), "other kernels")
        split[kind] += seconds
    busy = sum(split.values())
    summary = {
        "batch_size": len(prompts), "steps": len(loop.step_seconds), "wall_s": wall,
        "median_decode_step_ms": 1000 * statistics.median(decode),
        "kernel_seconds": split, "gpu_busy_fraction": busy / wall, "host_gap_s": wall - busy,
        "kernels_per_step": len(kernels) / len(loop.step_seconds),
    }
    print(f"\nprofile at batch {len(prompts)}: {len(loop.step_seconds)} steps, wall {wall:.3f}s, GPU busy "
          f"{busy:.3f}s ({100 * busy / wall:.0f}%), {summary['kernels_per_step']:.0f} kernels/step")
    for kind, seconds in split.items():
        print(f"  {kind:32s} {seconds:.3f}s ({100 * seconds / wall:.0f}% of wall)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    return summary


def run_hf(model, prompts, args) -> dict:
    import torch

    ids = torch.tensor(prompts, device="cuda")

    def generate():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    result = {}
    for attempt in ("warm-up", "measured"):
        out, seconds, peak = timed(generate)
        generated = (out.shape[1] - ids.shape[1]) * out.shape[0]
        result = {"seconds": seconds, "generated_tokens": generated, "peak_mem_gib": peak,
                  "ms_per_step": 1000 * seconds / args.new_tokens, "steps": args.new_tokens}
        del out
    return result


def build_hf_model(shape: str):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**QWEN3_COMMON, **SHAPES[shape][1])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM._from_config(config, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 1
    import nemo_compat

    nemo_compat.prepare_process()  # before Megatron's inference modules are imported (see nemo_compat)
    gen = torch.Generator().manual_seed(0)
    all_prompts = torch.randint(1000, 100_000, (max(args.batch_sizes), args.prompt_tokens), generator=gen).tolist()

    init_megatron()
    model, wrapper_config = build_megatron_model(args.shape)
    ours = {}
    for batch in args.batch_sizes:
        ours[batch] = run_dynamic_engine(model, wrapper_config, all_prompts[:batch], args)
        print(f"dynamic engine batch {batch}: {ours[batch]['generated_tokens'] / ours[batch]['seconds']:.0f} tokens/s "
              f"({ours[batch]['ms_per_step']:.1f} ms/step)", flush=True)
    profile = profile_dynamic_engine(model, wrapper_config, all_prompts[: args.profile_batch], args) \
        if args.profile_batch else None
    del model
    gc.collect()
    torch.cuda.empty_cache()

    graphs = {}
    if args.cuda_graphs:
        model, wrapper_config = build_megatron_model(args.shape, cuda_graphs=True)
        try:
            graphs = run_dynamic_engine_with_graphs(model, wrapper_config, all_prompts, args)
        except Exception as e:  # measured and reported, never hidden: the eager rows stand on their own
            import traceback

            traceback.print_exc()
            graphs = {"error": f"{type(e).__name__}: {e}"}
        del model
        gc.collect()
        torch.cuda.empty_cache()

    hf = {}
    if not args.skip_hf:
        hf_model = build_hf_model(args.shape)
        for batch in args.batch_sizes:
            hf[batch] = run_hf(hf_model, all_prompts[:batch], args)
            print(f"HF generate batch {batch}: {hf[batch]['generated_tokens'] / hf[batch]['seconds']:.0f} tokens/s",
                  flush=True)
        del hf_model

    import importlib.metadata as md

    versions = {d: md.version(d) for d in ("torch", "megatron-core", "nemo_toolkit", "transformers", "triton")}
    rows = []
    for batch in args.batch_sizes:
        o, h = ours[batch], hf.get(batch)
        row = {
            "gpu": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(), "model": args.shape,
            "dtype": "bfloat16", "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "batch_size": batch, "tokens_per_s": o["generated_tokens"] / o["seconds"],
            "requests_per_s": batch / o["seconds"], "ms_per_step": o["ms_per_step"], "peak_mem_gib": o["peak_mem_gib"],
            "baseline": "transformers generate, SDPA",
            "baseline_tokens_per_s": h["generated_tokens"] / h["seconds"] if h else None,
            "baseline_requests_per_s": batch / h["seconds"] if h else None,
            "baseline_ms_per_step": h["ms_per_step"] if h else None,
            "baseline_peak_mem_gib": h["peak_mem_gib"] if h else None,
            "versions": versions, "kv_buffer_gb": args.buffer_size_gb,
        }
        row["ratio_vs_baseline"] = row["tokens_per_s"] / row["baseline_tokens_per_s"] if h else None
        g = graphs.get(batch)
        if g:
            row.update(cuda_graphs_tokens_per_s=g["generated_tokens"] / g["seconds"],
                       cuda_graphs_ms_per_step=g["ms_per_step"], cuda_graphs_peak_mem_gib=g["peak_mem_gib"],
                       cuda_graphs_ratio_vs_baseline=g["generated_tokens"] / g["seconds"] / row["baseline_tokens_per_s"]
                       if h else None)
        elif "error" in graphs:
            row["cuda_graphs_error"] = graphs["error"]
        if profile and profile["batch_size"] == batch:
            row["profile"] = profile
        rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{'batch':>5} {'ours tok/s':>10} {'graphs tok/s':>12} {'HF tok/s':>9} {'ratio':>6} {'graphs ratio':>12} "
          f"{'ours ms/step':>12} {'graphs ms/step':>14} {'HF ms/step':>10} {'ours GiB':>8} {'HF GiB':>7}")
    for r in rows:
        print(f"{r['batch_size']:>5} {r['tokens_per_s']:>10.0f} {r.get('cuda_graphs_tokens_per_s') or 0:>12.0f} "
              f"{r['baseline_tokens_per_s'] or 0:>9.0f} {r['ratio_vs_baseline'] or 0:>6.2f} "
              f"{r.get('cuda_graphs_ratio_vs_baseline') or 0:>12.2f} {r['ms_per_step']:>12.1f} "
              f"{r.get('cuda_graphs_ms_per_step') or 0:>14.1f} {r['baseline_ms_per_step'] or 0:>10.1f} "
              f"{r['peak_mem_gib']:>8.1f} {r['baseline_peak_mem_gib'] or 0:>7.1f}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
