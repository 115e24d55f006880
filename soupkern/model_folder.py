"""A soup of model folders is a model folder: the non-weight files of one ingredient (config,
generation config, tokenizer and processor files, chat templates) go beside the soup's weights,
after a check that the ingredients' configs describe the same architecture, with a model card
that states the recipe, the ingredients and their coefficients.

Top-level regular files (symlinks followed, as in a Hugging Face cache snapshot) are copied, and
those of the module subfolders a sentence-transformers `modules.json` names (`1_Pooling/`);
other subfolders (trainer `checkpoint-*/`, logs) are not, nor are weights, indexes, DCP
metadata, hidden files, training state and the ingredient's own model card. The copied
config's `torch_dtype` names the soup's dtype.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from soupkern.errors import InputError, MismatchError

log = logging.getLogger("soupkern")

CONFIG_NAME = "config.json"
MODULES_NAME = "modules.json"  # sentence-transformers: the pipeline's modules and their subfolders
MODEL_CARD = "README.md"
# The fields of config.json that define the architecture (and so which weights mean what).
ARCH_FIELDS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size", "vocab_size", "tie_word_embeddings")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".tar", ".h5", ".msgpack", ".onnx", ".gguf",
                   ".distcp", ".npz", ".pkl")
NOT_COPIED = {MODEL_CARD, "trainer_state.json", "training_args.bin", ".metadata", "soupkern_provenance.json"}
MAX_FILE_BYTES = 512 << 20
_TORCH_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def model_folder(source: object) -> Path | None:
    """The folder an ingredient's model files live in: the ingredient itself when it is a folder,
    the folder of an index file; None for single weight files and in-memory ingredients."""
    source = getattr(source, "source", source)  # a renamed ingredient: its folder
    if not (isinstance(source, (str, bytes)) or hasattr(source, "__fspath__")):
        return None
    text = os.fsdecode(os.fspath(source))  # type: ignore[arg-type]
    if not text:
        return None
    p = Path(text)
    if p.is_dir():
        return p
    if p.name.endswith(".index.json"):
        return p.parent
    return None


def _copied(name: str) -> bool:
    return not (name.startswith(".") or name in NOT_COPIED or name.endswith(".index.json")
                or name.lower().endswith(WEIGHT_SUFFIXES))


def _files_of(folder: Path, prefix: str = "") -> dict[str, bytes]:
    out = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not _copied(entry.name) or not entry.is_file():  # is_file follows symlinks
            continue
        size = entry.stat().st_size
        if size > MAX_FILE_BYTES:
            raise InputError(f"is {size} bytes, more than a model folder's non-weight file should be "
                             f"({MAX_FILE_BYTES}); remove it from the folder or give --copy-from", path=entry.path)
        with open(entry.path, "rb") as f:
            out[prefix + entry.name] = f.read()
    return out


def _module_folders(folder: Path) -> list[str]:
    """The subfolders a sentence-transformers `modules.json` names (`1_Pooling`, `2_Normalize`)."""
    modules = read_json(folder / MODULES_NAME, list, "a JSON list of modules")
    if modules is None:
        return []
    subs = []
    for m in modules:
        sub = m.get("path") if isinstance(m, dict) else None
        if not sub:  # the transformer itself lives at the top level
            continue
        parts = Path(sub).parts
        if not isinstance(sub, str) or Path(sub).is_absolute() or ".." in parts or parts[0].startswith("."):
            raise InputError(f"names module path {sub!r}, which is not a subfolder of the model",
                             path=folder / MODULES_NAME)
        if (folder / sub).is_dir():
            subs.append(Path(sub).as_posix())
    return subs


def companion_files(folder: Path) -> dict[str, bytes]:
    """The non-weight files of a model folder, name (a relative POSIX path) -> bytes: its own, and
    those of the module subfolders its sentence-transformers `modules.json` names. Weights in
    such a subfolder (a `2_Dense` layer) are not souped by this soup: a notice says how to."""
    out = _files_of(folder)
    for sub in _module_folders(folder):
        out.update(_files_of(folder / sub, sub + "/"))
        weights = sorted(e.name for e in os.scandir(folder / sub) if e.is_file()
                         and e.name.lower().endswith(WEIGHT_SUFFIXES))
        if weights:
            log.warning("%s holds weights (%s) of a module the soup does not average and does not copy: soup "
                        "them as well, e.g. soupkern uniform A/%s/%s B/%s/%s ... -o SOUP/%s/%s", folder / sub,
                        ", ".join(weights), sub, weights[0], sub, weights[0], sub, weights[0])
    return out


def read_json(path: Path, kind: type, what: str) -> Any:
    """The JSON value in `path` (None when there is no such file), which must be a `kind`."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise InputError(f"is not valid JSON ({e})", path=path) from None
    if not isinstance(data, kind):
        raise InputError(f"does not hold {what}", path=path)
    return data


def _config(folder: Path) -> dict[str, Any] | None:
    return read_json(folder / CONFIG_NAME, dict, "a JSON object")  # type: ignore[no-any-return]


def _arch(config: dict[str, Any]) -> dict[str, Any]:
    fields = {f: config[f] for f in ARCH_FIELDS if f in config}
    for sub in ("text_config", "vision_config"):  # multimodal configs nest the towers' fields
        if isinstance(config.get(sub), dict):
            fields.update({f"{sub}.{f}": config[sub][f] for f in ARCH_FIELDS if f in config[sub]})
    return fields


def _vocab_size(folder: Path) -> int | None:
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
        vocab = data.get("model", {}).get("vocab")
        return (len(vocab) if vocab is not None else 0) + len(data.get("added_tokens") or [])
    except (OSError, ValueError, AttributeError):
        return None


def check_configs(folders: Sequence[Path]) -> None:
    """Refuse folders whose configs (or tokenizers) disagree on the architecture, naming the
    field, both folders and both values."""
    first: tuple[Path, dict[str, Any], int | None] | None = None
    for folder in folders:
        config = _config(folder)
        if config is None:
            continue
        here = (folder, _arch(config), _vocab_size(folder))
        if first is None:
            first = here
            continue
        for field in sorted(set(first[1]) & set(here[1])):  # a field one config leaves to its default: not compared
            a, b = first[1][field], here[1][field]
            if a != b:
                raise MismatchError(f"config.json says {field} = {json.dumps(b)}, but {first[0] / CONFIG_NAME} says "
                                    f"{json.dumps(a)}: the ingredients are not the same architecture "
                                    "(--allow-config-mismatch / allow_config_mismatch=True to soup them anyway)",
                                    path=folder / CONFIG_NAME)
        if first[2] is not None and here[2] is not None and first[2] != here[2]:
            raise MismatchError(f"tokenizer.json has {here[2]} tokens, {first[0] / 'tokenizer.json'} {first[2]} "
                                "(--allow-config-mismatch / allow_config_mismatch=True to soup them anyway)",
                                path=folder / "tokenizer.json")


def model_card(recipe: str, labels: Sequence[str], coefficients: object, divisor: float, version: str,
               config: dict[str, Any] | None) -> bytes:
    """A README.md for the soup folder: what it is, how it was made, from what."""
    k = len(labels)
    per_tensor = isinstance(coefficients, dict)
    lines = ["---", "tags:", "- soupkern", "- model-soup", "- merge"]
    if config is not None and "model_type" in config:
        lines.append("library_name: transformers")
    lines += ["---", "", f"# {recipe.replace('_', ' ')} soup of {k} checkpoints", "",
              f"This model is a **{recipe.replace('_', ' ')} soup** (Wortsman et al., 2022, *Model soups: averaging "
              "weights of multiple fine-tuned models improves accuracy without increasing inference time*) "
              f"of {k} checkpoints, made with soupkern {version}. Its weights are",
              "",
              "    w = round( (Σ_k c_k · w_k) / d )" if divisor != 1.0 else "    w = round( Σ_k c_k · w_k )",
              "",
              "per tensor, accumulated in fp64 in the order below and rounded once to the output dtype "
              "(round to nearest even). The non-weight files (config, tokenizer, ...) are those of the "
              "first model folder among the ingredients, or of `--copy-from`.", "",
              "## Ingredients", ""]
    if per_tensor:
        lines += ["| # | ingredient |", "|---|---|"] + [f"| {i} | `{x}` |" for i, x in enumerate(labels)]
        lines += ["", "Coefficients are per tensor: see `soupkern.coefficients` in the safetensors metadata."]
    else:
        lines += ["| # | ingredient | coefficient c_k |", "|---|---|---|"]
        lines += [f"| {i} | `{x}` | {c!r} |" for i, (x, c) in enumerate(zip(labels, coefficients))]  # type: ignore[call-overload]
    if divisor != 1.0:
        lines += ["", f"Divisor d = {divisor!r}."]
    lines += ["", "Provenance (recipe, ingredients, coefficients, backend) is also recorded in every weight "
              "file's `__metadata__` (`soupkern inspect`).", ""]
    return "\n".join(lines).encode()


def folder_files(items: Sequence[object], labels: Sequence[str], *, recipe: str, coefficients: object,
                 divisor: float, version: str, copy_from: object = None,
                 allow_config_mismatch: bool = False, out_dtype: str | None = None) -> dict[str, bytes]:
    """The non-weight files of a soup folder: those of `copy_from` (else the first model folder
    among the ingredients) and a model card; {} when no ingredient is a model folder and no
    `copy_from` is given. Configs are checked across the ingredients' folders first."""
    folders = [f for f in (model_folder(x) for x in items) if f is not None]
    source = None
    if copy_from is not None:
        source = model_folder(copy_from)
        if source is None:
            raise InputError("--copy-from / copy_from must be a model folder", path=os.fspath(copy_from))  # type: ignore[call-overload]
    elif folders:
        source = folders[0]
    if source is None:
        return {}
    if not allow_config_mismatch:
        check_configs([source, *folders] if copy_from is not None else folders)
    files = companion_files(source)
    config = _config(source)
    if config is not None and out_dtype in _TORCH_DTYPE_NAMES:
        # the soup's dtype, where the config names one (transformers loads in it by default)
        changed = {k: _TORCH_DTYPE_NAMES[out_dtype] for k in ("torch_dtype", "dtype")
                   if isinstance(config.get(k), str) and config[k] != _TORCH_DTYPE_NAMES[out_dtype]}
        if changed:
            files[CONFIG_NAME] = (json.dumps({**config, **changed}, indent=2) + "\n").encode()
    files[MODEL_CARD] = model_card(recipe, labels, coefficients, divisor, version, config)
    return files
