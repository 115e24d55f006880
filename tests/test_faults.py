"""Fault injection: signals at every step of the commit, killed runs, concurrent writers, write
errors, inputs truncated or rewritten mid-soup, FIFOs and devices. Every test asserts the exact
outcome: which files exist, their bytes, the exit code and the message.

Signals are sent at named points of the commit through the writer's private test hook
($SOUPKERN_TEST_PAUSE_AT: the process announces the point on stderr and waits there), so the
tests are deterministic on a loaded machine.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import pytest
from safetensors.numpy import load_file, save_file

import soupkern
from soupkern.io import atomic

SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
SIGNAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


def ingredients(folder: Path, k: int = 2, n: int = 1 << 16, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(k):
        p = folder / f"ing{i}.safetensors"
        save_file({"a": rng.standard_normal(n).astype(np.float32), "b": rng.standard_normal(n).astype(np.float32)},
                  os.fspath(p))
        paths.append(p)
    return paths


def expected_mean(paths: list[Path]) -> dict[str, np.ndarray]:
    loaded = [load_file(os.fspath(p)) for p in paths]
    return {n: (sum(d[n].astype(np.float64) for d in loaded) / len(loaded)).astype(np.float32) for n in loaded[0]}


def digest(path: Path) -> str:
    if path.is_dir():
        return "|".join(f"{f}:{digest(path / f)}" for f in sorted(os.listdir(path)))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def artifacts(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".soupkern-" in n)


def soup_reads_back(out: Path, paths: list[Path]) -> None:
    got = {}
    for f in [out] if out.is_file() else sorted(out.glob("*.safetensors")):
        got.update(load_file(os.fspath(f)))
    want = expected_mean(paths)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


class Run:
    """`python -m soupkern ARGS` in a subprocess, paused at a named point of the commit."""

    def __init__(self, args: list[str], pause: str | None = None, env: dict[str, str] | None = None,
                 resume: Path | None = None):
        e = {**os.environ, **(env or {})}
        if pause:
            e["SOUPKERN_TEST_PAUSE_AT"] = pause
        if resume:
            e["SOUPKERN_TEST_RESUME"] = os.fspath(resume)
        self.proc = subprocess.Popen([sys.executable, "-m", "soupkern", *args], env=e,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.early: list[str] = []
        if pause:
            self.wait_for(pause)

    def wait_for(self, point: str) -> None:
        assert self.proc.stderr is not None
        while True:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError(f"exited before reaching '{point}': {self.early}, rc={self.proc.wait()}")
            if line.strip() == f"soupkern-test-pause {point}":
                return
            self.early.append(line)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def finish(self, timeout: float = 60) -> tuple[int, list[str]]:
        _, err = self.proc.communicate(timeout=timeout)
        lines = [ln for ln in self.early + err.splitlines() if ln.strip()]
        return self.proc.returncode, lines


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, list[str]]:
    r = subprocess.run([sys.executable, "-m", "soupkern", *args], env={**os.environ, **(env or {})},
                       capture_output=True, text=True, timeout=timeout)
    return r.returncode, [ln for ln in r.stderr.splitlines() if ln.strip()]


def uniform_args(paths: list[Path], out: Path | str, *extra: str) -> list[str]:
    return ["uniform", *map(os.fspath, paths), "-o", os.fspath(out), "-q", *extra]


# ---------------------------------------------------------------------------------------------
# signals at every step of the commit

@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: SIGNAMES[s])
@pytest.mark.parametrize("sharded", [False, True], ids=["file", "sharded"])
@pytest.mark.parametrize("previous", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize("point", ["writing", "before-commit"])
def test_signal_before_the_commit_changes_nothing(tmp_path, sig, sharded, previous, point):
    paths = ingredients(tmp_path / "in")
    out = tmp_path / ("out" if sharded else "out.safetensors")
    extra = ["--max-shard-size", "300KB"] if sharded else []
    if previous:
        soupkern.weighted_soup(paths, [1.0, 0.0], out, max_shard_size=300_000 if sharded else None)
        extra.append("--force")
    before = digest(out) if previous else None
    run = Run(uniform_args(paths, out, *extra), pause=point)
    run.signal(sig)
    rc, lines = run.finish()
    assert rc == 128 + sig, lines
    assert lines == [f"soupkern: stopped by {SIGNAMES[sig]}; no output was written or replaced"]
    assert (digest(out) if out.exists() else None) == before
    assert artifacts(tmp_path) == []


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: SIGNAMES[s])
@pytest.mark.parametrize("sharded", [False, True], ids=["file", "sharded"])
@pytest.mark.parametrize("point", ["commit", "committed"])
def test_signal_during_the_commit_completes_it(tmp_path, sig, sharded, point):
    """A signal that lands in the commit's renames is held until they are done: the output is
    the complete new soup (never nothing: the data loss of Ctrl-C after the rename is gone)."""
    paths = ingredients(tmp_path / "in")
    out = tmp_path / ("out" if sharded else "out.safetensors")
    extra = ["--max-shard-size", "300KB"] if sharded else []
    soupkern.weighted_soup(paths, [1.0, 0.0], out, max_shard_size=300_000 if sharded else None)
    run = Run(uniform_args(paths, out, *extra, "--force"), pause=point)
    run.signal(sig)
    rc, lines = run.finish()
    assert rc == 128 + sig, lines
    assert len(lines) == 1 and lines[0].startswith(f"soupkern: stopped by {SIGNAMES[sig]}; the output was already complete")
    soup_reads_back(out, paths)
    assert artifacts(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_between_the_two_renames_of_the_fallback_swap(tmp_path, sig):
    """Without renameat2, a folder is swapped with two renames; a signal between them is held."""
    paths = ingredients(tmp_path / "in")
    out = tmp_path / "out"
    soupkern.weighted_soup(paths, [1.0, 0.0], out, max_shard_size=300_000)
    run = Run(uniform_args(paths, out, "--max-shard-size", "300KB", "--force"), pause="moved-aside",
              env={"SOUPKERN_TEST_NO_RENAMEAT2": "1"})
    run.signal(sig)
    rc, lines = run.finish()
    assert rc == 128 + sig and "already complete" in lines[0], lines
    soup_reads_back(out, paths)
    assert artifacts(tmp_path) == []


def test_keyboard_interrupt_right_after_the_rename_in_process(tmp_path, monkeypatch):
    """The reported data loss, in process: KeyboardInterrupt after the final rename of an
    overwrite. The new soup must be in place and the exception must say so."""
    paths = ingredients(tmp_path / "in")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old soup")
    real = atomic.pause_point

    def interrupt_after_rename(point, pending=None):
        real(point, pending)
        if point == "committed":
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(atomic, "pause_point", interrupt_after_rename)
    with pytest.raises(KeyboardInterrupt) as ei:
        soupkern.uniform_soup(paths, out, overwrite=True)
    assert isinstance(ei.value, soupkern.Interrupted) and ei.value.committed == (out,)
    soup_reads_back(out, paths)
    assert artifacts(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# killed runs: recognizable leftovers, removed (or repaired) by the next run, never a live one's

def test_killed_run_leftovers_are_removed_by_the_next_run(tmp_path):
    paths = ingredients(tmp_path / "in")
    out = tmp_path / "out.safetensors"
    run = Run(uniform_args(paths, out), pause="writing")
    run.proc.kill()
    run.proc.wait()
    left = artifacts(tmp_path)
    assert len(left) == 2 and any(n.endswith(".soupkern-lock") for n in left), left
    assert not out.exists()
    rc, lines = run_cli(uniform_args(paths, out))
    assert rc == 0, lines
    assert sum("notice: removed" in ln for ln in lines) == 1, lines
    soup_reads_back(out, paths)
    assert artifacts(tmp_path) == []


def test_killed_between_the_two_renames_is_repaired_by_the_next_run(tmp_path):
    paths = ingredients(tmp_path / "in")
    out = tmp_path / "out"
    soupkern.weighted_soup(paths, [1.0, 0.0], out, max_shard_size=300_000)
    before = digest(out)
    run = Run(uniform_args(paths, out, "--max-shard-size", "300KB", "--force"), pause="moved-aside",
              env={"SOUPKERN_TEST_NO_RENAMEAT2": "1"})
    run.proc.kill()
    run.proc.wait()
    assert not out.exists()  # the one window of the fallback swap
    # the next soupkern run into this folder, for another output, puts the old soup back
    rc, lines = run_cli(uniform_args(paths, tmp_path / "other.safetensors"))
    assert rc == 0, lines
    assert any("restored" in ln for ln in lines), lines
    assert digest(out) == before
    assert artifacts(tmp_path) == []


def test_a_live_runs_files_are_never_removed(tmp_path):
    paths = ingredients(tmp_path / "in")
    out1, out2 = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    resume = tmp_path / "resume"
    live = Run(uniform_args(paths, out1), pause="writing", resume=resume)
    mine = artifacts(tmp_path)
    assert len(mine) == 2
    rc, lines = run_cli(uniform_args(paths, out2))
    assert rc == 0 and not any("notice" in ln for ln in lines), lines
    assert artifacts(tmp_path) == mine
    resume.touch()
    rc, lines = live.finish()
    assert rc == 0, lines
    soup_reads_back(out1, paths)
    soup_reads_back(out2, paths)
    assert artifacts(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# concurrent writers

@pytest.mark.parametrize("sharded", [False, True], ids=["file", "sharded"])
@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
@pytest.mark.parametrize("writers", [2, 3])
def test_concurrent_writers_one_succeeds(tmp_path, sharded, force, writers):
    paths = ingredients(tmp_path / "in")
    out = tmp_path / ("out" if sharded else "out.safetensors")
    extra = (["--max-shard-size", "300KB"] if sharded else []) + (["--force"] if force else [])
    resume = tmp_path / "resume"
    first = Run(uniform_args(paths, out, *extra), pause="writing", resume=resume)
    others = [run_cli(uniform_args(paths, out, *extra)) for _ in range(writers - 1)]
    for rc, lines in others:
        assert rc == 2 and len(lines) == 1, lines
        assert "another soupkern run (pid" in lines[0] and "is writing this output" in lines[0], lines
    resume.touch()
    rc, lines = first.finish()
    assert rc == 0, lines
    soup_reads_back(out, paths)
    assert artifacts(tmp_path) == []


def test_racing_writers_without_force_never_both_succeed(tmp_path):
    paths = ingredients(tmp_path / "in", n=1 << 10)
    for trial in range(4):
        out = tmp_path / f"out{trial}.safetensors"
        procs = [subprocess.Popen([sys.executable, "-m", "soupkern", *uniform_args(paths, out)],
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
        results = [(p.wait(60), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
        assert sorted(rc for rc, _ in results) == [0, 2, 2], results
        soup_reads_back(out, paths)
    assert artifacts(tmp_path) == []


def test_output_appearing_during_the_run_is_not_replaced(tmp_path):
    paths = ingredients(tmp_path / "in")
    out = tmp_path / "out.safetensors"
    run = Run(uniform_args(paths, out), pause="before-commit", resume=tmp_path / "resume")
    out.write_bytes(b"someone else's file")
    (tmp_path / "resume").touch()
    rc, lines = run.finish()
    assert rc == 2 and lines == [f"soupkern: error: {out}: already exists; pass overwrite=True (--force) to replace it"]
    assert out.read_bytes() == b"someone else's file"
    assert artifacts(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# write errors

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("where", ["pwrite", "fsync"])
def test_write_errors_leave_the_previous_output(tmp_path, monkeypatch, code, where):
    paths = ingredients(tmp_path / "in")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old soup")
    real = getattr(os, where)
    calls = []

    def failing(*a):
        calls.append(1)
        if len(calls) == (2 if where == "pwrite" else 1):
            raise OSError(code, os.strerror(code))
        return real(*a)

    monkeypatch.setattr(soupkern.io.writer.os, where, failing)
    with pytest.raises(soupkern.OutputError) as ei:
        soupkern.uniform_soup(paths, out, overwrite=True, fsync=True, budget_bytes=1 << 20)
    assert str(ei.value) == f"{out}: writing the output failed ({os.strerror(code)}); nothing was replaced"
    assert ei.value.errno == code
    assert out.read_bytes() == b"old soup"
    assert artifacts(tmp_path) == []


def test_fsync_syncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    paths = ingredients(tmp_path / "in")
    synced = []
    monkeypatch.setattr(atomic, "fsync_dir", lambda folder: synced.append(Path(folder)))
    soupkern.uniform_soup(paths, tmp_path / "a.safetensors", fsync=True)
    assert synced == [tmp_path]
    synced.clear()
    soupkern.uniform_soup(paths, tmp_path / "b", fsync=True, max_shard_size=300_000)
    assert synced[-1] == tmp_path and len(synced) == 2  # the new folder, then its parent


# ---------------------------------------------------------------------------------------------
# inputs changed under the soup

@pytest.mark.parametrize("form,reads", [("safetensors", "map"), ("safetensors", "copy"), ("zip", "map"),
                                        ("zip", "copy"), ("legacy", "map")])
def test_input_truncated_mid_soup_is_an_error_not_a_crash(tmp_path, form, reads):
    """A truncation while the soup runs is exit 2 naming the file, not SIGBUS; .pt inputs (both
    torch.save formats) are served from the same guarded mapping as safetensors files; copied
    reads (pread) see it too."""
    paths = ingredients(tmp_path / "in", n=1 << 18)
    if form != "safetensors":
        for i, st in enumerate(paths):
            paths[i] = st.with_suffix(".pt")
            torch.save({k: torch.from_numpy(v) for k, v in load_file(os.fspath(st)).items()}, paths[i],
                       _use_new_zipfile_serialization=form == "zip")
            st.unlink()
    out = tmp_path / "out.safetensors"
    resume = tmp_path / "resume"
    run = Run(uniform_args(paths, out, "--budget", "1MiB"), pause="writing", resume=resume,
              env={"SOUPKERN_READS": reads})
    os.truncate(paths[1], 4096)
    resume.touch()
    rc, lines = run.finish()
    assert rc == 2, (rc, lines)  # not -SIGBUS
    assert lines == [f"soupkern: error: {paths[1]}: was truncated by another process while being read; "
                     f"the soup was not written (rerun once the file is stable)"], lines
    assert not out.exists()
    assert artifacts(tmp_path) == []


@pytest.mark.parametrize("reads", ["map", "copy"])
def test_input_rewritten_in_place_mid_soup_is_an_error(tmp_path, reads):
    paths = ingredients(tmp_path / "in")
    out = tmp_path / "out.safetensors"
    resume = tmp_path / "resume"
    run = Run(uniform_args(paths, out), pause="writing", resume=resume, env={"SOUPKERN_READS": reads})
    time.sleep(0.01)  # a distinct mtime even on coarse-grained clocks
    with open(paths[0], "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    resume.touch()
    rc, lines = run.finish()
    assert rc == 2 and lines == [f"soupkern: error: {paths[0]}: was modified by another process while being read; "
                                 f"the soup was not written (rerun once the file is stable)"], lines
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# FIFOs, devices, symlinks

def test_fifo_input_is_refused_without_blocking(tmp_path):
    paths = ingredients(tmp_path / "in")
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    rc, lines = run_cli(uniform_args([paths[0], fifo], tmp_path / "o.safetensors"), timeout=20)
    assert rc == 2 and lines == [f"soupkern: error: {fifo}: is a FIFO, not a regular file; soupkern reads only regular files"]


def test_fifo_shard_named_by_an_index_is_refused_without_blocking(tmp_path):
    folder = tmp_path / "sharded"
    soupkern.uniform_soup(ingredients(tmp_path / "in"), folder, max_shard_size=300_000)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    rc, lines = run_cli(["inspect", os.fspath(folder)], timeout=20)
    assert rc == 2 and lines == [f"soupkern: error: {shard}: is a FIFO, not a regular file; soupkern reads only regular files"]


def _char_device(path: Path) -> Path:
    try:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # the null device
    except PermissionError:
        pytest.skip("creating a device node needs root")
    return path


@pytest.mark.parametrize("kind", ["fifo", "chardev", "symlink"])
@pytest.mark.parametrize("force", [False, True])
def test_non_regular_outputs_are_refused_never_replaced(tmp_path, kind, force):
    paths = ingredients(tmp_path / "in")
    out = tmp_path / "out.safetensors"
    if kind == "fifo":
        os.mkfifo(out)
        what = "a FIFO"
    elif kind == "chardev":
        _char_device(out)
        what = "a character device"
    else:
        (tmp_path / "real.safetensors").write_bytes(b"x")
        out.symlink_to(tmp_path / "real.safetensors")
        what = "a symbolic link"
    before = os.lstat(out)
    rc, lines = run_cli(uniform_args(paths, out, *(["--force"] if force else [])))
    assert rc == 2 and lines == [f"soupkern: error: {out}: is {what}, not a regular file; soupkern never replaces it"]
    after = os.lstat(out)
    assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev)
    assert artifacts(tmp_path) == []


def test_force_refuses_a_folder_soupkern_did_not_write(tmp_path):
    paths = ingredients(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{}")
    rc, lines = run_cli(uniform_args(paths, out, "--max-shard-size", "300KB", "--force"))
    assert rc == 2 and lines == [f"soupkern: error: {out}: holds 2 file(s) soupkern did not write (config.json, notes.txt); "
                                 f"replacing the folder would lose them, so it is refused: choose another output folder"]
    assert sorted(os.listdir(out)) == ["config.json", "notes.txt"]
    # a folder soupkern wrote is replaced whole; a file added to it afterwards blocks that
    soupkern.uniform_soup(paths, tmp_path / "soup", max_shard_size=300_000)
    assert run_cli(uniform_args(paths, tmp_path / "soup", "--force"))[0] == 0
    assert os.listdir(tmp_path / "soup") == ["model.safetensors"]
    (tmp_path / "soup" / "README.md").write_text("my notes")
    rc, lines = run_cli(uniform_args(paths, tmp_path / "soup", "--force"))
    assert rc == 2 and "README.md" in lines[0], lines


# ---------------------------------------------------------------------------------------------
# found by a hostile review

def test_fallback_swap_never_loses_the_old_folder_when_the_target_reappears(tmp_path):
    """A process recreates the target between the two renames of the fallback swap: the commit
    fails, the previous soup is kept (never deleted by this run or the next one)."""
    paths = ingredients(tmp_path / "in")
    out = tmp_path / "out"
    soupkern.weighted_soup(paths, [1.0, 0.0], out, max_shard_size=300_000)
    before = digest(out)
    resume = tmp_path / "resume"
    run = Run(uniform_args(paths, out, "--max-shard-size", "300KB", "--force"), pause="moved-aside",
              env={"SOUPKERN_TEST_NO_RENAMEAT2": "1"}, resume=resume)
    out.mkdir()
    (out / "notes.txt").write_text("someone else's")
    resume.touch()
    rc, lines = run.finish()
    assert rc == 2 and "the previous output is kept at" in lines[0], lines
    kept = [tmp_path / n for n in artifacts(tmp_path) if ".soupkern-old-" in n]
    assert len(kept) == 1 and digest(kept[0]) == before
    rc, lines = run_cli(uniform_args(paths, tmp_path / "other.safetensors"))
    assert rc == 0 and not any("removed" in ln and ".soupkern-old-" in ln for ln in lines), lines
    assert kept[0].exists() and digest(kept[0]) == before


def test_a_refused_writer_restores_the_signal_handlers(tmp_path):
    paths = ingredients(tmp_path / "in")
    out = tmp_path / "out.safetensors"
    resume = tmp_path / "resume"
    live = Run(uniform_args(paths, out), pause="writing", resume=resume)
    handlers = {s: signal.getsignal(s) for s in SIGNALS}
    with pytest.raises(soupkern.OutputError, match="another soupkern run"):
        soupkern.uniform_soup(paths, out)
    assert {s: signal.getsignal(s) for s in SIGNALS} == handlers
    resume.touch()
    assert live.finish()[0] == 0


@pytest.mark.parametrize("first,second", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGHUP)])
def test_a_second_signal_cannot_cut_the_cleanup_short(tmp_path, first, second):
    paths = ingredients(tmp_path / "in")
    for trial in range(5):
        out = tmp_path / f"out{trial}.safetensors"
        run = Run(uniform_args(paths, out), pause="writing")
        run.signal(first)
        run.signal(second)
        rc, lines = run.finish()
        # both may be pending when the process next runs; the kernel delivers the lower number first
        got = signal.Signals(rc - 128)
        assert got in (first, second)
        assert lines == [f"soupkern: stopped by {SIGNAMES[got]}; no output was written or replaced"]
        assert artifacts(tmp_path) == [] and not out.exists()


def test_replacing_keeps_the_permissions(tmp_path):
    paths = ingredients(tmp_path / "in")
    f = tmp_path / "f.safetensors"
    soupkern.uniform_soup(paths, f)
    os.chmod(f, 0o600)
    soupkern.uniform_soup(paths, f, overwrite=True)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o700)
    soupkern.uniform_soup(paths, os.fspath(d) + "/")
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_a_mount_point_is_refused_up_front(tmp_path, monkeypatch):
    paths = ingredients(tmp_path / "in")
    (tmp_path / "vol").mkdir()
    real = os.path.ismount
    monkeypatch.setattr(soupkern.io.writer.os.path, "ismount", lambda p: Path(p) == tmp_path / "vol" or real(p))
    with pytest.raises(soupkern.OutputError, match="is a mount point"):
        soupkern.uniform_soup(paths, os.fspath(tmp_path / "vol") + "/")
    assert artifacts(tmp_path) == []


def test_sweep_creates_no_lock_files_for_other_outputs(tmp_path):
    paths = ingredients(tmp_path / "in")
    stray = tmp_path / ".x.safetensors.soupkern-tmp-0123abcd"
    stray.write_bytes(b"?")  # an artifact without a lock file: not provably dead, left alone
    soupkern.uniform_soup(paths, tmp_path / "o.safetensors")
    assert artifacts(tmp_path) == [stray.name]


def test_greedy_reserves_its_output_before_any_evaluation(tmp_path):
    paths = ingredients(tmp_path / "in")
    out = tmp_path / "g.safetensors"
    resume = tmp_path / "resume"
    live = Run(uniform_args(paths, out), pause="writing", resume=resume)
    calls = []
    with pytest.raises(soupkern.OutputError, match="another soupkern run"):
        soupkern.greedy_soup(paths, out, model=lambda: torch.nn.Linear(2, 2), score=lambda m: calls.append(1) or 1.0)
    assert calls == []
    resume.touch()
    assert live.finish()[0] == 0


def test_sigterm_during_greedy_evaluation_gives_the_documented_exit(tmp_path):
    paths = ingredients(tmp_path / "in")
    (tmp_path / "slow.py").write_text("import sys, time\n"
                                      "def score(state):\n"
                                      "    print('soupkern-test-pause scoring', file=sys.stderr, flush=True)\n"
                                      "    time.sleep(60)\n"
                                      "    return 1.0\n")
    out = tmp_path / "g.safetensors"
    run = Run(["greedy", *map(os.fspath, paths), "--score", f"{tmp_path / 'slow.py'}:score", "-o", os.fspath(out)])
    run.wait_for("scoring")
    run.signal(signal.SIGTERM)
    rc, lines = run.finish()
    assert rc == 128 + signal.SIGTERM
    assert lines[-1] == "soupkern: stopped by SIGTERM; no output was written or replaced", lines
    assert not out.exists() and artifacts(tmp_path) == []


def test_chmod_of_an_input_mid_soup_is_not_a_change(tmp_path):
    paths = ingredients(tmp_path / "in")
    out = tmp_path / "out.safetensors"
    resume = tmp_path / "resume"
    run = Run(uniform_args(paths, out), pause="writing", resume=resume)
    os.chmod(paths[1], 0o640)
    os.link(paths[1], tmp_path / "hardlink.safetensors")
    resume.touch()
    rc, lines = run.finish()
    assert rc == 0, lines
    soup_reads_back(out, paths)


def test_closed_stderr_does_not_fail_a_finished_soup(tmp_path):
    paths = ingredients(tmp_path / "in")
    out = tmp_path / "out.safetensors"
    r = subprocess.run([sys.executable, "-m", "soupkern", *uniform_args(paths, out)[:-1]], stderr=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, timeout=60, pass_fds=())
    assert r.returncode == 0
    r = subprocess.run(f"{sys.executable} -m soupkern uniform {paths[0]} {paths[1]} -o {tmp_path / 'b.safetensors'} 2>&-",
                       shell=True, timeout=60)
    assert r.returncode == 0
    soup_reads_back(tmp_path / "b.safetensors", paths)
