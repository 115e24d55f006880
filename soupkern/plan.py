"""Plan a soup before any byte is written: names, shapes and dtypes checked across ingredients,
coefficients validated, the output dtype of every tensor fixed; how each one is made (averaged or
copied, from which sources) is a `TensorPlan` the engine streams."""

from __future__ import annotations

import logging
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Mapping, Sequence

from soupkern.engine import run, tensor_items
from soupkern.errors import InputError, MismatchError
from soupkern.options import coefficient_vector
from soupkern.io import FLOAT_DTYPES, Checkpoint, OutputTensor, SafetensorsFile, TensorInfo, dtype_itemsize
from soupkern.io.buffers import equal

if TYPE_CHECKING:
    import numpy as np

KeyPolicy = Literal["same", "intersection"]
IntPolicy = Literal["auto", "first", "max", "mean", "refuse"]
INT_POLICIES = ("auto", "first", "max", "mean", "refuse")
# numpy dtypes (little-endian, as safetensors stores them) of the dtypes an integer policy
# combines (fp8 has no numpy dtype: always refused); numpy is imported only when one is combined
_NP_INT = {"BOOL": "?", "U8": "u1", "I8": "i1", "I16": "<i2", "U16": "<u2", "I32": "<i4", "U32": "<u4", "I64": "<i8",
           "U64": "<u8"}
_STRUCT_INT = {"BOOL": "<?", "U8": "<B", "I8": "<b", "I16": "<h", "U16": "<H", "I32": "<i", "U32": "<I", "I64": "<q",
               "U64": "<Q"}
DTYPE_ALIASES = {
    "fp32": "F32", "float32": "F32", "f32": "F32",
    "fp16": "F16", "float16": "F16", "half": "F16", "f16": "F16",
    "bf16": "BF16", "bfloat16": "BF16",
    "fp64": "F64", "float64": "F64", "f64": "F64",
}
_COMPARE_BLOCK = 16 << 20
log = logging.getLogger("soupkern")


class ArrayHolder:
    """Bytes computed at plan time (an integer policy's result) behind the byte-view interface
    the engine reads, like a mapped file's tensor."""

    __slots__ = ("path", "_bytes")

    def __init__(self, data: bytes | np.ndarray, path: str):
        self.path = path
        self._bytes = bytearray(data if isinstance(data, (bytes, bytearray)) else data.tobytes())  # type: ignore[union-attr]

    def view(self, info: TensorInfo, start: int = 0, stop: int | None = None) -> memoryview:
        return memoryview(self._bytes)[start:info.nbytes if stop is None else stop]

    def address(self, info: TensorInfo) -> int:
        import ctypes

        return ctypes.addressof((ctypes.c_char * len(self._bytes)).from_buffer(self._bytes))

    def prefetch(self, begin: int, end: int) -> None:
        pass

    def release(self, begin: int, end: int) -> None:
        pass


def normalize_dtype(dtype: object) -> str | None:
    """'bf16', 'bfloat16', 'BF16', torch.bfloat16, ... -> the safetensors name; None stays None."""
    if dtype is None:
        return None
    if not isinstance(dtype, str):
        if type(dtype).__module__ == "torch" and type(dtype).__name__ == "dtype":
            dtype = str(dtype).removeprefix("torch.")
        else:
            raise InputError(f"output dtype must be a string such as 'bf16' or a torch dtype, got {dtype!r}")
    name = DTYPE_ALIASES.get(dtype.lower().removeprefix("torch."), dtype.upper())
    if name not in FLOAT_DTYPES:
        raise InputError(f"output dtype must be one of fp32, fp16, bf16, fp64; got '{dtype}'")
    return name


@dataclass(frozen=True)
class TensorPlan:
    """How one output tensor is made: averaged from every source, or copied from the first."""

    out: OutputTensor
    sources: tuple[tuple[SafetensorsFile, TensorInfo], ...]
    average: bool

    @property
    def numel(self) -> int:
        return math.prod(self.out.shape)

    @property
    def inputs(self) -> tuple[tuple[SafetensorsFile, TensorInfo], ...]:
        """The sources read: every one when averaged, the first when copied."""
        return self.sources if self.average else self.sources[:1]


@dataclass(frozen=True)
class SoupPlan:
    """Tensors to make and their coefficients: `per_tensor[name]` where given, else `coefficients`
    and `divisor` (out = round((sum_k c_k x_k) / divisor); the uniform soup: c_k = 1, divisor K)."""

    tensors: tuple[TensorPlan, ...]
    coefficients: tuple[float, ...]
    per_tensor: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    divisor: float = 1.0

    def coefficients_for(self, name: str) -> tuple[float, ...]:
        return self.per_tensor.get(name, self.coefficients)

    def divisor_for(self, name: str) -> float:
        return 1.0 if name in self.per_tensor else self.divisor

    @property
    def effective_coefficients(self) -> tuple[float, ...]:
        """The global coefficients with the divisor folded in (c_k / divisor), for reports."""
        return tuple(c / self.divisor for c in self.coefficients)

    def with_per_tensor(self, coefficients: Mapping[str, Sequence[float]]) -> SoupPlan:
        """This plan with per-tensor coefficient vectors (validated; names must be soup tensors)."""
        names = {tp.out.name for tp in self.tensors}
        unknown = sorted(set(coefficients) - names)
        if unknown:
            raise InputError("coefficients given for a tensor the soup does not have", tensor=unknown[0])
        k = len(self.coefficients)
        per = {}
        for name, values in coefficients.items():
            try:
                per[name] = check_coefficients(values, k)
            except InputError as e:
                raise InputError(str(e), tensor=name) from None
        return SoupPlan(self.tensors, self.coefficients, per, self.divisor)

    def coefficients_json(self) -> object:
        """What `soupkern.coefficients` records: one list, or tensor name -> list when per tensor."""
        if not self.per_tensor:
            return list(self.coefficients)
        return {tp.out.name: list(self.coefficients_for(tp.out.name)) for tp in sorted(self.tensors, key=lambda t: t.out.name)}

    @property
    def bytes_read(self) -> int:
        return sum(info.nbytes for t in self.tensors for _, info in t.inputs)

    @property
    def bytes_written(self) -> int:
        return sum(t.out.nbytes for t in self.tensors)


def check_coefficients(coefficients: Sequence[float], k: int) -> tuple[float, ...]:
    return coefficient_vector(coefficients, k)


def _identical(a: tuple[SafetensorsFile, TensorInfo], b: tuple[SafetensorsFile, TensorInfo]) -> bool:
    """Whether two tensors of the same shape hold the same bytes, compared block by block through
    the engine up to the first block that differs."""
    info = a[1]
    pair = TensorPlan(OutputTensor(info.name, info.dtype, info.shape), (a, b), average=False)
    step = max(_COMPARE_BLOCK // dtype_itemsize(info.dtype), 1)
    return run(tensor_items(pair, step, sources=(a, b)), lambda item, views: equal(views[0], views[1]))


def build_plan(
    checkpoints: Sequence[Checkpoint],
    coefficients: Sequence[float],
    *,
    dtype: str | None = None,
    keys: KeyPolicy = "same",
    divisor: float = 1.0,
    int_policy: str = "auto",
    lora: str = "refuse",
) -> SoupPlan:
    """Check every ingredient against the first and decide every output tensor.

    Float tensors (F64/F32/F16/BF16, any mix) are averaged; the output dtype is `dtype` when
    given, else the first ingredient's (with a notice when they differ). Other dtypes (integers,
    bool, fp8) are copied when byte-identical in every ingredient, else combined under
    `int_policy` (see `_combine`) or refused. PEFT LoRA factors are refused unless
    `lora="factorwise"` (see `_check_lora`). With keys="same" every
    ingredient must hold the same tensor names; with "intersection" only shared names are kept.
    """
    if not checkpoints:
        raise InputError("a soup needs at least one ingredient")
    if not isinstance(keys, str) or keys not in ("same", "intersection"):
        raise InputError(f"keys must be 'same' or 'intersection', got {keys!r}")
    coeffs = check_coefficients(coefficients, len(checkpoints))
    out_dtype = normalize_dtype(dtype)
    _fill_tied(checkpoints)
    first = checkpoints[0]
    names = set(first.tensors)
    for ck in checkpoints[1:]:
        other = set(ck.tensors)
        if keys == "same" and other != names:
            missing, extra = sorted(names - other), sorted(other - names)
            what = []
            if missing:
                what.append(f"lacks {len(missing)} tensor(s) of {first.path}, e.g. '{missing[0]}'")
            if extra:
                what.append(f"has {len(extra)} tensor(s) not in {first.path}, e.g. '{extra[0]}'")
            raise MismatchError(" and ".join(what) + " (use keys='intersection' / --intersection to soup the shared ones)", path=ck.path, tensor=(missing or extra)[0])
        names &= other
    if not names:
        raise MismatchError("the ingredients share no tensor names", path=first.path)
    dropped = sorted(set().union(*(ck.tensors for ck in checkpoints)) - names)
    if dropped:
        log.warning("--intersection / keys='intersection': %d tensor(s) not in every ingredient are left out of the "
                    "soup, e.g. '%s'", len(dropped), dropped[0])
    if int_policy not in INT_POLICIES:
        raise InputError(f"int_policy must be one of {', '.join(INT_POLICIES)}, got {int_policy!r}")

    if len(checkpoints) > 1:
        def differs(name: str) -> bool:
            sources = [ck.tensors[name] for ck in checkpoints]
            return any(s[1].shape != sources[0][1].shape or not _identical(sources[0], s) for s in sources[1:])

        _check_lora(sorted(names), checkpoints[0].path, lora, differs)

    mixed: list[str] = []
    plans = []
    for name in sorted(names):
        sources = tuple(ck.tensors[name] for ck in checkpoints)
        f0, i0 = sources[0]
        is_float = i0.dtype in FLOAT_DTYPES
        same_dtype = True
        for (f, info) in sources[1:]:
            if info.shape != i0.shape:
                raise MismatchError(f"shape {list(info.shape)} differs from {list(i0.shape)} in {f0.path}", path=f.path, tensor=name)
            if info.dtype != i0.dtype:
                same_dtype = False
                if (info.dtype in FLOAT_DTYPES) != is_float or not is_float:
                    raise MismatchError(f"dtype {info.dtype} cannot be souped with {i0.dtype} from {f0.path}",
                                        path=f.path, tensor=name)
        if is_float:
            out = OutputTensor(name, out_dtype or i0.dtype, i0.shape)
            if out_dtype is None and not same_dtype:
                mixed.append(name)
        else:
            differs = next((src for src in sources[1:] if not _identical(sources[0], src)), None)
            if differs is not None:
                sources = _combine(name, sources, differs, int_policy)
            out = OutputTensor(name, i0.dtype, i0.shape)
        plans.append(TensorPlan(out, sources, is_float))
    if mixed:
        dts = sorted({info.dtype for ck in checkpoints for _, info in (ck.tensors[mixed[0]],)})
        log.warning("the ingredients' float dtypes differ (%s; e.g. '%s'): the soup takes the first ingredient's "
                    "dtypes; set --dtype / dtype= to choose", ", ".join(dts), mixed[0])
    return SoupPlan(tuple(plans), coeffs, {}, float(divisor))


TIED_HEAD = "lm_head.weight"
TIED_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                           "shared.weight")


def _fill_tied(checkpoints: Sequence[Checkpoint]) -> None:
    """Tied input embedding and LM head: `save_pretrained` stores the embedding only,
    `safetensors.torch.save_model` the head only. Where an ingredient holds one of the pair and
    another ingredient names the other, the missing name reads the same bytes, so the two forms
    soup together (with a notice) and nothing is dropped."""
    names = set().union(*(ck.tensors for ck in checkpoints))
    if TIED_HEAD not in names:
        return
    untied = next((ck for ck in checkpoints if _config_ties(ck.path) is False), None)
    if untied is not None:  # the model's own config: a missing head is missing, not tied
        log.info("%s: its config.json says tie_word_embeddings = false: '%s' is not read from the embedding",
                 untied.path, TIED_HEAD)
        return
    embeddings = [n for n in names if n.endswith(TIED_EMBEDDING_SUFFIXES)
                  and any(n == sfx or n.endswith("." + sfx) for sfx in TIED_EMBEDDING_SUFFIXES)]
    if len(embeddings) != 1:
        return
    pair = (TIED_HEAD, embeddings[0])
    for ck in checkpoints:  # an ingredient holding both, different: the model is not tied
        if all(n in ck.tensors for n in pair):
            (fa, ia), (fb, ib) = ck.tensors[pair[0]], ck.tensors[pair[1]]
            if ia.shape != ib.shape or ia.dtype != ib.dtype or not _identical((fa, ia), (fb, ib)):
                return
    if len({ck.tensors[n][1].shape for ck in checkpoints for n in pair if n in ck.tensors}) != 1:
        return
    for ck in checkpoints:
        have = [n for n in pair if n in ck.tensors]
        if len(have) == 1:
            src = have[0]
            dst = pair[1] if src == pair[0] else pair[0]
            ck.tensors[dst] = ck.tensors[src]
            log.warning("%s: holds '%s' but not '%s' (tied weights, saved once): '%s' reads the same values",
                        ck.path, src, dst, dst)


def _config_ties(path: str) -> bool | None:
    """`tie_word_embeddings` from the config.json beside a checkpoint (its folder, or the folder of
    its file or index; a multimodal config's `text_config`), None when it does not say."""
    from soupkern.model_folder import CONFIG_NAME, read_json

    p = Path(path)
    if not p.exists():  # an in-memory ingredient's label
        return None
    try:
        data = read_json((p if p.is_dir() else p.parent) / CONFIG_NAME, dict, "a JSON object")
    except InputError:  # a broken config says nothing here (a folder output refuses it, naming it)
        return None
    for c in (data, data.get("text_config") if isinstance(data, dict) else None):
        if isinstance(c, dict) and isinstance(c.get("tie_word_embeddings"), bool):
            return bool(c["tie_word_embeddings"])
    return None


# low-rank factors whose product is the update: PEFT (lora_A/B), kohya (lora_down/up), diffusers
# (lora.down/up), LyCORIS LoHa / LoKr (hada_w*, lokr_w*)
LORA_FACTOR = re.compile(r"(^|\.)(lora_(A|B|embedding_A|embedding_B|down|up)|lora\.(down|up)|hada_w[12]_[ab]|"
                         r"lokr_w[12](_[ab])?)(\.|$)")
LORA_POLICIES = ("refuse", "factorwise", "concat")


def _check_lora(names: Sequence[str], path: str, lora: str,
                differs: Callable[[str], bool] = lambda name: True) -> None:
    """Averaging low-rank factors one by one is not a soup of the adapters: the update of a
    LoRA layer is s·B·A, and mean(B)·mean(A) != mean(B·A) (on a real layer the relative
    difference was 0.81). Refused, where a factor `differs` between the ingredients (identical
    factors, as in adapters frozen into a model, average exactly), unless `lora="factorwise"`."""
    if lora not in LORA_POLICIES:
        raise InputError(f"lora must be one of {', '.join(LORA_POLICIES)}, got {lora!r}")
    if lora == "factorwise":
        return
    factor = next((n for n in names if LORA_FACTOR.search(n) and differs(n)), None)
    if factor is None:
        return
    if lora == "concat":
        raise InputError("--lora concat (lora='concat') makes the adapter soup itself: it writes a folder (-o DIR/) "
                         "from PEFT adapter folders, through uniform_soup / weighted_soup", path=path, tensor=factor)
    raise InputError(
        "these are PEFT LoRA adapters: averaging lora_A and lora_B factor by factor does not average the adapters' "
        "updates B·A (mean(B)·mean(A) differs from mean(B·A)), so the soup would be silently wrong. Exact "
        "alternatives: --lora concat (lora='concat'; PEFT adapter folders) concatenates them along the rank, "
        "which gives exactly the weighted sum of the updates; or merge each adapter into its base model (peft's "
        "merge_and_unload) and soup the merged models. --lora factorwise averages the factors anyway",
        path=path, tensor=factor)


def _combine(name: str, sources: tuple[tuple[SafetensorsFile, TensorInfo], ...],
             differs: tuple[SafetensorsFile, TensorInfo], int_policy: str) -> tuple[tuple[object, TensorInfo], ...]:
    """A non-float tensor that differs between ingredients, under `int_policy`: "auto" takes the
    maximum of 0-dim integer tensors (counters such as BatchNorm's num_batches_tracked) and
    refuses the rest (ids, position indices); "first", "max" (logical or for bool) and "mean"
    (rounded to nearest, ties to even) combine any integer or bool tensor."""
    f0, i0 = sources[0]
    policy = int_policy if int_policy != "auto" else ("max" if not i0.shape and i0.dtype in _NP_INT else "refuse")
    if policy == "refuse" or i0.dtype not in _NP_INT:
        raise MismatchError(f"{i0.dtype} tensors are not averaged, and this one differs from {f0.path} "
                            "(--int-policy first|max|mean / int_policy= combines integer tensors)",
                            path=differs[0].path, tensor=name)
    raws = []
    for f, info in sources:
        raws.append(bytes(f.view(info)))
        f.release(info.begin, info.end)
    result = raws[0] if policy == "first" else _combine_values(raws, i0.dtype, policy)
    count = len(raws[0]) // dtype_itemsize(i0.dtype)
    shown = (f"{[_scalar(r, i0.dtype) for r in raws]} -> {_scalar(result, i0.dtype)}" if count == 1
             else f"{count} elements")
    log.warning("'%s' (%s) differs between the ingredients: the soup takes the %s (%s)", name, i0.dtype,
                policy, shown)
    return ((ArrayHolder(result, f"<{policy} of {len(sources)} ingredients>"), i0),)


def _scalar(raw: bytes, dtype: str) -> int | bool:
    return struct.unpack(_STRUCT_INT[dtype], raw)[0]  # type: ignore[no-any-return]


def _combine_values(raws: list[bytes], dtype: str, policy: str) -> bytes:
    """The elementwise "max" (logical or for bool) or "mean" (exact, rounded to nearest, ties to
    even) of integer tensors' little-endian bytes. One element (0-dim counters, the usual case):
    Python integers, no numpy; more: numpy, with exact Python-integer sums for 64-bit values,
    whose sums and means fp64 does not hold exactly."""
    from fractions import Fraction

    k = len(raws)
    if len(raws[0]) == dtype_itemsize(dtype):
        values = [int(_scalar(r, dtype)) for r in raws]
        value = max(values) if policy == "max" else round(Fraction(sum(values), k))
        return struct.pack(_STRUCT_INT[dtype], bool(value) if dtype == "BOOL" else value)
    import numpy as np

    arrays = [np.frombuffer(r, dtype=_NP_INT[dtype]) for r in raws]
    if policy == "max":
        return bytes(np.maximum.reduce(arrays).tobytes())
    if dtype in ("I64", "U64"):
        sums = np.stack(arrays).astype(object).sum(axis=0)
        means = np.array([round(Fraction(int(s), k)) for s in sums], dtype=_NP_INT[dtype])
        return bytes(means.tobytes())
    # the sum of K values below 2^32 is exact in fp64 and its quotient by K lies at least 1/(2K)
    # from a half-integer unless it is one, far more than fp64's error: rint gives the exact rounding
    mean = np.rint(np.stack(arrays).astype(np.float64).sum(axis=0) / k)
    return bytes(mean.astype(bool if dtype == "BOOL" else _NP_INT[dtype]).tobytes())
