"""Custom kernels for hot operations, each next to its pure-MLX twin.

Every kernel here has a reference implementation in plain MLX ops with the same signature; the
kernel is used only where it exists (``mx.fast.cuda_kernel`` on MLX's CUDA backend) and tests
compare the two. Everywhere else the twin runs.
"""
