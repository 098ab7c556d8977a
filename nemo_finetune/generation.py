"""Batched generation with Megatron-Core's DynamicInferenceEngine: the engine over a restored GPT model (paged KV
cache, decode steps replayed from CUDA graphs) and the loop that feeds it requests. Used by test_checkpoint.py and
benchmarks/generation_throughput.py."""

from __future__ import annotations

import time
from dataclasses import dataclass

from nemo_finetune.checkpoints import attention_head_dim
from nemo_finetune.compat import fixes
from nemo_finetune.errors import PipelineError


@dataclass(frozen=True)
class EngineSettings:
    """What the engine is built for (test_checkpoint.py's flags of the same names)."""

    max_batch_size: int = 64
    inference_max_seq_length: int = 2048
    buffer_size_gb: float = 8.0
    block_size_tokens: int = 256
    num_cuda_graphs: int = 8
    tensor_parallel_size: int = 1
    random_seed: int = 1234


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn (test_checkpoint.py's flags of the same names); top_k 1 is greedy."""

    num_tokens_to_generate: int = 128
    temperature: float = 1.0
    top_k: int = 1
    top_p: float = 0.0

    def params(self):
        from megatron.core.inference.sampling_params import SamplingParams

        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            num_tokens_to_generate=self.num_tokens_to_generate,
        )


class GenerationLoop:
    """Feeds requests to a dynamic engine and collects finished ones in input order.

    The engine interface is three calls: add_request(request_id, prompt_tokens, num_tokens_to_generate),
    has_unfinished_requests() and step_modern(sampling_params) -> {"finished_requests": [...]}; Megatron-Core
    0.15.3 queues requests the paged KV cache cannot hold yet and admits them as others finish, so everything can be
    submitted up front. Prompts that cannot fit with the requested generation are truncated from the left."""

    def __init__(self, engine, sampling: Sampling, max_sequence_length: int):
        self.engine = engine
        self.sampling_params = sampling.params()
        self.max_prompt = max_sequence_length - sampling.num_tokens_to_generate
        self.num_tokens_to_generate = sampling.num_tokens_to_generate
        self.truncated = 0
        self.step_seconds: list[float] = []  # wall time of each engine step (each ends in a host sync)

    def run(self, prompts_tokens: list[list[int]], progress=None) -> list:
        results: list = [None] * len(prompts_tokens)
        for i, tokens in enumerate(prompts_tokens):
            if len(tokens) > self.max_prompt:
                tokens = tokens[-self.max_prompt :]
                self.truncated += 1
            self.engine.add_request(i, tokens, self.num_tokens_to_generate)
        while self.engine.has_unfinished_requests():
            start = time.perf_counter()
            finished = self.engine.step_modern(self.sampling_params)["finished_requests"]
            self.step_seconds.append(time.perf_counter() - start)
            for request in finished:
                results[request.request_id] = request
            if progress is not None and finished:
                progress.update(len(finished))
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise PipelineError(f"{len(missing)} requests never finished (first ids {missing[:5]})")
        return results


def cuda_graph_model_overrides() -> dict:
    """Model-config overrides that let the dynamic engine replay decode steps from CUDA graphs; call before the
    model is built. Megatron's CudaGraphManager, made in every transformer layer, asserts a graph-safe RNG tracker,
    and Megatron keeps the first tracker a process makes, so the inference tracker (no forks: nothing is random in
    an eval-mode forward) is made here, before NeMo's restore seeds the default one."""
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    return {"cuda_graph_impl": "local", "recompute_granularity": None}  # Megatron refuses graphs with recompute


def build_engine(model, inference_wrapper_config, tokenizer, settings: EngineSettings, termination_id: int):
    """Megatron-Core's DynamicInferenceEngine over `model` (paged KV cache of `buffer_size_gb`, up to
    `max_batch_size` requests in flight). Without flash-attn, its attention runs on paged_attention.py's kernel.
    `termination_id` -1 never stops early (benchmarks). For a model built with cuda_graph_model_overrides(), the
    engine captures decode-step graphs for `num_cuda_graphs` batch sizes here and replays them; prefill and mixed
    steps run eagerly."""
    import torch
    from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
    from megatron.core.inference.engines.dynamic_engine import DynamicInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.text_generation_controllers.text_generation_controller import TextGenerationController

    from nemo_finetune import compat

    compat.install_paged_attention_fallback()
    mcfg = model.config
    graphs = getattr(mcfg, "cuda_graph_impl", "none") == "local"
    if graphs and not settings.num_cuda_graphs:
        raise ValueError("a model built with cuda_graph_model_overrides() needs num_cuda_graphs > 0")
    context = DynamicInferenceContext(
        params_dtype=torch.bfloat16,
        num_layers=mcfg.num_layers,
        kv_channels=attention_head_dim(mcfg),
        num_attention_heads=mcfg.num_query_groups or mcfg.num_attention_heads,  # the KV cache holds KV heads
        max_sequence_length=settings.inference_max_seq_length,
        buffer_size_gb=settings.buffer_size_gb,
        buffer_guaranteed_fraction=0.1,
        block_size_tokens=settings.block_size_tokens,
        max_requests_override=settings.max_batch_size,
        tensor_model_parallel_size=settings.tensor_parallel_size,
        unified_memory_level=0,
        num_cuda_graphs=fixes.decode_graph_count(
            settings.num_cuda_graphs, settings.max_batch_size, settings.tensor_parallel_size
        )
        if graphs
        else None,
        use_cuda_graphs_for_non_decode_steps=False,
    )
    wrapper = GPTInferenceWrapper(model, inference_wrapper_config, inference_context=context)
    controller = TextGenerationController(inference_wrapped_model=wrapper, tokenizer=tokenizer)
    return DynamicInferenceEngine(controller, context, termination_id=termination_id, random_seed=settings.random_seed)
