"""soupkern: fast, bounded-memory model soups over memory-mapped safetensors.

Recipes: uniform / weighted (file to file or in memory), greedy, learned, logit ensembles,
analysis of ingredient deltas; see README.md for their exact specifications. Ingredients are any
tensor source: safetensors files or folders, PyTorch pickles, DCP folders, in-memory state dicts
or modules (soupkern.io.open_checkpoint).

Importing soupkern is cheap: it loads neither torch, triton, numpy nor CUDA and touches no device.
"""

from typing import Any

from soupkern.backends import BackendStatus, available_backends, get_backend
from soupkern.errors import (
    BackendUnavailableError,
    HeaderError,
    InputError,
    Interrupted,
    MismatchError,
    OutputError,
    SoupkernError,
)
from soupkern.io.sources import renamed
from soupkern.recipes import SoupReport, uniform_soup, uniform_state_dict, weighted_soup, weighted_state_dict

__version__ = "0.1.0"

# Names resolved on first use, so `import soupkern` (and every command's start-up) stays cheap: modules
# that import torch at load time, and recipes a file-to-file soup does not need.
_LAZY = {
    "EnsembleResult": "soupkern.recipes.ensemble",
    "greedy_ensemble": "soupkern.recipes.ensemble",
    "ingredient_outputs": "soupkern.recipes.ensemble",
    "logit_ensemble": "soupkern.recipes.ensemble",
    "GreedyResult": "soupkern.recipes.greedy",
    "GreedyStep": "soupkern.recipes.greedy",
    "greedy_soup": "soupkern.recipes.greedy",
    "Evaluator": "soupkern.evaluate",
    "learned_soup": "soupkern.recipes.learned",
    "LearnedSoupResult": "soupkern.recipes.learned",
    "delta_gram": "soupkern.analysis",
    "interpolation_curve": "soupkern.analysis",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'soupkern' has no attribute {name!r}")

__all__ = [
    "BackendStatus",
    "EnsembleResult",
    "Evaluator",
    "GreedyResult",
    "GreedyStep",
    "LearnedSoupResult",
    "BackendUnavailableError",
    "HeaderError",
    "InputError",
    "Interrupted",
    "MismatchError",
    "OutputError",
    "SoupReport",
    "SoupkernError",
    "__version__",
    "available_backends",
    "delta_gram",
    "get_backend",
    "greedy_ensemble",
    "greedy_soup",
    "ingredient_outputs",
    "interpolation_curve",
    "learned_soup",
    "logit_ensemble",
    "renamed",
    "uniform_soup",
    "uniform_state_dict",
    "weighted_soup",
    "weighted_state_dict",
]
