"""`soupkern demo`: a real model-soup experiment on scikit-learn's digits, run through soupkern.

For each seed: one shared pretrained MLP, `n` ingredients fine-tuned from it with a random
hyperparameter sweep (learning rate, weight decay, epochs, label smoothing, augmentation, seed),
saved as safetensors (cached: a second run reuses them). Then, with soupkern's own API:
the uniform soup (`uniform_soup`), the greedy soup (`greedy_soup`, held-out accuracy, `tie="ge"`),
the learned soup (`learned_soup`, by model, AdamW on held-out loss) and the logit ensemble of all
ingredients (`logit_ensemble`). Every soup is written to a file and scored from that file.

Selection uses only the held-out (val) split; "best single model" is the ingredient with the best
held-out accuracy. Reported columns: held-out, test, and two distribution shifts of the test set
built from the same images (Gaussian pixel noise; small random rotations). Results are averaged
over seeds and written to `<workdir>/results.{json,md}` with a plot in the spirit of the paper's
Figure 1 (`<workdir>/soups.png`: each ingredient and each soup as a point, test vs shift accuracy).
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from soupkern.examples import digits

SHIFTS = ("noise", "rotate")
COLUMNS = ("held-out", "test", *(f"shift:{s}" for s in SHIFTS))
ROWS = ("best single model", "uniform soup", "greedy soup", "learned soup", "logit ensemble")


@dataclass(frozen=True)
class DemoConfig:
    """Size of the experiment: by default 16 ingredients x 20 seeds, about a minute on 2 idle cores
    (first run; ingredients are cached after)."""

    ingredients: int = 16
    seeds: tuple[int, ...] = tuple(range(20))
    learned_epochs: int = 20

    @classmethod
    def fast(cls) -> DemoConfig:
        return cls(ingredients=8, seeds=(0, 1), learned_epochs=10)

    @classmethod
    def tiny(cls) -> DemoConfig:
        """For the test suite: seconds."""
        return cls(ingredients=3, seeds=(0,), learned_epochs=1)


def _sets(splits: digits.Splits) -> dict[str, digits.TensorPair]:
    return {"held-out": splits.val, "test": splits.test, **{f"shift:{s}": splits.shifts[s] for s in SHIFTS}}


def score_file(path: Path, sets: dict[str, digits.TensorPair]) -> dict[str, float]:
    """Accuracy of the checkpoint at `path` on every evaluation set (loads it into a fresh MLP)."""
    state = digits.load_state(path)
    model = digits.make_model(hidden=state["fc1.weight"].shape[0])
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return {name: digits.accuracy(model, *data) for name, data in sets.items()}


def _one_seed(workdir: Path, seed: int, cfg: DemoConfig, log: Any) -> dict[str, Any]:
    from soupkern import uniform_soup
    from soupkern.recipes.ensemble import ingredient_outputs, logit_ensemble
    from soupkern.recipes.greedy import greedy_soup
    from soupkern.recipes.learned import learned_soup

    wd = workdir / f"seed{seed}"
    t0 = time.perf_counter()
    paths = digits.make_ingredients(wd, cfg.ingredients, seed)
    log(f"seed {seed}: {len(paths)} ingredients ready in {time.perf_counter() - t0:.1f} s ({wd})")
    splits = digits.make_splits(seed)
    sets = _sets(splits)
    val = digits.batches(splits.val)
    ingredients = [score_file(p, sets) for p in paths]
    best = max(range(len(paths)), key=lambda i: (ingredients[i]["held-out"], -i))

    soups = wd / "soups"
    soups.mkdir(exist_ok=True)
    uniform_soup(paths, soups / "uniform.safetensors", overwrite=True)
    greedy = greedy_soup(paths, soups / "greedy.safetensors", model=digits.make_model, data=val,
                         metric="accuracy", tie="ge", overwrite=True)
    learned = learned_soup(paths, soups / "learned.safetensors", model=digits.make_model(), data=val, mode="by_model",
                           epochs=cfg.learned_epochs, seed=seed, overwrite=True)
    ensemble = {}
    for name, data in sets.items():
        cache = ingredient_outputs(paths, model=digits.make_model, data=digits.batches(data))
        ensemble[name] = logit_ensemble(cache).score

    rows = {
        "best single model": ingredients[best],
        "uniform soup": score_file(soups / "uniform.safetensors", sets),
        "greedy soup": score_file(soups / "greedy.safetensors", sets),
        "learned soup": score_file(soups / "learned.safetensors", sets),
        "logit ensemble": ensemble,
    }
    log(f"seed {seed}: greedy kept {len(greedy.kept)}/{len(paths)}; done in {time.perf_counter() - t0:.1f} s")
    return {
        "seed": seed,
        "ingredients": [{"path": str(p), "config": digits.ingredient_config(p), **s} for p, s in zip(paths, ingredients)],
        "best_single": str(paths[best]),
        "greedy_kept": [str(p) for p in greedy.kept_paths],
        "learned_coefficients": list(learned.coefficients[0]),
        "rows": rows,
    }


def summarize(per_seed: Sequence[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Row -> column -> (mean, standard deviation over seeds; 0 for one seed) of accuracy."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for row in ROWS:
        out[row] = {}
        for col in COLUMNS:
            values = [s["rows"][row][col] for s in per_seed]
            out[row][col] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def table(per_seed: Sequence[dict[str, Any]]) -> str:
    """The paper-style markdown table: accuracy in %, mean ± std over seeds."""
    summary = summarize(per_seed)
    n = len(per_seed[0]["ingredients"])
    kept = statistics.fmean(len(s["greedy_kept"]) for s in per_seed)
    lines = ["| method | " + " | ".join(COLUMNS) + " |", "| --- |" + " --- |" * len(COLUMNS)]
    for row in ROWS:
        label = f"greedy soup ({kept:.1f} of {n} kept)" if row == "greedy soup" else row
        cells = [f"{100 * m:.2f} ± {100 * s:.2f}" for m, s in (summary[row][c] for c in COLUMNS)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(per_seed: Sequence[dict[str, Any]]) -> str:
    """Each method minus the best single model, per seed: mean ± standard error of the paired
    differences (points of accuracy). Pairing removes the seed-to-seed spread both share."""
    lines = ["| method − best single model | " + " | ".join(COLUMNS) + " |", "| --- |" + " --- |" * len(COLUMNS)]
    for row in ROWS[1:]:
        cells = []
        for col in COLUMNS:
            d = [100 * (s["rows"][row][col] - s["rows"]["best single model"][col]) for s in per_seed]
            se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else 0.0
            cells.append(f"{statistics.fmean(d):+.2f} ± {se:.2f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(per_seed: Sequence[dict[str, Any]], path: Path) -> None:
    """Figure-1-style scatter: test vs noise-shift accuracy of every ingredient and soup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    x_col, y_col = "test", f"shift:{SHIFTS[0]}"
    xs = [100 * i[x_col] for s in per_seed for i in s["ingredients"]]
    ys = [100 * i[y_col] for s in per_seed for i in s["ingredients"]]
    ax.scatter(xs, ys, s=10, c="0.75", label="fine-tuned ingredients (all seeds)")
    markers = {"best single model": ("o", "k"), "uniform soup": ("s", "tab:blue"), "greedy soup": ("*", "tab:red"),
               "learned soup": ("D", "tab:purple"), "logit ensemble": ("^", "tab:green")}
    for row, (marker, color) in markers.items():
        px = [100 * s["rows"][row][x_col] for s in per_seed]
        py = [100 * s["rows"][row][y_col] for s in per_seed]
        size = 90 if marker == "*" else 45
        ax.scatter(px, py, marker=marker, s=size / 3, c=color, alpha=0.35, linewidths=0)
        ax.scatter([statistics.fmean(px)], [statistics.fmean(py)], marker=marker, s=size * 2.5, c=color,
                   edgecolors="k", linewidths=0.8, label=f"{row} (mean)")
    ax.set_xlabel("test accuracy (%)")
    ax.set_ylabel("accuracy under pixel noise (%)")
    ax.set_title(f"Model soups on digits: {len(per_seed)} seeds (small: one per seed; large: mean)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(workdir: Path, config: DemoConfig | None = None, *, quiet: bool = False) -> int:
    """Run the experiment, print the table and write results.{json,md} and soups.png to `workdir`."""
    cfg = config or DemoConfig()
    workdir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    per_seed = [_one_seed(workdir, seed, cfg, log) for seed in cfg.seeds]
    seconds = time.perf_counter() - t0
    md = table(per_seed) + "\n\nPaired per seed, mean ± standard error:\n\n" + paired_table(per_seed)
    result = {
        "config": {"ingredients": cfg.ingredients, "seeds": list(cfg.seeds), "learned_epochs": cfg.learned_epochs},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
                    "threads": torch.get_num_threads()},
        "seconds": seconds,
        "summary": {r: {c: list(v) for c, v in cols.items()} for r, cols in summarize(per_seed).items()},
        "per_seed": per_seed,
    }
    (workdir / "results.json").write_text(json.dumps(result, indent=1))
    header = (f"Digits model soups: {cfg.ingredients} ingredients per seed, seeds {list(cfg.seeds)}, "
              f"accuracy (%) mean ± std over seeds, {seconds:.0f} s.\n\n")
    (workdir / "results.md").write_text(header + md + "\n")
    plot(per_seed, workdir / "soups.png")
    if not quiet:
        print(header + md)
        print(f"\nwrote {workdir / 'results.md'}, {workdir / 'results.json'} and {workdir / 'soups.png'}")
    return 0
