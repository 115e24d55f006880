"""Fused soup-linear: S soups of K ingredients through one linear layer, no soup weight materialized.

Contract (every path implements it):

    Y[s] = X[s] · (Σ_k A[s,k] W_k)ᵀ + Σ_k A[s,k] b_k          s = 0..S-1

- X: [S, B, IN] (one input per soup) or [B, IN] (one input shared by every soup);
  W: [K, OUT, IN]; b: [K, OUT] or None; A: [S, K]. X, W, b: fp32, fp16 or bf16 (any mix); A is
  rounded to fp32.
- The mixed weight `Σ_k A[s,k] W_k` is formed in fp32 (Triton: k in order, one fp32 multiply-add
  per term; torch path: an fp32 einsum, BLAS summation order), then rounded once to X's dtype (a
  no-op for fp32 X): exactly the weight `F.linear` would see if the soup were materialized in X's
  dtype. Products X·Wᵀ are accumulated in fp32 (true fp32 for
  fp32 X: `input_precision="ieee"`, no TF32), the fp32 bias mix is added, and the result is rounded
  once to the output dtype: X's dtype by default, or fp32 (`out_dtype=torch.float32`).
- Not differentiable (evaluation only).

Cost (Triton kernel, blocks BM x BN x BK; x, w, y item sizes):
- FLOPs: 2·S·B·OUT·IN (the matmul) + 2·S·⌈B/BM⌉·K·OUT·IN (forming the soup tiles, repeated per row
  block: with B ≤ BM it is K/B of the matmul).
- Bytes from memory, at least: K·OUT·IN·w (every ingredient once) + S·B·IN·x (B·IN·x when shared)
  + S·B·OUT·y + S·K·4 (+ K·OUT·b). Ingredient tiles are re-read S·⌈B/BM⌉ times; the grid puts s on
  the fastest axis so those re-reads of a tile by neighbouring programs hit L2.
- Materialize-then-matmul instead writes and re-reads S·OUT·IN soup weights (2·S·OUT·IN·w more
  bytes) and needs S·OUT·IN·w of memory; the fused kernel needs none.

CPU path (`soup_linear_torch`): blocks of `out_block` output rows; per block the K ingredient rows
(in fp32: a copy unless they are fp32) are mixed by one einsum (a GEMM [S, K] x [K, out_block·IN])
into an [S, out_block, IN] fp32 temporary, then multiplied with X by a batched GEMM. Extra memory: at most
(K + S)·out_block·IN·4 + S·B·out_block·4 bytes (+ an fp32 copy of X when X is not fp32), with
out_block chosen from a budget (default 64 MiB, as the engine).
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Mapping, Sequence

import torch

from soupkern.errors import BackendUnavailableError, InputError

try:  # triton is optional: without it only the CPU/torch path exists
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if TYPE_CHECKING:
    from torch import nn

# The interpreter's tl.dot returns garbage for bf16 operands (triton 3.7.1, seen here): under
# TRITON_INTERPRET=1 bf16 tiles are widened to fp32 before the dot, which gives the same products
# (exact in fp32) and the same fp32 accumulation.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
Backend = Literal["auto", "triton", "torch"]
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_CPU_BUDGET_BYTES = 64 << 20  # the engine's default budget too
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the Triton kernel: the default, and the
# candidates measured on a GPU (2-4 stages: the loop over IN software-pipelined, W_k tiles of the
# next step loaded while this step's are mixed)
DEFAULT_LINEAR_CONFIG = (64, 64, 32, 4, 3)
LINEAR_CONFIGS = ((64, 64, 32, 4, 3), (64, 64, 32, 4, 2), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3),
                  (32, 64, 64, 4, 3), (128, 128, 32, 8, 3), (16, 128, 64, 4, 4))


if triton is not None:

    @triton.jit
    def _soup_linear_kernel(
        X, W, Bias, A, Y,
        B, OUT, IN, K,
        stride_xs, stride_xb, stride_xi,
        stride_wk, stride_wn, stride_wi,
        stride_bk, stride_bn,
        stride_as, stride_ak,
        stride_ys, stride_yb, stride_yn,
        HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        s = tl.program_id(0).to(tl.int64)  # soups on the fastest axis: neighbours share W tiles in L2
        pid_m = tl.program_id(1)
        pid_n = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < B
        mask_n = offs_n < OUT
        x_base = X + s * stride_xs + offs_m[:, None].to(tl.int64) * stride_xb
        w_base = W + offs_n[:, None].to(tl.int64) * stride_wn
        a_base = A + s * stride_as
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i0 in range(0, IN, BLOCK_K):
            cols = i0 + offs_k
            mask_i = cols < IN
            x = tl.load(x_base + cols[None, :] * stride_xi, mask=mask_m[:, None] & mask_i[None, :], other=0.0)
            wmix = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            w_ptrs = w_base + cols[None, :] * stride_wi
            a_ptr = a_base
            for _k in range(K):  # pointers advance by one ingredient: 64-bit, however large K·OUT·IN
                a = tl.load(a_ptr)
                w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_i[None, :], other=0.0)
                wmix += a * w.to(tl.float32)
                w_ptrs += stride_wk
                a_ptr += stride_ak
            wq = wmix.to(x.dtype)
            if UPCAST:  # exact: products of two bf16 values are exact in fp32 (interpreter workaround)
                acc = tl.dot(x.to(tl.float32), tl.trans(wq.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(wq), acc, input_precision="ieee")
        if HAS_BIAS:
            bmix = tl.zeros((BLOCK_N,), dtype=tl.float32)
            b_ptrs = Bias + offs_n * stride_bn
            a_ptr = a_base
            for _k in range(K):
                a = tl.load(a_ptr)
                bmix += a * tl.load(b_ptrs, mask=mask_n, other=0.0).to(tl.float32)
                b_ptrs += stride_bk
                a_ptr += stride_ak
            acc += bmix[None, :]
        y_ptr = Y + s * stride_ys + offs_m[:, None].to(tl.int64) * stride_yb + offs_n[None, :] * stride_yn
        tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _check(x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None, coeffs: torch.Tensor,
           out_dtype: torch.dtype | None) -> tuple[int, int, int, int, int, torch.dtype]:
    """Validate shapes, dtypes and devices; returns (S, K, B, OUT, IN, output dtype)."""
    if weights.dim() != 3:
        raise InputError(f"weights must be [K, OUT, IN], got shape {list(weights.shape)}")
    k, n_out, n_in = weights.shape
    if coeffs.dim() != 2 or coeffs.shape[1] != k:
        raise InputError(f"coefficients must be [S, K={k}], got shape {list(coeffs.shape)}")
    s = coeffs.shape[0]
    if x.dim() == 2:
        b, x_in = x.shape
    elif x.dim() == 3:
        if x.shape[0] != s:
            raise InputError(f"x is [S, B, IN] with S={x.shape[0]} but coefficients have S={s}")
        _, b, x_in = x.shape
    else:
        raise InputError(f"x must be [B, IN] or [S, B, IN], got shape {list(x.shape)}")
    if x_in != n_in:
        raise InputError(f"x has {x_in} input features, weights have {n_in}")
    if bias is not None and (bias.dim() != 2 or tuple(bias.shape) != (k, n_out)):
        raise InputError(f"bias must be [K={k}, OUT={n_out}], got shape {list(bias.shape)}")
    for name, t in (("x", x), ("weights", weights), ("bias", bias)):
        if t is not None and t.dtype not in _FLOATS:
            raise InputError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if not coeffs.is_floating_point():
        raise InputError(f"coefficients must be floating point, got {coeffs.dtype}")
    devices = {t.device for t in (x, weights, bias, coeffs) if t is not None}
    if len(devices) != 1:
        raise InputError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    y_dtype = x.dtype if out_dtype is None else out_dtype
    if y_dtype not in (x.dtype, torch.float32):
        raise InputError(f"out_dtype must be x's dtype ({x.dtype}) or torch.float32, got {out_dtype}")
    return s, k, b, n_out, n_in, y_dtype


def soup_linear_triton(
    x: torch.Tensor,
    weights: torch.Tensor,
    bias: torch.Tensor | None,
    coeffs: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """The module contract with the Triton kernel: validates, allocates [S, B, OUT], launches.

    CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. Blocks must be powers of two ≥ 16.
    Launch configuration (blocks, warps, software-pipeline stages of the loop over IN): as given,
    or, none given, on a GPU the fastest of `LINEAR_CONFIGS` for these dtypes and shapes (the batch
    size in power-of-two buckets), measured on this call's own tensors on first use (kernels/tuning.py); under the
    interpreter, and for any left out of a partial choice, `DEFAULT_LINEAR_CONFIG`.
    """
    if triton is None:
        raise BackendUnavailableError("the triton soup-linear kernel needs the 'triton' package")
    s, k, b, n_out, n_in, y_dtype = _check(x, weights, bias, coeffs, out_dtype)
    given = (block_m, block_n, block_k, num_warps, num_stages)
    for name, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if v is not None and (v < 16 or v & (v - 1)):
            raise InputError(f"{name} must be a power of two >= 16, got {v}")
    a = coeffs.to(torch.float32)
    y = torch.empty((s, b, n_out), dtype=y_dtype, device=x.device)
    if s == 0 or b == 0 or n_out == 0:
        return y
    if n_in == 0 or k == 0:  # empty sums: the kernel's loops would not run, the result is the bias mix
        return soup_linear_torch(x, weights, bias, coeffs, out_dtype=out_dtype)
    xs = (0, x.stride(0), x.stride(1)) if x.dim() == 2 else x.stride()
    bias_t = bias if bias is not None else weights  # dummy pointer, never read when HAS_BIAS is False
    bs = bias.stride() if bias is not None else (0, 0)

    def launch(config: tuple[int, int, int, int, int]) -> None:
        bm, bn, bk, warps, stages = config
        _soup_linear_kernel[(s, triton.cdiv(b, bm), triton.cdiv(n_out, bn))](
            x, weights, bias_t, a, y,
            b, n_out, n_in, k,
            *xs, *weights.stride(), *bs, *a.stride(), *y.stride(),
            HAS_BIAS=bias is not None, UPCAST=_INTERPRET and x.dtype == torch.bfloat16, BLOCK_M=bm, BLOCK_N=bn,
            BLOCK_K=bk, num_warps=warps, num_stages=stages,
        )

    if all(v is None for v in given) and not _INTERPRET:
        from soupkern.kernels.tuning import time_calls, tuned

        key = ("soup_linear", str(x.device), x.dtype, weights.dtype, y_dtype, bias is not None, x.dim(), s, k, n_out, n_in,
               min(triton.next_power_of_2(b), 256))
        config = tuned(key, LINEAR_CONFIGS, lambda configs: time_calls(x.device, launch, configs))
    else:
        config = tuple(d if v is None else v for v, d in zip(given, DEFAULT_LINEAR_CONFIG))  # type: ignore[assignment]
    launch(config)
    return y


def soup_linear_torch(
    x: torch.Tensor,
    weights: torch.Tensor,
    bias: torch.Tensor | None,
    coeffs: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    budget_bytes: int = DEFAULT_CPU_BUDGET_BYTES,
) -> torch.Tensor:
    """The module contract in plain torch, any device, blocked over output rows.

    Per block of `out_block` rows (the largest with ((K + S)·IN + S·B)·out_block·4 ≤
    `budget_bytes`, at least 1): the K ingredients' rows mixed by one fp32 GEMM into
    [S, out_block, IN], rounded to X's dtype and back (the contract's single rounding), then a
    batched fp32 GEMM with X and the fp32 bias mix. Memory is bounded by the budget instead of
    S·OUT·IN·4; on CPU it runs at 0.84-0.88× the speed of materializing the S soups in fp32 and
    0.43-0.63× in bf16 (fp32 GEMMs where torch would use bf16 ones; benchmarks/results/soup_linear_cpu.md).
    """
    s, k, b, n_out, n_in, y_dtype = _check(x, weights, bias, coeffs, out_dtype)
    a = coeffs.to(torch.float32)
    xf = x.to(torch.float32)
    y = torch.empty((s, b, n_out), dtype=y_dtype, device=x.device)
    step = max(1, budget_bytes // max(1, ((k + s) * n_in + s * b) * 4))
    for n0 in range(0, n_out, step):
        n1 = min(n0 + step, n_out)
        # einsum on the strided block view: torch.matmul on a [K, rows·IN] view of it would copy it first
        wmix = torch.einsum("sk,koi->soi", a, weights[:, n0:n1].to(torch.float32))
        if x.dtype != torch.float32:  # the contract's single rounding of the mixed weight to X's dtype
            wmix = wmix.to(x.dtype).to(torch.float32)
        yb = torch.matmul(xf, wmix.transpose(1, 2))  # [S, B, rows]; a shared X [B, IN] broadcasts
        del wmix
        if bias is not None:
            yb += torch.matmul(a, bias[:, n0:n1].to(torch.float32))[:, None, :]
        y[:, :, n0:n1] = yb
    return y


def soup_linear(
    x: torch.Tensor,
    weights: torch.Tensor,
    bias: torch.Tensor | None,
    coeffs: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Y[s] = X[s] · (Σ_k A[s,k] W_k)ᵀ + Σ_k A[s,k] b_k (module docstring: the contract).

    backend="auto": the Triton kernel for CUDA tensors (when triton is installed), the torch
    path otherwise (CPU tensors). "triton" or "torch" force one; "triton" on CPU tensors needs
    TRITON_INTERPRET=1 set before soupkern.kernels.soup_linear is imported.
    """
    if backend == "auto":
        backend = "triton" if x.is_cuda and triton is not None else "torch"
    if backend == "triton":
        return soup_linear_triton(x, weights, bias, coeffs, out_dtype=out_dtype)
    if backend == "torch":
        return soup_linear_torch(x, weights, bias, coeffs, out_dtype=out_dtype)
    raise InputError(f"backend must be 'auto', 'triton' or 'torch', got '{backend}'")


# --------------------------------------------------------------------------------- models of Linear layers
class LinearSoups:
    """S soups of a model whose weights all live in `nn.Linear` layers, evaluated in one pass.

    During a call every `nn.Linear` of `model` runs `soup_linear` with the K ingredients' stacked
    weight [K, OUT, IN] and bias and the coefficients [S, K]: no soup's weights are materialized
    (on CUDA the Triton kernel forms them tile by tile). The first Linear receives the shared input
    [B, ...] and returns [S, B, ...]; everything after it must act on the last dimension only
    (activations, further Linears, reshapes of the last dim), as in an MLP or a head on top of
    fixed features; the output must be [S, B, ...] (checked). Every float parameter and buffer of
    the model must belong to a Linear (else InputError: use the vmap evaluator). Ingredients:
    state dicts or checkpoint paths (read once through soupkern's reader); their Linear tensors are
    stacked once, which holds K copies of the Linear weights (`dtype`/`device` convert them).
    """

    def __init__(self, model: nn.Module, ingredients: Sequence[Mapping[str, torch.Tensor] | str | os.PathLike[str]],
                 *, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        from torch import nn

        if not ingredients:
            raise InputError("LinearSoups needs at least one ingredient")
        linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
        if not linears:
            raise InputError("the model has no nn.Linear layer")
        owned = {f"{n}.{p}" for n, m in linears.items() for p in ("weight", "bias") if getattr(m, p) is not None}
        for name, t in model.state_dict().items():
            if t.is_floating_point() and name not in owned:
                raise InputError("float tensor outside an nn.Linear: LinearSoups cannot soup it "
                                 "(use the vmap evaluator, soupkern.evaluate)", tensor=name)
        self.model = model
        self.k = len(ingredients)
        self.stacked: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        with ExitStack() as files:
            states = [_state(ing, files) for ing in ingredients]
            for name, mod in linears.items():
                w = torch.stack([_param(sd, f"{name}.weight", i) for i, sd in enumerate(states)])
                b = (torch.stack([_param(sd, f"{name}.bias", i) for i, sd in enumerate(states)])
                     if mod.bias is not None else None)
                self.stacked[name] = (w.to(device=device, dtype=dtype or w.dtype),
                                      None if b is None else b.to(device=device, dtype=dtype or b.dtype))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, coeffs: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
        """Outputs [S, B, ...] of the S soups `coeffs` [S, K] on the shared batch `x` [B, ...]."""
        if coeffs.dim() != 2 or coeffs.shape[1] != self.k:
            raise InputError(f"coefficients must be [S, K={self.k}], got shape {list(coeffs.shape)}")
        mods = dict(self.model.named_modules())
        patched = []
        try:
            for name, (w, b) in self.stacked.items():
                def forward(inp: torch.Tensor, w: torch.Tensor = w, b: torch.Tensor | None = b) -> torch.Tensor:
                    return soup_linear(inp.to(w.dtype), w, b, coeffs.to(w.device), backend=backend)

                mods[name].forward = forward  # type: ignore[method-assign]
                patched.append(mods[name])
            out: torch.Tensor = self.model(x)
        finally:
            for mod in patched:
                del mod.forward  # back to the class's forward
        if out.dim() < 2 or out.shape[0] != coeffs.shape[0] or out.shape[1] != x.shape[0]:
            raise InputError(f"the model's output has shape {list(out.shape)}, not [S={coeffs.shape[0]}, "
                             f"B={x.shape[0]}, ...]: something after the first Linear mixes the leading dims")
        return out

    def score(self, data: Iterable[Any], coeffs: torch.Tensor, metric: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "accuracy",
              *, backend: Backend = "auto") -> list[float]:
        """Mean metric of each soup over held-out batches `(inputs, targets)`, one pass, fp64 sums.

        metric: "accuracy", "loss" or a per-sample callable, as in `soupkern.evaluate`.
        """
        from soupkern.evaluate import METRICS

        fn = METRICS[metric][0] if isinstance(metric, str) else metric
        totals = torch.zeros(coeffs.shape[0], dtype=torch.float64)
        n = 0
        for inputs, targets in data:
            out = self(inputs, coeffs, backend=backend)
            t = targets.to(out.device)
            for s in range(out.shape[0]):
                totals[s] += fn(out[s], t).sum(dtype=torch.float64).cpu()
            n += len(targets)
        if n == 0:
            raise InputError("the held-out data is empty")
        return (totals / n).tolist()


def _state(ing: Mapping[str, torch.Tensor] | str | os.PathLike[str], files: ExitStack) -> Mapping[str, torch.Tensor]:
    """A state dict as given, or zero-copy views of a checkpoint kept open by `files`."""
    if isinstance(ing, Mapping):
        return ing
    from soupkern.evaluate import tensor_view
    from soupkern.io import open_checkpoint

    ck = files.enter_context(open_checkpoint(ing))
    return {n: tensor_view(ck, n) for n in ck.tensors}


def _param(sd: Mapping[str, torch.Tensor], name: str, i: int) -> torch.Tensor:
    if name not in sd:
        raise InputError(f"ingredient {i} has no tensor '{name}'", tensor=name)
    return sd[name]
