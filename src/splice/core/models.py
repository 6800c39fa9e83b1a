"""The assembled models. ``EncoderDecoderModel`` is the pair transformers calls VisionEncoderDecoderModel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from splice.core.errors import InputError
from splice.core.interfaces import EncoderOutput


@dataclass
class Seq2SeqOutput:
    loss: Tensor | None
    logits: Tensor  # (B, T, V)
    encoder_last_hidden_state: Tensor  # (B, N, D_enc), before the projection
    cache: Any = None


def shift_right(labels: Tensor, pad: int, start: int) -> Tensor:
    """Decoder inputs from labels: prepend ``start``, drop the last label, -100 -> ``pad``."""
    shifted = labels.new_empty(labels.shape)  # (B, T)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start
    return shifted.masked_fill_(shifted == -100, pad)


class EncoderDecoderModel(nn.Module):
    """A vision encoder, an optional projection ``enc_to_dec_proj``, and a decoder with cross-attention.

    Parameter names follow transformers at the top level (``encoder.``, ``decoder.``, ``enc_to_dec_proj.``).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        enc_to_dec_proj: nn.Module | None,
        *,
        tokens: dict[str, int | None],
        spec: dict,
        cross_attention: list[nn.Module] | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        if enc_to_dec_proj is not None:
            self.enc_to_dec_proj = enc_to_dec_proj
        else:
            self.enc_to_dec_proj = None
        self.tokens = dict(tokens)
        self.spec = spec  # the resolved composition spec: written to splice.json
        # the modules the adapters installed (kept as a plain list: their parameters live in the decoder)
        self.cross_attention_modules = list(cross_attention or [])
        self.loading_report = None
        self.generation_defaults: dict[str, Any] = {}
        self.tokenizer = None  # a tokenizers.Tokenizer, saved beside the weights as tokenizer.json
        self.image_processor = None  # an ImageProcessor; None: derived from the encoder's preprocessing

    # -- pieces ---------------------------------------------------------------------------------------
    def encode(self, pixel_values: Tensor) -> EncoderOutput:
        if not isinstance(pixel_values, Tensor):
            raise InputError(f"pixel_values must be a torch.Tensor (B, C, H, W); got {type(pixel_values).__name__}")
        if not pixel_values.is_floating_point():
            raise InputError(
                f"pixel_values must be floating point (normalised images); got dtype {pixel_values.dtype}\n"
                "    fix: convert with .float() after normalising with the encoder's mean and std"
            )
        return self.encoder(pixel_values)

    def context(self, encoder_hidden: Tensor) -> Tensor:
        """Encoder tokens as the decoder's cross-attention context (projected when widths differ)."""
        return encoder_hidden if self.enc_to_dec_proj is None else self.enc_to_dec_proj(encoder_hidden)

    def _token(self, name: str, field: str) -> int:
        value = self.tokens.get(name)
        if value is None:
            raise InputError(
                f"tokens.{name} is not set, and {field} needs it\n"
                f"    fix: add `tokens: {{{name}: <id>}}` to the spec, or pass decoder_input_ids yourself"
            )
        return value

    # -- forward --------------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        labels: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        encoder_outputs: EncoderOutput | Tensor | tuple | None = None,
        cache: Any = None,
    ) -> Seq2SeqOutput:
        """Logits for ``decoder_input_ids``; with ``labels`` alone, the inputs are ``labels`` shifted right and
        the loss is the mean cross-entropy over labels that are not -100 (transformers 5: no second shift)."""
        if encoder_outputs is None:
            if pixel_values is None:
                raise InputError("give pixel_values (B, C, H, W) or encoder_outputs")
            encoder_outputs = self.encode(pixel_values)
        encoder_hidden = _last_hidden(encoder_outputs)  # (B, N, D_enc)
        if labels is not None and decoder_input_ids is None:
            start = self._token("decoder_start", "labels (to shift them right)")
            decoder_input_ids = shift_right(labels, self._token("pad", "labels (to shift them right)"), start)
        if decoder_input_ids is None:
            raise InputError("give decoder_input_ids (B, T) or labels (B, T)")
        out = self.decoder(
            decoder_input_ids,
            context=self.context(encoder_hidden),
            attention_mask=decoder_attention_mask,
            cache=cache,
        )
        loss = None
        if labels is not None:
            if labels.shape != decoder_input_ids.shape:
                raise InputError(
                    f"labels {tuple(labels.shape)} and decoder_input_ids {tuple(decoder_input_ids.shape)} differ in shape"
                )
            loss = F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return Seq2SeqOutput(loss=loss, logits=out.logits, encoder_last_hidden_state=encoder_hidden, cache=out.cache)

    def generate(self, pixel_values: Tensor | None = None, **kwargs) -> Tensor:
        """Token ids (B × num_return_sequences, prompt + new), the prompt defaulting to ``decoder_start``;
        see ``splice.core.generation.generate`` for every option."""
        from splice.core.generation import generate

        return generate(self, pixel_values, **kwargs)

    # -- saving ---------------------------------------------------------------------------------------
    def save_pretrained(self, path, *, extra_files: dict[str, bytes] | None = None) -> None:
        """Write ``splice.json`` + ``model.safetensors`` atomically (a temp folder, then a rename)."""
        from splice.core.checkpoint import save_pretrained

        save_pretrained(self, path, extra_files=extra_files)

    def num_parameters(self, *, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def _last_hidden(encoder_outputs) -> Tensor:
    if isinstance(encoder_outputs, Tensor):
        return encoder_outputs
    if isinstance(encoder_outputs, EncoderOutput) or hasattr(encoder_outputs, "last_hidden_state"):
        return encoder_outputs.last_hidden_state
    if isinstance(encoder_outputs, (tuple, list)) and encoder_outputs and isinstance(encoder_outputs[0], Tensor):
        return encoder_outputs[0]
    raise InputError(
        f"encoder_outputs must be an EncoderOutput, a tensor (B, N, D) or a tuple whose first item is one; "
        f"got {type(encoder_outputs).__name__}"
    )
