"""Soups of Hugging Face checkpoints that load straight back (tiny Llama models built from a
config; no hub downloads): save_pretrained folders (sharded) in, a folder out that
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load with no missing
or unexpected keys, holding exactly the correctly rounded mean of the ingredients' weights.

Exactness: every weight is fp32 and the soup of 3 is round(fp64 sum / 3), which torch computes
the same way here ((a + b + c) in fp64 is exact for these magnitudes, then one division and one
rounding), so weights compare bit for bit and logits of the same weights on the same CPU too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import soupkern


def config(tied: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                       tie_word_embeddings=tied)


def make_ingredients(folder: Path, tied: bool, k: int = 3) -> tuple[list[Path], list[LlamaForCausalLM]]:
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(32)},
                                                                              unk_token="t0")), unk_token="t0")
    paths, ms = [], []
    for i in range(k):
        torch.manual_seed(i)
        m = LlamaForCausalLM(config(tied))
        p = folder / f"ing{i}"
        m.save_pretrained(p, max_shard_size="20KB")  # sharded: index + shards
        tok.save_pretrained(p)
        paths.append(p)
        ms.append(m)
    return paths, ms


def mean_model(ms: list[LlamaForCausalLM], tied: bool) -> LlamaForCausalLM:
    ref = LlamaForCausalLM(config(tied))
    sds = [m.state_dict() for m in ms]
    ref.load_state_dict({k: (sum(sd[k].double() for sd in sds) / len(sds)).to(sds[0][k].dtype) for k in sds[0]})
    return ref.eval()


@pytest.mark.parametrize("tied", [False, True])
def test_soup_of_save_pretrained_folders_loads(tmp_path: Path, tied: bool) -> None:
    paths, ms = make_ingredients(tmp_path, tied)
    assert (paths[0] / "model.safetensors.index.json").exists()
    out = tmp_path / "soup"
    r = subprocess.run([sys.executable, "-m", "soupkern", "uniform", *map(str, paths), "-o", f"{out}/", "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("t5") == 5
    ref = mean_model(ms, tied)
    got_sd, ref_sd = model.state_dict(), ref.state_dict()
    for name in ref_sd:
        assert torch.equal(got_sd[name], ref_sd[name]), name
    ids = torch.tensor([[1, 5, 7, 3]])
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids).logits, ref(ids).logits, rtol=0, atol=1e-6)


def test_tied_model_saved_both_ways(tmp_path: Path) -> None:
    """save_pretrained stores the embedding only, safetensors' save_model the head only: the two
    forms soup together, nothing is dropped, and the soup loads tied."""
    paths, ms = make_ingredients(tmp_path, tied=True, k=2)
    save_model(ms[1], str(tmp_path / "other.safetensors"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "other.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    assert ("lm_head.weight" in stored) != ("model.embed_tokens.weight" in stored)
    out = tmp_path / "soup"
    soupkern.uniform_soup([paths[0], tmp_path / "other.safetensors"], f"{out}/")
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ref = mean_model(ms, tied=True)
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_greedy_with_a_tied_model(tmp_path: Path) -> None:
    """Recipes that load soups into a model (greedy, learned, ensembles) accept checkpoints that
    store one name of a tied pair."""
    paths, ms = make_ingredients(tmp_path, tied=True)
    ids = torch.tensor([[1, 5, 7, 3, 2, 9]])

    def score(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return -float(model(ids, labels=ids).loss)

    result = soupkern.greedy_soup(paths, f"{tmp_path}/greedy/", model=lambda: LlamaForCausalLM(config(True)),
                                  score=score)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "greedy", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert score(model.eval()) == result.final_score


def test_ddp_prefix_and_pickle_ingredients(tmp_path: Path) -> None:
    paths, ms = make_ingredients(tmp_path, tied=False, k=2)
    torch.save({"model": {f"module.{k}": v for k, v in ms[1].state_dict().items()}, "step": 3},
               tmp_path / "ddp.pt")
    out = tmp_path / "soup"
    soupkern.uniform_soup([paths[0], tmp_path / "ddp.pt"], f"{out}/")
    model = AutoModelForCausalLM.from_pretrained(out)
    ref = mean_model(ms, tied=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.state_dict().items())
    assert sorted(os.listdir(out)) == sorted(["README.md", "config.json", "generation_config.json", "model.safetensors",
                                              "tokenizer.json", "tokenizer_config.json"])


def test_lora_adapters_concatenated_along_the_rank(tmp_path: Path) -> None:
    """PEFT adapters of ranks 2 and 4 on one base: the default refuses factor-wise averaging; --lora
    concat writes an adapter folder PeftModel.from_pretrained loads, whose merged update equals
    Σ c_k s_k B_k A_k computed in fp64 (tolerance: the merge multiplies B·A in fp32, 6 terms of
    magnitude ≤ max|B||A|, so a few fp32 ulps of the largest product)."""
    import json

    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    torch.manual_seed(0)
    LlamaForCausalLM(config(False)).save_pretrained(tmp_path / "base")
    adapters = []
    for i, (r, alpha) in enumerate([(2, 8), (4, 4)]):
        m = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                           LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"]))
        for name, p in m.named_parameters():
            if "lora_" in name:
                p.data.normal_()
        m.save_pretrained(tmp_path / f"ad{i}")
        adapters.append(tmp_path / f"ad{i}")
    refused = subprocess.run([sys.executable, "-m", "soupkern", "uniform", *map(str, adapters), "-o",
                              f"{tmp_path}/x/"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--lora concat" in refused.stderr
    c = [0.25, 0.75]
    r = subprocess.run([sys.executable, "-m", "soupkern", "weighted", f"{adapters[0]}:{c[0]}", f"{adapters[1]}:{c[1]}",
                        "--lora", "concat", "-o", f"{tmp_path}/soup/", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "soup" / "adapter_config.json").read_text())["r"] == 6
    loud = subprocess.run([sys.executable, "-m", "soupkern", "uniform", *map(str, adapters), "--lora", "concat", "-o",
                           f"{tmp_path}/soup2/"], capture_output=True, text=True)
    written = load_file(str(tmp_path / "soup2" / "adapter_model.safetensors"))
    assert loud.returncode == 0 and f": {len(written)} tensors, " in loud.stderr, loud.stderr  # the summary counts them
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    before = {n: p.detach().double().clone() for n, p in base.named_parameters()}
    merged = PeftModel.from_pretrained(base, tmp_path / "soup").merge_and_unload()
    key = "model.layers.1.self_attn.v_proj"
    want = torch.zeros_like(before[key + ".weight"])
    for ck, ad in zip(c, adapters):
        sd = load_file(str(ad / "adapter_model.safetensors"))
        cfg = json.loads((ad / "adapter_config.json").read_text())
        pre = f"base_model.model.{key}"
        want += ck * cfg["lora_alpha"] / cfg["r"] * (sd[pre + ".lora_B.weight"].double() @ sd[pre + ".lora_A.weight"].double())
    got = dict(merged.named_parameters())[key + ".weight"].double() - before[key + ".weight"]
    assert torch.allclose(got, want, rtol=0, atol=8 * 2**-24 * float(want.abs().max()) * 6)
