"""Checkpoints as timm's train.py and open_clip's training loop write them, built without those
libraries (timm and open_clip import torchvision, whose PyPI wheel does not import beside the
CPU torch here): the same file layout, container keys, names and buffers, on small modules.

Each soup must load back into the module with `load_state_dict(strict=True)` and equal the fp64
mean of the ingredients rounded once (fp32 inputs: (a + b + c) in fp64 is exact, one division,
one rounding: compared bit for bit); BatchNorm's `num_batches_tracked` counters, which differ
between ingredients trained for different numbers of steps, take the largest (int_policy auto).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

import soupkern


class TimmStyleNet(nn.Module):
    """timm ResNet names: conv1, bn1, layer1.0.{conv1,bn1}, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(nn.Module())
        self.layer1[0].conv1 = nn.Conv2d(8, 8, 3, bias=False)
        self.layer1[0].bn1 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)


class OpenClipStyleModel(nn.Module):
    """open_clip CLIP names: visual.*, token_embedding, positional_embedding, ln_final,
    text_projection, and the 0-dim logit_scale parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = nn.Module()
        self.visual.conv1 = nn.Conv2d(3, 16, 4, stride=4, bias=False)
        self.visual.class_embedding = nn.Parameter(torch.randn(16))
        self.visual.ln_post = nn.LayerNorm(16)
        self.visual.proj = nn.Parameter(torch.randn(16, 8))
        self.token_embedding = nn.Embedding(50, 16)
        self.positional_embedding = nn.Parameter(torch.randn(12, 16))
        self.ln_final = nn.LayerNorm(16)
        self.text_projection = nn.Parameter(torch.randn(16, 8))
        self.logit_scale = nn.Parameter(torch.ones([]) * 2.659)


def fp64_mean(sds: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sds[0].items():
        if v.is_floating_point():
            out[k] = (sum(sd[k].double() for sd in sds) / len(sds)).to(v.dtype)
        else:
            out[k] = torch.stack([sd[k] for sd in sds]).max(0).values
    return out


def perturbed(model: nn.Module, seed: int, steps: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            sd[k] = v + 0.01 * torch.randn(v.shape, generator=g)
        elif k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(steps)
        else:
            sd[k] = v.clone()
    return sd


def test_timm_train_py_checkpoints(tmp_path: Path, caplog) -> None:
    """`checkpoint-N.pth.tar` as timm's CheckpointSaver writes it: epoch, arch, state_dict,
    state_dict_ema, optimizer, args (an argparse.Namespace), version."""
    torch.manual_seed(0)
    base = TimmStyleNet()
    paths, sds, emas = [], [], []
    for i, epochs in enumerate([3, 5, 4]):
        sd, ema = perturbed(base, i, 100 * epochs), perturbed(base, 10 + i, 100 * epochs)
        model = TimmStyleNet()
        model.load_state_dict(sd)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for param in model.parameters():  # optimizer state with tensors, as after a step
            param.grad = torch.ones_like(param)
        opt.step()
        p = tmp_path / f"run{i}" / f"checkpoint-{epochs}.pth.tar"
        p.parent.mkdir()
        torch.save({"epoch": epochs, "arch": "resnet_tiny", "state_dict": sd, "state_dict_ema": ema,
                    "optimizer": opt.state_dict(), "version": 2,
                    "args": argparse.Namespace(model="resnet_tiny", lr=0.1, epochs=epochs)}, p)
        paths.append(p)
        sds.append(sd)
        emas.append(ema)
    with caplog.at_level(logging.WARNING, logger="soupkern"):
        soup = soupkern.uniform_state_dict(paths)
    assert any("state_dict_ema" in r.getMessage() for r in caplog.records)  # which entry was souped, said once per file
    for got_sd, want_sd in ((soup, fp64_mean(sds)),
                            (soupkern.uniform_state_dict(paths, state_dict_key="state_dict_ema"), fp64_mean(emas))):
        model = TimmStyleNet()
        model.load_state_dict(got_sd, strict=True)
        for k, v in want_sd.items():
            assert torch.equal(model.state_dict()[k], v), k
    assert int(soup["bn1.num_batches_tracked"]) == 500
    out = tmp_path / "soup.safetensors"
    soupkern.uniform_soup(paths, out, state_dict_key="state_dict_ema")
    from safetensors.torch import load_file
    assert all(torch.equal(load_file(out)[k], v) for k, v in fp64_mean(emas).items())


def test_open_clip_checkpoints_with_ddp_prefix(tmp_path: Path, caplog) -> None:
    """open_clip's `epoch_N.pt`: epoch, name, state_dict (keys prefixed `module.` when trained
    with DDP), optimizer; the soup strips the prefix and loads strictly into the model."""
    torch.manual_seed(1)
    base = OpenClipStyleModel()
    paths, sds = [], []
    for i in range(3):
        sd = perturbed(base, i, 0)
        model = OpenClipStyleModel()
        model.load_state_dict(sd)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for param in model.parameters():
            param.grad = torch.ones_like(param)
        opt.step()
        prefix = "module." if i != 1 else ""  # one ingredient from a single-GPU run
        p = tmp_path / f"epoch_{i + 1}.pt"
        torch.save({"epoch": i + 1, "name": "ViT-tiny", "state_dict": {prefix + k: v for k, v in sd.items()},
                    "optimizer": opt.state_dict()}, p)
        paths.append(p)
        sds.append(sd)
    with caplog.at_level(logging.WARNING, logger="soupkern"):
        soup = soupkern.uniform_state_dict(paths)
    assert any("module." in r.getMessage() for r in caplog.records)
    model = OpenClipStyleModel()
    model.load_state_dict(soup, strict=True)
    want = fp64_mean(sds)
    for k, v in want.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert soup["logit_scale"].shape == torch.Size([])
