import os

# Triton kernels (GPU issue) run in interpreter mode on CPU-only machines; this must be set
# before any @triton.jit function is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
