"""The Triton kernels' entry points, in one namespace: what `cluster.kernels.gpu.for_tensor`
hands the model (importing this module imports Triton)."""

from cluster.kernels.gpu.attention import paged_decode_attention
from cluster.kernels.gpu.moe import fused_moe, fused_moe_fp8, moe_align
from cluster.kernels.gpu.norm_rope import add_rms_norm, qk_norm_rope_cache

__all__ = ["add_rms_norm", "fused_moe", "fused_moe_fp8", "moe_align", "paged_decode_attention", "qk_norm_rope_cache"]
