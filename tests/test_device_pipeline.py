"""The host-to-device streaming pipeline (soupkern/gpu_engine.py) on a CPU device.

On a CPU device the pipeline runs the same batching, slot layout, copy-in, multi-tensor launch,
copy-out and write-back code as on a GPU (streams and events become no-ops). Its plumbing is
checked bit for bit against the C++ path by running it with `CppDeviceKernels`, device kernels
that call the C++ kernel on each (chunk) tensor: every element is computed independently, so
any chunking must reproduce the C++ path's bytes exactly; a misplaced offset, a lost or doubled
chunk or a stale slot shows up as a byte difference. The torch device kernels are checked
against the fp64 reference with the tolerance of tests/test_kernel.py (two roundings per term),
and the Triton kernels (interpreter, with the exact-fma fixture of tests/test_triton.py) against
the C++ path bit for bit.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import soupkern
from soupkern import gpu_engine
from soupkern.engine import plan_items
from soupkern.errors import BackendUnavailableError, InputError, MismatchError
from soupkern.io import open_checkpoint
from soupkern.plan import build_plan
from soupkern.reference import accumulation_bound, weighted_sum_f64, within_rounding

sys.path.insert(0, os.path.dirname(__file__))

from test_triton import exact_fma  # noqa: E402,F401  # fixture: correctly rounded fp32/fp64 fma in the interpreter

NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class CppDeviceKernels:
    """DeviceKernels on CPU tensors through the C++ kernel, one call per tensor (test scaffolding)."""

    name = "cpp-device"

    def __init__(self) -> None:
        self.calls: list[int] = []  # tensors per multi_weighted_sum call

    def weighted_sum(self, out: torch.Tensor, inputs: Sequence[torch.Tensor], weights: Sequence[float],
                     divisor: float = 1.0) -> None:
        from soupkern import _native  # type: ignore[attr-defined]

        n = out.numel()
        if n == 0:
            return
        _native.weighted_sum(out.view(-1).view(torch.uint8).numpy(), NAMES[out.dtype],
                             [x.view(-1).view(torch.uint8).numpy() for x in inputs], [NAMES[x.dtype] for x in inputs],
                             list(weights), n, divisor=divisor)

    def multi_weighted_sum(self, outs, inputs, weights, divisor=1.0) -> None:  # noqa: ANN001
        self.calls.append(len(outs))
        for out, xs in zip(outs, inputs):
            self.weighted_sum(out, xs, weights, divisor)

    def greedy_candidate(self, outs, sums, xs, n) -> None:  # noqa: ANN001
        raise NotImplementedError

    def greedy_accept(self, sums, xs) -> None:  # noqa: ANN001
        raise NotImplementedError


def make_ingredients(folder: Path, k: int = 3, small: int = 0, seed: int = 0) -> list[Path]:
    """k checkpoints with mixed dtypes, odd sizes, an empty tensor, an int tensor (copied), an
    F64 tensor (host path) and `small` bias-sized tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(77, dtype=torch.int64)
    paths = []
    for i in range(k):
        sd = {
            "big.weight": torch.randn(301, 257, generator=g).to(torch.bfloat16 if i % 2 == 0 else torch.float16),
            "f32.weight": torch.randn(5003, generator=g),
            "half": torch.randn(1031, generator=g).half(),
            "empty": torch.zeros(0, 3, dtype=torch.bfloat16),
            "position_ids": ids,
            "wide": torch.randn(129, generator=g, dtype=torch.float64),
        }
        for j in range(small):
            sd[f"blocks.{j}.bias"] = torch.randn(1 + (j * 37) % 300, generator=g).to(torch.bfloat16)
        paths.append(folder / f"ing{i}.safetensors")
        save_file(sd, str(paths[-1]), metadata={"format": "pt"})
    return paths


def tensors_of(path: Path) -> dict[str, bytes]:
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                if f.get_tensor(name).numel() else b"" for name in f.keys()}


def pipeline_soup(paths, coeffs, out, kernels, budget, per_tensor=None, **kw) -> None:  # noqa: ANN001
    """A file-to-file soup through DeviceStreamer on the CPU device with `kernels`."""
    from soupkern.engine import staging_bytes_for
    from soupkern.io import SoupWriter, plan_output

    cks = [open_checkpoint(p) for p in paths]
    try:
        plan = build_plan(cks, coeffs, **kw).with_per_tensor(per_tensor or {})
        streamer = gpu_engine.DeviceStreamer(plan, kernels, "cpu", budget_bytes=budget)
        layout = plan_output([tp.out for tp in plan.tensors], out, {"soupkern.backend": kernels.name})
        with SoupWriter(layout, staging_bytes=staging_bytes_for(1 << 20)) as w:
            streamer.to_writer(w, host_budget_bytes=1 << 20)
            w.commit()
    finally:
        for ck in cks:
            ck.close()


@pytest.mark.parametrize("budget", [3 * 4096, 200_000, 64 << 20])
def test_file_to_file_equals_cpp_path(tmp_path: Path, budget: int) -> None:
    """Budgets from a few kB (every large tensor in many chunks, one tensor per batch) to more
    than the model (one batch): the same bytes as the C++ path."""
    paths = make_ingredients(tmp_path / "in", small=40)
    coeffs = [0.5, -0.25, 0.8]
    soupkern.weighted_soup(paths, coeffs, tmp_path / "cpp.safetensors", backend="cpp")
    kernels = CppDeviceKernels()
    pipeline_soup(paths, coeffs, tmp_path / "dev.safetensors", kernels, budget)
    assert tensors_of(tmp_path / "dev.safetensors") == tensors_of(tmp_path / "cpp.safetensors")
    model_bytes = sum(p.stat().st_size for p in paths)
    if budget < model_bytes:
        assert len(kernels.calls) > 3  # really streamed in several batches
    else:
        assert len(kernels.calls) == 1  # every device tensor in one multi-tensor launch
        assert kernels.calls[0] == 43  # (the empty one has no work item)


# per-tensor coefficients: the F64 tensor (host path) and device tensors of both sizes; the two
# bias vectors differ only in the sign of a zero, which decides the sign of zero results, so a
# launch that lumped them together would show
PER_TENSOR = {"big.weight": [0.5, -1.25, 0.375], "wide": [2.0, 0.0, -1.0], "blocks.1.bias": [0.0, 0.0, 0.0],
              "blocks.2.bias": [-0.0, 0.0, 0.0], "half": [1.0, 1.0, 1.0]}


@pytest.mark.parametrize("budget", [3 * 4096, 64 << 20])
@pytest.mark.parametrize("kernels", ["torch", "cpp"])
def test_per_tensor_coefficients_equal_host_engine(tmp_path: Path, kernels: str, budget: int) -> None:
    """Each work item carries its own tensor's coefficients: file and state dict through the
    streamer (torch device kernels, or the C++ kernel per chunk) are the host engine's bytes
    with the same kernel arithmetic (backend "torch" / "cpp")."""
    from soupkern.backends.device import TorchDeviceKernels

    paths = make_ingredients(tmp_path / "in", small=5)
    default = [0.2, 0.3, 0.5]
    dev_kernels = TorchDeviceKernels() if kernels == "torch" else CppDeviceKernels()
    soupkern.weighted_soup(paths, PER_TENSOR, tmp_path / "host.safetensors", default=default, backend=kernels)
    pipeline_soup(paths, default, tmp_path / "dev.safetensors", dev_kernels, budget, per_tensor=PER_TENSOR)
    want = tensors_of(tmp_path / "host.safetensors")
    assert tensors_of(tmp_path / "dev.safetensors") == want
    assert want["blocks.1.bias"] != want["blocks.2.bias"]  # the zeros' signs differ
    if isinstance(dev_kernels, CppDeviceKernels) and budget > 1 << 20:
        assert dev_kernels.calls == [1, 4, 1, 1, 1]  # one launch per coefficient vector (the default's: 4 tensors)
    cks = [open_checkpoint(p) for p in paths]
    try:
        plan = build_plan(cks, default).with_per_tensor(PER_TENSOR)
        got = gpu_engine.DeviceStreamer(plan, dev_kernels, "cpu", budget_bytes=budget).to_state_dict()
    finally:
        for ck in cks:
            ck.close()
    for name, raw in want.items():
        assert (got[name].view(-1).view(torch.uint8).numpy().tobytes() if got[name].numel() else b"") == raw, name
    if kernels == "torch":  # the public API through a device (device="cpu": the torch device kernels)
        soupkern.weighted_soup(paths, PER_TENSOR, tmp_path / "api.safetensors", default=default, device="cpu",
                               device_budget_bytes=budget)
        assert tensors_of(tmp_path / "api.safetensors") == want
        sd = soupkern.weighted_state_dict(paths, PER_TENSOR, default=default, device="cpu", device_budget_bytes=budget)
        for name, raw in want.items():
            assert (sd[name].view(-1).view(torch.uint8).numpy().tobytes() if sd[name].numel() else b"") == raw, name


def test_output_dtype_and_state_dict(tmp_path: Path) -> None:
    paths = make_ingredients(tmp_path / "in", k=2, small=5)
    want = soupkern.weighted_state_dict(paths, [0.3, 0.7], dtype="bf16", backend="cpp")
    plan_cks = [open_checkpoint(p) for p in paths]
    plan = build_plan(plan_cks, [0.3, 0.7], dtype="bf16")
    got = gpu_engine.DeviceStreamer(plan, CppDeviceKernels(), "cpu", budget_bytes=30_000).to_state_dict()
    for ck in plan_cks:
        ck.close()
    assert sorted(got) == sorted(want)  # the API returns the first ingredient's order
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert torch.equal(got[name].view(-1).view(torch.uint8) if got[name].numel() else got[name],
                           want[name].view(-1).view(torch.uint8) if want[name].numel() else want[name]), name


def test_torch_kernels_through_public_api(tmp_path: Path) -> None:
    """weighted_soup / weighted_state_dict with device="cpu" use the torch device kernels: within
    the contract's bound for two roundings per term of the fp64 reference."""
    paths = make_ingredients(tmp_path / "in", small=3)
    coeffs = [0.2, 0.3, 0.5]
    report = soupkern.weighted_soup(paths, coeffs, tmp_path / "t.safetensors", device="cpu", device_budget_bytes=50_000)
    assert report.backend == "torch"
    sd = soupkern.weighted_state_dict(paths, coeffs, device="cpu", device_budget_bytes=50_000)
    out = tensors_of(tmp_path / "t.safetensors")
    with safe_open(str(paths[0]), framework="pt") as f0:
        names = list(f0.keys())
    for name in names:
        xs = []
        for p in paths:
            with safe_open(str(p), framework="pt") as f:
                xs.append(f.get_tensor(name))
        got = sd[name]
        assert got.view(-1).view(torch.uint8).numpy().tobytes() == out[name] if got.numel() else out[name] == b""
        if not got.is_floating_point() or got.numel() == 0:
            continue
        dt = {torch.float64: "F64", **NAMES}[got.dtype]
        values = [x.double().view(-1).numpy() for x in xs]
        exact = weighted_sum_f64(values, coeffs)
        bound = accumulation_bound(values, coeffs, "F64" if dt == "F64" else "F32", roundings_per_term=2)
        raw = got.view(-1).view(torch.uint8).numpy()
        assert within_rounding(raw, exact, bound, dt).all(), name


def test_batches_layout() -> None:
    """Chunks are aligned, inputs and outputs of a slot do not overlap, every tensor is covered
    exactly once, small tensors share batches, chunks carry their tensor's coefficients."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        paths = make_ingredients(Path(d), k=2, small=30)
        cks = [open_checkpoint(p) for p in paths]
        plan = build_plan(cks, [0.5, 0.5]).with_per_tensor({"half": [0.25, 0.75]})
        tensors = [tp for tp in plan.tensors if gpu_engine.on_device(tp)]
        for slot in (1000, 4096, 50_000, 10**7):
            covered: dict[str, int] = {}
            n_batches = 0
            for b in gpu_engine.batches(plan_items(plan, lambda tp: max(tp.numel, 1), tensors), slot, with_output=True):
                n_batches += 1
                assert b.in_bytes <= b.out_begin <= slot
                for c in b.chunks:
                    item, name = c.item, c.item.tensor.out.name
                    assert all(off % gpu_engine.ALIGN == 0 for off in (*c.in_offsets, c.out_offset))
                    assert item.start == covered.get(name, 0) and item.count > 0
                    assert item.coefficients == plan.coefficients_for(name)
                    covered[name] = item.start + item.count
            assert covered == {tp.out.name: tp.numel for tp in tensors if tp.numel}
            if slot == 10**7:
                assert n_batches == 1
        for ck in cks:
            ck.close()


def test_errors_before_any_output(tmp_path: Path) -> None:
    paths = make_ingredients(tmp_path / "in", k=2)
    out = tmp_path / "never.safetensors"
    with pytest.raises(InputError, match="too small"):
        soupkern.weighted_soup(paths, [0.5, 0.5], out, device="cpu", device_budget_bytes=500)
    bad = tmp_path / "bad.safetensors"
    save_file({"big.weight": torch.zeros(3, 3)}, str(bad))
    with pytest.raises(MismatchError):
        soupkern.weighted_soup([paths[0], bad], [0.5, 0.5], out, device="cpu")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        soupkern.weighted_soup(paths, [0.5, 0.5], out, backend="cuda")
    with pytest.raises(BackendUnavailableError):
        soupkern.weighted_state_dict(paths, [0.5, 0.5], device="cpu", backend="cuda")
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_triton_kernels_in_the_pipeline(tmp_path: Path, exact_fma: None) -> None:
    """backend="triton" streams through the Triton kernels (interpreter on CPU here): with an
    exact fma the C++ path's bytes."""
    from soupkern.backends.triton_backend import load

    kernels, reason = load()
    if kernels is None or not kernels.interpreted:
        pytest.skip(reason)
    paths = make_ingredients(tmp_path / "in", k=2, small=4)
    soupkern.weighted_soup(paths, [0.4, 0.6], tmp_path / "cpp.safetensors", backend="cpp")
    report = soupkern.weighted_soup(paths, [0.4, 0.6], tmp_path / "tri.safetensors", backend="triton",
                                    device_budget_bytes=300_000)
    assert report.backend == "triton"
    assert tensors_of(tmp_path / "tri.safetensors") == tensors_of(tmp_path / "cpp.safetensors")



def test_host_tensors_keep_the_divisor(tmp_path: Path) -> None:
    """Tensors the device kernels do not take (F64 here) are computed on the host with the
    plan's divisor: a uniform soup (weights 1, divisor K) through the pipeline equals the C++
    path, file and state dict (it once summed them instead)."""
    paths = make_ingredients(tmp_path / "in", small=5)
    cks = [open_checkpoint(p) for p in paths]
    try:
        assert any(i.dtype == "F64" for _, i in cks[0].tensors.values())
        k = len(paths)
        soupkern.uniform_soup(paths, tmp_path / "cpp.safetensors", backend="cpp")
        pipeline_soup(paths, [1.0] * k, tmp_path / "dev.safetensors", CppDeviceKernels(), 1 << 20, divisor=k)
        assert tensors_of(tmp_path / "dev.safetensors") == tensors_of(tmp_path / "cpp.safetensors")
        plan = build_plan(cks, [1.0] * k, divisor=k)
        got = gpu_engine.DeviceStreamer(plan, CppDeviceKernels(), "cpu", budget_bytes=30_000).to_state_dict()
    finally:
        for ck in cks:
            ck.close()
    want = soupkern.uniform_state_dict(paths, backend="cpp")
    for name in want:
        assert torch.equal(got[name], want[name]), name
