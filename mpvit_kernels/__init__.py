"""mpvit-kernels: fused GPU kernels for MPViT, with autograd, drop-in modules and a reference model."""
import torch  # noqa: F401  (loads libtorch before the extension)

from mpvit_kernels import ops, reference
from mpvit_kernels.backend import BACKENDS, clear_caches, extension_available, get_backend, use_backend
from mpvit_kernels.nn import (Conv2dBN, ConvPosEnc, ConvRelPosEnc, DWConv2dBN, FactorAttention, GLIProjection,
                              SyncBatchNorm2d, convert_sync_batchnorm)

from mpvit_kernels.fuse import fuse

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "Conv2dBN", "ConvPosEnc", "ConvRelPosEnc", "DWConv2dBN", "FactorAttention", "GLIProjection",
    "SyncBatchNorm2d", "clear_caches", "convert_sync_batchnorm", "extension_available", "fuse", "get_backend", "ops",
    "reference", "use_backend",
]
