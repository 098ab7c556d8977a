"""The values some flags accept (validated in checks.py, shown in --help)."""

from __future__ import annotations

import logging

log = logging.getLogger("peft_megatron")


PEFT_SCHEMES = ("lora", "dora")  # what NeMo 2.7.3's finetune_recipe accepts (besides None for full fine-tuning)
PROFILER_FLAGS = ("enable_memory_profile", "enable_pytorch_profiler", "enable_nsys_callback")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EXECUTORS = ("local", "slurm")
CORE_ATTENTION = ("sdpa", "unfused")  # without TE: sdpa_attention.py, or Megatron's local DotProductAttention
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")  # NeMo 2.7.3 LoRA's names of the linears


def lora_targets(text: str | None) -> list[str] | None:
    """--lora_target_modules as NeMo's LoRA takes it (None: NeMo's default)."""
    return None if text is None else [name.strip() for name in text.split(",") if name.strip()]
