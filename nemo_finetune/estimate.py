"""What a job trains and roughly needs on each GPU, from the model's config alone (no model is built): the parameter
counts and the memory estimate of the plan (--dry_run)."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Shape:
    """The sizes of a dense GPT (Megatron's TransformerConfig fields, after its own defaults)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    gated_linear_unit: bool
    qk_layernorm: bool
    add_bias_linear: bool
    add_qkv_bias: bool
    layer_norm: bool  # LayerNorm (weight and bias) rather than RMSNorm (weight)
    vocab_size: int | None  # None: set by the tokenizer, not known here
    tied_embeddings: bool

    @classmethod
    def of(cls, args: dict, vocab_size: int | None = None) -> Shape | None:
        """From a model config's arguments (fiddle's ordered_arguments with defaults); None for a mixture of
        experts or a config that is not a dense GPT's, which this estimate does not cover."""
        sizes = [args.get(k) for k in ("num_layers", "hidden_size", "num_attention_heads")]
        if args.get("num_moe_experts") or not all(isinstance(v, int) and v > 0 for v in sizes):
            return None
        hidden, heads = args["hidden_size"], args["num_attention_heads"]
        return cls(
            num_layers=args["num_layers"],
            hidden_size=hidden,
            ffn_hidden_size=args.get("ffn_hidden_size") or 4 * hidden,
            num_attention_heads=heads,
            num_query_groups=args.get("num_query_groups") or heads,
            kv_channels=args.get("kv_channels") or hidden // heads,
            gated_linear_unit=bool(args.get("gated_linear_unit")),
            qk_layernorm=bool(args.get("qk_layernorm")),
            add_bias_linear=bool(args.get("add_bias_linear", True)),
            add_qkv_bias=bool(args.get("add_qkv_bias")),
            layer_norm=args.get("normalization", "LayerNorm") == "LayerNorm",
            vocab_size=args.get("vocab_size") or vocab_size,
            tied_embeddings=bool(args.get("share_embeddings_and_output_weights")),
        )

    @classmethod
    def of_hf(cls, hf: dict, template: Shape) -> Shape:
        """A local Hugging Face model's sizes (config.json) in the architecture of its recipe's `template`."""
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        return dataclasses.replace(
            template,
            num_layers=hf["num_hidden_layers"],
            hidden_size=hidden,
            ffn_hidden_size=hf.get("intermediate_size") or 4 * hidden,
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            kv_channels=hf.get("head_dim") or hidden // heads,
            vocab_size=hf.get("vocab_size"),
            tied_embeddings=bool(hf.get("tie_word_embeddings", template.tied_embeddings)),
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear of a layer, by Megatron's module name."""
        q, kv = self.num_attention_heads * self.kv_channels, self.num_query_groups * self.kv_channels
        fc1 = self.ffn_hidden_size * (2 if self.gated_linear_unit else 1)
        return {
            "self_attention.linear_qkv": (self.hidden_size, q + 2 * kv),
            "self_attention.linear_proj": (q, self.hidden_size),
            "mlp.linear_fc1": (self.hidden_size, fc1),
            "mlp.linear_fc2": (self.ffn_hidden_size, self.hidden_size),
        }

    def layer_parameters(self) -> int:
        linears = self.linears()
        count = sum(i * o for i, o in linears.values())
        if self.add_bias_linear:
            count += sum(o for _, o in linears.values())
        elif self.add_qkv_bias:
            count += linears["self_attention.linear_qkv"][1]
        norm = 2 if self.layer_norm else 1  # LayerNorm has a bias beside its weight
        count += norm * 2 * self.hidden_size  # before attention and before the MLP
        if self.qk_layernorm:
            count += norm * 2 * self.kv_channels
        return count

    def parameters(self, vocab_size: int | None) -> int:
        """Every weight; the embedding and output layers only when the (padded) vocabulary size is known."""
        norm = 2 if self.layer_norm else 1
        count = self.num_layers * self.layer_parameters() + norm * self.hidden_size  # + the final norm
        if vocab_size:
            count += vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return count


def padded_vocab(vocab_size: int | None, divisible_by: int, tensor_parallel_size: int) -> int | None:
    """Megatron's vocabulary: padded up to a multiple of divisible_by x TP (NeMo's configure_model)."""
    if not vocab_size:
        return None
    step = max(1, divisible_by) * tensor_parallel_size
    return math.ceil(vocab_size / step) * step


def adapted_linears(shape: Shape, targets: list[str]) -> list[tuple[int, int]]:
    """(in, out) of every linear that NeMo's LoRA wraps for `targets`: a name (linear_qkv) wraps it in every layer,
    a pattern (*.layers.0.*.linear_qkv) where it matches the module's full name."""
    wrapped = []
    for layer in range(shape.num_layers):
        for module, features in shape.linears().items():
            name = module.rsplit(".", 1)[1]
            full = f"decoder.layers.{layer}.{module}"
            if any(t == name or fnmatch.fnmatch(full, t) or fnmatch.fnmatch(f"module.{full}", t) for t in targets):
                wrapped.append(features)
    return wrapped


def adapter_parameters(shape: Shape, targets: list[str], rank: int, dora: bool = False) -> int:
    """LoRA's A (in x rank) and B (rank x out) per wrapped linear; DoRA adds a magnitude per output feature."""
    return sum(rank * (i + o) + (o if dora else 0) for i, o in adapted_linears(shape, targets))


@dataclass(frozen=True)
class Memory:
    """A rough budget of one GPU in bytes: bf16 weights, fp32 gradients, the optimizer's fp32 master copy and two
    Adam moments sharded over data parallelism (Megatron's distributed optimizer), activations kept for the backward
    pass without recomputation, and the logits of one micro-batch. CUDA context, NCCL buffers and the allocator's
    fragmentation come on top."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def line(self) -> str:
        parts = ("weights", "gradients", "optimizer", "activations", "logits")
        return " + ".join(f"{getattr(self, p) / GIB:,.1f} {p}" for p in parts) + f" = {self.total / GIB:,.1f} GiB"


def memory_per_gpu(
    shape: Shape,
    parameters: int,
    trained: int,
    vocab_size: int | None,
    micro_batch_size: int,
    seq_length: int,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    data_parallel_size: int,
) -> Memory:
    """Activations: s·b·h·L·(10 + 24/TP) bytes, Korthikanti et al. 2022 ("Reducing Activation Recomputation in
    Large Transformer Models") with 16-bit activations and attention that keeps no s x s scores (SDPA, flash); the
    first pipeline stage holds PP micro-batches of L/PP layers, as much as L layers of one. Logits: bf16 and the
    fp32 copy of the loss, b·s·V·6/TP bytes."""
    model_parallel = tensor_parallel_size * pipeline_parallel_size
    s, b, h, n = seq_length, micro_batch_size, shape.hidden_size, shape.num_layers
    return Memory(
        weights=2 * parameters / model_parallel,
        gradients=4 * trained / model_parallel,
        optimizer=12 * trained / model_parallel / data_parallel_size,
        activations=s * b * h * n * (10 + 24 / tensor_parallel_size),
        logits=b * s * (vocab_size or 0) * 6 / tensor_parallel_size,
    )
