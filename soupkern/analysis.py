"""Analysis of ingredients: the Gram matrix of their deltas from a base, and loss/accuracy along a line.

`delta_gram` streams every float tensor of every file once, as the engine's work items (zero-copy
views of every file over the same elements, bounded memory: `engine.run`), and accumulates in float64

    G[i, j] = <Δ_i, Δ_j>,   Δ_i = θ_i - θ_base   (θ_i when no base is given)

over all float tensors (or those whose name matches `include`). From G: norms ||Δ_i|| = √G_ii,
cosines G_ij / (||Δ_i|| ||Δ_j||), angles in degrees, and L2 distances
||Δ_i - Δ_j|| = ||θ_i - θ_j|| = √max(G_ii + G_jj - 2 G_ij, 0) (the paper's angle-vs-soup-gain figure).

`soup_scores` scores any S soups Σ_k A[s,k]·θ_k with batched soup evaluation (one pass over the
held-out data per metric); on it: `interpolation_curve` (θ(α) = (1-α)·θ_a + α·θ_b at a grid of α)
and `pair_gains` (angle between two deltas vs the gain of their 50/50 soup, for every pair).
"""

from __future__ import annotations

import math
import os
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from soupkern.engine import DEFAULT_BUDGET_BYTES, MIN_BUDGET_BYTES, WorkItem, plan_items, run
from soupkern.errors import InputError
from soupkern.io import dtype_itemsize
from soupkern.io.sources import labels
from soupkern.options import ingredient_list
from soupkern.plan import KeyPolicy, TensorPlan, build_plan
from soupkern.recipes.weighted import open_ingredients

if TYPE_CHECKING:
    import torch

    from soupkern.io.buffers import Bytes
    from torch import nn

    from soupkern.evaluate import MetricFn

PathLike = str | os.PathLike[str]
_FLOAT_NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


def decode_f64(raw: Bytes, dtype: str) -> np.ndarray:
    """Raw little-endian bytes of a float tensor (F64/F32/F16/BF16) -> float64 values, exactly."""
    raw = np.frombuffer(raw, dtype=np.uint8)
    if dtype == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return raw.view(np.dtype(_FLOAT_NP[dtype]).newbyteorder("<")).astype(np.float64)


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(list(header)), line(["-" * w for w in widths]), *(line(r) for r in cells)])


@dataclass(frozen=True)
class GramResult:
    """The Gram matrix of ingredient deltas and what follows from it (all float64)."""

    labels: tuple[str, ...]
    base: str | None
    gram: np.ndarray  # [K, K]
    tensors: int
    elements: int  # per ingredient
    bytes_read: int
    seconds: float

    @property
    def norms(self) -> np.ndarray:
        """||Δ_i||."""
        return np.sqrt(np.maximum(np.diag(self.gram), 0.0))

    @property
    def cosine(self) -> np.ndarray:
        """G_ij / (||Δ_i|| ||Δ_j||); NaN where a delta is zero."""
        n = self.norms
        with np.errstate(invalid="ignore", divide="ignore"):
            c = self.gram / np.outer(n, n)
        return np.clip(c, -1.0, 1.0)

    @property
    def angles_deg(self) -> np.ndarray:
        """Angle between Δ_i and Δ_j in degrees (NaN where a delta is zero)."""
        return np.degrees(np.arccos(self.cosine))

    @property
    def distances(self) -> np.ndarray:
        """||θ_i - θ_j|| = √max(G_ii + G_jj - 2 G_ij, 0)."""
        d = np.diag(self.gram)
        return np.sqrt(np.maximum(d[:, None] + d[None, :] - 2.0 * self.gram, 0.0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: labels, base, gram, norms, cosine, angles_deg, distances, counts."""
        def lst(a: np.ndarray) -> list[Any]:
            return [[None if not math.isfinite(v) else float(v) for v in row] for row in a.tolist()] if a.ndim == 2 \
                else [float(v) for v in a.tolist()]

        return {"labels": list(self.labels), "base": self.base, "gram": lst(self.gram), "norms": lst(self.norms),
                "cosine": lst(self.cosine), "angles_deg": lst(self.angles_deg), "distances": lst(self.distances),
                "tensors": self.tensors, "elements": self.elements, "bytes_read": self.bytes_read,
                "seconds": self.seconds}

    def to_table(self) -> str:
        """Norms, then one row per pair i < j: angle (degrees), cosine, L2 distance."""
        short = [os.path.basename(os.path.normpath(p)) or p for p in self.labels]
        head = _table(["ingredient", "||delta||"], [(s, f"{v:.6g}") for s, v in zip(short, self.norms)])
        ang, cos, dist = self.angles_deg, self.cosine, self.distances
        pairs = [(short[i], short[j], f"{ang[i, j]:.3f}", f"{cos[i, j]:.6f}", f"{dist[i, j]:.6g}")
                 for i in range(len(short)) for j in range(i + 1, len(short))]
        body = _table(["a", "b", "angle_deg", "cosine", "l2_distance"], pairs) if pairs else "(one ingredient: no pairs)"
        return f"{head}\n\n{body}"


def delta_gram(
    ingredients: Sequence[Any],
    base: Any = None,
    *,
    include: str | Callable[[str], bool] | None = None,
    keys: KeyPolicy = "same",
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    state_dict_key: str | None = None,
) -> GramResult:
    """G[i, j] = <θ_i - θ_base, θ_j - θ_base> over float tensors, in one streaming pass.

    Every file is read once, item by item through the engine (`engine.run`, zero-copy views); an
    item's decoded fp64 values of all K ingredients and the base fit in `budget_bytes`, and its
    input pages are released when done. Each item's deltas (fp64 differences of the exactly
    decoded values) add D·Dᵀ to the fp64 accumulator. Tensor names, shapes and dtypes are checked
    across all files (and the base) as for a soup; non-float tensors are skipped. `include`: a regex
    (re.search on the tensor name) or a predicate choosing the tensors; default all float tensors.
    """
    ingredients = ingredient_list(ingredients)
    if budget_bytes < MIN_BUDGET_BYTES:
        raise InputError(f"budget_bytes must be at least {MIN_BUDGET_BYTES}, got {budget_bytes}")
    if isinstance(include, str):
        try:
            pattern = re.compile(include)
        except re.error as e:
            raise InputError(f"include is not a valid regular expression: {e}") from None
        chosen: Callable[[str], bool] = lambda name: pattern.search(name) is not None  # noqa: E731
    else:
        chosen = include or (lambda name: True)
    t0 = time.perf_counter()
    k = len(ingredients)
    paths = [*ingredients, *([base] if base is not None else [])]
    gram = np.zeros((k, k), dtype=np.float64)
    bytes_read = 0
    with ExitStack() as stack:
        checkpoints = open_ingredients(stack, paths, state_dict_key)
        plan = build_plan(checkpoints, [0.0] * len(paths), keys=keys)
        chosen_tensors = [tp for tp in plan.tensors if tp.average and chosen(tp.out.name)]

        def step(tp: TensorPlan) -> int:  # the decoded fp64 columns and the mapped inputs fit the budget
            return max(1, budget_bytes // (len(paths) * 8 + sum(dtype_itemsize(i.dtype) for _, i in tp.sources)))

        def add(item: WorkItem, views: list[np.ndarray]) -> None:
            nonlocal gram, bytes_read
            cols = [decode_f64(v, info.dtype) for v, (_, info) in zip(views, item.sources)]
            d = np.stack(cols[:k])
            if base is not None:
                d -= cols[k]
            del cols
            gram += d @ d.T
            bytes_read += item.nbytes_read

        run(plan_items(plan, step, chosen_tensors), add)
        n_tensors = len(chosen_tensors)
        elements = sum(tp.numel for tp in chosen_tensors)
    if n_tensors == 0:
        raise InputError("no float tensor selected for the analysis"
                         + (" (check the include pattern)" if include is not None else ""), path=checkpoints[0].path)
    gram = (gram + gram.T) / 2  # exact: both halves are the same sums; removes BLAS asymmetry if any
    names = labels(paths)
    return GramResult(tuple(names[:k]), None if base is None else names[k],
                      gram, n_tensors, elements, bytes_read, time.perf_counter() - t0)



@dataclass(frozen=True)
class InterpolationCurve:
    """Scores of θ(α) = (1-α)·θ_a + α·θ_b: `scores[metric][i]` at `alphas[i]`."""

    a: str
    b: str
    alphas: tuple[float, ...]
    scores: dict[str, tuple[float, ...]]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "alphas": list(self.alphas),
                "scores": {m: list(v) for m, v in self.scores.items()}, "seconds": self.seconds}

    def to_table(self) -> str:
        metrics = list(self.scores)
        return _table(["alpha", *metrics],
                      [(f"{al:.4g}", *(f"{self.scores[m][i]:.6f}" for m in metrics)) for i, al in enumerate(self.alphas)])


def soup_scores(
    ingredients: Sequence[Any],
    coefficients: Sequence[Sequence[float]],
    model: nn.Module,
    data: Iterable[Any],
    *,
    metrics: Sequence[str | MetricFn] = ("loss", "accuracy"),
    device: str | torch.device | None = None,
    max_soups: int | None = None,
    state_dict_key: str | None = None,
    distributed: bool = False,
) -> dict[str, tuple[float, ...]]:
    """Held-out scores of S soups Σ_k A[s,k]·θ_k (rows of `coefficients` [S][K]), batched.

    Each soup's float tensors are formed in fp64 from the ingredients' zero-copy views and rounded
    once to the model's dtype (a row with a single 1 reproduces that ingredient exactly), stacked
    [S, ...] on the model's device and scored by `soupkern.evaluate.Evaluator.score_stacked`
    (torch.func.functional_call under torch.vmap: each batch is shared by the S soups), one pass
    over `data` per metric. Memory: S copies of the model's float tensors plus the activations of
    `max_soups` soups at a time. Non-float tensors (e.g. integer buffers) are loaded into the model
    from the first ingredient; the model's float weights are left unchanged. Metrics: "loss",
    "accuracy" or callables as in `Evaluator`. Returns metric name -> S scores. `distributed`:
    inside a process group, the batches are split over the ranks and the scores gathered
    (`Evaluator(distributed=True)`: the single-process floats, on every rank).
    """
    import torch

    from soupkern.evaluate import Evaluator, tensor_view

    ingredients = ingredient_list(ingredients)
    a = torch.tensor([list(map(float, row)) for row in coefficients], dtype=torch.float64)
    if a.dim() != 2 or a.shape[0] == 0 or a.shape[1] != len(ingredients) or not bool(torch.isfinite(a).all()):
        raise InputError(f"coefficients must be a non-empty [S][K={len(ingredients)}] matrix of finite numbers, "
                         f"got shape {list(a.shape)}")
    if not metrics:
        raise InputError("at least one metric is needed")
    evaluators = [Evaluator(model, data, metric=m, device=device, distributed=distributed) for m in metrics]
    ev = evaluators[0]
    stacked: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        cks = open_ingredients(stack, ingredients, state_dict_key)
        for ck in cks:
            ev.check_names(ck.tensors, path=ck.path)
        fixed = {}
        for name, target in ev.tensors.items():
            views = [tensor_view(ck, name) for ck in cks]
            for ck, v in zip(cks, views):
                if tuple(v.shape) != tuple(target.shape):
                    raise InputError(f"shape {list(v.shape)} does not match the model's {list(target.shape)}",
                                     path=ck.path, tensor=name)
            if not target.is_floating_point():
                fixed[name] = views[0]
                continue
            mixed = torch.zeros((a.shape[0], *target.shape), dtype=torch.float64)
            for k, v in enumerate(views):  # one ingredient at a time: no [K, ...] stack of copies
                mixed += a[:, k].reshape((-1,) + (1,) * v.dim()) * v.to(torch.float64)
            stacked[name] = mixed.to(dtype=target.dtype, device=target.device)
        ev.load_(fixed)
    scores = {}
    for m, e in zip(metrics, evaluators):
        label = m if isinstance(m, str) else getattr(m, "__name__", "metric")
        scores[label] = tuple(e.score_stacked(stacked, max_soups=max_soups))
    return scores


def interpolation_curve(
    a: PathLike,
    b: PathLike,
    model: nn.Module,
    data: Iterable[Any],
    *,
    alphas: Sequence[float] | None = None,
    metrics: Sequence[str | MetricFn] = ("loss", "accuracy"),
    device: str | torch.device | None = None,
    max_soups: int | None = None,
    distributed: bool = False,
) -> InterpolationCurve:
    """Held-out scores along the line θ(α) = (1-α)·θ_a + α·θ_b, every α in one batched pass per metric.

    alphas: default 0, 0.1, ..., 1 (any real values: outside [0, 1] extrapolates); α = 0 and 1
    give θ_a and θ_b exactly. The soups are formed and scored by `soup_scores` (see there for
    rounding, memory, metrics and `distributed`).
    """
    t0 = time.perf_counter()
    grid = tuple(float(x) for x in (alphas if alphas is not None else [i / 10 for i in range(11)]))
    if not grid or not all(math.isfinite(x) for x in grid):
        raise InputError(f"alphas must be a non-empty list of finite numbers, got {list(grid)}")
    scores = soup_scores([a, b], [(1.0 - al, al) for al in grid], model, data, metrics=metrics, device=device,
                         max_soups=max_soups, distributed=distributed)
    return InterpolationCurve(*labels([a, b]), grid, scores, time.perf_counter() - t0)


@dataclass(frozen=True)
class PairGains:
    """Angle between ingredient deltas vs the gain of their two-ingredient soup (the paper's figure).

    gain[i, j] = score(½θ_i + ½θ_j) - ½(score(θ_i) + score(θ_j)) (for a loss, lower is better: a
    negative gain is an improvement). `angles_deg` from the Gram matrix of deltas from the base.
    """

    labels: tuple[str, ...]
    metric: str
    individual: tuple[float, ...]
    soup: np.ndarray  # [K, K], NaN on the diagonal
    angles_deg: np.ndarray  # [K, K]
    gram: GramResult

    @property
    def gain(self) -> np.ndarray:
        ind = np.asarray(self.individual)
        return self.soup - (ind[:, None] + ind[None, :]) / 2

    def to_dict(self) -> dict[str, Any]:
        k = len(self.labels)
        pairs = [{"a": self.labels[i], "b": self.labels[j], "angle_deg": float(self.angles_deg[i, j]),
                  "soup": float(self.soup[i, j]), "gain": float(self.gain[i, j])}
                 for i in range(k) for j in range(i + 1, k)]
        return {"labels": list(self.labels), "metric": self.metric, "individual": list(self.individual),
                "pairs": pairs, "gram": self.gram.to_dict()}

    def to_table(self) -> str:
        short = [os.path.basename(os.path.normpath(p)) or p for p in self.labels]
        rows = sorted(((self.angles_deg[i, j], short[i], short[j], self.soup[i, j], self.gain[i, j])
                       for i in range(len(short)) for j in range(i + 1, len(short))), key=lambda r: r[0])
        return _table(["a", "b", "angle_deg", f"soup {self.metric}", "gain"],
                      [(a, b, f"{ang:.3f}", f"{sc:.6f}", f"{g:+.6f}") for ang, a, b, sc, g in rows])


def pair_gains(
    ingredients: Sequence[PathLike],
    base: PathLike,
    model: nn.Module,
    data: Iterable[Any],
    *,
    metric: str | MetricFn = "accuracy",
    device: str | torch.device | None = None,
    max_soups: int | None = None,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> PairGains:
    """For every pair of ingredients: the angle between their deltas from `base` (`delta_gram`, one
    streaming pass) and the score of their 50/50 soup vs the mean of their own scores, with the K
    ingredients and the K(K-1)/2 pair soups scored in one batched pass (`soup_scores`)."""
    k = len(ingredients)
    if k < 2:
        raise InputError("pair gains need at least two ingredients")
    gram = delta_gram(ingredients, base, budget_bytes=budget_bytes)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    rows = [[1.0 if c == i else 0.0 for c in range(k)] for i in range(k)]
    rows += [[0.5 if c in (i, j) else 0.0 for c in range(k)] for i, j in pairs]
    label = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
    scores = soup_scores(ingredients, rows, model, data, metrics=[metric], device=device, max_soups=max_soups)[label]
    soup = np.full((k, k), np.nan)
    for (i, j), sc in zip(pairs, scores[k:]):
        soup[i, j] = soup[j, i] = sc
    return PairGains(gram.labels, label, tuple(scores[:k]), soup, gram.angles_deg, gram)
