from .attention import fused_attention
from .superpose import superpose, superpose_backward, superpose_forward

__all__ = ["superpose", "superpose_forward", "superpose_backward", "fused_attention"]
