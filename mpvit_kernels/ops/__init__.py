"""One module per op family: torch.library registration, fake, autograd and backend choice."""
from mpvit_kernels.ops.affine_hswish import affine_hswish

__all__ = ["affine_hswish"]
