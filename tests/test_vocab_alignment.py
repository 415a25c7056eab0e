"""Issue 16 item 1, vocabulary alignment (`tokenizer: {source: base | union | <alias>}`): rows matched
by token string, against float64 numpy; the output's tokenizer, config and generation with an added token."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import weightx
from weightx.api import describe_plan
from weightx.errors import PlanError
from weightx.testing import build_tokenizer, load_state_dict, make_tiny_llama

ADDED = ["<|im_start|>", "<|im_end|>"]
NORMAL = "weightxword"
ROWS = 520  # 512 + 3 tokens, padded to a multiple of 8 as chat fine-tunes ship (Qwen: 152064 rows for 151665 tokens)


@pytest.fixture(scope="module")
def chat(family, tmp_path_factory):
    """A chat fine-tune of family['sft'] that added two special tokens and one normal token, padded to 520 rows."""
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("chat")
    tuned = make_tiny_llama(root / "tmp", init_from=family["sft"], noise=0.05, seed=7)
    tok = AutoTokenizer.from_pretrained(tuned)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED])
    tok.add_tokens([NORMAL])
    model = AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.bfloat16)
    model.resize_token_embeddings(ROWS)
    torch.manual_seed(11)
    with torch.no_grad():
        for w in (model.model.embed_tokens.weight, model.lm_head.weight):
            w[512:] = (torch.randn(ROWS - 512, w.shape[1]) * 0.02).to(w.dtype)
    model.save_pretrained(root / "chat")
    tok.save_pretrained(root / "chat")
    assert len(tok) == 515
    return root / "chat"


def recipe(family, chat, out, source, alpha=0.3) -> dict:
    return {"models": {"sft": str(family["sft"]), "chat": str(chat)}, "base": "sft",
            "deltas": [{"model": "chat", "edits": [{"expo": {"alpha": alpha}}]}], "tokenizer": {"source": source},
            "output": {"path": str(out), "dtype": "float32"}}


def test_without_a_tokenizer_block_the_mismatch_says_what_to_add(family, chat, tmp_path):
    r = recipe(family, chat, tmp_path / "o", "union")
    r.pop("tokenizer")
    with pytest.raises(PlanError, match="add `tokenizer: {source: union}`"):
        weightx.plan(r)


@pytest.mark.parametrize("source,rows", [("union", ROWS), ("chat", ROWS), ("base", 512)])
def test_rows_are_matched_by_token(family, chat, tmp_path, source, rows):
    res = weightx.apply(recipe(family, chat, tmp_path / source, source))
    out, sft, ft = load_state_dict(res.path), load_state_dict(family["sft"]), load_state_dict(chat)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        o, b, f = (x[name].double().numpy() for x in (out, sft, ft))
        assert o.shape == (rows, 64)
        # rows the base has (its 512 tokens, same ids in both): ExPO of the shared rows
        np.testing.assert_allclose(o[:512], b + 1.3 * (f[:512] - b), rtol=0, atol=1e-6)
        if rows > 512:
            # tokens the base lacks: base row = the chat model's row (the mean of the one model that has
            # it), so its delta is 0 and the row is the chat model's; padding rows kept likewise
            np.testing.assert_allclose(o[512:], f[512:], rtol=0, atol=1e-7)
    rec = json.loads((res.path / "weightx.json").read_text())
    cfg = json.loads((res.path / "config.json").read_text())
    assert cfg["vocab_size"] == rows and rec["tokenizer"]["source"] == source
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(res.path)
    assert len(tok) == (515 if rows > 512 else 512)
    if rows > 512:
        assert tok.convert_tokens_to_ids(ADDED) == [512, 513] and tok.convert_tokens_to_ids(NORMAL) == 514
        dec = tok.added_tokens_decoder
        assert dec[512].special and dec[513].special and not dec[514].special  # as the chat model marked them
        assert tok.decode([5, 512, 6], skip_special_tokens=True) == tok.decode([5, 6], skip_special_tokens=True)


def test_output_generates_with_an_added_token(family, chat, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = weightx.apply(recipe(family, chat, tmp_path / "u", "union")).path
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("<|im_start|>hello", return_tensors="pt").input_ids
    assert 512 in ids[0].tolist()
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 4


def test_a_token_two_models_add_takes_the_mean_of_their_rows(family, chat, tmp_path):
    """Two fine-tunes add the same token: the base row of it is the mean of their rows."""
    r = recipe(family, chat, tmp_path / "two", "union")
    r["models"]["chat2"] = str(chat)  # the same files twice: mean = that row, deltas 0
    r["deltas"].append({"model": "chat2"})
    out = load_state_dict(weightx.apply(r).path)
    ft, sft = load_state_dict(chat), load_state_dict(family["sft"])
    e = "model.embed_tokens.weight"
    np.testing.assert_allclose(out[e][512:].double().numpy(), ft[e][512:].double().numpy(), rtol=0, atol=1e-7)
    shared = sft[e].double().numpy() + 2 * 1.3 * (ft[e][:512].double().numpy() - sft[e].double().numpy())
    np.testing.assert_allclose(out[e][:512].double().numpy(), shared - 0.3 * (ft[e][:512].double().numpy() - sft[e].double().numpy()),
                               rtol=0, atol=1e-5)


def test_different_base_vocabularies_are_refused_in_one_line(family, tmp_path):
    build_tokenizer(tmp_path / "tok", vocab_size=400)
    other = make_tiny_llama(tmp_path / "other", tokenizer_dir=tmp_path / "tok", vocab=512)
    r = {"models": {"sft": str(family["sft"]), "o": str(other)}, "base": "sft", "deltas": [{"model": "o"}],
         "tokenizer": {"source": "union"}, "output": {"path": str(tmp_path / "x")}}
    with pytest.raises(PlanError) as e:
        weightx.plan(r)
    assert len(e.value.problems) == 1 and "different base vocabularies" in e.value.problems[0]


def test_plan_prints_the_vocabulary(family, chat, tmp_path):
    text = describe_plan(recipe(family, chat, tmp_path / "p", "union"))
    assert "tokenizer: union vocabulary, 515 tokens (3 the base lacks, e.g. '<|im_start|>')" in text


@pytest.mark.parametrize("fmt", [{"format": "delta"}, {"format": "lora", "rank": 2}])
def test_a_grown_vocabulary_needs_a_dense_output(family, chat, tmp_path, fmt):
    """A delta artifact or an adapter is applied to the base, whose rows it cannot grow: refused at plan time."""
    r = recipe(family, chat, tmp_path / "o", "union")
    r["deltas"][0]["edits"] = [{"ternary": {}}] if fmt["format"] == "delta" else []
    r["output"].update(fmt)
    with pytest.raises(PlanError, match="must keep the base's rows: use format: dense"):
        weightx.plan(r)
    r["tokenizer"] = {"source": "base"}  # the base's rows: fine
    weightx.plan(r)


def test_a_tokenizer_file_linked_out_of_its_folder_is_refused(family, chat, tmp_path):
    """The output tokenizer is written from the base's (or the source model's) files: a symlinked
    tokenizer_config.json pointing elsewhere (a token file, another model) is refused before anything runs."""
    import shutil

    base = tmp_path / "sft-linked"
    shutil.copytree(family["sft"], base)
    secret = tmp_path / "secret.json"
    secret.write_text('{"hf_token": "hf_do_not_publish"}')
    (base / "tokenizer_config.json").unlink()
    (base / "tokenizer_config.json").symlink_to(secret)
    r = recipe(family, chat, tmp_path / "o", "union")
    r["models"]["sft"] = str(base)
    with pytest.raises(PlanError, match="outside the model folder"):
        weightx.plan(r)
    assert not (tmp_path / "o").exists()
