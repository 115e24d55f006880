"""Bad arguments to the Python API raise a soupkern exception with a one-line message before
anything is read for work or written; output path rules; strict JSON; file-descriptor limits."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import soupkern
from soupkern.io import open_checkpoint


@pytest.fixture()
def pair(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(2):
        p = tmp_path / f"i{i}.safetensors"
        save_file({"w": rng.standard_normal((8, 4)).astype(np.float32)}, os.fspath(p))
        paths.append(p)
    return paths


def nothing_written(folder: Path, before: set[str]) -> None:
    assert set(os.listdir(folder)) == before


@pytest.mark.parametrize("ingredients,message", [
    ("SINGLE", "must be a list, got the single path"),
    (b"SINGLE", "must be a list, got the single path"),
    ([3, 4], "3 (int) is not a path, state dict or module"),
    ({"a": 1}, "must be a list, got a single dict"),
    (3, "must be a list of paths, state dicts or modules, got int"),
    ([], "at least one ingredient"),
])
def test_bad_ingredients(tmp_path, pair, ingredients, message):
    if ingredients == "SINGLE":
        ingredients = os.fspath(pair[0])
    elif ingredients == b"SINGLE":
        ingredients = os.fsencode(pair[0])
    before = set(os.listdir(tmp_path))
    for call in (lambda: soupkern.uniform_soup(ingredients, tmp_path / "o.safetensors"),
                 lambda: soupkern.uniform_state_dict(ingredients),
                 lambda: soupkern.weighted_soup(ingredients, [1.0], tmp_path / "o.safetensors")):
        with pytest.raises(soupkern.InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()
    nothing_written(tmp_path, before)


def test_bytes_and_pathlike_paths_work(tmp_path, pair):
    out = os.fsencode(tmp_path / "o.safetensors")
    soupkern.uniform_soup([os.fsencode(pair[0]), pair[1]], out)
    want = (load_file(os.fspath(pair[0]))["w"].astype(np.float64) + load_file(os.fspath(pair[1]))["w"]) / 2
    np.testing.assert_array_equal(load_file(os.fsdecode(out))["w"], want.astype(np.float32))


@pytest.mark.parametrize("coefficients,message", [
    ({0.5, 0.25}, "ordered sequence"),
    ("12", "ordered sequence"),
    ([0.5], "1 coefficients given for 2 ingredients"),
    ([1e39, 0.0], "overflows float32"),
    ([math.nan, 1.0], "finite"),
    ([True, 0.0], "real numbers"),
    (["0.5", 0.5], "real numbers"),
    (0.5, "ordered sequence"),
])
def test_bad_coefficients(tmp_path, pair, coefficients, message):
    before = set(os.listdir(tmp_path))
    with pytest.raises(soupkern.InputError, match=message):
        soupkern.weighted_soup(pair, coefficients, tmp_path / "o.safetensors")
    with pytest.raises(soupkern.InputError, match=message):
        soupkern.weighted_state_dict(pair, coefficients)
    nothing_written(tmp_path, before)


@pytest.mark.parametrize("kwargs,message", [
    ({"budget_bytes": 0}, "at least 1048576 bytes"),
    ({"budget_bytes": 1.5e6}, "integer number of bytes"),
    ({"dtype": "int8"}, "output dtype"),
    ({"dtype": torch.int8}, "output dtype"),
    ({"dtype": 16}, "output dtype"),
    ({"metadata": {"x": 1}}, "metadata must map str to str"),
    ({"metadata": ["x"]}, "metadata must be a dict"),
    ({"keys": "some"}, "keys must be"),
    ({"max_shard_size": 0}, "positive number of bytes"),
    ({"max_shard_size": "5GB"}, "positive number of bytes"),
    ({"overwrite": "yes"}, "overwrite must be True or False"),
    ({"backend": "nope"}, "unknown backend 'nope'"),
    ({"backend": 3}, "backend must be a name"),
    ({"device": "nonsense"}, "is not a torch device"),
    ({"device": 3.5}, "device must be a string"),
])
def test_bad_options(tmp_path, pair, kwargs, message):
    before = set(os.listdir(tmp_path))
    with pytest.raises(soupkern.SoupkernError, match=message):
        soupkern.uniform_soup(pair, tmp_path / "o.safetensors", **kwargs)
    nothing_written(tmp_path, before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path, pair):
    with pytest.raises(soupkern.InputError, match="no CUDA GPU is usable here"):
        soupkern.uniform_soup(pair, tmp_path / "o.safetensors", device="cuda")
    with pytest.raises(soupkern.InputError, match="no CUDA GPU is usable here"):
        soupkern.uniform_state_dict(pair, device="cuda:0")


@pytest.mark.parametrize("dtype", [torch.float16, "torch.float16", "fp16", torch.bfloat16])
def test_dtype_as_torch_object_or_string(tmp_path, pair, dtype):
    sd = soupkern.uniform_state_dict(pair, dtype=dtype)
    expected = dtype if isinstance(dtype, torch.dtype) else torch.float16
    assert sd["w"].dtype == expected


# ---------------------------------------------------------------------------------------------
# output path rules

def test_trailing_slash_names_a_folder(tmp_path, pair):
    soupkern.uniform_soup(pair, os.fspath(tmp_path / "newdir") + "/")
    assert sorted(os.listdir(tmp_path / "newdir")) == ["model.safetensors"]
    with open_checkpoint(tmp_path / "newdir") as ck:
        assert set(ck.tensors) == {"w"}


def test_existing_folder_without_shard_size_is_a_folder_output(tmp_path, pair):
    (tmp_path / "existing").mkdir()
    soupkern.uniform_soup(pair, tmp_path / "existing")
    assert os.listdir(tmp_path / "existing") == ["model.safetensors"]


def test_sharded_output_named_like_a_file_is_refused(tmp_path, pair):
    before = set(os.listdir(tmp_path))
    with pytest.raises(soupkern.InputError, match=r"ends in \.safetensors; give a folder path"):
        soupkern.uniform_soup(pair, tmp_path / "x.safetensors", max_shard_size=100)
    nothing_written(tmp_path, before)


def test_output_names_up_to_name_max(tmp_path, pair):
    name = "s" * (255 - len(".safetensors")) + ".safetensors"
    soupkern.uniform_soup(pair, tmp_path / name)
    soupkern.uniform_soup(pair, tmp_path / name, overwrite=True)
    folder = "f" * 255
    soupkern.uniform_soup(pair, tmp_path / folder, max_shard_size=64)
    assert sorted(n for n in os.listdir(tmp_path) if ".soupkern-" not in n) == sorted(["i0.safetensors", "i1.safetensors", name, folder])
    assert not [n for n in os.listdir(tmp_path) if ".soupkern-" in n]


def test_more_ingredients_than_open_file_limit(tmp_path):
    """Inputs hold no file descriptor once mapped, so ulimit -n does not bound the ingredients."""
    rng = np.random.default_rng(3)
    n = 80
    for i in range(n):
        save_file({"w": rng.standard_normal(16).astype(np.float32)}, os.fspath(tmp_path / f"{i:03d}.safetensors"))
    script = textwrap.dedent(f"""
        import resource, os, glob, numpy as np
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
        import soupkern
        from safetensors.numpy import load_file
        paths = sorted(glob.glob({os.fspath(tmp_path)!r} + "/*.safetensors"))
        soupkern.uniform_soup(paths, {os.fspath(tmp_path / 'out.safetensors')!r})
        want = sum(load_file(p)["w"].astype(np.float64) for p in paths) / len(paths)
        got = load_file({os.fspath(tmp_path / 'out.safetensors')!r})["w"]
        assert np.allclose(got, want, rtol=1e-5, atol=1e-6), abs(got - want).max()
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ---------------------------------------------------------------------------------------------
# strict JSON

def test_greedy_metadata_is_strict_json_with_nan_scores(tmp_path, pair):
    scores = iter([1.0, math.nan, math.nan])
    out = tmp_path / "g.safetensors"
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(8, 4))

    soupkern.greedy_soup(pair, out, model=M, score=lambda m: math.nan, ingredient_scores=[1.0, 0.5])
    with open_checkpoint(out) as ck:
        for key, value in ck.metadata.items():
            if key.startswith("soupkern.greedy.") and key not in ("soupkern.greedy.tie", "soupkern.greedy.sort") \
                    or key in ("soupkern.coefficients", "soupkern.ingredients"):
                json.loads(value, parse_constant=lambda c: pytest.fail(f"{key} holds {c}"))
        assert json.loads(ck.metadata["soupkern.greedy.steps"])[0]["score"] is None  # NaN written as null


def test_analyze_json_is_strict(tmp_path, pair):
    zero = tmp_path / "zero.safetensors"
    save_file({"w": np.zeros((8, 4), np.float32)}, os.fspath(zero))
    r = subprocess.run([sys.executable, "-m", "soupkern", "analyze", os.fspath(zero), os.fspath(pair[0]),
                        "--base", os.fspath(zero), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["cosine"][0][1] is None  # a zero delta has no angle: null, not NaN


@pytest.mark.parametrize("reads", ["map", "copy"])
def test_file_to_file_soups_never_import_torch_or_numpy(tmp_path, pair, reads):
    """`import soupkern` and a file-to-file soup (API and CLI, mapped or copied reads) load
    neither torch, triton nor numpy (nor tqdm without a terminal): the path whose cost is
    measured against the I/O floor, start-up included, carries no framework import."""
    script = textwrap.dedent(f"""
        import sys, runpy
        import soupkern
        soupkern.uniform_soup({[os.fspath(p) for p in pair]!r}, {os.fspath(tmp_path / 'a.safetensors')!r})
        soupkern.weighted_soup({[os.fspath(p) for p in pair]!r}, [0.25, 0.75], {os.fspath(tmp_path / 'b')!r},
                               max_shard_size=64)
        from soupkern.cli import main
        assert main(["uniform", *{[os.fspath(p) for p in pair]!r}, "-o", {os.fspath(tmp_path / 'c.safetensors')!r}, "-q"]) == 0
        print(sorted(m for m in ("torch", "triton", "numpy", "tqdm") if m in sys.modules))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "SOUPKERN_READS": reads})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
