"""Learned soup (Wortsman et al. 2022, appendix I): mixing coefficients optimized on held-out data.

Parametrization: logits α, coefficients c = softmax(α) over the K ingredients, one vector for the
whole model (mode "by_model", K parameters) or one per float tensor of the model ("by_layer",
T × K parameters, softmax per tensor). Initialized at zero logits (the uniform soup), optimized by
AdamW (weight decay 0 by default, lr 0.05 and 5 epochs as the paper's code recommends) on the
cross-entropy of the soup's outputs over the held-out batches, in order, for `epochs` passes (or
`steps` steps). Optionally a temperature β (init 1) multiplies the logits during training, as in
the reference code; it changes the loss being optimized, not the soup, and is reported.

Memory: ingredients stay memory-mapped. In every forward pass each tensor of the soup is formed
on its own by the engine's weighted-sum kernel straight from the K zero-copy mmap views into one
fp32 tensor (`engine.fill_tensor`); its gradient with respect to the coefficients,
∂L/∂c_k = <∂L/∂W, W_k>, is computed in fp64 over the engine's work items (`engine.run`: zero-copy
views of the K sources over the same elements). Peak memory is one fp32 copy of the model (the
soup being evaluated, held by autograd) plus activations and one work item, never K copies. The
model itself is only run through `torch.func.functional_call`; its own weights are not changed.
Mixing runs on the CPU; the mixed tensors are moved to the model's device. Resident (`resident=`,
by default when the model is on a CUDA device with room for them): the K ingredients' mixed tensors
are copied onto the device once, and mixing (one multi-tensor call of the device kernels per
coefficient vector: one in all for by_model), the coefficient gradients (fp64 dots, in chunks of
2^24 elements) and the optimizer step all run there, with two host
synchronizations per step (reading the coefficients the kernels take as scalars, and the loss).

Result: the coefficients (softmax of the final logits, in fp64) are written into the output's
metadata (`soupkern.learned.*`) and the soup is produced by the engine: by_model through
`weighted_soup(recipe="learned")`; by_layer tensor by tensor with per-tensor coefficients
(`per_tensor_soup`), with the same kernel, layout and provenance.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from soupkern.backends import Backend, device_kernels, get_backend
from soupkern.engine import DEFAULT_BUDGET_BYTES, WorkItem, fill_tensor, run, tensor_items
from soupkern import strict_json
from soupkern.io.sources import labels
from soupkern.options import check_budget, ingredient_list
from soupkern.errors import InputError
from soupkern.plan import KeyPolicy, SoupPlan, TensorPlan, build_plan
from soupkern.recipes.weighted import SoupReport, check_soup_output, open_ingredients, reserves_output, weighted_soup
from soupkern.torch_dtypes import TORCH_DTYPES, torch_view

if TYPE_CHECKING:
    from soupkern.backends.device import DeviceKernels
    from soupkern.distributed import Group

PathLike = str | os.PathLike[str]
LearnedMode = Literal["by_model", "by_layer"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_DEVICE_NAMES = ("cuda", "triton", "torch")  # backend= names that also name device kernels
_GRAD_CHUNK = 1 << 20
_RESIDENT_GRAD_CHUNK = 1 << 24  # on the device: 2 x 128 MiB of fp64 temporaries, few launches  # elements per chunk of the coefficient-gradient reduction (2 × 8 MiB of fp64)


@dataclass(frozen=True)
class LearnedSoupResult:
    """What a learned-soup run found. `coefficients[g]` sums to 1 over the K ingredients."""

    mode: LearnedMode
    ingredients: tuple[str, ...]
    groups: tuple[str, ...]  # ("*",) for by_model, else the tensor names (sorted)
    coefficients: tuple[tuple[float, ...], ...]  # [G][K], fp64 softmax of the final logits
    loss_history: tuple[float, ...]  # training loss of every step (with the temperature, if learned)
    uniform_loss: float  # held-out loss / accuracy of the uniform soup (the starting point)
    uniform_accuracy: float
    learned_loss: float  # ... and of the learned soup
    learned_accuracy: float
    temperature: float | None
    steps: int
    seconds: float
    report: SoupReport | None = None  # the written soup, when `out` was given
    settings: dict[str, Any] = field(default_factory=dict)

    def coefficient_map(self) -> dict[str, tuple[float, ...]]:
        """Group name -> coefficients ("*" -> K values for by_model)."""
        return dict(zip(self.groups, self.coefficients))

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("mode", "uniform_loss", "uniform_accuracy", "learned_loss",
                                            "learned_accuracy", "temperature", "steps", "seconds", "settings")}
        d["ingredients"] = list(self.ingredients)
        d["coefficients"] = ({g: list(c) for g, c in self.coefficient_map().items()} if self.mode == "by_layer"
                             else list(self.coefficients[0]))
        d["loss_history"] = list(self.loss_history)
        d["output"] = [str(p) for p in self.report.paths] if self.report else None
        return d

    def to_table(self) -> str:
        rows = [("uniform soup (init)", self.uniform_loss, self.uniform_accuracy),
                (f"learned soup ({self.mode})", self.learned_loss, self.learned_accuracy)]
        lines = [f"{'soup':<24}  {'held-out loss':>13}  {'accuracy':>8}"]
        lines += [f"{n:<24}  {loss:>13.6f}  {acc:>8.4f}" for n, loss, acc in rows]
        if self.mode == "by_model":
            lines.append("")
            lines += [f"{os.path.basename(p):<24}  c = {c:.6f}" for p, c in zip(self.ingredients, self.coefficients[0])]
        return "\n".join(lines)


class _MixFromMmap(torch.autograd.Function):
    """W = Σ_k c_k W_k for one tensor, formed from the mmap views by the engine kernel (fp32 out).

    Backward: ∂L/∂c_k = <∂L/∂W, W_k>, reduced in fp64 over the engine's work items of
    `_GRAD_CHUNK` elements (each source's partial dots added in element order; no copy of W_k kept).
    """

    @staticmethod
    def forward(ctx: Any, coeffs: torch.Tensor, tp: TensorPlan, backend: Backend) -> torch.Tensor:  # type: ignore[override]
        out = torch.empty(tp.out.shape, dtype=torch.float32)
        weights = tuple(float(c) for c in coeffs.detach().to(torch.float64).tolist())
        fill_tensor(tp, weights, out.view(-1).view(torch.uint8).numpy(), backend)
        ctx.tp = tp
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        tp: TensorPlan = ctx.tp
        g = grad.detach().to("cpu").reshape(-1)
        acc = torch.zeros(len(tp.sources), dtype=torch.float64)

        def dot(item: WorkItem, views: list[Any]) -> None:
            g64 = g[item.start:item.start + item.count].to(torch.float64)
            for k, (v, (_, info)) in enumerate(zip(views, item.sources)):
                acc[k] += torch.dot(g64, torch_view(v, info.dtype).to(torch.float64))

        run(tensor_items(tp, _GRAD_CHUNK), dot)
        return acc.to(grad.dtype), None, None


@dataclass
class _Problem:
    """The float tensors the model uses, with their plans, groups and targets."""

    names: list[str]  # model state-dict names that are mixed (float, present in the checkpoints)
    plans: dict[str, TensorPlan]
    targets: dict[str, torch.Tensor]  # the model's own tensors (dtype/device of the mixed weight)
    group_of: dict[str, int]
    groups: tuple[str, ...]


def _problem(model: nn.Module, plan: SoupPlan, mode: LearnedMode, path: str) -> _Problem:
    by_name = {tp.out.name: tp for tp in plan.tensors}
    targets = dict(model.state_dict(keep_vars=True))
    # tied tensors (one parameter under several names, e.g. an LM head tied to the embedding) are
    # mixed once, under the first of their names the ingredients hold: functional_call ties the rest
    tied: dict[int, list[str]] = {}
    for name, t in sorted(targets.items()):
        tied.setdefault(id(t), []).append(name)
    mixed_as = {ns[0]: next((n for n in ns if n in by_name), ns[0]) for ns in tied.values()}
    names = []
    for name, t in sorted(targets.items()):
        if not t.is_floating_point() or name not in mixed_as:
            continue  # integer buffers (e.g. num_batches_tracked) keep the model's values; tied names: once
        name = mixed_as[name]
        tp = by_name.get(name)
        if tp is None:
            raise InputError("the model has this float tensor but the ingredients do not", path=path, tensor=name)
        if tuple(tp.out.shape) != tuple(t.shape):
            raise InputError(f"shape {list(tp.out.shape)} in the ingredients, {list(t.shape)} in the model",
                             path=path, tensor=name)
        if not tp.average:
            raise InputError(f"the model's tensor is float but the ingredients hold {tp.sources[0][1].dtype}",
                             path=path, tensor=name)
        names.append(name)
    if not names:
        raise InputError("the model has no float tensor to soup", path=path)
    groups = ("*",) if mode == "by_model" else tuple(names)
    group_of = {n: (0 if mode == "by_model" else i) for i, n in enumerate(names)}
    return _Problem(names, {n: by_name[n] for n in names}, targets, group_of, groups)


class _MixResident(torch.autograd.Function):
    """W_t = Σ_k c_k W_{t,k} for tensors t sharing one coefficient vector (every tensor for
    by_model, one for by_layer), from the K ingredients' copies on the model's device, by one
    multi-tensor call of the device kernels (the engine's exact-arithmetic contract, fp32 out;
    `weights` are the coefficients as floats, read once per step). Backward: ∂L/∂c_k =
    Σ_t <∂L/∂W_t, W_{t,k}> in fp64 on the device, returned there (no host synchronization)."""

    @staticmethod
    def forward(ctx: Any, coeffs: torch.Tensor, rows: list[list[torch.Tensor]], weights: tuple[float, ...],  # type: ignore[override]
                kernels: DeviceKernels) -> tuple[torch.Tensor, ...]:
        outs = [torch.empty(xs[0].shape, dtype=torch.float32, device=xs[0].device) for xs in rows]
        kernels.multi_weighted_sum([o.view(-1) for o in outs], [[x.view(-1) for x in xs] for xs in rows], weights)
        ctx.rows = rows
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        acc = sum(_resident_dots(g, xs) for g, xs in zip(grads, ctx.rows))
        return acc.to(grads[0].dtype), None, None, None  # type: ignore[union-attr]


def _resident_dots(grad: torch.Tensor, xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """[<grad, x_k> for each k] in fp64 on grad's device, in chunks of _RESIDENT_GRAD_CHUNK
    elements (fp64 copies of one chunk at a time)."""
    g = grad.detach().reshape(-1)
    acc = torch.zeros(len(xs), dtype=torch.float64, device=g.device)
    for lo in range(0, g.numel(), _RESIDENT_GRAD_CHUNK):
        g64 = g[lo:lo + _RESIDENT_GRAD_CHUNK].to(torch.float64)
        acc += torch.stack([torch.dot(g64, x.reshape(-1)[lo:lo + _RESIDENT_GRAD_CHUNK].to(torch.float64)) for x in xs])
    return acc


class _Resident:
    """The K ingredients' float tensors the problem mixes, copied once onto `device` (what the
    resident learned soup trains from), with the device kernels that mix them."""

    def __init__(self, prob: _Problem, device: torch.device, kernels: DeviceKernels):
        self.kernels = kernels
        self.xs: dict[str, list[torch.Tensor]] = {}
        for name in prob.names:
            tp = prob.plans[name]
            row = []
            for f, info in tp.sources:
                row.append(torch_view(f.view(info), info.dtype).view(tp.out.shape).to(device, copy=True))
                f.release(info.begin, info.end)
            self.xs[name] = row


def resident_bytes(prob: _Problem) -> int | None:
    """Device bytes the resident learned soup holds (every source of every mixed tensor), or None
    when a source's dtype is not one the device kernels take (fp32, fp16, bf16)."""
    total = 0
    for name in prob.names:
        for _, info in prob.plans[name].sources:
            if info.dtype not in ("F32", "F16", "BF16"):
                return None
            total += info.nbytes
    return total


def _use_resident(resident: bool | None, prob: _Problem, device: torch.device, path: str) -> bool:
    """Whether to train from device copies: `resident` True/False, or None (automatic) when the
    model is on a CUDA device and the copies take at most half of its free memory."""
    if resident is not None and not isinstance(resident, bool):
        raise InputError(f"resident must be True, False or None (automatic), got {resident!r}")
    if resident is False or (resident is None and device.type != "cuda"):
        return False
    need = resident_bytes(prob)
    if resident is True:
        if need is None:
            raise InputError("resident=True needs fp32, fp16 or bf16 ingredients (the device kernels' dtypes)",
                             path=path)
        return True
    if need is None:
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return need <= free // 2


def _mixed_params(prob: _Problem, coeffs: torch.Tensor, backend: Backend,
                  resident: _Resident | None = None) -> dict[str, torch.Tensor]:
    """Every mixed tensor, formed one at a time ([G, K] coefficients): from the mmap views by
    the host kernel, or from the device copies by the device kernels when `resident` is given."""
    out = {}

    def place(name: str, w: torch.Tensor) -> None:  # each fp32 tensor goes as soon as it is converted
        out[name] = w.to(device=prob.targets[name].device, dtype=prob.targets[name].dtype)

    if resident is None:
        for name in prob.names:
            place(name, _MixFromMmap.apply(coeffs[prob.group_of[name]], prob.plans[name], backend))
        return out
    rows = [tuple(r) for r in coeffs.detach().to(torch.float64).tolist()]
    groups: dict[int, list[str]] = {}
    for name in prob.names:
        groups.setdefault(prob.group_of[name], []).append(name)
    for g, names in groups.items():  # one multi-tensor call per coefficient vector: one in all for by_model
        for name, w in zip(names, _MixResident.apply(coeffs[g], [resident.xs[n] for n in names], rows[g],
                                                     resident.kernels)):
            place(name, w)
    return out


def _split(batch: Any) -> tuple[Any, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise InputError("each held-out batch must be an (inputs, targets) pair")
    return batch[0], batch[1]


def _forward(model: nn.Module, params: dict[str, torch.Tensor], inputs: Any, device: torch.device) -> torch.Tensor:
    from torch.func import functional_call

    args = tuple(t.to(device) for t in inputs) if isinstance(inputs, (tuple, list)) else (inputs.to(device),)
    out: torch.Tensor = functional_call(model, params, args)
    return out


@torch.no_grad()
def _heldout(model: nn.Module, params: dict[str, torch.Tensor], data: Iterable[Any], device: torch.device,
             loss_fn: LossFn, group: Group | None = None) -> tuple[float, float]:
    """(mean loss, top-1 accuracy) of the soup `params` over `data`, fp64 sums over samples.
    Under a process group rank r scores batches r, r + W, ...; the per-batch sums are gathered
    and added in batch order: the floats one process computes. The per-batch sums stay on the
    model's device until the pass ends (one host synchronization per pass)."""
    from soupkern.distributed import in_order, shard

    batches = []
    for i, batch in shard(data, group):
        inputs, targets = _split(batch)
        out = _forward(model, params, inputs, device)
        targets = targets.to(out.device)
        loss = loss_fn(out.float(), targets).detach().reshape(()).to(out.device, torch.float64)  # a [1] loss too
        batches.append((i, torch.stack([loss * len(targets), (out.argmax(-1) == targets).sum().to(torch.float64)]),
                        len(targets)))
    values = torch.stack([v for _, v, _ in batches]).tolist() if batches else []
    sums = [(i, v[0], v[1], n) for (i, _, n), v in zip(batches, values)]
    total_loss = correct = 0.0
    n = 0
    for _, batch_loss, batch_correct, count in in_order(sums, group):
        total_loss += batch_loss
        correct += batch_correct
        n += count
    if n == 0:
        raise InputError("the held-out data is empty (pass a list of batches or a DataLoader, not a one-shot iterator)")
    return total_loss / n, correct / n


def learned_soup(ingredients: Sequence[Any], out: PathLike | None = None, *legacy: Any, model: nn.Module | None = None,
                 data: Iterable[Any] | None = None, **options: Any) -> LearnedSoupResult:
    """learned_soup(ingredients, out=None, *, model, data, **options): the same call form as
    `greedy_soup` (ingredients: any source; output options as `weighted_soup`); see
    `_learned_soup` for the options and the recipe. The form learned_soup(ingredients, model,
    data, out=None, ...) still works for this release, with a DeprecationWarning."""
    if legacy or isinstance(out, nn.Module):
        if not isinstance(out, nn.Module) or not 1 <= len(legacy) <= 2 or model is not None or data is not None:
            raise TypeError("learned_soup(ingredients, out=None, *, model, data, ...): pass model= and data= by keyword")
        warnings.warn("learned_soup(ingredients, model, data, out) is deprecated; call "
                      "learned_soup(ingredients, out, model=model, data=data)", DeprecationWarning, stacklevel=2)
        model, data, out = out, legacy[0], legacy[1] if len(legacy) == 2 else None
    if model is None or data is None:
        raise InputError("learned_soup needs the model (model=) and the held-out data (data=)")
    return _learned_soup(ingredients, model, data, out, **options)


@reserves_output
def _learned_soup(
    ingredients: Sequence[Any],
    model: nn.Module,
    data: Iterable[Any],
    out: PathLike | None = None,
    *,
    mode: LearnedMode = "by_model",
    lr: float = 0.05,
    epochs: int = 5,
    steps: int | None = None,
    weight_decay: float = 0.0,
    learn_temperature: bool = False,
    seed: int = 0,
    eval_data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    keys: KeyPolicy = "same",
    dtype: str | None = None,
    max_shard_size: int | None = None,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    backend: str | None = None,
    overwrite: bool = False,
    fsync: bool = False,
    progress: Callable[[int, float], None] | None = None,
    state_dict_key: str | None = None,
    copy_from: str | os.PathLike[str] | None = None,
    allow_config_mismatch: bool = False,
    int_policy: str = "auto",
    out_format: str = "safetensors",
    lora: str = "refuse",
    distributed: bool = False,
    resident: bool | None = None,
) -> LearnedSoupResult:
    """Learn softmax mixing coefficients on held-out `data`, then write the soup to `out` (if given).

    model: an `nn.Module` whose state-dict names match the ingredients' (its float tensors are the
      ones mixed and learned; it runs in eval mode through functional_call and is not modified).
    data: re-iterable held-out batches `(inputs, targets)` (a DataLoader or a list; a map-style
      dataset of samples through `soupkern.evaluate.held_out(dataset, batch_size)`); one epoch =
      one pass in the given order, one AdamW step per batch; `steps` instead fixes the number of
      steps (cycling through the data). `eval_data` (default: `data`) gives the reported held-out
      loss/accuracy of the uniform and the learned soup.
    loss_fn: (outputs, targets) -> mean loss; default cross-entropy.
    Output options (`dtype`, `keys`, `max_shard_size`, `budget_bytes`, `backend`, `overwrite`, `fsync`) as
    `weighted_soup`. `progress(step, loss)` is called after every step. Seeded by `seed` (the
    global torch RNG is restored afterwards).
    distributed: inside an initialized process group of W ranks (torchrun), every step's batch is
      split by rows over the ranks (rank r takes rows [rB/W, (r+1)B/W)); each rank's loss is
      scaled by its share of the rows and the coefficient gradients are all-reduced (summed), so
      every rank takes the single-process step up to the order of the gradient sums (`loss_fn`
      must be a mean over samples); held-out scores are split by batches and gathered in batch
      order. Rank 0 alone holds the output lock and writes the soup.
    resident: train from copies of the ingredients' mixed tensors on the model's device (made
      once; mixing by the device kernels and the coefficient gradients reduced there, the
      coefficients kept there: two host synchronizations per step, to read them and the loss) instead of
      forming every tensor from the mapped files on the host each step. None (default): when the
      model is on a CUDA device and the copies take at most half of its free memory. Same
      forward values either way where the device kernels are the fused ones (cuda, triton), the
      gradients up to the order of the fp64 dot products.
    """
    if mode not in ("by_model", "by_layer"):
        raise InputError(f"mode must be 'by_model' or 'by_layer', got {mode!r}")
    ingredients = ingredient_list(ingredients)
    if not (math.isfinite(lr) and lr > 0) or epochs < 0 or (steps is not None and steps < 0) or weight_decay < 0:
        raise InputError(f"bad optimizer settings: lr={lr}, epochs={epochs}, steps={steps}, weight_decay={weight_decay}")
    check_budget(budget_bytes)
    if out is not None:  # fail before training, not after it
        check_soup_output(ingredients, out, dtype=dtype, keys=keys, max_shard_size=max_shard_size, overwrite=overwrite,
                          budget_bytes=budget_bytes, backend=backend, fsync=fsync, state_dict_key=state_dict_key,
                          copy_from=copy_from, allow_config_mismatch=allow_config_mismatch, int_policy=int_policy,
                          out_format=out_format, lora=lora)
    loss_fn = loss_fn or F.cross_entropy
    eval_data = data if eval_data is None else eval_data
    kernel = get_backend(backend)
    t0 = time.perf_counter()
    k = len(ingredients)
    was_training = model.training
    model.eval()
    device = next((t.device for t in model.state_dict().values()), torch.device("cpu"))
    history: list[float] = []
    from soupkern.distributed import group_for

    group = group_for(distributed)
    try:
        with ExitStack() as stack, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            checkpoints = open_ingredients(stack, ingredients, state_dict_key)
            plan = build_plan(checkpoints, [1.0 / k] * k, dtype="fp32", keys=keys, int_policy=int_policy, lora=lora)
            prob = _problem(model, plan, mode, checkpoints[0].path)
            on_device = None
            use = _use_resident(resident, prob, device, checkpoints[0].path)
            if group is not None:  # every rank decides alike (free memory differs per GPU): all or none
                flag = torch.tensor([int(use)])
                group.dist.all_reduce(flag, op=group.dist.ReduceOp.MIN)
                use = bool(flag.item())
            if use:
                on_device = _Resident(prob, device, device_kernels(device, backend if backend in _DEVICE_NAMES else None))
            where = device if on_device is not None else torch.device("cpu")
            logits = torch.zeros(len(prob.groups), k, dtype=torch.float32, device=where, requires_grad=True)
            beta = torch.ones((), dtype=torch.float32, device=where, requires_grad=learn_temperature)
            opt = torch.optim.AdamW([logits, beta] if learn_temperature else [logits], lr=lr, weight_decay=weight_decay)

            def mixed(coeffs: torch.Tensor) -> dict[str, torch.Tensor]:
                return _mixed_params(prob, coeffs, kernel, on_device)

            with torch.no_grad():
                uniform = _heldout(model, mixed(torch.softmax(logits, -1)), eval_data, device, loss_fn, group)

            def train_step(batch: Any) -> None:
                inputs, targets = _split(batch)
                opt.zero_grad(set_to_none=True)
                if group is None:
                    params = mixed(torch.softmax(logits, -1))
                    outputs = _forward(model, params, inputs, device)
                    loss = loss_fn(outputs.float() * beta.to(outputs.device), targets.to(outputs.device))
                    loss.backward()
                    value = float(loss.detach())
                else:
                    value = _distributed_step(group, mixed, logits, beta, model, inputs, targets, device, loss_fn)
                opt.step()
                history.append(value)
                if progress is not None:
                    progress(len(history), history[-1])

            epoch = 0
            while (len(history) < steps) if steps is not None else (epoch < epochs):
                done = len(history)
                for batch in data:
                    if steps is not None and len(history) >= steps:
                        break
                    train_step(batch)
                if len(history) == done:
                    raise InputError("the held-out data is empty (pass a list of batches or a DataLoader, "
                                     "not a one-shot iterator)")
                epoch += 1
            final = torch.softmax(logits.detach().to(torch.float64), -1)
            with torch.no_grad():
                learned = _heldout(model, mixed(final.to(torch.float32)), eval_data, device, loss_fn, group)
    finally:
        model.train(was_training)
    coeffs = tuple(tuple(float(c) for c in row) for row in final.tolist())
    settings = {"lr": lr, "epochs": epochs, "steps": steps, "weight_decay": weight_decay, "seed": seed,
                "learn_temperature": learn_temperature}
    result = LearnedSoupResult(mode, tuple(labels(ingredients)), prob.groups, coeffs, tuple(history),
                               uniform[0], uniform[1], learned[0], learned[1],
                               float(beta.detach()) if learn_temperature else None, len(history),
                               time.perf_counter() - t0, None, settings)
    if out is None:
        return result
    meta = {
        "soupkern.learned.mode": mode,
        "soupkern.learned.coefficients": strict_json.dumps(result.to_dict()["coefficients"]),
        "soupkern.learned.steps": str(result.steps),
        "soupkern.learned.final_loss": repr(result.learned_loss),
        "soupkern.learned.uniform_loss": repr(result.uniform_loss),
        "soupkern.learned.settings": strict_json.dumps(settings),
    }
    opts: dict[str, Any] = {"dtype": dtype, "keys": keys, "max_shard_size": max_shard_size,
                            "budget_bytes": budget_bytes, "backend": backend, "overwrite": overwrite,
                            "fsync": fsync, "state_dict_key": state_dict_key, "copy_from": copy_from,
                            "allow_config_mismatch": allow_config_mismatch, "int_policy": int_policy,
                            "out_format": out_format, "lora": lora}

    def write() -> SoupReport:
        if mode == "by_model":
            return weighted_soup(ingredients, coeffs[0], out, recipe="learned", metadata=meta, **opts)
        return per_tensor_soup(ingredients, result.coefficient_map(), out, recipe="learned", metadata=meta, **opts)

    if group is None:
        report = write()
    else:  # every rank learned the same coefficients; rank 0 writes, and its outcome is every rank's
        report = group.on_rank_0(write, "writing the learned soup", long=True)
    return dataclasses.replace(result, report=report, seconds=time.perf_counter() - t0)


def _rows(x: Any, lo: int, hi: int) -> Any:
    return tuple(t[lo:hi] for t in x) if isinstance(x, (tuple, list)) else x[lo:hi]


def _distributed_step(group: Group, mixed: Callable[[torch.Tensor], dict[str, torch.Tensor]], logits: torch.Tensor,
                      beta: torch.Tensor, model: nn.Module, inputs: Any, targets: torch.Tensor, device: torch.device,
                      loss_fn: LossFn) -> float:
    """This rank's rows of the batch: loss scaled by their share, backward, then the gradients
    and the loss summed over the ranks (each rank ends with the whole batch's)."""
    rows = len(targets)
    lo, hi = rows * group.rank // group.world_size, rows * (group.rank + 1) // group.world_size
    params = mixed(torch.softmax(logits, -1))
    if hi > lo:
        outputs = _forward(model, params, _rows(inputs, lo, hi), device)
        loss = loss_fn(outputs.float() * beta.to(outputs.device), targets[lo:hi].to(outputs.device)) * ((hi - lo) / rows)
        loss.backward()
        value = loss.detach().to(logits.device, torch.float32).reshape(1)
    else:  # fewer rows than ranks: this rank adds nothing, but joins the sums
        value = torch.zeros(1, device=logits.device)
    shared = [p for p in (logits, beta) if p.requires_grad]
    for p in shared:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in shared] + [value])
    group.dist.all_reduce(flat)
    offset = 0
    for p in shared:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return float(flat[-1])



def per_tensor_soup(
    ingredients: Sequence[PathLike],
    coefficients: Mapping[str, Sequence[float]],
    out: PathLike,
    *,
    default: Sequence[float] | None = None,
    recipe: str = "per_tensor",
    **options: Any,
) -> SoupReport:
    """Write out[t] = Σ_k coefficients[t][k] · ingredients[k][t] with one coefficient vector per tensor.

    Tensors not named in `coefficients` use `default` (uniform 1/K when None). This is
    `weighted_soup` with a mapping of coefficients: same arithmetic, checks, layout, atomic write
    and bounded memory; `soupkern.coefficients` in the metadata is the JSON object tensor name ->
    coefficients. `options` are those of `weighted_soup`.
    """
    return weighted_soup(ingredients, coefficients, out, default=default, recipe=recipe, **options)
