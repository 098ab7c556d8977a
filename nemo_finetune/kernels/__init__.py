"""Attention kernels the pinned Megatron-Core lacks without TE or flash-attn: SDPA core attention for training
(sdpa_attention) and paged decode attention for generation in Triton (paged_attention)."""
