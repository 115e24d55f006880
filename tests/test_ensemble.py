"""Logit ensembles and the greedy ensemble against direct computations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from digits_fixtures import digits_dir, digits_ingredients, digits_splits  # noqa: F401
from safetensors.torch import load_file

from soupkern.errors import InputError
from soupkern.evaluate import Evaluator
from soupkern.examples import digits
from soupkern.recipes.ensemble import IngredientOutputs, greedy_ensemble, ingredient_outputs, logit_ensemble


@pytest.fixture(scope="module")
def direct_logits(digits_ingredients: list[Path], digits_splits: digits.Splits) -> list[torch.Tensor]:
    """Each ingredient's logits on the full val set, computed independently (fresh model, load_file)."""
    out = []
    for p in digits_ingredients:
        model = digits.DigitsMLP()
        model.load_state_dict(load_file(str(p)))
        with torch.no_grad():
            out.append(model.eval()(digits_splits.val.x))
    return out


@pytest.fixture(scope="module")
def cache(digits_ingredients: list[Path], digits_splits: digits.Splits) -> IngredientOutputs:
    return ingredient_outputs(digits_ingredients, model=digits.make_model(), data=digits.batches(digits_splits.val, 128))


def test_cached_outputs_are_each_ingredients_logits(cache: IngredientOutputs, direct_logits: list[torch.Tensor],
                                                    digits_splits: digits.Splits) -> None:
    assert torch.equal(cache.targets, digits_splits.val.y)
    for got, ref in zip(cache.outputs, direct_logits):
        # batches of 128 vs one batch of 359 through the same fp32 matmuls: equal up to blocking order
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_ensemble_logits_are_the_mean(cache: IngredientOutputs, direct_logits: list[torch.Tensor],
                                      digits_splits: digits.Splits) -> None:
    y = digits_splits.val.y
    for members in ([0], [3, 1], [0, 2, 4, 6], list(range(len(direct_logits)))):
        ens = cache.ensemble(members)
        ref = torch.stack([cache.outputs[k].double() for k in members]).mean(0)
        # both fp64 sums of the same fp32 values (a few ulp of fp64 apart at most)
        torch.testing.assert_close(ens, ref, rtol=1e-14, atol=1e-14)
        indep = torch.stack([direct_logits[k].double() for k in members]).mean(0)
        torch.testing.assert_close(ens, indep, rtol=1e-5, atol=1e-5)  # fp32 logits as above
        r = logit_ensemble(cache, members)
        assert r.members == tuple(members)
        assert r.score == int((ref.argmax(1) == y).sum()) / len(y)
    loss_cache = IngredientOutputs(cache.paths, cache.outputs, cache.targets,
                                   lambda o, t: F.cross_entropy(o, t, reduction="none"), False)
    r = logit_ensemble(loss_cache, [1, 2])
    ref_loss = float(F.cross_entropy((cache.outputs[1].double() + cache.outputs[2].double()) / 2, y))
    assert math.isclose(r.score, ref_loss, rel_tol=1e-12)


def test_logit_ensemble_from_paths(digits_ingredients: list[Path], digits_splits: digits.Splits,
                                   cache: IngredientOutputs) -> None:
    r = logit_ensemble(digits_ingredients, model=digits.make_model(), data=digits.batches(digits_splits.val, 128))
    assert r.members == tuple(range(len(digits_ingredients)))
    assert r.score == logit_ensemble(cache).score
    assert list(r.ingredient_scores) == cache.ingredient_scores()
    with pytest.raises(InputError, match="member 99"):
        logit_ensemble(cache, [99])
    with pytest.raises(InputError, match="held-out data"):
        ingredient_outputs(digits_ingredients, evaluator=Evaluator(digits.make_model(), score=lambda m: 0.0))


def _naive_greedy_ensemble(logits: list[torch.Tensor], y: torch.Tensor, tie: str) -> list[int]:
    def acc(members: list[int]) -> float:
        return int((torch.stack([logits[k].double() for k in members]).mean(0).argmax(1) == y).sum()) / len(y)

    scores = [acc([k]) for k in range(len(logits))]
    order = sorted(range(len(logits)), key=lambda k: -scores[k])
    kept, best = [order[0]], scores[order[0]]
    for j in order[1:]:
        a = acc(kept + [j])
        if a >= best if tie == "ge" else a > best:
            kept, best = kept + [j], a
    return kept


@pytest.mark.parametrize("n_val", [60, 359])
def test_greedy_ensemble_matches_naive(digits_ingredients: list[Path], digits_splits: digits.Splits,
                                       n_val: int) -> None:
    val = digits.TensorPair(digits_splits.val.x[:n_val], digits_splits.val.y[:n_val])
    c = ingredient_outputs(digits_ingredients, model=digits.make_model(), data=[val])
    logits = list(c.outputs)
    picks = {}
    for tie in ("ge", "gt"):
        r = greedy_ensemble(c, tie=tie)  # type: ignore[arg-type]
        assert list(r.members) == _naive_greedy_ensemble(logits, val.y, tie)
        assert r.score == logit_ensemble(c, r.members).score
        assert r.score >= max(r.ingredient_scores)  # greedy never ends below its best member
        picks[tie] = r.members
    if n_val == 60:  # ties are common on 60 images: the two rules differ here
        assert picks["ge"] != picks["gt"]
