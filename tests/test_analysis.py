"""soupkern.analysis: Gram matrix of ingredient deltas vs numpy fp64; interpolation curve endpoints."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from soupkern.analysis import delta_gram
from soupkern.errors import InputError, MismatchError

# tensor name -> (shape, dtype per file: base, then ingredients 0..3); a mix incl. bf16 and fp16,
# one tensor larger than a 1 MiB budget's chunk, odd sizes, a scalar-like tensor
LAYOUT = {
    "big.weight": ((300, 401), ["F32", "F32", "BF16", "F32", "F16"]),
    "blk.0.bias": ((37,), ["BF16", "BF16", "BF16", "BF16", "BF16"]),
    "blk.0.weight": ((5, 7, 3), ["F16", "F32", "F16", "BF16", "F64"]),
    "head.scale": ((1,), ["F64", "F64", "F32", "F16", "BF16"]),
}
TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def write_files(tmp: Path, seed: int = 0) -> tuple[Path, list[Path]]:
    g = torch.Generator().manual_seed(seed)
    base_vals = {n: torch.randn(shape, generator=g, dtype=torch.float64) for n, (shape, _) in LAYOUT.items()}
    paths = []
    for f in range(5):
        tensors: dict[str, torch.Tensor] = {}
        for name, (shape, dtypes) in LAYOUT.items():
            v = base_vals[name] if f == 0 else base_vals[name] + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)
            tensors[name] = v.to(TORCH[dtypes[f]])
        tensors["step"] = torch.tensor([7], dtype=torch.int64)  # identical non-float: skipped
        p = tmp / ("base.safetensors" if f == 0 else f"ing{f - 1}.safetensors")
        save_file(tensors, str(p))
        paths.append(p)
    return paths[0], paths[1:]


def flat64(path: Path, names: list[str]) -> np.ndarray:
    """All chosen tensors of a file, decoded by torch (independent of soupkern) to float64."""
    sd = load_file(str(path))
    return np.concatenate([sd[n].to(torch.float64).numpy().ravel() for n in names])


def reference(base: Path | None, ings: list[Path], names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    thetas = np.stack([flat64(p, names) for p in ings])
    d = thetas - flat64(base, names) if base is not None else thetas
    ref = np.array([[math.fsum(d[i] * d[j]) for j in range(len(ings))] for i in range(len(ings))])
    absref = np.abs(d) @ np.abs(d).T
    return ref, absref


def assert_gram(got: np.ndarray, ref: np.ndarray, absref: np.ndarray, n: int) -> None:
    # Both sides form the same correctly rounded fp64 differences and sum fp64 products; they
    # differ only in summation order, each within n·u·Σ|d_i d_j| of the exact sum.
    bound = n * 2.0**-53 * absref
    assert np.all(np.abs(got - ref) <= bound), np.max(np.abs(got - ref) / bound)


@pytest.mark.parametrize("budget", [1 << 20, 64 << 20])
def test_gram_matches_numpy_fp64(tmp_path: Path, budget: int) -> None:
    base, ings = write_files(tmp_path)
    names = sorted(LAYOUT)
    r = delta_gram(ings, base, budget_bytes=budget)
    ref, absref = reference(base, ings, names)
    n = sum(math.prod(s) for s, _ in LAYOUT.values())
    assert r.tensors == len(LAYOUT) and r.elements == n
    assert_gram(r.gram, ref, absref, n)
    assert np.array_equal(r.gram, r.gram.T)
    np.testing.assert_allclose(r.norms, np.sqrt(np.diag(ref)), rtol=1e-12)
    # distances and angles against direct fp64 computations on the decoded weights
    thetas = np.stack([flat64(p, names) for p in ings])
    d = thetas - flat64(base, names)
    for i in range(len(ings)):
        for j in range(len(ings)):
            assert r.distances[i, j] == pytest.approx(np.linalg.norm(thetas[i] - thetas[j]), rel=1e-9, abs=1e-12)
            cos = np.dot(d[i], d[j]) / np.linalg.norm(d[i]) / np.linalg.norm(d[j])
            assert r.angles_deg[i, j] == pytest.approx(math.degrees(math.acos(min(1.0, cos))), abs=1e-5)
    assert np.allclose(np.diag(r.angles_deg), 0.0, atol=1e-5) and np.all(np.diag(r.distances) == 0.0)
    # independent fine-tuning noise: nearly orthogonal deltas of equal scale (a sanity check of the fixture)
    off = r.angles_deg[~np.eye(len(ings), dtype=bool)]
    assert np.all((off > 80) & (off < 100))


def test_gram_without_base_and_with_include(tmp_path: Path) -> None:
    base, ings = write_files(tmp_path, seed=1)
    r = delta_gram(ings)
    names = sorted(LAYOUT)
    ref, absref = reference(None, ings, names)
    assert_gram(r.gram, ref, absref, r.elements)
    r2 = delta_gram(ings, base, include=r"^blk\.")
    ref2, absref2 = reference(base, ings, ["blk.0.bias", "blk.0.weight"])
    assert r2.tensors == 2
    assert_gram(r2.gram, ref2, absref2, r2.elements)
    r3 = delta_gram(ings, base, include=lambda name: name == "head.scale")
    assert r3.tensors == 1 and r3.elements == 1


def test_gram_table_and_dict(tmp_path: Path) -> None:
    base, ings = write_files(tmp_path, seed=2)
    r = delta_gram(ings[:3], base)
    d = r.to_dict()
    assert d["labels"] == [str(p) for p in ings[:3]] and len(d["gram"]) == 3 and d["base"] == str(base)
    table = r.to_table()
    assert "angle_deg" in table and "ing0.safetensors" in table and table.count("\n") >= 8
    one = delta_gram(ings[:1], base)
    assert "no pairs" in one.to_table()


def test_gram_errors(tmp_path: Path) -> None:
    base, ings = write_files(tmp_path)
    with pytest.raises(InputError, match="no float tensor"):
        delta_gram(ings, base, include="nothing-matches")
    with pytest.raises(InputError, match="regular expression"):
        delta_gram(ings, base, include="(")
    with pytest.raises(InputError, match="at least one"):
        delta_gram([], base)
    bad = tmp_path / "bad.safetensors"
    sd = load_file(str(ings[0]))
    sd["blk.0.bias"] = torch.zeros(36, dtype=torch.bfloat16)
    save_file(sd, str(bad))
    with pytest.raises(MismatchError, match="blk.0.bias"):
        delta_gram([*ings, bad], base)


# ----------------------------------------------------------------------------- interpolation
@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from soupkern.examples import digits

    paths = digits.make_ingredients(tmp_path_factory.mktemp("digits"), n=3, seed=0)
    return paths, digits.make_splits(0)


def _scores(state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    from soupkern.examples import digits

    model = digits.make_model()
    model.load_state_dict(state)
    with torch.no_grad():
        out = model(x)
    return float(torch.nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).double().mean())


def test_interpolation_curve_endpoints_and_midpoint(two_models) -> None:  # type: ignore[no-untyped-def]
    from soupkern.analysis import interpolation_curve
    from soupkern.examples import digits

    (a, b, _), splits = two_models
    model = digits.make_model(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    curve = interpolation_curve(a, b, model, digits.batches(splits.val, 100), alphas=[0.0, 0.25, 0.5, 1.0, 1.5])
    assert curve.alphas == (0.0, 0.25, 0.5, 1.0, 1.5) and set(curve.scores) == {"loss", "accuracy"}
    sa, sb = load_file(str(a)), load_file(str(b))
    mid = {n: (0.5 * sa[n].double() + 0.5 * sb[n].double()).float() for n in sa}
    for i, state in [(0, sa), (3, sb), (2, mid)]:
        loss, acc = _scores(state, splits.val.x, splits.val.y)
        # batched (vmap) vs one model: same fp32 weights (exact at the endpoints), matmul rounding only
        assert curve.scores["loss"][i] == pytest.approx(loss, rel=1e-5)
        assert curve.scores["accuracy"][i] == pytest.approx(acc, abs=1 / len(splits.val.y) + 1e-12)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # model weights untouched
    assert "alpha" in curve.to_table() and curve.to_dict()["alphas"][-1] == 1.5
    with pytest.raises(InputError, match="alphas"):
        interpolation_curve(a, b, model, digits.batches(splits.val, 100), alphas=[])


def test_soup_scores_and_pair_gains(two_models) -> None:  # type: ignore[no-untyped-def]
    from soupkern.analysis import pair_gains, soup_scores
    from soupkern.examples import digits

    paths, splits = two_models
    data = digits.batches(splits.val, 128)
    sds = [load_file(str(p)) for p in paths]
    rows = [[0.2, 0.3, 0.5], [0.0, 0.0, 1.0], [-0.5, 1.0, 0.5]]
    got = soup_scores(paths, rows, digits.make_model(), data)
    for r, row in enumerate(rows):
        state = {n: sum(c * sd[n].double() for c, sd in zip(row, sds)).float() for n in sds[0]}  # type: ignore[union-attr]
        loss, acc = _scores(state, splits.val.x, splits.val.y)
        assert got["loss"][r] == pytest.approx(loss, rel=1e-5)
        assert got["accuracy"][r] == pytest.approx(acc, abs=1 / len(splits.val.y) + 1e-12)
    with pytest.raises(InputError, match="coefficients"):
        soup_scores(paths, [[1.0, 0.0]], digits.make_model(), data)

    base = paths[0].parent / digits.BASE_NAME
    pg = pair_gains(paths, base, digits.make_model(), data)
    assert pg.metric == "accuracy" and len(pg.individual) == 3
    gram = delta_gram(paths, base)
    assert np.array_equal(pg.angles_deg, gram.angles_deg)
    for i in range(3):
        assert pg.individual[i] == pytest.approx(_scores(sds[i], splits.val.x, splits.val.y)[1], abs=1e-12)
        for j in range(3):
            if i == j:
                assert math.isnan(pg.soup[i, j])
                continue
            mid = {n: (0.5 * sds[i][n].double() + 0.5 * sds[j][n].double()).float() for n in sds[0]}
            assert pg.soup[i, j] == pytest.approx(_scores(mid, splits.val.x, splits.val.y)[1], abs=1 / len(splits.val.y) + 1e-12)
            assert pg.gain[i, j] == pytest.approx(pg.soup[i, j] - (pg.individual[i] + pg.individual[j]) / 2)
    assert len(pg.to_dict()["pairs"]) == 3 and "gain" in pg.to_table()
