"""Every option of every `soupkern` subcommand, given a wrong value and a wrong type, exits with
status 2 and exactly one line on stderr (no traceback, no usage block), before any work: no
output or temporary file appears and no evaluation runs. The table must cover every option the
parser has, so a new option without a case here fails the test."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from soupkern.cli import build_parser

FLAGS = {"--allow-config-mismatch", "--intersection", "--force", "--fsync", "-q", "--quiet", "--json", "--fast"}
# option -> (wrong value, wrong type); flags get "=yes" instead
VALUES = {
    "-o": ("missing_folder/x.safetensors", ""),
    "--output": ("missing_folder/x.safetensors", ""),
    "--dtype": ("int8", "3"),
    "--max-shard-size": ("0", "abc"),
    "--budget": ("1KB", "abc"),
    "--backend": ("nope", "3"),
    "--device": ("nonsense", "3"),
    "--score": ("no_such_module_xyz:fn", "no-colon"),
    "--model": ("no_such_module_xyz:fn", "no-colon"),
    "--data": ("no_such_module_xyz:fn", "no-colon"),
    "--tie": ("maybe", "1"),
    "--speculative": ("0", "two"),
    "--batch-size": ("0", "many"),
    "--sort": ("random", "1"),
    "--mode": ("by_everything", "1"),
    "--epochs": ("-1", "x"),
    "--lr": ("-1", "x"),
    "--seed": ("-1", "x"),
    "--base": ("missing.safetensors", ""),  # analyze and weighted
    "--workdir": ("FILE", ""),
    "--state-dict-key": ("state_dict_ema", ""),
    "--copy-from": ("missing_dir", "FILE"),
    "--int-policy": ("median", ""),
    "--format": ("npz", ""),
    "--lora": ("sum", ""),
    "--rename": ("=model.", "no-equals"),
    "--alphas": ("1:0:0.1", "x"),
    "--metric": ("f1", ""),
    "--alpha": ("nan", "x"),
    "--plot": ("FILE", ""),  # safetensors inputs hold no container to pick from
}
SKIP = {"-h", "--help", "--version"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        save_file({"w": rng.standard_normal((4, 3)).astype(np.float32)}, os.fspath(tmp / f"{name}.safetensors"))
    calls = tmp / "calls.txt"
    (tmp / "hooks.py").write_text(
        "import torch\n"
        f"CALLS = {os.fspath(calls)!r}\n"
        "def score(state):\n"
        "    open(CALLS, 'a').write('x')\n"
        "    return 1.0\n"
        "def factory():\n"
        "    open(CALLS, 'a').write('m')\n"
        "    return torch.nn.Linear(3, 4, bias=False)\n"
        "def data():\n"
        "    open(CALLS, 'a').write('d')\n"
        "    return [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))]\n")
    (tmp / "a_file").write_text("not a folder")
    return tmp


def base_args(command: str, tmp: Path) -> list[str]:
    a, b = os.fspath(tmp / "a.safetensors"), os.fspath(tmp / "b.safetensors")
    out = ["-o", os.fspath(tmp / "out" / "soup.safetensors")]
    hooks = os.fspath(tmp / "hooks.py")
    return {
        "uniform": ["uniform", a, b, *out],
        "weighted": ["weighted", f"{a}:0.5", f"{b}:0.5", *out],
        "inspect": ["inspect", a],
        "backends": ["backends"],
        "greedy": ["greedy", a, b, "--score", f"{hooks}:score", *out],
        "learned": ["learned", a, b, "--model", f"{hooks}:factory", "--data", f"{hooks}:data", *out],
        "analyze": ["analyze", a, b],
        "interpolate": ["interpolate", a, b, "--model", f"{hooks}:factory", "--data", f"{hooks}:data", *out],
        "demo": ["demo", "--fast", "--workdir", os.fspath(tmp / "demo_never_runs" / "x")],
    }[command]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def cases() -> list[tuple[str, str, str]]:
    out = []
    for command, sub in subcommands().items():
        for action in sub._actions:
            for opt in action.option_strings:
                if opt in SKIP:
                    continue
                if opt in FLAGS:
                    out.append((command, opt, f"{opt}=yes"))
                elif opt in VALUES:
                    out += [(command, opt, v) for v in VALUES[opt]]
                else:
                    out.append((command, opt, "UNCOVERED"))
    return out


def replace_option(args: list[str], opt: str, value: str, tmp: Path) -> list[str]:
    if value == "FILE":
        value = os.fspath(tmp / "a_file" / "sub")
    if value.startswith(opt + "="):  # a flag given a value
        return [*args, value]
    aliases = {"-o": ("-o", "--output"), "--output": ("-o", "--output")}.get(opt, (opt,))
    out = list(args)
    for i, x in enumerate(out):
        if x in aliases:
            out[i + 1] = value
            return out
    return [*out, opt, value]


@pytest.mark.parametrize("command,opt,value", cases())
def test_wrong_option_exits_2_with_one_line(setup, command, opt, value):
    assert value != "UNCOVERED", f"`soupkern {command} {opt}` has no wrong-value case in this test"
    tmp = setup
    (tmp / "calls.txt").unlink(missing_ok=True)
    args = replace_option(base_args(command, tmp), opt, value, tmp)
    if command == "greedy" and opt in ("--model",):
        args = [*args]  # --model with a wrong value: the error comes before any evaluation
    r = subprocess.run([sys.executable, "-m", "soupkern", *args], capture_output=True, text=True, timeout=120,
                       cwd=tmp)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (args, r.returncode, r.stderr)
    assert len(lines) == 1, (args, r.stderr)
    assert lines[0].startswith("soupkern"), lines
    assert r.stdout == ""
    assert not (tmp / "out").exists() or not os.listdir(tmp / "out")
    assert not [n for n in os.listdir(tmp) if ".soupkern-" in n]
    calls = (tmp / "calls.txt").read_text() if (tmp / "calls.txt").exists() else ""
    assert "x" not in calls, f"an evaluation ran before the bad option was refused: {args}"


@pytest.mark.parametrize("bad", [
    ["uniform", "A", "-o", "O"],                      # ingredient missing
    ["uniform", "DIR", "-o", "O"],                    # a folder without checkpoints
    ["weighted", "A", "-o", "O"],                     # no coefficient
    ["weighted", "A:1e39", "B:1", "-o", "O"],         # finite in fp64, overflows fp32
    ["weighted", "A:nan", "B:1", "-o", "O"],
    ["inspect", "A"],
    ["uniform", "B", "B", "-o", "B", "--force"],      # output is an input
])
def test_wrong_positional_arguments(setup, bad):
    tmp = setup
    (tmp / "emptydir").mkdir(exist_ok=True)
    sub = {"A": os.fspath(tmp / "missing.safetensors"), "B": os.fspath(tmp / "b.safetensors"),
           "DIR": os.fspath(tmp / "emptydir"), "O": os.fspath(tmp / "o.safetensors")}
    args = [sub.get(x.split(":")[0], x.split(":")[0]) + (":" + x.split(":")[1] if ":" in x else "") for x in bad]
    before = (tmp / "b.safetensors").read_bytes()
    r = subprocess.run([sys.executable, "-m", "soupkern", *args], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("soupkern: error: "), (args, r.stderr)
    assert not (tmp / "o.safetensors").exists()
    assert (tmp / "b.safetensors").read_bytes() == before


def test_greedy_refuses_a_bad_backend_before_any_evaluation(setup):
    tmp = setup
    (tmp / "calls.txt").unlink(missing_ok=True)
    args = [*base_args("greedy", tmp), "--backend", "nope"]
    r = subprocess.run([sys.executable, "-m", "soupkern", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "soupkern: error: unknown backend 'nope' (known: cpp, torch, cuda, triton)"
    assert not (tmp / "calls.txt").exists()


def test_inspect_into_a_closed_pipe_is_quiet(setup):
    tmp = setup
    r = subprocess.run(f"{sys.executable} -m soupkern inspect {tmp / 'a.safetensors'} --json | head -c 1",
                       shell=True, capture_output=True, text=True, timeout=60)
    assert r.stdout == "{" and r.stderr == ""
