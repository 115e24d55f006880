"""SPMD souping under torchrun on gloo (CPU), 2 and 3 processes on this machine: the same tensor
bytes as one process (headers differ only in soupkern.world_size), any world size, failures
reaching every rank, nothing left behind and the previous output kept. NCCL and several nodes
take the same code path but cannot be run here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from soupkern.distributed import assign


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(folder / f"i{i}.safetensors")
        save_file({f"t{j}": rng.standard_normal((64, 33 + j)).astype(np.float32) for j in range(20)}
                  | {"bf": rng.standard_normal(77).astype(np.float16)}, str(paths[-1]))
    return paths


def torchrun(n: int, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                           "--standalone", "-m", "soupkern", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=180, env={**os.environ, "SOUPKERN_DIST_TIMEOUT": "20", **(env or {})})


def tensors(folder: Path) -> dict[str, bytes]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="np") as s:
            out.update({k: s.get_tensor(k).tobytes() for k in s.keys()})
    return out


def metadata(folder: Path) -> list[dict[str, str]]:
    metas = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="np") as s:
            metas.append(s.metadata())
    return metas


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_spmd_soup_equals_one_process(inputs: list[Path], tmp_path: Path, n: int) -> None:
    args = [*map(str, inputs), "--max-shard-size", "40KB"]
    one = subprocess.run([sys.executable, "-m", "soupkern", "uniform", *args, "-o", f"{tmp_path}/one/", "-q"],
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    # at 2 ranks through the per-device backend form default_backend() gives on GPU machines
    env = {"SOUPKERN_DIST_BACKEND": "cpu:gloo"} if n == 2 else None
    r = torchrun(n, ["uniform", *args, "-o", f"{tmp_path}/many/"], tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert tensors(tmp_path / "many") == tensors(tmp_path / "one")
    assert (tmp_path / "many" / "model.safetensors.index.json").read_bytes() == \
        (tmp_path / "one" / "model.safetensors.index.json").read_bytes()
    for a, b in zip(metadata(tmp_path / "one"), metadata(tmp_path / "many")):
        assert a.pop("soupkern.world_size") == "1" and b.pop("soupkern.world_size") == str(n)
        assert a == b
    assert r.stderr.count("wrote ") == 1  # rank 0 reports
    notice = torchrun(n, ["uniform", str(inputs[0]), "-o", f"{tmp_path}/single/"], tmp_path)
    assert notice.returncode == 0 and notice.stderr.count("a soup of one ingredient") == 1  # notices once
    assert not [p for p in os.listdir(tmp_path) if ".soupkern-" in p]


def test_device_streaming_under_torchrun(inputs: list[Path], tmp_path: Path) -> None:
    """`--device` under torchrun: each rank streams its shards through the device pipeline (here
    the CPU device with the torch device kernels; on GPUs each rank's GPU LOCAL_RANK): the same
    tensor bytes as one process on the host kernels."""
    args = [*map(str, inputs), "--max-shard-size", "40KB"]
    one = subprocess.run([sys.executable, "-m", "soupkern", "uniform", *args, "-o", f"{tmp_path}/one/", "-q"],
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    r = torchrun(2, ["uniform", *args, "--device", "cpu", "-o", f"{tmp_path}/dev/"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert tensors(tmp_path / "dev") == tensors(tmp_path / "one")
    assert {m["soupkern.backend"] for m in metadata(tmp_path / "dev")} == {"torch"}


def test_backend_follows_the_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """gloo without a GPU; gloo for CPU tensors and NCCL for CUDA tensors with one (untested on a
    GPU here: the choice only)."""
    import torch
    import torch.distributed as dist

    from soupkern.distributed import default_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_backend() == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    assert default_backend() == "cpu:gloo,cuda:nccl"


def test_bad_input_is_reported_once_on_every_exit_code(inputs: list[Path], tmp_path: Path) -> None:
    r = torchrun(2, ["uniform", str(inputs[0]), str(tmp_path / "missing.safetensors"), "-o", f"{tmp_path}/o/"],
                 tmp_path)
    assert r.returncode != 0
    assert r.stderr.count("soupkern: error:") == 1 and "missing.safetensors: no such file" in r.stderr
    assert not (tmp_path / "o").exists()


def test_a_dead_rank_stops_every_rank_and_keeps_the_previous_output(inputs: list[Path], tmp_path: Path) -> None:
    args = ["uniform", *map(str, inputs), "--max-shard-size", "40KB", "-o", f"{tmp_path}/o/", "--force"]
    assert torchrun(2, args, tmp_path).returncode == 0
    before = tensors(tmp_path / "o")
    weighted = ["weighted", f"{inputs[0]}:0.5", f"{inputs[1]}:0.5", "--max-shard-size", "40KB", "-o",
                f"{tmp_path}/o/", "--force"]
    r = torchrun(2, weighted, tmp_path, env={"SOUPKERN_TEST_KILL_RANK": "1"})
    assert r.returncode != 0
    assert tensors(tmp_path / "o") == before  # the previous soup, untouched
    assert not [p for p in os.listdir(tmp_path) if ".soupkern-" in p and "lock" not in p]


def test_assignment_balances_bytes_for_any_world_size() -> None:
    sizes = [50, 40, 30, 20, 10, 10]
    for world in (1, 2, 3, 4, 7):
        owner = assign(sizes, world)
        assert owner == assign(sizes, world)  # deterministic
        loads = [sum(s for s, r in zip(sizes, owner) if r == k) for k in range(world)]
        assert max(loads) - min(loads) <= max(sizes)
    assert assign([5], 3) == [0]


def run_script(tmp_path: Path, body: str, args: list[str]) -> subprocess.CompletedProcess:
    """`body` as a script run by every rank of a 2-process torchrun, inside dist.init_process_group('gloo')."""
    script = tmp_path / "run.py"
    script.write_text("import sys, torch.distributed as dist, soupkern\ndist.init_process_group('gloo')\n"
                      + body + "dist.destroy_process_group()\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                        str(script), *args], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return r


def test_python_api_inside_a_process_group(inputs: list[Path], tmp_path: Path) -> None:
    """The same functions from Python in an initialized process group (the user's own)."""
    run_script(tmp_path,
               "r = soupkern.weighted_soup(sys.argv[1:4], [0.25, 0.25, 0.5], sys.argv[4], max_shard_size=40_000,\n"
               "                           distributed=True)\n"
               "if dist.get_rank() == 0:  # the usual rank-0-only call: a plain single-process soup, no collective\n"
               "    soupkern.uniform_soup(sys.argv[1:3], sys.argv[4].rstrip('/') + '_rank0.safetensors')\n"
               "dist.barrier()\n", [*map(str, inputs), f"{tmp_path}/api/"])
    one = subprocess.run([sys.executable, "-m", "soupkern", "weighted", f"{inputs[0]}:0.25", f"{inputs[1]}:0.25",
                          f"{inputs[2]}:0.5", "--max-shard-size", "40000", "-o", f"{tmp_path}/one/", "-q"],
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    assert tensors(tmp_path / "api") == tensors(tmp_path / "one")
    assert json.loads(metadata(tmp_path / "api")[0]["soupkern.coefficients"]) == [0.25, 0.25, 0.5]
    assert (tmp_path / "api_rank0.safetensors").exists()


def test_ranks_that_see_different_files_are_refused(inputs: list[Path], tmp_path: Path) -> None:
    """A rank planning another soup (other arguments, or a node whose copy of a file differs)
    would write its bytes into shards of rank 0's soup: refused on every rank before writing."""
    r = run_script(tmp_path,
                   "ings = sys.argv[1:3] if dist.get_rank() == 0 else [sys.argv[1], sys.argv[3]]\n"
                   "try:\n"
                   "    soupkern.uniform_soup(ings, sys.argv[4], max_shard_size=40_000, distributed=True)\n"
                   "except soupkern.SoupkernError as e:\n"
                   "    print('refused', e)\n", [*map(str, inputs), f"{tmp_path}/mixed/"])
    assert r.stdout.count("refused") == 2 and "planned a different soup" in r.stdout
    assert not (tmp_path / "mixed").exists()


def test_a_slow_rank_is_not_a_dead_rank(inputs: list[Path], tmp_path: Path) -> None:
    """The soup itself may take longer than the group's timeout: ranks that finished wait by
    heartbeats, not by one collective that would time out (here: rank 0 has all the work, a
    single-file output, under an 10 s timeout with a soup slowed past it)."""
    r = torchrun(2, ["uniform", *map(str, inputs), "-o", f"{tmp_path}/one.safetensors"], tmp_path,
                 env={"SOUPKERN_DIST_TIMEOUT": "10", "SOUPKERN_TEST_SLOW_RANK": "0:15"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "one.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# greedy soups with the held-out data split over the ranks

from tests.digits_fixtures import digits_dir, digits_ingredients, digits_splits  # noqa: E402,F401


@pytest.mark.parametrize("tie", ["ge", "gt"])
def test_distributed_greedy_equals_one_process(digits_ingredients: list[Path], tmp_path: Path,  # noqa: F811
                                               tie: str) -> None:
    """`torchrun ... -m soupkern greedy --model --data --metric` at world sizes 2 and 3 (the 10
    held-out batches do not divide by 3): the same ingredient scores and final score to the bit
    (per-batch metric sums gathered and added in batch order), so the same picks and the same soup
    file as one process. 150 held-out samples make the two tie rules pick different soups."""
    args = [*map(str, digits_ingredients), *digits_hooks(tmp_path, 150, 16), "--tie", tie, "--sort", "model-soups"]
    want = one_process("greedy", args, tmp_path)
    for n in (2, 3):
        out = tmp_path / f"many{n}.safetensors"
        r = torchrun(n, ["greedy", *args, "-o", str(out)], tmp_path)
        assert r.returncode == 0, r.stderr
        assert r.stderr.count("greedy soup:") == 1  # rank 0 reports
        got = metadata_of(out)
        assert got == want  # kept, every score, the final score, provenance
        assert out.read_bytes() == (tmp_path / "one.safetensors").read_bytes()
        if n == 2 and tie == "ge":  # the same held-out data as a map-style dataset in batches of 16
            as_dataset = [a.replace(":data", ":dataset") for a in args]
            r = torchrun(n, ["greedy", *as_dataset, "--batch-size", "16", "-o", str(out), "--force"], tmp_path)
            assert r.returncode == 0, r.stderr
            assert metadata_of(out) == want
    kept = json.loads(want["soupkern.greedy.kept"])
    assert 1 < len(kept) < len(digits_ingredients)
    assert not [p for p in os.listdir(tmp_path) if ".soupkern-" in p]


@pytest.mark.parametrize("n", [2, 4])
def test_speculative_greedy_over_a_candidate_data_mesh(digits_ingredients: list[Path], tmp_path: Path,  # noqa: F811
                                                      n: int) -> None:
    """`--speculative 2` under torchrun: windows of 2 candidates over a 2 × n/2 candidates × data
    mesh (init_device_mesh; at 4 ranks each candidate's batches split over 2 data ranks, 10
    batches and a last window of one candidate): every score, the picks and the soup file equal
    one process's with the same speculation, to the bit. Loss, so any change of summation order
    would show."""
    args = [*map(str, digits_ingredients), *digits_hooks(tmp_path, 150, 16), "--metric", "loss", "--speculative", "2"]
    want = one_process("greedy", args, tmp_path)
    out = tmp_path / f"many{n}.safetensors"
    r = torchrun(n, ["greedy", *args, "-o", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert metadata_of(out) == want
    assert out.read_bytes() == (tmp_path / "one.safetensors").read_bytes()
    assert len(json.loads(want["soupkern.greedy.steps"])) == len(digits_ingredients) - 1


def tensors_of(path: Path) -> dict[str, bytes]:
    with safe_open(str(path), framework="np") as s:
        return {k: s.get_tensor(k).tobytes() for k in s.keys()}


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="np") as s:
        return dict(s.metadata())


def digits_hooks(tmp_path: Path, samples: int, batch: int) -> list[str]:
    """--model/--data options: the digits MLP, the first `samples` validation samples in batches."""
    hooks = tmp_path / "hooks.py"
    hooks.write_text(
        "from soupkern.examples import digits\n"
        "def model():\n    return digits.make_model()\n"
        "def data():\n"
        "    val = digits.make_splits(0).val\n"
        f"    return digits.batches(digits.TensorPair(val.x[:{samples}], val.y[:{samples}]), {batch})\n"
        "def dataset():\n"
        "    from torch.utils.data import TensorDataset\n"
        "    val = digits.make_splits(0).val\n"
        f"    return TensorDataset(val.x[:{samples}], val.y[:{samples}])\n")
    return ["--model", f"{hooks}:model", "--data", f"{hooks}:data"]


def one_process(command: str, args: list[str], tmp_path: Path) -> dict[str, str]:
    """Run `soupkern COMMAND ARGS -o one.safetensors` as one process; its soup's metadata. With
    one intra-op thread, as torchrun gives each rank (OMP_NUM_THREADS=1): torch's CPU kernels may
    round differently with another thread count (seen: the digits MLP's loss in its 9th digit)."""
    one = subprocess.run([sys.executable, "-m", "soupkern", command, *args, "-o", str(tmp_path / "one.safetensors"),
                          "-q"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    return metadata_of(tmp_path / "one.safetensors")


def test_distributed_interpolate_equals_one_process(digits_ingredients: list[Path], tmp_path: Path) -> None:  # noqa: F811
    """`torchrun ... -m soupkern interpolate A B --model --data` at world sizes 2 and 3 (10
    held-out batches, not divisible by 3): the curve (every score, in the soup's metadata) and the
    soup written at the best alpha equal one process's to the bit; rank 0 alone reports and plots."""
    args = [*map(str, digits_ingredients[:2]), *digits_hooks(tmp_path, 150, 16), "--alphas", "0,0.25,0.5,0.75,1"]
    want = one_process("interpolate", args, tmp_path)
    for n in (2, 3):
        out = tmp_path / f"many{n}.safetensors"
        r = torchrun(n, ["interpolate", *args, "--plot", str(tmp_path / f"curve{n}.png"), "-o", str(out)], tmp_path)
        assert r.returncode == 0, r.stderr
        assert r.stderr.count("best alpha by") == 1
        got = metadata_of(out)
        curves = [json.loads(m.pop("soupkern.interpolate.curve")) for m in (got, dict(want))]
        for c in curves:
            c.pop("seconds")  # the curve's evaluation time
        assert curves[0] == curves[1]  # alphas, every score
        assert got == {k: v for k, v in want.items() if k != "soupkern.interpolate.curve"}  # alpha, provenance
        assert tensors_of(out) == tensors_of(tmp_path / "one.safetensors")
        assert (tmp_path / f"curve{n}.png").stat().st_size > 0
    assert not [p for p in os.listdir(tmp_path) if ".soupkern-" in p]


def test_a_locked_output_is_refused_on_every_rank_before_any_evaluation(digits_ingredients: list[Path],  # noqa: F811
                                                                       tmp_path: Path) -> None:
    """Another run holds the output's lock: rank 0's refusal reaches every rank at once (an agreed
    step), reported once, before any held-out batch is scored (was: the other ranks went on
    into the evaluation's collectives and failed on a broken connection)."""
    import time

    from soupkern.io import atomic
    from soupkern.io.writer import output_target

    out = tmp_path / "w.safetensors"
    args = [*map(str, digits_ingredients[:2]), *digits_hooks(tmp_path, 64, 32), "-o", str(out)]
    with atomic.output_reserved(output_target(out)):
        t0 = time.monotonic()
        r = torchrun(2, ["interpolate", *args], tmp_path)
    assert r.returncode != 0 and time.monotonic() - t0 < 30
    assert r.stderr.count("soupkern: error:") == 1 and "Traceback" not in r.stderr.split("soupkern: error:")[0], \
        r.stderr[-3000:]
    assert not out.exists()


def test_greedy_score_callable_is_refused_under_torchrun(inputs: list[Path], tmp_path: Path) -> None:
    (tmp_path / "hooks.py").write_text("def score(sd):\n    return 1.0\n")
    r = torchrun(2, ["greedy", *map(str, inputs), "--score", f"{tmp_path / 'hooks.py'}:score",
                     "-o", str(tmp_path / "o.safetensors")], tmp_path)
    assert r.returncode != 0, r.stderr  # torchrun's own code; each rank exits 2
    assert r.stderr.count("soupkern: error:") == 1 and "--data" in r.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_distributed_learned_soup_matches_one_process(digits_ingredients: list[Path], tmp_path: Path) -> None:  # noqa: F811
    """`torchrun ... -m soupkern learned` at world sizes 2 and 3: each step's batch is split by
    rows, the gradients summed over ranks. The held-out score of the uniform start is gathered in
    batch order and so is bit-equal; the coefficients differ from one process's only by the order
    of the gradient sums. Tolerance: a step's gradient then differs by a few fp32 ulps (relative
    ~1e-7); AdamW divides by sqrt(v), so a relative change of the gradient moves a step by about
    as much, lr = 0.05 at most per step, 20 steps here: |Δ logits| <~ 20 · 0.05 · 1e-6 = 1e-6,
    and softmax coefficients move less; 1e-5 leaves room for gradients near zero."""
    args = [*map(str, digits_ingredients[:4]), *digits_hooks(tmp_path, 320, 64), "--epochs", "4"]
    want = one_process("learned", args, tmp_path)
    for n in (2, 3):
        out = tmp_path / f"many{n}.safetensors"
        r = torchrun(n, ["learned", *args, "-o", str(out)], tmp_path)
        assert r.returncode == 0, r.stderr
        got = metadata_of(out)
        assert got["soupkern.learned.uniform_loss"] == want["soupkern.learned.uniform_loss"]
        a = np.array(json.loads(got["soupkern.learned.coefficients"]))
        b = np.array(json.loads(want["soupkern.learned.coefficients"]))
        assert np.abs(a - b).max() <= 1e-5, (a, b)
        assert abs(float(got["soupkern.learned.final_loss"]) - float(want["soupkern.learned.final_loss"])) <= 1e-5
    assert not [p for p in os.listdir(tmp_path) if ".soupkern-" in p]


@pytest.mark.parametrize("n", [2, 3, 4])
def test_each_rank_reads_only_its_shards(inputs: list[Path], tmp_path: Path, n: int) -> None:
    """Every byte range of an input that a rank views, addresses or prefetches (the engine's
    reads; recorded by a private test hook) lies inside the tensors of the shards assigned to
    that rank; together the ranks read every input byte of the soup, and no byte twice."""
    log = tmp_path / "access"
    r = torchrun(n, ["uniform", *map(str, inputs), "--max-shard-size", "40KB", "-o", f"{tmp_path}/soup/"], tmp_path,
                 env={"SOUPKERN_TEST_ACCESS_LOG": str(log)})
    assert r.returncode == 0, r.stderr
    index = json.loads((tmp_path / "soup" / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    sizes = [(tmp_path / "soup" / s).stat().st_size for s in shards]
    owner = assign(sizes, n)  # the same deterministic assignment the soup used
    # each input tensor's byte range in its file
    ranges: dict[str, list[tuple[str, int, int]]] = {}
    for p in inputs:
        with open(p, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        for name, meta in header.items():
            if name != "__metadata__":
                b, e = meta["data_offsets"]
                ranges.setdefault(name, []).append((os.path.realpath(p), 8 + header_len + b, 8 + header_len + e))
    read_by: dict[tuple[str, int], int] = {}  # (file, byte) -> rank, for every byte read
    total = 0
    for rank in range(n):
        allowed = [rg for name, shard in index.items() if owner[shards.index(shard)] == rank for rg in ranges[name]]
        accessed = json.loads(Path(f"{log}.{rank}").read_text())
        assert accessed, f"rank {rank} read nothing"
        bytes_here = set()
        for path, b, e in accessed:
            assert any(os.path.realpath(path) == f and fb <= b and e <= fe for f, fb, fe in allowed), \
                (rank, path, b, e)
            bytes_here.update((os.path.realpath(path), x) for x in range(b, e))
        for key in bytes_here:
            assert read_by.setdefault(key, rank) == rank, f"byte {key} read by ranks {read_by[key]} and {rank}"
        total += len(bytes_here)
        want = sum(fe - fb for _, fb, fe in allowed)
        assert len(bytes_here) == want, (rank, len(bytes_here), want)  # all of its share, nothing else
    assert total == sum(e - b for rgs in ranges.values() for _, b, e in rgs)


@pytest.mark.parametrize("n", [2, 3])
def test_dcp_output_written_by_every_rank(inputs: list[Path], tmp_path: Path, n: int) -> None:
    """`--format dcp` under torchrun: each rank saves the tensors assigned to it (one
    `__RANK_0.distcp` per rank), rank 0 the `.metadata`; loaded in one process (another world
    size) with torch.distributed.checkpoint.load, the tensors equal the single-process soup's."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    one = subprocess.run([sys.executable, "-m", "soupkern", "uniform", *map(str, inputs), "-o",
                          str(tmp_path / "one.safetensors"), "-q"], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    want = load_file(str(tmp_path / "one.safetensors"))
    out = tmp_path / "dcp"
    r = torchrun(n, ["uniform", *map(str, inputs), "--format", "dcp", "-o", f"{out}/"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p for p in os.listdir(out) if p.endswith(".distcp")) == [f"__{i}_0.distcp" for i in range(n)]
    got = {k: torch.empty_like(v) for k, v in want.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(got, checkpoint_id=str(out), no_dist=True)
    assert all(torch.equal(got[k], want[k]) for k in want)
    provenance = json.loads((out / "soupkern_provenance.json").read_text())
    assert provenance["metadata"]["soupkern.world_size"] == str(n)
    assert {*provenance["files"], "soupkern_provenance.json"} == set(os.listdir(out))
    if n == 3:  # more ranks than tensors: a rank with nothing to save still writes its (empty) file
        few = []
        for i in range(2):
            few.append(tmp_path / f"few{i}.safetensors")
            save_file({"a": np.full(5, float(i), np.float32), "b": np.ones(3, np.float32)}, str(few[-1]))
        r = torchrun(3, ["uniform", *map(str, few), "--format", "dcp", "-o", f"{tmp_path}/few/"], tmp_path)
        assert r.returncode == 0, r.stderr
        got = {"a": torch.empty(5), "b": torch.empty(3)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(got, checkpoint_id=str(tmp_path / "few"), no_dist=True)
        assert torch.equal(got["a"], torch.full((5,), 0.5)) and torch.equal(got["b"], torch.ones(3))
    # --force replaces it (every file is the soup's own), at another world size
    r = torchrun(2 if n == 3 else 3, ["uniform", *map(str, inputs), "--format", "dcp", "-o", f"{out}/", "--force"],
                 tmp_path)
    assert r.returncode == 0, r.stderr
    assert not [p for p in os.listdir(tmp_path) if ".soupkern-" in p]


def test_rank_failing_mid_greedy_stops_every_rank(digits_ingredients: list[Path], tmp_path: Path) -> None:  # noqa: F811
    """A rank whose evaluation raises (here the user's metric, on rank 1 at its 5th batch) makes
    every rank exit non-zero well within the timeout; rank 0 names the rank and the cause; the
    previous output is kept and nothing temporary is left."""
    import time

    args = [*map(str, digits_ingredients[:4]), *digits_hooks(tmp_path, 150, 16)]
    (tmp_path / "metric.py").write_text(
        "import os, torch\n"
        "CALLS = [0]\n"
        "def metric(outputs, targets):\n"
        "    CALLS[0] += 1\n"
        "    if os.environ.get('RANK') == '1' and CALLS[0] == 5:\n"
        "        raise RuntimeError('metric exploded on purpose')\n"
        "    return (outputs.argmax(-1) == targets).double()\n")
    out = tmp_path / "g.safetensors"
    out.write_bytes(b"previous soup")
    t0 = time.monotonic()
    r = torchrun(2, ["greedy", *args, "--metric", f"{tmp_path / 'metric.py'}:metric", "-o", str(out), "--force"],
                 tmp_path)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 60
    assert "rank 1 failed evaluating a soup: RuntimeError: metric exploded on purpose" in r.stderr, r.stderr
    assert out.read_bytes() == b"previous soup"
    assert not [p for p in os.listdir(tmp_path) if ".soupkern-" in p]


def test_sigterm_to_rank_0_while_it_writes_the_greedy_soup(digits_ingredients: list[Path], tmp_path: Path) -> None:  # noqa: F811
    """Rank 0 writes the greedy soup in its worker thread (its main thread keeps the heartbeat);
    a SIGTERM, which only the main thread sees, stops that writing at its next chunk: the
    writer's cleanup runs, every rank exits non-zero, the previous output is kept and nothing
    temporary is left (was: the process ended with the temporary folder in place)."""
    import signal
    import time
    import uuid

    mark = uuid.uuid4().hex
    out = tmp_path / "g.safetensors"
    out.write_bytes(b"previous soup")
    args = [*map(str, digits_ingredients[:3]), *digits_hooks(tmp_path, 64, 32), "-o", str(out), "--force"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                             "-m", "soupkern", "greedy", *args], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SOUPKERN_DIST_TIMEOUT": "20", "SOUPKERN_TEST_PAUSE_AT": "writing",
                                 "SOUPKERN_TEST_MARK": mark})
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.strip() == "soupkern-test-pause writing":
                break
        else:
            raise AssertionError("rank 0 never reached the writing point")
        rank0 = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _environ_has(
            int(pid), f"SOUPKERN_TEST_MARK={mark}", "RANK=0")]
        assert len(rank0) == 1, rank0
        assert [p for p in os.listdir(tmp_path) if ".soupkern-tmp" in p]  # the write is under way
        t0 = time.monotonic()
        os.kill(rank0[0], signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) != 0
        assert time.monotonic() - t0 < 30
    finally:
        proc.kill()
    assert "SIGTERM" in rest, rest[-2000:]
    assert out.read_bytes() == b"previous soup"
    assert not [p for p in os.listdir(tmp_path) if ".soupkern-" in p and "lock" not in p]


def _environ_has(pid: int, *entries: str) -> bool:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return all(e.encode() in env for e in entries)


def test_distributed_ensembles_equal_one_process(digits_ingredients: list[Path], tmp_path: Path) -> None:  # noqa: F811
    """logit_ensemble / greedy_ensemble with distributed=True in a 2-rank group: each rank caches
    the outputs of its batches only; the scores (accuracy and loss), the ingredient scores and the
    greedy members equal a single-process run's to the bit, on both ranks; so do the scores of an
    interpolation curve (soup_scores)."""
    r = run_script(tmp_path,
                   "from soupkern.examples import digits\n"
                   "from soupkern.recipes.ensemble import greedy_ensemble, ingredient_outputs, logit_ensemble\n"
                   "val = digits.make_splits(0).val\n"
                   "data = digits.batches(digits.TensorPair(val.x[:150], val.y[:150]), 16)\n"
                   "ings = sys.argv[1:]\n"
                   "for metric in ('accuracy', 'loss'):\n"
                   "    kw = dict(model=digits.make_model, data=data, metric=metric)\n"
                   "    assert 0 < len(ingredient_outputs(ings, distributed=True, **kw).targets) < 150  # its batches\n"
                   "    many, one = greedy_ensemble(ings, distributed=True, **kw), greedy_ensemble(ings, **kw)\n"
                   "    assert (many.members, many.score, many.ingredient_scores) == "
                   "(one.members, one.score, one.ingredient_scores), (metric, many, one)\n"
                   "    assert logit_ensemble(ings, distributed=True, **kw).score == logit_ensemble(ings, **kw).score\n"
                   "    with open(f'ok{dist.get_rank()}.txt', 'a') as f:\n"
                   "        f.write(f'{metric} {len(many.members)}\\n')\n",
                   [*map(str, digits_ingredients[:5])])
    for rank in (0, 1):  # both ranks checked both metrics
        lines = (tmp_path / f"ok{rank}.txt").read_text().splitlines()
        assert [line.split()[0] for line in lines] == ["accuracy", "loss"], r.stdout
        (tmp_path / f"ok{rank}.txt").unlink()
    # the WiSE-FT curve alike (soup_scores over a grid of alphas)
    run_script(tmp_path,
               "from soupkern.analysis import interpolation_curve\n"
               "from soupkern.examples import digits\n"
               "val = digits.make_splits(0).val\n"
               "data = digits.batches(digits.TensorPair(val.x[:150], val.y[:150]), 16)\n"
               "kw = dict(alphas=[0.0, 0.3, 0.5, 1.0])\n"
               "many = interpolation_curve(sys.argv[1], sys.argv[2], digits.make_model(), data, distributed=True, **kw)\n"
               "one = interpolation_curve(sys.argv[1], sys.argv[2], digits.make_model(), data, **kw)\n"
               "assert many.scores == one.scores, (many.scores, one.scores)\n"
               "with open(f'ok{dist.get_rank()}.txt', 'a') as f:\n"
               "    f.write('accuracy\\nloss\\n')\n",
               [*map(str, digits_ingredients[:2])])
    for rank in (0, 1):  # both ranks passed the curve's assertion
        assert (tmp_path / f"ok{rank}.txt").read_text().split() == ["accuracy", "loss"]


@pytest.mark.parametrize("long", [False, True])
def test_a_signal_after_the_commit_reports_the_output(long: bool) -> None:
    """A signal that arrives while the ranks agree on a step whose output is already committed
    (the last gather) reports that output, not "no output was written"."""
    import signal
    import types

    from soupkern.distributed import Group
    from soupkern.errors import Interrupted

    class Dist:
        ReduceOp = types.SimpleNamespace(MIN="min")

        def get_rank(self) -> int:
            return 0

        def get_world_size(self) -> int:
            return 1

        def all_reduce(self, tensor, op=None):  # type: ignore[no-untyped-def]
            return None

        def all_gather_object(self, out, obj):  # type: ignore[no-untyped-def]
            raise Interrupted(signal.SIGTERM)

    report = types.SimpleNamespace(paths=("/out/soup.safetensors",))
    with pytest.raises(Interrupted) as caught:
        Group(Dist()).step(lambda: report, "writing the soup", long=long)
    assert caught.value.committed == ("/out/soup.safetensors",)
