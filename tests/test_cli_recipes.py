"""`soupkern greedy | learned | analyze` end to end on real digits ingredients."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
import torch
from safetensors.torch import load_file

import soupkern
from soupkern.cli import main
from soupkern.examples import digits

N = 4


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    wd = tmp_path_factory.mktemp("cli_recipes")
    paths = digits.make_ingredients(wd, N, seed=0)
    (wd / "hooks.py").write_text(textwrap.dedent("""
        from soupkern.examples import digits

        SPLITS = digits.make_splits(0)

        def score_model(model):
            return digits.accuracy(model, *SPLITS.val)

        def score_state(state):
            model = digits.make_model()
            model.load_state_dict(state)
            return digits.accuracy(model, *SPLITS.val)

        def data():
            return digits.batches(SPLITS.val)
    """))
    return wd, paths


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


@pytest.mark.parametrize("hook", ["model", "state"])
def test_greedy(work: tuple[Path, list[Path]], hook: str, capsys: pytest.CaptureFixture[str]) -> None:
    from soupkern.recipes.greedy import greedy_soup

    wd, paths = work
    out = wd / f"greedy_{hook}.safetensors"
    argv = ["greedy", *map(str, paths), "--score", f"{wd / 'hooks.py'}:score_{hook}", "-o", str(out), "--tie", "gt"]
    if hook == "model":
        argv += ["--model", "soupkern.examples.digits:make_model"]
    assert main(argv) == 0
    assert "in soup" in capsys.readouterr().err
    splits = digits.make_splits(0)
    expected = greedy_soup(paths, model=digits.make_model, score=lambda m: digits.accuracy(m, *splits.val), tie="gt")
    meta = _meta(out)
    assert meta["soupkern.recipe"] == "greedy"
    assert meta["soupkern.greedy.tie"] == "gt"
    assert json.loads(meta["soupkern.greedy.kept"]) == [str(p) for p in expected.kept_paths]


def test_greedy_bad_score_spec(work: tuple[Path, list[Path]], capsys: pytest.CaptureFixture[str]) -> None:
    wd, paths = work
    out = wd / "never.safetensors"
    assert main(["greedy", *map(str, paths), "--score", "no_such_module_xyz:f", "-o", str(out)]) == 2
    assert "no_such_module_xyz" in capsys.readouterr().err
    assert not out.exists()


def test_learned(work: tuple[Path, list[Path]], capsys: pytest.CaptureFixture[str]) -> None:
    wd, paths = work
    out = wd / "learned.safetensors"
    assert main(["learned", *map(str, paths), "--model", "soupkern.examples.digits:make_model",
                 "--data", f"{wd / 'hooks.py'}:data", "--epochs", "2", "-o", str(out)]) == 0
    coeffs = json.loads(_meta(out)["soupkern.learned.coefficients"])
    assert len(coeffs) == N and abs(sum(coeffs) - 1) < 1e-9
    # the file is the weighted soup with the recorded coefficients (fp32 accumulation, one rounding)
    states = [load_file(str(p)) for p in paths]
    soup = load_file(str(out))
    for name, t in soup.items():
        exact = sum(c * s[name].double() for c, s in zip(coeffs, states))
        np.testing.assert_allclose(t.double().numpy(), exact.numpy(), rtol=4 * N * 2**-24, atol=1e-6)


def test_analyze_json(work: tuple[Path, list[Path]], capsys: pytest.CaptureFixture[str]) -> None:
    wd, paths = work
    base = wd / digits.BASE_NAME
    assert main(["analyze", *map(str, paths), "--base", str(base), "--json"]) == 0
    got = np.array(json.loads(capsys.readouterr().out)["gram"])
    b = load_file(str(base))
    deltas = [np.concatenate([(load_file(str(p))[k].double() - b[k].double()).numpy().ravel() for k in sorted(b)])
              for p in paths]
    np.testing.assert_allclose(got, np.array([[d1 @ d2 for d2 in deltas] for d1 in deltas]), rtol=1e-12)
    assert main(["analyze", *map(str, paths), "--base", str(base)]) == 0
    assert "angle_deg" in capsys.readouterr().out


def test_output_checked_before_any_evaluation(work: tuple[Path, list[Path]]) -> None:
    """An unwritable output fails before the (expensive) evaluations or training, not after."""
    from soupkern.errors import InputError, OutputError
    from soupkern.recipes.greedy import greedy_soup
    from soupkern.recipes.learned import learned_soup

    wd, paths = work
    taken = wd / "taken.safetensors"
    taken.write_bytes(b"not ours")
    calls = []

    def score(model: object) -> float:
        calls.append(1)
        return 0.0

    with pytest.raises(OutputError, match="already exists"):
        greedy_soup(paths, taken, model=digits.make_model, score=score)
    with pytest.raises(OutputError, match="does not exist"):
        greedy_soup(paths, wd / "no_such_dir" / "g.safetensors", model=digits.make_model, score=score)
    assert calls == []
    splits = digits.make_splits(0)
    with pytest.raises(OutputError, match="already exists"):
        learned_soup(paths, digits.make_model(), digits.batches(splits.val), taken, progress=lambda *a: calls.append(1))
    assert calls == []
    assert taken.read_bytes() == b"not ours"


def test_interpolate(work: tuple[Path, list[Path]], capsys: pytest.CaptureFixture[str]) -> None:
    """WiSE-FT from the command line: the curve equals interpolation_curve's (one batched pass),
    the written soup is the weighted soup at the best alpha (or the one asked for), the plot is
    written."""
    from soupkern.analysis import interpolation_curve

    wd, paths = work
    base = wd / digits.BASE_NAME
    out = wd / "wise.safetensors"
    argv = ["interpolate", str(base), str(paths[0]), "--model", "soupkern.examples.digits:make_model",
            "--data", f"{wd / 'hooks.py'}:data", "--alphas", "0:1:0.25", "--plot", str(wd / "curve.png"),
            "-o", str(out)]
    assert main(argv) == 0
    curve = interpolation_curve(base, paths[0], digits.make_model(), digits.batches(digits.make_splits(0).val),
                                alphas=[0.0, 0.25, 0.5, 0.75, 1.0])
    meta = _meta(out)
    assert json.loads(meta["soupkern.interpolate.curve"])["scores"] == {m: list(v) for m, v in curve.scores.items()}
    acc = curve.scores["accuracy"]
    alpha = float(meta["soupkern.interpolate.alpha"])
    assert alpha == curve.alphas[acc.index(max(acc))]
    want = soupkern.weighted_state_dict([base, paths[0]], [1 - alpha, alpha])
    got = load_file(str(out))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (wd / "curve.png").stat().st_size > 1000
    assert main([*argv[:-1], str(wd / "wise2.safetensors"), "--alpha", "0.3"]) == 0
    assert float(_meta(wd / "wise2.safetensors")["soupkern.interpolate.alpha"]) == 0.3
