"""Evaluate weight sets with the user's model and held-out data, one at a time or S at once.

The user brings an `nn.Module` (or a factory) whose state-dict names match the ingredients' tensor
names, and either held-out data (a DataLoader or any re-iterable of `(inputs, targets)` batches)
with a metric, or a callable `score(model) -> float`. Candidate weights are copied into that one
model in place (`param.copy_` under `no_grad`: one rounding to the parameter's dtype, moved to its
device); no model is built per candidate and no state dict is copied.

Batched soup evaluation (`Evaluator.score_stacked`): S weight sets given as stacked tensors
[S, *shape] are evaluated in ONE pass over the data, each input batch moved to the device once and
shared by the S soups, via `torch.func.functional_call` under `torch.vmap`. Tensors absent from the
stacked dict (e.g. buffers) come from the model. The S scores equal S separate evaluations up to
the rounding of batched vs unbatched matmuls (fp32: relative ~1e-6 in the outputs; an accuracy can
differ only where a sample's top-2 logits are that close). Models vmap cannot run (data-dependent
Python control flow, in-place buffer updates) fall back to S sequential evaluations (`batched="auto"`,
with a warning) or raise (`batched="vmap"`). `batched="shared"` also makes one pass over the data
but runs each batch through the S soups one after another (plain forwards through
`functional_call`, results identical to separate evaluations): on a CPU, where the evaluation is
compute-bound, vmap'd matmuls over S soups are slower than S plain ones (measured in
benchmarks/results/greedy_digits_cpu.md), so `"auto"` means "shared" on a CPU and vmap elsewhere.

Scores are means over samples of a per-sample metric, accumulated in fp64: "accuracy" (top-1 over
the last output dimension, higher is better) or "loss" (cross-entropy of fp32 logits, lower is
better), or a callable `metric(outputs, targets) -> per-sample values`. `Evaluator.maximize` tells
recipes which direction is better.

This module imports torch; it is not imported by `import soupkern`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

import torch
import torch.nn.functional as F
from torch import nn

from soupkern.errors import InputError, MismatchError, SoupkernError

if TYPE_CHECKING:
    from soupkern.distributed import CandidateMesh
    from soupkern.io import Checkpoint

Batch = tuple[Any, torch.Tensor]
"""One held-out batch: (inputs, targets). `inputs` is a tensor or a tuple/list of tensors (positional
arguments of the model); tensors are moved to the model's device."""
MetricFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(outputs [B, ...], targets [B]) -> per-sample values [B]; the score is their mean over all samples."""
ScoreFn = Callable[[nn.Module], float]
_BatchSum = tuple[int, float, int]  # (batch index, sum of the metric over its samples, samples)
_DeviceSum = tuple[int, torch.Tensor, int]  # the same with the sum a 0-dim fp64 tensor on the model's device
ModelLike = Union[nn.Module, Callable[[], nn.Module]]
BatchedMode = Literal["auto", "vmap", "shared", "sequential"]


def accuracy_metric(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1.0 where argmax over the last dim equals the target (first maximum on ties), else 0.0."""
    return (outputs.argmax(-1) == targets).to(torch.float64)


def loss_metric(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of the logits taken in fp32."""
    return F.cross_entropy(outputs.float(), targets, reduction="none").to(torch.float64)


METRICS: dict[str, tuple[MetricFn, bool]] = {"accuracy": (accuracy_metric, True), "loss": (loss_metric, False)}
"""Built-in metrics: name -> (function, higher is better)."""


class BatchedEvaluationUnavailable(SoupkernError, RuntimeError):
    """The model cannot be evaluated under torch.vmap (the message has torch's reason)."""


@dataclass(frozen=True)
class _Totals:
    total: float
    count: int

    def mean(self) -> float:
        if self.count == 0:
            raise InputError("the held-out data is empty (a one-shot iterator can be used only once: pass a "
                             "list of batches or a DataLoader)")
        return self.total / self.count


def _mean(sums: Iterable[_BatchSum]) -> float:
    """The mean over samples from per-batch sums, added in the given order."""
    totals = _Totals(0.0, 0)
    for _, total, count in sums:
        totals = _Totals(totals.total + total, totals.count + count)
    return totals.mean()


class DatasetBatches(Sequence[Any]):
    """A map-style dataset as held-out batches: batch b = samples [b·B, (b+1)·B) in index order,
    combined by torch's `default_collate`, loaded only when indexed (so under a process group each
    rank loads only its batches r, r + W, ...; unlike `DistributedSampler`, no sample is repeated
    to even out the ranks, so scores equal one process's)."""

    def __init__(self, dataset: Any, batch_size: int):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.samples = len(dataset)

    def __len__(self) -> int:
        return -(-self.samples // self.batch_size)

    def __getitem__(self, b: int) -> Any:  # type: ignore[override]
        from torch.utils.data import default_collate

        if not 0 <= b < len(self):
            raise IndexError(b)
        start = b * self.batch_size
        return default_collate([self.dataset[i] for i in range(start, min(start + self.batch_size, self.samples))])


def held_out(data: Any, batch_size: int | None = None) -> Any:
    """`data` as held-out batches: with `batch_size`, a map-style `torch.utils.data.Dataset` of
    samples (with `__len__`, not an IterableDataset) becomes `DatasetBatches(data, batch_size)`;
    without it `data` is returned as it is (its items are batches: a list, a DataLoader, a
    dataset of batches). A batch size for data that is not a map-style dataset is an error."""
    if batch_size is None:
        return data
    from torch.utils.data import Dataset, IterableDataset

    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        return DatasetBatches(data, batch_size)
    raise InputError("a batch size applies to a map-style dataset of samples; this held-out data is "
                     f"{type(data).__name__}, already in batches")


def _on_host(per_soup: list[list[_DeviceSum]]) -> list[list[_BatchSum]]:
    """Every soup's per-batch sums of a pass as Python floats, with one device synchronization
    (one stacked copy) instead of one per batch and soup; the same values."""
    flat = [t for soup in per_soup for _, t, _ in soup]
    values = iter(torch.stack(flat).tolist() if flat else [])
    return [[(i, next(values), n) for i, _, n in soup] for soup in per_soup]


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _to(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=True)
    if isinstance(inputs, (tuple, list)):
        return tuple(_to(t, device) for t in inputs)
    raise InputError(f"batch inputs must be a tensor or a tuple of tensors, got {type(inputs).__name__}")


def _args(inputs: Any) -> tuple[Any, ...]:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _split(batch: Any) -> Batch:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise InputError(f"each held-out batch must be an (inputs, targets) pair, got {type(batch).__name__}"
                         f"{'' if not isinstance(batch, (tuple, list)) else f' of length {len(batch)}'}")
    return batch[0], batch[1]


class Evaluator:
    """Scores weight sets with one resident model.

    model: an `nn.Module` or a zero-argument factory; moved to `device` when given, put in eval mode.
    data + metric: held-out batches `(inputs, targets)` (re-iterable; a map-style dataset of
      samples is batched by `held_out(dataset, batch_size)`, and a sequence of batches is
      indexed, so a rank loads only its own)
      and "accuracy" | "loss" | a callable `(outputs, targets) -> per-sample values`; `maximize` defaults to True for accuracy,
      False for loss, True for a callable.
    score: instead of data, a callable `score(model) -> float` (called under `torch.no_grad()`);
      `maximize` defaults to True. Batched evaluation then runs the soups one after another.
    batched: how `score_stacked` shares a pass among soups: "auto" ("shared" on a CPU, "vmap"
      elsewhere), "vmap", "shared" or "sequential" (one pass per soup); see the module docstring.
    distributed: inside an initialized process group of W ranks (torchrun), rank r evaluates
      batches r, r + W, ... and the per-batch metric sums are gathered and added in batch order:
      every rank gets the scores one process would, to the bit. Every rank must iterate the data
      in the same order (no per-rank shuffling). Needs data and a metric, not a score callable.
    """

    def __init__(self, model: ModelLike, data: Iterable[Any] | None = None, *,
                 metric: str | MetricFn = "accuracy", score: ScoreFn | None = None,
                 maximize: bool | None = None, device: str | torch.device | None = None,
                 batched: BatchedMode = "auto", distributed: bool = False):
        if not isinstance(model, nn.Module):
            if not callable(model):
                raise InputError(f"model must be an nn.Module or a factory returning one, got {type(model).__name__}")
            model = model()
            if not isinstance(model, nn.Module):
                raise InputError(f"the model factory returned {type(model).__name__}, not an nn.Module")
        if (data is None) == (score is None):
            raise InputError("give either held-out data (with a metric) or a score(model) callable, not both or neither")
        if batched not in ("auto", "vmap", "shared", "sequential"):
            raise InputError(f"batched must be 'auto', 'vmap', 'shared' or 'sequential', got {batched!r}")
        if distributed and score is not None:
            raise InputError("a score callable is opaque: it cannot be split over the ranks of a process group. "
                             "Give held-out data and a metric instead (data=, metric=; --data, --metric)")
        from soupkern.distributed import group_for

        self.group = group_for(distributed)
        if device is not None:
            model.to(device)
        self.model = model.eval()
        self.device = _model_device(model)
        self.data = data
        self.score_fn = score
        self.batched: BatchedMode = batched
        self._warned = False
        self._part: tuple[int, int] | None = None  # (data rank, data ranks) while scoring over a mesh
        default_max = True
        self.metric: MetricFn = accuracy_metric
        if score is None:
            if isinstance(metric, str):
                if metric not in METRICS:
                    raise InputError(f"unknown metric '{metric}' (built in: {', '.join(METRICS)}; or pass a callable)")
                self.metric, default_max = METRICS[metric]
            elif callable(metric):
                self.metric = metric
            else:
                raise InputError(f"metric must be a name or a callable, got {type(metric).__name__}")
        self.maximize = default_max if maximize is None else maximize
        # state-dict name -> the model's own Parameter/buffer (tied weights appear under each name)
        self.tensors: dict[str, torch.Tensor] = dict(model.state_dict(keep_vars=True))
        # tied weights (an LM head sharing the input embedding's storage): a checkpoint needs only
        # one name of each group, as save_pretrained / save_model store only one
        groups: dict[tuple[Any, ...], list[str]] = {}
        for name, t in self.tensors.items():
            if t.numel():
                groups.setdefault((t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype), []).append(name)
        self.aliases: dict[str, tuple[str, ...]] = {
            n: tuple(m for m in g if m != n) for g in groups.values() if len(g) > 1 for n in g}

    # ------------------------------------------------------------------ loading
    def check(self, name: str, shape: tuple[int, ...], *, path: str | None = None) -> torch.Tensor:
        """The model's tensor called `name`, after checking it exists with `shape` (InputError/MismatchError)."""
        target = self.tensors.get(name)
        if target is None:
            raise InputError("the model has no tensor of this name in its state dict", path=path, tensor=name)
        if tuple(target.shape) != tuple(shape):
            raise MismatchError(f"shape {tuple(shape)} does not match the model's {tuple(target.shape)}",
                                path=path, tensor=name)
        return target

    @torch.no_grad()
    def load_(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy `state` into the model in place: one rounding to each tensor's dtype, moved to its device.

        Tensors of the model not named in `state` keep their values.
        """
        for name, value in state.items():
            self.check(name, tuple(value.shape)).copy_(value)

    def check_names(self, names: Iterable[str], *, path: str | None = None) -> None:
        """InputError unless `names` are exactly the model's state-dict names (naming one that differs);
        of tied weights (one storage under several names) one name suffices."""
        names = set(names)
        for name in sorted(names - self.tensors.keys()):
            raise InputError("the model has no tensor of this name in its state dict", path=path, tensor=name)
        for name in sorted(self.tensors.keys() - names):
            if not any(a in names for a in self.aliases.get(name, ())):  # a tied weight is loaded through its twin
                raise InputError("the model has this tensor but the checkpoint does not", path=path, tensor=name)

    def load_checkpoint_(self, path: Any, label: str | None = None, state_dict_key: str | None = None) -> None:
        """Load every tensor of a checkpoint (any source: soupkern.io.open_checkpoint) into the
        model in place (names must match exactly)."""
        from soupkern.io import open_checkpoint

        with open_checkpoint(path, state_dict_key=state_dict_key, label=label) as ck:
            self.check_names(ck.tensors, path=ck.path)
            self.load_({name: tensor_view(ck, name) for name in ck.tensors})

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, state: Mapping[str, torch.Tensor] | None = None) -> float:
        """The score of the model, after loading `state` into it when given."""
        if state is not None:
            self.load_(state)
        if self.score_fn is not None:
            return float(self.score_fn(self.model))
        return self._means(lambda: [self._model_sums()])[0]

    def _model_sums(self) -> list[_DeviceSum]:
        """This process's per-batch metric sums of the model as loaded."""
        sums = []
        for i, batch in self._batches():
            inputs, targets = _split(batch)
            sums.append(self._batch_sum(i, self.model(*_args(_to(inputs, self.device))), targets))
        return sums

    def _batch_sum(self, index: int, outputs: torch.Tensor, targets: torch.Tensor) -> _DeviceSum:
        """The batch's fp64 metric sum, left on the model's device (`_on_host` reads a pass's sums
        with one synchronization)."""
        values = self.metric(outputs, targets.to(outputs.device, non_blocking=True))
        return index, values.sum(dtype=torch.float64), int(values.numel())

    def _batches(self) -> Iterator[tuple[int, Any]]:
        """(index, batch) of the held-out batches this process evaluates: all of them, or under a
        process group of W ranks, batches r, r + W, ... (every rank must see the data in one order)."""
        from soupkern.distributed import shard

        assert self.data is not None  # invariant of __init__: data xor score_fn
        return shard(self.data, self.group, self._part)

    def _means(self, local: Callable[[], list[list[_DeviceSum]]], ids: Sequence[int] | None = None,
               count: int | None = None) -> list[float]:
        """The mean metric of each soup from its per-batch sums (`local()`: this process's, one
        list per soup), added in batch order whatever the number of ranks: the same floats as one
        process. Under a process group the sums are gathered (`ids`: the soups of the `count` this
        rank scored, spread over a mesh; default all, in order); an error on any rank is raised on
        every rank (the failing rank's own, `PeerFailed` elsewhere; batched evaluation being
        unavailable on one rank, as that on every rank, so all fall back alike)."""
        if self.group is None:
            return [_mean(soup) for soup in _on_host(local())]
        from soupkern.distributed import PeerFailed

        try:
            sums = _on_host(local()) if ids is None or ids else []
            mine: tuple[str, Any] = ("ok", (list(range(len(sums))) if ids is None else list(ids), sums))
        except BaseException as e:
            self.group.gather(("unbatched" if isinstance(e, BatchedEvaluationUnavailable) else "error",
                               f"{type(e).__name__}: {e}"))
            raise
        merged: list[list[_BatchSum]] = [[] for _ in range(len(sums) if count is None else count)]
        statuses = self.group.gather(mine)  # one gather: every soup, every status
        for rank, (status, value) in enumerate(statuses):  # an error wins: every rank raises alike
            if status == "error":
                raise PeerFailed(f"rank {rank} failed evaluating a soup: {value}", 1, rank, self.group.rank)
        for rank, (status, value) in enumerate(statuses):
            if status == "unbatched":
                raise BatchedEvaluationUnavailable(f"on rank {rank}: {value}")
            for j, part in zip(*value):
                merged[j] += part
        return [_mean(sorted(m)) for m in merged]

    @torch.no_grad()
    def outputs(self, state: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs [N, ...], targets [N]) of the model over the held-out data, concatenated on the model's device."""
        if self.data is None:
            raise InputError("outputs need held-out data; this evaluator has only a score callable")
        if self.group is not None:
            raise InputError("the outputs over the held-out data (interpolation curves) are computed in one "
                             "process; under a process group scores and ensembles are distributed")
        if state is not None:
            self.load_(state)
        outputs, targets, _ = self.outputs_by_batch()
        return outputs, targets

    @torch.no_grad()
    def outputs_by_batch(self) -> tuple[torch.Tensor, torch.Tensor, tuple[tuple[int, int, int], ...]]:
        """(outputs, targets, bounds) of the model over the held-out batches this process
        evaluates (all of them, or under a process group batches r, r + W, ...), concatenated on
        the model's device; bounds[j] = (batch index, first row, end row) of each batch in them."""
        if self.data is None:
            raise InputError("outputs need held-out data; this evaluator has only a score callable")
        outs, tgts, bounds = [], [], []
        rows = 0
        for index, batch in self._batches():
            inputs, targets = _split(batch)
            outs.append(self.model(*_args(_to(inputs, self.device))))
            tgts.append(targets.to(self.device, non_blocking=True))
            bounds.append((index, rows, rows + len(tgts[-1])))
            rows += len(tgts[-1])
        if not outs and self.group is None:
            _Totals(0.0, 0).mean()  # raises the empty-data error
        if not outs:  # a rank with no batch (fewer batches than ranks)
            return torch.empty(0), torch.empty(0, dtype=torch.long), ()
        return torch.cat(outs), torch.cat(tgts), tuple(bounds)

    def can_batch(self) -> bool:
        """Whether `score_stacked` runs soups in one shared pass (False: sequential)."""
        return self.score_fn is None and self.batched != "sequential"

    @torch.no_grad()
    def score_stacked(self, stacked: Mapping[str, torch.Tensor], max_soups: int | None = None) -> list[float]:
        """Scores of S weight sets, `stacked[name]` of shape [S, *shape], in one pass over the data.

        All stacked tensors must share S and live on the model's device with the model tensor's
        dtype (no conversion is made). The model's own weights are left unchanged. `max_soups`
        splits S into passes of at most that many soups (memory of activations grows with S).
        """
        s = self._check_stacked(stacked)
        chunk = s if max_soups is None else max_soups
        if chunk < 1:
            raise InputError(f"max_soups must be >= 1, got {max_soups}")
        out: list[float] = []
        for start in range(0, s, chunk):
            part = {k: v[start:start + chunk] for k, v in stacked.items()}
            out += self._score_chunk(part, min(chunk, s - start))
        return out

    def _check_stacked(self, stacked: Mapping[str, torch.Tensor]) -> int:
        if not stacked:
            raise InputError("no stacked tensors given")
        sizes = set()
        for name, value in stacked.items():
            target = self.check(name, tuple(value.shape[1:]))
            if value.dtype != target.dtype or value.device != target.device:
                raise MismatchError(f"stacked tensor is {value.dtype} on {value.device}; the model's is "
                                    f"{target.dtype} on {target.device}", tensor=name)
            sizes.add(int(value.shape[0]))
        if len(sizes) != 1:
            raise MismatchError(f"stacked tensors disagree on the number of soups: {sorted(sizes)}")
        return sizes.pop()

    @torch.no_grad()
    def score_spread(self, build: Callable[[list[int]], Mapping[str, torch.Tensor]], count: int,
                     mesh: CandidateMesh) -> list[float]:
        """Scores of a window of `count` soups spread over a candidates × data mesh (every rank
        calls it, in a process group): this rank forms its soups, `build(ids)` ([len(ids), ...]
        stacked as for `score_stacked`; ids = `mesh.mine(count)`, not called when empty), and
        scores them on its data rank's batches; every rank's per-batch sums are gathered and each
        soup's added in batch order, so every rank gets the floats one process computes. A
        failure forming soups on any rank is raised on every rank."""
        assert self.group is not None
        ids = mesh.mine(count)
        stacked = self.group.step(lambda: build(ids) if ids else None, "forming soup candidates")
        s = 0 if stacked is None else self._check_stacked(stacked)
        self._part = (mesh.data_rank, mesh.data)
        try:
            return self._score_chunk(stacked or {}, s, ids, count)
        finally:
            self._part = None

    def _score_chunk(self, stacked: Mapping[str, torch.Tensor], s: int, ids: Sequence[int] | None = None,
                     count: int | None = None) -> list[float]:
        if self.can_batch() and (self.batched == "shared" or (self.batched == "auto" and self._prefers_shared())):
            return self._score_shared(stacked, s, ids, count)
        if self.can_batch():
            try:
                return self._score_vmap(stacked, s, ids, count)
            except BatchedEvaluationUnavailable as e:
                if self.batched == "vmap":
                    raise
                if not self._warned:
                    warnings.warn(f"batched soup evaluation is unavailable for this model, evaluating soups one "
                                  f"after another: {e}", RuntimeWarning, stacklevel=3)
                    self._warned = True
                self.batched = "sequential"
        return self._score_sequential(stacked, s, ids, count)

    def _score_vmap(self, stacked: Mapping[str, torch.Tensor], s: int, ids: Sequence[int] | None,
                    count: int | None) -> list[float]:
        from torch.func import functional_call

        params = dict(stacked)

        def forward(p: dict[str, torch.Tensor], args: tuple[Any, ...]) -> torch.Tensor:
            out: torch.Tensor = functional_call(self.model, p, args)
            return out

        batched_forward = torch.vmap(forward, in_dims=(0, None))

        def local() -> list[list[_DeviceSum]]:
            sums: list[list[_DeviceSum]] = [[] for _ in range(s)]
            first = True
            for index, batch in self._batches():
                inputs, targets = _split(batch)
                args = _args(_to(inputs, self.device))
                if first:  # only the first call can fail for vmap reasons; later errors are real errors
                    try:
                        outputs = batched_forward(params, args)
                    except (RuntimeError, NotImplementedError, ValueError) as e:
                        raise BatchedEvaluationUnavailable(f"{type(e).__name__}: {e}") from e
                    first = False
                else:
                    outputs = batched_forward(params, args)
                targets = targets.to(outputs.device, non_blocking=True)
                for i in range(s):
                    sums[i].append(self._batch_sum(index, outputs[i], targets))
            return sums

        return self._means(local, ids, count)

    def _prefers_shared(self) -> bool:
        """"auto" on a CPU: plain forwards beat vmap'd ones there (see the module docstring)."""
        return self.device.type == "cpu"

    def _score_shared(self, stacked: Mapping[str, torch.Tensor], s: int, ids: Sequence[int] | None,
                      count: int | None) -> list[float]:
        """One pass over the data; each batch goes through the S soups one after another
        (functional_call with soup i's tensors). Shares the cost of producing the batches;
        each forward is a plain one, which on a CPU is faster than a vmap'd one."""
        from torch.func import functional_call

        soups = [{k: v[i] for k, v in stacked.items()} for i in range(s)]

        def local() -> list[list[_DeviceSum]]:
            sums: list[list[_DeviceSum]] = [[] for _ in range(s)]
            for index, batch in self._batches():
                inputs, targets = _split(batch)
                args = _args(_to(inputs, self.device))
                targets = targets.to(self.device, non_blocking=True)
                for i, params in enumerate(soups):
                    sums[i].append(self._batch_sum(index, functional_call(self.model, params, args), targets))
            return sums

        return self._means(local, ids, count)

    def _score_sequential(self, stacked: Mapping[str, torch.Tensor], s: int, ids: Sequence[int] | None = None,
                          count: int | None = None) -> list[float]:
        saved = {name: self.tensors[name].detach().clone() for name in stacked}

        def local() -> list[list[_DeviceSum]]:
            sums = []
            for i in range(s):
                self.load_({k: v[i] for k, v in stacked.items()})
                sums.append(self._model_sums())
            return sums

        try:
            if self.score_fn is not None:
                return [self.score({k: v[i] for k, v in stacked.items()}) for i in range(s)]
            return self._means(local, ids, count)
        finally:
            self.load_(saved)


def tensor_view(ck: Checkpoint, name: str) -> torch.Tensor:
    """Zero-copy, read-only CPU torch view of tensor `name` of an open checkpoint.

    Valid while the checkpoint is open; never write to it (the mapping is read-only).
    """
    from soupkern.torch_dtypes import torch_view

    f, info = ck.tensors[name]
    return torch_view(f.view(info), info.dtype).reshape(info.shape)


def module_from_checkpoint(path: str | os.PathLike[str], device: str | torch.device | None = None, *,
                           state_dict_key: str | None = None) -> nn.Module:
    """An `nn.Module` holding a copy of a checkpoint's tensors, whose state dict has exactly the
    checkpoint's names, shapes, dtypes and values (dotted names become nested submodules).

    For scorers that take a state dict rather than a model: `Evaluator(module_from_checkpoint(p),
    score=lambda m: fn(m.state_dict()))`. Float tensors are parameters (requires_grad=False),
    others buffers.
    """
    from soupkern.io import open_checkpoint

    root = nn.Module()
    with open_checkpoint(path, state_dict_key=state_dict_key) as ck:
        for name in sorted(ck.tensors):
            *parents, leaf = name.split(".")
            if not leaf or not all(parents):
                raise InputError("tensor name has an empty component", path=ck.path, tensor=name)
            owner = root
            for part in parents:
                child = owner._modules.get(part)
                if child is None:
                    if hasattr(owner, part):
                        raise InputError(f"'{part}' is both a tensor and a prefix of other tensor names",
                                         path=ck.path, tensor=name)
                    child = nn.Module()
                    owner.add_module(part, child)
                owner = child
            if leaf in owner._modules or hasattr(owner, leaf):
                raise InputError("tensor name collides with a prefix of other tensor names", path=ck.path, tensor=name)
            value = tensor_view(ck, name).clone()
            f, info = ck.tensors[name]
            f.release(info.begin, info.end)  # the copy is what stays: drop the mapped pages
            if value.is_floating_point():
                owner.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
            else:
                owner.register_buffer(leaf, value)
    if device is not None:
        root.to(device)
    return root.eval()


def make_evaluator(model: ModelLike | None = None, data: Iterable[Any] | None = None, *,
                   metric: str | MetricFn = "accuracy", score: ScoreFn | None = None,
                   maximize: bool | None = None, device: str | torch.device | None = None,
                   evaluator: Evaluator | None = None, distributed: bool = False) -> Evaluator:
    """`evaluator` if given (then no other argument may be), else `Evaluator(model, data, ...)`."""
    if evaluator is not None:
        if model is not None or data is not None or score is not None:
            raise InputError("give an evaluator or model/data/score, not both")
        return evaluator
    if model is None:
        raise InputError("a model (or a factory) is needed to evaluate soups")
    return Evaluator(model, data, metric=metric, score=score, maximize=maximize, device=device,
                     distributed=distributed)
