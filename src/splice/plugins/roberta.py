"""RoBERTa as a native splice decoder (transformers' ``RobertaForCausalLM``).

The blocks, the model and the checkpoint mapping are BERT's (``splice.plugins.bert``); RoBERTa differs in

- positions, counted from the padding id as fairseq does: ``(cumsum(ids != pad) + past) * (ids != pad) + pad``,
  so real tokens start at ``pad + 1`` and padding tokens sit at ``pad``. With a KV cache the count continues
  from the cache length, padding included (transformers adds ``past_key_values_length``), so a cached prompt
  without padding reads exactly the positions of one full forward;
- its defaults (``roberta-base``: 514 positions, pad 1, one token type, eps 1e-5);
- its head: ``lm_head.{dense, layer_norm, bias, decoder (tied)}``, whose activation is always the exact GELU.

XLM-RoBERTa (``XLMRobertaForCausalLM``, model type ``xlm-roberta``) and CamemBERT (``CamembertForCausalLM``,
``camembert``) are this architecture under other names: the same config keys, blocks, positions and tensor names
(base model under ``roberta.``). Only transformers' defaults for a missing key differ (``vocab_size`` 30522), and
``hf_model_type`` keeps which of the three a checkpoint was, so an export writes it back.

Module state-dict names are BERT's (see ``bert.py``); on disk the base model is under ``roberta.``
(RobertaForCausalLM / RobertaForMaskedLM) or unprefixed (RobertaModel).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from splice import hookimpl
from splice.core.interfaces import HFInterop
from splice.plugins._shared import Eps, Positions, TokenId, Vocab
from splice.plugins.bert import BertConfig, BertDecoder, BertTextEncoder, HFLayout, TokenTypes

__all__ = ["RobertaConfig", "RobertaDecoder", "RobertaTextEncoder", "build_roberta", "build_roberta_text_encoder",
           "config_from_hf", "config_to_hf", "state_dict_from_hf", "state_dict_to_hf", "HF", "ENCODER_HF", "TINY"]

TINY: dict[str, Any] = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    max_position_embeddings=66,  # 64 tokens after the pad + 1 offset
)


class RobertaConfig(BertConfig):
    """RoBERTa's hyper-parameters: transformers' names, ``roberta-base`` defaults."""

    vocab_size: Vocab = 50265
    max_position_embeddings: Positions = Field(514, description="rows of the position table; pad + 1 are never "
                                         "used by real tokens, so max_position_embeddings - pad - 1 tokens fit")
    type_vocab_size: TokenTypes = Field(1, description="token types; a decoder always uses type 0")
    layer_norm_eps: Eps = 1e-5
    pad_token_id: TokenId = 1
    hf_model_type: Literal["roberta", "xlm-roberta", "camembert"] = Field(
        "roberta", description="the transformers model type the weights came from (the same architecture); "
        "an export writes it back")

    @model_validator(mode="after")
    def _positions_fit(self) -> "RobertaConfig":
        if self.max_position_embeddings <= self.pad_token_id + 1:
            raise ValueError(
                f"max_position_embeddings={self.max_position_embeddings} leaves no position for real tokens: they "
                f"start at pad_token_id + 1 = {self.pad_token_id + 1}; expected max_position_embeddings > "
                f"pad_token_id + 1; fix: raise max_position_embeddings (roberta-base: 514 with pad_token_id 1)"
            )
        return self


class RobertaDecoder(BertDecoder):
    """BERT's decoder with RoBERTa's padding-relative positions and fixed-GELU head."""

    family = "RoBERTa"
    head_activation = "gelu"

    def __init__(self, hf_model_type: str = "roberta", **kwargs):
        kwargs = {**RobertaConfig().model_dump(exclude={"hf_model_type"}), **kwargs}  # RoBERTa's defaults, not BERT's
        super().__init__(**kwargs)
        self.hf_model_type = hf_model_type

    @staticmethod
    def _max_tokens(max_position_embeddings: int, pad_token_id: int) -> int:
        return max_position_embeddings - pad_token_id - 1  # real tokens start at pad + 1

    def positions(self, input_ids: Tensor, past: int) -> Tensor:
        real = input_ids.ne(self.pad_token_id).long()  # (B, T)
        return (torch.cumsum(real, dim=1) + past) * real + self.pad_token_id  # (B, T)


def build_roberta(config: RobertaConfig) -> RobertaDecoder:
    return RobertaDecoder(**config.model_dump())


class RobertaTextEncoder(BertTextEncoder):
    """BERT's text encoder with RoBERTa's padding-relative positions (transformers' ``RobertaModel``, pooler
    included)."""

    family = "RoBERTa"
    _max_tokens = staticmethod(RobertaDecoder._max_tokens)
    positions = RobertaDecoder.positions

    def __init__(self, hf_model_type: str = "roberta", **kwargs):
        super().__init__(**kwargs)
        self.hf_model_type = hf_model_type


def build_roberta_text_encoder(config: RobertaConfig) -> RobertaTextEncoder:
    return RobertaTextEncoder(**config.model_dump(exclude={"tie_word_embeddings"}))


# the model types read as RoBERTa, with the one default of transformers' config that differs between them
MODEL_TYPES = {"roberta": 50265, "xlm-roberta": 30522, "camembert": 30522}  # model_type -> default vocab_size


@dataclass(frozen=True)
class RobertaLayout(HFLayout):
    """BERT's layout under RoBERTa's names, for the three model types that share it."""

    def _defaults(self, hf: dict) -> dict:
        return {**self.hf_defaults, "vocab_size": MODEL_TYPES.get(hf.get("model_type"), MODEL_TYPES["roberta"])}

    def dims(self, hf: dict) -> dict[str, int]:
        return HFLayout.dims(replace(self, hf_defaults=self._defaults(hf)), hf)

    def config_from_hf(self, hf: dict) -> dict:
        values = HFLayout.config_from_hf(replace(self, hf_defaults=self._defaults(hf)), hf)
        model_type = hf.get("model_type")
        return {**values, "hf_model_type": model_type} if model_type in MODEL_TYPES else values

    def config_to_hf(self, values: dict) -> dict:
        values = dict(values)
        model_type = values.pop("hf_model_type", "roberta")
        return {**HFLayout.config_to_hf(self, values), "model_type": model_type}

    def interop(self) -> HFInterop:
        return replace(HFLayout.interop(self), model_types=tuple(MODEL_TYPES))


LAYOUT = RobertaLayout(
    family="RoBERTa", model_type="roberta", prefix="roberta.", config_cls=RobertaConfig,
    head_dense="lm_head.dense", head_norm="lm_head.layer_norm", head_bias="lm_head.bias",
    head_decoder="lm_head.decoder",
    # transformers' RobertaConfig defaults (BERT's), used when a config.json leaves a key out; vocab_size by type
    hf_defaults=dict(vocab_size=50265, max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                     pad_token_id=1),
)
config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf, HF = LAYOUT.exports()
ENCODER_HF = LAYOUT.encoder_interop()  # model types: the three above
ENCODER_DESCRIPTION = ("RoBERTa (Facebook) as a bidirectional text encoder with its pooler (transformers' "
                       "RobertaModel), also reading XLM-RoBERTa and CamemBERT")


@hookimpl
def register_decoders(register):
    register(
        "roberta", build_roberta, RobertaConfig, tiny=dict(TINY), hf=HF,
        description="RoBERTa (Facebook) as a causal LM, also reading XLM-RoBERTa and CamemBERT: BERT's post-norm "
        "blocks, padding-relative positions; cross-attention through adapters",
    )


@hookimpl
def register_text_encoders(register):
    register("roberta", build_roberta_text_encoder, RobertaConfig, tiny=dict(TINY), hf=ENCODER_HF,
             description=ENCODER_DESCRIPTION)
