"""Shared digits ingredients for the recipe tests (import the fixtures into a test module).

The ingredients are trained once per test session: every module that imports `digits_ingredients`
gets the same cached folder under pytest's session base temp dir; `make_ingredients` reuses files
whose stored config matches, so a second module only reads their metadata.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from soupkern.examples import digits

N_INGREDIENTS = 8
SEED = 0


@pytest.fixture(scope="session")
def digits_splits() -> digits.Splits:
    return digits.make_splits(SEED)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "digits_ingredients"


@pytest.fixture(scope="session")
def digits_ingredients(digits_dir: Path) -> list[Path]:
    """N_INGREDIENTS F32 ingredients fine-tuned from one shared init (digits_dir/pretrained.safetensors)."""
    return digits.make_ingredients(digits_dir, N_INGREDIENTS, SEED)
