"""soupkern: fast, bounded-memory model soups over memory-mapped safetensors.

Importing soupkern is cheap: it loads neither torch, triton nor CUDA and touches no device.
"""

from soupkern.backends import BackendStatus, available_backends, get_backend
from soupkern.errors import (
    BackendUnavailableError,
    HeaderError,
    InputError,
    MismatchError,
    OutputError,
    SoupkernError,
)
from soupkern.recipes import SoupReport, uniform_soup, uniform_state_dict, weighted_soup, weighted_state_dict

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "BackendUnavailableError",
    "HeaderError",
    "InputError",
    "MismatchError",
    "OutputError",
    "SoupReport",
    "SoupkernError",
    "__version__",
    "available_backends",
    "get_backend",
    "uniform_soup",
    "uniform_state_dict",
    "weighted_soup",
    "weighted_state_dict",
]
