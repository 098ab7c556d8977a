"""--cuda_graphs support: Megatron's local CUDA graphs in NeMo's training workers, with or without TE."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging

from nemo_finetune.compat.base import Shim, mark, register, replace_attribute

log = logging.getLogger("peft_megatron.compat")

SHIMS = register(
    {
        "graph-safe-rng": Shim(
            "training workers of a --cuda_graphs run (with or without TE)",
            "NeMo seeds Megatron's default RNG tracker, and Megatron's local CUDA graphs (CudaGraphManager) refuse "
            "any but a graph-safe one; Megatron-LM's own training loop makes that one (use_cudagraphable_rng)",
            "NeMo makes the graph-safe tracker when cuda_graph_impl is 'local'",
        ),
        "local-cuda-graphs": Shim(
            "training workers of a --cuda_graphs run (with or without TE)",
            "NeMo keeps a model config's constructor arguments in every checkpoint's context, so a recipe's "
            "cuda_graph_impl='local' would reach every loader (the HF exporter, generation), whose CudaGraphManager "
            "per layer then asserts a graph-safe RNG tracker and makes CUDA streams: CPU exports and eager "
            "generation fail",
            "NeMo keeps execution settings out of checkpoint contexts, or its loaders reset cuda_graph_impl",
        ),
    }
)


RNG_MODULE = "megatron.core.tensor_parallel.random"

GPT_MODEL_MODULE = "nemo.collections.llm.gpt.model.base"


def make_rng_tracker_graph_safe() -> None:
    """Megatron's CudaGraphManager, made in every transformer layer when cuda_graph_impl is "local", asserts an RNG
    tracker whose CUDA generators are graph-safe. NeMo's setup seeds whichever tracker exists and makes the default
    one if none does; Megatron keeps the first tracker a process makes, so the graph-safe one is made here, when
    Megatron's RNG module loads, before NeMo's setup. Megatron-LM's training loop passes use_cudagraphable_rng itself.
    Remove when NeMo makes it for cuda_graph_impl="local"."""
    import torch

    if not hasattr(torch.Generator, "graphsafe_get_state") or not torch.cuda.is_available():
        raise RuntimeError(
            f"--cuda_graphs needs a CUDA GPU and a CUDA build of torch; this worker has torch {torch.__version__} "
            f"with CUDA {'available' if torch.cuda.is_available() else 'unavailable'}: drop --cuda_graphs"
        )
    module = importlib.import_module(RNG_MODULE)
    module.initialize_rng_tracker(use_cudagraphable_rng=True, force_reset=True)
    mark("graph-safe-rng", "Megatron's graph-safe RNG tracker for the local CUDA graphs (training workers)")


def graph_layers_as_the_model_is_built() -> None:
    """--cuda_graphs: Megatron's local CUDA graphs (cuda_graph_impl="local") set on the model config when NeMo builds
    the Megatron model from it (`GPTConfig.configure_model`, which Qwen3, Llama and Mistral use), not in the recipe.
    The checkpoint context holds the config as the LightningModule took it at construction (its constructor
    arguments, or a snapshot of its fields where NeMo's init wrapper skipped the class), so checkpoints keep "none"
    and load anywhere; a recipe setting would make every loader (the HF exporter on CPU, eager generation) build a
    CudaGraphManager per layer, which asserts a graph-safe RNG tracker and makes CUDA streams. Megatron's config
    check has run by then, so its refusals for graphs (recomputation, CPU offloading) are made here. Remove when NeMo
    keeps execution settings out of checkpoint contexts or its loaders reset them."""
    from nemo.collections.llm.gpt.model.base import GPTConfig

    original = GPTConfig.configure_model
    if getattr(original, "_nemo_compat", False):
        return

    def configure_model(self, *args, **kwargs):
        if self.cuda_graph_impl == "none":
            uncapturable = [name for name in ("recompute_granularity", "cpu_offloading") if getattr(self, name, None)]
            if uncapturable:  # what TransformerConfig.__post_init__ refuses for graphs, which ran before this
                raise ValueError(
                    f"--cuda_graphs: the model config sets {' and '.join(uncapturable)}, which Megatron's CUDA graphs "
                    "do not support; drop --cuda_graphs"
                )
            self.cuda_graph_impl = "local"
        return original(self, *args, **kwargs)

    configure_model._nemo_compat = True
    replace_attribute("local-cuda-graphs", GPTConfig, "configure_model", configure_model)
    mark("local-cuda-graphs", "every transformer layer runs Megatron's local CUDA graphs (training workers)")
