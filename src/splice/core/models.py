"""The assembled models. ``EncoderDecoderModel`` is the pair transformers calls VisionEncoderDecoderModel.

Tensors are checked where they enter (``encode``, ``forward``, ``generate``): one that does not fit the model is an
``InputError`` naming the argument, what was given, what was expected and the fix, before torch sees it. The checks
read shapes, dtypes and devices, plus one reduction over the pixels (or the given encoder outputs) and one over the
token ids; they change no number of a valid input.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from splice.core.errors import InputError
from splice.core.inputs import check_encoder_outputs, check_mask, check_pixels, check_token_ids, home_tensor, input_error
from splice.core.interfaces import EncoderOutput


@dataclass
class Seq2SeqOutput:
    loss: Tensor | None
    logits: Tensor  # (B, T, V)
    encoder_last_hidden_state: Tensor  # (B, N, D_enc), before the projection
    cache: Any = None


@dataclass(frozen=True)
class CaptionEncoding:
    """How ``splice.train``'s data turns a caption into a row of ``labels``: the tokenizer's own special tokens
    or not, then ``eos`` appended (None: nothing), cut to ``max_len`` tokens; ``vocab_size`` bounds the ids."""

    special_tokens: bool = False
    eos: int | None = None
    max_len: int | None = None
    vocab_size: int | None = None
    component: str = "decoder"  # the spec key of the component that reads the ids (named in errors)


def shift_right(labels: Tensor, pad: int, start: int) -> Tensor:
    """Decoder inputs from labels: prepend ``start``, drop the last label, -100 -> ``pad``."""
    shifted = labels.new_empty(labels.shape)  # (B, T)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start
    return shifted.masked_fill_(shifted == -100, pad)


class ComposedModel(nn.Module):
    """What every composition kind's model is: an ``nn.Module`` that carries its resolved ``spec`` (written to
    ``splice.json``), ``generation_defaults``, ``tokenizer`` and ``image_processor`` (saved beside the weights), the
    ``loading_report`` of its last load, and saves itself with ``save_pretrained``. A kind's model subclasses it
    and calls ``super().__init__(spec)`` first.

    ``image_processor`` None: ``save_pretrained`` derives one from the preprocessing of ``vision_tower()`` (the
    module named ``encoder`` unless the kind says otherwise)."""

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec  # the resolved composition spec: written to splice.json
        self.loading_report = None
        self.generation_defaults: dict[str, Any] = {}
        self.tokenizer = None  # a tokenizers.Tokenizer, saved beside the weights as tokenizer.json
        self.image_processor = None  # an ImageProcessor; None: derived from the encoder's preprocessing

    def freeze_groups(self) -> dict[str, list[nn.Parameter]]:
        """The parts ``freeze`` can name, each with its parameters (a kind's model says what they are)."""
        return {}

    def freeze(self, parts: list[str]) -> None:
        """Turn off gradients for the named parts (``freeze_groups`` lists them)."""
        groups = self.freeze_groups()
        unknown = [p for p in parts if p not in groups]
        if unknown:
            raise input_error("freeze", "not a part of this model", given=unknown,
                              expected=", ".join(groups) or "nothing (this model has no named parts)",
                              fix="name the parts to freeze from the list above")
        for part in parts:
            for p in groups[part]:
                p.requires_grad_(False)

    def claim_pretrained(self, role: str, tensors: dict[str, Tensor]) -> dict[str, str]:
        """Warm start: the tensors of part ``role``'s pretrained weights that the part itself had no place for
        (named as its mapping left them), for the kind to take what belongs to it (a dual encoder takes the ViT
        pooler); load them and return ``{name given: the model's state_dict name}``. Default: nothing taken."""
        return {}

    def save_pretrained(self, path, *, extra_files: dict[str, bytes] | None = None) -> None:
        """Write ``splice.json`` + ``model.safetensors`` (and the processor, tokenizer, generation defaults)
        atomically: a temp folder, then a rename."""
        from splice.core.checkpoint import save_pretrained

        save_pretrained(self, path, extra_files=extra_files)

    def num_parameters(self, *, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # -- what ``splice.train`` asks of a kind's model ------------------------------------------------------
    # A training batch is a dict: ``pixel_values`` (B, C, H, W), ``labels`` (B, T) the captions' token ids (as
    # ``caption_encoding`` says) with -100 after each row's end, ``captions``, ``categories``, ``errors``.
    # The defaults fit a kind whose ``forward(pixel_values=..., labels=...)`` returns the mean ``loss`` over the
    # labels that are not -100; a kind overrides what differs.

    def vision_tower(self) -> nn.Module | None:
        """The vision encoder (its ``preprocessing`` sizes the training images): ``encoder`` by default."""
        return getattr(self, "encoder", None)

    def training_data(self, path: Any, *, seed: int, eval_path: Any = None) -> tuple | None:
        """``splice train --data PATH`` for a file set this kind reads its own way (question/answer rows):
        ``(train source, eval source or None, reports)``; None: the caption reader (``splice.data.load_data``)."""
        return None

    def caption_encoding(self) -> CaptionEncoding:
        """How captions become ``labels`` rows (default: the tokenizer's ids, nothing added)."""
        return CaptionEncoding()

    def training_weight(self, batch: dict) -> int:
        """What the batch's loss averages over: the trainer sums ``training_loss_sum`` over every micro-batch and
        process and divides by the global total of this (default: the labels that are not -100)."""
        return int((batch["labels"] != -100).sum())

    def training_loss_sum(self, call: nn.Module, batch: dict) -> Tensor:
        """The batch's summed loss (a 0-d tensor). ``call`` is the model as the trainer runs it, a
        DistributedDataParallel wrapper in a multi-process run: call ``forward`` through it."""
        loss = call(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
        return loss.float() * self.training_weight(batch)

    def evaluate_training(self, source: Any, *, n: int | None, batch_size: int, precision: str) -> dict | None:
        """The held-out figures ``splice train`` logs (a dict with ``loss`` and ``n``; other float values are shown
        as percentages); None: the trainer's default (greedy exact match for an encoder-decoder captioner, else
        the mean loss over ``source.eval_batches``)."""
        return None


class EncoderDecoderModel(ComposedModel):
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
        super().__init__(spec)
        self.encoder = encoder
        self.decoder = decoder
        self.enc_to_dec_proj = enc_to_dec_proj
        self.tokens = dict(tokens)
        # the modules the adapters installed (kept as a plain list: their parameters live in the decoder)
        self.cross_attention_modules = list(cross_attention or [])

    # -- pieces ---------------------------------------------------------------------------------------
    def encode(self, pixel_values: Tensor) -> EncoderOutput:
        """The encoder's tokens for ``pixel_values`` (B, C, H, W), checked and cast by ``check_pixels``."""
        return self.encoder(check_pixels(pixel_values, self.encoder))

    def encoder_hidden(self, pixel_values: Any = None, encoder_outputs: Any = None) -> Tensor:
        """(B, N, D_enc): the given ``encoder_outputs`` (checked by ``check_encoder_outputs``), else the encoder's
        tokens for ``pixel_values``."""
        if encoder_outputs is not None:
            home = home_tensor(self.enc_to_dec_proj if self.enc_to_dec_proj is not None else self.decoder)
            return check_encoder_outputs(encoder_outputs, self.encoder.hidden_size, home)
        if pixel_values is None:
            raise input_error("pixel_values", "neither pixel_values nor encoder_outputs was given",
                         expected="pixel_values (B, C, H, W) or encoder_outputs (B, N, D)",
                         fix="pass the preprocessed images, or what model.encode(images) returned")
        return self.encode(pixel_values).last_hidden_state

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
        the loss is the mean cross-entropy over labels that are not -100 (transformers 5: no second shift).

        Labels that are all -100 leave nothing to learn from: the loss is then 0 with a zero gradient (the sum
        over no token, as ``splice train`` counts it) and a warning, where transformers' mean is 0/0 = NaN, which
        would turn every weight to NaN at the next optimizer step. An empty batch gives (0, T, V) logits and a
        loss of 0. Pixels or encoder outputs holding NaN or Inf are an ``InputError`` (see ``check_pixels``).
        """
        encoder_hidden = self.encoder_hidden(pixel_values, encoder_outputs)  # (B, N, D_enc)
        B, vocab, home = encoder_hidden.shape[0], self.decoder.vocab_size, home_tensor(self.decoder)
        max_len = getattr(self.decoder, "max_positions", None) if cache is None else None  # else the decoder checks
        kept = None
        if decoder_input_ids is not None:
            decoder_input_ids, _ = check_token_ids("decoder_input_ids", decoder_input_ids, B, vocab, home,
                                                   max_len=max_len)
        if labels is not None:
            labels, kept = check_token_ids("labels", labels, B, vocab, home, ignore=-100, max_len=max_len)
            if decoder_input_ids is None:
                start = self._token("decoder_start", "labels (to shift them right)")
                decoder_input_ids = shift_right(labels, self._token("pad", "labels (to shift them right)"), start)
            elif labels.shape != decoder_input_ids.shape:
                raise input_error("labels", "labels and decoder_input_ids differ in shape", given=tuple(labels.shape),
                             expected=f"the shape of decoder_input_ids {tuple(decoder_input_ids.shape)}",
                             fix="pass labels alone (they are shifted right into the decoder inputs), or one "
                             "label per decoder input token")
        if decoder_input_ids is None:
            raise input_error("decoder_input_ids", "neither decoder_input_ids nor labels was given",
                         expected="decoder_input_ids (B, T) or labels (B, T)",
                         fix="pass labels to train, or decoder_input_ids for logits (model.generate to caption)")
        if decoder_attention_mask is not None:
            check_mask(decoder_attention_mask, tuple(decoder_input_ids.shape), home)
        out = self.decoder(
            decoder_input_ids,
            context=self.context(encoder_hidden),
            attention_mask=decoder_attention_mask,
            cache=cache,
        )
        loss = None if labels is None else _loss(out.logits, labels, kept)
        return Seq2SeqOutput(loss=loss, logits=out.logits, encoder_last_hidden_state=encoder_hidden, cache=out.cache)

    def generate(self, pixel_values: Tensor | None = None, **kwargs) -> Tensor:
        """Token ids (B × num_return_sequences, prompt + new), the prompt defaulting to ``decoder_start``;
        see ``splice.core.generation.generate`` for every option."""
        from splice.core.generation import generate

        return generate(self, pixel_values, **kwargs)

    # -- training (see ComposedModel) -------------------------------------------------------------------
    def caption_encoding(self) -> CaptionEncoding:
        """Captions as the decoder's targets: the tokenizer's ids then ``eos``, within the decoder's positions."""
        return CaptionEncoding(special_tokens=False, eos=self.tokens.get("eos"),
                               max_len=getattr(self.decoder, "max_positions", None) or 1024,
                               vocab_size=getattr(self.decoder, "vocab_size", None))

    def training_loss_sum(self, call: nn.Module, batch: dict) -> Tensor:
        """Summed cross-entropy over the label tokens that are not -100; the decoder's inputs are the labels
        shifted right."""
        start, pad = self.tokens.get("decoder_start"), self.tokens.get("pad")
        if start is None or pad is None:
            raise InputError(
                f"training needs tokens.decoder_start and tokens.pad in the spec (given {self.tokens})\n"
                "    fix: add them under `tokens:`"
            )
        labels = batch["labels"]  # (B, T)
        logits = call(pixel_values=batch["pixel_values"], decoder_input_ids=shift_right(labels, pad, start)).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")

    def freeze_groups(self) -> dict[str, list[nn.Parameter]]:
        """``encoder``, ``decoder``, ``cross_attention``, ``projection``: the adapters' modules stay trainable
        unless named."""
        cross = {id(p) for m in self.cross_attention_modules for p in m.parameters()}
        return {
            "encoder": list(self.encoder.parameters()),
            "decoder": [p for p in self.decoder.parameters() if id(p) not in cross],
            "cross_attention": [p for m in self.cross_attention_modules for p in m.parameters()],
            "projection": list(self.enc_to_dec_proj.parameters()) if self.enc_to_dec_proj is not None else [],
        }


def _loss(logits: Tensor, labels: Tensor, kept: int | None) -> Tensor:
    """Mean cross-entropy over the labels that are not -100; 0 (a zero gradient) when there is none."""
    flat = logits.flatten(0, 1).float()  # (B*T, V)
    if kept != 0:  # None: not counted (tracing)
        return F.cross_entropy(flat, labels.flatten(), ignore_index=-100)
    if labels.numel():
        warnings.warn(
            f"labels: all {labels.numel():,} labels are -100 (ignored), so there is nothing to learn from; the loss "
            "is 0 with a zero gradient (transformers gives NaN). Check the collator's masking or truncation.",
            stacklevel=2,
        )
    return F.cross_entropy(flat, labels.flatten(), ignore_index=-100, reduction="sum")  # 0, still in the graph
