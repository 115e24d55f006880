"""A soup of model folders is a model folder: non-weight files copied byte for byte from one
ingredient, configs checked for the same architecture first, a model card, provenance that lets
--force replace the folder later. (Loading with transformers is tested where it is installed.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import soupkern
from soupkern.cli import main

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "num_hidden_layers": 2,
          "num_attention_heads": 2, "vocab_size": 10, "tie_word_embeddings": False}


def make_folder(path: Path, seed: int, config: dict | None = None, vocab: int = 5) -> Path:
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(4, 4, generator=g), "b": torch.randn(4, generator=g)}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config or CONFIG))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": seed}))
    (path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {f"t{i}": i for i in range(vocab)}},
                                                     "added_tokens": []}))
    (path / "chat_template.jinja").write_text("{{ messages }}")
    (path / "README.md").write_text("the ingredient's own card")
    (path / ".gitattributes").write_text("*.safetensors filter=lfs")
    (path / "trainer_state.json").write_text("{}")
    (path / "optimizer.pt").write_bytes(b"not copied")
    (path / "sub").mkdir()
    (path / "sub" / "x.json").write_text("{}")
    return path


@pytest.fixture
def folders(tmp_path: Path) -> list[Path]:
    return [make_folder(tmp_path / f"m{i}", i) for i in range(3)]


COPIED = ["chat_template.jinja", "config.json", "generation_config.json", "tokenizer.json"]


def test_folder_soup_is_a_model_folder(tmp_path: Path, folders: list[Path]) -> None:
    out = tmp_path / "soup"
    soupkern.uniform_soup(folders, f"{out}/")
    assert sorted(os.listdir(out)) == sorted(COPIED + ["README.md", "model.safetensors"])
    for name in COPIED:  # byte for byte from the first ingredient
        assert (out / name).read_bytes() == (folders[0] / name).read_bytes(), name
    card = (out / "README.md").read_text()
    assert "uniform soup of 3 checkpoints" in card and all(os.fspath(f) in card for f in folders)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        files = json.loads(f.metadata()["soupkern.files"])
    assert sorted(files) == sorted(COPIED + ["README.md", "model.safetensors"])
    want = soupkern.uniform_state_dict(folders)
    got = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    # provenance lists every file, so --force may replace the folder (and only then)
    soupkern.weighted_soup(folders[:2], [0.5, 0.5], f"{out}/", overwrite=True, max_shard_size=40)
    assert (out / "model.safetensors.index.json").exists() and (out / "config.json").exists()
    assert not (out / "model.safetensors").exists()


def test_config_mismatch_is_refused_before_any_output(tmp_path: Path, folders: list[Path]) -> None:
    (folders[2] / "config.json").write_text(json.dumps({**CONFIG, "num_hidden_layers": 3}))
    before = set(os.listdir(tmp_path))
    for out in (f"{tmp_path}/soup/", tmp_path / "soup.safetensors"):  # folder or file output alike
        with pytest.raises(soupkern.MismatchError, match="num_hidden_layers = 3.*says 2"):
            soupkern.uniform_soup(folders, out)
    assert set(os.listdir(tmp_path)) == before
    assert main(["uniform", *map(str, folders), "-o", f"{tmp_path}/soup/", "-q"]) == 2
    assert set(os.listdir(tmp_path)) == before
    soupkern.uniform_soup(folders, f"{tmp_path}/soup/", allow_config_mismatch=True)
    assert (tmp_path / "soup" / "config.json").read_bytes() == (folders[0] / "config.json").read_bytes()


def test_tokenizer_mismatch_is_refused(tmp_path: Path) -> None:
    folders = [make_folder(tmp_path / "a", 0), make_folder(tmp_path / "b", 1, vocab=6)]
    with pytest.raises(soupkern.MismatchError, match="tokenizer.json has 6 tokens"):
        soupkern.uniform_soup(folders, f"{tmp_path}/soup/")


def test_copy_from_and_file_outputs(tmp_path: Path, folders: list[Path]) -> None:
    other = make_folder(tmp_path / "other", 7)
    (other / "tokenizer_config.json").write_text("{}")
    main(["uniform", *map(str, folders), "-o", f"{tmp_path}/soup/", "--copy-from", str(other), "-q"])
    assert (tmp_path / "soup" / "tokenizer_config.json").exists()
    assert (tmp_path / "soup" / "generation_config.json").read_bytes() == (other / "generation_config.json").read_bytes()
    # a single-file output gets no companions; --copy-from needs a folder output
    soupkern.uniform_soup(folders, tmp_path / "one.safetensors")
    with pytest.raises(soupkern.InputError, match="needs a folder output"):
        soupkern.uniform_soup(folders, tmp_path / "two.safetensors", copy_from=other)
    # safetensors files (not folders) as ingredients: a folder output holds just the weights
    soupkern.uniform_soup([f / "model.safetensors" for f in folders], f"{tmp_path}/plain/")
    assert sorted(os.listdir(tmp_path / "plain")) == ["model.safetensors"]


def test_config_dtype_follows_the_soup(tmp_path: Path, folders: list[Path]) -> None:
    for f in folders:
        (f / "config.json").write_text(json.dumps({**CONFIG, "torch_dtype": "float32"}))
    soupkern.uniform_soup(folders, f"{tmp_path}/soup/", dtype="bf16")
    config = json.loads((tmp_path / "soup" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and {k: config[k] for k in CONFIG} == CONFIG
    soupkern.uniform_soup(folders, f"{tmp_path}/same/")  # unchanged dtype: the file byte for byte
    assert (tmp_path / "same" / "config.json").read_bytes() == (folders[0] / "config.json").read_bytes()


def test_sentence_transformers_module_folders(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The module subfolders `modules.json` names are copied with their files (a Dense layer's
    weights are not: a notice says to soup them too); other subfolders are not; --force can
    replace the folder again."""
    folders = []
    for i in range(2):
        f = make_folder(tmp_path / f"st{i}", i)
        (f / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
        (f / "1_Pooling").mkdir()
        (f / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True, "seed": i}))
        (f / "2_Dense").mkdir()
        (f / "2_Dense" / "config.json").write_text(json.dumps({"in_features": 4, "out_features": 4}))
        save_file({"linear.weight": torch.full((4, 4), float(i))}, str(f / "2_Dense" / "model.safetensors"))
        folders.append(f)
    out = tmp_path / "soup"
    with caplog.at_level("WARNING", logger="soupkern"):
        soupkern.uniform_soup(folders, f"{out}/")
    assert (out / "1_Pooling" / "config.json").read_bytes() == (folders[0] / "1_Pooling" / "config.json").read_bytes()
    assert (out / "2_Dense" / "config.json").exists() and not (out / "2_Dense" / "model.safetensors").exists()
    assert (out / "modules.json").exists() and not (out / "sub").exists()
    notices = [r.getMessage() for r in caplog.records if "2_Dense" in r.getMessage()]
    assert len(notices) == 1 and "model.safetensors" in notices[0] and "-o SOUP/2_Dense/model.safetensors" in notices[0]
    soupkern.uniform_soup(folders, f"{out}/", overwrite=True)  # provenance lists the subfolder files too
    assert (out / "1_Pooling" / "config.json").exists()
    # the Dense layer souped as the notice says, into the soup folder
    soupkern.uniform_soup([f / "2_Dense" / "model.safetensors" for f in folders], out / "2_Dense" / "model.safetensors")
    assert torch.equal(load_file(str(out / "2_Dense" / "model.safetensors"))["linear.weight"], torch.full((4, 4), 0.5))
    with pytest.raises(soupkern.OutputError, match="2_Dense/model.safetensors"):  # now it would be lost
        soupkern.uniform_soup(folders, f"{out}/", overwrite=True)


def test_modules_json_may_not_point_outside(tmp_path: Path) -> None:
    f = make_folder(tmp_path / "m", 0)
    (f / "modules.json").write_text(json.dumps([{"idx": 1, "path": "../elsewhere"}]))
    with pytest.raises(soupkern.InputError, match="modules.json.*not a subfolder"):
        soupkern.uniform_soup([f, f], f"{tmp_path / 'soup'}/")
    assert not (tmp_path / "soup").exists()


@pytest.mark.parametrize("tie", [True, False, None])
def test_tied_head_follows_the_config(tmp_path: Path, tie: bool | None) -> None:
    """One folder saved with the head only, one with the embedding only (the two ways tied models
    are saved): read as one tensor where config.json says tie_word_embeddings = true or says
    nothing (the names pair up), refused where it says false (a missing head is missing)."""
    g = torch.Generator().manual_seed(7)
    emb = [torch.randn(10, 8, generator=g) for _ in range(2)]
    folders = []
    for i, name in enumerate(["model.embed_tokens.weight", "lm_head.weight"]):
        f = tmp_path / f"m{i}"
        f.mkdir()
        save_file({name: emb[i], "model.norm.weight": torch.ones(8)}, str(f / "model.safetensors"))
        config = dict(CONFIG) if tie is not None else {k: v for k, v in CONFIG.items() if k != "tie_word_embeddings"}
        if tie is not None:
            config["tie_word_embeddings"] = tie
        (f / "config.json").write_text(json.dumps(config))
        folders.append(f)
    if tie is False:
        with pytest.raises(soupkern.MismatchError, match="lm_head.weight|embed_tokens"):
            soupkern.uniform_state_dict(folders)
        return
    got = soupkern.uniform_state_dict(folders)
    want = ((emb[0].double() + emb[1].double()) / 2).float()
    assert torch.equal(got["model.embed_tokens.weight"], want) and torch.equal(got["lm_head.weight"], want)
