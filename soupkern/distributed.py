"""SPMD souping on torch.distributed: the same soup from N processes (torchrun, Slurm, a Kubernetes
PyTorchJob, Ray Train), each writing the output shards assigned to it.

Protocol (every step is a collective on the default process group; any rank's failure reaches
every rank):

1. every rank opens the ingredients' headers and plans the soup; the statuses are gathered, and
   if any rank failed every rank raises rank 0's error (or the first failing rank's);
2. rank 0 checks the output, takes its lock and creates the temporary folder with every shard
   file and its header (soupkern.io.SoupWriter); the folder's name is broadcast;
3. each rank computes the tensors of its shards (assigned by `assign`: balanced by bytes,
   deterministic) and writes them into those files (soupkern.io.writer.ShardWriter), then checks
   that its inputs did not change;
4. the statuses are gathered; rank 0 writes the index and the model folder's other files and
   commits (the folder is swapped in whole), or, if any rank failed, removes everything; the
   outcome is broadcast.

A rank that dies makes the next collective fail on every other rank (gloo notices a closed
connection at once; otherwise the process group's timeout, 60 s when soupkern initializes it,
`SOUPKERN_DIST_TIMEOUT` seconds to change it). The previous output is then left as it was.
Output tensor bytes equal a single process's soup with the same shard size; the headers differ
only in `soupkern.world_size`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

from soupkern.errors import InputError, SoupkernError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 60.0
HEARTBEAT_S = 2.0
STOP_WAIT_S = 20.0  # how long a signalled rank waits for its writing thread to clean up


class PeerFailed(SoupkernError):
    """Raised on the ranks that did not fail themselves when another rank's step failed; the
    failing rank's error names the cause (rank 0 reports it on the command line)."""

    def __init__(self, message: str, exit_code: int, rank: int, own_rank: int):
        super().__init__(message)
        self.exit_code = exit_code
        self.rank = rank  # the rank that failed
        self.own_rank = own_rank  # the rank raising this


class Group:
    """The default process group as soupkern uses it: rank, world size, object collectives."""

    def __init__(self, dist: Any):
        self.dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def gather(self, obj: object) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self.dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: object) -> Any:
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def step(self, fn: Callable[[], T], what: str, *, long: bool = False) -> T | None:
        """Run `fn` on this rank, then agree: every rank raises if any rank's `fn` raised. Returns
        `fn`'s result on success. `long`: `fn` may run longer than the group's timeout (the soup
        itself): it runs in a thread while this one joins a small all-reduce every HEARTBEAT_S
        seconds, so a rank that dies is noticed within the timeout whoever is still busy."""
        result: T | None = None
        status: tuple[str, str, int] | None = None
        error: BaseException | None = None

        import threading

        finished = threading.Event()  # not Thread.join: a signal interrupting join marks a running thread stopped (3.11)
        cuda = sys.modules.get("torch.cuda")
        gpu = cuda.current_device() if cuda is not None and cuda.is_initialized() else None

        def run() -> None:
            nonlocal result, status, error
            from soupkern.io import atomic

            try:
                if gpu is not None:  # the current CUDA device is per thread: this rank's GPU here too
                    cuda.set_device(gpu)
                result = fn()
            except BaseException as e:  # noqa: BLE001 - reported to every rank, re-raised here
                error = e
                status = (type(e).__name__, str(e), _exit_code(e))
            finally:
                atomic.clear_cancelled()
                finished.set()

        if long:
            import torch

            worker = threading.Thread(target=run, name="soupkern-rank-work", daemon=True)
            worker.start()
            try:
                while True:
                    finished.wait(HEARTBEAT_S)
                    done = torch.tensor([1 if finished.is_set() else 0], dtype=torch.int32)
                    self.dist.all_reduce(done, op=self.dist.ReduceOp.MIN)
                    if int(done.item()) == 1:
                        break
            except BaseException as e:  # a signal (or a dead peer): stop the worker's writing first
                _stop(worker, finished, getattr(e, "signum", None))
                if finished.is_set() and error is None and getattr(e, "committed", None) == ():
                    e.committed = tuple(getattr(result, "paths", ()))  # type: ignore[attr-defined]
                raise
        else:
            try:
                result = fn()
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # noqa: BLE001 - reported to every rank, re-raised here
                error = e
                status = (type(e).__name__, str(e), _exit_code(e))
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise error
        try:
            statuses = self.gather(status)
        except BaseException as e:  # a signal in the agreement after `fn` committed its output: say so
            if error is None and getattr(e, "committed", None) == ():
                e.committed = tuple(getattr(result, "paths", ()))  # type: ignore[attr-defined]
            raise
        failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
        if not failed:
            return result
        if error is not None and (self.rank == 0 or failed[0][0] == self.rank):
            raise error
        rank, (kind, message, code) = failed[0]
        raise PeerFailed(f"rank {rank} failed while {what}: {kind}: {message}", code, rank, self.rank)

    def on_rank_0(self, fn: Callable[[], T], what: str, *, long: bool = False) -> T | None:
        """`fn` on rank 0 alone (writing the output, taking its lock), agreed as `step`: its
        failure is raised on every rank; its result on rank 0, None elsewhere."""
        return self.step(fn if self.rank == 0 else lambda: None, what, long=long)


def _stop(worker: Any, finished: Any, signum: int | None) -> None:
    """Stop a rank's working thread, which signals do not reach: its writer raises Interrupted at
    its next chunk and cleans up (or completes a commit already under way); waited for (the
    thread sets `finished`) up to STOP_WAIT_S. The request is the worker's alone and ends with it."""
    import signal

    from soupkern.io import atomic

    atomic.cancel_thread(worker.ident, signum or signal.SIGTERM)
    finished.wait(STOP_WAIT_S)


def _exit_code(e: BaseException) -> int:
    from soupkern.errors import InputError, OutputError

    return 2 if isinstance(e, (InputError, OutputError)) else 1


def active() -> Group | None:
    """The default process group when torch.distributed is initialized with more than one
    process, else None. Never imports torch: a process that has not imported torch.distributed
    has no process group."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    return Group(dist)


def group_for(distributed: bool) -> Group | None:
    """The process group a `distributed=True` call runs in (None for False); InputError when
    there is none of 2 or more ranks."""
    if not distributed:
        return None
    group = active()
    if group is None:
        raise InputError("distributed=True needs an initialized torch.distributed process group of 2 or more ranks")
    return group


def shard(items: Iterable[T], group: Group | None, part: tuple[int, int] | None = None) -> Iterator[tuple[int, T]]:
    """(index, item) of the items this rank takes: every one without a group, else items
    r, r + W, ... (every rank must iterate `items` in the same order); `part` = (r, W) overrides
    the group's rank and size (a mesh dimension's)."""
    rank, world = part or ((0, 1) if group is None else (group.rank, group.world_size))
    if isinstance(items, Sequence):  # indexed: the other ranks' items are never touched (lazy batches)
        for i in range(rank, len(items), world):
            yield i, items[i]
        return
    for i, item in enumerate(items):
        if i % world == rank:
            yield i, item


@dataclass(frozen=True)
class CandidateMesh:
    """The ranks as a candidates × data grid (torch's DeviceMesh, dimensions "candidate" and
    "data"): a window of soups is spread over the candidate dimension (soup j to candidate rank
    j mod `candidates`), each soup's held-out batches over the data dimension (batches d, d + D,
    ... to data rank d)."""

    candidates: int
    data: int
    candidate_rank: int
    data_rank: int

    def mine(self, count: int) -> list[int]:
        """The soups of a window of `count` this rank scores."""
        return list(range(self.candidate_rank, count, self.candidates))


def candidate_mesh(group: Group, speculative: int, device_type: str) -> CandidateMesh | None:
    """The mesh for windows of `speculative` soups: gcd(W, S) candidate groups (each rank forms
    and holds S/C soups, not S, and reads only their ingredients) of W/C data ranks each; None
    when that is 1 (data parallel only). A collective: every rank must call it."""
    import math

    from torch.distributed.device_mesh import init_device_mesh

    c = math.gcd(group.world_size, speculative)
    if c == 1:
        return None
    key = (device_type, c, group.world_size // c)
    if key not in _MESHES:  # once per process: every mesh creates process groups
        mesh = init_device_mesh(device_type, key[1:], mesh_dim_names=("candidate", "data"))
        _MESHES[key] = CandidateMesh(c, group.world_size // c, mesh.get_local_rank("candidate"),
                                     mesh.get_local_rank("data"))
    return _MESHES[key]


_MESHES: dict[tuple[str, int, int], CandidateMesh] = {}


def in_order(records: list[Any], group: Group | None) -> list[Any]:
    """This rank's (index, ...) records, or under a group every rank's, in index order: sums
    over them then add in the order one process would."""
    return records if group is None else sorted(r for part in group.gather(records) for r in part)


def default_backend() -> str:
    """gloo, plus NCCL for CUDA tensors where this process sees a GPU: torch's per-device form
    "cpu:gloo,cuda:nccl" sends each collective to the backend of its tensors' device (object
    collectives and the heartbeat stay on gloo, on the CPU)."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def _use_local_gpu() -> None:
    """Make GPU LOCAL_RANK this process's current device where there is one (torchrun's
    one-process-per-GPU layout), so `device="cuda"` means each rank's own GPU and NCCL has one
    device per rank."""
    import torch

    try:
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return
    if torch.cuda.is_available() and 0 <= local < torch.cuda.device_count():
        torch.cuda.set_device(local)


def init_from_environment() -> bool:
    """Initialize the default process group from torchrun's environment (WORLD_SIZE > 1, RANK,
    MASTER_ADDR, ...): `default_backend()` (gloo; gloo and NCCL where there are GPUs, each rank on
    GPU LOCAL_RANK), or the backend SOUPKERN_DIST_BACKEND names; the timeout is
    SOUPKERN_DIST_TIMEOUT seconds (default 60), so a dead rank stops every rank within it.
    Returns whether this call initialized it (and so should `shutdown` it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return False
    if world < 2 or "RANK" not in os.environ:
        return False
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return False  # the caller's own group: used, not ours to destroy
    text = os.environ.get("SOUPKERN_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        timeout = float(text)
    except ValueError:
        timeout = float("nan")
    if not (timeout >= 5 * HEARTBEAT_S and timeout < 86_400):
        raise InputError(f"SOUPKERN_DIST_TIMEOUT={text!r}: give seconds, at least {5 * HEARTBEAT_S:g} and under a day")
    backend = os.environ.get("SOUPKERN_DIST_BACKEND") or default_backend()
    _use_local_gpu()
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    except Exception as e:  # noqa: BLE001 - a rendezvous failure has many types
        raise InputError(f"cannot join the process group that WORLD_SIZE={world} and RANK={os.environ['RANK']} describe "
                         f"({str(e).splitlines()[0][:200]}); under torchrun every rank must run the command, and a "
                         "soupkern run outside torchrun must not inherit its environment") from None
    global JOINED
    JOINED = True
    return True


def assign(sizes: Sequence[int], world_size: int) -> list[int]:
    """The rank of each shard: largest first to the least loaded rank (ties: the lower index and
    rank), so loads are balanced by bytes for any world size; the same on every rank."""
    load = [0] * world_size
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


JOINED = False  # whether init_from_environment created this process's process group


def hard_exit(code: int) -> None:
    """End a process that joined a process group from torchrun's environment (`JOINED`) without
    the interpreter's finalization. After `destroy_process_group`, torch can keep the gloo group
    alive (seen after DCP saves); its worker threads then destroy finished work objects that hold
    Python tensors while the interpreter shuts down, and a thread stopped in that decref aborts the
    process ("terminate called without an active exception", exit -6, seen in about one run in
    five). Everything soupkern writes is committed by then; logs and streams are flushed here."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def shutdown() -> None:
    """Destroy the default process group (what `init_from_environment` set up), so the process
    exits cleanly; after a failure, without waiting for ranks that may be gone."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_same_plan(group: Group, digest: str, what: str) -> None:
    """Every rank must have planned the same soup (same output, ingredients as seen from each
    node, coefficients, layout): a rank that sees other files would write another soup's bytes
    into the shards it owns. Raises on every rank when any differs."""
    digests = group.gather(digest)
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise InputError(f"rank {odd[0]} planned a different soup than rank 0 ({what} differ: other arguments, or "
                         "ingredient files that differ between nodes); every rank must soup the same files into the "
                         "same output")
