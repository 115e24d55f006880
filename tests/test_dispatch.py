"""The dispatch point: four backends listed with reasons, explicit requests that cannot run fail
with the reason, automatic choices (host: cpp then torch; device: measured cuda/triton), the
SOUPKERN_BACKEND override, and an `import soupkern` that loads no torch, triton or CUDA."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import soupkern
import soupkern.backends as backends
import soupkern.backends.device as device_mod
from soupkern.backends.device import TorchDeviceKernels, device_kernels
from soupkern.errors import BackendUnavailableError

NO_GPU = not torch.cuda.is_available()


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOUPKERN_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_cache", {})
    monkeypatch.setattr(device_mod, "_choice", {})


def test_available_backends_lists_all_four_with_reasons() -> None:
    status = soupkern.available_backends()
    assert list(status) == ["cpp", "torch", "cuda", "triton"]
    for s in status.values():
        assert s.name and isinstance(s.reason, str) and s.reason
    assert status["cpp"].available and status["torch"].available
    if NO_GPU:
        assert not status["cuda"].available
        assert "no CUDA GPU" in status["cuda"].reason or "not built" in status["cuda"].reason


def test_automatic_choice_here() -> None:
    assert soupkern.get_backend().name == "cpp"
    assert isinstance(device_kernels("cpu"), TorchDeviceKernels)
    if NO_GPU:
        with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run here: "):
            device_kernels("cuda", "cuda")


def test_explicit_backend_that_cannot_run_raises_with_reason() -> None:
    with pytest.raises(BackendUnavailableError, match="GPU tensors, not host buffers"):
        soupkern.get_backend("cuda")
    with pytest.raises(BackendUnavailableError, match="host buffers, not device tensors"):
        device_kernels("cpu", "cpp")
    with pytest.raises(BackendUnavailableError, match="unknown backend 'metal'"):
        device_kernels("cpu", "metal")
    if NO_GPU:
        reason = soupkern.available_backends()["cuda"].reason
        with pytest.raises(BackendUnavailableError) as e:
            device_kernels("cpu", "cuda")
        assert reason in str(e.value)


def test_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOUPKERN_BACKEND", "torch")
    assert soupkern.get_backend().name == "torch"
    assert isinstance(device_kernels("cpu"), TorchDeviceKernels)
    monkeypatch.setenv("SOUPKERN_BACKEND", "cuda")  # a device backend: not applicable to host buffers
    assert soupkern.get_backend().name == "cpp"
    monkeypatch.setenv("SOUPKERN_BACKEND", "CPP")
    assert soupkern.get_backend().name == "cpp"
    assert isinstance(device_kernels("cpu"), TorchDeviceKernels)  # cpp is a host backend
    monkeypatch.setenv("SOUPKERN_BACKEND", "triton")
    kernels, reason = backends._probe("triton")
    if kernels is not None and getattr(kernels, "interpreted", False):
        assert device_kernels("cpu").name == "triton"  # the interpreter, on CPU tensors
    monkeypatch.setenv("SOUPKERN_BACKEND", "nope")
    with pytest.raises(BackendUnavailableError, match="unknown backend 'nope'"):
        soupkern.get_backend()


class FakeKernels(TorchDeviceKernels):
    def __init__(self, name: str) -> None:
        self.name = name


def test_measured_choice_on_a_gpu_is_cached_and_deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CUDA device the automatic choice is the faster by `measure`, measured once per
    device; ties go to the name first in alphabetical order."""
    monkeypatch.setattr(backends, "_cache", {"cuda": FakeKernels("cuda"), "triton": FakeKernels("triton")})
    calls = []

    def fake_measure(dev: torch.device, candidates: dict) -> dict[str, float]:
        calls.append(str(dev))
        return {"cuda": 2.0, "triton": 1.0} if dev.index == 0 else {"cuda": 1.0, "triton": 1.0}

    monkeypatch.setattr(device_mod, "measure", fake_measure)
    assert device_kernels("cuda:0").name == "triton"
    assert device_kernels("cuda:0").name == "triton"
    assert calls == ["cuda:0"]
    assert device_kernels("cuda:1").name == "cuda"  # tie
    assert device_kernels("cuda:1", "torch").name == "torch"  # by name: no measurement
    assert calls == ["cuda:0", "cuda:1"]
    monkeypatch.setattr(backends, "_cache", {"cuda": FakeKernels("cuda")})
    monkeypatch.setattr(backends, "_MODULES", {**backends._MODULES, "triton": "soupkern.no_such_module"})
    monkeypatch.setattr(device_mod, "_choice", {})
    assert device_kernels("cuda:0").name == "cuda"  # one candidate: no measurement needed
    assert calls == ["cuda:0", "cuda:1"]


def test_import_soupkern_loads_no_torch_triton_or_cuda() -> None:
    code = ("import json, sys, soupkern; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton') "
            "or m in ('soupkern._cuda', 'soupkern.gpu_engine', 'soupkern.backends.cuda', 'soupkern.backends.device'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def test_torch_device_kernels_validate_operands() -> None:
    """The torch implementation of the device contracts refuses what the fused kernels refuse."""
    import torch

    from soupkern.backends.device import TorchDeviceKernels
    from soupkern.errors import InputError

    k = TorchDeviceKernels()
    out = torch.empty(4)
    with pytest.raises(InputError, match="K >= 1"):
        k.weighted_sum(out, [], [])
    with pytest.raises(InputError, match="elements"):
        k.weighted_sum(out, [torch.ones(5)], [1.0])
    with pytest.raises(InputError, match="dtype"):
        k.weighted_sum(out, [torch.ones(4, dtype=torch.float64)], [1.0])
    with pytest.raises(InputError, match="2\\^53"):
        k.greedy_candidate([out], [torch.zeros(4, dtype=torch.float64)], [torch.ones(4)], 1 << 53)
    k.weighted_sum(out, [torch.ones(4), torch.full((4,), 2.0)], [0.5, 0.25])
    assert out.tolist() == [1.0] * 4
