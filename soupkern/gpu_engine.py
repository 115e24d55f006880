"""Host-to-device streaming soups: files larger than GPU memory, through a ring of pinned buffers.

The streamer is an executor of the engine's work items (soupkern/engine.py): `plan_items` gives
one item per device-computable tensor, with that tensor's sources, coefficients and divisor, and
`batches` packs the items in order into batches that fill one slot of `SLOTS` equal slots
(`budget_bytes` of device memory in all, and as much pinned host memory), cutting an item where
the rest of a slot cannot hold it. Small tensors share a batch, so one multi-tensor launch covers
many of them (one launch per distinct coefficient vector: per-tensor coefficients work here too);
a large tensor is split over batches. A slot's buffer holds the batch's inputs from its start
and, for file output, its outputs from its end. For each batch, in slot s:

    host:     copy the inputs from the memory-mapped files into pinned slot s (`engine.run`:
              multi-threaded memcpy; mapped pages released after); then, S batches later, the
              outputs from pinned slot s into the writer's staging window (the same SoupWriter
              as the CPU path)
    copy-in:  pinned -> device slot s                      (waits until slot s's kernel of
                                                            the batch before is done)
    compute:  multi_weighted_sum over the batch            (waits for the copy-in, and for
                                                            the copy-out of the batch before)
    copy-out: device -> pinned slot s (file output only)   (waits for the kernel)

Copies in, kernels and copies out run on three CUDA streams ordered by events, so while the host
fills slot s the GPU copies, computes and writes back the other slots; the host waits only when
it needs slot s again. Device memory: budget_bytes plus, for an in-memory result, the result.

On a CPU device (tests; Triton interpreter or torch kernels) the same code runs with plain
buffers and no streams. Tensors that the device kernels do not take (F64, or integer tensors
that are copied rather than averaged) are computed on the host by the host backend.
"""

from __future__ import annotations

import importlib
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from soupkern.engine import WorkItem, execute, fill_tensor, plan_items, run
from soupkern.errors import InputError
from soupkern.io import SoupWriter, dtype_itemsize
from soupkern.io.buffers import Bytes
from soupkern.plan import SoupPlan, TensorPlan

if TYPE_CHECKING:
    import torch

    from soupkern.backends import Backend
    from soupkern.backends.device import DeviceKernels

SLOTS = 3
ALIGN = 64  # byte alignment of every chunk in a slot (16 is what 16-byte vector accesses need)
DEFAULT_DEVICE_BUDGET_BYTES = 1 << 30
DEVICE_DTYPES = ("F32", "F16", "BF16")
_PARALLEL_COPY_BYTES = 1 << 20  # below this a plain numpy copy beats starting threads
Progress = Callable[[int], None]


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def on_device(tp: TensorPlan) -> bool:
    """Whether the device kernels compute this tensor (averaged, every dtype fp32/fp16/bf16)."""
    return tp.average and tp.out.dtype in DEVICE_DTYPES and all(i.dtype in DEVICE_DTYPES for _, i in tp.sources)


@dataclass(frozen=True)
class Chunk:
    """A work item placed in a slot: its inputs at `in_offsets` (one per source), its output at
    `out_offset` (-1 when the output goes straight into a device tensor)."""

    item: WorkItem
    in_offsets: tuple[int, ...]
    out_offset: int


@dataclass(frozen=True)
class Batch:
    chunks: tuple[Chunk, ...]
    in_bytes: int  # the inputs fill slot bytes [0, in_bytes)
    out_begin: int  # the outputs fill slot bytes [out_begin, slot size)


def batches(items: Iterable[WorkItem], slot_bytes: int, with_output: bool) -> Iterator[Batch]:
    """Pack `items` (in order) into batches that fit a slot of `slot_bytes`, cutting an item where
    the rest of the slot cannot hold it. Cuts fall at multiples of 1024 elements from the item's
    start, except when a slot holds fewer than 1024 elements of it (tiny budgets).
    """
    slot_bytes -= slot_bytes % ALIGN
    chunks: list[Chunk] = []
    low, high = 0, slot_bytes  # inputs grow up from 0, outputs down from the end
    for item in items:
        sizes = [dtype_itemsize(i.dtype) for _, i in item.sources]
        out_size = dtype_itemsize(item.tensor.out.dtype) if with_output else 0
        per_elem = sum(sizes) + out_size
        overhead = ALIGN * (len(sizes) + 1)
        while item.count:
            m = min(item.count, max((high - low - overhead) // per_elem, 0))
            if 1024 <= m < item.count:
                m -= m % 1024
            if m <= 0:
                if not chunks:
                    raise InputError(f"a slot of {slot_bytes} bytes cannot hold one element of each input and the "
                                     f"output; raise the device budget", tensor=item.tensor.out.name)
                yield Batch(tuple(chunks), low, high)
                chunks, low, high = [], 0, slot_bytes
                continue
            offsets = []
            for size in sizes:
                offsets.append(low)
                low += _align(m * size)
            out_offset = -1
            if with_output:
                high -= _align(m * out_size)
                out_offset = high
            chunks.append(Chunk(replace(item, count=m), tuple(offsets), out_offset))
            item = replace(item, start=item.start + m, count=item.count - m)
    if chunks:
        yield Batch(tuple(chunks), low, high)


class _Ordering:
    """Streams and events on a CUDA device; plain synchronous stand-ins on a CPU device."""

    def __init__(self, torch: Any, device: torch.device):
        self.cuda = device.type == "cuda"
        self.torch = torch
        if self.cuda:
            self.copy_in = torch.cuda.Stream(device)
            self.compute = torch.cuda.Stream(device)
            self.copy_out = torch.cuda.Stream(device)

    def stream(self, which: str):  # -> context manager
        return self.torch.cuda.stream(getattr(self, which)) if self.cuda else nullcontext()

    def event(self) -> Any:
        return self.torch.cuda.Event() if self.cuda else None

    def record(self, event: Any, which: str) -> None:
        if event is not None:
            event.record(getattr(self, which))

    def wait(self, which: str, event: Any) -> None:
        if event is not None:
            getattr(self, which).wait_event(event)

    @staticmethod
    def host_wait(event: Any) -> None:
        if event is not None:
            event.synchronize()


class DeviceStreamer:
    """Streams one SoupPlan's device-computable tensors through `kernels` on `device`.

    Construction validates and allocates (device and pinned buffers), so call it before opening
    the writer: a budget too small for the plan raises InputError before any output exists.
    """

    def __init__(self, plan: SoupPlan, kernels: DeviceKernels, device: object, *,
                 budget_bytes: int = DEFAULT_DEVICE_BUDGET_BYTES, host_backend: Backend | None = None,
                 threads: int = 0):
        import torch

        self.torch = torch
        self.plan = plan
        self.kernels = kernels
        self.device = torch.device(device)  # type: ignore[call-overload]
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.threads = threads
        self._host_backend = host_backend
        self.device_tensors = [tp for tp in plan.tensors if on_device(tp)]
        self.host_tensors = [tp for tp in plan.tensors if not on_device(tp)]
        if budget_bytes < SLOTS * ALIGN * 4:
            raise InputError(f"device budget of {budget_bytes} bytes is too small (at least {SLOTS * ALIGN * 4})")
        self.slot_bytes = budget_bytes // SLOTS // ALIGN * ALIGN
        widest = max((ALIGN * (len(tp.sources) + 1) + sum(dtype_itemsize(i.dtype) for _, i in tp.sources)
                      + dtype_itemsize(tp.out.dtype) for tp in self.device_tensors), default=0)
        if widest > self.slot_bytes:
            raise InputError(f"device budget of {budget_bytes} bytes leaves {self.slot_bytes}-byte slots, too small for "
                             f"one element of {len(plan.coefficients)} inputs ({widest} bytes with alignment); "
                             "raise the budget")
        self.order = _Ordering(torch, self.device)
        pin = self.device.type == "cuda"
        n = SLOTS if self.device_tensors else 0
        self.host = [torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(n)]
        self.dev = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(n)]
        self.host_np = [h.numpy() for h in self.host]
        self.h2d_done = [self.order.event() for _ in range(n)]
        self.kernel_done = [self.order.event() for _ in range(n)]
        self.d2h_done = [self.order.event() for _ in range(n)]
        self._copy: Any = None
        try:
            self._copy = importlib.import_module("soupkern._native").copy  # multi-threaded memcpy
        except ImportError:
            pass

    # ---- host side ----------------------------------------------------------------------

    def _memcpy(self, dst: Bytes, src: Bytes) -> None:
        if self._copy is not None and src.nbytes >= _PARALLEL_COPY_BYTES:
            self._copy(dst, src, src.nbytes, self.threads)
        else:
            dst[:] = src

    def _fill(self, slot: int, batch: Batch) -> None:
        """Copy the batch's inputs from the mapped files into host slot `slot`."""
        buf = self.host_np[slot]
        chunks = iter(batch.chunks)  # run() takes the items in the batch's order

        def copy_in(item: WorkItem, views: list[Bytes]) -> None:
            for off, view in zip(next(chunks).in_offsets, views):
                self._memcpy(buf[off: off + view.nbytes], view)

        run((c.item for c in batch.chunks), copy_in)

    def _write_back(self, slot: int, batch: Batch, writer: SoupWriter, progress: Progress | None) -> None:
        """Copy the batch's outputs from host slot `slot` into the writer (waits for the copy-out)."""
        self.order.host_wait(self.d2h_done[slot])
        buf = self.host_np[slot]
        step = writer.staging_bytes
        for c in batch.chunks:
            item = c.item
            size = dtype_itemsize(item.tensor.out.dtype)
            total = item.count * size
            for b in range(0, total, step):
                e = min(b + step, total)
                self._memcpy(writer.reserve(item.tensor.out.name, item.start * size + b, e - b),
                             buf[c.out_offset + b: c.out_offset + e])
            if progress is not None:
                progress(item.nbytes_read + total)

    # ---- device side --------------------------------------------------------------------

    def _view(self, buf: torch.Tensor, offset: int, count: int, dtype: str) -> torch.Tensor:
        from soupkern.torch_dtypes import TORCH_DTYPES

        return buf[offset: offset + count * dtype_itemsize(dtype)].view(TORCH_DTYPES[dtype])

    def _launch(self, slot: int, batch: Batch, results: dict[str, torch.Tensor] | None, reused: bool) -> None:
        """Enqueue copy-in, kernel and (file output) copy-out of `batch` in slot `slot`."""
        o = self.order
        with o.stream("copy_in"):
            if reused:
                o.wait("copy_in", self.kernel_done[slot])
                if results is None:  # the slot's previous outputs must be copied out before inputs land
                    o.wait("copy_in", self.d2h_done[slot])  # (the host already waited for it: belt and braces)
            self.dev[slot][: batch.in_bytes].copy_(self.host[slot][: batch.in_bytes], non_blocking=True)
            o.record(self.h2d_done[slot], "copy_in")
        with o.stream("compute"):
            o.wait("compute", self.h2d_done[slot])
            if reused and results is None:
                o.wait("compute", self.d2h_done[slot])
            dev = self.dev[slot]
            # one launch per distinct (coefficients, divisor); repr tells -0.0 from 0.0, which
            # give different zeros and would be one key as floats
            groups: dict[str, tuple[WorkItem, list[torch.Tensor], list[list[torch.Tensor]]]] = {}
            for c in batch.chunks:
                item = c.item
                _, outs, rows = groups.setdefault(repr((item.coefficients, item.divisor)), (item, [], []))
                if results is None:
                    outs.append(self._view(dev, c.out_offset, item.count, item.tensor.out.dtype))
                else:
                    outs.append(results[item.tensor.out.name].view(-1)[item.start: item.start + item.count])
                rows.append([self._view(dev, off, item.count, info.dtype)
                             for (_, info), off in zip(item.sources, c.in_offsets)])
            for first, outs, rows in groups.values():
                self.kernels.multi_weighted_sum(outs, rows, first.coefficients, first.divisor)
            o.record(self.kernel_done[slot], "compute")
        if results is None:
            with o.stream("copy_out"):
                o.wait("copy_out", self.kernel_done[slot])
                lo = batch.out_begin
                self.host[slot][lo:].copy_(dev[lo:], non_blocking=True)
                o.record(self.d2h_done[slot], "copy_out")

    def _run(self, writer: SoupWriter | None, results: dict[str, torch.Tensor] | None,
             progress: Progress | None) -> None:
        pending: list[tuple[int, Batch]] = []  # launched, not yet written back (file output)
        items = plan_items(self.plan, lambda tp: max(tp.numel, 1), self.device_tensors)  # one per tensor
        for b, batch in enumerate(batches(items, self.slot_bytes, results is None)):
            slot = b % SLOTS
            if b >= SLOTS:
                if writer is not None:
                    self._write_back(*pending.pop(0), writer, progress)
                self.order.host_wait(self.h2d_done[slot])  # host slot inputs copied out
            self._fill(slot, batch)
            self._launch(slot, batch, results, b >= SLOTS)
            if writer is not None:
                pending.append((slot, batch))
            elif progress is not None:
                progress(sum(c.item.nbytes_read for c in batch.chunks))
        for slot, batch in pending:
            self._write_back(slot, batch, writer, progress)  # type: ignore[arg-type]
        if self.order.cuda:
            self.order.compute.synchronize()
            self.torch.cuda.current_stream(self.device).wait_stream(self.order.compute)

    def _host(self) -> Backend:
        if self._host_backend is None:
            from soupkern.backends import get_backend

            self._host_backend = get_backend()
        return self._host_backend

    # ---- entry points -------------------------------------------------------------------

    def to_writer(self, writer: SoupWriter, *, host_budget_bytes: int, progress: Progress | None = None) -> None:
        """Compute every tensor of the plan into `writer` (host tensors first, on the host)."""
        if self.host_tensors:
            execute(replace(self.plan, tensors=tuple(self.host_tensors)), writer, self._host(),
                    budget_bytes=host_budget_bytes, progress=progress)
        self._run(writer, None, progress)
        writer.flush()

    def to_state_dict(self, progress: Progress | None = None) -> dict[str, torch.Tensor]:
        """Every tensor of the plan as a tensor on the device (the whole result in device memory)."""
        from soupkern.torch_dtypes import TORCH_DTYPES

        torch = self.torch
        results = {tp.out.name: torch.empty(tp.out.shape, dtype=TORCH_DTYPES[tp.out.dtype], device=self.device)
                   for tp in self.device_tensors}
        self._run(None, results, progress)
        for tp in self.host_tensors:
            t = torch.empty(tp.out.shape, dtype=TORCH_DTYPES[tp.out.dtype])
            fill_tensor(tp, self.plan.coefficients_for(tp.out.name), t.view(-1).view(torch.uint8).numpy(), self._host(),
                        self.plan.divisor_for(tp.out.name))
            results[tp.out.name] = t.to(self.device)
        return {tp.out.name: results[tp.out.name] for tp in self.plan.tensors}
