"""BERT decoder: what only BERT has (every on-disk layout: BertForPreTraining, BertModel, legacy gamma/beta; the
untied head's bias; the padding row). Parity, the KV cache, the slots, the mapping and validation every decoder
shares: test_decoders.py."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import transformers  # the oracle only; src/ never imports it
from decoder_cases import ATOL, CASES, CROSS_PARTS, diff, save_hf
from splice.plugins import bert as B

CASE = CASES["bert"]
TINY = CASE.tiny


def _cross_keys(dec) -> set[str]:
    return {k for k in dec.state_dict() if ".crossattention." in k}


@torch.no_grad()
def test_untied_head(tmp_path):
    # transformers 5 unties the decoder bias too: logits use cls.predictions.decoder.bias, cls.predictions.bias is dead
    hf = CASE.hf_model(seed=7, tie_word_embeddings=False)
    cfg, sd = save_hf(hf, tmp_path)
    assert {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "cls.predictions.bias"} <= set(sd)
    ours, missing, unused = CASE.load(cfg, sd)
    assert unused == ["cls.predictions.bias"] and missing == set()
    ids = CASE.ids()
    assert diff(ours(ids).logits, hf(input_ids=ids).logits) <= ATOL
    back = B.state_dict_to_hf(ours.state_dict(), cfg)
    assert set(back) == set(sd)
    assert torch.equal(back["cls.predictions.decoder.bias"], sd["cls.predictions.decoder.bias"])


@torch.no_grad()
def test_pretraining_layout_leaves_only_cross_attention_missing(tmp_path):
    # the bert-base-uncased file: BertForPreTraining, so a pooler and the next-sentence head ride along
    hf = CASE.hf_model(cls=transformers.BertForPreTraining, seed=5)
    cfg, sd = save_hf(hf, tmp_path)
    assert any(k.startswith("cls.seq_relationship.") for k in sd) and any(k.startswith("bert.pooler.") for k in sd)
    sd["bert.embeddings.position_ids"] = torch.arange(TINY["max_position_embeddings"])[None]  # old files carry it
    dec, missing, unused = CASE.load(cfg, sd, cross_layers=range(CASE.n_layers))
    head = ["cls.seq_relationship.weight", "cls.seq_relationship.bias"]
    pooler = ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]
    assert sorted(unused) == sorted([*pooler, *head, "bert.embeddings.position_ids"])
    assert missing == _cross_keys(dec)
    assert {k.split(".")[3] for k in missing} == CROSS_PARTS
    ids = CASE.ids()
    assert diff(dec(ids).logits, hf(input_ids=ids).prediction_logits) <= ATOL


@torch.no_grad()
def test_bertmodel_layout_and_legacy_names(tmp_path):
    # BertModel: no `bert.` prefix and no head; old files name LayerNorm parameters gamma/beta
    hf = CASE.hf_model(cls=transformers.BertModel, seed=6, add_cross_attention=True)
    cfg, sd = save_hf(hf, tmp_path)
    assert not any(k.startswith("bert.") for k in sd)
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in sd.items()}
    assert sum(".gamma" in k for k in legacy) == 1 + 3 * CASE.n_layers
    dec, missing, unused = CASE.load(cfg, legacy, cross_layers=range(CASE.n_layers))
    assert sorted(unused) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert missing == {k for k in dec.state_dict() if k.startswith("head.")}
    ids, ctx = CASE.ids(), CASE.ctx()
    ref = hf(input_ids=ids, encoder_hidden_states=ctx).last_hidden_state
    assert diff(dec(ids, context=ctx).hidden_states, ref) <= ATOL


def test_tied_duplicates_consumed(plain_pair):
    _, plain, cfg, sd = plain_pair
    extra = dict(sd)  # torch.save .bin files also carry the tied decoder
    extra["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
    extra["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"]
    mapped, unused = B.state_dict_from_hf(extra, cfg)
    assert unused == [] and set(mapped) == set(plain.state_dict())


def test_config_from_hf():
    kw = B.config_from_hf({**TINY, "model_type": "bert", "is_decoder": True, "add_cross_attention": True,
                           "position_embedding_type": "absolute", "classifier_dropout": None, "use_cache": True,
                           "pad_token_id": None, "hidden_act": "relu"})
    assert kw == {**TINY, "hidden_act": "relu"}
    hf = B.config_to_hf(B.BertConfig(**TINY).model_dump())
    assert (hf["model_type"], hf["is_decoder"], hf["add_cross_attention"]) == ("bert", True, True)
    assert transformers.BertConfig(**{k: v for k, v in hf.items() if k != "model_type"}).hidden_size == 32


def test_config_defaults():
    with pytest.raises(ValidationError, match="pad_token_id=99"):
        B.BertConfig(vocab_size=99, pad_token_id=99)
    c = B.BertConfig()
    assert (c.vocab_size, c.hidden_size, c.max_position_embeddings, c.layer_norm_eps, c.pad_token_id) == \
        (30522, 768, 512, 1e-12, 0)


def test_init():
    model = B.build_bert(B.BertConfig(**TINY))
    assert "head.decoder.weight" not in model.state_dict()
    assert torch.equal(model.embeddings.word.weight[0], torch.zeros(32))  # padding row, as transformers inits it
