"""Fused soup-linear (soupkern.kernels.soup_linear) against an fp64 reference.

Reference: Y = X · (Σ A W)ᵀ + Σ A b computed in float64 from the same (already rounded) inputs.

Error bound per output element (standard γ_n = n·u/(1-n·u) summation bounds, u32 = 2^-24):

    |Y - ref| ≤ (u_w + (K + IN + 2)·u32) · (|X| · (Σ_k |A_k| |W_k|)ᵀ) + (K + 2)·u32 · Σ_k |A_k| |b_k| + u_out·|ref|

- u_w: the single rounding of the fp32 mixed weight to X's dtype (contract): 0 for fp32, 2^-11 for
  fp16, 2^-8 for bf16 (round to nearest). Under the Triton interpreter fp32 -> bf16 conversions
  truncate instead of rounding to nearest (about half of the values end up 1 ulp off), so a bf16
  weight or output may be off by up to a whole ulp: 2^-7.
- (K + IN + 2)·u32: fp32 mixing (K terms), fp32 dot product (IN terms), the bias add.
- u_out: rounding of the output to its dtype (0 when fp32 is requested).
The bound is a few ulps of the data's scale, so a wrong coefficient, a dropped bias or a wrong
ingredient index (errors of order |y|) fails it.
"""

from __future__ import annotations

import pytest
import torch

from soupkern.errors import InputError
from soupkern.kernels.soup_linear import LinearSoups, soup_linear, soup_linear_torch, soup_linear_triton

U32 = 2.0**-24
UNIT_W = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
TRUNC_BF16 = 2.0**-7  # interpreter: fp32 -> bf16 conversion truncates (up to one ulp)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKS = {"block_m": 16, "block_n": 16, "block_k": 16}  # small blocks: odd shapes span several tiles

# (S, K, B, OUT, IN, shared x, bias)
SHAPES = [
    (1, 1, 1, 1, 1, False, True),
    (3, 4, 19, 37, 45, False, True),
    (2, 3, 17, 16, 33, True, False),
    (1, 5, 33, 20, 16, True, True),
    (4, 1, 5, 40, 7, False, True),
]


def make(s: int, k: int, b: int, n_out: int, n_in: int, shared: bool, has_bias: bool, dtype: torch.dtype,
         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((b, n_in) if shared else (s, b, n_in), generator=g).to(dtype)
    w = torch.randn((k, n_out, n_in), generator=g).to(dtype)
    bias = torch.randn((k, n_out), generator=g).to(dtype) if has_bias else None
    a = torch.randn((s, k), generator=g)  # any sign, not summing to 1
    return x, w, bias, a


def reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp64 result, scale of the matmul part, scale of the bias part)."""
    a64 = a.to(torch.float32).double()  # the contract rounds A to fp32
    x64, w64 = x.double(), w.double()
    wmix = torch.einsum("sk,koi->soi", a64, w64)
    wabs = torch.einsum("sk,koi->soi", a64.abs(), w64.abs())
    y = torch.matmul(x64, wmix.transpose(1, 2))
    scale = torch.matmul(x64.abs(), wabs.transpose(1, 2))
    bscale = torch.zeros_like(y)
    if bias is not None:
        y = y + (a64 @ bias.double())[:, None, :]
        bscale = bscale + (a64.abs() @ bias.double().abs())[:, None, :]
    return y, scale, bscale


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
          u_w: float, u_out: float) -> None:
    ref, scale, bscale = reference(x, w, bias, a)
    k, n_in = w.shape[0], w.shape[2]
    bound = (u_w + (k + n_in + 2) * U32) * scale + (k + 2) * U32 * bscale + u_out * ref.abs() + 1e-30
    err = (y.double() - ref).abs()
    worst = int(torch.argmax(err / bound))
    assert bool((err <= bound).all()), (
        f"max err/bound {float((err / bound).flatten()[worst]):.3g} at flat index {worst}: "
        f"got {float(y.double().flatten()[worst])}, ref {float(ref.flatten()[worst])}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + ("-shared" if s[5] else "") + ("-bias" if s[6] else ""))
def test_triton_fp32_output(shape: tuple, dtype: torch.dtype) -> None:
    x, w, bias, a = make(*shape, dtype)
    y = soup_linear_triton(x, w, bias, a, out_dtype=torch.float32, **BLOCKS)
    assert y.dtype == torch.float32 and y.shape == (shape[0], shape[2], shape[3])
    u_w = TRUNC_BF16 if dtype == torch.bfloat16 else UNIT_W[dtype]
    check(y, x, w, bias, a, u_w, 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
def test_torch_path(shape: tuple, dtype: torch.dtype) -> None:
    x, w, bias, a = make(*shape, dtype)
    y = soup_linear_torch(x, w, bias, a, out_dtype=torch.float32)
    check(y, x, w, bias, a, UNIT_W[dtype], 0.0)  # torch rounds to nearest: half the interpreter's ulp
    y_native = soup_linear_torch(x, w, bias, a)
    assert y_native.dtype == dtype
    check(y_native, x, w, bias, a, UNIT_W[dtype], UNIT_W[dtype] if dtype != torch.float32 else 0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_native_output_dtype(dtype: torch.dtype) -> None:
    x, w, bias, a = make(3, 2, 18, 21, 24, False, True, dtype, seed=1)
    y = soup_linear_triton(x, w, bias, a, **BLOCKS)
    assert y.dtype == dtype
    u = TRUNC_BF16 if dtype == torch.bfloat16 else UNIT_W[dtype]
    check(y, x, w, bias, a, u, u)


def test_torch_path_small_budget_blocks_rows() -> None:
    """A budget of one output row per block gives the same result as one block."""
    x, w, bias, a = make(3, 4, 9, 13, 20, False, True, torch.float32, seed=2)
    y_small = soup_linear_torch(x, w, bias, a, budget_bytes=1)
    check(y_small, x, w, bias, a, 0.0, 0.0)
    torch.testing.assert_close(y_small, soup_linear_torch(x, w, bias, a), rtol=0, atol=1e-5)


def test_exactly_representable_soup_is_exact() -> None:
    """K=1, A=1 and small integers: every step is exact, both paths must return the exact integers."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-4, 5, (2, 17, 19), generator=g).to(torch.bfloat16)
    w = torch.randint(-4, 5, (1, 18, 19), generator=g).to(torch.bfloat16)
    b = torch.randint(-4, 5, (1, 18), generator=g).to(torch.bfloat16)
    a = torch.ones(2, 1)
    ref = torch.matmul(x.double(), w[0].double().T) + b[0].double()
    for y in (soup_linear_triton(x, w, b, a, out_dtype=torch.float32, **BLOCKS),
              soup_linear_torch(x, w, b, a, out_dtype=torch.float32)):
        assert torch.equal(y.double(), ref.expand_as(y))


def test_auto_dispatch_on_cpu_is_torch_path() -> None:
    x, w, bias, a = make(2, 3, 5, 6, 7, True, True, torch.float32)
    assert torch.equal(soup_linear(x, w, bias, a), soup_linear_torch(x, w, bias, a))
    with pytest.raises(InputError, match="backend"):
        soup_linear(x, w, bias, a, backend="cuda")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad, match", [
    (lambda x, w, b, a: (x, w[0], b, a), "weights must be"),
    (lambda x, w, b, a: (x, w, b, a[:, :2]), "coefficients must be"),
    (lambda x, w, b, a: (x[:1], w, b, a), "S=1"),
    (lambda x, w, b, a: (x[..., :3], w, b, a), "input features"),
    (lambda x, w, b, a: (x, w, b[:, :2], a), "bias must be"),
    (lambda x, w, b, a: (x.double(), w, b, a), "x must be float32"),
    (lambda x, w, b, a: (x, w, b, a.long()), "floating point"),
    (lambda x, w, b, a: (x[0, 0, 0], w, b, a), "x must be"),
])
def test_validation(bad, match: str) -> None:
    x, w, bias, a = make(2, 3, 4, 5, 6, False, True, torch.float32)
    for fn in (soup_linear_torch, soup_linear_triton):
        with pytest.raises(InputError, match=match):
            fn(*bad(x, w, bias, a))
    with pytest.raises(InputError, match="out_dtype"):
        soup_linear_torch(x, w, bias, a, out_dtype=torch.float16)
    with pytest.raises(InputError, match="power of two"):
        soup_linear_triton(x, w, bias, a, block_m=24)


def _mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 20), torch.nn.ReLU(),
                               torch.nn.Linear(20, 17), torch.nn.GELU(), torch.nn.Dropout(0.5),
                               torch.nn.Linear(17, 5)).eval()


def _vmap_outputs(model: torch.nn.Module, ingredients: list[dict[str, torch.Tensor]], a: torch.Tensor,
                  x: torch.Tensor) -> torch.Tensor:
    """Independent path: soups materialized in fp64 (rounded to fp32), run by vmap(functional_call)."""
    from torch.func import functional_call, vmap

    stacked = {k: torch.einsum("sk,k...->s...", a.double(), torch.stack([sd[k] for sd in ingredients]).double()).float()
               for k in ingredients[0]}
    return vmap(lambda p: functional_call(model, p, (x,)))(stacked)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_soups_equal_vmap_functional_call(backend: str) -> None:
    model = _mlp(0)
    ingredients = [{k: v.detach().clone() for k, v in _mlp(s).state_dict().items()} for s in range(1, 4)]
    a = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [-0.5, 1.0, 0.5]])
    x = torch.randn(23, 3, 4)
    got = LinearSoups(model, ingredients)(x, a, backend=backend)  # type: ignore[arg-type]
    assert got.shape == (4, 23, 5)
    # fp32 throughout; the soups differ only in summation order of the mixing and matmuls: a few fp32 ulps
    torch.testing.assert_close(got, _vmap_outputs(model, ingredients, a, x), rtol=1e-5, atol=1e-5)
    assert all(m.forward.__func__ is type(m).forward for m in model.modules() if isinstance(m, torch.nn.Linear))  # type: ignore[attr-defined]


def test_linear_soups_on_digits_checkpoints_match_the_evaluator(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A custom-forward model (DigitsMLP) read from safetensors files; scores equal Evaluator.score_stacked."""
    from soupkern.evaluate import Evaluator
    from soupkern.examples import digits

    paths = []
    for s in range(3):
        m = digits.make_model(hidden=16, seed=s)
        paths.append(digits.save_ingredient(m.state_dict(), tmp_path / f"m{s}.safetensors"))
    model = digits.make_model(hidden=16)
    sds = [digits.load_state(p) for p in paths]
    a = torch.tensor([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0]])
    data = [(torch.rand(40, 64, generator=torch.Generator().manual_seed(i)), torch.arange(40) % 10) for i in range(2)]
    soups = LinearSoups(model, paths)
    x = data[0][0]
    torch.testing.assert_close(soups(x, a), _vmap_outputs(model, sds, a, x), rtol=1e-5, atol=1e-5)
    stacked = {k: torch.einsum("sk,k...->s...", a.double(), torch.stack([sd[k] for sd in sds]).double()).float()
               for k in sds[0]}
    for metric in ("loss", "accuracy"):
        expected = Evaluator(model, data, metric=metric).score_stacked(stacked)
        got = soups.score(data, a, metric)
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-9 if metric == "loss" else 1 / 80 + 1e-12)


def test_linear_soups_rejects_what_it_cannot_soup() -> None:
    ln = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with pytest.raises(InputError, match="outside an nn.Linear"):
        LinearSoups(ln, [ln.state_dict()])
    with pytest.raises(InputError, match="no tensor"):
        LinearSoups(torch.nn.Sequential(torch.nn.Linear(4, 4)), [{}])
    mixing = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Flatten(0, 1))
    soups = LinearSoups(mixing, [mixing.state_dict()] * 2)
    with pytest.raises(InputError, match="leading dims"):
        soups(torch.randn(3, 4), torch.ones(2, 2) / 2)
    with pytest.raises(InputError, match="coefficients"):
        soups(torch.randn(3, 4), torch.ones(2, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_on_gpu(dtype: torch.dtype) -> None:
    x, w, bias, a = make(5, 4, 300, 200, 130, False, True, dtype, seed=7)
    y = soup_linear_triton(x.cuda(), w.cuda(), bias.cuda() if bias is not None else None, a.cuda(),
                           out_dtype=torch.float32)
    check(y.cpu(), x, w, bias, a, UNIT_W[dtype], 0.0)  # on a GPU the bf16 conversion rounds to nearest
    y_native = soup_linear_triton(x.cuda(), w.cuda(), bias.cuda() if bias is not None else None, a.cuda())
    check(y_native.cpu(), x, w, bias, a, UNIT_W[dtype], UNIT_W[dtype] if dtype != torch.float32 else 0.0)


def test_every_tuning_candidate_meets_the_contract_and_the_fastest_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no blocks given on a GPU, soup-linear measures `LINEAR_CONFIGS` on its own call and
    keeps the fastest. Here (interpreter, fp32: no bf16 work-around needed) with the timing
    replaced: every candidate's output meets the contract's bound, the measurement runs once per
    key, and the chosen candidate is the one launched."""
    import soupkern.kernels.soup_linear as sl
    from soupkern.kernels import tuning

    monkeypatch.setattr(sl, "_INTERPRET", False)  # take the GPU's tuned path
    monkeypatch.setattr(tuning, "_chosen", {})
    x, w, bias, a = make(3, 4, 19, 37, 45, False, True, torch.float32)
    measured = []

    def fake_time(device, run, configs):  # type: ignore[no-untyped-def]
        measured.append(tuple(configs))
        times = {}
        for i, config in enumerate(configs):
            run(config)
            times[config] = 1.0 if config == sl.LINEAR_CONFIGS[2] else 2.0 + i
        return times

    launched = []
    real_kernel = sl._soup_linear_kernel

    class Spy:
        def __getitem__(self, grid):  # type: ignore[no-untyped-def]
            def call(*args, **kw):  # type: ignore[no-untyped-def]
                launched.append((kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["num_warps"], kw["num_stages"]))
                return real_kernel[grid](*args, **kw)
            return call

    monkeypatch.setattr(tuning, "time_calls", fake_time)
    monkeypatch.setattr(sl, "_soup_linear_kernel", Spy())
    y = soup_linear_triton(x, w, bias, a, out_dtype=torch.float32)
    check(y, x, w, bias, a, 0.0, 0.0)  # the chosen candidate's result (written last)
    assert measured == [sl.LINEAR_CONFIGS] and launched == [*sl.LINEAR_CONFIGS, sl.LINEAR_CONFIGS[2]]
    for config in sl.LINEAR_CONFIGS:  # each candidate alone meets the contract
        bm, bn, bk, warps, stages = config
        yc = soup_linear_triton(x, w, bias, a, out_dtype=torch.float32, block_m=bm, block_n=bn, block_k=bk,
                                num_warps=warps, num_stages=stages)
        check(yc, x, w, bias, a, 0.0, 0.0)
    soup_linear_triton(x, w, bias, a, out_dtype=torch.float32)  # cached: no second measurement
    assert len(measured) == 1 and launched[-1] == sl.LINEAR_CONFIGS[2]
