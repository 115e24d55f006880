"""Output (logit) ensembles, the baseline every soup is compared with, and the greedy ensemble.

One model is resident: each ingredient's weights are loaded into it in turn and its outputs over
the held-out data are cached ([N, C] per ingredient, small next to the weights). The ensemble's
outputs are the mean of its members' outputs, accumulated in fp64 in member order and divided by
the member count (fp64 result); the score is the evaluator's metric on them (accuracy: top-1 of
the averaged logits). Costs K forward passes for K ingredients, and inference with an ensemble
costs K forward passes too, which is what a soup avoids.

Greedy ensemble: the greedy soup's rule (`greedy_select`: sort by individual score, start from the
best, add the next ingredient if the ensemble's score does not drop (`tie="ge"`) or rises
(`tie="gt"`)) with the candidate being the output ensemble instead of the weight soup; computed
from the cached outputs, so it costs no forward pass beyond the K cached ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from soupkern.errors import InputError
from soupkern.io.sources import labels
from soupkern.options import ingredient_list
from soupkern.recipes.greedy import GreedyStep, SortRule, TieRule, greedy_select, sort_order

if TYPE_CHECKING:
    import torch
    from torch import nn

    from soupkern.evaluate import Evaluator, MetricFn

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class IngredientOutputs:
    """Cached outputs of each ingredient over the held-out data, plus the metric to score them."""

    paths: tuple[Any, ...]
    outputs: tuple[torch.Tensor, ...]  # [N, ...] per ingredient, as the model returned them
    targets: torch.Tensor  # [N]
    metric: MetricFn
    maximize: bool
    # (batch index, first row, end row) of each held-out batch in `outputs`; () = one batch
    bounds: tuple[tuple[int, int, int], ...] = ()
    # under a process group: this rank's batches only, scores gathered (see `score`)
    group: Any = field(default=None, compare=False, repr=False)

    def ensemble(self, members: Sequence[int]) -> torch.Tensor:
        """Mean of the members' outputs: fp64 sum in member order, divided by len(members)."""
        if not members:
            raise InputError("an ensemble needs at least one member")
        total = self.outputs[members[0]].to(dtype=_f64())
        for k in members[1:]:
            total = total + self.outputs[k].to(dtype=_f64())
        return total / len(members)

    def score(self, outputs: torch.Tensor) -> float:
        """The metric's mean over the samples: fp64 sums per held-out batch, added in batch order
        (under a process group, every rank's batches gathered first: the same float as one
        process)."""
        values = self.metric(outputs, self.targets.to(outputs.device)) if len(self.targets) else None
        bounds = self.bounds or ((0, 0, len(self.targets)),)
        sums = []
        if values is not None:  # one device synchronization for every batch's sum
            import torch

            totals = torch.stack([values[a:b].sum(dtype=_f64()) for _, a, b in bounds]).tolist()
            sums = [(i, t, b - a) for (i, a, b), t in zip(bounds, totals)]
        from soupkern.distributed import in_order

        total, count = 0.0, 0
        for _, s, n in in_order(sums, self.group):
            total += s
            count += n
        if count == 0:
            raise InputError("the held-out data is empty")
        return total / count

    def ingredient_scores(self) -> list[float]:
        return [self.score(o) for o in self.outputs]


def _f64() -> torch.dtype:
    import torch

    return torch.float64


def ingredient_outputs(ingredients: Sequence[Any], *, model: nn.Module | Callable[[], nn.Module] | None = None,
                       data: Iterable[Any] | None = None, metric: str | MetricFn = "accuracy",
                       maximize: bool | None = None, device: str | torch.device | None = None,
                       evaluator: Evaluator | None = None, state_dict_key: str | None = None,
                       distributed: bool = False) -> IngredientOutputs:
    """Load each ingredient into the one model in turn and cache its outputs over `data`.
    `distributed`: inside a process group (torchrun), each rank caches the outputs of batches
    r, r + W, ... only, and every score gathers the per-batch sums: every rank gets the scores,
    and so the picks of `greedy_ensemble`, of one process, to the bit."""
    from soupkern.evaluate import make_evaluator

    ev = make_evaluator(model, data, metric=metric, maximize=maximize, device=device, evaluator=evaluator,
                        distributed=distributed)
    if ev.data is None:
        raise InputError("an output ensemble needs held-out data (a score callable gives no outputs)")
    paths = tuple(ingredient_list(ingredients))
    outs = []
    targets, bounds = None, ()
    for p, label in zip(paths, labels(paths)):
        ev.load_checkpoint_(p, label, state_dict_key)
        o, targets, bounds = ev.outputs_by_batch()
        outs.append(o)
    assert targets is not None  # paths is non-empty
    return IngredientOutputs(paths, tuple(outs), targets, ev.metric, ev.maximize, bounds, ev.group)


@dataclass(frozen=True)
class EnsembleResult:
    """An output ensemble: members (indices into `paths`) and its held-out score."""

    paths: tuple[Any, ...]
    members: tuple[int, ...]
    score: float
    ingredient_scores: tuple[float, ...]
    steps: tuple[GreedyStep, ...] = ()  # greedy ensemble only
    order: tuple[int, ...] = ()  # greedy ensemble only


def logit_ensemble(ingredients: Sequence[Any] | IngredientOutputs, members: Sequence[int] | None = None,
                   **kwargs: Any) -> EnsembleResult:
    """Score the output ensemble of `members` (default: all) of `ingredients`.

    `ingredients` is a list of checkpoints (then `kwargs` are those of `ingredient_outputs`) or
    already cached `IngredientOutputs`.
    """
    cache = ingredients if isinstance(ingredients, IngredientOutputs) else ingredient_outputs(ingredients, **kwargs)
    chosen = tuple(range(len(cache.paths))) if members is None else tuple(members)
    for k in chosen:
        if not 0 <= k < len(cache.paths):
            raise InputError(f"member {k} is not an ingredient index (0..{len(cache.paths) - 1})")
    return EnsembleResult(cache.paths, chosen, cache.score(cache.ensemble(chosen)), tuple(cache.ingredient_scores()))


def greedy_ensemble(ingredients: Sequence[Any] | IngredientOutputs, *, tie: TieRule = "ge",
                    sort: SortRule = "stable", **kwargs: Any) -> EnsembleResult:
    """Greedy ensemble over cached outputs (same rule, order and tie options as `greedy_soup`)."""
    cache = ingredients if isinstance(ingredients, IngredientOutputs) else ingredient_outputs(ingredients, **kwargs)
    scores = cache.ingredient_scores()
    order = sort_order(scores, maximize=cache.maximize, sort=sort)
    # running fp64 sum of the kept members' outputs, extended when greedy_select has kept more
    state: dict[str, Any] = {"kept": (order[0],), "sum": cache.outputs[order[0]].to(dtype=_f64())}

    def score_candidates(kept: tuple[int, ...], window: Sequence[int]) -> list[float]:
        for k in kept[len(state["kept"]):]:
            state["sum"] = state["sum"] + cache.outputs[k].to(dtype=_f64())
        state["kept"] = kept
        n = len(kept)
        return [cache.score((state["sum"] + cache.outputs[j].to(dtype=_f64())) / (n + 1)) for j in window]

    steps, kept, best, _ = greedy_select(order, scores[order[0]], score_candidates, tie=tie, maximize=cache.maximize)
    return EnsembleResult(cache.paths, tuple(kept), float(best), tuple(scores), tuple(steps), tuple(order))
