"""The digits example: deterministic splits and shifts, cached ingredients, averageable weights."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from digits_fixtures import N_INGREDIENTS, SEED, digits_dir, digits_ingredients, digits_splits  # noqa: F401
from safetensors import safe_open

from soupkern.errors import InputError
from soupkern.examples import digits

NAMES = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "head.weight", "head.bias"}


def test_splits_are_stratified_disjoint_and_deterministic(digits_splits: digits.Splits) -> None:
    s = digits_splits
    total = len(s.train.y) + len(s.val.y) + len(s.test.y)
    assert total == 1797
    # disjoint and covering: every image (as a row of raw pixel values) appears in exactly one split
    # (load_digits has duplicate images, so compare multisets of (label, pixels) rows)
    all_rows = sorted(map(tuple, torch.cat([digits.load_arrays().x, digits.load_arrays().y[:, None]], 1).tolist()))
    split_rows = sorted(map(tuple, torch.cat([torch.cat([p.x, p.y[:, None].float()], 1)
                                              for p in (s.train, s.val, s.test)]).tolist()))
    assert split_rows == all_rows
    # stratified: each class's share of val is 20% of that class, to within rounding (<= 1 image)
    y_all = digits.load_arrays().y
    for c in range(10):
        assert abs(int((s.val.y == c).sum()) - 0.2 * int((y_all == c).sum())) <= 0.5 + 1e-9
    again = digits.make_splits(SEED)
    for a, b in [(s.train, again.train), (s.val, again.val), (s.test, again.test)]:
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    other = digits.make_splits(SEED + 1)
    assert not torch.equal(other.val.y, s.val.y)


def test_shifts_change_images_not_labels(digits_splits: digits.Splits) -> None:
    s = digits_splits
    assert set(s.shifts) == set(digits.SHIFT_KINDS)
    for kind, shifted in s.shifts.items():
        assert torch.equal(shifted.y, s.test.y)
        assert shifted.x.shape == s.test.x.shape
        assert not torch.equal(shifted.x, s.test.x), kind
        assert torch.equal(shifted.x, digits.shifted(s.test, kind, seed=SEED * 1000 + digits.SHIFT_KINDS.index(kind)).x)
    # roll is a permutation of each image's pixels: per-image pixel multisets are unchanged
    assert torch.equal(s.shifts["roll"].x.sort(1).values, s.test.x.sort(1).values)
    # noise has the documented standard deviation (0.3): sample std over ~23k pixels within 3%
    assert abs(float((s.shifts["noise"].x - s.test.x).std()) - 0.3) < 0.01
    with pytest.raises(InputError, match="unknown shift"):
        digits.shifted(s.test, "blur")


def test_rotate_by_zero_is_identity_and_by_90_is_rot90() -> None:
    x = torch.arange(64, dtype=torch.float32).reshape(1, 64) / 64
    pair = digits.TensorPair(x, torch.zeros(1, dtype=torch.int64))
    # angle 0: the sampling grid hits pixel centers exactly (align_corners=False), so identity up to
    # the float rounding of the grid coordinates (~1e-7 relative)
    torch.testing.assert_close(digits.shifted(pair, "rotate", strength=0.0).x, x, atol=1e-6, rtol=0)
    # 90 degrees maps the 8x8 pixel-center lattice onto itself: a rot90 of the image
    rot = digits.rotate_images(x, torch.tensor([torch.pi / 2])).reshape(8, 8)
    img = x.reshape(8, 8)
    assert any(torch.allclose(rot, torch.rot90(img, k, (0, 1)), atol=1e-5) for k in (1, 3))


def test_ingredients_share_names_init_and_are_cached(digits_ingredients: list[Path], digits_dir: Path) -> None:
    assert len(digits_ingredients) == N_INGREDIENTS
    base = digits.load_state(digits_dir / digits.BASE_NAME)
    assert set(base) == NAMES
    states = [digits.load_state(p) for p in digits_ingredients]
    for st in states:
        assert set(st) == NAMES and all(st[k].shape == base[k].shape and st[k].dtype == torch.float32 for k in st)
        assert not torch.equal(st["head.weight"], base["head.weight"])  # fine-tuning moved every layer
    # distinct hyperparameters give distinct ingredients
    assert len({st["fc1.weight"].sum().item() for st in states}) == N_INGREDIENTS
    cfg = digits.ingredient_config(digits_ingredients[0])
    assert cfg["finetune"] == dataclasses.asdict(digits.sample_configs(N_INGREDIENTS, SEED)[0])
    assert cfg["dtype"] == "F32" and cfg["split_seed"] == SEED
    mtimes = [os.stat(p).st_mtime_ns for p in digits_ingredients]
    again = digits.make_ingredients(digits_dir, N_INGREDIENTS, SEED)
    assert again == digits_ingredients
    assert [os.stat(p).st_mtime_ns for p in again] == mtimes  # reused, not retrained


def test_training_is_deterministic_and_learns(digits_splits: digits.Splits, digits_dir: Path,
                                              digits_ingredients: list[Path]) -> None:
    init = digits.load_state(digits_dir / digits.BASE_NAME)
    torch.testing.assert_close(digits.pretrain(digits_splits), init, atol=0, rtol=0)
    cfg = digits.sample_configs(N_INGREDIENTS, SEED)[1]
    a = digits.finetune(init, cfg, digits_splits)
    b = digits.finetune(init, cfg, digits_splits)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # bit-identical run to run
    torch.testing.assert_close(a, digits.load_state(digits_ingredients[1]), atol=0, rtol=0)
    model = digits.make_model()
    model.load_state_dict(init)
    init_acc = digits.accuracy(model, *digits_splits.val)
    accs = []
    for p in digits_ingredients:
        model.load_state_dict(digits.load_state(p))
        accs.append(digits.accuracy(model, *digits_splits.val))
    # the pretrained init is a partial model; fine-tuning improves it; the best ingredient is good
    assert 0.5 < init_acc < max(accs)
    assert max(accs) > 0.93
    # a shared init makes ingredients averageable: the uniform soup is far above chance and at
    # least as good as the worst ingredient (separate inits would average into a broken model)
    states = [digits.load_state(p) for p in digits_ingredients]
    model.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
    assert digits.accuracy(model, *digits_splits.val) >= min(accs)


def test_cache_rebuilds_on_config_change_and_bf16(tmp_path: Path, digits_dir: Path,
                                                  digits_ingredients: list[Path]) -> None:
    import shutil

    # copy the shared cache; changing dtype must rebuild the ingredient, not reuse the F32 one
    shutil.copy(digits_dir / digits.BASE_NAME, tmp_path / digits.BASE_NAME)
    shutil.copy(digits_ingredients[0], tmp_path / digits_ingredients[0].name)
    (p,) = digits.make_ingredients(tmp_path, 1, SEED, dtype="BF16")
    with safe_open(str(p), framework="pt") as f:
        t = f.get_tensor("fc1.weight")
    assert t.dtype == torch.bfloat16
    torch.testing.assert_close(t, digits.load_state(digits_ingredients[0])["fc1.weight"].to(torch.bfloat16),
                               atol=0, rtol=0)  # one round-to-nearest-even of the same F32 weights
    with pytest.raises(InputError):
        digits.make_ingredients(tmp_path, 1, SEED, dtype="F8")
    with pytest.raises(InputError):
        digits.make_ingredients(tmp_path, 0, SEED)


def test_batches_and_tiled(digits_splits: digits.Splits) -> None:
    val = digits_splits.val
    bs = digits.batches(val, 100)
    assert torch.equal(torch.cat([x for x, _ in bs]), val.x) and torch.equal(torch.cat([y for _, y in bs]), val.y)
    loader = digits.make_loader(val, 100)
    assert torch.equal(torch.cat([y for _, y in loader]), val.y)
    big = digits.tiled(val, 3)
    assert len(big.y) == 3 * len(val.y) and torch.equal(big.x[: len(val.y)], val.x)
