"""The exact soup of PEFT LoRA adapters: concatenation along the rank.

A LoRA layer adds s·B·A to a base weight (s = lora_alpha / r, or lora_alpha / √r with rsLoRA).
Averaging A and B separately is not a soup of the adapters (mean(B)·mean(A) ≠ mean(B·A)). The
concatenation

    A_cat = [A_1; …; A_K]            (rank Σ r_k rows)
    B_cat = [c_1·s_1·B_1 … c_K·s_K·B_K]   (Σ r_k columns)

gives B_cat·A_cat = Σ_k c_k·s_k·B_k·A_k exactly, at rank Σ r_k, with scale 1 (r = lora_alpha =
Σ r_k, rsLoRA off). Each c_k·s_k·B_k is formed in fp64 and rounded once to the adapter's dtype.
Tensors of an adapter that are not LoRA factors (modules_to_save copies) are averaged with the
coefficients under the usual contract.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

from soupkern.errors import InputError, MismatchError

CONFIG = "adapter_config.json"
FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B|embedding_A|embedding_B)(?P<suffix>(\.[^.]+)?\.weight|)$")
# fields that must agree for the adapters to apply to the same modules of the same base
SAME = ("peft_type", "base_model_name_or_path", "target_modules", "bias", "fan_in_fan_out", "task_type")


def adapter_folder(source: object) -> Path | None:
    """The folder of a PEFT adapter (with adapter_config.json), else None."""
    if not (isinstance(source, (str, bytes)) or hasattr(source, "__fspath__")):
        return None
    p = Path(os.fsdecode(os.fspath(source)))  # type: ignore[arg-type]
    folder = p if p.is_dir() else p.parent
    return folder if (folder / CONFIG).is_file() else None


def _config(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {CONFIG} ({e})", path=folder) from None
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        raise InputError(f"{CONFIG} is not a LoRA adapter's (peft_type {data.get('peft_type')!r})", path=folder)
    for unsupported in ("rank_pattern", "alpha_pattern"):
        if data.get(unsupported):
            raise InputError(f"{CONFIG} sets {unsupported}; per-module ranks are not supported by --lora concat yet",
                             path=folder)
    if data.get("use_dora"):
        raise InputError("DoRA adapters (use_dora) have a magnitude vector that concatenation cannot combine",
                         path=folder)
    return data


def _scale(config: dict[str, Any]) -> float:
    r, alpha = float(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def concat_soup(items: Sequence[Any], coefficients: Sequence[float], out: Any, *, overwrite: bool = False,
                fsync: bool = False, metadata: dict[str, str] | None = None) -> tuple[list[Path], int, int, int]:
    """Write the rank-concatenated soup of PEFT adapter folders `items` (weights `coefficients`)
    to the folder `out`: adapter_model.safetensors and adapter_config.json (r = lora_alpha =
    Σ r_k), loadable with `PeftModel.from_pretrained`. Returns (the files written, tensors
    written, tensor bytes read, tensor bytes written)."""
    import torch

    from soupkern.backends.torch_backend import round_f64
    from soupkern.evaluate import tensor_view
    from soupkern.io import OutputTensor, SoupWriter, open_checkpoint, plan_output
    from soupkern.io.sources import labels
    from soupkern.io.writer import ADAPTER_NAME, output_target
    from soupkern.torch_dtypes import TORCH_DTYPES

    folders = [adapter_folder(x) for x in items]
    if any(f is None for f in folders):
        bad = next(x for x, f in zip(items, folders) if f is None)
        raise InputError(f"--lora concat needs PEFT adapter folders (with {CONFIG})", path=os.fspath(bad))
    configs = [_config(f) for f in folders]  # type: ignore[arg-type]
    for field in SAME:
        values = [json.dumps(c.get(field), sort_keys=True) for c in configs]
        if len(set(values)) > 1:
            i = next(i for i, v in enumerate(values) if v != values[0])
            raise MismatchError(f"{CONFIG} says {field} = {values[i]}, the first adapter {values[0]}: the adapters "
                                "do not apply to the same modules", path=folders[i])
    tensors: dict[str, torch.Tensor] = {}
    with_names = []
    read = 0
    for x, label in zip(items, labels(items)):
        with open_checkpoint(x, label=label) as ck:  # adapters are small: one copy each, out of the mapping
            with_names.append({n: tensor_view(ck, n).clone() for n in ck.tensors})
            read += sum(info.nbytes for _, info in ck.tensors.values())
    names = sorted(with_names[0])
    for i, sd in enumerate(with_names[1:], 1):
        if sorted(sd) != names:
            missing = sorted(set(names) ^ set(sd))[0]
            raise MismatchError("the adapters' tensor names differ", path=folders[i], tensor=missing)
    scales = [_scale(c) for c in configs]
    total_r = sum(int(c["r"]) for c in configs)
    for name in names:
        m = FACTOR.match(name)
        xs = [sd[name] for sd in with_names]
        if m is None:  # not a factor: the weighted soup of the copies
            acc = sum(float(c) * x.double() for c, x in zip(coefficients, xs))
            tensors[name] = round_f64(acc, xs[0].dtype).reshape(xs[0].shape) if xs[0].is_floating_point() else xs[0]
        elif m.group("which") in ("A", "embedding_A"):
            tensors[name] = torch.cat(xs, 0)
        else:
            parts = [round_f64(x.double() * (float(c) * s), x.dtype).reshape(x.shape)
                     for x, c, s in zip(xs, coefficients, scales)]
            tensors[name] = torch.cat(parts, 1)
    config = {**configs[0], "r": total_r, "lora_alpha": total_r, "use_rslora": False}
    meta = {"soupkern.recipe": "lora_concat", "soupkern.ingredients": json.dumps(labels(items)),
            "soupkern.coefficients": json.dumps([float(c) for c in coefficients]), **(metadata or {})}
    out_dtypes = {n: next(k for k, v in TORCH_DTYPES.items() if v == t.dtype) for n, t in tensors.items()}
    target = output_target(os.fspath(out) + ("" if os.fspath(out).endswith("/") else "/"))
    layout = plan_output([OutputTensor(n, out_dtypes[n], tuple(t.shape)) for n, t in tensors.items()],
                         f"{target}/", meta, None, extra_names=[CONFIG], single_name=ADAPTER_NAME)
    extra = {CONFIG: (json.dumps(config, indent=2) + "\n").encode()}
    inputs = [os.fspath(f) for f in folders if f is not None]
    with SoupWriter(layout, inputs=inputs, overwrite=overwrite, fsync=fsync, extra_files=extra) as writer:
        for name in sorted(tensors, key=lambda n: layout.where[n]):
            t = tensors[name]
            data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
            step = writer.staging_bytes
            for start in range(0, len(data), step):
                chunk = data[start:start + step]
                writer.reserve(name, start, len(chunk))[:] = chunk
        writer.flush()
        written = sum(t.numel() * t.element_size() for t in tensors.values())
        return writer.commit(), len(tensors), read, written
