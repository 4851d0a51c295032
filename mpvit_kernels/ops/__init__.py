"""One module per op family: torch.library registration, fake, autograd and backend choice."""
from mpvit_kernels.ops.affine_hswish import affine_hswish
from mpvit_kernels.ops.depthwise import depthwise
from mpvit_kernels.ops.dwconv_bn import dwconv_bn
from mpvit_kernels.ops.factor_attention import factor_attention

__all__ = ["affine_hswish", "depthwise", "dwconv_bn", "factor_attention"]
