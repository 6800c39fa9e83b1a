"""The native decoders under test, and what their tests share: transformers models as the oracle (built, perturbed,
saved and read back from disk), ours loaded from those files, random inputs, and the comparison.

Each family is a ``Case``: ``test_decoders.py`` runs the checks every decoder must pass over all of them (the
``case`` fixture, parametrised there); ``test_<family>.py`` sets ``CASE`` and tests what only that family has.
``ALL`` is every family whose transformers causal LM reads ``encoder_hidden_states`` (the oracle of the checks with a
context); LLaMA's does not, so it joins the slot checks (``SLOTTED``) and ``test_llama.py`` runs the rest for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file

import transformers  # the oracle only; src/ never imports it
from splice.adapters.cross_attention import StandardAdapter
from splice.plugins import bart, bert, gpt2, llama, roberta

ATOL = 1e-4
CROSS_PARTS = {"norm", "q_proj", "k_proj", "v_proj", "o_proj"}  # what the standard adapter installs


def save_hf(model, path) -> tuple[dict, dict]:
    """save_pretrained, then read back exactly what is on disk."""
    model.save_pretrained(path)
    return json.loads((path / "config.json").read_text()), load_file(str(path / "model.safetensors"))


def perturb(model, seed: int):
    # transformers inits biases to 0 and LayerNorms to identity, which would hide mapping mistakes
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def diff(a, b) -> float:
    return float((a - b).abs().max())


def padding_mask(side: str, B: int = 3, T: int = 8) -> torch.Tensor:
    """(B, T) 1 = real token: row 0 unpadded, rows 1 and 2 padded on ``side`` (3 and 6 pads on the left)."""
    mask = torch.ones(B, T, dtype=torch.long)
    if side == "right":
        mask[1, 5:], mask[2, 2:] = 0, 0
    else:
        mask[1, :3], mask[2, :6] = 0, 0
    return mask


@dataclass(frozen=True, kw_only=True)
class Case:
    """One native decoder family and its transformers oracle, at the tiny size the tests use."""

    name: str  # also transformers' model_type
    registered: str  # the registry's name
    module: ModuleType
    config_cls: type  # ours
    builder: Callable
    tiny: dict[str, Any]
    width: str  # config names: the hidden width, the layer count, the attention dropout, the activation
    layers: str
    attn_dropout: str
    activation: str
    hf_class: type  # the causal LM transformers checkpoints of this family come from
    hf_config_class: type
    hf_defaults: dict[str, Any]  # on top of ``tiny`` in every oracle config
    perturb_seed: Callable[[int], int]  # the oracle's seed -> the seed of its perturbation
    slots: bool = True  # cross-attention through adapters (False: native, BART)
    hf_cross: bool = True  # transformers' causal LM takes encoder_hidden_states (LLaMA's has no cross-attention)
    prefix: str = "layers."  # our layer list in state-dict names
    norm: tuple[str, float]  # LayerSpec (norm, eps)
    pad_in_ids: int | None = None  # padding positions carry this id (RoBERTa counts positions from it)
    low_id: int = 0  # real tokens are drawn from [low_id, vocab)
    position_rows: int = 64  # the first position id that does not fit
    too_long: str  # the error for 65 tokens (64 fit)
    expects_width: str  # the error for a 16-wide context, after "context width 16"
    tied_missing: frozenset[str]  # what a tied export leaves for transformers to tie itself
    bad_shape: tuple[str, tuple[int, ...], tuple[int, ...]]  # a key on disk, a wrong shape for it, the right one
    heads_error: tuple[dict[str, int], str]  # config values whose heads do not divide the width, the error
    unknown_key: str  # a plausible config key the family does not have
    unsupported: tuple[dict[str, Any], tuple[str, ...]]  # transformers settings we refuse, what the error names

    @property
    def vocab(self) -> int:
        return self.tiny["vocab_size"]

    @property
    def hidden(self) -> int:
        return self.tiny[self.width]

    @property
    def n_layers(self) -> int:
        return self.tiny[self.layers]

    def hf_config(self, **over):
        return self.hf_config_class(**{**self.tiny, **self.hf_defaults, **over})

    def hf_model(self, seed: int = 0, cls: type | None = None, **over):
        torch.manual_seed(seed)
        return perturb((cls or self.hf_class)(self.hf_config(**over)), self.perturb_seed(seed)).eval()

    def build(self, hf_config: dict, cross_layers=(), adapter=None, context_width: int | None = None):
        """Ours, from a transformers config.json, with ``adapter``'s modules in ``cross_layers``."""
        dec = self.builder(self.config_cls(**self.module.config_from_hf(hf_config)))
        for i in cross_layers:
            spec = dec.layer_specs()[i]
            dec.install_cross_attention(i, (adapter or StandardAdapter()).build(spec, context_width or self.hidden))
        return dec.eval()

    def load(self, hf_config: dict, sd: dict, cross_layers=(), adapter=None, context_width: int | None = None):
        """Ours with the tensors of a transformers file that fit loaded: (decoder, missing keys, unused keys)."""
        dec = self.build(hf_config, cross_layers, adapter, context_width)
        mapped, unused, *_notes = self.module.state_dict_from_hf(sd, hf_config)
        res = dec.load_state_dict(mapped, strict=False)
        assert res.unexpected_keys == []
        return dec, set(res.missing_keys), unused

    def ours(self, hf_config: dict, sd: dict, cross_layers=()):
        """Ours from a transformers file that has every tensor it needs: all loaded, nothing unused."""
        ours, missing, unused = self.load(hf_config, sd, cross_layers)
        assert missing == set() and unused == []
        return ours

    def pair(self, path, seed: int = 0, cross: bool = True):
        """(oracle, ours with its weights, config.json, tensors on disk)."""
        hf = self.hf_model(seed, **({"add_cross_attention": True} if cross and self.slots else {}))
        cfg, sd = save_hf(hf, path)
        return hf, self.ours(cfg, sd, range(self.n_layers) if cross and self.slots else ()), cfg, sd

    def ids(self, B: int = 2, T: int = 9, seed: int = 0) -> torch.Tensor:
        return torch.randint(self.low_id, self.vocab, (B, T), generator=torch.Generator().manual_seed(seed))

    def ctx(self, B: int = 2, N: int = 5, seed: int = 0, width: int | None = None) -> torch.Tensor:
        return torch.randn(B, N, width or self.hidden, generator=torch.Generator().manual_seed(seed))


_BERT_TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
_BERT_NAMES = dict(width="hidden_size", layers="num_hidden_layers", attn_dropout="attention_probs_dropout_prob",
                   activation="hidden_act", unknown_key="n_layer",
                   heads_error=(dict(hidden_size=32, num_attention_heads=5),
                                "num_attention_heads=5 does not divide hidden_size=32"))

CASES = {
    "gpt2": Case(
        name="gpt2", registered="gpt2", module=gpt2, config_cls=gpt2.GPT2Config, builder=gpt2.build_gpt2,
        tiny=dict(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4),
        width="n_embd", layers="n_layer", attn_dropout="attn_pdrop", activation="activation_function",
        hf_class=transformers.GPT2LMHeadModel, hf_config_class=transformers.GPT2Config, hf_defaults={},
        perturb_seed=lambda seed: 1, prefix="h.", norm=("pre", 1e-5),
        too_long="exceeds n_positions=64", expects_width="expects 32", tied_missing=frozenset({"lm_head.weight"}),
        bad_shape=("transformer.h.1.mlp.c_fc.weight", (32, 64), (32, 128)),
        heads_error=(dict(n_embd=32, n_head=5), "n_head=5 does not divide n_embd=32"), unknown_key="n_layers",
        unsupported=(dict(reorder_and_upcast_attn=True, activation_function="swish"),
                     ("reorder_and_upcast_attn", "activation_function", "'swish'")),
    ),
    "bert": Case(
        name="bert", registered="bert", module=bert, config_cls=bert.BertConfig, builder=bert.build_bert,
        tiny=dict(_BERT_TINY, max_position_embeddings=64), **_BERT_NAMES,
        hf_class=transformers.BertLMHeadModel, hf_config_class=transformers.BertConfig,
        hf_defaults={"is_decoder": True}, perturb_seed=lambda seed: seed + 1, norm=("post", 1e-12),
        too_long="exceeds the 64 positions", expects_width="expects 32",
        tied_missing=frozenset({"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}),
        bad_shape=("bert.encoder.layer.1.intermediate.dense.weight", (32, 37), (37, 32)),
        unsupported=(dict(position_embedding_type="relative_key", hidden_act="swish"),
                     ("position_embedding_type", "'relative_key'", "hidden_act")),
    ),
    "roberta": Case(
        name="roberta", registered="roberta", module=roberta, config_cls=roberta.RobertaConfig,
        builder=roberta.build_roberta,
        tiny=dict(_BERT_TINY, max_position_embeddings=66), **_BERT_NAMES,  # 64 tokens after the pad + 1 offset
        hf_class=transformers.RobertaForCausalLM, hf_config_class=transformers.RobertaConfig,
        # hidden_act relu: RoBERTa's head must keep its own exact GELU whatever the layers use
        hf_defaults={"is_decoder": True, "hidden_act": "relu"}, perturb_seed=lambda seed: seed + 1,
        norm=("post", 1e-5),
        # real tokens avoid the padding id: a pad inside the ids changes the positions (tested on purpose)
        pad_in_ids=1, low_id=2, position_rows=66,
        too_long="65 tokens.*64 positions.*max_position_embeddings=66", expects_width="expects 32",
        tied_missing=frozenset({"lm_head.decoder.weight", "lm_head.decoder.bias"}),
        bad_shape=("roberta.encoder.layer.1.intermediate.dense.weight", (32, 37), (37, 32)),
        unsupported=(dict(pad_token_id=None, position_embedding_type="relative_key_query"),
                     ("pad_token_id", "relative_key_query")),
    ),
    "bart": Case(
        name="bart", registered="bart_decoder", module=bart, config_cls=bart.BartConfig, builder=bart.build_bart,
        tiny=dict(vocab_size=99, max_position_embeddings=64, d_model=32, decoder_layers=2, decoder_attention_heads=4,
                  decoder_ffn_dim=64),
        width="d_model", layers="decoder_layers", attn_dropout="attention_dropout", activation="activation_function",
        hf_class=transformers.BartForCausalLM, hf_config_class=transformers.BartConfig,
        # transformers 5 sizes BartForCausalLM's DynamicCache by num_hidden_layers, which BartConfig maps to
        # *encoder*_layers: fewer encoder than decoder layers raises IndexError in forward (use_cache defaults to
        # True)
        hf_defaults=dict(encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=48, is_decoder=True,
                         add_cross_attention=True, dropout=0.0),
        perturb_seed=lambda seed: seed + 1, slots=False, norm=("post", 1e-5),
        too_long="exceeds max_position_embeddings=64", expects_width="expects 32",
        tied_missing=frozenset({"lm_head.weight"}), bad_shape=("model.decoder.layers.1.fc1.weight", (32, 64), (64, 32)),
        heads_error=(dict(d_model=32, decoder_attention_heads=5),
                     "decoder_attention_heads=5 does not divide d_model=32"),
        unknown_key="n_layer",
        unsupported=(dict(normalize_before=True, add_final_layer_norm=True, activation_function="tanh"),
                     ("normalize_before", "add_final_layer_norm", "'tanh'")),
    ),
    "llama": Case(
        name="llama", registered="llama", module=llama, config_cls=llama.LlamaConfig, builder=llama.build_llama,
        # grouped-query (2 K/V heads for 4 query heads), and attention biases so that the mapping carries them
        tiny=dict(llama.TINY, attention_bias=True),
        width="hidden_size", layers="num_hidden_layers", attn_dropout="attention_dropout", activation="hidden_act",
        hf_class=transformers.LlamaForCausalLM, hf_config_class=transformers.LlamaConfig, hf_defaults={},
        perturb_seed=lambda seed: seed + 1, hf_cross=False, norm=("pre", 1e-6),
        too_long="exceeds max_position_embeddings=64", expects_width="expects 32",
        tied_missing=frozenset({"lm_head.weight"}),
        bad_shape=("model.layers.1.mlp.up_proj.weight", (32, 32), (64, 32)),
        heads_error=(dict(hidden_size=32, num_attention_heads=5),
                     "num_attention_heads=5 does not divide hidden_size=32"),
        unknown_key="n_layer",
        unsupported=(dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}, hidden_act="tanh"),
                     ("rope_scaling.rope_type", "'yarn'", "hidden_act")),
    ),
}

ALL = pytest.mark.parametrize("case", [n for n, c in CASES.items() if c.hf_cross], indirect=True)
SLOTTED = pytest.mark.parametrize("case", [n for n, c in CASES.items() if c.slots], indirect=True)
