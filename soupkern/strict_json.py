"""Strict JSON for metadata and reports: NaN and ±Infinity (which `json.dumps` writes as the
non-JSON tokens NaN/Infinity) become null; everything else is unchanged."""

from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (recursively through dicts, lists, tuples)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """json.dumps that always produces strict JSON (non-finite floats written as null)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
