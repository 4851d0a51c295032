"""One module per op family: torch.library registration, fake, autograd and backend choice."""
from mpvit_kernels.ops.affine_hswish import affine_hswish
from mpvit_kernels.ops.depthwise import depthwise
from mpvit_kernels.ops.dwconv_bn import dwconv_bn, dwconv_bn_train
from mpvit_kernels.ops.factor_attention import crpe_packing, factor_attention
from mpvit_kernels.ops.gli_projection import gli_projection, gli_projection_train
from mpvit_kernels.ops.linear import linear, linear_mlp, linear_proj_mlp
from mpvit_kernels.ops.residual_layernorm import residual_layernorm

__all__ = ["affine_hswish", "crpe_packing", "depthwise", "dwconv_bn", "dwconv_bn_train", "factor_attention",
           "gli_projection", "gli_projection_train", "linear", "linear_mlp", "linear_proj_mlp", "residual_layernorm"]
