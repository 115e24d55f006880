"""Learned soup on real (tiny) digits ingredients fine-tuned from one init during the test run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import soupkern.recipes.learned as learned_mod
from soupkern.errors import InputError, OutputError
from soupkern.examples import digits
from soupkern.io import open_checkpoint
from soupkern.plan import build_plan
from soupkern.recipes.learned import learned_soup, per_tensor_soup
from soupkern.recipes.weighted import weighted_state_dict


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], digits.Splits]:
    paths = digits.make_ingredients(tmp_path_factory.mktemp("digits"), n=4, seed=0)
    return paths, digits.make_splits(0)


def naive_loss(paths: list[Path], coeffs: list[float], data: digits.TensorPair) -> float:
    """Held-out cross-entropy of Σ c_k θ_k formed in fp64 from whole state dicts (the independent check)."""
    sds = [load_file(str(p)) for p in paths]
    soup = {n: sum(c * sd[n].double() for c, sd in zip(coeffs, sds)).float() for n in sds[0]}  # type: ignore[union-attr]
    model = digits.make_model()
    model.load_state_dict(soup)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(data.x), data.y))


@pytest.mark.parametrize("mode", ["by_model", "by_layer"])
def test_learned_beats_uniform_and_writes_the_soup(setup, tmp_path: Path, mode: str) -> None:
    paths, splits = setup
    val = digits.batches(splits.val, 64)
    out = tmp_path / "learned.safetensors"
    r = learned_soup(paths, digits.make_model(), val, out, mode=mode, epochs=3, seed=0)
    k = len(paths)
    # the uniform soup is the starting point: its held-out loss equals an fp64-formed uniform soup's
    assert r.uniform_loss == pytest.approx(naive_loss(paths, [1 / k] * k, splits.val), rel=1e-5)
    # learned on the held-out set: beats or matches the uniform soup there (here it clearly beats it)
    assert r.learned_loss <= r.uniform_loss
    assert r.learned_loss < 0.95 * r.uniform_loss, (r.uniform_loss, r.learned_loss)
    assert r.steps == 3 * len(val) == len(r.loss_history)
    groups = r.coefficient_map()
    assert list(groups) == (["*"] if mode == "by_model" else sorted(digits.make_model().state_dict()))
    for c in r.coefficients:
        assert len(c) == k and abs(math.fsum(c) - 1.0) < 1e-12 and min(c) > 0
    # metadata and the written soup
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        written = {n: f.get_tensor(n) for n in f.keys()}
    assert meta["soupkern.recipe"] == "learned" and meta["soupkern.learned.mode"] == mode
    stored = json.loads(meta["soupkern.learned.coefficients"])
    assert int(meta["soupkern.learned.steps"]) == r.steps
    assert float(meta["soupkern.learned.final_loss"]) == r.learned_loss
    sds = [load_file(str(p)) for p in paths]
    for name, t in written.items():
        c = stored if mode == "by_model" else stored[name]
        ref = sum(ci * sd[name].double() for ci, sd in zip(c, sds))
        # fp32 accumulation of K terms then one rounding: within (K+1)·2^-24·Σ|c_k θ_k|
        bound = (k + 1) * 2.0**-24 * sum(abs(ci) * sd[name].double().abs() for ci, sd in zip(c, sds))
        assert bool(((t.double() - ref).abs() <= bound + 1e-30).all()), name  # type: ignore[union-attr]
    # the reported learned loss is the written soup's loss (reported from the same fp32 mixing)
    model = digits.make_model()
    model.load_state_dict(written)
    with torch.no_grad():
        assert float(torch.nn.functional.cross_entropy(model(splits.val.x), splits.val.y)) == pytest.approx(r.learned_loss, rel=1e-5)


def test_by_model_file_equals_weighted_soup(setup, tmp_path: Path) -> None:
    paths, splits = setup
    r = learned_soup(paths, digits.make_model(), digits.batches(splits.val, 128), tmp_path / "s.safetensors",
                     steps=4, lr=0.1, eval_data=digits.batches(splits.test, 512))
    assert r.steps == 4
    expected = weighted_state_dict(paths, r.coefficients[0])
    got = load_file(str(tmp_path / "s.safetensors"))
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    with pytest.raises(OutputError, match="exists"):  # refused before any training step
        learned_soup(paths, digits.make_model(), [], tmp_path / "s.safetensors")


def test_mix_gradient_equals_autograd_of_materialized_soup(setup) -> None:
    """The custom backward (fp64 reductions over mmap chunks) equals autograd through Σ c_k W_k."""
    paths, splits = setup
    model = digits.make_model()
    x, y = splits.val.x[:50], splits.val.y[:50]
    k = len(paths)
    logits0 = torch.tensor([0.3, -0.2, 0.1, 0.5])[:k]
    from torch.func import functional_call

    # mmap path
    from contextlib import ExitStack

    from soupkern.backends import get_backend

    with ExitStack() as stack:
        cks = [stack.enter_context(open_checkpoint(p)) for p in paths]
        plan = build_plan(cks, [1 / k] * k, dtype="fp32")
        prob = learned_mod._problem(model, plan, "by_layer", cks[0].path)
        a = logits0.repeat(len(prob.groups), 1).requires_grad_()
        params = learned_mod._mixed_params(prob, torch.softmax(a, -1), get_backend())
        torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y).backward()
        grad_mmap = a.grad.clone()  # type: ignore[union-attr]
    # materialized reference, in fp64
    sds = [load_file(str(p)) for p in paths]
    b = logits0.double().repeat(len(prob.groups), 1).requires_grad_()
    c = torch.softmax(b, -1)
    soup = {n: sum(c[i, j] * sds[j][n].double() for j in range(k)) for i, n in enumerate(prob.names)}
    torch.nn.functional.cross_entropy(functional_call(model.double(), soup, (x.double(),)), y).backward()
    # fp32 forward/backward vs fp64: agreement to fp32 rounding of the loss landscape (~1e-5 relative)
    np.testing.assert_allclose(grad_mmap.numpy(), b.grad.numpy(), rtol=2e-4, atol=1e-6)  # type: ignore[union-attr]


def test_forming_goes_through_the_engine_kernel_on_mmap_views(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every forward forms each tensor from the ingredients' mmap views (no whole-state-dict copies)."""
    paths, splits = setup
    calls: list[tuple[str, int]] = []
    real = learned_mod.fill_tensor

    def spy(tp, coeffs, out, backend):  # type: ignore[no-untyped-def]
        assert all(type(f).__name__ == "SafetensorsFile" for f, _ in tp.sources)
        calls.append((tp.out.name, len(tp.sources)))
        return real(tp, coeffs, out, backend)

    monkeypatch.setattr(learned_mod, "fill_tensor", spy)
    val = digits.batches(splits.val, 200)
    learned_soup(paths, digits.make_model(), val, steps=2)
    n_tensors = len(digits.make_model().state_dict())
    # uniform eval (1 pass: one formation) + 2 steps + learned eval: 4 formations of every tensor
    assert len(calls) == 4 * n_tensors and all(k == len(paths) for _, k in calls)


def test_per_tensor_soup_and_errors(setup, tmp_path: Path) -> None:
    paths, _ = setup
    coeffs = {"head.weight": [1.0, 0.0, 0.0, 0.0], "fc1.bias": [0.0, 0.0, 0.0, 1.0]}
    rep = per_tensor_soup(paths, coeffs, tmp_path / "p.safetensors", dtype="bf16")
    got = load_file(str(tmp_path / "p.safetensors"))
    sds = [load_file(str(p)) for p in paths]
    assert torch.equal(got["head.weight"], sds[0]["head.weight"].bfloat16())
    assert torch.equal(got["fc1.bias"], sds[3]["fc1.bias"].bfloat16())
    uniform = weighted_state_dict(paths, [0.25] * 4, dtype="bf16")
    assert torch.equal(got["fc2.weight"], uniform["fc2.weight"])
    assert rep.tensors == len(sds[0])
    with pytest.raises(InputError, match="nope"):
        per_tensor_soup(paths, {"nope": [1, 0, 0, 0]}, tmp_path / "q.safetensors")
    with pytest.raises(InputError, match="fc1.bias"):
        per_tensor_soup(paths, {"fc1.bias": [1, 0]}, tmp_path / "q.safetensors")
    with pytest.raises(InputError, match="mode"):
        learned_soup(paths, digits.make_model(), [], mode="by_tensor")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="empty"):
        learned_soup(paths, digits.make_model(), [])
    with pytest.raises(InputError, match="lr"):
        learned_soup(paths, digits.make_model(), [], lr=-1.0)
    wrong = digits.make_model(hidden=16)
    with pytest.raises(InputError, match="shape"):
        learned_soup(paths, wrong, [])
    extra = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(InputError, match="0.bias.*ingredients do not"):
        learned_soup(paths, extra, [])


def test_temperature_and_bf16_ingredients(setup, tmp_path: Path) -> None:
    paths, splits = setup
    bf = []
    for p in paths[:3]:
        q = tmp_path / p.name
        save_file({n: t.bfloat16() for n, t in load_file(str(p)).items()}, str(q))
        bf.append(q)
    r = learned_soup(bf, digits.make_model(), digits.batches(splits.val, 128), mode="by_layer", steps=6,
                     learn_temperature=True)
    assert r.temperature is not None and r.temperature != 1.0
    assert r.learned_loss <= r.uniform_loss
    assert "learned soup (by_layer)" in r.to_table() and r.to_dict()["mode"] == "by_layer"


def _resident_problem(paths: list[Path], stack, model: torch.nn.Module, mode: str = "by_layer"):  # type: ignore[no-untyped-def]
    cks = [stack.enter_context(open_checkpoint(p)) for p in paths]
    plan = build_plan(cks, [1 / len(paths)] * len(paths), dtype="fp32")
    return learned_mod._problem(model, plan, mode, cks[0].path)


@pytest.mark.parametrize("mode", ["by_layer", "by_model"])  # by_model: one multi-tensor call for all tensors
def test_resident_mixing_is_the_engine_soup_and_its_gradient_the_autograd_one(setup, mode: str) -> None:
    """Resident mixing from device copies (the Triton kernels here, under the interpreter) forms
    the same bits as the host engine from the mapped files, and its on-device fp64 gradient
    equals the streaming path's (fp64 dots, only their summation order differs)."""
    from contextlib import ExitStack

    from torch.func import functional_call

    from soupkern.backends import device_kernels, get_backend

    paths, splits = setup
    model = digits.make_model()
    x, y = splits.val.x[:50], splits.val.y[:50]
    logits0 = torch.tensor([0.3, -0.2, 0.1, 0.5])
    grads, mixed = [], []
    with ExitStack() as stack:
        prob = _resident_problem(paths, stack, model, mode)
        on_device = learned_mod._Resident(prob, torch.device("cpu"), device_kernels("cpu", "triton"))
        assert all(len(xs) == len(paths) for xs in on_device.xs.values())
        for resident in (None, on_device):
            a = logits0.repeat(len(prob.groups), 1).requires_grad_()
            params = learned_mod._mixed_params(prob, torch.softmax(a, -1), get_backend(), resident)
            torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y).backward()
            mixed.append({n: t.detach().clone() for n, t in params.items()})
            grads.append(a.grad.clone())  # type: ignore[union-attr]
    for name in mixed[0]:
        assert torch.equal(mixed[0][name], mixed[1][name]), name
    # by_layer: the same fp64 dots rounded once to fp32 (order of the dots aside). by_model: the
    # streaming path rounds each tensor's contribution to fp32 and autograd adds those in fp32;
    # the one resident call adds them in fp64: agreement to a few fp32 ulps of the sum
    np.testing.assert_allclose(grads[1].numpy(), grads[0].numpy(), rtol=1e-6 if mode == "by_layer" else 1e-5,
                               atol=1e-9)


def test_resident_learned_soup_matches_streaming(setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """resident=True trains from device copies (never forming a tensor from the files) and
    learns the streaming run's coefficients; the CPU model is never resident by default."""
    paths, splits = setup
    val = digits.batches(splits.val, 128)
    streamed = learned_soup(paths, tmp_path / "a.safetensors", model=digits.make_model(), data=val, steps=6, lr=0.1)

    def forbidden(*args: object) -> None:
        raise AssertionError("a resident run formed a tensor from the mapped files")

    with monkeypatch.context() as m:
        m.setattr(learned_mod, "fill_tensor", forbidden)
        resident = learned_soup(paths, model=digits.make_model(), data=val, steps=6, lr=0.1, resident=True,
                                backend="triton")
    assert resident.uniform_loss == streamed.uniform_loss  # the same forward bits at the start
    np.testing.assert_allclose(resident.loss_history, streamed.loss_history, rtol=1e-5)
    np.testing.assert_allclose(resident.coefficients, streamed.coefficients, rtol=1e-5)
    assert learned_mod._use_resident(None, None, torch.device("cpu"), "x") is False  # type: ignore[arg-type]


def test_resident_refuses_f64_ingredients(tmp_path: Path) -> None:
    paths = []
    for i in range(2):
        sd = {k: v.double() for k, v in digits.make_model().state_dict().items()}
        paths.append(tmp_path / f"f64_{i}.safetensors")
        save_file(sd, str(paths[-1]))
    data = [(torch.zeros(4, 64), torch.zeros(4, dtype=torch.int64))]
    with pytest.raises(InputError, match="resident=True needs fp32, fp16 or bf16"):
        learned_soup(paths, model=digits.make_model(), data=data, steps=1, resident=True)
    r = learned_soup(paths, model=digits.make_model(), data=data, steps=1)  # automatic: streams
    assert r.steps == 1


@pytest.mark.parametrize("resident", [False, True])
def test_tied_weights_are_learned_once(tmp_path: Path, resident: bool) -> None:
    """A model whose head is tied to its embedding (one parameter, two names): the tensor is mixed
    once, under the name the ingredients hold, and functional_call ties the other."""
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 6)
            self.head = torch.nn.Linear(6, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(x).mean(1))

    torch.manual_seed(0)
    paths = []
    for i in range(3):
        sd = {"emb.weight": torch.randn(10, 6)}  # saved once, as save_pretrained does with tied weights
        paths.append(tmp_path / f"{i}.safetensors")
        save_file(sd, str(paths[-1]))
    x = torch.randint(0, 10, (32, 4))
    data = [(x, x[:, 0])]
    r = learned_soup(paths, model=Tied(), data=data, steps=3, lr=0.1, mode="by_layer", resident=resident,
                     backend="triton" if resident else None)
    assert r.groups == ("emb.weight",) and r.steps == 3


def test_a_one_element_loss_and_a_bad_resident_value(setup) -> None:
    """A loss_fn returning shape [1] (accepted by training) also works for the held-out passes;
    resident= other than True/False/None is refused by name."""
    paths, splits = setup
    val = digits.batches(splits.val, 128)
    r = learned_soup(paths, model=digits.make_model(), data=val, steps=2,
                     loss_fn=lambda o, t: torch.nn.functional.cross_entropy(o, t).reshape(1))
    assert r.steps == 2 and math.isfinite(r.uniform_loss) and math.isfinite(r.learned_loss)
    for bad in (0, 1, "no"):
        with pytest.raises(InputError, match="resident must be True, False or None"):
            learned_soup(paths, model=digits.make_model(), data=val, steps=1, resident=bad)
