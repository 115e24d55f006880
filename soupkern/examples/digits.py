"""A tiny, real model-soup experiment on scikit-learn's digits (1,797 8x8 images, no download).

One shared pretrained init (`pretrain`), then ingredients fine-tuned from it with varied
hyperparameters (`finetune`): learning rate, weight decay, epochs, label smoothing, augmentation,
seed. Every ingredient keeps the shared init's architecture and head, so their weights average;
ingredients from separate random inits do not (seen in a prototype on 5,000 MNIST digits with an
MLP: averaging independently initialized fine-tunes dropped accuracy from 96% to 74%).

Splits (`make_splits`) are stratified by a seeded permutation per class: train / val (held-out,
what greedy and learned soups select on) / test, plus distribution-shift versions of the test set
(`shifted`): Gaussian pixel noise, pixel rolls, small rotations (torch affine_grid + grid_sample).

Everything is deterministic: data splits and shifts come from seeded generators; training runs on
CPU with one intra-op thread (restored afterwards) and a seeded generator, so the same call gives
bit-identical weights run to run on the same machine whatever `torch.get_num_threads()` is.

    from soupkern.examples import digits
    splits = digits.make_splits()
    paths = digits.make_ingredients("work/", n=8)          # cached safetensors files
    model = digits.make_model()
    model.load_state_dict(digits.load_state(paths[0]))
    print(digits.accuracy(model, *splits.val))

Pixel values are scaled to [0, 1] (raw digits are 0..16).
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from soupkern.errors import InputError

PathLike = str | os.PathLike[str]

N_FEATURES = 64
N_CLASSES = 10
IMAGE_SIDE = 8
# bump when anything that changes the trained weights changes (cache key)
RECIPE_VERSION = 1
CONFIG_KEY = "soupkern.digits.config"
BASE_NAME = "pretrained.safetensors"


class TensorPair(NamedTuple):
    """Images `x` [N, 64] float32 in [0, 1] (noise may leave the range) and labels `y` [N] int64."""

    x: torch.Tensor
    y: torch.Tensor


@dataclass(frozen=True)
class Splits:
    """Deterministic splits of digits. `shifts` maps a shift name to a shifted copy of `test`."""

    train: TensorPair
    val: TensorPair
    test: TensorPair
    shifts: dict[str, TensorPair] = field(default_factory=dict)
    seed: int = 0


# ----------------------------------------------------------------------------- data
def load_arrays() -> TensorPair:
    """All 1,797 digits as float32 [1797, 64] in [0, 1] and int64 labels (sklearn, no download).

    Fresh tensors on every call (the parsed file is cached per process).
    """
    x, y = _load_digits_cached()
    return TensorPair(x.clone(), y.clone())


@functools.lru_cache(maxsize=1)
def _load_digits_cached() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.from_numpy(d.data).to(torch.float32) / 16.0, torch.from_numpy(d.target).to(torch.int64)


def make_splits(seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2) -> Splits:
    """Stratified train / val / test split by a seeded permutation within each class.

    Per class c with n_c images: round(n_c * val_fraction) go to val, round(n_c * test_fraction)
    to test, the rest to train. Shifted test sets: see `shifted` (names: noise, roll, rotate,
    rotate_noise), each with a fixed seed derived from `seed`.
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise InputError(f"bad split fractions val={val_fraction}, test={test_fraction}")
    data = load_arrays()
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}
    for c in range(N_CLASSES):
        idx = torch.nonzero(data.y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val, n_test = round(len(idx) * val_fraction), round(len(idx) * test_fraction)
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val:n_val + n_test])
        parts["train"].append(idx[n_val + n_test:])
    out = {}
    for name, chunks in parts.items():
        idx = torch.cat(chunks)
        idx = idx[torch.randperm(len(idx), generator=g)]  # interleave classes
        out[name] = TensorPair(data.x[idx].contiguous(), data.y[idx].contiguous())
    test = out["test"]
    shifts = {kind: shifted(test, kind, seed=seed * 1000 + i) for i, kind in enumerate(SHIFT_KINDS)}
    return Splits(out["train"], out["val"], test, shifts, seed)


SHIFT_KINDS = ("noise", "roll", "rotate", "rotate_noise")


def shifted(data: TensorPair, kind: str, seed: int = 0, strength: float = 1.0) -> TensorPair:
    """A distribution-shifted copy of `data` (labels unchanged), deterministic in `seed`.

    - noise: add N(0, (0.3 * strength)^2) per pixel.
    - roll: cyclic shift of each image by dx, dy in {-1, 0, 1} (not both 0), torch.roll.
    - rotate: rotate each image by an angle uniform in +-(25 * strength) degrees about its center
      (bilinear, zero padding; affine_grid + grid_sample, align_corners=False).
    - rotate_noise: rotate, then noise.
    """
    g = torch.Generator().manual_seed(seed)
    x = data.x
    if kind == "noise":
        x = x + 0.3 * strength * torch.randn(x.shape, generator=g)
    elif kind == "roll":
        x = _roll(x, g)
    elif kind == "rotate":
        x = _rotate(x, 25.0 * strength, g)
    elif kind == "rotate_noise":
        x = _rotate(x, 25.0 * strength, g)
        x = x + 0.3 * strength * torch.randn(x.shape, generator=g)
    else:
        raise InputError(f"unknown shift '{kind}'; expected one of {', '.join(SHIFT_KINDS)}")
    return TensorPair(x.contiguous(), data.y)


def _roll(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    imgs = x.reshape(-1, IMAGE_SIDE, IMAGE_SIDE).clone()
    # 8 nonzero (dy, dx) offsets in {-1,0,1}^2
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    pick = torch.randint(0, len(offsets), (imgs.shape[0],), generator=g)
    for i, k in enumerate(pick.tolist()):
        imgs[i] = torch.roll(imgs[i], shifts=offsets[k], dims=(0, 1))
    return imgs.reshape(-1, N_FEATURES)


def _rotate(x: torch.Tensor, max_degrees: float, g: torch.Generator) -> torch.Tensor:
    theta = (torch.rand(x.shape[0], generator=g) * 2 - 1) * math.radians(max_degrees)
    return rotate_images(x, theta)


def rotate_images(x: torch.Tensor, radians: torch.Tensor) -> torch.Tensor:
    """Rotate each 8x8 image x[i] (flattened, [N, 64]) by radians[i] about its center (bilinear, zero fill)."""
    n = x.shape[0]
    cos, sin = torch.cos(radians), torch.sin(radians)
    zero = torch.zeros(n)
    mat = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    imgs = x.reshape(n, 1, IMAGE_SIDE, IMAGE_SIDE)
    grid = F.affine_grid(mat, list(imgs.shape), align_corners=False)
    return F.grid_sample(imgs, grid, mode="bilinear", padding_mode="zeros", align_corners=False).reshape(n, N_FEATURES)


def batches(data: TensorPair, batch_size: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed-order (x, y) batches over `data` (views, no copy): an iterable for `soupkern.evaluate`."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    return [(data.x[i:i + batch_size], data.y[i:i + batch_size]) for i in range(0, len(data.y), batch_size)]


def make_loader(data: TensorPair, batch_size: int = 256, shuffle: bool = False, seed: int = 0) -> torch.utils.data.DataLoader:
    """A torch DataLoader over `data` (seeded generator when shuffling)."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(data.x, data.y), batch_size=batch_size, shuffle=shuffle, generator=g)


def tiled(data: TensorPair, times: int, seed: int = 0, noise: float = 0.05) -> TensorPair:
    """`data` repeated `times` times, copies after the first with N(0, noise^2) pixel noise.

    A larger held-out set for timing only (benchmarks); not a new sample of the distribution.
    """
    if times < 1:
        raise InputError(f"times must be >= 1, got {times}")
    g = torch.Generator().manual_seed(seed)
    xs = [data.x] + [data.x + noise * torch.randn(data.x.shape, generator=g) for _ in range(times - 1)]
    return TensorPair(torch.cat(xs).contiguous(), data.y.repeat(times))


# ----------------------------------------------------------------------------- model
class DigitsMLP(nn.Module):
    """64 -> hidden -> hidden -> 10 MLP with ReLU. State-dict names: fc1.*, fc2.*, head.* (weight, bias)."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(N_FEATURES, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def make_model(hidden: int = 128, seed: int = 0) -> DigitsMLP:
    """A freshly initialized `DigitsMLP` (float32, CPU, eval mode), init seeded by `seed`."""
    with _seeded(seed):
        model = DigitsMLP(hidden)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of `model` on (x, y) in eval mode (one forward pass)."""
    was_training = model.training
    model.eval()
    try:
        return float((model(x).argmax(1) == y).float().mean())
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- training
@dataclass(frozen=True)
class FinetuneConfig:
    """Hyperparameters of one fine-tuning run (AdamW, minibatches of `batch_size`).

    augment: "none", "noise" (N(0, noise_std^2) pixel noise), "roll" (a random +-1 pixel cyclic shift
    per batch, applied to a random half of its images) or "both".
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 6
    label_smoothing: float = 0.0
    augment: str = "none"
    noise_std: float = 0.1
    batch_size: int = 32
    seed: int = 0


@dataclass(frozen=True)
class PretrainConfig:
    """The shared init: `epochs` of AdamW at `lr` on the first `fraction` of the train split."""

    hidden: int = 128
    lr: float = 3e-3
    epochs: int = 3
    fraction: float = 0.5
    batch_size: int = 64
    seed: int = 0


AUGMENTS = ("none", "noise", "roll", "both")


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG (module init uses it) and restore the previous state afterwards."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


@contextmanager
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _train(model: nn.Module, data: TensorPair, *, lr: float, weight_decay: float, epochs: int,
           label_smoothing: float, batch_size: int, augment: str, noise_std: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(data.y)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            x = data.x[idx]
            if augment in ("roll", "both"):  # half of the batch, one random +-1 pixel offset per batch
                dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
                rolled = torch.roll(x.reshape(-1, IMAGE_SIDE, IMAGE_SIDE), (dy, dx), (1, 2)).reshape(-1, N_FEATURES)
                x = torch.where(torch.rand(len(idx), 1, generator=g) < 0.5, rolled, x)
            if augment in ("noise", "both"):
                x = x + noise_std * torch.randn(x.shape, generator=g)
            loss = F.cross_entropy(model(x), data.y[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


def pretrain(splits: Splits, config: PretrainConfig = PretrainConfig()) -> dict[str, torch.Tensor]:
    """The shared init: a seeded `DigitsMLP` trained briefly on part of the train split.

    Returns a float32 CPU state dict (fc1.*, fc2.*, head.*). Deterministic in (splits, config).
    """
    if not 0 < config.fraction <= 1:
        raise InputError(f"pretrain fraction must be in (0, 1], got {config.fraction}")
    n = max(1, round(len(splits.train.y) * config.fraction))
    part = TensorPair(splits.train.x[:n], splits.train.y[:n])
    with _one_thread():
        model = make_model(config.hidden, config.seed)
        _train(model, part, lr=config.lr, weight_decay=0.0, epochs=config.epochs, label_smoothing=0.0,
               batch_size=config.batch_size, augment="none", noise_std=0.0, seed=config.seed + 1)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def finetune(init_state: dict[str, torch.Tensor], config: FinetuneConfig, splits: Splits) -> dict[str, torch.Tensor]:
    """One ingredient: all weights (head included) fine-tuned from `init_state` on the train split.

    Returns a float32 CPU state dict with the same names and shapes as `init_state`.
    Deterministic in (init_state, config, splits).
    """
    if config.augment not in AUGMENTS:
        raise InputError(f"unknown augment '{config.augment}'; expected one of {', '.join(AUGMENTS)}")
    if config.epochs < 0 or config.batch_size < 1:
        raise InputError(f"bad fine-tune config {config}")
    hidden = init_state["fc1.weight"].shape[0]
    with _one_thread():
        model = DigitsMLP(hidden)  # init values are overwritten below
        model.load_state_dict(init_state)
        _train(model, splits.train, lr=config.lr, weight_decay=config.weight_decay, epochs=config.epochs,
               label_smoothing=config.label_smoothing, batch_size=config.batch_size, augment=config.augment,
               noise_std=config.noise_std, seed=config.seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def sample_configs(n: int, seed: int = 0) -> list[FinetuneConfig]:
    """`n` fine-tune configs from a seeded random search (the paper's "random hyperparameter sweep").

    lr log-uniform in [3e-4, 3e-3], weight decay in {0, 1e-4, 1e-3, 1e-2, 0.1}, epochs in 3..8,
    label smoothing in {0, 0.05, 0.1}, augment in AUGMENTS, noise_std in {0.05, 0.1, 0.2},
    seed = seed * 1000 + i.
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        out.append(FinetuneConfig(
            lr=round(10 ** rng.uniform(math.log10(3e-4), math.log10(3e-3)), 6),
            weight_decay=rng.choice([0.0, 1e-4, 1e-3, 1e-2, 0.1]),
            epochs=rng.randint(3, 8),
            label_smoothing=rng.choice([0.0, 0.05, 0.1]),
            augment=rng.choice(AUGMENTS),
            noise_std=rng.choice([0.05, 0.1, 0.2]),
            seed=seed * 1000 + i,
        ))
    return out


# ----------------------------------------------------------------------------- files
def save_ingredient(state: dict[str, torch.Tensor], path: PathLike, metadata: dict[str, str] | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write `state` to a safetensors file (optionally cast to `dtype`, round to nearest even).

    Written to a temporary name in the same folder, then renamed: a reader never sees half a file.
    """
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in state.items()}
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, p)
    return p


def load_state(path: PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as a dict of CPU torch tensors (copies)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def _cached_config(path: Path) -> str | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(CONFIG_KEY)
    except Exception:  # noqa: BLE001 - an unreadable cache file is rebuilt
        return None


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def make_base(workdir: PathLike, seed: int = 0, pretrain_config: PretrainConfig | None = None) -> Path:
    """The shared pretrained init as `workdir/pretrained.safetensors` (F32), cached by config."""
    return _make_base(Path(workdir), seed, pretrain_config or PretrainConfig(seed=seed))[0]


def _make_base(workdir: Path, seed: int, pcfg: PretrainConfig) -> tuple[Path, dict[str, torch.Tensor] | None]:
    path = workdir / BASE_NAME
    key = json.dumps({"version": RECIPE_VERSION, "split_seed": seed, "pretrain": asdict(pcfg)}, sort_keys=True)
    if _cached_config(path) == key:
        return path, None
    state = pretrain(make_splits(seed), pcfg)
    save_ingredient(state, path, {CONFIG_KEY: key})
    return path, state


def make_ingredients(workdir: PathLike, n: int, seed: int = 0, *, dtype: str = "F32",
                     configs: list[FinetuneConfig] | None = None,
                     pretrain_config: PretrainConfig | None = None) -> list[Path]:
    """`n` fine-tuned ingredients as `workdir/ingredient_XX.safetensors`, plus the shared init.

    Splits use `seed`; the init is `pretrain(make_splits(seed), pretrain_config or
    PretrainConfig(seed=seed))` saved as `workdir/pretrained.safetensors`; ingredient i is
    `finetune(init, configs[i])` with `configs = sample_configs(n, seed)` unless given, saved in
    `dtype` ("F32", "BF16" or "F16"; trained in float32, one rounding). The full config (recipe
    version, split seed, pretrain and fine-tune hyperparameters, dtype) is stored in each file's
    metadata under "soupkern.digits.config"; files whose stored config matches are reused, others
    are rebuilt.
    """
    if n < 1:
        raise InputError(f"n must be >= 1, got {n}")
    if dtype not in _DTYPES:
        raise InputError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    configs = configs if configs is not None else sample_configs(n, seed)
    if len(configs) != n:
        raise InputError(f"{len(configs)} configs for n={n} ingredients")
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    pcfg = pretrain_config or PretrainConfig(seed=seed)
    base_path, init = _make_base(wd, seed, pcfg)
    splits: Splits | None = None
    paths = []
    for i, cfg in enumerate(configs):
        path = wd / f"ingredient_{i:02d}.safetensors"
        key = json.dumps({"version": RECIPE_VERSION, "split_seed": seed, "pretrain": asdict(pcfg),
                          "finetune": asdict(cfg), "dtype": dtype}, sort_keys=True)
        if _cached_config(path) != key:
            splits = splits or make_splits(seed)
            init = init if init is not None else load_state(base_path)
            state = finetune(init, cfg, splits)
            save_ingredient(state, path, {CONFIG_KEY: key}, dtype=_DTYPES[dtype])
        paths.append(path)
    return paths


def ingredient_config(path: PathLike) -> dict[str, object]:
    """The config stored in an ingredient written by `make_ingredients` (InputError if none)."""
    raw = _cached_config(Path(path))
    if raw is None:
        raise InputError(f"no '{CONFIG_KEY}' metadata", path=path)
    cfg: dict[str, object] = json.loads(raw)
    return cfg
