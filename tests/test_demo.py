"""The digits demo at a tiny size: outputs exist, every recipe ran through soupkern, and the
table's numbers are recomputed independently from the saved checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from soupkern.demo import COLUMNS, ROWS, DemoConfig, run_demo
from soupkern.examples import digits


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    workdir = tmp_path_factory.mktemp("demo")
    assert run_demo(workdir, DemoConfig.tiny(), quiet=True) == 0
    return workdir, json.loads((workdir / "results.json").read_text())


def _accuracy(state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Plain forward pass of the MLP from raw tensors (independent of DigitsMLP and soupkern)."""
    w = {k: v.double() for k, v in state.items()}
    h = torch.relu(x.double() @ w["fc1.weight"].T + w["fc1.bias"])
    h = torch.relu(h @ w["fc2.weight"].T + w["fc2.bias"])
    logits = h @ w["head.weight"].T + w["head.bias"]
    return float((logits.argmax(1) == y).double().mean())


def test_outputs_written(demo: tuple[Path, dict]) -> None:
    workdir, result = demo
    assert (workdir / "results.md").read_text().count("\n| ") == 2 * len(ROWS) + 3  # two tables: headers, rules, rows
    assert (workdir / "soups.png").stat().st_size > 10_000
    seed = result["per_seed"][0]
    assert len(seed["ingredients"]) == DemoConfig.tiny().ingredients
    for ing in seed["ingredients"]:
        assert Path(ing["path"]).is_file()


def test_every_soup_came_from_soupkern(demo: tuple[Path, dict]) -> None:
    workdir = demo[0] / "seed0" / "soups"
    for recipe in ("uniform", "greedy", "learned"):
        with safe_open(str(workdir / f"{recipe}.safetensors"), framework="pt") as f:
            meta = f.metadata()
        assert meta["soupkern.recipe"] == recipe
        assert meta["soupkern.version"]


def test_table_recomputed_from_checkpoints(demo: tuple[Path, dict]) -> None:
    workdir, result = demo
    seed = result["per_seed"][0]
    splits = digits.make_splits(seed["seed"])
    sets = {"held-out": splits.val, "test": splits.test, "shift:noise": splits.shifts["noise"],
            "shift:rotate": splits.shifts["rotate"]}
    soups = workdir / "seed0" / "soups"
    # fp64 forward vs the demo's fp32 forward: a few test points may sit on a logit tie; allow one
    tol = {name: 1.0 / len(data.y) + 1e-12 for name, data in sets.items()}
    files = {"uniform soup": soups / "uniform.safetensors", "greedy soup": soups / "greedy.safetensors",
             "learned soup": soups / "learned.safetensors", "best single model": Path(seed["best_single"])}
    for row, path in files.items():
        state = load_file(str(path))
        for col in COLUMNS:
            assert abs(_accuracy(state, *sets[col]) - seed["rows"][row][col]) <= tol[col], (row, col)
    # the uniform soup is the fp64 mean of the ingredients, rounded once to fp32
    states = [load_file(i["path"]) for i in seed["ingredients"]]
    uniform = load_file(str(files["uniform soup"]))
    for name, t in uniform.items():
        exact = sum(s[name].double() for s in states) / len(states)
        np.testing.assert_allclose(t.double().numpy(), exact.numpy(), rtol=2 * len(states) * 2**-24, atol=1e-7)
    # logit ensemble: mean of the ingredients' logits
    for col in COLUMNS:
        x, y = sets[col]
        logits = []
        for s in states:
            w = {k: v.double() for k, v in s.items()}
            h = torch.relu(torch.relu(x.double() @ w["fc1.weight"].T + w["fc1.bias"]) @ w["fc2.weight"].T + w["fc2.bias"])
            logits.append(h @ w["head.weight"].T + w["head.bias"])
        acc = float((torch.stack(logits).mean(0).argmax(1) == y).double().mean())
        assert abs(acc - seed["rows"]["logit ensemble"][col]) <= tol[col]
    # best single = the ingredient with the best held-out accuracy
    best = max(seed["ingredients"], key=lambda i: i["held-out"])
    assert best["held-out"] == seed["rows"]["best single model"]["held-out"]


def test_ingredients_are_cached(demo: tuple[Path, dict]) -> None:
    workdir, result = demo
    paths = [Path(i["path"]) for i in result["per_seed"][0]["ingredients"]]
    before = [p.stat().st_mtime_ns for p in paths]
    again = digits.make_ingredients(workdir / "seed0", len(paths), 0)
    assert again == paths
    assert [p.stat().st_mtime_ns for p in paths] == before
