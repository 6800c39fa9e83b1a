"""Tiny transformers models for the parity tests (transformers is the oracle), every weight perturbed:
transformers initialises biases to 0 and norms to 1, and random values make a wrong mapping visible."""

from __future__ import annotations

import inspect

import torch
import transformers


def perturb(model, seed: int = 0, scale: float = 0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def tiny_ved(*, enc_width=48, dec_width=32, vocab=99, enc_layers=2, n_positions=32, tokens=(98, 0, 98), seed=0,
             scale=0.02, **decoder_kwargs):
    """A ViT + GPT-2 VisionEncoderDecoderModel (32 px images, patch 8, 3 heads; 2 decoder layers, 4 heads)."""
    torch.manual_seed(seed)
    enc = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=enc_width, num_hidden_layers=enc_layers,
                                 num_attention_heads=3, intermediate_size=2 * enc_width)
    dec = transformers.GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=dec_width, n_layer=2, n_head=4,
                                  add_cross_attention=True, is_decoder=True, **decoder_kwargs)
    cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = tokens
    return perturb(transformers.VisionEncoderDecoderModel(config=cfg), seed, scale)


def reads_context(entry) -> bool:
    """Whether transformers' causal LM for this decoder family takes ``encoder_hidden_states`` (cross-attention):
    a VisionEncoderDecoderModel can pair it. LLaMA's cannot (it swallows the argument and ignores the image)."""
    model_type = entry.hf.config_to_hf(entry.config_cls(**entry.tiny).model_dump())["model_type"]
    cls = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(transformers.AutoConfig.for_model(model_type))]
    return "encoder_hidden_states" in inspect.signature(cls.forward).parameters
