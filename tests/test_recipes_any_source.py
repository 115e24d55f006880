"""Every recipe through one call form on any source: the same digits ingredients given as
safetensors files, as in-memory state dicts, as modules and as `.pt` / DCP copies give the same
picks, coefficients and bytes; the deprecated learned_soup form still works, with a warning.

Everything is compared bit for bit: the sources hold the same values, and every recipe is
deterministic given its inputs (the learned soup is seeded)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import soupkern
from soupkern.examples import digits
from soupkern.recipes.learned import learned_soup

from digits_fixtures import digits_dir, digits_ingredients, digits_splits  # noqa: F401


@pytest.fixture(scope="module")
def sources(digits_ingredients, tmp_path_factory):  # noqa: F811
    """The ingredients as files, state dicts, modules and .pt / DCP copies."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path_factory.mktemp("any_source")
    paths = digits_ingredients[:4]
    sds = [load_file(str(p)) for p in paths]
    modules = []
    for sd in sds:
        m = digits.make_model()
        m.load_state_dict(sd)
        modules.append(m)
    pts = []
    for i, sd in enumerate(sds):
        pts.append(folder / f"ing{i}.pth.tar")
        torch.save({"state_dict": sd, "epoch": i}, pts[-1])
    dcps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for i, sd in enumerate(sds):
            dcps.append(folder / f"ing{i}.dcp")
            dcp.save({"model": sd}, checkpoint_id=dcps[-1])
    return {"files": paths, "state dicts": sds, "modules": modules, "pickles": pts, "dcp": dcps,
            "mix": [paths[0], sds[1], pts[2], dcps[3]]}


KINDS = ["state dicts", "modules", "pickles", "dcp", "mix"]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize("kind", KINDS)
def test_uniform_and_weighted_from_any_source(sources, tmp_path: Path, kind: str) -> None:
    ref = soupkern.uniform_state_dict(sources["files"])
    assert same(soupkern.uniform_state_dict(sources[kind]), ref)
    soupkern.uniform_soup(sources[kind], tmp_path / "u.safetensors")
    assert same(load_file(str(tmp_path / "u.safetensors")), ref)
    c = [0.25, 0.5, -0.125, 0.375]
    assert same(soupkern.weighted_state_dict(sources[kind], c), soupkern.weighted_state_dict(sources["files"], c))


@pytest.mark.parametrize("kind", ["state dicts", "mix"])
def test_greedy_from_any_source(sources, digits_splits, tmp_path: Path, kind: str) -> None:  # noqa: F811
    val = digits.batches(digits_splits.val, 128)
    ref = soupkern.greedy_soup(sources["files"], tmp_path / "ref.safetensors", model=digits.make_model, data=val)
    got = soupkern.greedy_soup(sources[kind], tmp_path / "g", model=digits.make_model, data=val,
                               max_shard_size=10**9, fsync=True, budget_bytes=1 << 20)
    assert got.kept == ref.kept and got.ingredient_scores == ref.ingredient_scores
    assert got.final_score == ref.final_score
    assert same(load_file(str(tmp_path / "g" / "model.safetensors")),
                load_file(str(tmp_path / "ref.safetensors")))


def test_learned_new_and_deprecated_forms(sources, digits_splits, tmp_path: Path) -> None:  # noqa: F811
    val = digits.batches(digits_splits.val, 128)
    new = learned_soup(sources["mix"], tmp_path / "new.safetensors", model=digits.make_model(), data=val, steps=3)
    with pytest.warns(DeprecationWarning, match="learned_soup\\(ingredients, model, data, out\\) is deprecated"):
        old = learned_soup(sources["files"], digits.make_model(), val, tmp_path / "old.safetensors", steps=3)
    assert new.coefficients == old.coefficients and new.loss_history == old.loss_history
    assert same(load_file(str(tmp_path / "new.safetensors")), load_file(str(tmp_path / "old.safetensors")))
    with pytest.raises(soupkern.InputError, match="needs the model"):
        learned_soup(sources["files"], tmp_path / "x.safetensors", data=val)
    with pytest.raises(TypeError, match="by keyword"):
        learned_soup(sources["files"], tmp_path / "x.safetensors", digits.make_model())


def test_ensembles_and_analysis_from_any_source(sources, digits_splits) -> None:  # noqa: F811
    val = digits.batches(digits_splits.val, 128)
    ref = soupkern.logit_ensemble(sources["files"], model=digits.make_model, data=val)
    got = soupkern.logit_ensemble(sources["mix"], model=digits.make_model, data=val)
    assert got.score == ref.score and got.ingredient_scores == ref.ingredient_scores
    g_ref = soupkern.delta_gram(sources["files"], sources["files"][0])
    g = soupkern.delta_gram(sources["state dicts"], sources["modules"][0])
    assert (g.gram == g_ref.gram).all()
    assert g.labels[1] == "<state dict #1>"
