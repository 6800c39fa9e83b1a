"""TrOCR decoder: transformers' VisionEncoderDecoder folders in TrOCR's base / small / large shapes (tiny), read by
``splice.load`` with the same logits, the same greedy and beam tokens, and exported back; what only TrOCR has
(a cross-attention wider than the decoder, sinusoidal positions counted over real tokens, ``output_projection``)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import splice
import transformers  # the oracle only; src/ never imports it
from oracle import perturb
from splice.core.errors import ConfigError, IncompatibleComponentsError, InputError
from splice.plugins import trocr as T

ATOL = 1e-4
VOCAB = 99
TOKENS = dict(decoder_start_token_id=2, pad_token_id=1, eos_token_id=2)  # TrOCR's: start with </s>, pad 1
# init_std 0.3: at transformers' 0.02 a tiny random decoder copies its input token (here </s>, so generation stops
# at once); wider weights make greedy and beam search walk several steps and depend on the image
DECODER = dict(vocab_size=VOCAB, max_position_embeddings=64, decoder_layers=2, decoder_attention_heads=4,
               dropout=0.0, init_std=0.3, **TOKENS)
MEASURED: dict[str, float] = {}  # the largest differences seen, printed at the end (pytest -s)


def encoder_config(family: str, width: int, **over):
    """A tiny transformers vision config: 32 px images, patch 8, 2 layers (Swin: from splice's tiny Swin)."""
    if family == "swin":
        return transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                       window_size=4, **over)
    cls = {"vit": transformers.ViTConfig, "deit": transformers.DeiTConfig}[family]
    return cls(image_size=32, patch_size=8, hidden_size=width, num_hidden_layers=2, num_attention_heads=width // 16,
               intermediate_size=2 * width, **over)


def save_ved(folder, encoder, decoder, seed: int = 0):
    """transformers builds, perturbs and saves the pair; returns the oracle."""
    torch.manual_seed(seed)
    cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    for key, value in TOKENS.items():
        setattr(cfg, key, value)
    hf = perturb(transformers.VisionEncoderDecoderModel(config=cfg), seed, scale=0.05)
    hf.save_pretrained(folder)
    return hf.eval()


def diff(a, b) -> float:
    return float((a - b).abs().max())


def from_pretrained(folder):
    """transformers' own reading of a folder. transformers 5.24 builds TrOCR's sinusoid table on the meta device in
    ``from_pretrained`` and never fills it (its forward then fails: "Cannot copy out of meta tensor"), so the table
    is computed again here, as its constructor does."""
    model = transformers.VisionEncoderDecoderModel.from_pretrained(folder).eval()
    positions = getattr(getattr(model.decoder, "model", None), "decoder", None)
    positions = getattr(positions, "embed_positions", None)
    if getattr(getattr(positions, "weights", None), "is_meta", False):
        positions.weights = positions.get_embedding(positions.weights.shape[0], positions.embedding_dim,
                                                    positions.padding_idx)
    return model


@torch.no_grad()
def assert_folder_parity(hf, folder, name: str, ids=None, size=(32, 32)) -> splice.EncoderDecoderModel:
    """splice.load(folder) against the oracle: logits, greedy and 3-beam tokens, and the export read back."""
    ours = splice.load(folder)
    report = ours.loading_report
    assert not report.missing and not report.unexpected, report
    g = torch.Generator().manual_seed(1)
    px = torch.randn(2, 3, *size, generator=g)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g) if ids is None else ids
    ref = hf(pixel_values=px, decoder_input_ids=ids).logits
    got = ours(pixel_values=px, decoder_input_ids=ids).logits
    MEASURED[f"{name} logits"] = d = diff(got, ref)
    assert d <= ATOL
    for beams in (1, 3):
        want = hf.generate(pixel_values=px, max_new_tokens=8, do_sample=False, num_beams=beams)
        assert ours.generate(px, max_new_tokens=8, num_beams=beams).tolist() == want.tolist(), beams
        assert want.shape[1] >= 5 and want[0].tolist() != want[1].tolist()  # a real search, image-dependent
    splice.export_transformers(ours, folder / "exported")
    again = from_pretrained(folder / "exported")
    MEASURED[f"{name} export"] = d = diff(again(pixel_values=px, decoder_input_ids=ids).logits, ref)
    assert d <= ATOL
    return ours


# TrOCR's released shapes, tiny: base = a 768-wide ViT/BEiT into a 1024-wide decoder (cross_attention_hidden_size
# 768), learned positions; small = DeiT 384 into 256, sinusoidal positions, scaled embeddings, relu; large = 1024
# into 1024. Each varies layernorm_embedding and tying too. "projection": no cross_attention_hidden_size, widths
# differ, so transformers (and splice) add enc_to_dec_proj.
SHAPES = {
    "base": (("vit", 48), dict(d_model=64, decoder_ffn_dim=128, cross_attention_hidden_size=48,
                                tie_word_embeddings=False)),
    "small": (("deit", 48), dict(d_model=32, decoder_ffn_dim=64, cross_attention_hidden_size=48,
                                 use_learned_position_embeddings=False, scale_embedding=True,
                                 activation_function="relu")),
    "large": (("vit", 32), dict(d_model=32, decoder_ffn_dim=64, cross_attention_hidden_size=32,
                                layernorm_embedding=False)),
    "projection": (("vit", 48), dict(d_model=32, decoder_ffn_dim=64, use_learned_position_embeddings=False,
                                     layernorm_embedding=False, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_ved_folder_parity(shape, tmp_path):
    (family, width), dec = SHAPES[shape]
    hf = save_ved(tmp_path, encoder_config(family, width), transformers.TrOCRConfig(**DECODER, **dec), seed=1)
    ours = assert_folder_parity(hf, tmp_path, f"trocr-{shape}")
    cross = dec.get("cross_attention_hidden_size")
    projected = cross is None and width != dec["d_model"]  # transformers' rule
    assert (ours.enc_to_dec_proj is not None) == (getattr(hf, "enc_to_dec_proj", None) is not None) == projected
    assert ours.decoder.context_width == (cross or dec["d_model"])
    assert ours.decoder.layers[0].encoder_attn.k_proj.weight.shape == (dec["d_model"], cross or dec["d_model"])


@torch.no_grad()
def test_sinusoidal_positions_count_real_tokens(tmp_path):
    # padding ids inside the decoder input: fairseq's positions skip them, and their position row is zero
    hf = save_ved(tmp_path, encoder_config("deit", 48), transformers.TrOCRConfig(**DECODER, **SHAPES["small"][1]))
    ids = torch.tensor([[2, 5, 1, 1, 9, 12, 40], [2, 1, 7, 8, 1, 30, 31]])
    ours = assert_folder_parity(hf, tmp_path, "trocr-small padded", ids=ids)
    assert ours.decoder.embed_positions is None and "embed_positions" not in str(list(ours.decoder.state_dict()))
    positions = ours.decoder.positions(ids, past=3)
    assert positions.tolist() == [[3, 4, -1, -1, 5, 6, 7], [3, -1, 4, 5, -1, 6, 7]]
    row = T.sinusoids(torch.tensor([1, 2, 3]), 32, padding_idx=1)
    table = transformers.models.trocr.modeling_trocr.TrOCRSinusoidalPositionalEmbedding.get_embedding(4, 32, 1)
    assert torch.equal(row, table[1:4]) and torch.equal(T.sinusoids(torch.tensor([5]), 7, 1),
                                                        type(hf.decoder.model.decoder.embed_positions).get_embedding(6, 7, 1)[5:])


@torch.no_grad()
def test_causal_lm_file_and_export(tmp_path):
    # a standalone TrOCRForCausalLM folder (model.decoder.* + output_projection.weight), read by the plugin's mapping
    from safetensors.torch import load_file

    torch.manual_seed(0)
    hf = perturb(transformers.TrOCRForCausalLM(transformers.TrOCRConfig(**DECODER, **SHAPES["base"][1])), 3, 0.05)
    hf.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    assert "output_projection.weight" in sd
    cfg = hf.config.to_dict()
    ours = T.build_trocr(T.TrOCRConfig(**T.config_from_hf(cfg))).eval()
    mapped, unused = T.state_dict_from_hf(sd, cfg)
    assert unused == [] and set(mapped) == set(ours.state_dict())
    ours.load_state_dict(mapped)
    ids, ctx = torch.randint(3, VOCAB, (2, 6)), torch.randn(2, 5, 48)
    ref = hf(input_ids=ids, encoder_hidden_states=ctx).logits
    MEASURED["trocr causal-lm logits"] = diff(ours(ids, context=ctx).logits, ref)
    assert diff(ours(ids, context=ctx).logits, ref) <= ATOL
    back = T.state_dict_to_hf(ours.state_dict(), T.config_to_hf(T.TrOCRConfig(**T.config_from_hf(cfg)).model_dump()))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # a tied head written by torch.save (.bin) is the embedding again: passed over, not unused
    tied = {**cfg, "tie_word_embeddings": True}
    mapped, unused = T.state_dict_from_hf({**sd, "model.decoder.embed_positions._float_tensor": torch.zeros(1)}, tied)
    assert "output_projection.weight" not in mapped and unused == ["model.decoder.embed_positions._float_tensor"]


def test_compose_uses_context_width():
    spec = {"encoder": {"name": "deit_distilled", "config": {"img_size": 32, "patch_size": 8, "embed_dim": 48,
                                                              "depth": 1, "num_heads": 3}},
            "decoder": {"name": "trocr", "config": dict(T.TINY, cross_attention_hidden_size=48)}}
    plan = splice.validate(spec)
    assert plan.ok, plan.summary()
    assert plan.projection is None and plan.context_width == 48
    narrow = splice.validate({**spec, "decoder": {"name": "trocr", "config": dict(T.TINY)}})
    assert narrow.ok and narrow.projection == "linear" and narrow.context_width == 32


def test_errors_name_field_and_fix():
    dec = T.build_trocr(T.TrOCRConfig(**T.TINY, cross_attention_hidden_size=48)).eval()
    with pytest.raises(InputError, match=r"context width 32 .*expects 48.*fix"):
        dec(torch.zeros(2, 3, dtype=torch.long), context=torch.zeros(2, 5, 32))
    with pytest.raises(IncompatibleComponentsError, match="TrOCR's layers have their own cross-attention"):
        dec.install_cross_attention(0, torch.nn.Identity())
    with pytest.raises(InputError, match="position_ids go down to -1"):
        dec(torch.zeros(1, 2, dtype=torch.long), position_ids=torch.tensor([-1, 0]))
    with pytest.raises(ValidationError, match="pad_token_id=None with use_learned_position_embeddings=false.*fix"):
        T.TrOCRConfig(**T.TINY, use_learned_position_embeddings=False, pad_token_id=None)
    with pytest.raises(ValidationError, match="cross_attention_hidden_size"):
        T.TrOCRConfig(**T.TINY, cross_attention_hidden_size=0)
    with pytest.raises(ConfigError, match="activation_function.*tanh"):
        T.config_from_hf({**T.TINY, "activation_function": "tanh"})


def test_config_round_trip():
    values = T.TrOCRConfig(**T.TINY, cross_attention_hidden_size=48, use_learned_position_embeddings=False).model_dump()
    hf = T.config_to_hf(values)
    assert hf["model_type"] == "trocr" and hf["cross_attention_hidden_size"] == 48
    assert T.TrOCRConfig(**T.config_from_hf(hf)).model_dump() == values
    same = T.config_to_hf(T.TrOCRConfig(**T.TINY, cross_attention_hidden_size=32).model_dump())
    assert same["cross_attention_hidden_size"] is None  # equal to d_model: transformers reads it as none
    c = T.TrOCRConfig()
    assert (c.d_model, c.max_position_embeddings, c.decoder_start_token_id, c.layernorm_embedding) == (1024, 512, 2, True)


def test_print_measured():
    print("\nmax abs differences:", {k: f"{v:.2e}" for k, v in sorted(MEASURED.items())})


def test_export_refuses_a_projection_to_cross_attention_hidden_size(tmp_path):
    """transformers' VisionEncoderDecoder requires cross_attention_hidden_size to equal the encoder's width; a
    splice model that projects the encoder to it has no transformers equivalent."""
    spec = {"encoder": {"name": "vit", "config": {"img_size": 16, "patch_size": 8, "embed_dim": 48, "depth": 1,
                                                  "num_heads": 4}},
            "decoder": {"name": "trocr", "config": {"vocab_size": 60, "d_model": 32, "decoder_layers": 1, "decoder_attention_heads": 4,
                                                    "decoder_ffn_dim": 64, "max_position_embeddings": 32,
                                                    "cross_attention_hidden_size": 40}},
            "tokens": {"decoder_start": 2, "pad": 1, "eos": 2}}
    model = splice.compose(spec, seed=0)
    assert model.enc_to_dec_proj is not None and model.enc_to_dec_proj.out_features == 40
    with pytest.raises(splice.CheckpointError, match="cross_attention_hidden_size 40"):
        splice.export_transformers(model, tmp_path / "hf")
