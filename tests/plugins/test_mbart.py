"""mBART decoder: transformers' VisionEncoderDecoder folders with an mBART decoder (Donut's and Nougat's pairing: a
Swin encoder; also ViT), read by ``splice.load`` with the same logits, greedy and beam tokens, and exported back;
what only mBART has (pre-norm layers, the final layer norm, the hub's MBartForConditionalGeneration layout, the
layout keys of old configs)."""

from __future__ import annotations

import pytest
import torch

import transformers  # the oracle only; src/ never imports it
from oracle import perturb
from splice.core.errors import CheckpointError, ConfigError, IncompatibleComponentsError, InputError
from splice.plugins import mbart as M
from test_trocr import ATOL, MEASURED, VOCAB, assert_folder_parity, diff, encoder_config, save_ved

DECODER = dict(vocab_size=VOCAB, max_position_embeddings=64, decoder_layers=2, decoder_attention_heads=4,
               decoder_ffn_dim=64, dropout=0.0, bos_token_id=0, pad_token_id=1, eos_token_id=2, init_std=0.3,
               # the causal LM's cache is sized by num_hidden_layers, which MBartConfig maps to encoder_layers
               encoder_layers=2)

PAIRS = {
    # Donut-like: Swin (2 stages: 16 -> 32 wide) into an mBART of the same width, scaled embeddings as released
    "swin": (encoder_config("swin", 32), dict(d_model=32, scale_embedding=True)),
    # a wider ViT: transformers (and splice) add enc_to_dec_proj 48 -> 32; an untied relu head
    "vit": (encoder_config("vit", 48), dict(d_model=32, activation_function="relu", tie_word_embeddings=False)),
}


# Donut's and Nougat's own pairing, saved by transformers 5: a DonutSwin encoder (rectangular, no final norm; Nougat's
# first stage, 8x6, is not a window multiple) into an mBART decoder
SEED = 2  # a seed whose greedy tokens depend on the image (with some, the tiny decoder ignores it; parity holds)
DOCUMENTS = {
    "donut": ((40, 32), dict(window_size=4, depths=[1, 1], num_heads=[2, 4]), dict(scale_embedding=True)),
    "nougat": ((32, 24), dict(window_size=3, depths=[1, 1], num_heads=[2, 4]), dict(scale_embedding=False)),
}


@pytest.mark.parametrize("name", list(DOCUMENTS))
def test_document_folder_parity(name, tmp_path):
    size, enc, dec = DOCUMENTS[name]
    encoder = transformers.DonutSwinConfig(image_size=list(size), patch_size=4, embed_dim=16, **enc)
    hf = save_ved(tmp_path, encoder, transformers.MBartConfig(**DECODER, d_model=32, **dec), seed=SEED)
    ours = assert_folder_parity(hf, tmp_path, name, size=size)
    assert type(ours.encoder).__name__.startswith("DonutSwin") and ours.encoder.preprocessing.image_size == size
    assert ours.enc_to_dec_proj is None


@pytest.mark.parametrize("pair", list(PAIRS))
def test_ved_folder_parity(pair, tmp_path):
    encoder, dec = PAIRS[pair]
    hf = save_ved(tmp_path, encoder, transformers.MBartConfig(**DECODER, **dec), seed=2)
    ours = assert_folder_parity(hf, tmp_path, f"mbart-{pair}")
    assert (ours.enc_to_dec_proj is not None) == (pair == "vit")
    assert type(ours.decoder).__name__ == "MBartDecoder" and ours.decoder.norm_position == "pre"


@pytest.fixture(scope="module")
def causal_pair(tmp_path_factory):
    """(oracle MBartForCausalLM, ours, config dict, tensors on disk)."""
    from safetensors.torch import load_file

    path = tmp_path_factory.mktemp("mbart")
    torch.manual_seed(0)
    hf = perturb(transformers.MBartForCausalLM(transformers.MBartConfig(**DECODER, d_model=32, scale_embedding=True,
                                                                         add_cross_attention=True)), 5, 0.05)
    hf.save_pretrained(path)
    sd, cfg = load_file(str(path / "model.safetensors")), hf.config.to_dict()
    ours = M.build_mbart(M.MBartConfig(**M.config_from_hf(cfg))).eval()
    mapped, unused = M.state_dict_from_hf(sd, cfg)
    assert unused == [] and set(mapped) == set(ours.state_dict())
    ours.load_state_dict(mapped)
    return hf, ours, cfg, sd


@torch.no_grad()
def test_causal_lm_parity_and_round_trip(causal_pair):
    hf, ours, cfg, sd = causal_pair
    assert "model.decoder.layer_norm.weight" in sd and "lm_head.weight" not in sd  # tied
    ids, ctx = torch.randint(3, VOCAB, (2, 9)), torch.randn(2, 5, 32)
    ref = hf(input_ids=ids, encoder_hidden_states=ctx).logits
    MEASURED["mbart causal-lm logits"] = d = diff(ours(ids, context=ctx).logits, ref)
    assert d <= ATOL
    MEASURED["mbart causal-lm, no context"] = d = diff(ours(ids).logits, hf(input_ids=ids).logits)
    assert d <= ATOL
    assert diff(ours(ids, context=ctx).logits, ref) < diff(ours(ids).logits, ref)  # the context matters
    back = M.state_dict_to_hf(ours.state_dict(), M.config_to_hf(M.MBartConfig(**M.config_from_hf(cfg)).model_dump()))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    without = {k: v for k, v in ours.state_dict().items() if k != "layer_norm.bias"}
    with pytest.raises(CheckpointError, match="layer_norm.bias"):
        M.state_dict_to_hf(without, cfg)


@torch.no_grad()
def test_conditional_generation_hub_layout(causal_pair, tmp_path):
    # facebook/mbart-large-*: MBartForConditionalGeneration, shared.weight, an encoder with its own layer_norm
    from safetensors.torch import load_file

    torch.manual_seed(3)
    hub = perturb(transformers.MBartForConditionalGeneration(
        transformers.MBartConfig(**DECODER, d_model=32, encoder_attention_heads=4, encoder_ffn_dim=48)), 6, 0.05)
    hub.save_pretrained(tmp_path)
    sd, cfg = load_file(str(tmp_path / "model.safetensors")), hub.config.to_dict()
    assert "model.decoder.layer_norm.weight" in sd and "model.encoder.layer_norm.weight" in sd
    ours = M.build_mbart(M.MBartConfig(**M.config_from_hf(cfg))).eval()
    mapped, unused, notes = M.state_dict_from_hf(sd, cfg)
    assert all(k.startswith("model.encoder.") or k == "final_logits_bias" for k in unused) and notes
    assert "model.encoder.layer_norm.weight" in unused
    ours.load_state_dict(mapped)
    ids, ctx = torch.randint(3, VOCAB, (2, 7)), torch.randn(2, 4, 32)
    hidden = hub.model.decoder(input_ids=ids, encoder_hidden_states=ctx).last_hidden_state
    out = ours(ids, context=ctx)
    MEASURED["mbart hub-layout hidden"] = d = diff(out.hidden_states, hidden)
    assert d <= ATOL and diff(out.logits, hub.lm_head(hidden)) <= ATOL


def test_old_config_layout_keys_are_passed_over():
    # 2020 configs carry these; transformers 5 reads none of them (the model type decides): neither do we
    old = {**M.TINY, "normalize_before": True, "add_final_layer_norm": True, "normalize_embedding": True,
           "static_position_embeddings": False, "scale_embedding": True, "model_type": "mbart"}
    assert M.MBartConfig(**M.config_from_hf(old)).scale_embedding is True
    with pytest.raises(ConfigError, match="(?s)mBART.*activation_function.*tanh"):
        M.config_from_hf({**M.TINY, "activation_function": "tanh"})
    hf = M.config_to_hf(M.MBartConfig(**M.TINY).model_dump())
    assert hf["model_type"] == "mbart" and hf["forced_eos_token_id"] is None and hf["decoder_start_token_id"] is None
    assert hf["encoder_layers"] == M.TINY["decoder_layers"]


def test_pre_norm_and_errors(causal_pair):
    _, ours, _, _ = causal_pair
    assert all((s.norm, s.eps) == ("pre", 1e-5) for s in ours.layer_specs()) and ours.context_width == 32
    with pytest.raises(IncompatibleComponentsError, match="mBART's layers have their own cross-attention"):
        ours.install_cross_attention(1, torch.nn.Identity())
    with pytest.raises(InputError, match=r"context width 16 .*expects 32.*fix"):
        ours(torch.zeros(2, 3, dtype=torch.long), context=torch.zeros(2, 3, 16))
    default = M.MBartDecoder(**M.TINY)  # MBartConfig's defaults for what is left out
    assert len(default.layers) == 2 and default.token_ids["decoder_start"] is None


def test_print_measured():
    print("\nmax abs differences:", {k: f"{v:.2e}" for k, v in sorted(MEASURED.items()) if k.startswith("mbart")})
