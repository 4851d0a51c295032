from mpvit_kernels.models.mpvit import MPViT, load_checkpoint, mpvit_base, mpvit_small, mpvit_tiny, mpvit_xsmall

__all__ = ["MPViT", "load_checkpoint", "mpvit_tiny", "mpvit_xsmall", "mpvit_small", "mpvit_base"]
