"""Triton kernels (GPU; CPU tests run them under TRITON_INTERPRET=1). Importing this package imports nothing else."""
