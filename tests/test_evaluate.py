"""Evaluation interface: in-place loading, metrics, score callables, batched soup evaluation."""

from __future__ import annotations

import math
from typing import Any
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from digits_fixtures import digits_dir, digits_ingredients, digits_splits  # noqa: F401
from torch import nn

from soupkern.errors import InputError, MismatchError
from soupkern.evaluate import BatchedEvaluationUnavailable, Evaluator, make_evaluator
from soupkern.examples import digits

U32 = 2.0**-24  # unit roundoff of fp32


def _states(paths: list[Path]) -> list[dict[str, torch.Tensor]]:
    return [digits.load_state(p) for p in paths]


def _mix(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    return {k: sum(w * s[k].double() for w, s in zip(weights, states)).float() for k in states[0]}  # type: ignore[misc]


def _random_soups(states: list[dict[str, torch.Tensor]], s: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = [states[0]]  # one plain ingredient among the soups
    while len(out) < s:
        w = torch.rand(len(states), generator=g)
        out.append(_mix(states, (w / w.sum()).tolist()))
    return out


def _stack(soups: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in soups]) for k in soups[0]}


def _mlp_error_bound(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Per-logit bound on |fp32 result - exact| for the digits MLP (fp64 forward error analysis).

    Each linear layer y = W h + b in fp32 with any summation order has error at most
    gamma_K * (|W| |h| + |b|), gamma_K = K u / (1 - K u) (K = fan-in + 1); an input error e propagates
    as |W| e; ReLU does not increase errors. Two fp32 implementations (batched and unbatched
    matmuls) then differ by at most twice this bound.
    """
    h_abs = x.double().abs()
    err = torch.zeros_like(h_abs)
    h = x.double()
    for name in ("fc1", "fc2", "head"):
        w, b = state[f"{name}.weight"].double(), state[f"{name}.bias"].double()
        k = w.shape[1] + 1
        gamma = k * U32 / (1 - k * U32)
        err = err @ w.abs().T + gamma * (h_abs @ w.abs().T + b.abs())
        h = h @ w.T + b
        if name != "head":
            h = h.clamp_min(0)
        h_abs = h.abs()
    return err


@pytest.fixture(scope="module")
def val_batches(digits_splits: digits.Splits) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return digits.batches(digits_splits.val, 128)  # 3 batches (359 images), the last one partial


def test_load_is_in_place_and_rounds_once(digits_ingredients: list[Path]) -> None:
    model = digits.make_model()
    ev = Evaluator(model, [(torch.zeros(1, 64), torch.zeros(1, dtype=torch.int64))])
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    state = digits.load_state(digits_ingredients[0])
    ev.load_(state)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before  # same storage: no new model
    torch.testing.assert_close(model.state_dict(), state, atol=0, rtol=0)
    ev.load_checkpoint_(digits_ingredients[1])
    torch.testing.assert_close(model.state_dict(), digits.load_state(digits_ingredients[1]), atol=0, rtol=0)
    # a bf16 model receives fp32 values rounded once to nearest even (torch's .to(bfloat16))
    bf = Evaluator(digits.make_model().to(torch.bfloat16), [(torch.zeros(1, 64), torch.zeros(1, dtype=torch.int64))])
    bf.load_(state)
    for k, v in bf.model.state_dict().items():
        assert torch.equal(v, state[k].to(torch.bfloat16))
    with pytest.raises(InputError, match="fc9.weight"):
        ev.load_({"fc9.weight": torch.zeros(3)})
    with pytest.raises(MismatchError, match="fc1.bias"):
        ev.load_({"fc1.bias": torch.zeros(3)})
    with pytest.raises(InputError, match="head.bias"):
        ev.check_names([k for k in state if k != "head.bias"], path="x.safetensors")


def test_metrics_match_direct_computation(digits_ingredients: list[Path], digits_splits: digits.Splits,
                                          val_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    model = digits.make_model()
    state = digits.load_state(digits_ingredients[2])
    model.load_state_dict(state)
    with torch.no_grad():
        logits = model(digits_splits.val.x).double()
    y = digits_splits.val.y
    acc = Evaluator(model, val_batches).score()
    assert acc == int((logits.argmax(1) == y).sum()) / len(y)  # counts of exact 0/1 values: exact
    loss = Evaluator(model, val_batches, metric="loss").score()
    # fp64 reference cross-entropy from fp32 logits; batched fp32 log-softmax: relative ~1e-6
    assert math.isclose(loss, float(F.cross_entropy(logits, y)), rel_tol=1e-5)
    assert Evaluator(model, val_batches, metric="loss").maximize is False
    custom = Evaluator(model, val_batches, metric=lambda o, t: (o.argmax(-1) != t).double(), maximize=False)
    assert math.isclose(custom.score(), 1 - acc, abs_tol=1e-12)
    # the score callable path, and a factory instead of a module
    ev = Evaluator(digits.make_model, score=lambda m: digits.accuracy(m, *digits_splits.val))
    assert ev.score(state) == pytest.approx(acc, abs=1e-6)  # float32 mean vs exact count ratio
    # a DataLoader works as held-out data
    loader_acc = Evaluator(model, digits.make_loader(digits_splits.val, 100)).score()
    assert loader_acc == acc


def test_bad_arguments(digits_splits: digits.Splits) -> None:
    model = digits.make_model()
    with pytest.raises(InputError, match="either"):
        Evaluator(model)
    with pytest.raises(InputError, match="either"):
        Evaluator(model, [], score=lambda m: 0.0)
    with pytest.raises(InputError, match="unknown metric"):
        Evaluator(model, [], metric="f1")
    with pytest.raises(InputError, match="empty"):
        Evaluator(model, []).score()
    gen = (b for b in digits.batches(digits_splits.val, 200))
    ev = Evaluator(model, gen)
    ev.score()
    with pytest.raises(InputError, match="one-shot"):
        ev.score()  # the generator is exhausted
    with pytest.raises(InputError, match="pair"):
        Evaluator(model, [torch.zeros(2, 64)]).score()
    with pytest.raises(InputError, match="not both"):
        make_evaluator(model, evaluator=Evaluator(model, []))


@pytest.mark.parametrize("mode", ["vmap", "shared"])
def test_batched_equals_separate_evaluations(digits_ingredients: list[Path], digits_splits: digits.Splits,
                                             val_batches: list[tuple[torch.Tensor, torch.Tensor]], mode: str) -> None:
    soups = _random_soups(_states(digits_ingredients), 6)
    stacked = _stack(soups)
    model = digits.make_model()
    ev = Evaluator(model, val_batches, batched=mode)  # type: ignore[arg-type]
    loss_ev = Evaluator(model, val_batches, metric="loss", batched=mode)  # type: ignore[arg-type]
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    batched = ev.score_stacked(stacked)
    batched_loss = loss_ev.score_stacked(stacked)
    torch.testing.assert_close(model.state_dict(), weights_before, atol=0, rtol=0)  # batched paths: untouched
    assert ev.can_batch() and loss_ev.can_batch()  # no silent fallback to sequential evaluation
    assert ev.score_stacked(stacked, max_soups=4) == batched  # chunked passes give the same scores

    from torch.func import functional_call

    x, y = digits_splits.val
    exact = 0
    with torch.no_grad():
        vm = torch.vmap(lambda p: functional_call(model, p, (x,)))(stacked)
    for i, soup in enumerate(soups):
        separate = ev.score(soup)
        with torch.no_grad():
            logits = model(x)
        bound = 2 * _mlp_error_bound(soup, x)
        assert bool(((vm[i] - logits).abs() <= bound).all())
        # accuracy: identical unless some sample's top-2 logits are within the rounding bound
        top2 = logits.double().topk(2, 1).values
        near_tie = (top2[:, 0] - top2[:, 1]) <= bound.max(1).values
        diff = int((vm[i].argmax(1) != logits.argmax(1)).sum())
        assert diff <= int(near_tie.sum())
        if not bool(near_tie.any()):
            assert batched[i] == separate
            exact += 1
        # loss: a mean of fp32 log-softmax values; the logit differences above are ~1e-6 relative
        assert math.isclose(batched_loss[i], loss_ev.score(soup), rel_tol=1e-5)
    assert exact >= len(soups) - 1  # near-ties within ~1e-6 are rare: the exact check really ran


class _Scaled(nn.Module):
    """An MLP with buffers: BatchNorm1d (eval mode: running statistics) and a float scale buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 32)
        self.bn = nn.BatchNorm1d(32)
        self.out = nn.Linear(32, 10)
        self.register_buffer("scale", torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.bn(self.fc(x)))) * self.scale


@pytest.mark.parametrize("mode", ["vmap", "shared"])
def test_batched_handles_buffers(digits_splits: digits.Splits, mode: str) -> None:
    torch.manual_seed(0)
    model = _Scaled()
    ev = Evaluator(model, digits.batches(digits_splits.val, 128), metric="loss", batched=mode)  # type: ignore[arg-type]
    assert not model.training  # put in eval mode: BatchNorm uses (and does not update) running stats
    g = torch.Generator().manual_seed(1)
    base = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    soups = []
    for _ in range(3):
        soup = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        soup["bn.running_var"] = soup["bn.running_var"].abs() + 0.5
        soups.append(soup)
    batched = ev.score_stacked(_stack(soups))  # num_batches_tracked (int64) comes from the model
    for b, soup in zip(batched, soups):
        assert math.isclose(b, ev.score(soup), rel_tol=1e-5)  # fp32 rounding only, as above
    assert len(set(batched)) == 3  # the buffers really differ per soup


class _DataDependent(nn.Module):
    """A model vmap cannot run: Python control flow on a tensor value."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y if float(y.sum()) > -1e30 else -y


def test_vmap_failure_falls_back_or_raises(digits_splits: digits.Splits) -> None:
    torch.manual_seed(0)
    data = digits.batches(digits_splits.val, 128)
    model = _DataDependent()
    w = model.fc.weight.detach().clone()
    stacked = {"fc.weight": torch.stack([w, 2 * w, -w])}
    strict = Evaluator(model, data, batched="vmap")
    with pytest.raises(BatchedEvaluationUnavailable):
        strict.score_stacked(stacked)
    # "auto" on a CPU shares each batch among plain forwards: no vmap, so this model just works
    shared = Evaluator(model, data)
    assert shared.score_stacked(stacked) == [shared.score({"fc.weight": s}) for s in stacked["fc.weight"]]
    assert shared.can_batch()
    # "auto" where it would use vmap (a GPU): falls back to sequential with a warning
    ev = Evaluator(model, data)
    ev._prefers_shared = lambda: False  # type: ignore[method-assign]
    with pytest.warns(RuntimeWarning, match="one after another"):
        scores = ev.score_stacked(stacked)
    assert not ev.can_batch()
    assert scores == [ev.score({"fc.weight": s}) for s in stacked["fc.weight"]]
    ev.load_({"fc.weight": w})
    ev.score_stacked(stacked)
    assert torch.equal(model.fc.weight, w)  # the sequential fallback restores the model's weights


def test_stacked_validation(val_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    ev = Evaluator(digits.make_model(), val_batches)
    w = ev.tensors["fc1.weight"].detach()
    with pytest.raises(MismatchError, match="number of soups"):
        ev.score_stacked({"fc1.weight": torch.stack([w, w]), "fc1.bias": ev.tensors["fc1.bias"].detach()[None]})
    with pytest.raises(MismatchError, match="float64"):
        ev.score_stacked({"fc1.weight": w[None].double()})
    with pytest.raises(InputError):
        ev.score_stacked({})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batched_on_gpu(digits_ingredients: list[Path], digits_splits: digits.Splits) -> None:
    soups = _random_soups(_states(digits_ingredients), 4)
    cpu = Evaluator(digits.make_model(), digits.batches(digits_splits.val, 128), metric="loss")
    gpu = Evaluator(digits.make_model(), digits.batches(digits_splits.val, 128), metric="loss", device="cuda")
    stacked = {k: v.cuda() for k, v in _stack(soups).items()}
    batched = gpu.score_stacked(stacked)
    for b, soup in zip(batched, soups):
        # TF32 is off by default for matmuls in torch; GPU and CPU fp32 differ by rounding order only
        assert math.isclose(b, gpu.score(soup), rel_tol=1e-5)
        assert math.isclose(b, cpu.score(soup), rel_tol=1e-4)


def test_module_from_checkpoint_for_state_dict_scorers(digits_ingredients: list[Path], digits_splits: digits.Splits,
                                                       tmp_path: Path) -> None:
    from soupkern.evaluate import module_from_checkpoint
    from soupkern.recipes.greedy import greedy_soup

    holder = module_from_checkpoint(digits_ingredients[0])
    ref = digits.load_state(digits_ingredients[0])
    sd = holder.state_dict()
    assert list(sd) == sorted(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)

    def score_state(state: dict[str, torch.Tensor]) -> float:  # a user scorer that takes a state dict
        model = digits.DigitsMLP()
        model.load_state_dict(state)
        return digits.accuracy(model, *digits_splits.val)

    via_state = greedy_soup(digits_ingredients, model=holder, score=lambda m: score_state(m.state_dict()))
    via_model = greedy_soup(digits_ingredients, model=digits.make_model(),
                            score=lambda m: digits.accuracy(m, *digits_splits.val))
    assert via_state.kept == via_model.kept and via_state.steps == via_model.steps
    # names where one is a prefix of another cannot be nested modules: refused with the tensor named
    bad = digits.save_ingredient({"a": torch.zeros(2), "a.b": torch.zeros(2)}, tmp_path / "clash.safetensors")
    with pytest.raises(InputError, match="a.b|'a'"):
        module_from_checkpoint(bad)


class _CountingDataset(torch.utils.data.Dataset):
    """A map-style dataset that records which samples were read."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.read.append(i)
        return self.x[i], self.y[i]


def test_map_style_dataset_is_batched_in_index_order(digits_splits: Any) -> None:  # noqa: F811
    """A map-style dataset is held-out batches of `batch_size` samples in index order (the last one
    short): the same tensors as the list of slices, so the same scores; a rank's share (batches
    r, r + W, ...) reads only its own samples."""
    from soupkern.distributed import shard
    from soupkern.evaluate import DatasetBatches, held_out

    val = digits_splits.val
    ds = _CountingDataset(val.x[:150], val.y[:150])
    batches = held_out(ds, 16)
    assert isinstance(batches, DatasetBatches) and len(batches) == 10
    want = digits.batches(digits.TensorPair(val.x[:150], val.y[:150]), 16)
    for (x, y), (wx, wy) in zip(batches, want):
        assert torch.equal(x, wx) and torch.equal(y, wy)
    ds.read.clear()
    assert [i for i, _ in shard(batches, None, (1, 3))] == [1, 4, 7]
    assert ds.read == [*range(16, 32), *range(64, 80), *range(112, 128)]
    model = digits.make_model()
    assert Evaluator(model, batches, metric="loss").score() == Evaluator(model, want, metric="loss").score()
    assert held_out(want) is want and held_out(ds) is ds  # no batch size: the items are batches already
    with pytest.raises(InputError, match="applies to a map-style dataset"):
        held_out(want, 16)
    with pytest.raises(InputError, match="batch_size"):
        held_out(ds, 0)


def test_one_host_synchronization_per_pass(monkeypatch: pytest.MonkeyPatch, digits_splits: Any) -> None:  # noqa: F811
    """A pass over the held-out data reads its per-batch metric sums back with one stacked copy
    (on a GPU: one synchronization per pass, not one per batch and soup); the scores are the
    fp64 sums added in batch order as before."""
    val = digits_splits.val
    data = digits.batches(digits.TensorPair(val.x[:200], val.y[:200]), 20)
    model = digits.make_model()
    with torch.no_grad():
        want = math.fsum(float(F.cross_entropy(model(x), y, reduction="none").double().sum()) for x, y in data) / 200
    reads = {"__float__": 0, "item": 0, "tolist": 0}
    for name in reads:
        def counted(self: torch.Tensor, *a: Any, _orig: Any = getattr(torch.Tensor, name), _name: str = name) -> Any:
            reads[_name] += 1
            return _orig(self, *a)
        monkeypatch.setattr(torch.Tensor, name, counted)
    ev = Evaluator(model, data, metric="loss")
    got = ev.score()
    assert reads == {"__float__": 0, "item": 0, "tolist": 1}
    assert got == pytest.approx(want, rel=1e-12)  # fsum vs in-order sum: the last bits only
    stacked = {k: torch.stack([v, v, v]) for k, v in model.state_dict().items()}
    assert ev.score_stacked(stacked) == [got] * 3
    assert reads["tolist"] == 2 and reads["__float__"] == reads["item"] == 0
