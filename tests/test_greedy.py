"""Greedy soup: the rule against independent implementations, speculation, the written soup."""

from __future__ import annotations

import json
import math
import operator
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
import numpy as np
import torch

import soupkern
from digits_fixtures import digits_dir, digits_ingredients, digits_splits  # noqa: F401
from safetensors import safe_open
from safetensors.torch import load_file

from soupkern.errors import InputError, MismatchError
from soupkern.evaluate import Evaluator
from soupkern.examples import digits
from soupkern.recipes.greedy import RECOMPUTE_MAX, GreedyResult, greedy_select, greedy_soup, sort_order

U32 = 2.0**-24


# ----------------------------------------------------------------------------- the rule alone
def naive_greedy(order: Sequence[int], table: dict[frozenset[int], float], tie: str,
                 maximize: bool) -> tuple[list[int], list[tuple[int, float, bool]]]:
    """Sequential greedy written from the paper, scores looked up by the set of souped ingredients."""
    sign = 1 if maximize else -1
    kept = [order[0]]
    best = table[frozenset(kept)]
    steps = []
    for j in order[1:]:
        s = table[frozenset(kept + [j])]
        ok = sign * s >= sign * best if tie == "ge" else sign * s > sign * best
        steps.append((j, s, ok))
        if ok:
            kept.append(j)
            best = s
    return kept, steps


def _random_table(order: Sequence[int], rng: random.Random, levels: int) -> dict[frozenset[int], float]:
    """A score for every soup greedy can form: each subset of the order that contains order[0]."""
    rest = list(order[1:])
    table = {}
    for mask in range(1 << len(rest)):
        key = frozenset([order[0]] + [rest[i] for i in range(len(rest)) if mask >> i & 1])
        table[key] = rng.randrange(levels) / levels if rng.random() > 0.02 else math.nan
    return table


def test_speculative_equals_sequential_on_random_tables() -> None:
    rng = random.Random(1234)
    checked = differ = wasted = 0
    for trial in range(2000):
        k = rng.randint(1, 9)
        order = list(range(k))
        rng.shuffle(order)
        table = _random_table(order, rng, rng.choice([2, 3, 5, 50]))  # few distinct scores: many ties
        for tie in ("ge", "gt"):
            for maximize in (True, False):
                ref_kept, ref_steps = naive_greedy(order, table, tie, maximize)
                windows: list[tuple[tuple[int, ...], list[int]]] = []

                def scorer(kept: tuple[int, ...], window: Sequence[int]) -> list[float]:
                    windows.append((kept, list(window)))
                    return [table[frozenset(kept) | {j}] for j in window]

                for spec in (1, 2, 3, 4, 8):
                    windows.clear()
                    steps, kept, best, evaluated = greedy_select(order, table[frozenset(order[:1])], scorer,
                                                                 tie=tie, maximize=maximize,  # type: ignore[arg-type]
                                                                 speculative=spec)
                    assert kept == ref_kept, (trial, tie, maximize, spec)
                    got = [(st.ingredient, st.score, st.accepted) for st in steps]
                    assert len(got) == len(ref_steps)
                    for (j, sc, ok), (rj, rsc, rok) in zip(got, ref_steps):
                        assert j == rj and ok == rok and (sc == rsc or (math.isnan(sc) and math.isnan(rsc)))
                    assert best == table[frozenset(kept)] or math.isnan(best)
                    assert all(len(w) <= spec for _, w in windows)
                    assert evaluated == sum(len(w) for _, w in windows) >= len(order) - 1
                    wasted += evaluated - (len(order) - 1)
                    checked += 1
            differ += naive_greedy(order, table, "ge", True)[0] != naive_greedy(order, table, "gt", True)[0]
    assert checked == 2000 * 4 * 5
    assert differ > 100  # the random tables really exercise the tie rule
    assert wasted > 0  # and speculation really discarded candidates after acceptances


def test_sort_order_tie_rules() -> None:
    scores = [0.5, 0.9, 0.7, 0.9, 0.5]
    assert sort_order(scores) == [1, 3, 2, 0, 4]  # stable: equal scores in input order
    # model-soups main.py: sorted(items, key=score) then .reverse() -> equal scores in reverse input order
    items = sorted(enumerate(scores), key=operator.itemgetter(1))
    items.reverse()
    assert sort_order(scores, sort="model-soups") == [i for i, _ in items] == [3, 1, 2, 4, 0]
    assert sort_order(scores, maximize=False) == [0, 4, 2, 1, 3]
    with pytest.raises(InputError, match="NaN"):
        sort_order([0.1, math.nan])
    with pytest.raises(InputError):
        greedy_select([0], 0.0, lambda k, w: [], tie="eq")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- real models
def reference_greedy(paths: Sequence[Path], model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                     tie: str, sort: str) -> tuple[list[int], list[float], dict[str, torch.Tensor]]:
    """The model-soups main.py greedy loop, written from scratch: whole state dicts, dict arithmetic,
    load_state_dict, evaluate. Returns (kept indices, ingredient accuracies, final soup)."""

    def acc(sd: dict[str, torch.Tensor]) -> float:
        model.load_state_dict(sd)
        with torch.no_grad():
            return int((model(x).argmax(1) == y).sum()) / len(y)

    accs = [acc(load_file(str(p))) for p in paths]
    if sort == "model-soups":
        ranked = sorted(enumerate(accs), key=operator.itemgetter(1))
        ranked.reverse()
    else:
        ranked = sorted(enumerate(accs), key=lambda t: -t[1])
    order = [i for i, _ in ranked]
    kept = [order[0]]
    soup = load_file(str(paths[order[0]]))
    best = accs[order[0]]
    for i in order[1:]:
        new = load_file(str(paths[i]))
        n = len(kept)
        candidate = {k: soup[k].clone() * (n / (n + 1.0)) + new[k].clone() * (1.0 / (n + 1)) for k in new}
        a = acc(candidate)
        if (a >= best) if tie == "ge" else (a > best):
            kept.append(i)
            best = a
            soup = candidate
    return kept, accs, soup


@pytest.mark.parametrize("n_val", [100, 150, 359])
def test_picks_equal_reference_implementation(digits_ingredients: list[Path], digits_splits: digits.Splits,
                                              n_val: int) -> None:
    # small held-out subsets make ties between ingredients and between candidate and best soup likely
    x, y = digits_splits.val.x[:n_val], digits_splits.val.y[:n_val]
    data = [(x, y)]
    picks = {}
    for tie in ("ge", "gt"):
        for sort in ("stable", "model-soups"):
            ref_kept, ref_accs, ref_soup = reference_greedy(digits_ingredients, digits.make_model(), x, y, tie, sort)
            for spec in (1, 4):
                model = digits.make_model()
                r = greedy_soup(digits_ingredients, model=model, data=data, tie=tie, sort=sort,  # type: ignore[arg-type]
                                speculative=spec)
                assert list(r.kept) == ref_kept, (tie, sort, spec)
                assert list(r.ingredient_scores) == ref_accs
                # final soups: fp32 sum / n here, the reference's running mean m*n/(n+1) + x/(n+1) there;
                # each is within about 3 n u max|x| of the exact mean (a few roundings per step), n <= 8
                n = len(ref_kept)
                kept_states = [load_file(str(digits_ingredients[i])) for i in ref_kept]
                for k, v in model.state_dict().items():
                    scale = max(float(s[k].abs().max()) for s in kept_states)
                    assert float((v - ref_soup[k]).abs().max()) <= 6 * n * U32 * scale, k
            picks[tie, sort] = tuple(ref_kept)
    if n_val == 150:  # this subset exercises both tie rules: they must lead to different soups
        assert picks["ge", "model-soups"] != picks["gt", "model-soups"]


def test_written_soup_and_metadata(digits_ingredients: list[Path], digits_splits: digits.Splits,
                                   tmp_path: Path) -> None:
    model = digits.make_model()
    out = tmp_path / "greedy.safetensors"
    # loss (lower is better) through the speculative path
    r = greedy_soup(digits_ingredients, out, model=model, data=digits.batches(digits_splits.val, 128),
                    metric="loss", speculative=4)
    assert isinstance(r, GreedyResult) and r.report is not None and not r.maximize
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        written = {k: f.get_tensor(k) for k in f.keys()}
    names = [str(p) for p in digits_ingredients]
    assert meta["soupkern.recipe"] == "greedy"
    assert json.loads(meta["soupkern.greedy.kept"]) == [names[i] for i in r.kept]
    assert json.loads(meta["soupkern.ingredients"]) == [names[i] for i in r.kept]
    assert meta["soupkern.greedy.tie"] == "ge"
    steps = json.loads(meta["soupkern.greedy.steps"])
    assert [(s["ingredient"], s["score"], s["accepted"]) for s in steps] == [
        (names[s.ingredient], s.score, s.accepted) for s in r.steps]
    assert json.loads(meta["soupkern.greedy.ingredient_scores"]) == {names[i]: r.ingredient_scores[i] for i in r.order}
    assert json.loads(meta["soupkern.greedy.final_score"]) == r.final_score
    # the model holds the in-memory soup round(fp32 sum / n); its score is final_score
    ev = Evaluator(model, digits.batches(digits_splits.val, 128), metric="loss")
    # final_score came from a batched (vmap) pass: equal to a plain evaluation up to fp32 rounding
    assert math.isclose(ev.score(), r.final_score, rel_tol=1e-5)
    states = [load_file(str(digits_ingredients[i])) for i in r.kept]
    n = len(states)
    for k, v in model.state_dict().items():
        total = torch.zeros_like(states[0][k])
        for s in states:
            total = total + s[k]
        assert torch.equal(v, total / n)  # the contract, bit for bit
        # the engine writes fma(1/n, x_k, acc): same value up to fp32 accumulation rounding; bound:
        # each of the two is within n * u * sum|x_k| / n of the exact mean (plus 1/n's rounding)
        bound = 2 * (n + 1) * U32 * sum(s[k].abs() for s in states) / n
        assert bool(((written[k] - v).abs() <= bound).all()), k
        if n & (n - 1) == 0:  # n a power of two: 1/n is exact, so both give identical bits
            assert torch.equal(written[k], v)


@pytest.mark.parametrize("count", range(1, 10))
def test_written_soup_is_the_scored_soup_for_every_count(digits_ingredients: list[Path], digits_splits: digits.Splits,
                                                         tmp_path: Path, count: int) -> None:
    """Every candidate is the uniform soup of its ingredients under the engine's exact contract, so
    the file written for K kept ingredients is the last scored soup bit for bit, K = 1..9 (past
    RECOMPUTE_MAX = 8 the candidates come from the fp64 running sum instead of the files)."""
    paths = list(digits_ingredients[:count])
    if count > len(paths):  # a ninth ingredient: a copy of the first under another name
        shutil.copyfile(paths[0], tmp_path / "ninth.safetensors")
        paths.append(tmp_path / "ninth.safetensors")
        assert count > RECOMPUTE_MAX  # so this count takes the running-sum path
    assert len(paths) == count
    model = digits.make_model()
    seen = []

    def score(m: torch.nn.Module) -> float:
        seen.append({k: v.clone() for k, v in m.state_dict().items()})
        return 1.0  # ties: tie="ge" keeps every candidate

    out = tmp_path / "all.safetensors"
    r = greedy_soup(paths, out, model=model, score=score, ingredient_scores=[0.5] * count)
    assert list(r.kept) == list(range(count))
    written = load_file(str(out))
    for k, v in model.state_dict().items():
        assert torch.equal(written[k], v), k
        if count > 1:
            assert torch.equal(written[k], seen[-1][k]), k
    # and it is the uniform soup the engine writes for those files
    assert all(torch.equal(written[k], v) for k, v in soupkern.uniform_state_dict(paths).items())


def test_tie_gt_keeps_only_the_best(digits_ingredients: list[Path], digits_splits: digits.Splits) -> None:
    model = digits.make_model()
    r = greedy_soup(digits_ingredients, model=model, score=lambda m: 1.0, tie="gt",
                    ingredient_scores=[1.0] * len(digits_ingredients))
    assert list(r.kept) == [0] and all(not s.accepted for s in r.steps)


def test_bf16_candidates_follow_the_contract(digits_dir: Path, digits_splits: digits.Splits, tmp_path: Path) -> None:
    import shutil

    from soupkern.reference import decode, encode

    shutil.copy(digits_dir / digits.BASE_NAME, tmp_path / digits.BASE_NAME)  # reuse the cached init
    paths = digits.make_ingredients(tmp_path, 3, 0, dtype="BF16")
    model = digits.make_model().to(torch.bfloat16)
    seen = []

    def score(m: torch.nn.Module) -> float:
        seen.append({k: v.clone() for k, v in m.state_dict().items()})
        return 3.0  # ties with the first ingredient's given score: tie="ge" keeps every candidate

    greedy_soup(paths, model=model, score=score, ingredient_scores=[3.0, 2.0, 1.0])
    states = [load_file(str(p)) for p in paths]
    # candidate 1 = round_bf16((x0 + x1) / 2), candidate 2 = round_bf16((x0 + x1 + x2) / 3): fp64
    # sum and division, one rounding (numpy's independent fp64 -> bf16 rounding in reference.py)
    assert len(seen) == 2
    for cand, members in zip(seen, ([0, 1], [0, 1, 2])):
        for k, v in cand.items():
            raw = [states[i][k].contiguous().view(torch.int16).numpy().reshape(-1).view(np.uint8) for i in members]
            total = decode(raw[0], "BF16")
            for r in raw[1:]:
                total = total + decode(r, "BF16")
            want = encode(total / len(members), "BF16")
            assert np.array_equal(v.contiguous().view(torch.int16).numpy().reshape(-1).view(np.uint8), want), k


def test_score_callable_and_errors(digits_ingredients: list[Path], digits_splits: digits.Splits,
                                   tmp_path: Path) -> None:
    def score(m: torch.nn.Module) -> float:
        return digits.accuracy(m, *digits_splits.val)

    r = greedy_soup(digits_ingredients, model=digits.make_model(), score=score)
    ref = greedy_soup(digits_ingredients, model=digits.make_model(), data=[digits_splits.val], speculative=1)
    assert r.kept == ref.kept and r.speculative == 1
    with pytest.raises(InputError, match="speculative"):
        greedy_soup(digits_ingredients, model=digits.make_model(), score=score, speculative=4)
    with pytest.raises(InputError, match="2 ingredient scores"):
        greedy_soup(digits_ingredients, model=digits.make_model(), score=score, ingredient_scores=[1.0, 2.0])
    # an ingredient with a different shape is refused, naming the file and the tensor
    bad = load_file(str(digits_ingredients[1]))
    bad["head.bias"] = torch.zeros(11)
    bad_path = digits.save_ingredient(bad, tmp_path / "bad.safetensors")
    with pytest.raises(MismatchError, match=r"bad\.safetensors.*head\.bias"):
        greedy_soup([digits_ingredients[0], bad_path], model=digits.make_model(), score=score,
                    ingredient_scores=[1.0, 0.0])
    # a model without one of the ingredients' tensors is refused
    small = digits.DigitsMLP(hidden=16)
    with pytest.raises(MismatchError, match="fc1"):
        greedy_soup(digits_ingredients, model=small, score=score)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_greedy_on_gpu_matches_cpu(digits_ingredients: list[Path], digits_splits: digits.Splits) -> None:
    data = digits.batches(digits_splits.val, 128)
    cpu_model = digits.make_model()
    cpu = greedy_soup(digits_ingredients, model=cpu_model, data=data, speculative=4)
    gpu_model = digits.make_model()
    gpu = greedy_soup(digits_ingredients, model=gpu_model, data=data, speculative=4, device="cuda")
    assert gpu.kept == cpu.kept
    for k, v in gpu_model.state_dict().items():
        assert torch.equal(v.cpu(), cpu_model.state_dict()[k])  # same fp32 adds and division: same bits


def test_default_speculation_follows_the_cost_of_a_pass(digits_ingredients: list[Path],
                                                        digits_splits: digits.Splits) -> None:
    """In-memory batches on a CPU: sequential (batched passes measured slower there); a DataLoader:
    speculative. The picks are the same either way."""
    in_memory = greedy_soup(digits_ingredients, model=digits.make_model(), data=digits.batches(digits_splits.val))
    loader = greedy_soup(digits_ingredients, model=digits.make_model(), data=digits.make_loader(digits_splits.val))
    assert in_memory.speculative == 1 and loader.speculative > 1
    assert in_memory.kept == loader.kept


def test_every_candidate_strategy_gives_the_same_soup(digits_ingredients: list[Path], digits_splits: digits.Splits,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Candidates recomputed from the files (few ingredients), formed from in-memory fp64 sums, or
    from file-backed sums, and a switch between them mid-run: the same picks and every bit of the
    soup (and the candidates a scorer sees) alike."""
    import soupkern.recipes.greedy as greedy_mod

    held_out = digits.batches(digits_splits.val, 128)
    runs = []
    for recompute_max, in_memory in ((8, greedy_mod.STATE_IN_MEMORY_BYTES), (0, greedy_mod.STATE_IN_MEMORY_BYTES),
                                     (0, 0), (3, 0)):
        monkeypatch.setattr(greedy_mod, "RECOMPUTE_MAX", recompute_max)
        monkeypatch.setattr(greedy_mod, "STATE_IN_MEMORY_BYTES", in_memory)
        seen: list[bytes] = []

        def score(m: torch.nn.Module) -> float:
            seen.append(b"".join(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                                 for t in m.state_dict().values()))
            return 1.0

        out = tmp_path / f"g{recompute_max}_{in_memory}.safetensors"
        r = greedy_soup(digits_ingredients, out, model=digits.make_model(), score=score,
                        ingredient_scores=[0.5] * len(digits_ingredients))
        g = greedy_soup(digits_ingredients, model=digits.make_model(), data=held_out, speculative=1)
        runs.append((r.kept, seen, load_file(str(out)), g.kept, g.final_score))
    for other in runs[1:]:
        assert other[0] == runs[0][0] and other[1] == runs[0][1] and other[3:] == runs[0][3:]
        assert all(torch.equal(other[2][k], runs[0][2][k]) for k in runs[0][2])
    assert not [p for p in tmp_path.iterdir() if "greedy-sums" in p.name]


def test_file_backed_sums_without_space_fail_before_any_evaluation(digits_ingredients: list[Path], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    import soupkern.recipes.greedy as greedy_mod

    monkeypatch.setattr(greedy_mod, "RECOMPUTE_MAX", 0)
    monkeypatch.setattr(greedy_mod, "STATE_IN_MEMORY_BYTES", 0)

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(greedy_mod.os, "posix_fallocate", no_space)
    calls: list[int] = []
    with pytest.raises(soupkern.OutputError, match="cannot reserve .* running sums"):
        greedy_soup(digits_ingredients, tmp_path / "g.safetensors", model=digits.make_model(),
                    score=lambda m: calls.append(1) or 1.0)
    assert calls == [] and not list(tmp_path.iterdir())


def test_staged_device_copies_give_the_same_soup(digits_ingredients: list[Path], digits_splits: digits.Splits,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The pinned double-buffered copies a GPU run moves ingredients with (here their synchronous
    CPU stand-in, with pieces far smaller than a tensor so tensors are cut and reassembled) give
    the same picks and the same soup bits as zero-copy views."""
    import soupkern.recipes.greedy as greedy_mod

    held_out = digits.batches(digits_splits.val, 128)
    monkeypatch.setattr(greedy_mod, "RECOMPUTE_MAX", 0)  # candidates from the running sum: every read staged
    plain_model = digits.make_model()
    plain = greedy_soup(digits_ingredients, model=plain_model, data=held_out)
    made: list[greedy_mod._Staged] = []

    def staging(device: torch.device) -> greedy_mod._Staged:
        made.append(greedy_mod._Staged(device, piece_bytes=1000))
        return made[-1]

    monkeypatch.setattr(greedy_mod, "_staging_for", staging)
    staged_model = digits.make_model()
    staged = greedy_soup(digits_ingredients, model=staged_model, data=held_out)
    assert made and made[0].pieces > len(digits_ingredients) * len(plain_model.state_dict())  # tensors were cut
    assert staged.kept == plain.kept and staged.ingredient_scores == plain.ingredient_scores
    for (name, a), b in zip(plain_model.state_dict().items(), staged_model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("speculative", [1, 3])
def test_prefetched_ingredients_give_the_same_picks_and_soup(digits_ingredients: list[Path],
                                                             digits_splits: digits.Splits,
                                                             monkeypatch: pytest.MonkeyPatch, speculative: int) -> None:
    """On a GPU the next ingredients are read on a worker thread while the current candidates are
    evaluated. Here the same prefetcher on the CPU (its synchronous staging stand-in): the reads
    are taken from it, and the picks and soup bits equal a run without it."""
    import soupkern.recipes.greedy as greedy_mod

    held_out = digits.batches(digits_splits.val, 128)
    monkeypatch.setattr(greedy_mod, "RECOMPUTE_MAX", 0)  # every candidate read through _each_tensor
    plain_model = digits.make_model()
    plain = greedy_soup(digits_ingredients, model=plain_model, data=held_out, speculative=speculative)
    made: list[greedy_mod._Prefetcher] = []

    def prefetcher(soup: greedy_mod._RunningSoup, ahead: int) -> greedy_mod._Prefetcher:
        made.append(greedy_mod._Prefetcher(soup, 3, greedy_mod._Staged(soup.device, piece_bytes=4096)))
        return made[-1]

    monkeypatch.setattr(greedy_mod, "_prefetcher_for", prefetcher)
    model = digits.make_model()
    got = greedy_soup(digits_ingredients, model=model, data=held_out, speculative=speculative)
    assert made and made[0].taken >= len(digits_ingredients)  # every ingredient's own score read ahead, at least
    assert got.kept == plain.kept and got.steps == plain.steps
    for (name, a), b in zip(plain_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_prefetched_read_that_fails_is_reported_at_its_turn(digits_ingredients: list[Path], tmp_path: Path) -> None:
    """An ingredient that changes after it was checked fails its prefetched read; the error names
    the file when that ingredient is taken, not before, and the prefetcher shuts down cleanly."""
    import soupkern.recipes.greedy as greedy_mod

    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for src, dst in zip(digits_ingredients, paths):
        shutil.copyfile(src, dst)
    ev = soupkern.Evaluator(digits.make_model(), score=lambda m: 1.0)
    soup = greedy_mod._RunningSoup(ev, paths)
    soup.prefetcher = greedy_mod._Prefetcher(soup, 2, greedy_mod._Staged(soup.device))
    try:
        paths[1].write_bytes(b"not a checkpoint")
        soup.prefetch([0, 1, 2])
        xs = soup.prefetcher.take(0)
        assert xs is not None and set(xs) <= set(soup.names)
        with pytest.raises(soupkern.SoupkernError, match="1.safetensors"):
            soup.prefetcher.take(1)
    finally:
        soup.close()
    assert soup.prefetcher.pool._shutdown  # type: ignore[attr-defined]
