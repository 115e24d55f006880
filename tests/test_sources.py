"""Every ingredient source (soupkern/io/sources.py, open_checkpoint) against the library that wrote
it, the in-memory recipes (`uniform_state_dict` / `weighted_state_dict`, `out=`), the
multi-tensor path (engine.fill_many, `_native.weighted_sum_many`) and file soups from mixed
sources.

Tolerances: none anywhere. Every comparison is of bits (integer views of the tensors, so -0 / +0
and NaN payloads count) because every expected value here is exact:
  - a single-ingredient uniform soup is acc = 1 * x (exact in fp64), no division (divisor 1),
    one rounding of a value already representable in the output dtype: the ingredient itself;
  - a uniform soup is the fp64 sum in input order (each fp32/fp16/bf16 input is exact in fp64,
    each addition rounds once exactly as torch / numpy fp64 adds do), one IEEE division by K and
    one rounding (soupkern.reference.contract_weighted_sum computes exactly this in numpy;
    round_f64 / reference.encode round fp64 -> bf16/fp16 once, unlike torch's `.to`);
  - weighted soups use coefficients that are fp32 numbers: their products with fp32/fp16/bf16
    inputs have at most 48 significant bits, so they are exact in fp64 and the kernel's fma
    equals the reference's multiply-then-add bit for bit;
  - integer / bool tensors are copied.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import soupkern
from soupkern import _native
from soupkern.backends import get_backend
from soupkern.backends.torch_backend import fp64_weighted_sum, round_f64
from soupkern.engine import fill_many
from soupkern.io import open_checkpoint
from soupkern.plan import build_plan
from soupkern.reference import contract_weighted_sum

dcp = pytest.importorskip("torch.distributed.checkpoint")

NAME = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
CODE = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ---------------------------------------------------------------------------------------------
# helpers


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers of its width (contiguous copy when needed)."""
    t = t.detach().contiguous()
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t.view(INT_OF_SIZE[t.element_size()])


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str = "", *, nan_bits: bool = True) -> None:
    """Bit equality. nan_bits=False: NaN where `want` is NaN (any NaN bits), bit equality
    elsewhere; only for references built from torch's fp32 -> bf16 conversion, which writes
    every NaN as 0xFFFF whatever its sign (see test_torch_backend_keeps_nan_sign)."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not nan_bits and got.is_floating_point():
        nan = torch.isnan(want.detach())
        assert torch.equal(torch.isnan(got.detach()), nan), f"{what}: NaN positions differ"
        got, want = got.detach()[~nan], want.detach()[~nan]
    assert torch.equal(bits(got), bits(want)), f"{what}: bits differ"


def assert_same_sd(got: dict, want: dict, what: str = "", *, nan_bits: bool = True) -> None:
    assert sorted(got) == sorted(want), f"{what}: names {sorted(got)} != {sorted(want)}"
    for name in want:
        assert_same(got[name], want[name], f"{what} {name}", nan_bits=nan_bits)


def raw(t: torch.Tensor) -> np.ndarray:
    return bits(t).reshape(-1).view(torch.uint8).numpy()


def contract(xs: list[torch.Tensor], weights: list[float], divisor: float, out_dtype: torch.dtype) -> torch.Tensor:
    """soupkern.reference.contract_weighted_sum (numpy, independent of the kernels) as a tensor."""
    out = contract_weighted_sum([raw(x) for x in xs], [NAME[x.dtype] for x in xs], weights, NAME[out_dtype], divisor)
    return torch.from_numpy(out.copy()).view(out_dtype).reshape(xs[0].shape)


def uniform_ref(xs: list[torch.Tensor], out_dtype: torch.dtype | None = None) -> torch.Tensor:
    return contract(xs, [1.0] * len(xs), float(len(xs)), out_dtype or xs[0].dtype)


def ingredient(gen: torch.Generator, base: dict[str, torch.Tensor], scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A fine-tune of `base`: float tensors perturbed, others kept (dtypes and shapes kept)."""
    out = {}
    for name, t in base.items():
        if t.is_floating_point():
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float64) * scale
            out[name] = (t.double() * (1 + noise)).to(t.dtype)
        else:
            out[name] = t.clone()
    return out


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """Finite and non-finite values a checkpoint may hold, representable in `dtype`."""
    fi = torch.finfo(dtype)
    vals = [0.0, -0.0, 1.0, -2.5, fi.max, -fi.max, fi.tiny, fi.tiny * 2 ** -3, -fi.tiny * 2 ** -3,
            float("inf"), float("-inf"), float("nan"), 1e-3, 12345.678]
    return torch.tensor(vals, dtype=torch.float64).to(dtype)


def sample_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "enc.weight": torch.randn(16, 8, generator=g),
        "enc.bias": torch.randn(16, generator=g).to(torch.bfloat16),
        "dec.weight": torch.randn(3, 5, 2, generator=g).to(torch.float16),
        "dec.scale64": torch.randn(6, generator=g, dtype=torch.float64),
        "temperature": torch.tensor(0.125),
        "special32": special_values(torch.float32),
        "special16": special_values(torch.float16),
        "specialbf16": special_values(torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(7),
        "ids": torch.arange(10, dtype=torch.int32),
        "mask": torch.tensor([True, False, True]),
    }


def quiet_dcp_save(state: dict, folder: Path) -> Path:
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=os.fspath(folder))
    return folder


class Evil:
    """A pickle payload that would run a shell command if unpickled by a plain pickle load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------------------------------
# each source vs the library that wrote it: a single-ingredient uniform soup returns it exactly


def _write_source(kind: str, sd: dict[str, torch.Tensor], tmp: Path) -> object:
    if kind == "safetensors":
        p = tmp / "m.safetensors"
        save_file(sd, os.fspath(p))
        return p
    if kind == "pt_zip":
        p = tmp / "m.pt"
        torch.save(sd, p)
        return p
    if kind == "pt_legacy":
        p = tmp / "m.pth"
        torch.save(sd, p, _use_new_zipfile_serialization=False)
        return p
    if kind == "pth_tar_timm":
        p = tmp / "m.pth.tar"
        torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1, model="vit"), "epoch": 3}, p)
        return p
    if kind == "bin_folder":
        (tmp / "hf").mkdir()
        torch.save(sd, tmp / "hf" / "pytorch_model.bin")
        return tmp / "hf"
    if kind == "bin_index":
        folder = tmp / "hfsharded"
        folder.mkdir()
        names = sorted(sd)
        shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                  "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
        weight_map = {}
        for shard, keys in shards.items():
            torch.save({k: sd[k] for k in keys}, folder / shard)
            weight_map.update({k: shard for k in keys})
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return folder
    if kind == "dcp_flat":
        return quiet_dcp_save({**sd, "step": 12, "blob": b"not a tensor"}, tmp / "dcp")
    if kind == "dcp_nested":
        opt = {"state": {"0": {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}
        return quiet_dcp_save({"model": sd, "optimizer": opt, "step": 3, "rng": b"\x00\x01"}, tmp / "dcpn")
    if kind == "state_dict":
        return dict(sd)
    raise AssertionError(kind)


SOURCE_KINDS = ["safetensors", "pt_zip", "pt_legacy", "pth_tar_timm", "bin_folder", "bin_index",
                "dcp_flat", "dcp_nested", "state_dict"]


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_single_ingredient_is_returned_exactly(kind, tmp_path):
    sd = sample_state_dict()
    want = {k: v.clone() for k, v in sd.items()}
    src = _write_source(kind, sd, tmp_path)
    got = soupkern.uniform_state_dict([src])
    assert_same_sd(got, want, kind)
    if kind == "state_dict":  # new tensors: writing the soup never writes the ingredient
        assert not {t.data_ptr() for t in got.values()} & {t.data_ptr() for t in sd.values()}
    with open_checkpoint(src) as ck:
        assert sorted(ck.tensors) == sorted(want)
        for name, (_, info) in ck.tensors.items():
            assert info.shape == tuple(want[name].shape)
    # the same through the streaming file writer
    out = tmp_path / "soup.safetensors"
    soupkern.uniform_soup([src], out)
    assert_same_sd(load_file(os.fspath(out)), want, f"{kind} file")
    assert_same_sd(sd, want, f"{kind} ingredient untouched")


def test_module_single_ingredient_is_returned_exactly():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4))
    want = {k: v.detach().clone() for k, v in m.state_dict().items()}
    assert any(v.requires_grad for v in m.parameters())
    got = soupkern.uniform_state_dict([m])
    assert_same_sd(got, want, "module")
    assert not any(t.requires_grad for t in got.values())


@pytest.mark.parametrize("form", ["zip", "legacy", "unaligned-zip"])
def test_pickles_are_served_from_the_file_mapping(tmp_path, caplog, form):
    """Both torch.save formats, and a zip whose records are not aligned (as torch before 2.1 and
    re-packing tools write them): every contiguous tensor is a byte range of the file behind
    soupkern's guarded mapping (nothing read into memory up front, no notice); a non-contiguous
    one (a transposed view, saved with its whole storage) and tied tensors come out right."""
    from soupkern.io.reader import MappedFile

    sd = sample_state_dict(1)
    sd["transposed"] = torch.randn(5, 3, generator=torch.Generator().manual_seed(3)).t()
    sd["tied"] = sd[next(iter(sd))]
    p = tmp_path / "ck.pt"
    torch.save(sd, p, _use_new_zipfile_serialization=form != "legacy")
    if form == "unaligned-zip":
        aligned = tmp_path / "aligned.pt"
        p.rename(aligned)
        with zipfile.ZipFile(aligned) as src, zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as dst:
            for info in src.infolist():
                dst.writestr(info.filename, src.read(info.filename))
    ck = open_checkpoint(p)
    try:
        mapped = {n for n, (h, _) in ck.tensors.items() if isinstance(h, MappedFile)}
        assert mapped == set(sd) - {"transposed"}
        assert ck.tensors["tied"][1].begin == ck.tensors[next(iter(sd))][1].begin
        if form != "zip":  # the kernels and the evaluators read misaligned tensors too
            assert any(info.begin % 4 for n, (_, info) in ck.tensors.items() if n in mapped)
    finally:
        ck.close()
    with caplog.at_level(logging.WARNING, logger="soupkern"):
        got = soupkern.uniform_state_dict([p, p])
    assert not [r for r in caplog.records if "reading it whole" in r.getMessage()]
    assert_same_sd(got, {k: v.contiguous() for k, v in sd.items()})


def test_zip_with_compressed_records_is_read_whole_with_a_notice(tmp_path, caplog):
    """A zip re-packed with deflate (torch.load(mmap=True) returns wrong values for it, silently)
    is read whole by torch.load, with a notice naming the file."""
    sd = sample_state_dict(2)
    plain, packed = tmp_path / "plain.pt", tmp_path / "packed.pt"
    torch.save(sd, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with caplog.at_level(logging.WARNING, logger="soupkern"):
        got = soupkern.uniform_state_dict([packed, plain])
    warned = [r.getMessage() for r in caplog.records if "reading it whole" in r.getMessage()]
    assert len(warned) == 1 and str(packed) in warned[0] and "compressed" in warned[0]
    assert_same_sd(got, sd)


@pytest.mark.parametrize("suffix", [
    ".pt", ".pth", ".bin", ".pth.tar", ".ckpt", "",
    ".safetensors",
])
def test_any_suffix_is_read_by_content(tmp_path, suffix):
    sd = sample_state_dict(2)
    p = tmp_path / f"weights{suffix}"
    torch.save(sd, p)  # under a safetensors name or none, a pickle is still read as a pickle
    assert_same_sd(soupkern.uniform_state_dict([p]), sd)


# ---------------------------------------------------------------------------------------------
# containers


@pytest.mark.parametrize("key", ["state_dict", "model", "module", "model_state_dict"])
@pytest.mark.parametrize("where", ["pickle", "memory"])
def test_containers_are_unwrapped(tmp_path, key, where):
    sd = sample_state_dict(3)
    container = {key: sd, "epoch": 3, "args": argparse.Namespace(lr=0.5), "optimizer_name": "adamw"}
    if where == "pickle":
        src: object = tmp_path / "c.pth.tar"
        torch.save(container, src)
    else:
        src = container
    assert_same_sd(soupkern.uniform_state_dict([src]), sd, key)


def test_ema_entry_by_state_dict_key(tmp_path, caplog):
    sd = sample_state_dict(4)
    ema = {k: (v * 2 if v.is_floating_point() else v) for k, v in sd.items()}
    p = tmp_path / "timm.pth.tar"
    torch.save({"state_dict": sd, "state_dict_ema": ema, "args": argparse.Namespace(ema=True), "epoch": 9}, p)
    assert_same_sd(soupkern.uniform_state_dict([p], state_dict_key="state_dict_ema"), ema, "ema")
    with caplog.at_level(logging.WARNING, logger="soupkern"):
        assert_same_sd(soupkern.uniform_state_dict([p]), sd, "default")
    assert any("state_dict_ema" in r.getMessage() for r in caplog.records if r.name == "soupkern")
    with pytest.raises(soupkern.InputError, match="nope"):
        soupkern.uniform_state_dict([p], state_dict_key="nope")
    # in memory alike
    assert_same_sd(soupkern.uniform_state_dict([{"state_dict": sd, "state_dict_ema": ema}],
                                               state_dict_key="state_dict_ema"), ema, "ema in memory")


def test_dcp_nested_state_dict_key_and_errors(tmp_path):
    sd = sample_state_dict(5)
    ema = {k: (v * 2 if v.is_floating_point() else v) for k, v in sd.items()}
    folder = quiet_dcp_save({"model": sd, "ema": ema, "optimizer": {"step": torch.tensor(4.0)},
                             "note": b"bytes entry", "epoch": 2}, tmp_path / "d")
    assert_same_sd(soupkern.uniform_state_dict([folder]), sd, "model")
    assert_same_sd(soupkern.uniform_state_dict([folder], state_dict_key="ema"), ema, "ema")
    with pytest.raises(soupkern.InputError, match="nope") as e:
        soupkern.uniform_state_dict([folder], state_dict_key="nope")
    assert str(folder) in str(e.value)


def test_pickle_index_by_file_and_folder(tmp_path):
    sd = sample_state_dict(6)
    folder = _write_source("bin_index", sd, tmp_path)
    for src in (folder, folder / "pytorch_model.bin.index.json"):
        assert_same_sd(soupkern.uniform_state_dict([src]), sd, str(src))


# ---------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, legacy):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(3), "payload": Evil(marker)}, evil, _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()
    with pytest.raises(soupkern.InputError) as e:
        soupkern.uniform_state_dict([evil])
    assert str(evil) in str(e.value)
    with pytest.raises(soupkern.InputError):
        soupkern.uniform_soup([evil, evil], tmp_path / "o.safetensors")
    with pytest.raises(soupkern.InputError):
        open_checkpoint(evil)
    assert not marker.exists()
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"w": torch.zeros(3), "payload": Evil(marker)}, tmp_path / "evil.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                     os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-m", "soupkern", "uniform", "evil.pt", "evil.pt", "-o", "out.safetensors"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stderr
    assert "evil.pt" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()




@pytest.mark.parametrize("name,head,size", [
    ("junk.pt", b"", 4096), ("junk.bin", b"", 4096), ("junk.safetensors", b"", 4096), ("junk", b"", 4096),
    ("pickleish.pt", b"\x80\x02", 4096), ("zipish_short.pt", b"PK\x03\x04", 1000),
    ("zipish_long.pt", b"PK\x03\x04", 4096),
])
def test_unknown_bytes_give_input_error_naming_the_file(tmp_path, name, head, size):
    p = tmp_path / name
    p.write_bytes(head + np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    for call in (lambda: soupkern.uniform_state_dict([p]),
                 lambda: soupkern.uniform_soup([p, p], tmp_path / "o.safetensors")):
        with pytest.raises(soupkern.InputError) as e:
            call()
        assert str(p) in str(e.value)
    assert not (tmp_path / "o.safetensors").exists()


def test_other_zip_archives_give_input_error(tmp_path):
    import zipfile

    npz = tmp_path / "w.npz"
    np.savez(npz, a=np.zeros(3))
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as z:
        z.writestr("hello.txt", "hi")
    for p in (npz, plain):
        with pytest.raises(soupkern.InputError) as e:
            soupkern.uniform_state_dict([p])
        assert str(p) in str(e.value)


def _truncated_pickle(tmp_path: Path, keep: float) -> Path:
    good = tmp_path / "good.pt"
    torch.save({f"w{i}": torch.randn(1000) for i in range(5)}, good)
    data = good.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: int(len(data) * keep)])  # an interrupted copy: the zip central directory is lost
    return bad


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_zip_pickle_gives_input_error(tmp_path, keep):
    bad = _truncated_pickle(tmp_path, keep)
    with pytest.raises(soupkern.InputError) as e:
        soupkern.uniform_state_dict([bad])
    assert str(bad) in str(e.value)


def test_damaged_zip_pickle_is_not_called_legacy(tmp_path, caplog):
    bad = _truncated_pickle(tmp_path, 0.01)  # 200-odd bytes: torch reports a zip error (RuntimeError)
    with caplog.at_level(logging.WARNING, logger="soupkern"), pytest.raises(soupkern.InputError, match="bad.pt"):
        soupkern.uniform_state_dict([bad])
    assert not any("legacy" in r.getMessage() for r in caplog.records if r.name == "soupkern")


@pytest.mark.parametrize("sd,message", [
    ({1: torch.zeros(2)}, "not a string"),
    ({"w": torch.zeros(2), "n": 3}, "holds no state dict"),
    ({"w": torch.zeros(2, dtype=torch.complex64)}, "complex64"),
    ({"w": torch.zeros(2, 2).to_sparse()}, "not a dense tensor"),
    ({}, "holds no state dict"),
])
def test_bad_in_memory_state_dicts(sd, message):
    with pytest.raises(soupkern.InputError, match=message):
        soupkern.uniform_state_dict([sd, sd])


# ---------------------------------------------------------------------------------------------
# in-memory ingredients: the contract, bit for bit


def _base(gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        "a": torch.randn(33, 17, generator=gen).to(dtype),
        "b": (torch.randn(4099, generator=gen) * 1e-3).to(dtype),
        "c": torch.randn((), generator=gen).to(dtype),
        "d": special_values(dtype),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("k", range(2, 10))
def test_uniform_in_memory_matches_contract(k, dtype):
    gen = torch.Generator().manual_seed(100 * k + CODE[dtype])
    base = _base(gen, dtype)
    sds = [ingredient(gen, base) for _ in range(k)]
    got = soupkern.uniform_state_dict(sds)
    want = {name: uniform_ref([sd[name] for sd in sds]) for name in base}
    assert_same_sd(got, want, "cpp vs reference")
    # NaN bits: the torch backend inherits torch's bf16 NaN (test_torch_backend_keeps_nan_sign)
    assert_same_sd(soupkern.uniform_state_dict(sds, backend="torch"), want, "torch backend",
                   nan_bits=dtype != torch.bfloat16)
    if dtype == torch.float32:
        for name in base:  # the brief's plain formula: exact for fp32 output
            acc = sds[0][name].double()
            for sd in sds[1:]:
                acc = acc + sd[name].double()
            assert_same(got[name], (acc / k).to(torch.float32), name)
    else:
        for name in base:
            t = round_f64(fp64_weighted_sum([sd[name] for sd in sds], [1.0] * k, k), dtype).view(base[name].shape)
            assert_same(got[name], t, name, nan_bits=False)


def test_torch_backend_keeps_nan_sign():
    nan = torch.tensor([0x7FC0, 0x7FC0, 0x3F80], dtype=torch.int16).view(torch.bfloat16)  # +NaN, +NaN, 1.0
    sds = [{"x": nan}, {"x": nan.clone()}]
    cpp = soupkern.uniform_state_dict(sds, backend="cpp")["x"]
    assert bits(cpp).tolist() == [0x7FC0, 0x7FC0, 0x3F80]
    assert_same(soupkern.uniform_state_dict(sds, backend="torch")["x"], cpp, "torch backend")


def test_weighted_in_memory_matches_contract():
    gen = torch.Generator().manual_seed(7)
    base = _base(gen, torch.float32)
    del base["d"]  # Inf - Inf: NaN of unspecified sign
    sds = [ingredient(gen, base) for _ in range(4)]
    sds[2] = {k: v.to(torch.bfloat16) for k, v in sds[2].items()}
    # fp32-representable coefficients: the products are exact in fp64 (see the module docstring)
    coeffs = [float(np.float32(c)) for c in (0.3, -0.45, 1.7, 0.125)]
    for divisor in (1.0, 3.0, 0.7):
        got = soupkern.weighted_state_dict(sds, coeffs, divisor=divisor)
        want = {n: contract([sd[n] for sd in sds], coeffs, divisor, torch.float32) for n in base}
        assert_same_sd(got, want, f"divisor {divisor}")
        assert_same_sd(soupkern.weighted_state_dict(sds, coeffs, divisor=divisor, backend="torch"), want, "torch")
        got16 = soupkern.weighted_state_dict(sds, coeffs, divisor=divisor, dtype="bf16")
        assert_same_sd(got16, {n: contract([sd[n] for sd in sds], coeffs, divisor, torch.bfloat16) for n in base})


def test_awkward_in_memory_tensors_equal_plain_copies():
    """Non-contiguous views, views sharing one storage, parameters requiring grad, 0-dim tensors,
    channels-last weights: the same bits as contiguous copies, and the ingredients untouched."""
    gen = torch.Generator().manual_seed(11)
    sds, plain = [], []
    for i in range(3):
        store = torch.randn(5000, generator=gen)
        w = torch.randn(24, 10, generator=gen)
        conv = torch.randn(8, 3, 3, 3, generator=gen).to(memory_format=torch.channels_last)
        sd = {
            "transposed": w.t(),                                   # non-contiguous view
            "strided": w[::2, 1:7],                                # non-contiguous, storage offset
            "shared.a": store[:1000],                              # views of one storage
            "shared.b": store[1000:3000].view(40, 50),
            "shared.c": store[3000:],
            "shared.overlap": store[500:1500],                     # overlapping views
            "param": torch.nn.Parameter(torch.randn(7, 3, generator=gen)),
            "scalar": torch.tensor(float(i) + 0.1),
            "expanded": torch.randn(1, 6, generator=gen).expand(5, 6),
            "conv": torch.nn.Parameter(conv),
        }
        assert not sd["transposed"].is_contiguous() and not sd["conv"].is_contiguous()
        sds.append(sd)
        plain.append({k: v.detach().clone().contiguous() for k, v in sd.items()})
    snapshot = [{k: v.detach().clone() for k, v in sd.items()} for sd in sds]
    got = soupkern.uniform_state_dict(sds)
    assert_same_sd(got, soupkern.uniform_state_dict(plain), "awkward vs contiguous")
    assert_same_sd(got, {n: uniform_ref([p[n] for p in plain]) for n in plain[0]}, "vs reference")
    assert all(not t.requires_grad for t in got.values())
    for sd, snap in zip(sds, snapshot):
        assert_same_sd({k: v.detach() for k, v in sd.items()}, snap, "ingredient untouched")
    # weighted, through the streaming writer too
    coeffs = [0.25, 0.5, 0.25]
    w_got = soupkern.weighted_state_dict(sds, coeffs)
    assert_same_sd(w_got, soupkern.weighted_state_dict(plain, coeffs), "weighted")


def test_module_ingredients_with_grad_and_buffers():
    torch.manual_seed(1)
    ms = [torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(3)) for _ in range(3)]
    for m in ms:  # the same counter in every ingredient: copied
        m[1].num_batches_tracked.fill_(4)
    sds = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in ms]
    got = soupkern.uniform_state_dict(ms)
    assert_same_sd(got, soupkern.uniform_state_dict(sds))
    assert got["1.num_batches_tracked"].item() == 4
    ms[2][1].num_batches_tracked.fill_(5)  # counters that differ: the maximum by default, else as asked
    assert soupkern.uniform_state_dict(ms)["1.num_batches_tracked"].item() == 5
    assert soupkern.uniform_state_dict(ms, int_policy="first")["1.num_batches_tracked"].item() == 4
    with pytest.raises(soupkern.MismatchError, match="num_batches_tracked"):
        soupkern.uniform_state_dict(ms, int_policy="refuse")


def test_integer_tensors_copied_or_refused():
    gen = torch.Generator().manual_seed(2)
    ints = {"i64": torch.arange(12).view(3, 4), "i32": torch.arange(5, dtype=torch.int32),
            "u8": torch.arange(4, dtype=torch.uint8), "bool": torch.tensor([True, False]), "i0": torch.tensor(9)}
    sds = [{**{k: v.clone() for k, v in ints.items()}, "w": torch.randn(4, generator=gen)} for _ in range(3)]
    got = soupkern.uniform_state_dict(sds)
    assert_same_sd({k: got[k] for k in ints}, ints, "copied")
    for k in ints:
        assert got[k].data_ptr() != sds[0][k].data_ptr(), "a copy, not the ingredient's memory"
    sds[1]["i32"][2] += 1
    with pytest.raises(soupkern.MismatchError, match="i32"):
        soupkern.uniform_state_dict(sds)
    sds[1]["i32"] = sds[1]["i32"].to(torch.int64)
    with pytest.raises(soupkern.MismatchError, match="i32"):
        soupkern.uniform_state_dict(sds)


def test_mixed_input_dtypes():
    gen = torch.Generator().manual_seed(3)
    a = {"w": torch.randn(257, generator=gen), "v": torch.randn(3, 3, generator=gen, dtype=torch.float64)}
    b = {"w": torch.randn(257, generator=gen).to(torch.bfloat16),
         "v": torch.randn(3, 3, generator=gen).to(torch.float16)}
    got = soupkern.uniform_state_dict([a, b])
    assert got["w"].dtype == torch.float32 and got["v"].dtype == torch.float64  # the first ingredient's
    assert_same(got["w"], ((a["w"].double() + b["w"].double()) / 2).to(torch.float32))
    assert_same(got["v"], (a["v"] + b["v"].double()) / 2)
    rev = soupkern.uniform_state_dict([b, a])
    assert rev["w"].dtype == torch.bfloat16 and rev["v"].dtype == torch.float16
    assert_same_sd(rev, {n: uniform_ref([b[n], a[n]]) for n in a})
    for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        want = {n: uniform_ref([a[n], b[n]], dt) for n in a}
        assert_same_sd(soupkern.uniform_state_dict([a, b], dtype=dt), want, str(dt))


def _many_tensors(k: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    base = {f"layer{i}.w": torch.randn(1024, generator=gen) for i in range(300)}
    base.update({f"big{i}": torch.randn(1 << 20, generator=gen) for i in range(3)})
    base["big_bf16"] = torch.randn(1 << 20, generator=gen).to(torch.bfloat16)
    base["odd"] = torch.randn(32768 * 2 + 13, generator=gen)  # blocks of 2^15 plus a tail
    return [ingredient(gen, base) for _ in range(k)]


def test_many_small_tensors_multi_tensor_path(monkeypatch):
    from soupkern.backends.cpp import CppBackend

    calls = []
    real = CppBackend.weighted_sum_many

    def spy(self, outs, *args):
        calls.append(len(outs))
        return real(self, outs, *args)

    monkeypatch.setattr(CppBackend, "weighted_sum_many", spy)
    k = 4
    sds = _many_tensors(k, 21)
    got = soupkern.uniform_state_dict(sds)
    assert calls == [len(sds[0])], "one multi-tensor call for the whole table (under 256 MiB of input)"
    # the per-tensor path (torch backend: no weighted_sum_many) gives the same bits
    assert_same_sd(got, soupkern.uniform_state_dict(sds, backend="torch"), "multi-tensor vs per-tensor")
    for name in sds[0]:
        acc = sds[0][name].double()
        for sd in sds[1:]:
            acc = acc + sd[name].double()
        assert_same(got[name], round_f64(acc / k, sds[0][name].dtype), name)


# ---------------------------------------------------------------------------------------------
# out=


def test_out_writes_in_place_and_returns_the_out_tensors():
    gen = torch.Generator().manual_seed(31)
    sds = [{"a": torch.randn(40, 30, generator=gen), "b": torch.randn(7, generator=gen),
            "s": torch.randn((), generator=gen), "n": torch.tensor(3)} for _ in range(3)]
    sds[1]["n"] = sds[2]["n"] = sds[0]["n"].clone()
    want = soupkern.uniform_state_dict(sds)
    out = {k: torch.full_like(v, 99) for k, v in sds[0].items()}
    ptrs = {k: v.data_ptr() for k, v in out.items()}
    got = soupkern.uniform_state_dict(sds, out=out)
    assert sorted(got) == sorted(out)
    for name in out:
        assert got[name] is out[name]
        assert got[name].data_ptr() == ptrs[name] == out[name].data_ptr()
    assert_same_sd(got, want)


def test_out_allocates_no_tensor(monkeypatch):
    """An SWA/EMA loop's `out=` call creates no tensor (no output, no staging copy): every torch
    factory that could allocate one is counted, over a 60-tensor state dict."""
    gen = torch.Generator().manual_seed(32)
    sds = [{f"w{i}": torch.randn(17, i + 1, generator=gen) for i in range(60)} for _ in range(3)]
    out = {k: torch.empty_like(v) for k, v in sds[0].items()}
    soupkern.weighted_state_dict(sds, [0.5, 0.25, 0.25], out=out)  # warm-up: lazy imports
    made = []
    for factory in ("empty", "empty_like", "zeros", "zeros_like", "full", "full_like", "empty_strided"):
        real = getattr(torch, factory)
        monkeypatch.setattr(torch, factory, lambda *a, _real=real, _name=factory, **k: made.append(_name) or _real(*a, **k))
    monkeypatch.setattr(torch.Tensor, "clone", lambda self, *a, **k: made.append("clone") or torch._C.TensorBase.clone(self, *a, **k))
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda self, *a, **k: made.append("contiguous") or torch._C.TensorBase.contiguous(self, *a, **k))
    got = soupkern.weighted_state_dict(sds, [0.5, 0.25, 0.25], out=out)
    monkeypatch.undo()
    assert made == []
    assert all(got[k] is out[k] for k in out)
    want = {k: sum(c * sd[k].double() for c, sd in zip([0.5, 0.25, 0.25], sds)).float() for k in out}
    assert_same_sd(got, want)


def test_out_module_parameters_updated_in_place():
    torch.manual_seed(2)
    ms = [torch.nn.Linear(6, 4) for _ in range(3)]
    target = torch.nn.Linear(6, 4)
    params = {n: p for n, p in target.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in params.items()}
    want = soupkern.uniform_state_dict(ms)
    got = soupkern.uniform_state_dict(ms, out=target)
    for n, p in target.named_parameters():
        assert p is params[n] and p.data_ptr() == ptrs[n] == got[n].data_ptr()
        assert_same(p.detach(), want[n], n)
    assert target.weight.requires_grad


def test_out_dtype_follows_out_tensors_single_rounding():
    # exact mean 1 + 2^-8 + 2^-30: fp32 rounds it to 1 + 2^-8, a bf16 tie that goes to 1.0
    # (double rounding); the correct single rounding is 1 + 2^-7
    x0 = torch.tensor([2 + 2 ** -7, 1.0, -3.0], dtype=torch.float32)
    x1 = torch.tensor([2 ** -29, 2.0 ** -20, 0.5], dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    r0, r1 = torch.randn(5000, generator=gen), torch.randn(5000, generator=gen)
    sds = [{"crafted": x0, "rand": r0}, {"crafted": x1, "rand": r1}]
    want = {n: uniform_ref([sds[0][n], sds[1][n]], torch.bfloat16) for n in ("crafted", "rand")}
    assert want["crafted"][0].item() == 1 + 2 ** -7
    naive = ((x0.double() + x1.double()) / 2).to(torch.bfloat16)
    assert naive[0].item() == 1.0, "the crafted case is one torch's .to() rounds twice"
    out = {n: torch.empty(want[n].shape, dtype=torch.bfloat16) for n in want}
    got = soupkern.uniform_state_dict(sds, out=out)
    assert_same_sd(got, want, "out bf16")
    assert all(got[n] is out[n] for n in out)
    assert_same_sd(soupkern.uniform_state_dict(sds, dtype="bf16"), want, "dtype=bf16")
    fp16_out = {n: torch.empty(want[n].shape, dtype=torch.float16) for n in want}
    assert_same_sd(soupkern.uniform_state_dict(sds, out=fp16_out),
                   {n: uniform_ref([sds[0][n], sds[1][n]], torch.float16) for n in want}, "out fp16")


@pytest.mark.parametrize("position", [0, 1])
def test_swa_out_aliasing_an_ingredient_gives_the_same_bits(position):
    gen = torch.Generator().manual_seed(41)
    shapes = {"w": (64, 33), "b": (33,), "s": (), "big": (70000,)}
    avg = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    shadow = {n: t.clone() for n, t in avg.items()}  # the same averages, never aliased
    for step in range(1, 5):
        new = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
        c = [step / (step + 1), 1 / (step + 1)]
        ings, cs = ([avg, new], c) if position == 0 else ([new, avg], c[::-1])
        sh_ings = [shadow, new] if position == 0 else [new, shadow]
        ptrs = {n: t.data_ptr() for n, t in avg.items()}
        shadow = soupkern.weighted_state_dict(sh_ings, cs)
        got = soupkern.weighted_state_dict(ings, cs, out=avg)
        for n in avg:
            assert got[n] is avg[n] and avg[n].data_ptr() == ptrs[n]
        assert_same_sd(avg, shadow, f"step {step}")


def test_swa_out_module_aliasing_itself():
    torch.manual_seed(3)
    avg = torch.nn.Linear(20, 10)
    shadow = {k: v.detach().clone() for k, v in avg.state_dict().items()}
    for step in range(1, 4):
        new = torch.nn.Linear(20, 10)
        c = [step / (step + 1), 1 / (step + 1)]
        shadow = soupkern.weighted_state_dict([shadow, new], c)
        soupkern.weighted_state_dict([avg, new], c, out=avg)
        assert_same_sd({k: v.detach() for k, v in avg.state_dict().items()}, shadow, f"step {step}")


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 50, bias=False)
        self.head.weight = self.emb.weight  # tied input/output embeddings (GPT-2, T5, ...)


def test_swa_out_with_tied_weights():
    """A target that is also an input of another name (tied embeddings) must not be written while
    that input is still to be read."""
    torch.manual_seed(4)
    avg, new = _Tied(), _Tied()
    c = [3 / 4, 1 / 4]
    want = soupkern.weighted_state_dict([avg, new], c)  # no aliasing
    assert_same(want["emb.weight"], want["head.weight"])
    ptr = avg.emb.weight.data_ptr()
    got = soupkern.weighted_state_dict([avg, new], c, out=avg)  # SWA in place
    assert_same_sd(got, want, "tied SWA")
    assert avg.emb.weight.data_ptr() == ptr and avg.head.weight is avg.emb.weight
    assert_same(avg.emb.weight.detach(), want["emb.weight"])


def test_out_overlapping_another_names_input():
    gen = torch.Generator().manual_seed(9)
    store = torch.randn(3000, generator=gen)
    ing0 = {"a": store[:1000], "b": store[500:1500], "c": store[2000:]}  # a and b overlap
    ing1 = {k: torch.randn(v.shape, generator=gen) for k, v in ing0.items()}
    plain = {k: v.clone() for k, v in ing0.items()}
    want = soupkern.weighted_state_dict([plain, ing1], [0.75, 0.25])
    got = soupkern.weighted_state_dict([ing0, ing1], [0.75, 0.25], out=ing0)
    # out=ing0 writes a and b, which share 500 elements: the later name's values win there
    assert_same(got["c"], want["c"])
    assert_same(store[2000:], want["c"])
    assert_same(store[1000:1500], want["b"][500:])
    assert_same(store[:500], want["a"][:500])


def test_out_non_contiguous_targets():
    gen = torch.Generator().manual_seed(51)
    sds = [{"w": torch.randn(32, 16, generator=gen), "v": torch.randn(10, generator=gen)} for _ in range(3)]
    want = soupkern.uniform_state_dict(sds)
    wbase, vbase = torch.zeros(16, 32), torch.zeros(20)
    out = {"w": wbase.t(), "v": vbase[::2]}
    got = soupkern.uniform_state_dict(sds, out=out)
    assert got["w"] is out["w"] and got["v"] is out["v"]
    assert_same_sd(got, want)
    assert_same(wbase, want["w"].t().contiguous())
    assert_same(vbase[::2], want["v"])
    assert torch.count_nonzero(vbase[1::2]) == 0, "only the view's elements are written"
    # a channels-last module target
    ms = [torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last) for _ in range(2)]
    target = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    want = soupkern.uniform_state_dict(ms)
    soupkern.uniform_state_dict(ms, out=target)
    assert_same(target.weight.detach(), want["weight"])


def test_out_named_parameters_channels_last():
    torch.manual_seed(6)
    ms = [torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last) for _ in range(2)]
    target = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    want = soupkern.uniform_state_dict(ms)
    got = soupkern.uniform_state_dict(ms, out=dict(target.named_parameters()))
    assert_same(target.weight.detach(), want["weight"])
    assert got["weight"] is target.weight


def test_out_errors_leave_out_untouched():
    gen = torch.Generator().manual_seed(61)
    sds = [{"a": torch.randn(4, 5, generator=gen), "b": torch.randn(7, generator=gen)} for _ in range(2)]
    cases = [
        ({"a": torch.zeros(4, 5)}, "no tensor for it"),
        ({"a": torch.zeros(5, 4), "b": torch.zeros(7)}, "shape"),
        ({"a": torch.zeros(4, 5), "b": torch.zeros(7), "z": torch.zeros(1)}, "does not make"),
        ({"a": torch.zeros(4, 5, dtype=torch.int32), "b": torch.zeros(7)}, "dtype"),
        ({"a": torch.zeros(4, 5), "b": "not a tensor"}, "not a tensor"),
    ]
    for out, message in cases:
        before = {k: v.clone() for k, v in out.items() if isinstance(v, torch.Tensor)}
        with pytest.raises(soupkern.InputError, match=message):
            soupkern.uniform_state_dict(sds, out=out)
        for k, v in before.items():
            assert_same(out[k], v, f"out[{k}] untouched")
    with pytest.raises(soupkern.InputError, match="dtype"):  # dtype= disagreeing with out=
        soupkern.uniform_state_dict(sds, out={"a": torch.zeros(4, 5), "b": torch.zeros(7)}, dtype="bf16")
    # keys="intersection": extra out tensors are left alone
    extra = {"a": torch.zeros(4, 5), "b": torch.zeros(7), "z": torch.full((3,), 5.0)}
    soupkern.uniform_state_dict(sds, out=extra, keys="intersection")
    assert_same(extra["z"], torch.full((3,), 5.0))


# ---------------------------------------------------------------------------------------------
# file soups from mixed sources; provenance


def test_uniform_soup_file_from_mixed_sources(tmp_path):
    gen = torch.Generator().manual_seed(71)
    base = {"w": torch.randn(300_000, generator=gen), "b": torch.randn(17, generator=gen).to(torch.bfloat16),
            "t": torch.randn(64, 48, generator=gen).to(torch.float16), "n": torch.tensor(5)}
    sds = [ingredient(gen, base) for _ in range(6)]
    st = tmp_path / "a.safetensors"
    save_file(sds[0], os.fspath(st))
    pt = tmp_path / "b.pt"
    torch.save({"model": sds[1], "epoch": 1}, pt)
    legacy = tmp_path / "c.pth"
    torch.save(sds[2], legacy, _use_new_zipfile_serialization=False)
    folder = quiet_dcp_save({"model": sds[3], "optimizer": {"lr": torch.tensor(0.1)}}, tmp_path / "d_dcp")
    noncontig = {k: (v.t().contiguous().t() if v.dim() == 2 else v) for k, v in sds[5].items()}
    ings = [st, pt, legacy, folder, sds[4], noncontig]
    want = soupkern.uniform_state_dict(ings)
    assert_same_sd(want, {n: uniform_ref([sd[n] for sd in sds]) if base[n].is_floating_point() else base[n]
                          for n in base}, "state dict vs reference")
    out = tmp_path / "soup.safetensors"
    soupkern.uniform_soup(ings, out, budget_bytes=1 << 20)  # small budget: the big tensor in chunks
    assert_same_sd(load_file(os.fspath(out)), want, "file vs state dict")
    with safe_open(os.fspath(out), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["soupkern.ingredients"]) == [str(st), str(pt), str(legacy), str(folder),
                                                        "<state dict #4>", "<state dict #5>"]
    assert meta["soupkern.recipe"] == "uniform"


def test_weighted_soup_file_with_modules_provenance(tmp_path):
    torch.manual_seed(8)
    ms = [torch.nn.Linear(9, 5) for _ in range(2)]
    sd = {k: v.detach().clone() for k, v in torch.nn.Linear(9, 5).state_dict().items()}
    p = tmp_path / "x.pt"
    torch.save(sd, p)
    coeffs = [0.5, 0.25, 0.25]
    out = tmp_path / "w.safetensors"
    soupkern.weighted_soup([ms[0], p, ms[1]], coeffs, out)
    assert_same_sd(load_file(os.fspath(out)), soupkern.weighted_state_dict([ms[0], p, ms[1]], coeffs))
    with safe_open(os.fspath(out), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["soupkern.ingredients"]) == ["<Linear #0>", str(p), "<Linear #2>"]
    assert json.loads(meta["soupkern.coefficients"]) == coeffs


def test_output_may_not_replace_a_pickle_input(tmp_path):
    for p in (tmp_path / "m.pt", tmp_path / "hf" / "pytorch_model.bin"):
        p.parent.mkdir(exist_ok=True)
        torch.save(sample_state_dict(), p)
        before = p.read_bytes()
        with pytest.raises(soupkern.OutputError):
            soupkern.uniform_soup([p, p], p, overwrite=True)
        assert p.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# engine.fill_many and _native.weighted_sum_many


def test_fill_many_batches_and_backends_agree(tmp_path):
    sds = _many_tensors(3, 81)
    st = tmp_path / "first.safetensors"
    save_file(sds[0], os.fspath(st))  # one mapped safetensors source among in-memory ones
    sources = [st, sds[1], sds[2]]
    results = []
    for backend, batch in (("cpp", 256 << 20), ("cpp", 10_000), ("cpp", 1), ("torch", 256 << 20)):
        cks = [open_checkpoint(s, label=f"<{i}>") for i, s in enumerate(sources)]
        try:
            plan = build_plan(cks, [1.0, 1.0, 1.0], divisor=3.0)
            outs = {tp.out.name: torch.empty(tp.out.shape, dtype=sds[0][tp.out.name].dtype) for tp in plan.tensors}
            targets = {n: (t.data_ptr(), lambda t=t: t.reshape(-1).view(torch.uint8).numpy()) for n, t in outs.items()}
            fill_many(plan, targets, get_backend(backend), batch_bytes=batch)
        finally:
            for ck in cks:
                ck.close()
        results.append(outs)
    for r in results[1:]:
        assert_same_sd(r, results[0])
    assert_same_sd(results[0], soupkern.uniform_state_dict([sds[0], sds[1], sds[2]]))


def _many_table(gen: torch.Generator, k: int):
    dts = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    numels = [1, 7, 1000, 32768, 70001, 0, 300001]  # the last output (1.2 MB) is written with streaming stores
    ins = [[torch.randn(n, generator=gen).to(dts[(t + j) % 4]) for j in range(k)] for t, n in enumerate(numels)]
    out_dts = [torch.bfloat16, torch.float32, torch.float16, torch.float64, torch.float32, torch.float32, torch.float32]
    outs = [torch.full((n,), 7.0, dtype=d) for n, d in zip(numels, out_dts)]
    weights = [float(w) for w in torch.randn(len(numels) * k, generator=gen, dtype=torch.float64)]
    divisors = [1.0, 3.0, 1.0, 7.0, 0.3, 2.0, 3.0]
    return ins, outs, weights, divisors


@pytest.mark.parametrize("threads", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3, 9])
def test_native_weighted_sum_many_equals_weighted_sum(k, threads):
    gen = torch.Generator().manual_seed(k * 10 + threads)
    ins, outs, weights, divisors = _many_table(gen, k)
    _native.weighted_sum_many([o.data_ptr() for o in outs], [CODE[o.dtype] for o in outs],
                              [x.data_ptr() for xs in ins for x in xs], [CODE[x.dtype] for xs in ins for x in xs],
                              [o.numel() for o in outs], weights, divisors, k, threads)
    for t, (xs, o) in enumerate(zip(ins, outs)):
        if o.numel() == 0:
            continue
        ref = np.empty(o.numel() * o.element_size(), np.uint8)
        _native.weighted_sum(ref, NAME[o.dtype], [raw(x) for x in xs], [NAME[x.dtype] for x in xs],
                             weights[t * k:(t + 1) * k], o.numel(), 1, divisor=divisors[t])
        assert np.array_equal(ref, raw(o)), f"tensor {t}"


def test_native_weighted_sum_many_rejects_bad_tables():
    x = torch.zeros(4)
    o = torch.zeros(4)
    good = dict(outs=[o.data_ptr()], out_dtypes=[1], inputs=[x.data_ptr(), x.data_ptr()], in_dtypes=[1, 1],
                numels=[4], weights=[0.5, 0.5], divisors=[1.0], k=2)
    _native.weighted_sum_many(**good)
    bad = [
        dict(out_dtypes=[1, 1]),
        dict(numels=[4, 4]),
        dict(divisors=[]),
        dict(inputs=[x.data_ptr()]),
        dict(inputs=[x.data_ptr()] * 3),
        dict(in_dtypes=[1]),
        dict(weights=[0.5]),
        dict(weights=[0.5, 0.5, 0.5]),
        dict(k=3),
        dict(k=0),
        dict(out_dtypes=[4]),
        dict(in_dtypes=[1, -1]),
        dict(divisors=[0.0]),
        dict(divisors=[float("inf")]),
        dict(divisors=[float("nan")]),
    ]
    for change in bad:
        o.fill_(3.0)
        with pytest.raises(ValueError):
            _native.weighted_sum_many(**{**good, **change})
        assert torch.equal(o, torch.full((4,), 3.0)), f"{change}: nothing written"


def test_safetensors_header_length_that_looks_like_a_pickle_opcode(tmp_path):
    """A safetensors header of 0x280 or 0x380 bytes starts with 0x80 0x02 / 0x80 0x03, a pickle's
    protocol opcode: the file is still read as safetensors (once it was sent to torch.load)."""
    from safetensors.numpy import save_file as save_np

    p = tmp_path / "t.safetensors"
    for pad in range(0, 1200):
        save_np({"w": np.arange(3, dtype=np.float32)}, str(p), metadata={"x": "a" * pad})
        head = p.read_bytes()[:2]
        if head[0] == 0x80 and head[1] in (2, 3):
            break
    else:
        pytest.fail("no header length with a pickle-like first byte pair")
    got = soupkern.uniform_state_dict([p, p])
    assert torch.equal(got["w"], torch.arange(3, dtype=torch.float32))


@pytest.mark.parametrize("policy,want", [("auto", None), ("first", [1, 5, 3]), ("max", [4, 5, 9]),
                                         ("mean", [2, 4, 6])])
def test_int_policy_on_larger_integer_tensors(tmp_path, policy, want):
    """Integer tensors that are not 0-dim counters are refused by default (ids, positions) and
    combined element by element when asked: mean rounds half to even ((1+4)/2 = 2.5 -> 2)."""
    a = {"w": torch.ones(3), "ids": torch.tensor([1, 5, 3])}
    b = {"w": torch.ones(3), "ids": torch.tensor([4, 3, 9])}
    if want is None:
        with pytest.raises(soupkern.MismatchError, match="int-policy"):
            soupkern.uniform_state_dict([a, b], int_policy=policy)
        return
    got = soupkern.uniform_state_dict([a, b], int_policy=policy)
    assert got["ids"].tolist() == want and got["ids"].dtype == torch.int64
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    soupkern.uniform_soup([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "o.safetensors",
                          int_policy=policy)
    assert load_file(str(tmp_path / "o.safetensors"))["ids"].tolist() == want


def test_notices_for_likely_mistakes(tmp_path, caplog):
    a = {"w": torch.ones(3), "x": torch.ones(2)}
    b = {"w": torch.ones(3).to(torch.bfloat16)}
    with caplog.at_level(logging.WARNING, logger="soupkern"):
        soupkern.uniform_state_dict([a, b], keys="intersection")
    text = caplog.text
    assert "1 tensor(s) not in every ingredient are left out" in text and "'x'" in text
    assert "float dtypes differ (BF16, F32" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="soupkern"):
        soupkern.uniform_state_dict([a])
        soupkern.uniform_state_dict([a, a])
    assert "a soup of one ingredient" in caplog.text and "given more than once" in caplog.text


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_dcp_metadata_is_unpickled_with_an_allow_list(tmp_path):
    """torch's FileSystemReader unpickles .metadata with plain pickle.load: a crafted one would
    run code on open and on every load. soupkern's reader refuses anything but DCP metadata."""
    import pickle

    marker = tmp_path / "PWNED"
    folder = quiet_dcp_save({"w": torch.ones(3)}, tmp_path / "good")
    assert soupkern.uniform_state_dict([folder, folder])["w"].tolist() == [1.0, 1.0, 1.0]
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "__0_0.distcp").write_bytes(b"")
    (evil / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(soupkern.InputError, match="none of its code ran"):
        soupkern.uniform_state_dict([evil])
    r = subprocess.run([sys.executable, "-m", "soupkern", "inspect", str(evil)], capture_output=True, text=True)
    assert r.returncode == 2 and not marker.exists()


def test_dcp_with_a_missing_data_file_gives_input_error(tmp_path):
    folder = quiet_dcp_save({"w": torch.ones(3)}, tmp_path / "d")
    for f in folder.glob("*.distcp"):
        f.write_bytes(b"")  # truncated
    with pytest.raises(soupkern.InputError, match="cannot read tensors from the DCP folder"):
        soupkern.uniform_state_dict([folder])


def test_torchtitan_layout_soups_the_top_level_model(tmp_path, caplog):
    """torchtitan keeps the model's tensors at the top level and nests optimizer / train_state."""
    sd = {"tok.weight": torch.randn(4, 2), "out.weight": torch.randn(2, 4)}
    folder = quiet_dcp_save({**sd, "optimizer": {"state.tok.weight.exp_avg": torch.ones(4, 2)},
                             "train_state": {"step": torch.tensor(7)}}, tmp_path / "titan")
    with caplog.at_level(logging.WARNING, logger="soupkern"):
        got = soupkern.uniform_state_dict([folder, folder])
    assert sorted(got) == sorted(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert "'optimizer', 'train_state' are left out" in caplog.text


def test_state_dict_key_rules(tmp_path, caplog):
    a, b = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    with caplog.at_level(logging.WARNING, logger="soupkern"):
        got = soupkern.uniform_state_dict([{"model": a, "state_dict": b}])
    assert got["w"].tolist() == [0.0, 0.0] and "also holds 'model'" in caplog.text
    with pytest.raises(soupkern.InputError, match="nothing to pick from"):
        soupkern.uniform_state_dict([torch.nn.Linear(2, 2)], state_dict_key="ema")
    save_file(a, str(tmp_path / "a.safetensors"))
    with pytest.raises(soupkern.InputError, match="no ingredient is one"):
        soupkern.uniform_state_dict([tmp_path / "a.safetensors"], state_dict_key="ema")
    # one key for a mix: safetensors files ignore it, containers use it; provenance records it
    torch.save({"state_dict": b, "ema": a}, tmp_path / "c.pth.tar")
    soupkern.uniform_soup([tmp_path / "a.safetensors", tmp_path / "c.pth.tar"], tmp_path / "o.safetensors",
                          state_dict_key="ema")
    assert load_file(str(tmp_path / "o.safetensors"))["w"].tolist() == [1.0, 1.0]
    with safe_open(str(tmp_path / "o.safetensors"), framework="pt") as f:
        assert f.metadata()["soupkern.state_dict_key"] == "ema"


def test_meta_tensors_are_refused():
    sd = {"w": torch.ones(2)}
    with pytest.raises(soupkern.InputError, match="meta device"):
        soupkern.uniform_state_dict([sd, sd], out={"w": torch.empty(2, device="meta")})
    with pytest.raises(soupkern.InputError, match="meta device"):
        soupkern.uniform_state_dict([sd, {"w": torch.empty(2, device="meta")}])


def test_in_place_writes_bump_autograd_versions():
    m = torch.nn.Linear(3, 2)
    sds = [{k: v.detach().clone() for k, v in m.state_dict().items()} for _ in range(2)]
    before = m.weight._version
    soupkern.uniform_state_dict(sds, out=m)
    assert m.weight._version > before


def test_dcp_output_round_trip(tmp_path):
    """out_format="dcp": the soup as a DCP folder that torch.distributed.checkpoint reads back
    bit for bit, with provenance; replaced only with overwrite, and like any folder output built
    beside its target and swapped in whole."""
    import torch.distributed.checkpoint as dcp

    sds = [sample_state_dict(i) for i in range(3)]
    want = soupkern.uniform_state_dict(sds)
    out = tmp_path / "soup_dcp"
    report = soupkern.uniform_soup(sds, out, out_format="dcp")
    assert sorted(p.name for p in report.paths) == [".metadata", "__0_0.distcp", "soupkern_provenance.json"]
    loaded = {k: torch.empty_like(v) for k, v in want.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(loaded, checkpoint_id=os.fspath(out), no_dist=True)
    assert_same_sd(loaded, want)
    prov = json.loads((out / "soupkern_provenance.json").read_text())
    assert prov["metadata"]["soupkern.recipe"] == "uniform" and prov["files"] == [".metadata", "__0_0.distcp"]
    assert not [n for n in os.listdir(tmp_path) if ".soupkern-" in n]
    with pytest.raises(soupkern.OutputError, match="already exists"):
        soupkern.uniform_soup(sds, out, out_format="dcp")
    soupkern.weighted_soup(sds, [0.5, 0.25, 0.25], out, out_format="dcp", overwrite=True)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(soupkern.OutputError, match="did not write"):
        soupkern.uniform_soup(sds, tmp_path / "foreign", out_format="dcp", overwrite=True)
    r = subprocess.run([sys.executable, "-m", "soupkern", "uniform", os.fspath(out), os.fspath(out), "-o",
                        os.fspath(tmp_path / "cli_dcp"), "--format", "dcp", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert_same_sd(soupkern.uniform_state_dict([tmp_path / "cli_dcp"]),
                   soupkern.uniform_state_dict([out]))


def test_lora_factors_are_not_averaged_silently(tmp_path):
    """mean(B)·mean(A) is not mean(B·A): averaging PEFT adapters factor by factor is refused
    (naming a factor), unless asked for; one adapter alone is fine (nothing is averaged)."""
    g = torch.Generator().manual_seed(0)
    adapters = [{"base_model.model.q_proj.lora_A.weight": torch.randn(4, 16, generator=g),
                 "base_model.model.q_proj.lora_B.weight": torch.randn(16, 4, generator=g)} for _ in range(3)]
    a, b = "base_model.model.q_proj.lora_A.weight", "base_model.model.q_proj.lora_B.weight"
    mean_of_updates = sum(ad[b].double() @ ad[a].double() for ad in adapters) / 3
    product_of_means = (sum(ad[b].double() for ad in adapters) / 3) @ (sum(ad[a].double() for ad in adapters) / 3)
    assert (mean_of_updates - product_of_means).norm() > 0.1 * mean_of_updates.norm()  # why it is refused
    with pytest.raises(soupkern.InputError, match="PEFT LoRA adapters.*lora_A"):
        soupkern.uniform_state_dict(adapters)
    for i, ad in enumerate(adapters):
        save_file(ad, str(tmp_path / f"ad{i}.safetensors"))
    paths = [tmp_path / f"ad{i}.safetensors" for i in range(3)]
    r = subprocess.run([sys.executable, "-m", "soupkern", "uniform", *map(str, paths), "-o",
                        str(tmp_path / "o.safetensors")], capture_output=True, text=True)
    assert r.returncode == 2 and "merge_and_unload" in r.stderr and not (tmp_path / "o.safetensors").exists()
    got = soupkern.uniform_state_dict(adapters, lora="factorwise")
    assert torch.equal(got[a], (sum(ad[a].double() for ad in adapters) / 3).float())
    assert torch.equal(soupkern.uniform_state_dict(adapters[:1])[a], adapters[0][a])


def test_device_resident_path_on_the_cpu_device():
    """device="cpu" takes the device path (torch device kernels on tensors in place): the GPU
    code path for resident ingredients, run here. Uniform soups are bit-identical to the host
    kernel (weights 1: no multiply to round); F64 and integer tensors, `out=` aliasing an
    ingredient and tied targets too."""
    g = torch.Generator().manual_seed(0)
    sds = [{"w": torch.randn(257, 33, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
            "d": torch.randn(5, generator=g, dtype=torch.float64), "n": torch.tensor(3)} for _ in range(3)]
    want = soupkern.uniform_state_dict(sds, backend="cpp")
    assert_same_sd(soupkern.uniform_state_dict(sds, device="cpu"), want)
    tied_w = torch.randn(4, 4, generator=g)
    tied, other = {"emb": tied_w, "head": tied_w}, {"emb": torch.randn(4, 4, generator=g)}
    other["head"] = other["emb"]
    expect = soupkern.uniform_state_dict([{k: v.clone() for k, v in tied.items()},
                                          {k: v.clone() for k, v in other.items()}], backend="cpp")
    got = soupkern.uniform_state_dict([tied, other], out=tied, device="cpu")
    assert_same_sd(got, expect)
    assert torch.equal(tied["emb"], expect["emb"]) and tied["emb"].data_ptr() == tied_w.data_ptr()


def test_task_vectors_with_a_base(tmp_path):
    """base + Σ c_k (x_k − base), WiSE-FT's interpolation with one fine-tuned model: computed as
    the weighted sum of [base, *x] with [1 − Σc, *c]; within one output rounding of the fp64
    expression (the two fp64 forms round differently in the last bits)."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(1000, generator=g)}
    fts = [{"w": base["w"] + 0.01 * torch.randn(1000, generator=g)} for _ in range(2)]
    c = [0.5, 0.25]
    got = soupkern.weighted_state_dict(fts, c, base=base)["w"]
    want = base["w"].double() + sum(ck * (ft["w"].double() - base["w"].double()) for ck, ft in zip(c, fts))
    ulp = torch.finfo(torch.float32).eps * want.abs().float()
    assert ((got.double() - want).abs().float() <= ulp).all()
    exact = soupkern.weighted_state_dict([base, *fts], [0.25, 0.5, 0.25])["w"]
    assert torch.equal(got, exact)  # the same weighted sum
    for name, sd in (("base", base), ("a", fts[0]), ("b", fts[1])):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    r = subprocess.run([sys.executable, "-m", "soupkern", "weighted", f"{tmp_path}/a.safetensors:0.5",
                        f"{tmp_path}/b.safetensors:0.25", "--base", f"{tmp_path}/base.safetensors", "-o",
                        f"{tmp_path}/o.safetensors", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert torch.equal(load_file(str(tmp_path / "o.safetensors"))["w"], got)
    with safe_open(str(tmp_path / "o.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["soupkern.base"].endswith("base.safetensors") and json.loads(meta["soupkern.coefficients"])[0] == 0.25
    with pytest.raises(soupkern.InputError, match="divisor"):
        soupkern.weighted_state_dict(fts, c, base=base, divisor=2.0)


def test_lora_refusal_covers_other_layouts_and_spares_identical_factors():
    g = torch.Generator().manual_seed(1)
    kohya = [{"lora_unet_down.lora_down.weight": torch.randn(2, 8, generator=g),
              "lora_unet_down.lora_up.weight": torch.randn(8, 2, generator=g)} for _ in range(2)]
    with pytest.raises(soupkern.InputError, match="lora_down"):
        soupkern.uniform_state_dict(kohya)
    frozen = {"q.lora_A.weight": torch.randn(2, 8, generator=g), "q.lora_B.weight": torch.randn(8, 2, generator=g)}
    ft = [{**frozen, "w": torch.randn(3, generator=g)} for _ in range(2)]  # the same adapter in both: exact
    assert torch.equal(soupkern.uniform_state_dict(ft)["q.lora_A.weight"], frozen["q.lora_A.weight"])


def test_greedy_refuses_lora_factors():
    g = torch.Generator().manual_seed(2)
    ads = [{"q.lora_A.weight": torch.randn(2, 4, generator=g), "q.lora_B.weight": torch.randn(4, 2, generator=g)}
           for _ in range(2)]
    with pytest.raises(soupkern.InputError, match="PEFT LoRA adapters"):
        soupkern.greedy_soup(ads, model=lambda: _Factors(), score=lambda m: 0.0)


class _Factors(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Module()
        self.q.lora_A = torch.nn.Linear(4, 2, bias=False)
        self.q.lora_B = torch.nn.Linear(2, 4, bias=False)


def test_tied_pair_only_when_tied():
    g = torch.Generator().manual_seed(3)
    untied = {"lm_head.weight": torch.randn(5, 3, generator=g), "model.embed_tokens.weight": torch.randn(5, 3, generator=g)}
    embed_only = {"model.embed_tokens.weight": torch.randn(5, 3, generator=g)}
    with pytest.raises(soupkern.MismatchError):  # the first model is untied: no alias, the names differ
        soupkern.uniform_state_dict([untied, embed_only])
    odd = [{"lm_head.weight": torch.randn(5, 3, generator=g)}, {"blk.unshared.weight": torch.randn(5, 3, generator=g)}]
    with pytest.raises(soupkern.MismatchError):  # 'unshared.weight' is not an embedding name
        soupkern.uniform_state_dict(odd)


def test_renamed_ingredients(tmp_path):
    """renamed() / --rename: prefix rules on any source; collisions refused; provenance keeps the
    source's label; greedy and the CLI see the new names."""
    a = {"backbone.w": torch.ones(3), "head.b": torch.zeros(2)}
    b = {"model.w": torch.full((3,), 3.0), "head.b": torch.ones(2)}
    got = soupkern.uniform_state_dict([soupkern.renamed(a, {"backbone.": "model."}), b])
    assert sorted(got) == ["head.b", "model.w"] and got["model.w"].tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(soupkern.InputError, match="two tensors the name"):
        soupkern.uniform_state_dict([soupkern.renamed({"x.w": torch.ones(1), "y.w": torch.ones(1)}, {"x.": "y."})])
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    r = subprocess.run([sys.executable, "-m", "soupkern", "uniform", str(tmp_path / "a.safetensors"),
                        str(tmp_path / "b.safetensors"), "--rename", "backbone.=model.", "-o",
                        str(tmp_path / "o.safetensors"), "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert torch.equal(load_file(str(tmp_path / "o.safetensors"))["model.w"], got["model.w"])
    with safe_open(str(tmp_path / "o.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["soupkern.ingredients"])[0].endswith("a.safetensors")


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint64, torch.int32, torch.int8, torch.bool])
@pytest.mark.parametrize("dim", [0, 1])
def test_int_policy_results_are_exact_for_every_width(tmp_path, dtype, dim):
    """max and mean of integer tensors against Python integers: exact at the ends of 64-bit
    ranges (fp64 would lose 2^62 + 2 in the mean of 2^62 + 1 and 2^62 + 3), ties to even, and a
    0-dim counter (the usual case) combined without numpy."""
    from fractions import Fraction

    info = torch.iinfo(dtype) if dtype != torch.bool else None
    if dtype == torch.bool:
        cols = [[True, False, True], [False, False, True], [True, True, True]]
    elif dtype == torch.uint64:
        cols = [[2**62 + 1, 2**64 - 1, 0], [2**62 + 3, 2**64 - 3, 1], [7, 2**64 - 2, 2]]
    else:
        cols = [[info.max - 2, info.min, 1], [info.max, info.min + 3, 2], [info.max - 1, info.min, 0]]
    sds = [{"w": torch.ones(2), "c": torch.tensor(col if dim else col[:1][0], dtype=dtype)} for col in zip(*cols)]
    for policy in ("max", "mean"):
        got = soupkern.uniform_state_dict(sds, int_policy=policy)["c"]
        values = [[int(v) for v in (sd["c"].reshape(-1).tolist())] for sd in sds]
        want = [max(col) if policy == "max" else round(Fraction(sum(col), len(col))) for col in zip(*values)]
        assert [int(v) for v in got.reshape(-1).tolist()] == want, (policy, got)
    if dim == 0 and dtype != torch.uint64:  # a 0-dim counter from files: no numpy import
        paths = []
        for i, sd in enumerate(sds):
            paths.append(str(tmp_path / f"{i}.safetensors"))
            save_file(sd, paths[-1])
        code = ("import sys; sys.modules['numpy'] = None; import soupkern; "
                f"soupkern.uniform_soup({paths!r}, {str(tmp_path / 'o.safetensors')!r})")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
