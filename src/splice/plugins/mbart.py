"""mBART's decoder as a native splice decoder: config, blocks, model, and the transformers checkpoint mapping.

The decoder of transformers' ``MBartForCausalLM`` (facebook/mbart-*, and Donut's and Nougat's text decoders): BART's
modules and tensor names (``splice.plugins.bart``) in pre-norm order, with native cross-attention
(``native_cross_attention = True``). What mBART changes in BART:

- every block normalises its input (``self_attn_layer_norm`` before the self-attention, ``encoder_attn_layer_norm``
  before the cross-attention, ``final_layer_norm`` before the feed-forward) and adds its output to the residual;
- a final ``layer_norm`` after the last layer, before the tied head;
- transformers' defaults: no ``decoder_start_token_id``. Released checkpoints set ``scale_embedding`` (the token
  embeddings times ``sqrt(d_model)``); the positions are BART's, looked up at ``position + 2``.

transformers 5's MBart config has no pre-norm flag: the model type decides. The layout keys of 2020 configs
(``normalize_before``, ``add_final_layer_norm``, ``static_position_embeddings``, ...) are read by no transformers 5
code, so they are passed over here too.

Layout: BART's (see ``bart.py``) plus ``layer_norm.{weight,bias}`` (D,), ``model.decoder.layer_norm.*`` on disk.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor, nn

from splice import hookimpl
from splice.core.cache import context_kv
from splice.core.errors import ConfigError
from splice.core.interfaces import HFInterop
from splice.core.kernels import dropout
from splice.core.keymap import Row, from_hf, to_hf
from splice.plugins import bart
from splice.plugins._shared import NativeDecoder, TokenId, normal_init
from splice.plugins.bart import LAYER_NORM_EPS, BartConfig, BartDecoder, BartDecoderLayer

__all__ = ["MBartConfig", "MBartDecoder", "MBartDecoderLayer", "build_mbart", "config_from_hf", "config_to_hf",
           "state_dict_from_hf", "state_dict_to_hf", "HF", "TINY"]

TINY: dict[str, Any] = dict(vocab_size=99, max_position_embeddings=64, d_model=32, decoder_layers=2,
                            decoder_attention_heads=4, decoder_ffn_dim=64)


class MBartConfig(BartConfig):
    """mBART's decoder hyper-parameters: BART's fields, named and defaulted as in transformers' ``MBartConfig``."""

    decoder_start_token_id: TokenId | None = Field(None, description="transformers' MBartConfig sets none")


class MBartDecoderLayer(BartDecoderLayer):
    """BART's layer in pre-norm order: self-attention, cross-attention (skipped without context), feed-forward."""

    def forward(self, x: Tensor, mask: Tensor | None, is_causal: bool, context: Tensor | None,
                context_mask: Tensor | None, cache: Any) -> Tensor:
        """One layer: shapes and the mask as ``NativeDecoder`` describes them."""
        y = self.self_attn(self.self_attn_layer_norm(x), mask, is_causal, cache, self.index)  # (B, T, D)
        x = x + dropout(y, self.dropout_p, self.training)
        kv = context_kv(self.encoder_attn, context, cache, self.index)  # each (B, nh, N, hs) or None
        if kv is not None or context is not None:  # without context transformers skips the block; so do we
            h = self.encoder_attn_layer_norm(x)  # (B, T, D)
            y = self.encoder_attn(h, context=context, context_mask=context_mask, kv=kv)  # (B, T, D)
            x = x + dropout(y, self.dropout_p, self.training)
        h = dropout(self.act(self.fc1(self.final_layer_norm(x))), self.activation_dropout, self.training)  # (B, T, F)
        return x + dropout(self.fc2(h), self.dropout_p, self.training)  # (B, T, D)


class MBartDecoder(BartDecoder):
    """mBART's decoder: BART's embeddings and tied head around pre-norm layers and a final ``layer_norm``."""

    family = "mBART"
    norm_position = "pre"
    # the generic native-decoder refusal and context check, naming mBART (BART's own name BART)
    install_cross_attention = NativeDecoder.install_cross_attention
    _check_context = NativeDecoder._check_context

    def __init__(self, **kwargs: Any):
        """``MBartConfig``'s fields as keyword arguments (its defaults for those left out)."""
        values = {**MBartConfig().model_dump(), **kwargs}
        n_layers = values.pop("decoder_layers")
        super().__init__(decoder_layers=0, **values)  # BART's embeddings, head, token ids; mBART's layers below
        D = self.hidden_size
        self.context_width = D
        self.layers = nn.ModuleList(
            MBartDecoderLayer(i, D, values["decoder_attention_heads"], values["decoder_ffn_dim"],
                              values["activation_function"], values["dropout"], values["attention_dropout"],
                              values["activation_dropout"])
            for i in range(n_layers)
        )
        self.layer_norm = nn.LayerNorm(D, eps=LAYER_NORM_EPS)
        normal_init(self.layers, self.init_std)

    def output(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return super().output(self.layer_norm(x))  # (B, T, D) normalised, (B, T, V)


def build_mbart(config: MBartConfig) -> MBartDecoder:
    return MBartDecoder(**config.model_dump())


# ---- transformers interop: BART's, plus the final layer norm ----------------------------------------------

_FINAL = ("layer_norm.weight", "layer_norm.bias")
# settings of transformers 3 configs that transformers 5 does not read (BART's reader refuses the mBART values)
_LEGACY = ("normalize_before", "add_final_layer_norm", "normalize_embedding", "static_position_embeddings",
           "add_bias_logits", "do_blenderbot_90_layernorm")


def config_from_hf(hf: dict) -> dict:
    """A transformers mBART ``config.json`` (dict) -> ``MBartConfig`` keyword arguments; the encoder's keys drop."""
    try:
        return bart.config_from_hf({k: v for k, v in hf.items() if k not in _LEGACY})
    except ConfigError as exc:
        raise ConfigError(exc.problems, source="transformers mBART config") from None


def config_to_hf(values: dict) -> dict:
    """``MBartConfig`` values -> a transformers mBART config dict (``MBartForCausalLM``, as a VED decoder)."""
    return {**bart.config_to_hf(values), "model_type": "mbart"}


def _final_name(key: str) -> str:
    return key.removeprefix("model.").removeprefix("decoder.")  # MBartForCausalLM, MBartModel, ...Generation


def _final_table(hf_config: dict) -> list[Row]:
    D = hf_config.get("d_model", 1024)
    return [Row(name, name, (D,)) for name in _FINAL]


def state_dict_from_hf(sd: dict[str, Tensor], hf_config: dict) -> tuple:
    """transformers mBART tensors -> (ours, unused keys[, notes]): every layout BART's reader takes (the
    ``MBartForCausalLM`` one, and the hub's ``MBartModel`` / ``MBartForConditionalGeneration`` with
    ``shared.weight``), plus the decoder's final ``layer_norm``."""
    final = {k for k in sd if _final_name(k) in _FINAL}
    mapped, unused, *notes = bart.state_dict_from_hf({k: v for k, v in sd.items() if k not in final}, hf_config)
    norm, _ = from_hf({k: sd[k] for k in final}, _final_table(hf_config), _final_name,
                      f"d_model={hf_config.get('d_model', 1024)}")
    return ({**mapped, **norm}, unused, *notes)


def state_dict_to_hf(sd: dict[str, Tensor], hf_config: dict) -> dict[str, Tensor]:
    """Ours -> ``MBartForCausalLM`` on-disk names (``model.decoder.`` prefix; ``lm_head.weight`` only when untied)."""
    fix = "export with the config the model was built from, or save in splice format"
    out = bart.state_dict_to_hf({k: v for k, v in sd.items() if k not in _FINAL}, hf_config)
    final = {k: v for k, v in sd.items() if k in _FINAL}
    out.update(to_hf(final, _final_table(hf_config), lambda name: "model.decoder." + name,
                     layout="MBartForCausalLM", required=True, fix=fix))
    return out


HF = HFInterop(model_types=("mbart",), config_from_hf=config_from_hf, state_dict_from_hf=state_dict_from_hf,
               state_dict_to_hf=state_dict_to_hf, config_to_hf=config_to_hf, ignorable=bart.HF.ignorable)


@hookimpl
def register_decoders(register):
    register(
        "mbart", build_mbart, MBartConfig, tiny=dict(TINY), hf=HF,
        description="mBART's decoder (facebook; Donut's and Nougat's text decoder): BART's modules in pre-norm "
        "order with a final layer norm, learned positions and native cross-attention",
    )
