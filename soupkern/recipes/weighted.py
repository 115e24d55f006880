"""Uniform and weighted soups, file to file (streaming) or into an in-memory state dict.

Recipe (the exact-arithmetic contract, csrc/soupkern.h): out = round((sum_k c_k * x_k) / d) per
tensor, k in the order given, fp64 accumulation with fma, one IEEE division when d != 1, one
rounding to the output dtype (round to nearest even). Uniform: c_k = 1, d = K. Coefficients may
have any sign and need not sum to 1 (WiSE-FT interpolation, task arithmetic). Provenance recorded
in the output's __metadata__: soupkern.version, .recipe, .ingredients, .coefficients, .divisor
(when not 1), .backend, .keys.
"""

from __future__ import annotations

import functools
import inspect
import os
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar, Union

from soupkern.backends import DEVICE_BACKENDS, get_backend, requested_backend
from soupkern.engine import DEFAULT_BUDGET_BYTES, execute, fill_tensor, staging_bytes_for
from soupkern import strict_json
from soupkern.errors import InputError
from soupkern.io import Checkpoint, SoupWriter, open_checkpoint, plan_output
from soupkern.io.writer import check_metadata
from soupkern.options import (check_budget, check_device, check_divisor, check_flag, check_shard_size,
                              coefficient_vector, ingredient_paths)
from soupkern.plan import KeyPolicy, SoupPlan, build_plan, normalize_dtype

if TYPE_CHECKING:
    import torch

    from soupkern.backends.device import DeviceKernels

PathLike = str | os.PathLike[str]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class SoupReport:
    """What a file-to-file soup did."""

    paths: tuple[Path, ...]
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    backend: str
    coefficients: tuple[float, ...]

    @property
    def gb_per_s(self) -> float:
        return (self.bytes_read + self.bytes_written) / max(self.seconds, 1e-9) / 1e9


def _version() -> str:
    from soupkern import __version__

    return __version__


Coefficients = Union[Sequence[float], Mapping[str, Sequence[float]]]
"""One vector for every tensor, or tensor name -> vector (others: `default`, else uniform 1/K)."""


def _plan(checkpoints: list[Checkpoint], coefficients: Coefficients, default: Sequence[float] | None,
          dtype: str | None, keys: KeyPolicy, divisor: float = 1.0) -> SoupPlan:
    if isinstance(coefficients, Mapping):
        k = len(checkpoints)
        if not all(isinstance(n, str) for n in coefficients):
            raise InputError("per-tensor coefficients must map tensor names (str) to vectors")
        fallback = default if default is not None else [1.0 / k] * k
        return build_plan(checkpoints, fallback, dtype=dtype, keys=keys).with_per_tensor(coefficients)
    if default is not None:
        raise InputError("`default` applies only to per-tensor coefficients (a mapping)")
    return build_plan(checkpoints, coefficients, dtype=dtype, keys=keys, divisor=divisor)


def weighted_soup(
    ingredients: Sequence[PathLike],
    coefficients: Coefficients,
    out: PathLike,
    *,
    default: Sequence[float] | None = None,
    dtype: str | None = None,
    keys: KeyPolicy = "same",
    max_shard_size: int | None = None,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    backend: str | None = None,
    overwrite: bool = False,
    fsync: bool = False,
    progress: bool = False,
    recipe: str = "weighted",
    metadata: dict[str, str] | None = None,
    device: str | None = None,
    device_budget_bytes: int | None = None,
    divisor: float = 1.0,
) -> SoupReport:
    """Write (sum_k coefficients[k] * ingredients[k]) / divisor to `out`, streaming with bounded
    memory, under the exact-arithmetic contract (fp64 accumulation in input order, one IEEE
    division when divisor != 1, one rounding to the output dtype; see csrc/soupkern.h).

    `coefficients` may instead map tensor names to vectors (per-tensor soups such as the by-layer
    learned soup); unnamed tensors use `default` (uniform when None).

    Ingredients are safetensors files, sharded-checkpoint index files or folders. Every check
    (headers, names, shapes, dtypes, output path, disk space) runs before any output byte is
    written; the output appears only when complete (temporary file + rename). `max_shard_size`
    (bytes) makes `out` a folder of HF-style shards with an index. Peak memory is about
    `budget_bytes` plus the interpreter, whatever the model size.

    A device backend (backend="cuda" / "triton", or $SOUPKERN_BACKEND) or a `device` streams the
    soup through that device (soupkern/gpu_engine.py): pinned host buffers and
    `device_budget_bytes` (default 1 GiB) of device memory, same output bytes.
    """
    t0 = time.perf_counter()
    paths = ingredient_paths(ingredients)
    if not isinstance(coefficients, Mapping):
        coefficients = coefficient_vector(coefficients, len(paths))
    check_soup_options(budget_bytes=budget_bytes, dtype=dtype, keys=keys, max_shard_size=max_shard_size,
                       metadata=metadata, overwrite=overwrite, fsync=fsync)
    divisor = check_divisor(divisor)
    dev, kernels = _device_route(backend, device)
    kernel = get_backend(backend) if kernels is None else None
    kernel_name = kernels.name if kernels is not None else kernel.name  # type: ignore[union-attr]
    with ExitStack() as stack:
        checkpoints = [stack.enter_context(open_checkpoint(p)) for p in paths]
        plan = _plan(checkpoints, coefficients, default, dtype, keys, divisor)
        streamer = None
        if kernels is not None:
            if plan.per_tensor:
                raise InputError("per-tensor coefficients run on the host backends (cpp, torch), not through a device")
            from soupkern.gpu_engine import DEFAULT_DEVICE_BUDGET_BYTES, DeviceStreamer

            streamer = DeviceStreamer(plan, kernels, dev, budget_bytes=device_budget_bytes or DEFAULT_DEVICE_BUDGET_BYTES)
        meta = {
            "soupkern.version": _version(),
            "soupkern.recipe": recipe,
            "soupkern.ingredients": strict_json.dumps(paths),
            "soupkern.coefficients": strict_json.dumps(plan.coefficients_json()),
            **({"soupkern.divisor": repr(plan.divisor)} if plan.divisor != 1.0 else {}),
            "soupkern.backend": kernel_name,
            "soupkern.keys": keys,
            **(metadata or {}),
        }
        layout = plan_output([tp.out for tp in plan.tensors], out, meta, max_shard_size)
        inputs = [f.path for ck in checkpoints for f in ck.files] + [ck.path for ck in checkpoints]
        writer = SoupWriter(layout, inputs=inputs, staging_bytes=staging_bytes_for(budget_bytes),
                            overwrite=overwrite, fsync=fsync, verify=lambda: verify_inputs(checkpoints))
        with writer, _progress_bar(plan.bytes_read + plan.bytes_written, progress) as bar:
            if streamer is not None:
                streamer.to_writer(writer, host_budget_bytes=budget_bytes, progress=bar.update if bar else None)
            else:
                execute(plan, writer, kernel, budget_bytes=budget_bytes, progress=bar.update if bar else None)  # type: ignore[arg-type]
            paths = writer.commit()
    return SoupReport(tuple(paths), len(plan.tensors), plan.bytes_read, plan.bytes_written,
                      time.perf_counter() - t0, kernel_name, plan.effective_coefficients)


def verify_inputs(checkpoints: Sequence[Checkpoint]) -> None:
    """Before a commit: no input was truncated under its mapping or changed while being read."""
    for ck in checkpoints:
        ck.check_unchanged()


def check_soup_options(*, budget_bytes: object = DEFAULT_BUDGET_BYTES, dtype: object = None, keys: object = "same",
                       max_shard_size: object = None, metadata: object = None, overwrite: object = False,
                       fsync: object = False) -> None:
    """The cheap checks of the output options (no file is opened): InputError on the first bad one."""
    check_budget(budget_bytes)
    normalize_dtype(dtype)
    if not isinstance(keys, str) or keys not in ("same", "intersection"):
        raise InputError(f"keys must be 'same' or 'intersection', got {keys!r}")
    check_shard_size(max_shard_size)
    check_metadata(metadata)  # type: ignore[arg-type]
    check_flag(overwrite, "overwrite")
    check_flag(fsync, "fsync")


def _device_route(backend: str | None, device: object) -> tuple[object, DeviceKernels | None]:
    """(device, kernels) when the soup streams through a device, else (None, None)."""
    if backend is not None and not isinstance(backend, str):
        raise InputError(f"backend must be a name such as 'cpp', got {backend!r}")
    if device is not None:
        device = check_device(device)
    requested = requested_backend(backend)
    if device is None and requested not in DEVICE_BACKENDS:
        return None, None
    from soupkern.backends import load_backend
    from soupkern.backends.device import device_kernels

    if device is None:  # a device backend by name: its own device (Triton interpreted: cpu)
        device = str(getattr(load_backend(str(requested)), "device", "cuda"))
    return device, device_kernels(device, backend)


def reserve_output(out: PathLike | None):  # -> context manager
    """Hold `out`'s output lock for a recipe that evaluates before it writes (greedy, learned), so
    a second run on the same output is refused before any work; the final write reuses it."""
    if out is None:
        return nullcontext()
    from soupkern.io import atomic
    from soupkern.io.writer import output_target

    return atomic.output_reserved(output_target(out))


def reserves_output(fn: F) -> F:
    """Decorator: run a recipe while its `out` argument's output lock is held (`reserve_output`)."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        with reserve_output(sig.bind_partial(*args, **kwargs).arguments.get("out")):  # type: ignore[arg-type]
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def check_soup_output(
    ingredients: Sequence[PathLike],
    out: PathLike,
    *,
    dtype: str | None = None,
    keys: KeyPolicy = "same",
    max_shard_size: int | None = None,
    overwrite: bool = False,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    backend: str | None = None,
    device: object = None,
    fsync: bool = False,
    metadata: dict[str, str] | None = None,
) -> None:
    """Every check `weighted_soup` makes before writing, without writing: for recipes that do
    expensive work (evaluations, training) before they write, so bad input, a bad option or an
    unwritable output fails first. Raises what `weighted_soup` would raise."""
    paths = ingredient_paths(ingredients)
    check_soup_options(budget_bytes=budget_bytes, dtype=dtype, keys=keys, max_shard_size=max_shard_size,
                       metadata=metadata, overwrite=overwrite, fsync=fsync)
    _, kernels = _device_route(backend, device)
    if kernels is None:
        get_backend(backend)
    with ExitStack() as stack:
        checkpoints = [stack.enter_context(open_checkpoint(p)) for p in paths]
        k = len(checkpoints)
        plan = build_plan(checkpoints, [1.0 / k] * k, dtype=dtype, keys=keys)
        layout = plan_output([tp.out for tp in plan.tensors], out, metadata, max_shard_size)
        inputs = [f.path for ck in checkpoints for f in ck.files] + [ck.path for ck in checkpoints]
        SoupWriter(layout, inputs=inputs, staging_bytes=1, overwrite=overwrite).check()


def uniform_soup(ingredients: Sequence[PathLike], out: PathLike, **kwargs: object) -> SoupReport:
    """The uniform soup of `ingredients` written to `out`: the fp64 sum of the inputs in input
    order, divided once by K, rounded once (csrc/soupkern.h); options as `weighted_soup`."""
    ingredients = ingredient_paths(ingredients)
    k = len(ingredients)
    kwargs.setdefault("recipe", "uniform")
    return weighted_soup(ingredients, [1.0] * k, out, divisor=k, **kwargs)  # type: ignore[arg-type]


def weighted_state_dict(
    ingredients: Sequence[PathLike],
    coefficients: Coefficients,
    *,
    default: Sequence[float] | None = None,
    dtype: str | None = None,
    keys: KeyPolicy = "same",
    backend: str | None = None,
    device: str | None = None,
    device_budget_bytes: int | None = None,
    divisor: float = 1.0,
) -> dict[str, torch.Tensor]:
    """sum_k coefficients[k] * ingredients[k] as an in-memory dict of torch tensors.

    Same arithmetic as `weighted_soup`; holds the whole result in memory (small models). With
    `device` (e.g. "cuda") the inputs stream through that device (pinned buffers,
    `device_budget_bytes` of working memory, default 1 GiB) and the result stays there, ready
    for evaluation; `backend` then names the device kernels ("cuda", "triton", "torch").
    Without it the result is on the CPU.
    """
    import torch

    from soupkern.torch_dtypes import TORCH_DTYPES

    ingredients = ingredient_paths(ingredients)
    if not isinstance(coefficients, Mapping):
        coefficients = coefficient_vector(coefficients, len(ingredients))
    check_soup_options(dtype=dtype, keys=keys)
    divisor = check_divisor(divisor)
    if backend is not None and not isinstance(backend, str):
        raise InputError(f"backend must be a name such as 'cpp', got {backend!r}")
    if device is not None:
        from soupkern.backends.device import device_kernels
        from soupkern.gpu_engine import DEFAULT_DEVICE_BUDGET_BYTES, DeviceStreamer

        device = check_device(device)
        kernels = device_kernels(device, backend)
        with ExitStack() as stack:
            checkpoints = [stack.enter_context(open_checkpoint(p)) for p in ingredients]
            plan = _plan(checkpoints, coefficients, default, dtype, keys, divisor)
            if plan.per_tensor:
                raise InputError("per-tensor coefficients run on the host backends (cpp, torch), not through a device")
            streamer = DeviceStreamer(plan, kernels, device, budget_bytes=device_budget_bytes or DEFAULT_DEVICE_BUDGET_BYTES)
            return streamer.to_state_dict()
    kernel = get_backend(backend)
    result: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        checkpoints = [stack.enter_context(open_checkpoint(p)) for p in ingredients]
        plan = _plan(checkpoints, coefficients, default, dtype, keys, divisor)
        for tp in plan.tensors:
            t = torch.empty(tp.out.shape, dtype=TORCH_DTYPES[tp.out.dtype])
            fill_tensor(tp, plan.coefficients_for(tp.out.name), t.view(-1).view(torch.uint8).numpy(), kernel,
                        plan.divisor_for(tp.out.name))
            result[tp.out.name] = t
        verify_inputs(checkpoints)
    return result


def uniform_state_dict(ingredients: Sequence[PathLike], **kwargs: object) -> dict[str, torch.Tensor]:
    """The uniform soup as an in-memory state dict; options as `weighted_state_dict`."""
    ingredients = ingredient_paths(ingredients)
    k = len(ingredients)
    return weighted_state_dict(ingredients, [1.0] * k, divisor=k, **kwargs)  # type: ignore[arg-type]


def _progress_bar(total: int, enabled: bool):  # -> context manager yielding a tqdm or None
    if not enabled:
        return nullcontext()
    from tqdm import tqdm

    # disable=None: draw only on a terminal, so logs and pipes get no carriage-return noise
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="soup", dynamic_ncols=True,
                leave=False, disable=None)
