"""Validation of the arguments every recipe shares, done before any input byte is read for work
and before the first evaluation: each failure is an InputError with a one-line message."""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Mapping, Sequence

from soupkern.errors import InputError

MIN_BUDGET_BYTES = 1 << 20


def ingredient_paths(ingredients: object, what: str = "ingredients") -> list[str]:
    """A list of paths (str, bytes or os.PathLike) as text. A single path is refused, not iterated
    character by character."""
    if isinstance(ingredients, (str, bytes)) or hasattr(ingredients, "__fspath__"):
        raise InputError(f"{what} must be a list of paths, got the single path {ingredients!r}; wrap it in a list")
    if isinstance(ingredients, Mapping) or not isinstance(ingredients, (Sequence, list, tuple)):
        raise InputError(f"{what} must be a list of paths, got {type(ingredients).__name__}")
    out = []
    for p in ingredients:
        if not (isinstance(p, (str, bytes)) or hasattr(p, "__fspath__")):
            raise InputError(f"{what}: {_short(p)} ({type(p).__name__}) is not a path, state dict or module")
        text = os.fsdecode(os.fspath(p))
        if not text or "\0" in text:
            raise InputError(f"{what}: {p!r} is not a usable path")
        out.append(text)
    if not out:
        raise InputError("a soup needs at least one ingredient")
    return out


def ingredient_list(ingredients: object, what: str = "ingredients") -> list[Any]:
    """Ingredients as given: paths (as text; see `ingredient_paths`) and in-memory state dicts or
    nn.Modules, in order. A single path or a single state dict is refused, not iterated."""
    from soupkern.io.sources import is_in_memory

    if isinstance(ingredients, (str, bytes)) or hasattr(ingredients, "__fspath__"):
        raise InputError(f"{what} must be a list, got the single path {ingredients!r}; wrap it in a list")
    if is_in_memory(ingredients):
        raise InputError(f"{what} must be a list, got a single {type(ingredients).__name__}; wrap it in a list")
    if not isinstance(ingredients, (Sequence, list, tuple)):
        raise InputError(f"{what} must be a list of paths, state dicts or modules, got {type(ingredients).__name__}")
    from soupkern.io.sources import Renamed

    out: list[Any] = []
    for x in ingredients:
        if isinstance(x, Renamed):
            ingredient_list([x.source], what)
            out.append(x)
        else:
            out.append(x if is_in_memory(x) else ingredient_paths([x], what)[0])
    if not out:
        raise InputError("a soup needs at least one ingredient")
    return out


def _short(x: object) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def coefficient_vector(coefficients: object, k: int) -> tuple[float, ...]:
    """K finite real numbers in a definite order (a list, tuple or 1-d array), each finite in
    float32, the precision the kernels multiply in."""
    if isinstance(coefficients, (str, bytes, set, frozenset, Mapping)) or not hasattr(coefficients, "__len__") \
            or not hasattr(coefficients, "__iter__"):
        raise InputError(f"coefficients must be an ordered sequence of numbers (a list), got {type(coefficients).__name__}")
    values = list(coefficients)  # type: ignore[call-overload]
    if len(values) != k:
        raise InputError(f"{len(values)} coefficients given for {k} ingredients")
    out = []
    for c in values:
        if isinstance(c, bool) or not isinstance(c, numbers.Real):
            raise InputError(f"coefficients must be real numbers, got {c!r}")
        f = float(c)
        if not math.isfinite(f):
            raise InputError(f"coefficients must be finite numbers, got {f}")
        if abs(f) > 3.4028234663852886e38:
            raise InputError(f"coefficient {f} overflows float32, the precision the kernels multiply in")
        out.append(f)
    return tuple(out)


def check_budget(budget_bytes: object, name: str = "budget_bytes") -> int:
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, numbers.Integral):
        raise InputError(f"{name} must be an integer number of bytes, got {budget_bytes!r}")
    if budget_bytes < MIN_BUDGET_BYTES:
        raise InputError(f"{name} must be at least {MIN_BUDGET_BYTES} bytes (1 MiB), got {budget_bytes}")
    return int(budget_bytes)


def check_shard_size(max_shard_size: object) -> int | None:
    if max_shard_size is not None and (isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int)
                                       or max_shard_size <= 0):
        raise InputError(f"max_shard_size must be a positive number of bytes, got {max_shard_size!r}")
    return max_shard_size  # type: ignore[return-value]


def check_divisor(divisor: object) -> float:
    if isinstance(divisor, bool) or not isinstance(divisor, numbers.Real) or not 0 < float(divisor) < float("inf"):
        raise InputError(f"divisor must be a positive finite number, got {divisor!r}")
    return float(divisor)


def check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be True or False, got {value!r}")
    return value


def check_device(device: object) -> Any:
    """A usable torch.device from a string or torch.device; InputError for a malformed name or a
    device this machine does not have."""
    import torch

    if not isinstance(device, (str, torch.device)):
        raise InputError(f"device must be a string such as 'cuda' or 'cpu', got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise InputError(f"device {device!r} is not a torch device ({str(e).splitlines()[0]})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r}: no CUDA GPU is usable here (torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise InputError(f"device {device!r}: no {dev.type} device is usable here")
    return dev


READS = ("auto", "map", "copy")


def reads_mode(reads: str | None) -> str:
    """How a file-to-file soup reads its mapped inputs: `reads`, or $SOUPKERN_READS, or "auto";
    InputError naming the setting when it is not one of READS."""
    mode = reads if reads is not None else (os.environ.get("SOUPKERN_READS") or "auto")
    if mode not in READS:
        source = "reads" if reads is not None else "SOUPKERN_READS"
        raise InputError(f"{source} must be one of {', '.join(READS)}, got {mode!r}")
    return mode
