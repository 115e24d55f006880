"""Every device backend (CUDA, Triton) on a GPU: bit-identical to the C++ kernel, greedy kernels
bit-identical to the torch expression, the streaming pipeline equal to the C++ path.

Marked `gpu`; every test skips when torch sees no CUDA GPU. On a GPU machine a backend that
cannot load fails (it should run there), it is not skipped.

Tolerance: none. The device kernels implement the exact-arithmetic contract of csrc/soupkern.h
with the C++ kernel's instruction sequence (fp64: multiply, then fused multiply-adds in order, one
IEEE division by the divisor when it is not 1, one rounding: round-to-odd fp32 first for F16/BF16),
so their bytes must equal the C++ kernel's, with one exception: a NaN's payload (the GPU's
arithmetic produces the canonical NaN), so NaN positions are compared instead of NaN bits. The
C++ kernel itself is checked against the fp64 reference in tests/test_kernel.py; the same
parametrization runs here (dtypes, K = 1..9 and 72, odd sizes, empty tensors, many small tensors,
unaligned views).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import soupkern  # noqa: E402
from soupkern import _native  # type: ignore[attr-defined]  # noqa: E402
from soupkern.backends.device import round_f64  # noqa: E402
from soupkern.reference import decode  # noqa: E402
from test_device_pipeline import make_ingredients, tensors_of  # noqa: E402
from test_kernel import make_input  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (torch.cuda.is_available() is False)"),
]

BACKENDS = ["cuda", "triton"]
DTYPES = ["F32", "F16", "BF16"]
TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SIZE = {"F32": 4, "F16": 2, "BF16": 2}


def kernels_for(name: str):  # -> DeviceKernels
    from soupkern.backends import load_backend

    return load_backend(name)  # raises with the reason: on a GPU machine both must run


def misalign(offset: int, dtype: str) -> int:
    """`offset` bytes, or one element where torch cannot view `dtype` at that offset (fp32 at 2):
    still an address that is not 16-byte aligned."""
    return offset if offset % SIZE[dtype] == 0 else SIZE[dtype]


def to_device(raw: np.ndarray, dtype: str, offset: int = 0) -> torch.Tensor:
    """Raw bytes as a CUDA tensor of `dtype`, starting `offset` bytes into a fresh allocation
    (offset 2: an address that is not 16-byte aligned; 4 for fp32)."""
    offset = misalign(offset, dtype)
    buf = torch.zeros(raw.size + offset + 16, dtype=torch.uint8, device="cuda")
    if raw.size:
        buf[offset: offset + raw.size].copy_(torch.from_numpy(raw))
    return buf[offset: offset + raw.size].view(TORCH[dtype])


def empty_out(n: int, dtype: str, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An output of n elements `offset` bytes into a buffer, and the 16 sentinel bytes after it."""
    offset = misalign(offset, dtype)
    buf = torch.full((n * SIZE[dtype] + offset + 16,), 0xAB, dtype=torch.uint8, device="cuda")
    return buf[offset: offset + n * SIZE[dtype]].view(TORCH[dtype]), buf[offset + n * SIZE[dtype]:]


def raw(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint8).cpu().numpy() if t.numel() else np.zeros(0, np.uint8)


def cpp(out_dtype: str, raws: list[np.ndarray], dtypes: list[str], weights: list[float], n: int,
        divisor: float = 1.0) -> np.ndarray:
    out = np.empty(n * SIZE[out_dtype], np.uint8)
    _native.weighted_sum(out, out_dtype, raws, dtypes, weights, n, divisor=divisor)
    return out


def assert_same(got: np.ndarray, want: np.ndarray, dtype: str, what: str) -> None:
    g, w = decode(got, dtype), decode(want, dtype)
    nan = np.isnan(w)
    assert np.array_equal(np.isnan(g), nan), f"{what}: NaN positions differ"
    unit = SIZE[dtype]
    bad = np.flatnonzero((got.reshape(-1, unit) != want.reshape(-1, unit)).any(axis=1) & ~nan)
    assert bad.size == 0, f"{what}: {bad.size} elements differ, first {bad[0]}: got {g[bad[0]]!r}, C++ {w[bad[0]]!r}"


def run_case(name: str, out_dtype: str, raws: list[np.ndarray], dtypes: list[str], weights: list[float], n: int,
             offset: int = 0, divisor: float = 1.0) -> None:
    xs = [to_device(r, d, offset) for r, d in zip(raws, dtypes)]
    out, guard = empty_out(n, out_dtype, offset)
    kernels_for(name).weighted_sum(out, xs, weights, divisor)
    torch.cuda.synchronize()
    assert (guard == 0xAB).all(), "wrote past the end of the output"
    assert_same(raw(out), cpp(out_dtype, raws, dtypes, weights, n, divisor), out_dtype,
                f"{name} {dtypes}->{out_dtype} n={n} divisor={divisor}")


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("in_dtype", DTYPES)
def test_each_dtype_pair(name: str, in_dtype: str, out_dtype: str) -> None:
    rng = np.random.default_rng(DTYPES.index(in_dtype) * 4 + DTYPES.index(out_dtype))
    n, k = 40_099, 3
    raws = [make_input(rng, n, in_dtype, specials=(i == 1)) for i in range(k)]
    for offset in (0, 2):  # vector accesses, then element-wise accesses
        run_case(name, out_dtype, raws, [in_dtype] * k, [0.5, -0.25, 1.0 / 3.0], n, offset)
        run_case(name, out_dtype, raws, [in_dtype] * k, [1.0] * k, n, offset, divisor=float(k))  # uniform soup


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("k", [*range(1, 10), 72])
def test_mixed_dtypes_and_k(name: str, k: int) -> None:
    rng = np.random.default_rng(k)
    for n in (0, 1, 15, 17, 1023, 1025, 4097, 70_001):
        dtypes = [DTYPES[(i + n) % 3] for i in range(k)]
        raws = [make_input(rng, n, d) for d in dtypes]
        weights = list(rng.uniform(-1, 1, k))
        for out_dtype in DTYPES:
            run_case(name, out_dtype, raws, dtypes, weights, n)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("weights,divisor", [([0.1, 0.2, 0.3, 0.4], 1.0), ([1.0] * 4, 4.0)])
def test_many_small_tensors_in_one_call(name: str, weights: list[float], divisor: float) -> None:
    """multi_weighted_sum over 600 tensors of 0 to 3000 elements (biases and norms), mixed
    dtypes and alignments, equals the C++ kernel tensor by tensor; nothing written outside."""
    rng = np.random.default_rng(600)
    k = 4
    outs, guards, rows, want = [], [], [], []
    for t in range(600):
        n = int(rng.integers(0, 3000)) if t % 50 else 0
        dtypes = ["BF16"] * k if t % 3 else ["F32", "BF16", "F16", "BF16"]
        out_dtype = "BF16" if t % 7 else "F32"
        offset = 2 if t % 11 == 0 else 0
        raws = [make_input(rng, n, d) for d in dtypes]
        rows.append([to_device(r, d, offset) for r, d in zip(raws, dtypes)])
        out, guard = empty_out(n, out_dtype, offset)
        outs.append(out)
        guards.append(guard)
        want.append((cpp(out_dtype, raws, dtypes, weights, n, divisor), out_dtype))
    kernels_for(name).multi_weighted_sum(outs, rows, weights, divisor)
    torch.cuda.synchronize()
    for t, (out, guard, (w, dt)) in enumerate(zip(outs, guards, want)):
        assert_same(raw(out), w, dt, f"{name} tensor {t}")
        assert (guard == 0xAB).all(), f"{name} tensor {t}: wrote past its end"


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("x_dtype", DTYPES)
def test_greedy_kernels_match_the_torch_expression(name: str, x_dtype: str) -> None:
    """candidate = round((sum + x) / (n + 1)), accept: sum += x, with fp64 running sums: fp64 add,
    IEEE fp64 division (a 0-dim device tensor as divisor: torch divides by a Python number through
    its reciprocal), one rounding (round_f64: round-to-odd fp32 first for fp16/bf16)."""
    g = torch.Generator(device="cuda").manual_seed(1)
    kern = kernels_for(name)
    sizes = [0, 1, 17, 4096, 100_003]
    # every other tensor starts one element into its allocation: not 16-byte aligned (element-wise path)
    sums = [(torch.randn(s + 1, generator=g, device="cuda", dtype=torch.float64) * 3)[i % 2:][:s]
            for i, s in enumerate(sizes)]
    xs = [torch.randn(s + 1, generator=g, device="cuda").to(TORCH[x_dtype])[i % 2:][:s] for i, s in enumerate(sizes)]
    for n in (1, 2, 6, 71):
        for out_dtype in DTYPES:
            outs = [torch.empty(s, dtype=TORCH[out_dtype], device="cuda") for s in sizes]
            kern.greedy_candidate(outs, sums, xs, n)
            divisor = torch.tensor(float(n + 1), dtype=torch.float64, device="cuda")
            for out, s, x in zip(outs, sums, xs):
                want = round_f64((s + x.double()) / divisor, out.dtype)
                assert torch.equal(out.view(torch.uint8) if out.numel() else out, want.view(torch.uint8) if want.numel() else want)
    want_sums = [s + x.double() for s, x in zip(sums, xs)]
    kern.greedy_accept(sums, xs)
    for s, w in zip(sums, want_sums):
        assert torch.equal(s, w)


@pytest.mark.parametrize("name", BACKENDS)
def test_streaming_pipeline_equals_cpp_path(name: str, tmp_path: Path) -> None:
    """File to file and file to device with a device budget far below the model: the C++
    path's bytes."""
    import soupkern

    paths = make_ingredients(tmp_path / "in", small=40)
    coeffs = [0.5, -0.25, 0.8]
    soupkern.weighted_soup(paths, coeffs, tmp_path / "cpp.safetensors", backend="cpp")
    report = soupkern.weighted_soup(paths, coeffs, tmp_path / "gpu.safetensors", backend=name,
                                    device_budget_bytes=64 << 10)
    assert report.backend == name
    assert tensors_of(tmp_path / "gpu.safetensors") == tensors_of(tmp_path / "cpp.safetensors")
    want = soupkern.weighted_state_dict(paths, coeffs, backend="cpp")
    got = soupkern.weighted_state_dict(paths, coeffs, backend=name, device="cuda", device_budget_bytes=64 << 10)
    assert list(got) == list(want)
    for key in want:
        assert got[key].device.type == "cuda"
        a, b = got[key].cpu(), want[key]
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.numel():
            assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), key


def test_automatic_device_choice_is_a_gpu_backend() -> None:
    from soupkern.backends.device import device_kernels

    assert device_kernels("cuda").name in BACKENDS


@pytest.mark.parametrize("name", BACKENDS)
def test_state_dicts_on_the_gpu(name: str) -> None:
    """In-memory ingredients already on the GPU are souped there (no host round trip), into new
    tensors or in place (`out=` aliasing an ingredient, SWA-style), with the C++ kernel's bytes
    (NaN-free inputs here); an F64 tensor and an integer counter take the torch form and the
    copy. Tied targets on the GPU are computed before they are written."""
    g = torch.Generator().manual_seed(0)
    cpu = [{"w": torch.randn(257, 33, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
            "d": torch.randn(5, generator=g, dtype=torch.float64), "n": torch.tensor(3)} for _ in range(3)]
    want = soupkern.uniform_state_dict(cpu, backend="cpp")
    gpu = [{k: v.cuda() for k, v in sd.items()} for sd in cpu]
    got = soupkern.uniform_state_dict(gpu, backend=name)
    for k in want:
        assert got[k].device.type == "cuda" and torch.equal(got[k].cpu(), want[k]), k
    avg = {k: v.clone() for k, v in gpu[0].items()}
    ptr = avg["w"].data_ptr()
    soupkern.weighted_state_dict([avg, gpu[1]], [0.5, 0.5], out=avg, backend=name)
    assert avg["w"].data_ptr() == ptr
    ref = soupkern.weighted_state_dict([cpu[0], cpu[1]], [0.5, 0.5], backend="cpp")
    assert torch.equal(avg["w"].cpu(), ref["w"])
    tied_w = torch.randn(4, 4, device="cuda")
    tied = {"emb": tied_w, "head": tied_w}
    other = {"emb": torch.randn(4, 4, device="cuda")}
    other["head"] = other["emb"]
    expect = soupkern.uniform_state_dict([{k: v.cpu().clone() for k, v in tied.items()},
                                          {k: v.cpu().clone() for k, v in other.items()}], backend="cpp")
    soupkern.uniform_state_dict([tied, other], out=tied, backend=name)
    assert torch.equal(tied["emb"].cpu(), expect["emb"]) and torch.equal(tied["head"].cpu(), expect["head"])


@pytest.mark.parametrize("kernels", ["cuda", "triton"])
def test_resident_learned_soup_on_the_gpu(tmp_path: Path, kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model on the GPU trains from device copies by default (no tensor formed from the files),
    with the streaming CPU run's forward bits at the start and its coefficients at the end."""
    import soupkern.recipes.learned as learned_mod
    from soupkern.examples import digits

    paths = digits.make_ingredients(tmp_path, n=3, seed=0)
    val = digits.batches(digits.make_splits(0).val, 128)
    cpu = learned_mod.learned_soup(paths, model=digits.make_model(), data=val, steps=4, lr=0.1)
    real = learned_mod.fill_tensor
    calls = []
    learned_mod.fill_tensor = lambda *a: calls.append(1) or real(*a)  # type: ignore[assignment]
    monkeypatch.setenv("SOUPKERN_BACKEND", kernels)  # the device kernels (host soups ignore a device name)
    try:
        gpu = learned_mod.learned_soup(paths, model=digits.make_model().cuda(), data=val, steps=4, lr=0.1)
    finally:
        learned_mod.fill_tensor = real  # type: ignore[assignment]
    assert not calls
    assert gpu.uniform_loss == pytest.approx(cpu.uniform_loss, rel=1e-6)  # cuDNN/cuBLAS forward, same weights
    np.testing.assert_allclose(gpu.coefficients, cpu.coefficients, rtol=1e-4)


def test_greedy_on_the_gpu_reads_ahead_and_equals_the_cpu_run(tmp_path: Path) -> None:
    """Greedy with the model on the GPU (pinned staging, ingredients read ahead on a worker
    thread) keeps what the CPU run keeps and forms the same soup, bit for bit, with a scorer that
    is a deterministic function of the weights."""
    import soupkern.recipes.greedy as greedy_mod
    from soupkern.examples import digits

    paths = digits.make_ingredients(tmp_path, n=5, seed=1)

    def score(model: torch.nn.Module) -> float:  # a function of the weights alone: no device rounding
        return -float(sum(t.detach().cpu().double().abs().sum() for t in model.state_dict().values()))

    made = []
    real = greedy_mod._prefetcher_for

    def spy(soup, ahead):  # type: ignore[no-untyped-def]
        made.append(real(soup, ahead))
        return made[-1]

    cpu_model, gpu_model = digits.make_model(), digits.make_model().cuda()
    cpu = greedy_mod.greedy_soup(paths, model=cpu_model, score=score)
    greedy_mod._prefetcher_for = spy  # type: ignore[assignment]
    try:
        gpu = greedy_mod.greedy_soup(paths, model=gpu_model, score=score)
    finally:
        greedy_mod._prefetcher_for = real  # type: ignore[assignment]
    assert made and made[0] is not None and made[0].taken >= len(paths)
    assert gpu.kept == cpu.kept and gpu.ingredient_scores == cpu.ingredient_scores
    for (name, a), b in zip(cpu_model.state_dict().items(), gpu_model.state_dict().values()):
        assert torch.equal(a, b.cpu()), name
