"""Greedy soup (Wortsman et al. 2022, Recipe 1), sequential or speculative-batched.

Recipe, exactly:
1. Score every ingredient on the held-out data (or take `ingredient_scores`).
2. Sort best first. `order="stable"`: equal scores keep input order (Python's stable sort).
   `order="model-soups"`: equal scores in reverse input order, which is what the reference code
   does (github.com/mlfoundations/model-soups main.py: `sorted(..., key=score)` ascending, then
   `list.reverse()`).
3. Start the soup from the best ingredient; its score is the best so far.
4. For each next ingredient x in that order, with the soup's fp64 running sum `sum` of n kept
   ingredients (in kept order): candidate = ((sum + float64(x)) / (n + 1)) rounded once to the
   model's dtype (fp64 add, IEEE fp64 division, round to nearest even): exactly the uniform soup of
   the n + 1 ingredients under the engine's contract. Score the candidate; keep x if
   score >= best (`tie="ge"`, the paper's "if held-out accuracy does not decrease") or only if
   score > best (`tie="gt"`, the reference code: `if held_out_val_accuracy > best_val_acc_so_far`).
   On keeping, sum += float64(x) and best = score. A NaN score is never kept. For a lower-is-better
   metric (loss) the comparisons are made on -score (exact, so the tie rules are unchanged).
   The reference code keeps a running *mean* (soup * n/(n+1) + x/(n+1) in the checkpoint dtype)
   instead of a sum; that differs from the sum by rounding only.

State: the fp64 running sum, the model's own parameters (candidates are written straight into
them), and one tensor of one ingredient at a time: ingredients are read through the engine's work
items (soupkern/engine.py; one item per tensor, zero-copy through mmap, its pages released after
use), and a candidate recomputed from the files is `engine.fill_tensor` per tensor. On a GPU model
the sum lives on the GPU and candidates are formed there, tensor by tensor
(`soupkern.backends.device` kernels), each ingredient tensor copied in through two pinned staging
buffers in turn (the host fills one while the device copies the other in; `_Staged`), and the
ingredients greedy reads next are copied to the device on a worker thread while the current
candidates are evaluated (`_Prefetcher`).

Speculative greedy (`speculative=S > 1`): the next S candidates are formed as if every earlier one
were rejected (all from the same sum and n), stacked [S, ...] and scored in one batched pass
(`Evaluator.score_stacked`); the results are read in order up to the first one kept, the rest are
discarded and the next window starts after it. Every candidate that is looked at is the same
tensor (bit for bit) sequential greedy would have scored and the accept/reject sequence is the
same function of the scores, so the picks are identical given the same scores (tested on random
score tables with ties and on real models). The batched pass computes a candidate's outputs with
batched matmuls, equal to the unbatched ones up to fp32 rounding order: an accuracy can differ only
through a sample whose top-2 logits agree to about 1e-6. Extra memory: S candidate weight sets.

The soup is then written by the streaming engine as the uniform soup of the kept ingredients in
kept order (`weighted_soup(kept, [1] * n, out, divisor=n, recipe="greedy")`), with the run
recorded in metadata (`soupkern.greedy.*`): the fp64 sum in kept order divided once by n, the same
operations as the last kept candidate, so the file is the scored soup bit for bit (when the model's
dtype is the file's dtype). On return the model holds the in-memory greedy soup, whose score is
`GreedyResult.final_score`.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from soupkern import strict_json
from soupkern.io.sources import labels
from soupkern.options import ingredient_list
from soupkern.errors import InputError, MismatchError, OutputError
from soupkern.recipes.weighted import SoupReport, check_soup_output, reserves_output, weighted_soup

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from soupkern.backends.device import DeviceKernels
    from soupkern.distributed import CandidateMesh
    from soupkern.evaluate import Evaluator, MetricFn, ScoreFn
    from soupkern.io import Checkpoint

PathLike = str | os.PathLike[str]
TieRule = Literal["ge", "gt"]
SortRule = Literal["stable", "model-soups"]
CandidateScorer = Callable[[tuple[int, ...], Sequence[int]], Sequence[float]]
"""(kept ingredient indices, candidate indices) -> score of each soup kept + [candidate], in order."""
DEFAULT_SPECULATIVE = 8


@dataclass(frozen=True)
class GreedyStep:
    """One candidate looked at: ingredient index (input order), its soup's score, whether it was kept."""

    ingredient: int
    score: float
    accepted: bool
    soup_size: int  # ingredients in the soup before this step


@dataclass(frozen=True)
class GreedyResult:
    """The record of a greedy run. Indices refer to `paths` (input order)."""

    paths: tuple[Any, ...]  # the ingredients as given (paths, state dicts, modules)
    ingredient_scores: tuple[float, ...]
    order: tuple[int, ...]  # best first, after the tie rule among equal scores
    steps: tuple[GreedyStep, ...]  # one per order[1:], in order
    kept: tuple[int, ...]  # in the order they joined the soup (order[0] first)
    final_score: float  # score of the in-memory greedy soup (the model holds it on return)
    tie: TieRule
    sort: SortRule
    maximize: bool
    speculative: int
    evaluations: int  # candidate soups evaluated (speculation evaluates some that are discarded)
    passes: int  # evaluation passes over the held-out data for candidates (batched counts once)
    seconds: float
    report: SoupReport | None  # the written soup, when `out` was given

    @property
    def kept_paths(self) -> tuple[Any, ...]:
        return tuple(self.paths[i] for i in self.kept)

    def metadata(self) -> dict[str, str]:
        """Provenance written into the soup's __metadata__ (strings; JSON where structured)."""
        name = labels(self.paths)
        return {
            "soupkern.greedy.tie": self.tie,
            "soupkern.greedy.sort": self.sort,
            "soupkern.greedy.maximize": strict_json.dumps(self.maximize),
            "soupkern.greedy.kept": strict_json.dumps([name[i] for i in self.kept]),
            "soupkern.greedy.order": strict_json.dumps([name[i] for i in self.order]),
            "soupkern.greedy.ingredient_scores": strict_json.dumps({name[i]: self.ingredient_scores[i] for i in self.order}),
            "soupkern.greedy.steps": strict_json.dumps([{"ingredient": name[s.ingredient], "score": s.score,
                                                  "accepted": s.accepted, "soup_size": s.soup_size}
                                                 for s in self.steps]),
            "soupkern.greedy.final_score": strict_json.dumps(self.final_score),
        }


def sort_order(scores: Sequence[float], *, maximize: bool = True, sort: SortRule = "stable") -> list[int]:
    """Indices of `scores` best first; equal scores in input order ("stable") or reversed ("model-soups")."""
    if sort not in ("stable", "model-soups"):
        raise InputError(f"sort must be 'stable' or 'model-soups', got {sort!r}")
    for i, s in enumerate(scores):
        if math.isnan(s):
            raise InputError(f"ingredient {i} has a NaN score")
    sign = 1.0 if maximize else -1.0
    if sort == "stable":
        return sorted(range(len(scores)), key=lambda i: sign * scores[i], reverse=True)
    ascending = sorted(range(len(scores)), key=lambda i: sign * scores[i])
    return ascending[::-1]


def _better(score: float, best: float, tie: TieRule, maximize: bool) -> bool:
    a, b = (score, best) if maximize else (-score, -best)
    return a >= b if tie == "ge" else a > b


def greedy_select(order: Sequence[int], first_score: float, score_candidates: CandidateScorer, *,
                  tie: TieRule = "ge", maximize: bool = True, speculative: int = 1,
                  on_step: Callable[[GreedyStep], None] | None = None) -> tuple[list[GreedyStep], list[int], float, int]:
    """The greedy rule over an order, independent of what a soup is.

    `score_candidates(kept, window)` scores the soups kept + [j] for each j of `window` (at most
    `speculative` candidates, all relative to the same kept set). Returns (steps, kept, best score,
    number of candidates scored). With speculation, results after the first kept candidate of a
    window are discarded unseen, so steps and kept do not depend on `speculative`.
    """
    if tie not in ("ge", "gt"):
        raise InputError(f"tie must be 'ge' or 'gt', got {tie!r}")
    if speculative < 1:
        raise InputError(f"speculative must be >= 1, got {speculative}")
    if not order:
        raise InputError("greedy soup needs at least one ingredient")
    kept = [order[0]]
    best = first_score
    steps: list[GreedyStep] = []
    evaluated = 0
    i = 1
    while i < len(order):
        window = list(order[i:i + speculative])
        scores = list(score_candidates(tuple(kept), window))
        if len(scores) != len(window):
            raise InputError(f"the candidate scorer returned {len(scores)} scores for {len(window)} candidates")
        evaluated += len(window)
        for j, score in zip(window, scores):
            i += 1
            accepted = _better(score, best, tie, maximize)
            step = GreedyStep(j, float(score), accepted, len(kept))
            steps.append(step)
            if on_step is not None:
                on_step(step)
            if accepted:
                kept.append(j)
                best = score
                break
    return steps, kept, best, evaluated


class _RunningSoup:
    """fp64 running sum of the kept ingredients on the model's device (the uniform contract's
    accumulator, so each candidate is bit for bit the uniform soup of its ingredients), and
    candidate formation."""

    def __init__(self, evaluator: Evaluator, paths: Sequence[Any], state_dir: str | None = None,
                 state_dict_key: str | None = None):
        import torch

        from soupkern.evaluate import tensor_view
        from soupkern.io import FLOAT_DTYPES

        self.ev = evaluator
        self.paths = list(paths)
        self.labels = labels(self.paths)
        self.state_dict_key = state_dict_key
        self.device = evaluator.device
        self.kernels = _device_kernels(self.device)
        self.staged = _staging_for(self.device)
        self.prefetcher: _Prefetcher | None = None  # set by greedy_soup on a GPU (`_prefetcher_for`)
        with self.open(0) as ck:
            evaluator.check_names(ck.tensors, path=ck.path)
            self.names = sorted(n for n, (_, info) in ck.tensors.items() if info.dtype in FLOAT_DTYPES)
            self.fixed = sorted(set(ck.tensors) - set(self.names))
            self.layout = {n: (info.dtype, info.shape) for n, (_, info) in ck.tensors.items()}
            # integer/bool tensors are not averaged: loaded once, required identical in every ingredient
            self.fixed_values = {n: tensor_view(ck, n).clone() for n in self.fixed}
            evaluator.load_(self.fixed_values)
        for n in self.names:
            evaluator.check(n, self.layout[n][1], path=self.labels[0])
        self.n = 0
        self.kept: list[int] = []
        self.targets = {n: evaluator.tensors[n] for n in self.names}
        self._stack: dict[str, torch.Tensor] | None = None
        self._state: _SumState | None = None  # built on first need: see _use_sums
        self._state_dir = state_dir
        self._summed = 0
        self._in_model: tuple[int, ...] | None = None  # the members of the soup the model holds
        self.sums: dict[str, torch.Tensor] = {}
        # On a CPU model, a candidate of few ingredients is cheaper to recompute from the mapped
        # files with the host kernel than to form from an fp64 running sum (8 bytes per parameter,
        # which for large models lives on disk): same contract, same bits.
        from soupkern.torch_dtypes import TORCH_DTYPES

        self._dtype_names = {TORCH_DTYPES[d]: d for d in FLOAT_DTYPES}
        self.recompute = self.device.type == "cpu" and all(
            t.is_contiguous() and t.dtype in self._dtype_names for t in self.targets.values())
        if not self.recompute or len(self.paths) > RECOMPUTE_MAX:
            self._ensure_sums()  # allocated now, so a disk too small for them fails before any evaluation

    def open(self, index: int) -> Checkpoint:
        """Ingredient `index` opened afresh (any source)."""
        from soupkern.io import open_checkpoint

        return open_checkpoint(self.paths[index], state_dict_key=self.state_dict_key, label=self.labels[index])

    def _check(self, ck: Checkpoint) -> None:
        """An ingredient against the first: the same names, the averaged tensors' shapes and float
        dtypes, identical non-float tensors."""
        import torch

        from soupkern.evaluate import tensor_view
        from soupkern.io import FLOAT_DTYPES

        if set(ck.tensors) != set(self.layout):
            missing = sorted(set(self.layout) ^ set(ck.tensors))[0]
            raise MismatchError(f"tensor names differ from {self.labels[0]}", path=ck.path, tensor=missing)
        for n in self.names:
            info = ck.tensors[n][1]
            if info.shape != self.layout[n][1]:
                raise MismatchError(f"shape {info.shape} differs from {self.layout[n][1]} in {self.labels[0]}",
                                    path=ck.path, tensor=n)
            if info.dtype not in FLOAT_DTYPES:
                raise MismatchError(f"dtype {info.dtype} is not a float dtype", path=ck.path, tensor=n)
        for n in self.fixed:
            if not torch.equal(tensor_view(ck, n), self.fixed_values[n]):
                raise MismatchError(f"non-float tensor differs from {self.labels[0]}; it cannot be averaged",
                                    path=ck.path, tensor=n)

    def _each_tensor(self, index: int, op: Callable[[str, torch.Tensor], object], *,
                     staged: _Staged | None = None) -> None:
        """Check ingredient `index` (`_check`), then op(name, x) for each of its non-empty averaged
        tensors in `names` order, x its values on the model's device (on a CPU a zero-copy view,
        valid only during the call; on a GPU copied in through pinned staging, `_Staged`, or
        taken from the copies `prefetch` made while the previous candidates were evaluated).
        Read through the engine, one work item per tensor, whose pages are released after its
        op: residency stays at about one tensor. `staged`: this staging instead of the soup's
        own (the prefetcher's worker), which also bypasses the prefetched copies."""
        import torch

        from soupkern.engine import WorkItem, run, tensor_items
        from soupkern.io import OutputTensor
        from soupkern.plan import TensorPlan
        from soupkern.torch_dtypes import torch_view

        def items(ck: Checkpoint) -> Iterator[WorkItem]:
            for n in self.names:
                f, info = ck.tensors[n]
                tp = TensorPlan(OutputTensor(n, info.dtype, info.shape), ((f, info),), average=False)
                yield from tensor_items(tp, max(tp.numel, 1))

        staged = staged or self.staged
        ahead = self.prefetcher.take(index) if self.prefetcher is not None and staged is self.staged else None
        if ahead is not None:
            with torch.no_grad():
                for n in self.names:
                    if n in ahead:
                        op(n, ahead.pop(n))
            return

        def call(item: WorkItem, views: list[memoryview]) -> None:
            out = item.tensor.out
            if staged is not None:
                op(out.name, staged.to_device(views[0], out.dtype, out.shape))
            else:
                op(out.name, torch_view(views[0], out.dtype).view(out.shape).to(self.device))

        with self.open(index) as ck, torch.no_grad():
            self._check(ck)
            run(items(ck), call)

    def _use_sums(self, members: int) -> bool:
        return not self.recompute or members > RECOMPUTE_MAX

    def _ensure_sums(self) -> None:
        if self._state is None:
            self._state = _SumState(self.names, {n: self.layout[n][1] for n in self.names}, self.device,
                                    self._state_dir)
            self.sums = self._state.tensors
        while self._summed < len(self.kept):
            self._accept_sum(self.kept[self._summed])

    def _accept_sum(self, index: int) -> None:
        state = self._state
        assert state is not None
        first = self._summed == 0

        def add(name: str, x: torch.Tensor) -> None:
            if first:  # the sum of one ingredient is the ingredient (its -0 too)
                self.sums[name].copy_(x)
            else:
                self.kernels.greedy_accept([self.sums[name]], [x])
            state.release(name)

        self._each_tensor(index, add)
        self._summed += 1

    def accept(self, index: int) -> None:
        self.kept.append(index)
        self.n += 1
        if self._state is not None:
            self._accept_sum(index)

    def candidate_into_model(self, index: int) -> None:
        """Model <- ((sum + x_index) / (n + 1)) in the model's dtype."""
        members = (*self.kept, index)
        self._in_model = None
        if not self._use_sums(len(members)):
            with self.open(index) as ck:
                self._check(ck)
            self._recompute_into(members)
        else:
            self._ensure_sums()
            self._each_tensor(index, lambda name, x: self._candidate(self.targets[name], name, x))
        self._in_model = members

    def _candidate(self, out: torch.Tensor, name: str, x: torch.Tensor) -> None:
        """out <- round((sum + x) / (n + 1)) for tensor `name` (its sum's pages released after)."""
        assert self._state is not None
        self.kernels.greedy_candidate([out], [self.sums[name]], [x], self.n)
        self._state.release(name)

    def _recompute_into(self, members: Sequence[int]) -> None:
        """The model's tensors <- the uniform soup of `members` (in order), tensor by tensor, by the
        host kernel (`engine.fill_tensor`: each tensor's pages released after it)."""
        from contextlib import ExitStack

        import torch

        from soupkern.backends import get_backend
        from soupkern.engine import fill_tensor
        from soupkern.io import OutputTensor
        from soupkern.plan import TensorPlan

        kernel = get_backend()
        ones = (1.0,) * len(members)
        with ExitStack() as stack, torch.no_grad():
            cks = [stack.enter_context(self.open(i)) for i in members]
            for name, target in self.targets.items():
                out = OutputTensor(name, self._dtype_names[target.dtype], tuple(target.shape))
                tp = TensorPlan(out, tuple(ck.tensors[name] for ck in cks), average=True)
                fill_tensor(tp, ones, target.detach().view(-1).view(torch.uint8).numpy(), kernel, float(len(members)))

    def prefetch(self, indices: Sequence[int]) -> None:
        """Hint: ingredients `indices` are read next, in that order (copied to the device ahead
        when a prefetcher is set; otherwise nothing)."""
        if self.prefetcher is not None:
            self.prefetcher.hint(indices)

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        if self._state is not None:
            self._state.close()

    def stacked(self, indices: Sequence[int], *, relative: bool = True) -> dict[str, torch.Tensor]:
        """[S, ...] candidates in the model's dtypes: (sum + x_j)/(n+1) for each j, or x_j alone (relative=False)."""
        import torch

        if relative:
            self._ensure_sums()
        self._in_model = None  # batched scoring may load the stacked soups through the model
        s = len(indices)
        if self._stack is None or next(iter(self._stack.values())).shape[0] < s:
            self._stack = {n: torch.empty((s, *self.layout[n][1]), dtype=t.dtype, device=self.device)
                           for n, t in self.targets.items()}
        out = {n: v[:s] for n, v in self._stack.items()}
        for row, index in enumerate(indices):
            if relative:
                self._each_tensor(index, lambda name, x: self._candidate(out[name][row], name, x))
            else:
                self._each_tensor(index, lambda name, x: out[name][row].copy_(x))
        return out

    def ingredient_into_model(self, index: int) -> None:
        self._in_model = None
        self._each_tensor(index, lambda name, x: self.targets[name].copy_(x))
        self._in_model = (index,)

    def final_into_model(self) -> None:
        """Model <- round(sum / n) (bit-identical to the last kept candidate and to the uniform soup
        of the kept ingredients that the file receives: same fp64 sum, same division, one rounding)."""
        import torch

        from soupkern.backends.device import round_f64

        if self._in_model == tuple(self.kept):  # the last candidate scored was kept: it is the soup
            return
        if self._state is None and self.recompute:
            self._recompute_into(self.kept)
            return
        self._ensure_sums()
        assert self._state is not None
        with torch.no_grad():
            for n, t in self.targets.items():
                # a tensor divisor: torch turns division by a Python number into a multiplication
                # by its rounded reciprocal on CUDA, which is not the IEEE division of the contract
                divisor = torch.full((), float(self.n), dtype=torch.float64, device=self.sums[n].device)
                t.copy_(round_f64(self.sums[n] / divisor, t.dtype))
                self._state.release(n)


STATE_IN_MEMORY_BYTES = 1 << 30
RECOMPUTE_MAX = 8  # on a CPU, candidates of at most this many ingredients are recomputed from the files


class _SumState:
    """The fp64 running sums. Up to STATE_IN_MEMORY_BYTES (or on a GPU): ordinary tensors. Larger,
    on the CPU: views of one unnamed temporary file (in `state_dir`, default the system's temporary
    folder) mapped shared, released tensor by tensor after use, so resident memory stays at about
    one tensor while the sums of a multi-GB model live in the page cache and on disk (8 bytes per
    parameter; ViT-G/14: 15 GB)."""

    def __init__(self, names: Sequence[str], shapes: dict[str, tuple[int, ...]], device: torch.device,
                 state_dir: str | None):
        import mmap
        import tempfile

        import numpy as np
        import torch

        numels = {n: math.prod(shapes[n]) for n in names}
        total = sum(8 * v for v in numels.values())
        self._map: mmap.mmap | None = None
        self._spans: dict[str, tuple[int, int]] = {}
        if device.type != "cpu" or total <= STATE_IN_MEMORY_BYTES:
            self.tensors = {n: torch.zeros(shapes[n], dtype=torch.float64, device=device) for n in names}
            return
        cursor = 0
        for n in names:  # page-aligned spans, so each tensor's pages can be released on their own
            span = -(-8 * numels[n] // mmap.PAGESIZE) * mmap.PAGESIZE
            self._spans[n] = (cursor, span)
            cursor += span
        with tempfile.TemporaryFile(dir=state_dir, prefix=".soupkern-greedy-sums-") as f:
            try:
                # reserve the blocks now: a write fault into a hole of a full disk would be SIGBUS
                os.posix_fallocate(f.fileno(), 0, max(cursor, 1))
            except OSError as e:
                raise OutputError(f"{state_dir or tempfile.gettempdir()}: cannot reserve {cursor / 1e9:.2f} GB for the greedy soup's running sums "
                                  f"({e.strerror}); free space there or pass state_dir=") from None
            self._map = mmap.mmap(f.fileno(), max(cursor, 1), flags=mmap.MAP_SHARED)
        whole = np.frombuffer(self._map, dtype=np.uint8)
        self.tensors = {}
        for n in names:
            b = self._spans[n][0]
            self.tensors[n] = torch.from_numpy(whole[b: b + 8 * numels[n]].view(np.float64)).view(shapes[n])

    def release(self, name: str) -> None:
        if self._map is not None and name in self._spans:
            import mmap

            b, length = self._spans[name]
            if length:
                self._map.madvise(mmap.MADV_DONTNEED, b, length)  # shared mapping: the data stays in the file

    def close(self) -> None:
        self.tensors = {}
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # views still alive: the mapping goes with the last one
                pass
            self._map = None


class _Staged:
    """Ingredient bytes to a CUDA device through two pinned staging buffers used in turn: the
    host copies piece i + 1 out of the mapped file while the device copies piece i in (on a side
    stream, asynchronously), and the caller's stream waits for the copies instead of the host —
    in place of one synchronous copy from pageable memory per tensor. On a CPU device (tests)
    the same steps run synchronously."""

    PIECE_BYTES = 32 << 20

    def __init__(self, device: torch.device, piece_bytes: int = PIECE_BYTES):
        import torch

        self.torch = torch
        self.device = device
        self.cuda = device.type == "cuda"
        self.piece = piece_bytes
        stage = [torch.empty(piece_bytes, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(2)]
        self.stage = [memoryview(s.numpy()) for s in stage]
        self._stage_tensors = stage
        self.left = [torch.cuda.Event() if self.cuda else None for _ in range(2)]  # a piece's copy-in done
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.turn = 0
        self.pieces = 0
        try:
            from soupkern._native import copy  # type: ignore[attr-defined]  # multi-threaded memcpy
        except ImportError:
            copy = None
        self._copy = copy

    def to_device(self, raw: memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A new tensor on the device holding the bytes `raw` (of `dtype`, `shape`), ready for the
        current stream's work (its copies are ordered before it)."""
        from soupkern.torch_dtypes import TORCH_DTYPES

        torch = self.torch
        n = raw.nbytes
        out = torch.empty(n, dtype=torch.uint8, device=self.device)
        current = torch.cuda.current_stream(self.device) if self.cuda else None
        if self.stream is not None and current != self.stream:
            self.stream.wait_stream(current)  # `out` may be memory the current stream just freed
        try:
            for lo in range(0, n, self.piece):
                hi = min(lo + self.piece, n)
                slot, self.turn = self.turn, self.turn ^ 1
                if self.left[slot] is not None:
                    self.left[slot].synchronize()  # the piece that used this buffer has been copied in
                dst = self.stage[slot][:hi - lo]
                if self._copy is not None and hi - lo >= 1 << 20:
                    self._copy(dst, raw[lo:hi], hi - lo, 0)
                else:
                    dst[:] = raw[lo:hi]
                with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
                    out[lo:hi].copy_(self._stage_tensors[slot][:hi - lo], non_blocking=self.cuda)
                if self.left[slot] is not None:
                    self.left[slot].record(self.stream)
                self.pieces += 1
        finally:  # also on an error: `out` is freed on the current stream only after its copies
            if current is not None and current != self.stream:
                current.wait_stream(self.stream)
        return out.view(TORCH_DTYPES[dtype]).view(shape)


def _staging_for(device: torch.device) -> _Staged | None:
    """How `_RunningSoup` moves ingredient tensors to its device: pinned staging on a CUDA device,
    None (zero-copy views of the mapped files) on the CPU."""
    return _Staged(device) if device.type == "cuda" else None


class _Prefetcher:
    """Device copies of the ingredients greedy reads next, made on a worker thread (its own pinned
    staging and CUDA stream) while the device evaluates the current candidates: at most `limit`
    ingredients held or in flight. `hint` names the next ones (dropping others); `take(index)`
    gives {tensor name: device tensor}, ordered before the caller's stream's work, or None when
    `index` was not prefetched (the caller then reads it itself). A read's error (a changed
    file, a mismatched ingredient) surfaces at its `take`."""

    def __init__(self, soup: _RunningSoup, limit: int, staged: _Staged):
        from concurrent.futures import ThreadPoolExecutor

        self.soup = soup
        self.limit = max(limit, 1)
        self.staged = staged
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="soupkern-prefetch")
        self.pending: dict[int, Any] = {}  # index -> Future of (tensors, event), submitted in hint order
        self.queue: list[int] = []  # hinted, not yet submitted
        self.taken = 0

    def hint(self, indices: Sequence[int]) -> None:
        wanted = list(dict.fromkeys(indices))
        for i in [i for i in self.pending if i not in wanted]:
            self.pending.pop(i).cancel()  # a copy already running finishes; its tensors are dropped
        self.queue = [i for i in wanted if i not in self.pending]
        self._fill()

    def _fill(self) -> None:
        while self.queue and len(self.pending) < self.limit:
            i = self.queue.pop(0)
            self.pending[i] = self.pool.submit(self._read, i)

    def _read(self, index: int) -> tuple[dict[str, torch.Tensor], Any] | None:
        """Ingredient `index` on the device, allocated and copied on the staging's own stream (so
        the copies never wait for the evaluation queued on the caller's stream), and the event
        after them; None when the device is out of memory (the caller then reads it itself)."""
        import torch

        xs: dict[str, torch.Tensor] = {}
        if not self.staged.cuda:
            self.soup._each_tensor(index, xs.__setitem__, staged=self.staged)
            return xs, None
        try:
            with torch.cuda.stream(self.staged.stream):
                self.soup._each_tensor(index, xs.__setitem__, staged=self.staged)
                event = torch.cuda.Event()
                event.record(self.staged.stream)
        except torch.cuda.OutOfMemoryError:
            return None
        return xs, event

    def take(self, index: int) -> dict[str, torch.Tensor] | None:
        import torch

        future = self.pending.pop(index, None)
        self._fill()
        if future is None or future.cancelled():
            return None
        done = future.result()
        if done is None:
            return None
        xs, event = done
        if event is not None:
            stream = torch.cuda.current_stream(self.soup.device)
            stream.wait_event(event)
            for x in xs.values():  # allocated on the staging stream, used (and freed) on this one
                x.record_stream(stream)
        self.taken += 1
        return xs  # type: ignore[no-any-return]

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True)


PREFETCH_SHARE = 0.25  # of the device's free memory that prefetched ingredients may take


def _prefetcher_for(soup: _RunningSoup, ahead: int) -> _Prefetcher | None:
    """On a CUDA device, a prefetcher of up to `ahead` ingredients, as many as fit in
    PREFETCH_SHARE of the free device memory (none if not one fits); None on the CPU, where
    ingredients are zero-copy views and there is nothing to overlap."""
    if soup.device.type != "cuda":
        return None
    import torch

    from soupkern.io import dtype_itemsize

    size = sum(math.prod(shape) * dtype_itemsize(dtype) for n, (dtype, shape) in soup.layout.items() if n in soup.names)
    free, _ = torch.cuda.mem_get_info(soup.device)
    free -= (ahead // 2) * size  # what speculation's stacked candidates (about one model each) will take
    fits = int(max(free, 0) * PREFETCH_SHARE // max(size, 1))
    return _Prefetcher(soup, min(ahead, fits), _Staged(soup.device)) if fits >= 1 else None


def _device_kernels(device: torch.device) -> DeviceKernels:
    """The greedy candidate/accept kernels for `device` (CUDA/Triton on a GPU, torch ops otherwise)."""
    from soupkern.backends.device import device_kernels

    return device_kernels(device)


@reserves_output
def greedy_soup(
    ingredients: Sequence[Any],
    out: PathLike | None = None,
    *,
    model: nn.Module | Callable[[], nn.Module] | None = None,
    data: Iterable[Any] | None = None,
    metric: str | MetricFn = "accuracy",
    score: ScoreFn | None = None,
    maximize: bool | None = None,
    evaluator: Evaluator | None = None,
    device: str | torch.device | None = None,
    ingredient_scores: Sequence[float] | None = None,
    tie: TieRule = "ge",
    sort: SortRule = "stable",
    speculative: int | None = None,
    on_step: Callable[[GreedyStep], None] | None = None,
    dtype: object = None,
    keys: str = "same",
    max_shard_size: int | None = None,
    overwrite: bool = False,
    fsync: bool = False,
    budget_bytes: int | None = None,
    backend: str | None = None,
    progress: bool = False,
    metadata: dict[str, str] | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    state_dict_key: str | None = None,
    copy_from: PathLike | None = None,
    allow_config_mismatch: bool = False,
    int_policy: str = "auto",
    out_format: str = "safetensors",
    lora: str = "refuse",
    distributed: bool = False,
) -> GreedyResult:
    """Greedy soup of `ingredients` (any source: paths of any format, state dicts, modules),
    written to `out` when given.

    Scoring: `evaluator`, or one built from `model` (module or factory, state-dict names = the
    ingredients' tensor names) with held-out `data` + `metric` ("accuracy", "loss" or a callable), or
    with `score(model) -> float`. `maximize` overrides the metric's direction. `ingredient_scores`
    (input order) skips step 1. `speculative`: candidates per batched pass. Default: 8 where a
    pass over the data costs more than its arithmetic, i.e. the model is on a GPU or the data is a
    `torch.utils.data.DataLoader`; otherwise 1 (in-memory batches on a CPU: batched evaluation is
    compute-bound there and measured slower, see benchmarks/results/greedy_digits_cpu.md). A score
    callable allows only 1.
    `tie`, `sort`: see the module docstring. Output options (`dtype`, `overwrite`, `backend`,
    `progress`) as `weighted_soup`; `metadata` is added to the greedy provenance. `state_dir`: where
    running sums too large for memory live (an unnamed temporary file; default the output's folder,
    else the system's temporary folder).

    `distributed`: inside an initialized process group (torchrun), every rank runs the same
    greedy search with the held-out batches split over the ranks (`Evaluator(distributed=True)`:
    the scores, and so every pick, are the single-process ones, to the bit); with `speculative`
    S > 1 the ranks form a candidates × data mesh (`distributed.candidate_mesh`: gcd(W, S)
    candidate groups), each rank forming and scoring only its candidates of a window on its
    data rank's batches; rank 0 alone holds the output lock and writes the soup; an error on any
    rank is raised on every rank.

    On return the model holds the in-memory greedy soup; see `GreedyResult` for the record.
    """
    from soupkern.evaluate import make_evaluator

    t0 = time.perf_counter()
    paths = ingredient_list(ingredients)
    write = dict(dtype=dtype, keys=keys, max_shard_size=max_shard_size, overwrite=overwrite, fsync=fsync, backend=backend,
                 state_dict_key=state_dict_key, copy_from=copy_from, allow_config_mismatch=allow_config_mismatch,
                 int_policy=int_policy, out_format=out_format, lora=lora, **({} if budget_bytes is None else {"budget_bytes": budget_bytes}))
    if out is not None:  # fail before the evaluations, not after them
        check_soup_output(paths, out, metadata=metadata, **write)  # type: ignore[arg-type]
    if distributed and evaluator is not None:
        raise InputError("distributed=True builds its own evaluator: give model, data and metric, not evaluator")
    ev = make_evaluator(model, data, metric=metric, score=score, maximize=maximize, device=device, evaluator=evaluator,
                        distributed=distributed)
    if speculative is None:
        speculative = DEFAULT_SPECULATIVE if ev.can_batch() and _passes_are_costly(ev) else 1
    if speculative < 1:
        raise InputError(f"speculative must be >= 1, got {speculative}")
    if speculative > 1 and not ev.can_batch():
        raise InputError("speculative greedy (speculative > 1) needs held-out data and a metric so candidates can be "
                         "scored in one batched pass; with a score callable use speculative=1")
    if tie not in ("ge", "gt"):
        raise InputError(f"tie must be 'ge' or 'gt', got {tie!r}")
    if state_dir is None and out is not None:
        state_dir = os.path.dirname(os.path.abspath(os.fspath(out)))
    soup = _RunningSoup(ev, paths, None if state_dir is None else os.fspath(state_dir), state_dict_key)
    if len(paths) > 1 and lora != "factorwise":  # candidates are averaged factor by factor: see plan._check_lora
        from soupkern.plan import _check_lora

        try:
            _check_lora(soup.names, soup.labels[0], "refuse")
        except BaseException:
            soup.close()
            raise
    try:
        soup.prefetcher = _prefetcher_for(soup, 2 * speculative)  # this window and the next
        return _greedy_run(soup, ev, paths, out, t0, ingredient_scores=ingredient_scores, speculative=speculative,
                           tie=tie, sort=sort, on_step=on_step, write=write, progress=progress, metadata=metadata)
    finally:
        soup.close()


def _greedy_run(soup: _RunningSoup, ev: Evaluator, paths: list[Any], out: PathLike | None, t0: float, *,
                ingredient_scores: Sequence[float] | None, speculative: int, tie: TieRule, sort: SortRule,
                on_step: Callable[[GreedyStep], None] | None, write: dict[str, Any], progress: bool,
                metadata: dict[str, str] | None) -> GreedyResult:

    mesh = None
    if ev.group is not None and speculative > 1 and ev.can_batch():
        from soupkern.distributed import candidate_mesh

        mesh = candidate_mesh(ev.group, speculative, ev.device.type)
    if ingredient_scores is None:
        scores = _score_ingredients(soup, speculative, mesh)
    else:
        scores = [float(s) for s in ingredient_scores]
        if len(scores) != len(paths):
            raise InputError(f"{len(scores)} ingredient scores for {len(paths)} ingredients")
    order = sort_order(scores, maximize=ev.maximize, sort=sort)
    position = {j: p for p, j in enumerate(order)}
    passes = 0

    def score_candidates(kept: tuple[int, ...], window: Sequence[int]) -> list[float]:
        nonlocal passes
        # the running sum holds exactly `kept` (greedy_select only extends kept after a window)
        while soup.n < len(kept):
            soup.accept(kept[soup.n])
        passes += 1
        if mesh is None:  # read ahead while this window is evaluated: the next one if none of it is kept
            after = position[window[-1]] + 1
            soup.prefetch([*window, *order[after:after + speculative]])
        if len(window) == 1 or not ev.can_batch():
            out_scores = []
            for j in window:
                soup.candidate_into_model(j)
                out_scores.append(ev.score())
            return out_scores
        if mesh is not None:  # this rank forms and scores only its share of the window
            return ev.score_spread(lambda ids: soup.stacked([window[i] for i in ids]), len(window), mesh)
        return ev.score_stacked(soup.stacked(window))

    steps, kept, best, evaluated = greedy_select(order, scores[order[0]], score_candidates, tie=tie,
                                                 maximize=ev.maximize, speculative=speculative, on_step=on_step)
    while soup.n < len(kept):
        soup.accept(kept[soup.n])
    soup.final_into_model()
    result = GreedyResult(tuple(paths), tuple(scores), tuple(order), tuple(steps), tuple(kept), float(best), tie,
                          sort, ev.maximize, speculative, evaluated, passes, 0.0, None)
    report = None
    if out is not None:
        n = len(kept)

        def write_soup() -> SoupReport:
            return weighted_soup([paths[i] for i in kept], [1.0] * n, out, divisor=n, progress=progress,
                                 recipe="greedy", metadata={**result.metadata(), **(metadata or {})}, **write)

        if ev.group is None:
            report = write_soup()
        else:  # every rank holds the same soup; rank 0 writes it, and its outcome is every rank's
            report = ev.group.on_rank_0(write_soup, "writing the greedy soup", long=True)
    return replace(result, seconds=time.perf_counter() - t0, report=report)



def _passes_are_costly(ev: Evaluator) -> bool:
    """Whether sharing a pass over the data among several candidates pays (see `greedy_soup`)."""
    from torch.utils.data import DataLoader

    return ev.device.type != "cpu" or isinstance(ev.data, DataLoader)


def _score_ingredients(soup: _RunningSoup, speculative: int, mesh: CandidateMesh | None) -> list[float]:
    """Every ingredient's own score (weights rounded to the model's dtype), in input order."""
    ev = soup.ev
    scores: list[float] = []
    count = len(soup.paths)
    if mesh is None:
        soup.prefetch(range(count))  # read in input order
    if speculative > 1 and ev.can_batch():
        for start in range(0, count, speculative):
            idx = list(range(start, min(start + speculative, count)))
            if mesh is None:
                scores += ev.score_stacked(soup.stacked(idx, relative=False))
                continue
            scores += ev.score_spread(lambda ids, idx=idx: soup.stacked([idx[i] for i in ids], relative=False),  # type: ignore[misc]
                                      len(idx), mesh)
        return scores
    for i in range(count):
        soup.ingredient_into_model(i)
        scores.append(ev.score())
    return scores
