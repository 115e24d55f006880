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
import json
import logging
import os
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence, TypeVar, Union

from soupkern.backends import DEVICE_BACKENDS, get_backend, requested_backend
from soupkern.engine import DEFAULT_BUDGET_BYTES, execute, fill_many, staging_bytes_for
from soupkern import strict_json
from soupkern.errors import InputError, OutputError
from soupkern.io import Checkpoint, SoupWriter, open_checkpoint, plan_output
from soupkern.io.writer import check_metadata
from soupkern.io.sources import labels
from soupkern.options import (check_budget, check_device, check_divisor, check_flag, check_shard_size,
                              coefficient_vector, ingredient_list, reads_mode)
from soupkern.plan import KeyPolicy, SoupPlan, build_plan, normalize_dtype

if TYPE_CHECKING:
    import torch

    from soupkern.backends.device import DeviceKernels

log = logging.getLogger("soupkern")
PathLike = str | os.PathLike[str]
Ingredient = Union[PathLike, Mapping[str, Any], Any]
"""A path (safetensors file, index or folder; PyTorch pickle; DCP folder), an in-memory state
dict, or an nn.Module (soupkern.io.open_checkpoint)."""
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
          dtype: str | None, keys: KeyPolicy, divisor: float = 1.0, int_policy: str = "auto",
          lora: str = "refuse") -> SoupPlan:
    if isinstance(coefficients, Mapping):
        k = len(checkpoints)
        if not all(isinstance(n, str) for n in coefficients):
            raise InputError("per-tensor coefficients must map tensor names (str) to vectors")
        fallback = default if default is not None else [1.0 / k] * k
        return build_plan(checkpoints, fallback, dtype=dtype, keys=keys, int_policy=int_policy,
                          lora=lora).with_per_tensor(coefficients)
    if default is not None:
        raise InputError("`default` applies only to per-tensor coefficients (a mapping)")
    return build_plan(checkpoints, coefficients, dtype=dtype, keys=keys, divisor=divisor, int_policy=int_policy,
                      lora=lora)


def open_ingredients(stack: ExitStack, items: Sequence[Any], state_dict_key: str | None = None) -> list[Checkpoint]:
    """Open every ingredient (any source) inside `stack`; in-memory ones are named by `labels`."""
    if state_dict_key is not None and not isinstance(state_dict_key, str):
        raise InputError(f"state_dict_key must be a string, got {state_dict_key!r}")
    checkpoints = [stack.enter_context(open_checkpoint(x, state_dict_key=state_dict_key, label=label))
                   for x, label in zip(items, labels(items))]
    if state_dict_key is not None and not any(ck.key_used for ck in checkpoints):
        raise InputError(f"state_dict_key / --state-dict-key {state_dict_key!r} picks an entry of a PyTorch pickle, "
                         "DCP folder or in-memory container, and no ingredient is one (safetensors files hold one "
                         "flat state dict)")
    return checkpoints


def _with_base(items: list[Any], coefficients: Coefficients, base: Any, divisor: float) -> tuple[list[Any], Any]:
    """[base, *items] and [1 − Σc, *c]: base + Σ c_k (x_k − base) as one weighted sum."""
    import math

    if isinstance(coefficients, Mapping):
        raise InputError("base= applies to one coefficient vector, not per-tensor coefficients")
    if divisor != 1.0:
        raise InputError("base= computes base + Σ c_k (x_k − base); a divisor has no meaning there")
    base_item = ingredient_list([base], "base")[0]
    return [base_item, *items], (1.0 - math.fsum(coefficients), *coefficients)


def _same_twice(items: Sequence[Any], checkpoints: Sequence[Checkpoint], single: bool = True) -> None:
    """Notices for soups that are probably mistakes: one ingredient (when `single`), or one
    given twice."""
    from soupkern.io.sources import is_in_memory

    if single and len(items) == 1:
        log.warning("a soup of one ingredient is that ingredient (converted to the output dtype)")
    seen: dict[object, str] = {}
    for x, ck in zip(items, checkpoints):
        key: object = id(x) if is_in_memory(x) else os.path.realpath(ck.path)
        if key in seen:
            log.warning("%s is given more than once: it counts once per mention", ck.path)
        seen[key] = ck.path


def input_files(checkpoints: Sequence[Checkpoint]) -> list[str]:
    """The files and folders read, which an output may not replace."""
    return [f.path for ck in checkpoints for f in ck.files] + [ck.path for ck in checkpoints if ck.files]


def weighted_soup(
    ingredients: Sequence[Ingredient],
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
    state_dict_key: str | None = None,
    copy_from: PathLike | None = None,
    allow_config_mismatch: bool = False,
    int_policy: str = "auto",
    out_format: str = "safetensors",
    lora: str = "refuse",
    base: Ingredient | None = None,
    distributed: bool = False,
) -> SoupReport:
    """Write (sum_k coefficients[k] * ingredients[k]) / divisor to `out`, streaming with bounded
    memory, under the exact-arithmetic contract (fp64 accumulation in input order, one IEEE
    division when divisor != 1, one rounding to the output dtype; see csrc/soupkern.h).

    `coefficients` may instead map tensor names to vectors (per-tensor soups such as the by-layer
    learned soup); unnamed tensors use `default` (uniform when None).

    Ingredients are any tensor source (soupkern.io.open_checkpoint): safetensors files, indexes
    or folders, PyTorch pickles, DCP folders, in-memory state dicts or modules; `state_dict_key`
    names the state dict inside a pickle or DCP container. Every check
    (headers, names, shapes, dtypes, output path, disk space) runs before any output byte is
    written; the output appears only when complete (temporary file + rename). `max_shard_size`
    (bytes) makes `out` a folder of HF-style shards with an index. Peak memory is about
    `budget_bytes` plus the interpreter, whatever the model size.

    A device backend (backend="cuda" / "triton", or $SOUPKERN_BACKEND) or a `device` streams the
    soup through that device (soupkern/gpu_engine.py): pinned host buffers and
    `device_budget_bytes` (default 1 GiB) of device memory, same output bytes.

    A folder output from model-folder ingredients is a model folder (soupkern/model_folder.py):
    the non-weight files of `copy_from`, else of the first ingredient folder, and a model card,
    after checking that the ingredients' configs agree on the architecture (unless
    `allow_config_mismatch`). Integer tensors that differ between ingredients: `int_policy`
    (soupkern.plan._combine; "auto" takes the maximum of 0-dim counters, refuses the rest).

    `distributed=True`: called by every rank of an initialized torch.distributed process group,
    the ranks split the output shards among them (soupkern/distributed.py); the same bytes.

    `base` (task vectors, WiSE-FT): out = base + Σ_k c_k (ingredient_k − base), computed as the
    weighted sum of [base, *ingredients] with coefficients [1 − Σ c_k, *c] (same contract; the
    base's coefficient is the fp64 `math.fsum` complement); `soupkern.base` names it.

    `out_format="dcp"` writes `out` as a PyTorch Distributed Checkpoint folder (one process,
    `torch.distributed.checkpoint.save` with no process group; `soupkern_provenance.json` holds
    the provenance), computed in memory first: it needs the soup's size in RAM.
    """
    t0 = time.perf_counter()
    items = ingredient_list(ingredients)
    if not isinstance(coefficients, Mapping):
        coefficients = coefficient_vector(coefficients, len(items))
    if base is not None:
        items, coefficients = _with_base(items, coefficients, base, divisor)
        metadata = {**(metadata or {}), "soupkern.base": labels(items[:1])[0]}
    check_soup_options(budget_bytes=budget_bytes, dtype=dtype, keys=keys, max_shard_size=max_shard_size,
                       metadata=metadata, overwrite=overwrite, fsync=fsync)
    divisor = check_divisor(divisor)
    if out_format not in ("safetensors", "dcp"):
        raise InputError(f"out_format must be 'safetensors' or 'dcp', got {out_format!r}")
    dev, kernels = _device_route(backend, device)
    kernel = get_backend(backend) if kernels is None else None
    kernel_name = kernels.name if kernels is not None else kernel.name  # type: ignore[union-attr]
    if lora == "concat":
        if isinstance(coefficients, Mapping) or out_format != "safetensors" or kernels is not None \
                or dtype is not None or max_shard_size is not None:
            raise InputError("lora='concat' takes one coefficient vector and writes one safetensors adapter folder "
                             "in the adapters' dtype (no dtype, max_shard_size, device or DCP output)")
        from soupkern.lora import concat_soup

        paths, count, read, written = concat_soup(items, [c / divisor for c in coefficients], out, overwrite=overwrite,
                                                  fsync=fsync, metadata=metadata)
        return SoupReport(tuple(paths), count, read, written, time.perf_counter() - t0, "torch",
                          tuple(c / divisor for c in coefficients))
    from soupkern import distributed as spmd

    group = spmd.group_for(check_flag(distributed, "distributed"))
    if group is not None:
        if out_format == "dcp":
            if max_shard_size is not None or kernels is not None:
                raise InputError("a DCP output is laid out by torch.distributed.checkpoint and computed on the host: "
                                 "no max_shard_size or device")
            return _spmd_dcp(group, t0, items, coefficients, out, default=default, dtype=dtype, keys=keys, kernel=kernel,
                             overwrite=overwrite, fsync=fsync, recipe=recipe, metadata=metadata, divisor=divisor,
                             state_dict_key=state_dict_key, copy_from=copy_from,
                             allow_config_mismatch=allow_config_mismatch, int_policy=int_policy, lora=lora)
        return _spmd_soup(group, t0, items, coefficients, out, default=default, dtype=dtype, keys=keys,
                          max_shard_size=max_shard_size, budget_bytes=budget_bytes, kernel=kernel, kernels=kernels,
                          device=dev, device_budget_bytes=device_budget_bytes, overwrite=overwrite,
                          fsync=fsync, recipe=recipe, metadata=metadata, divisor=divisor, state_dict_key=state_dict_key,
                          copy_from=copy_from, allow_config_mismatch=allow_config_mismatch, int_policy=int_policy,
                          lora=lora)
    with ExitStack() as stack:
        checkpoints = open_ingredients(stack, items, state_dict_key)
        plan = _plan(checkpoints, coefficients, default, dtype, keys, divisor, int_policy, lora)
        streamer = None
        if kernels is not None:
            from soupkern.gpu_engine import DEFAULT_DEVICE_BUDGET_BYTES, DeviceStreamer

            streamer = DeviceStreamer(plan, kernels, dev, budget_bytes=device_budget_bytes or DEFAULT_DEVICE_BUDGET_BYTES)
        meta = _provenance(items, plan, recipe=recipe, backend=kernel_name, keys=keys, state_dict_key=state_dict_key,
                           metadata=metadata)
        if out_format == "dcp":
            if max_shard_size is not None or streamer is not None:
                raise InputError("a DCP output is written by one process from memory: no max_shard_size or device")
            paths = _dcp_out(plan, items, checkpoints, kernel, out, meta, recipe=recipe, overwrite=overwrite,
                             fsync=fsync, copy_from=copy_from, allow_config_mismatch=allow_config_mismatch)
            return SoupReport(tuple(paths), len(plan.tensors), plan.bytes_read, plan.bytes_written,
                              time.perf_counter() - t0, kernel_name, plan.effective_coefficients)
        layout, extra = _layout(plan, items, out, meta, max_shard_size, recipe=recipe, copy_from=copy_from,
                                allow_config_mismatch=allow_config_mismatch)
        writer = SoupWriter(layout, inputs=input_files(checkpoints), staging_bytes=staging_bytes_for(budget_bytes),
                            overwrite=overwrite, fsync=fsync, verify=lambda: verify_inputs(checkpoints),
                            extra_files=extra)
        with writer, _progress_bar(plan.bytes_read + plan.bytes_written, progress) as bar:
            _same_twice(items, checkpoints, single=recipe in ("uniform", "weighted"))  # after every check
            if streamer is not None:
                streamer.to_writer(writer, host_budget_bytes=budget_bytes, progress=bar.update if bar else None)
            else:
                execute(plan, writer, kernel, budget_bytes=budget_bytes, progress=bar.update if bar else None)  # type: ignore[arg-type]
            paths = writer.commit()
    return SoupReport(tuple(paths), len(plan.tensors), plan.bytes_read, plan.bytes_written,
                      time.perf_counter() - t0, kernel_name, plan.effective_coefficients)


def _provenance(items: Sequence[Any], plan: SoupPlan, *, recipe: str, backend: str, keys: str,
                state_dict_key: str | None, metadata: Mapping[str, str] | None, world_size: int = 1) -> dict[str, str]:
    """What a soup's `__metadata__` records about how it was made."""
    return {
        "soupkern.version": _version(),
        "soupkern.recipe": recipe,
        "soupkern.ingredients": strict_json.dumps(labels(items)),
        "soupkern.coefficients": strict_json.dumps(plan.coefficients_json()),
        **({"soupkern.divisor": repr(plan.divisor)} if plan.divisor != 1.0 else {}),
        "soupkern.backend": backend,
        "soupkern.keys": keys,
        **({"soupkern.state_dict_key": state_dict_key} if state_dict_key is not None else {}),
        "soupkern.world_size": str(world_size),
        **(metadata or {}),
    }


def _plan_digest(checkpoints: Sequence[Checkpoint], plan: SoupPlan, layout: Any,
                 extra: Mapping[str, bytes] | None = None) -> str:
    """What every rank of a distributed soup must agree on, hashed: the output and its tensors,
    every shard's header, the companion files, each input file's size and modification time, and
    the coefficients."""
    import hashlib

    h = hashlib.sha256()
    h.update(os.fspath(layout.target).encode())
    for shard in layout.shards:
        h.update(shard.path.name.encode() + b"\0" + shard.header)
    for name in sorted(extra or {}):
        h.update(name.encode() + b"\0" + hashlib.sha256(extra[name]).digest())  # type: ignore[index]
    for ck in checkpoints:
        for f in ck.files:
            h.update(repr((f.path, getattr(f, "signature", (0, 0, 0, 0))[:2])).encode())
    h.update(repr([tp.out for tp in plan.tensors]).encode())
    h.update(repr((plan.coefficients, sorted(plan.per_tensor.items()), plan.divisor)).encode())
    return h.hexdigest()


def _spmd_soup(group: Any, t0: float, items: Sequence[Any], coefficients: Coefficients, out: PathLike, *,
               default: Sequence[float] | None, dtype: str | None, keys: KeyPolicy, max_shard_size: int | None,
               budget_bytes: int, kernel: Any, kernels: DeviceKernels | None, device: object,
               device_budget_bytes: int | None, overwrite: bool, fsync: bool, recipe: str,
               metadata: dict[str, str] | None, divisor: float, state_dict_key: str | None,
               copy_from: PathLike | None, allow_config_mismatch: bool, int_policy: str, lora: str) -> SoupReport:
    """`weighted_soup` by every rank of a process group (soupkern/distributed.py); with `kernels`
    each rank streams its shards through `device` (under torchrun "cuda" is GPU LOCAL_RANK)."""
    from soupkern.distributed import assign, check_same_plan
    from soupkern.io.writer import ShardWriter

    rank = group.rank
    backend_name = kernel.name if kernels is None else kernels.name
    with ExitStack() as stack:
        def plan_step() -> tuple[Any, ...]:
            checkpoints = open_ingredients(stack, items, state_dict_key)
            plan = _plan(checkpoints, coefficients, default, dtype, keys, divisor, int_policy, lora)
            meta = _provenance(items, plan, recipe=recipe, backend=backend_name, keys=keys, state_dict_key=state_dict_key,
                               metadata=metadata, world_size=group.world_size)
            layout, extra = _layout(plan, items, out, meta, max_shard_size, recipe=recipe, copy_from=copy_from,
                                    allow_config_mismatch=allow_config_mismatch)
            return checkpoints, plan, layout, extra

        checkpoints, plan, layout, extra = group.step(plan_step, "opening the ingredients and planning the soup")
        check_same_plan(group, _plan_digest(checkpoints, plan, layout, extra), "the output, ingredients, "
                        "coefficients or layout")
        owner = assign([shard.size for shard in layout.shards], group.world_size)
        mine = SoupPlan(tuple(tp for tp in plan.tensors if owner[layout.where[tp.out.name][0]] == rank),
                        plan.coefficients, plan.per_tensor, plan.divisor)
        writer = SoupWriter(layout, inputs=input_files(checkpoints), staging_bytes=staging_bytes_for(budget_bytes),
                            overwrite=overwrite, fsync=fsync, verify=lambda: verify_inputs(checkpoints),
                            extra_files=extra) if rank == 0 else None

        def enter() -> str | None:
            if writer is None:
                return None
            stack.enter_context(writer)  # checks, lock, temporary folder with every shard's header
            _same_twice(items, checkpoints, single=recipe in ("uniform", "weighted"))
            return os.fspath(writer.stage_folder if layout.folder else writer._stage)

        stage = group.broadcast(group.step(enter, "checking and creating the output"))

        def compute() -> None:
            if os.environ.get("SOUPKERN_TEST_KILL_RANK") == str(rank):  # private test hook: a rank dying mid-soup
                os.kill(os.getpid(), 9)
            log_to = os.environ.get("SOUPKERN_TEST_ACCESS_LOG")  # private test hook: the byte ranges each rank reads
            if log_to:
                from soupkern.io import reader

                reader.ACCESS_LOG = []
            slow = os.environ.get("SOUPKERN_TEST_SLOW_RANK", "").split(":")  # private test hook: "RANK:SECONDS"
            if len(slow) == 2 and slow[0] == str(rank):
                time.sleep(float(slow[1]))
            def run(target: Any) -> None:
                if kernels is None:
                    execute(mine, target, kernel, budget_bytes=budget_bytes)
                    return
                from soupkern.gpu_engine import DEFAULT_DEVICE_BUDGET_BYTES, DeviceStreamer

                streamer = DeviceStreamer(mine, kernels, device,
                                          budget_bytes=device_budget_bytes or DEFAULT_DEVICE_BUDGET_BYTES)
                streamer.to_writer(target, host_budget_bytes=budget_bytes)

            if writer is not None:
                run(writer)
            else:
                part = ShardWriter(layout, Path(stage), [i for i, r in enumerate(owner) if r == rank],
                                   staging_bytes_for(budget_bytes))
                try:
                    run(part)
                finally:
                    part.close(fsync)
            if log_to:
                from soupkern.io import reader

                Path(f"{log_to}.{rank}").write_text(json.dumps(reader.ACCESS_LOG))
                reader.ACCESS_LOG = None
            verify_inputs(checkpoints)

        group.step(compute, "computing its shards", long=True)
        group.step(lambda: writer.commit() if writer is not None else None, "committing the output")
    return SoupReport(tuple(layout.paths), len(plan.tensors), plan.bytes_read, plan.bytes_written,
                      time.perf_counter() - t0, backend_name, plan.effective_coefficients)


def _dcp_out(plan: SoupPlan, items: Sequence[Any], checkpoints: Sequence[Checkpoint], kernel: Any, out: PathLike,
             meta: Mapping[str, str], *, recipe: str, overwrite: bool, fsync: bool, copy_from: PathLike | None,
             allow_config_mismatch: bool, group: Any = None) -> list[Path]:
    """The soup as a DCP folder: computed in memory, saved into the writer's temporary folder,
    swapped in whole like any folder output. Under a process group (`group`), each rank computes
    the tensors `assign` gives it (balanced by bytes) and DCP's own collective save writes one
    `__RANK_0.distcp` per rank with tensors and rank 0 the `.metadata`; rank 0 checks the output,
    creates the temporary folder and commits, and every rank agrees on each step."""
    import json as _json
    import warnings

    import torch.distributed.checkpoint as dcp

    from soupkern import model_folder
    from soupkern.distributed import assign
    from soupkern.io.writer import PROVENANCE_NAME, folder_layout

    rank, world = (0, 1) if group is None else (group.rank, group.world_size)
    layout = folder_layout(out)
    extra = model_folder.folder_files(items, labels(items), recipe=recipe, coefficients=plan.coefficients_json(),
                                      divisor=plan.divisor, version=_version(), copy_from=copy_from,
                                      allow_config_mismatch=allow_config_mismatch)
    owner = assign([tp.out.nbytes for tp in plan.tensors], world)
    mine = SoupPlan(tuple(tp for tp, r in zip(plan.tensors, owner) if r == rank), plan.coefficients,
                    plan.per_tensor, plan.divisor)
    expected = {".metadata", *(f"__{r}_0.distcp" for r in range(world))}  # a rank with no tensor too
    writer = SoupWriter(layout, inputs=input_files(checkpoints), overwrite=overwrite, fsync=fsync,
                        verify=lambda: verify_inputs(checkpoints), extra_files=extra) if rank == 0 else None

    def agreed(fn: Callable[[], Any], what: str, long: bool = False) -> Any:
        return fn() if group is None else group.step(fn, what, long=long)

    with ExitStack() as stack:
        def enter() -> str | None:
            if writer is None:
                return None
            stack.enter_context(writer)  # checks, lock, temporary folder
            _same_twice(items, checkpoints, single=recipe in ("uniform", "weighted"))
            return os.fspath(writer.stage_folder)

        stage = agreed(enter, "checking and creating the output")
        if group is not None:
            stage = group.broadcast(stage)
        result = agreed(lambda: _on_host(mine, kernel, None), "computing its tensors", long=True)
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            # a collective under a process group: DCP raises on every rank when any rank fails
            dcp.save(result, storage_writer=dcp.FileSystemWriter(stage, sync_files=fsync, single_file_per_rank=True),
                     no_dist=group is None)

        def commit() -> list[str] | None:
            if writer is None:
                return None
            written = set(os.listdir(stage))
            if written - set(extra) != expected:
                raise OutputError(f"{layout.target}: torch.distributed.checkpoint wrote {sorted(written)}, not the "
                                  f"expected {sorted(expected)}; nothing was replaced")
            files = sorted({*expected, *extra})
            writer.add_file(PROVENANCE_NAME, (_json.dumps({"metadata": dict(meta), "files": files}, indent=2)
                                              + "\n").encode())
            writer.commit()
            return [*files, PROVENANCE_NAME]

        names = agreed(commit, "committing the output")
        if group is not None:
            names = group.broadcast(names)
    return [layout.target / name for name in sorted(names)]


def _spmd_dcp(group: Any, t0: float, items: Sequence[Any], coefficients: Coefficients, out: PathLike, *,
              default: Sequence[float] | None, dtype: str | None, keys: KeyPolicy, kernel: Any, overwrite: bool,
              fsync: bool, recipe: str, metadata: dict[str, str] | None, divisor: float, state_dict_key: str | None,
              copy_from: PathLike | None, allow_config_mismatch: bool, int_policy: str, lora: str) -> SoupReport:
    """A DCP output of `weighted_soup` by every rank of a process group (`_dcp_out`)."""
    from soupkern.distributed import check_same_plan
    from soupkern.io.writer import folder_layout

    with ExitStack() as stack:
        def plan_step() -> tuple[Any, ...]:
            checkpoints = open_ingredients(stack, items, state_dict_key)
            plan = _plan(checkpoints, coefficients, default, dtype, keys, divisor, int_policy, lora)
            meta = _provenance(items, plan, recipe=recipe, backend=kernel.name, keys=keys,
                               state_dict_key=state_dict_key, metadata=metadata, world_size=group.world_size)
            return checkpoints, plan, meta

        checkpoints, plan, meta = group.step(plan_step, "opening the ingredients and planning the soup")
        check_same_plan(group, _plan_digest(checkpoints, plan, folder_layout(out)),
                        "the output, ingredients or coefficients")
        paths = _dcp_out(plan, items, checkpoints, kernel, out, meta, recipe=recipe, overwrite=overwrite, fsync=fsync,
                         copy_from=copy_from, allow_config_mismatch=allow_config_mismatch, group=group)
    return SoupReport(tuple(paths), len(plan.tensors), plan.bytes_read, plan.bytes_written, time.perf_counter() - t0,
                      kernel.name, plan.effective_coefficients)


def _layout(plan: SoupPlan, items: Sequence[Any], out: PathLike, meta: Mapping[str, str], max_shard_size: int | None,
            *, recipe: str, copy_from: PathLike | None, allow_config_mismatch: bool) -> tuple[Any, dict[str, bytes]]:
    """The output layout and, for a folder output, the model folder's other files."""
    from soupkern import model_folder

    check_flag(allow_config_mismatch, "allow_config_mismatch")
    layout = plan_output([tp.out for tp in plan.tensors], out, meta, max_shard_size)
    if not layout.folder:
        if copy_from is not None:
            raise InputError("copy_from / --copy-from needs a folder output (-o DIR/ or --max-shard-size)")
        if not allow_config_mismatch:  # a file output too is refused for mismatched architectures
            model_folder.check_configs([f for f in map(model_folder.model_folder, items) if f is not None])
        return layout, {}
    float_dtypes = {tp.out.dtype for tp in plan.tensors if tp.average}
    extra = model_folder.folder_files(items, labels(items), recipe=recipe, coefficients=plan.coefficients_json(),
                                      divisor=plan.divisor, version=_version(), copy_from=copy_from,
                                      allow_config_mismatch=allow_config_mismatch,
                                      out_dtype=float_dtypes.pop() if len(float_dtypes) == 1 else None)
    if extra:
        layout = plan_output([tp.out for tp in plan.tensors], out, meta, max_shard_size, extra_names=list(extra))
    return layout, extra


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
    reads_mode(None)  # $SOUPKERN_READS


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


@contextmanager
def reserved_by_rank_0(out: PathLike | None, group: Any) -> Iterator[None]:
    """`reserve_output(out)`, held by rank 0 alone under a process group `group`; a refusal (a
    concurrent run holds the lock) is raised on every rank, before any evaluation."""
    with ExitStack() as stack:
        if group is None:
            stack.enter_context(reserve_output(out))
        else:
            group.on_rank_0(lambda: stack.enter_context(reserve_output(out)), "reserving the output")
        yield


def reserves_output(fn: F) -> F:
    """Decorator: run a recipe while its `out` argument's output lock is held (`reserve_output`;
    by rank 0 alone when the recipe runs with distributed=True in a process group)."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        from soupkern import distributed

        out = sig.bind_partial(*args, **kwargs).arguments.get("out")
        group = distributed.active() if kwargs.get("distributed") else None
        with reserved_by_rank_0(out, group):  # type: ignore[arg-type]
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def check_soup_output(
    ingredients: Sequence[Ingredient],
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
    state_dict_key: str | None = None,
    copy_from: PathLike | None = None,
    allow_config_mismatch: bool = False,
    int_policy: str = "auto",
    out_format: str = "safetensors",
    lora: str = "refuse",
) -> None:
    """Every check `weighted_soup` makes before writing, without writing: for recipes that do
    expensive work (evaluations, training) before they write, so bad input, a bad option or an
    unwritable output fails first. Raises what `weighted_soup` would raise."""
    items = ingredient_list(ingredients)
    check_soup_options(budget_bytes=budget_bytes, dtype=dtype, keys=keys, max_shard_size=max_shard_size,
                       metadata=metadata, overwrite=overwrite, fsync=fsync)
    _, kernels = _device_route(backend, device)
    if kernels is None:
        get_backend(backend)
    with ExitStack() as stack:
        checkpoints = open_ingredients(stack, items, state_dict_key)
        k = len(checkpoints)
        plan = build_plan(checkpoints, [1.0 / k] * k, dtype=dtype, keys=keys, int_policy=int_policy, lora=lora)
        if out_format == "dcp":
            from soupkern.io.writer import folder_layout

            if max_shard_size is not None:
                raise InputError("a DCP output is written by one process from memory: no max_shard_size")
            layout, extra = folder_layout(out), {}
        elif out_format == "safetensors":
            layout, extra = _layout(plan, items, out, metadata or {}, max_shard_size, recipe="check",
                                    copy_from=copy_from, allow_config_mismatch=allow_config_mismatch)
        else:
            raise InputError(f"out_format must be 'safetensors' or 'dcp', got {out_format!r}")
        SoupWriter(layout, inputs=input_files(checkpoints), staging_bytes=1, overwrite=overwrite,
                   extra_files=extra).check()


def uniform_soup(ingredients: Sequence[Ingredient], out: PathLike, **kwargs: object) -> SoupReport:
    """The uniform soup of `ingredients` written to `out`: the fp64 sum of the inputs in input
    order, divided once by K, rounded once (csrc/soupkern.h); options as `weighted_soup`."""
    ingredients = ingredient_list(ingredients)
    k = len(ingredients)
    kwargs.setdefault("recipe", "uniform")
    return weighted_soup(ingredients, [1.0] * k, out, divisor=k, **kwargs)  # type: ignore[arg-type]


def weighted_state_dict(
    ingredients: Sequence[Ingredient],
    coefficients: Coefficients,
    *,
    default: Sequence[float] | None = None,
    dtype: object = None,
    keys: KeyPolicy = "same",
    backend: str | None = None,
    device: object = None,
    device_budget_bytes: int | None = None,
    divisor: float = 1.0,
    out: Mapping[str, torch.Tensor] | torch.nn.Module | None = None,
    state_dict_key: str | None = None,
    int_policy: str = "auto",
    lora: str = "refuse",
    base: Ingredient | None = None,
) -> dict[str, torch.Tensor]:
    """(sum_k coefficients[k] * ingredients[k]) / divisor as a dict of torch tensors, under the
    same exact-arithmetic contract as `weighted_soup`.

    Ingredients are any source (paths of any format, in-memory state dicts, modules; a mix is
    fine). In-memory CPU tensors are read in place; the whole table of tensors is computed by
    one multi-tensor call of the C++ kernel. The result holds the whole soup in memory.

    `out`: a state dict or module whose tensors receive the soup in place (an SWA/EMA loop; no
    tensor is allocated where the target is contiguous, on the CPU, and does not partly overlap
    an input; exactly aliasing an input, as in `out=ingredients[0]`, is fine). It must hold
    every soup tensor with the same shape; its dtypes are the output dtypes. Returns its tensors.

    `base`: task vectors, as in `weighted_soup`.

    `device` (a string or torch.device) puts the result there, computed by that device's kernels
    (`backend`: "cuda", "triton", "torch"; device="cpu" means the torch kernels on the CPU):
    ingredients already on it in place, others streamed through it (pinned buffers,
    `device_budget_bytes` of working memory, default 1 GiB). Without `device`, the soup is
    computed where `out` or the in-memory ingredients live (the host kernels on the CPU).
    """
    import torch

    items = ingredient_list(ingredients)
    if not isinstance(coefficients, Mapping):
        coefficients = coefficient_vector(coefficients, len(items))
    if base is not None:
        items, coefficients = _with_base(items, coefficients, base, divisor)
    check_soup_options(dtype=dtype, keys=keys)
    divisor = check_divisor(divisor)
    if backend is not None and not isinstance(backend, str):
        raise InputError(f"backend must be a name such as 'cpp', got {backend!r}")
    targets = _out_tensors(out)
    if device is not None:
        device = torch.device(check_device(device))
    with ExitStack() as stack:
        checkpoints = open_ingredients(stack, items, state_dict_key)
        _same_twice(items, checkpoints)
        plan = _plan(checkpoints, coefficients, default, dtype, keys, divisor, int_policy, lora)
        if targets is not None:
            plan = _plan_into(plan, targets, dtype, keys)
        explicit = device is not None
        if device is None:
            device = _resident_device(checkpoints, targets)
        if explicit or device.type != "cpu" or requested_backend(backend) in DEVICE_BACKENDS:
            result = _on_device(plan, checkpoints, device, backend, device_budget_bytes, targets)
        else:
            result = _on_host(plan, get_backend(backend), targets)
        verify_inputs(checkpoints)
        # in the first ingredient's order (a model's state_dict order), as torch would give it
        return {name: result[name] for name in checkpoints[0].tensors if name in result}


def _out_tensors(out: object) -> dict[str, torch.Tensor] | None:
    if out is None:
        return None
    from soupkern.io.sources import _is_module, _is_tensor

    sd = out.state_dict() if _is_module(out) else out  # type: ignore[attr-defined]
    if not isinstance(sd, Mapping):
        raise InputError(f"out must be a state dict or nn.Module, got {type(out).__name__}")
    for name, t in sd.items():
        if not isinstance(name, str):
            raise InputError(f"out= key {name!r} is not a string")
        if not _is_tensor(t):
            raise InputError(f"out['{name}'] is a {type(t).__name__}, not a tensor")
        if t.device.type == "meta":
            raise InputError(f"out['{name}'] is on the meta device: it cannot hold the soup")
    return dict(sd)


def _plan_into(plan: SoupPlan, targets: Mapping[str, torch.Tensor], dtype: object, keys: KeyPolicy) -> SoupPlan:
    """The plan with each output dtype taken from its `out=` target, checked against it."""
    from soupkern.io import OutputTensor
    from soupkern.io.sources import _torch_to_name
    from soupkern.plan import TensorPlan

    names = _torch_to_name()
    wanted = normalize_dtype(dtype)
    tensors = []
    for tp in plan.tensors:
        name = tp.out.name
        t = targets.get(name)
        if t is None:
            raise InputError("out= has no tensor for it", path="out", tensor=name)
        if tuple(t.shape) != tp.out.shape:
            raise InputError(f"out= tensor has shape {list(t.shape)}, the soup {list(tp.out.shape)}", path="out", tensor=name)
        out_dtype = names.get(t.dtype)
        if out_dtype is None or (tp.average and out_dtype not in ("F64", "F32", "F16", "BF16")) \
                or (not tp.average and out_dtype != tp.out.dtype) or (wanted is not None and tp.average and out_dtype != wanted):
            raise InputError(f"out= tensor has dtype {t.dtype}; the soup's is {wanted or tp.out.dtype}", path="out", tensor=name)
        tensors.append(TensorPlan(OutputTensor(name, out_dtype, tp.out.shape), tp.sources, tp.average))
    extra = sorted(set(targets) - {tp.out.name for tp in plan.tensors})
    if extra and keys == "same":
        raise InputError(f"out= has {len(extra)} tensor(s) the soup does not make, e.g. '{extra[0]}' "
                         "(keys='intersection' leaves them untouched)", path="out", tensor=extra[0])
    return SoupPlan(tuple(tensors), plan.coefficients, plan.per_tensor, plan.divisor)


def _resident_device(checkpoints: Sequence[Checkpoint], targets: Mapping[str, torch.Tensor] | None) -> torch.device:
    """Where the result goes by default: the device of `out=`, else of the in-memory inputs."""
    import torch

    from soupkern.io.sources import TensorHolder

    tensors = list(targets.values()) if targets else [
        h.tensor for ck in checkpoints for h, _ in ck.tensors.values() if isinstance(h, TensorHolder)]
    devices = {t.device for t in tensors}
    if len(devices) == 1:
        return next(iter(devices))
    return torch.device("cpu")


def _write_conflicts(plan: SoupPlan, targets: Mapping[str, torch.Tensor]) -> set[str]:
    """Tensors whose `out=` target shares bytes with an input of the soup other than by being
    exactly that tensor's own input (same address, dtype, size): writing them in place could
    change an input still to be read (tied weights, overlapping views), so they are computed
    into a new tensor and copied after the whole soup is done."""
    import bisect

    from soupkern.io.sources import TensorHolder

    def where(x: torch.Tensor) -> Any:  # the address space: "cpu" without building a torch.device
        return "cpu" if x.is_cpu else x.device

    spans: dict[Any, tuple[list[int], list[int]]] = {}  # device -> starts, ends of every in-memory input there
    own: dict[tuple[Any, int, int, str, Any], int] = {}  # (device, start, end, tensor, dtype) -> inputs exactly that
    for tp in plan.tensors:
        for h, info in tp.sources:
            if type(h) is TensorHolder and info.nbytes:
                x = h.tensor
                device = where(x)
                start = x.data_ptr()
                contiguous = h.direct or x.is_contiguous()
                if contiguous:
                    end = start + info.nbytes
                else:  # a strided view spans from its first to its last element
                    end = start + (1 + sum((n - 1) * abs(st) for n, st in zip(x.shape, x.stride()))) * x.element_size()
                starts, ends = spans.setdefault(device, ([], []))
                starts.append(start)
                ends.append(end)
                if contiguous:
                    key = (device, start, end, tp.out.name, x.dtype)
                    own[key] = own.get(key, 0) + 1
    for starts, ends in spans.values():
        starts.sort()
        ends.sort()
    conflicts = set()
    for name, t in targets.items():
        device = where(t)
        if device not in spans or t.numel() == 0:
            continue
        starts, ends = spans[device]
        a = t.data_ptr()
        e = a + t.nbytes
        # spans meeting [a, e): those starting before e, less those ending by a (they start before a)
        meeting = bisect.bisect_left(starts, e) - bisect.bisect_right(ends, a)
        if meeting > own.get((device, a, e, name, t.dtype), 0):
            conflicts.add(name)
    return conflicts


def _bump_versions(tensors: Sequence[torch.Tensor]) -> None:
    """Tell autograd that tensors written in place by a kernel (behind its back) changed, as an
    in-place torch op would: a backward that saved them then raises instead of using new values."""
    import torch

    bump = getattr(torch.autograd.graph, "increment_version", None)
    if bump is None or not tensors:
        return
    try:
        bump(list(tensors))
    except TypeError:  # torch versions whose increment_version takes one tensor
        for t in tensors:
            bump(t)


def _into_targets(result: dict[str, torch.Tensor], targets: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The result as the `out=` tensors: those computed elsewhere are copied in now (copy_ tells
    autograd), those a kernel wrote in place get their version bumped."""
    if not targets:
        return result
    import torch

    _bump_versions([t for name, t in result.items() if t is targets[name]])
    with torch.no_grad():  # targets may be parameters (out=dict(model.named_parameters()))
        for name, t in result.items():
            if t is not targets[name]:
                targets[name].copy_(t)
    return {name: targets[name] for name in result}


def _on_host(plan: SoupPlan, kernel: Any, targets: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    import torch

    from soupkern.io.sources import prefer_huge_pages
    from soupkern.torch_dtypes import TORCH_DTYPES

    result: dict[str, torch.Tensor] = {}
    where = {}
    conflicts = _write_conflicts(plan, targets) if targets else set()
    for tp in plan.tensors:
        t = targets.get(tp.out.name) if targets else None
        if t is None or t.device.type != "cpu" or not t.is_contiguous() or tp.out.name in conflicts:
            t = torch.empty(tp.out.shape, dtype=TORCH_DTYPES[tp.out.dtype])
            prefer_huge_pages(t)
        result[tp.out.name] = t
        where[tp.out.name] = (t.data_ptr(), lambda t=t: t.reshape(-1).view(torch.uint8).numpy())
    fill_many(plan, where, kernel)
    return _into_targets(result, targets)


def _on_device(plan: SoupPlan, checkpoints: Sequence[Checkpoint], device: torch.device, backend: str | None,
               device_budget_bytes: int | None, targets: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Through the device kernels: in place where every input already lives on `device`, else
    streamed from the host through pinned buffers."""
    import torch

    from soupkern.backends.device import device_kernels
    from soupkern.gpu_engine import DEFAULT_DEVICE_BUDGET_BYTES, DeviceStreamer
    from soupkern.io.sources import TensorHolder

    kernels = device_kernels(device, backend)
    resident = all(isinstance(h, TensorHolder) and h.tensor.device == device
                   for ck in checkpoints for h, _ in ck.tensors.values())
    if resident:
        with torch.no_grad():
            result = _device_resident(plan, kernels, device, targets)
    else:
        streamer = DeviceStreamer(plan, kernels, device, budget_bytes=device_budget_bytes or DEFAULT_DEVICE_BUDGET_BYTES)
        result = streamer.to_state_dict()
    return _into_targets(result, targets)


def _device_resident(plan: SoupPlan, kernels: Any, device: torch.device,
                     targets: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    import torch

    from soupkern.backends.torch_backend import fp64_weighted_sum, round_f64
    from soupkern.gpu_engine import on_device
    from soupkern.torch_dtypes import TORCH_DTYPES

    result = {}
    conflicts = _write_conflicts(plan, targets) if targets else set()
    for tp in plan.tensors:
        name = tp.out.name
        xs = [h.tensor.contiguous() for h, _ in tp.sources]
        t = targets.get(name) if targets else None
        if t is None or t.device != device or not t.is_contiguous() or name in conflicts:
            t = torch.empty(tp.out.shape, dtype=TORCH_DTYPES[tp.out.dtype], device=device)
        if not tp.average:
            t.copy_(xs[0])
        elif on_device(tp):
            kernels.weighted_sum(t, xs, plan.coefficients_for(name), plan.divisor_for(name))
        else:  # F64 somewhere: the torch form of the contract
            t.copy_(round_f64(fp64_weighted_sum(xs, plan.coefficients_for(name), plan.divisor_for(name)), t.dtype).view(t.shape))
        result[name] = t
    return result


def uniform_state_dict(ingredients: Sequence[Ingredient], **kwargs: object) -> dict[str, torch.Tensor]:
    """The uniform soup as an in-memory state dict (or into `out=`); options as `weighted_state_dict`."""
    ingredients = ingredient_list(ingredients)
    k = len(ingredients)
    return weighted_state_dict(ingredients, [1.0] * k, divisor=k, **kwargs)  # type: ignore[arg-type]


def _progress_bar(total: int, enabled: bool):  # -> context manager yielding a tqdm or None
    # only on a terminal, so logs and pipes get no carriage-return noise (tqdm's disable=None,
    # checked here first so a run without a bar does not import tqdm: start-up counts)
    isatty = getattr(sys.stderr, "isatty", None)
    if not enabled or isatty is None or not isatty():
        return nullcontext()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="soup", dynamic_ncols=True,
                leave=False, disable=None)
