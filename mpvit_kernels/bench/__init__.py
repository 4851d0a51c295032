"""The speed report: ``python -m mpvit_kernels.bench``."""
