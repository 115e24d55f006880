"""Compute kernels beyond the streaming weighted sum (Triton on GPU with a torch path on CPU).

Modules here import torch (and triton when installed) at import time; soupkern/__init__.py does
not import them.
"""
