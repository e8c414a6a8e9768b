import os
import sys
from pathlib import Path

# float32 is float32 on MLX's CUDA backend too (it computes float32 matmuls in TF32 by default,
# ~1e-3 relative error): the GPU tests compare float32 against outside references. MLX reads the
# variable once, at its first matmul. No effect on the CPU backend or Metal.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

# tests import their shared helpers as a plain module
sys.path.insert(0, str(Path(__file__).parent))
