"""soupkern::weighted_sum as a torch operator: torch.library.opcheck (schema, fake tensor,
registration), eager results equal to the C++ path of the state-dict API bit for bit, and the
same bits under torch.compile (the op is opaque to the compiler: it runs the same kernel)."""

from __future__ import annotations

import pytest
import torch

import soupkern
from soupkern.ops import weighted_sum


def inputs(k: int, dtype: torch.dtype, n: int = 1000) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(k)
    return [torch.randn(n, 3, generator=g).to(dtype) for _ in range(k)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_eager_equals_the_state_dict_api(dtype: torch.dtype) -> None:
    xs = inputs(3, dtype)
    got = weighted_sum(xs, [1.0, 1.0, 1.0], 3.0)
    want = soupkern.uniform_state_dict([{"x": x} for x in xs])["x"]
    assert got.dtype == dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    mixed = weighted_sum([xs[0], xs[1].float()], [0.25, 0.75], dtype=torch.float32)
    assert torch.equal(mixed, soupkern.weighted_state_dict([{"x": xs[0]}, {"x": xs[1].float()}], [0.25, 0.75],
                                                          dtype="fp32")["x"])


def test_opcheck() -> None:
    xs = inputs(2, torch.float32, 16)
    torch.library.opcheck(torch.ops.soupkern.weighted_sum.default, (xs, [0.5, 0.5], 1.0, None))
    torch.library.opcheck(torch.ops.soupkern.weighted_sum.default, (xs, [1.0, 1.0], 2.0, torch.bfloat16))


def test_under_torch_compile() -> None:
    xs = inputs(4, torch.bfloat16, 64)

    def soup_then_scale(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return torch.ops.soupkern.weighted_sum([a, b, c, d], [1.0] * 4, 4.0, torch.float32) * 2

    eager = soup_then_scale(*xs)
    compiled = torch.compile(soup_then_scale, backend="aot_eager", fullgraph=True)(*xs)
    assert torch.equal(eager, compiled)


def test_bad_arguments() -> None:
    xs = inputs(2, torch.float32)
    with pytest.raises(soupkern.InputError, match="2 inputs and 1 weights"):
        weighted_sum(xs, [1.0])
    with pytest.raises(soupkern.InputError, match="input 1"):
        weighted_sum([xs[0], xs[1][:10]], [1.0, 1.0])
    with pytest.raises(soupkern.InputError, match="divisor"):
        weighted_sum(xs, [1.0, 1.0], 0.0)
