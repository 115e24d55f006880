"""Recipes: each one decides coefficients (or candidate soups) and drives the engine."""

from soupkern.recipes.weighted import (
    SoupReport,
    uniform_soup,
    uniform_state_dict,
    weighted_soup,
    weighted_state_dict,
)

__all__ = ["SoupReport", "uniform_soup", "uniform_state_dict", "weighted_soup", "weighted_state_dict"]
