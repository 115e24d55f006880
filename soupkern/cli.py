"""The `soupkern` command: a thin layer over the Python API.

Exit status: 0 on success; 2 on a bad option, bad input or an unwritable output (one line on
stderr, no traceback); 128 + the signal's number when SIGINT (130), SIGHUP (129) or SIGTERM (143)
stops it (the message says whether the output had already been completed; otherwise nothing was
written or replaced); 141 when its standard output is closed early (`soupkern inspect ... | head`).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from soupkern import strict_json
from soupkern.errors import Interrupted, SoupkernError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '64MiB' -> 64 * 2**20, '1000' -> 1000; a size must be positive."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: '{text}' (e.g. 5GB, 500MB, 64MiB)")
    unit = (m.group(2) or "").lower().rstrip("b")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"a size must be positive, got '{text}'")
    return size


def _number(kind: type, lo: float, hi: float, what: str) -> Callable[[str], Any]:
    """An argparse type: `kind(text)` within [lo, hi) (NaN refused), with one-line errors."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: '{text}'") from None
        if not lo <= value < hi:
            raise argparse.ArgumentTypeError(f"{what}, got '{text}'")
        return value

    return parse


_positive_int = _number(int, 0, float("inf"), "must be >= 0")
_positive_float = _number(float, 5e-324, float("inf"), "must be a positive finite number")
_seed = _number(int, 0, 2**63, "a seed must be in [0, 2**63)")


class _Parser(argparse.ArgumentParser):
    """argparse with the documented error format: one line on stderr, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def parse_weighted(items: Sequence[str]) -> tuple[list[str], list[float]]:
    paths, coeffs = [], []
    for item in items:
        path, sep, value = item.rpartition(":")
        try:
            if not sep:
                raise ValueError
            coeffs.append(float(value))
        except ValueError:
            raise SoupkernError(f"'{item}': expected PATH:COEFFICIENT, e.g. model_a.safetensors:0.3") from None
        paths.append(path)
    return paths, coeffs


INGREDIENTS_HELP = ("checkpoints: safetensors files, index json files or folders; PyTorch pickles (.pt, .pth, .bin, "
                    ".pth.tar) or folders of pytorch_model.bin; DCP folders")


def _rename_rule(text: str) -> tuple[str, str]:
    old, sep, new = text.partition("=")
    if not sep or not old:
        raise argparse.ArgumentTypeError(f"'{text}' is not OLD=NEW with a non-empty OLD prefix")
    return old, new


def _renamed(args: argparse.Namespace, items: list[Any]) -> list[Any]:
    """The ingredients with --rename applied."""
    if not getattr(args, "rename", None):
        return items
    from soupkern.io.sources import Renamed

    return [Renamed(x, args.rename) for x in items]


def _finite_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def _alpha_grid(text: str) -> list[float]:
    """'0:1:0.1' (both ends included) or '0,0.3,0.5'."""
    try:
        if ":" in text:
            start, stop, step = (_finite_float(x) for x in text.split(":"))
            if step <= 0 or stop < start or (stop - start) / step > 10_000:
                raise argparse.ArgumentTypeError(f"'{text}': need START <= STOP and 0 < STEP, at most 10,000 points")
            n = int(round((stop - start) / step))
            return [start + i * step for i in range(n + 1)]
        return [_finite_float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not START:STOP:STEP or a comma-separated list") from None


def _soup_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="output .safetensors file (a folder with --max-shard-size)")
    p.add_argument("--dtype", help="output dtype of float tensors: fp32, fp16, bf16, fp64 (default: the first ingredient's)")
    p.add_argument("--intersection", action="store_true", help="soup only the tensor names all ingredients share")
    p.add_argument("--max-shard-size", type=parse_size, help="write HF-style shards of at most this size (e.g. 5GB)")
    p.add_argument("--budget", type=parse_size, default=None, help="working-memory budget, at least 1MiB (default 64MiB)")
    p.add_argument("--backend", help="kernel backend: cpp, torch, cuda, triton (default: $SOUPKERN_BACKEND or the best available)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--fsync", action="store_true", help="fsync the output before renaming it into place")
    p.add_argument("--format", choices=("safetensors", "dcp"), default="safetensors", dest="out_format",
                   help="output format: safetensors (default) or dcp, a PyTorch Distributed Checkpoint folder "
                        "(written from memory by one process)")
    p.add_argument("--lora", choices=("refuse", "factorwise", "concat"), default="refuse",
                   help="PEFT LoRA adapters: refuse (default; averaging lora_A and lora_B separately is not the mean "
                        "of the adapters' updates B·A), concat (the exact soup: concatenate along the rank; adapter "
                        "folders in, an adapter folder out) or factorwise (average the factors anyway)")
    p.add_argument("--int-policy", choices=("auto", "first", "max", "mean", "refuse"), default="auto",
                   help="integer tensors that differ between ingredients: auto (default) takes the maximum of 0-dim "
                        "counters such as num_batches_tracked and refuses the rest; first, max, mean, refuse")
    p.add_argument("--copy-from", metavar="DIR",
                   help="model folder whose config, tokenizer and other non-weight files go into a folder output "
                        "(default: the first ingredient that is a model folder)")
    p.add_argument("--allow-config-mismatch", action="store_true",
                   help="soup model folders whose config.json disagree on the architecture")
    p.add_argument("--rename", action="append", metavar="OLD=NEW", type=_rename_rule,
                   help="rename tensors of every ingredient by prefix, e.g. --rename backbone.=model. (repeatable; "
                        "the first matching rule applies)")
    p.add_argument("--state-dict-key", metavar="KEY",
                   help="the entry of a PyTorch pickle or DCP checkpoint to soup, e.g. state_dict_ema "
                        "(default: the state dict itself, else its state_dict / model_state_dict / model / module)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")


def _device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="stream the soup through this torch device (e.g. cuda): pinned host buffers, "
                                    "bounded device memory, same output bytes")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="soupkern", description="Model soups of safetensors, PyTorch, DCP and Hugging Face checkpoints (any mix).")
    parser.add_argument("--version", action="version", version=f"soupkern {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("uniform", help="plain mean of the ingredients")
    p.add_argument("ingredients", nargs="+", help=INGREDIENTS_HELP)
    _soup_options(p)
    _device_option(p)

    p = sub.add_parser("weighted", help="sum of coefficient * ingredient (coefficients of any sign)")
    p.add_argument("ingredients", nargs="+", metavar="PATH:COEFF", help="e.g. a.safetensors:0.3 b.safetensors:0.7")
    p.add_argument("--base", metavar="PATH",
                   help="task vectors / WiSE-FT: BASE + sum of COEFF * (PATH - BASE), e.g. --base zeroshot/ ft/:0.5")
    _soup_options(p)
    _device_option(p)

    p = sub.add_parser("inspect", help="tensors, dtypes, sizes and metadata of a checkpoint")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    sub.add_parser("backends", help="which kernel backends can run here, and why (not)")

    p = sub.add_parser("greedy", help="greedy soup: add ingredients best first while the held-out score does not drop")
    p.add_argument("ingredients", nargs="+", help=INGREDIENTS_HELP)
    p.add_argument("--score", metavar="MODULE:FUNCTION",
                   help="held-out score, higher is better: FUNCTION(model) with --model, else FUNCTION(state_dict); "
                        "MODULE is an importable module or a path to a .py file (give --score or --data)")
    p.add_argument("--data", metavar="MODULE:FUNCTION",
                   help="zero-argument function returning the held-out (inputs, targets) batches (a list or a "
                        "DataLoader, in the same order on every rank under torchrun), scored with --metric; needs --model")
    _batch_size_option(p)
    p.add_argument("--metric", default="accuracy", metavar="accuracy|loss|MODULE:FUNCTION",
                   help="with --data: accuracy (higher is better), loss (cross-entropy, lower is better) or "
                        "FUNCTION(outputs, targets) -> per-sample values (higher is better); default accuracy")
    p.add_argument("--model", metavar="MODULE:FACTORY", help="zero-argument function returning the nn.Module to load soups into")
    p.add_argument("--tie", choices=("ge", "gt"), default="ge",
                   help="keep an ingredient when the score does not drop (ge, the paper) or only when it rises (gt, "
                        "the model-soups code); default ge")
    p.add_argument("--sort", choices=("stable", "model-soups"), default="stable",
                   help="order among equal ingredient scores: input order (stable) or reversed (model-soups)")
    p.add_argument("--speculative", type=_positive_int, default=None, metavar="S",
                   help="with --data: candidates scored in one batched pass over the data (default 8 with the model "
                        "on a GPU or a DataLoader, else 1); under torchrun a window of S spreads over gcd(ranks, S) "
                        "candidate groups, the data over the rest")
    p.add_argument("--device", help="torch device for the model and the running sum (e.g. cuda)")
    _soup_options(p)

    p = sub.add_parser("learned", help="learned soup: mixing coefficients optimized on held-out loss (AdamW)")
    p.add_argument("ingredients", nargs="+", help=INGREDIENTS_HELP)
    p.add_argument("--model", required=True, metavar="MODULE:FACTORY", help="zero-argument function returning the nn.Module")
    p.add_argument("--data", required=True, metavar="MODULE:FUNCTION",
                   help="zero-argument function returning the held-out batches, a list of (inputs, targets) or a DataLoader")
    _batch_size_option(p)
    p.add_argument("--mode", choices=("by_model", "by_layer"), default="by_model",
                   help="one coefficient per ingredient, or per ingredient and tensor")
    p.add_argument("--epochs", type=_positive_int, default=5, help="passes over the held-out data (default 5)")
    p.add_argument("--lr", type=_positive_float, default=0.05, help="AdamW learning rate of the mixing logits (default 0.05)")
    p.add_argument("--seed", type=_seed, default=0)
    _soup_options(p)

    p = sub.add_parser("interpolate", help="WiSE-FT: score (1-alpha)*A + alpha*B on held-out data for a grid of "
                                           "alpha in one batched pass, write the soup at the best (or a given) alpha")
    p.add_argument("a", help="the first checkpoint (alpha = 0), e.g. the zero-shot model")
    p.add_argument("b", help="the second checkpoint (alpha = 1), e.g. the fine-tuned model")
    p.add_argument("--model", required=True, metavar="MODULE:FACTORY", help="zero-argument function returning the nn.Module")
    p.add_argument("--data", required=True, metavar="MODULE:FUNCTION",
                   help="zero-argument function returning held-out (inputs, targets) batches")
    _batch_size_option(p)
    p.add_argument("--alphas", type=_alpha_grid, default=None, metavar="START:STOP:STEP|A,B,...",
                   help="the grid (default 0:1:0.1; values outside [0, 1] extrapolate)")
    p.add_argument("--metric", choices=("accuracy", "loss"), default="accuracy",
                   help="what picks the alpha written: the highest accuracy or the lowest loss (default accuracy)")
    p.add_argument("--alpha", type=_finite_float, default=None, help="write the soup at this alpha instead of the best")
    p.add_argument("--plot", metavar="PNG", help="also plot the curve (needs matplotlib)")
    _soup_options(p)

    p = sub.add_parser("analyze", help="norms, angles and distances of ingredient deltas from a base checkpoint")
    p.add_argument("ingredients", nargs="+", help=INGREDIENTS_HELP)
    p.add_argument("--base", help="the shared pretrained checkpoint (default: none, raw weights)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("demo", help="real model-soup experiment on scikit-learn's digits (about a minute; --fast: seconds)")
    p.add_argument("--workdir", default="demo_out", help="where ingredients, soups and results go (default ./demo_out)")
    p.add_argument("--fast", action="store_true", help="fewer ingredients and seeds")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing; results still go to the workdir")
    return parser


def _batch_size_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                   help="when --data returns a map-style Dataset of samples: samples per held-out batch, "
                        "in index order; under torchrun each rank loads only its batches")


def _held_out_data(args: argparse.Namespace) -> Any:
    """What --data's function returns, a map-style Dataset batched by --batch-size."""
    from soupkern.evaluate import held_out

    return held_out(load_callable(args.data, "--data")(), args.batch_size)


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """'pkg.module:function' or 'path/to/file.py:function' -> the function."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise SoupkernError(f"{what} '{spec}': expected MODULE:FUNCTION, e.g. my_eval:score")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            path = Path(module_name)
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            if module_spec is None or module_spec.loader is None or not path.is_file():
                raise SoupkernError(f"{what} '{spec}': no Python file {path}")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the working folder
            try:
                module = importlib.import_module(module_name)
            finally:
                sys.path.remove(os.getcwd())
    except ImportError as e:
        raise SoupkernError(f"{what} '{spec}': cannot import {module_name} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SoupkernError(f"{what} '{spec}': {module_name} has no function {attr}")
    return fn


def _version() -> str:
    from soupkern import __version__

    return __version__


def _soup_opts(args: argparse.Namespace) -> dict[str, Any]:
    from soupkern.engine import DEFAULT_BUDGET_BYTES
    from soupkern.options import check_budget

    if args.budget is not None:
        check_budget(args.budget, "--budget")

    return dict(
        dtype=args.dtype,
        keys="intersection" if args.intersection else "same",
        max_shard_size=args.max_shard_size,
        budget_bytes=DEFAULT_BUDGET_BYTES if args.budget is None else args.budget,
        backend=args.backend,
        overwrite=args.force,
        fsync=args.fsync,
        progress=not args.quiet,
        state_dict_key=args.state_dict_key,
        copy_from=args.copy_from,
        allow_config_mismatch=args.allow_config_mismatch,
        int_policy=args.int_policy,
        out_format=args.out_format,
        lora=args.lora,
    )


def _run_soup(args: argparse.Namespace, paths: list[str], coeffs: list[float] | None) -> None:
    # Idle OpenMP threads sleep instead of spinning while this thread maps and writes (set before
    # the kernels load; the user's own setting wins): a file-to-file soup is I/O-bound, and the
    # spinning thread took the core the kernel's page-cache work needs (8 x ViT-G/14 bf16 larger
    # than RAM read through mapped pages, alternating with the I/O floor: user time 6-8 s instead
    # of 12-15 s, wall 20.8 s instead of 22.7 s, medians of 3).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _run_distributed(args, lambda a: _soup(a, paths, coeffs))


def _run_distributed(args: argparse.Namespace, run: Callable[[argparse.Namespace], None]) -> None:
    """`run(args)`, in the process group torchrun's environment describes when there is one:
    every rank runs the command; only rank 0 reports."""
    from soupkern import distributed

    ours = distributed.init_from_environment()
    try:
        group = distributed.active()
        args.distributed = group is not None
        args.quiet = args.quiet or (group is not None and group.rank != 0)
        if group is not None and group.rank != 0:  # notices (mixed dtypes, renames...) once, from rank 0
            logging.getLogger("soupkern").setLevel(logging.ERROR)
        run(args)
    finally:
        if ours:
            distributed.shutdown()


def _soup(args: argparse.Namespace, paths: list[str], coeffs: list[float] | None) -> None:
    from soupkern import uniform_soup, weighted_soup

    paths = _renamed(args, paths)

    opts = {**_soup_opts(args), "device": args.device}
    if getattr(args, "distributed", False):
        opts["distributed"] = True
    if coeffs is None:
        report = uniform_soup(paths, args.output, **opts)
    else:
        report = weighted_soup(paths, coeffs, args.output, base=getattr(args, "base", None), **opts)
    _summary(args, report)


def _summary(args: argparse.Namespace, report: Any) -> None:
    if not args.quiet:
        where = report.paths[0] if len(report.paths) == 1 else f"{Path(args.output)}/ ({len(report.paths)} files)"
        rate = (report.bytes_read + report.bytes_written) / max(report.seconds, 1e-9)
        print(
            f"wrote {where}: {report.tensors} tensors, {_bytes(report.bytes_written)} from "
            f"{_bytes(report.bytes_read)} in {report.seconds:.2f} s "
            f"({_bytes(rate)}/s read + written, backend {report.backend})",
            file=sys.stderr,
        )


def _bytes(n: float) -> str:
    """Decimal units, as the progress bar shows them (unit_scale, divisor 1000)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def _inspect(path: str, as_json: bool) -> None:
    from soupkern.io import open_checkpoint

    with open_checkpoint(path, strip_wrappers=False) as ck:
        # a sharded checkpoint's provenance lives in its shards' headers: the first shard's, then the index's
        first = getattr(ck.files[0], "metadata", None) if len(ck.files) > 1 else None
        if isinstance(first, dict):
            ck.metadata = {**first, **ck.metadata}
        rows = [(name, info.dtype, list(info.shape), info.nbytes) for name, (_, info) in sorted(ck.tensors.items())]
        if not as_json:  # names and metadata are untrusted text: no raw control characters on a terminal
            rows = [(_printable(n), d, sh, b) for n, d, sh, b in rows]
        if as_json:
            print(strict_json.dumps({"path": ck.path, "files": [f.path for f in ck.files], "metadata": ck.metadata,
                              "tensors": [{"name": n, "dtype": d, "shape": s, "nbytes": b} for n, d, s, b in rows]}, indent=2))
            return
        width = max((len(r[0]) for r in rows), default=4)
        for name, dtype, shape, nbytes in rows:
            print(f"{name:<{width}}  {dtype:<8} {str(shape):<22} {nbytes:>14,d}")
        numel = sum(info.numel for _, info in ck.tensors.values())
        dtypes = sorted({r[1] for r in rows})
        print(f"{len(rows)} tensors in {len(ck.files)} file(s), {numel:,d} elements, {ck.nbytes:,d} bytes, dtypes {', '.join(dtypes)}")
        for key, value in sorted(ck.metadata.items()):
            print(f"metadata {_printable(key)}: {_printable(value)}")


def _printable(text: str) -> str:
    """`text` with control characters escaped (a tensor name may hold a newline or an ESC)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _greedy_inputs(args: argparse.Namespace, opts: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """(model, data, metric, score) of `soupkern greedy`, after checking every option, the
    inputs and the output (before the first evaluation)."""
    from soupkern.options import check_device
    from soupkern.recipes.weighted import check_soup_output

    if args.device is not None:
        check_device(args.device)
    check_soup_output(args.ingredients, args.output, **{k: opts[k] for k in _CHECKED})
    data, metric, score = None, args.metric, None
    if (args.score is None) == (args.data is None):
        raise SoupkernError("soupkern greedy: give exactly one of --score MODULE:FUNCTION and --data MODULE:FUNCTION")
    if args.data is not None:
        if not args.model:
            raise SoupkernError("soupkern greedy: --data needs --model MODULE:FACTORY (the model scored on the data)")
        model = load_callable(args.model, "--model")
        data = _held_out_data(args)
        if metric not in ("accuracy", "loss"):
            metric = load_callable(metric, "--metric")
    elif args.metric != "accuracy" or args.speculative not in (None, 1) or args.batch_size is not None:
        raise SoupkernError("soupkern greedy: --metric, --speculative and --batch-size apply to --data; --score "
                            "computes its own score, one soup at a time")
    elif getattr(args, "distributed", False):
        raise SoupkernError("soupkern greedy under torchrun splits the held-out data over the ranks, which an opaque "
                            "--score function does not allow: give --data MODULE:FUNCTION (with --model and --metric)")
    elif args.model:
        model = load_callable(args.model, "--model")
        score = load_callable(args.score, "--score")
    else:
        from soupkern.evaluate import module_from_checkpoint

        fn = load_callable(args.score, "--score")
        model = module_from_checkpoint(args.ingredients[0], state_dict_key=args.state_dict_key)
        score = lambda m: fn(m.state_dict())  # noqa: E731
    return model, data, metric, score


def _greedy(args: argparse.Namespace) -> None:
    from soupkern import distributed
    from soupkern.recipes.greedy import GreedyStep, greedy_soup

    opts = _soup_opts(args)
    group = distributed.active() if getattr(args, "distributed", False) else None
    if group is None:
        model, data, metric, score = _greedy_inputs(args, opts)
    else:  # every rank checks; a failure is reported once, by rank 0, and every rank exits
        model, data, metric, score = group.step(lambda: _greedy_inputs(args, opts), "checking the inputs")  # type: ignore[misc]
    names = [os.path.basename(os.path.normpath(getattr(p, "source", p))) for p in args.ingredients]

    def on_step(step: GreedyStep) -> None:
        if not args.quiet:
            verdict = "kept" if step.accepted else "skipped"
            print(f"  {names[step.ingredient]:<32} soup of {step.soup_size + 1}: {step.score:.6g}  {verdict}",
                  file=sys.stderr)

    if not args.quiet:
        print(f"greedy soup of {len(names)} ingredients (tie rule '{args.tie}'): scoring each ingredient...",
              file=sys.stderr)
    # greedy_soup reserves the output (its lock) before the first evaluation and writes the soup
    result = greedy_soup(args.ingredients, args.output, model=model, data=data, metric=metric, score=score,
                         tie=args.tie, sort=args.sort, speculative=args.speculative, device=args.device, on_step=on_step,
                         distributed=group is not None, **opts)
    n = len(result.kept)
    if not args.quiet:
        print(f"\n{'rank':>4}  {'ingredient':<32} {'score':>12}  in soup", file=sys.stderr)
        for rank, i in enumerate(result.order):
            mark = "yes" if i in result.kept else ""
            print(f"{rank + 1:>4}  {names[i]:<32} {result.ingredient_scores[i]:>12.6g}  {mark}", file=sys.stderr)
        print(f"greedy soup: {n} of {len(names)} ingredients, score {result.final_score:.6g} "
              f"(best single {result.ingredient_scores[result.order[0]]:.6g})", file=sys.stderr)
    _summary(args, result.report)


_CHECKED = ("dtype", "keys", "max_shard_size", "budget_bytes", "backend", "overwrite", "fsync", "state_dict_key",
            "copy_from", "allow_config_mismatch", "int_policy", "out_format", "lora")


def _learned(args: argparse.Namespace) -> None:
    from soupkern import distributed
    from soupkern.recipes.learned import learned_soup
    from soupkern.recipes.weighted import check_soup_output

    opts = _soup_opts(args)

    def inputs() -> tuple[Any, Any]:
        check_soup_output(args.ingredients, args.output, **{k: opts[k] for k in _CHECKED})
        return load_callable(args.model, "--model")(), _held_out_data(args)

    group = distributed.active() if getattr(args, "distributed", False) else None
    # every rank checks; a failure is reported once, by rank 0, and every rank exits
    model, data = inputs() if group is None else group.step(inputs, "checking the inputs")  # type: ignore[misc]
    # learned_soup reserves the output (its lock) before it trains
    result = learned_soup(args.ingredients, args.output, model=model, data=data, mode=args.mode, epochs=args.epochs,
                          lr=args.lr, seed=args.seed, distributed=group is not None,
                          **{k: opts[k] for k in _CHECKED})
    if not args.quiet:
        print(result.to_table(), file=sys.stderr)
    _summary(args, result.report)


def _interpolate(args: argparse.Namespace) -> None:
    from soupkern import distributed, strict_json
    from soupkern.analysis import interpolation_curve
    from soupkern.recipes.weighted import check_soup_output, reserved_by_rank_0, weighted_soup

    opts = _soup_opts(args)

    def inputs() -> tuple[Any, Any]:
        check_soup_output([args.a, args.b], args.output, **{k: opts[k] for k in _CHECKED})
        if args.plot is not None:
            _check_plot_path(args.plot)
        return load_callable(args.model, "--model")(), _held_out_data(args)

    group = distributed.active() if getattr(args, "distributed", False) else None
    # every rank checks; a failure is reported once, by rank 0, and every rank exits
    model, data = inputs() if group is None else group.step(inputs, "checking the inputs")  # type: ignore[misc]
    # a concurrent run on this output is refused before the evaluations (rank 0 holds the lock)
    with reserved_by_rank_0(args.output, group):
        curve = interpolation_curve(args.a, args.b, model, data, alphas=args.alphas, distributed=group is not None)
        scores = curve.scores[args.metric]
        pick = min if args.metric == "loss" else max
        best = curve.alphas[scores.index(pick(scores))]
        alpha = best if args.alpha is None else args.alpha
        if not args.quiet:
            print(curve.to_table(), file=sys.stderr)
            print(f"best alpha by {args.metric}: {best:.4g}; writing the soup at alpha = {alpha:.4g}", file=sys.stderr)
        meta = {"soupkern.interpolate.alpha": repr(alpha),
                "soupkern.interpolate.curve": strict_json.dumps(curve.to_dict())}

        def finish() -> Any:  # every rank holds the same curve: rank 0 plots and writes
            if args.plot is not None:
                _plot_curve(curve, args.plot, alpha)
            return weighted_soup([args.a, args.b], [1.0 - alpha, alpha], args.output, recipe="interpolate",
                                 metadata=meta, **opts)

        if group is None:
            report = finish()
        else:
            report = group.on_rank_0(finish, "writing the soup", long=True)
    _summary(args, report)


def _check_plot_path(path: str) -> None:
    if not path:
        raise SoupkernError("--plot needs a file name, e.g. curve.png")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SoupkernError(f"--plot {path}: the folder {folder} does not exist")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SoupkernError("--plot needs matplotlib (pip install matplotlib)") from None


def _plot_curve(curve: Any, path: str, alpha: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(curve.scores)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        ax.plot(curve.alphas, curve.scores[m], marker="o")
        ax.axvline(alpha, color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel("alpha  (0 = A, 1 = B)")
        ax.set_ylabel(f"held-out {m}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _analyze(args: argparse.Namespace) -> None:
    from soupkern.analysis import delta_gram
    from soupkern.options import ingredient_paths

    ingredient_paths(args.ingredients)

    result = delta_gram(args.ingredients, args.base)
    if args.json:
        print(strict_json.dumps(result.to_dict(), indent=2))
    else:
        print(result.to_table())


def _backends() -> None:
    from soupkern.backends import available_backends

    for status in available_backends().values():
        print(f"{status.name:<8} {'yes' if status.available else 'no ':<4} {status.reason}")


class _Notices(logging.Handler):
    """soupkern's warnings (e.g. a stale temporary file removed) as one stderr line each."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"soupkern: notice: {record.getMessage()}", file=sys.stderr)


class _SafeStream:
    """stderr that never raises: a closed or full stderr must not turn a finished soup into a
    failure (exit status 1) or a traceback."""

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError, AttributeError):
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError, AttributeError):
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    from soupkern import distributed

    real_stderr = sys.stderr
    sys.stderr = _SafeStream(real_stderr)  # type: ignore[assignment]
    try:
        code = _main(argv)
    finally:
        sys.stderr.flush()
        sys.stderr = real_stderr
    if distributed.JOINED:  # a torchrun rank ends without the interpreter's finalization: see hard_exit
        distributed.hard_exit(code)
    return code


def _main(argv: Sequence[str] | None) -> int:
    from soupkern.io.atomic import signals_raise

    args = build_parser().parse_args(argv)
    logger = logging.getLogger("soupkern")
    handler = _Notices(logging.WARNING)
    logger.addHandler(handler)
    try:
        # SIGTERM/SIGHUP anywhere in the command (evaluations, header parsing) end it with the
        # documented message and status instead of a silent default death
        with signals_raise(lambda signum: Interrupted(signum)):
            return _dispatch(args)
    except SoupkernError as e:
        from soupkern.distributed import PeerFailed

        if isinstance(e, PeerFailed):  # another rank failed: rank 0 says which and why, the others stay quiet
            if e.own_rank == 0:
                print(f"soupkern: error: {_one_line(e)}", file=sys.stderr)
            return e.exit_code
        print(f"soupkern: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. permission denied on the output folder
        if isinstance(e, BrokenPipeError):
            return _broken_pipe()
        print(f"soupkern: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:
        what = ("the output was already complete: " + ", ".join(map(str, e.committed))) if e.committed \
            else "no output was written or replaced"
        print(f"soupkern: stopped by {e.signame}; {what}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("soupkern: interrupted; no output was written or replaced", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        logger.removeHandler(handler)


def _check_workdir(workdir: str) -> None:
    if not workdir.strip():
        raise SoupkernError("--workdir: an empty path is not a folder")
    p = Path(workdir)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise SoupkernError(f"--workdir {workdir}: {q} is not a folder")
            break


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n")).strip() or type(e).__name__


def _broken_pipe() -> int:
    """The reader of our stdout went away (`| head`): stop quietly, as `cat` would."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 128 + signal.SIGPIPE


def _dispatch(args: argparse.Namespace) -> int:
    try:
        if args.command == "uniform":
            _run_soup(args, list(args.ingredients), None)
        elif args.command == "weighted":
            paths, coeffs = parse_weighted(args.ingredients)
            _run_soup(args, paths, coeffs)
        elif args.command == "inspect":
            _inspect(args.path, args.json)
        elif args.command == "backends":
            _backends()
        elif args.command == "greedy":
            args.ingredients = _renamed(args, list(args.ingredients))
            _run_distributed(args, _greedy)
        elif args.command == "learned":
            args.ingredients = _renamed(args, list(args.ingredients))
            _run_distributed(args, _learned)
        elif args.command == "analyze":
            _analyze(args)
        elif args.command == "interpolate":
            args.a, args.b = _renamed(args, [args.a, args.b])
            _run_distributed(args, _interpolate)
        elif args.command == "demo":
            from soupkern.demo import DemoConfig, run_demo

            _check_workdir(args.workdir)
            return run_demo(Path(args.workdir), DemoConfig.fast() if args.fast else None, quiet=args.quiet)
        sys.stdout.flush()
    except BrokenPipeError:
        return _broken_pipe()
    except OSError as e:
        if e.filename is None and e.errno in (errno.ENOSPC, errno.EIO, errno.EBADF, errno.EDQUOT):
            raise SoupkernError(f"writing to standard output failed ({e.strerror})") from None
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
