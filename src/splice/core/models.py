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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.core.errors import InputError, Problem
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
        """The encoder's tokens for ``pixel_values`` (B, C, H, W), checked and cast by ``check_pixels``."""
        return self.encoder(check_pixels(pixel_values, self.encoder))

    def encoder_hidden(self, pixel_values: Any = None, encoder_outputs: Any = None) -> Tensor:
        """(B, N, D_enc): the given ``encoder_outputs`` (checked by ``check_encoder_outputs``), else the encoder's
        tokens for ``pixel_values``."""
        if encoder_outputs is not None:
            home = _home(self.enc_to_dec_proj if self.enc_to_dec_proj is not None else self.decoder)
            return check_encoder_outputs(encoder_outputs, self.encoder.hidden_size, home)
        if pixel_values is None:
            raise _input("pixel_values", "neither pixel_values nor encoder_outputs was given",
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
        B, vocab, home = encoder_hidden.shape[0], self.decoder.vocab_size, _home(self.decoder)
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
                raise _input("labels", "labels and decoder_input_ids differ in shape", given=tuple(labels.shape),
                             expected=f"the shape of decoder_input_ids {tuple(decoder_input_ids.shape)}",
                             fix="pass labels alone (they are shifted right into the decoder inputs), or one "
                             "label per decoder input token")
        if decoder_input_ids is None:
            raise _input("decoder_input_ids", "neither decoder_input_ids nor labels was given",
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

    # -- saving ---------------------------------------------------------------------------------------
    def save_pretrained(self, path, *, extra_files: dict[str, bytes] | None = None) -> None:
        """Write ``splice.json`` + ``model.safetensors`` atomically (a temp folder, then a rename)."""
        from splice.core.checkpoint import save_pretrained

        save_pretrained(self, path, extra_files=extra_files)

    def num_parameters(self, *, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)



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


# ---- input checks -----------------------------------------------------------------------------------------

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _input(name: str, message: str, *, given: Any = None, expected: str = "", fix: str) -> InputError:
    return InputError([Problem(name, message, given=given, expected=expected, fix=fix)])


def _home(module: nn.Module | None) -> Tensor | None:
    """The first floating-point parameter of ``module``: the device and dtype it computes in (None: it has none)."""
    for p in module.parameters() if module is not None else ():
        if p.is_floating_point():
            return p
    return None


def _skip_values(t: Tensor) -> bool:
    """Value checks (a reduction read back to Python) are skipped while tracing or compiling, and on meta."""
    return t.numel() == 0 or t.is_meta or torch.jit.is_tracing() or torch.compiler.is_compiling()


def _same_device(name: str, t: Tensor, home: Tensor | None) -> None:
    # a model on meta is being loaded or offloaded (its hooks move inputs): nothing to compare with
    if home is not None and t.device != home.device and not home.is_meta:
        raise _input(name, "is on another device than the model", given=str(t.device),
                     expected=f"a tensor on {home.device}, where the model is",
                     fix=f"move it with {name}.to({str(home.device)!r}), or move the model")


def _refuse_non_finite(name: str, t: Tensor, fix: str) -> None:
    """One sum over ``t`` (no temporaries; a float32 accumulator at least); NaN/Inf anywhere make it non-finite.
    Only then are the bad values counted, element-wise (a sum of finite values overflows only for absurd ones)."""
    if _skip_values(t):
        return
    if bool(torch.isfinite(t.detach().sum(dtype=torch.promote_types(t.dtype, torch.float32)))):
        return
    bad = t.numel() - int(torch.isfinite(t.detach()).sum())
    if bad:
        raise _input(name, f"{bad:,} of its {t.numel():,} values are NaN or Inf", expected="finite values", fix=fix)


def check_pixels(pixel_values: Any, encoder: nn.Module) -> Tensor:
    """``pixel_values`` as ``encoder`` computes them, or an ``InputError`` naming what does not fit.

    Expected: a floating (B, C, H, W) tensor on the encoder's device, C its ``preprocessing.in_chans`` (H, W its
    image size too when it declares ``fixed_size``; else the encoder checks). Another float dtype (fp16, bf16,
    fp64) is cast to the encoder's, as transformers' ViT does. Lists and numpy arrays are refused rather than
    guessed at; the fix says how to convert them. NaN or Inf is refused: a normalised image never holds them (they
    come from broken preprocessing, such as a zero std), and they would turn the logits, the loss and the caption
    to noise without a word. That check costs one sum over the pixels (read back, so on a GPU it waits for the
    pixels), small next to the encoder's forward.
    """
    pre = getattr(encoder, "preprocessing", None)
    c = getattr(pre, "in_chans", None)
    h, w = getattr(pre, "image_size", (None, None))
    fixed = bool(getattr(encoder, "fixed_size", False)) and h is not None
    want = f"a float tensor (B, {c or 'C'}, {h if fixed else 'H'}, {w if fixed else 'W'})"
    if not isinstance(pixel_values, Tensor):
        how = "torch.from_numpy(array)" if type(pixel_values).__module__ == "numpy" else "torch.stack(images)"
        raise _input("pixel_values", "must be a torch tensor", given=type(pixel_values).__name__, expected=want,
                     fix=f"convert with {how}, normalised with the encoder's mean and std (model.image_processor "
                     "or splice caption do both)")
    shape = tuple(pixel_values.shape)
    if not pixel_values.is_floating_point():
        raise _input("pixel_values", "must hold floating-point (normalised) values", given=pixel_values.dtype,
                     expected=want, fix="convert with .float() after normalising with the encoder's mean and std")
    if pixel_values.dim() != 4:
        raise _input("pixel_values", "must be a 4-D batch of images", given=shape, expected=want,
                     fix="batch a single image with pixel_values.unsqueeze(0); pass channels first")
    if c is not None and shape[1] != c:
        raise _input("pixel_values", f"has {shape[1]} channel(s)", given=shape, expected=want,
                     fix=f"pass {c}-channel images channels first (a channels-last batch: .permute(0, 3, 1, 2))")
    if fixed and shape[2:] != (h, w):
        raise _input("pixel_values", f"holds {shape[2]}x{shape[3]} images", given=shape, expected=want,
                     fix=f"resize the images to {h}x{w}, as the encoder's preprocessing does")
    home = _home(encoder)
    if home is not None:
        _same_device("pixel_values", pixel_values, home)
        if pixel_values.dtype != home.dtype:
            pixel_values = pixel_values.to(home.dtype)
    _refuse_non_finite("pixel_values", pixel_values, "check the preprocessing (a zero std divides by zero; an "
                       "unreadable image decoded to NaN); normalise as the encoder's mean and std say")
    return pixel_values


def _last_hidden(encoder_outputs: Any) -> Tensor:
    hidden = encoder_outputs
    if isinstance(hidden, (tuple, list)) and hidden:
        hidden = hidden[0]
    elif not isinstance(hidden, Tensor) and hasattr(hidden, "last_hidden_state"):
        hidden = hidden.last_hidden_state
    if not isinstance(hidden, Tensor):
        raise _input("encoder_outputs", "is not a tensor of encoder tokens", given=type(encoder_outputs).__name__,
                     expected="an EncoderOutput, a tensor (B, N, D) or a tuple whose first item is one",
                     fix="pass what model.encode(pixel_values) returned")
    return hidden


def check_encoder_outputs(encoder_outputs: Any, width: int, home: Tensor | None) -> Tensor:
    """The (B, N, D) tokens of ``encoder_outputs`` given by the user (an ``EncoderOutput``, a tensor, or a tuple
    whose first item is one), held to what the encoder itself would give: D its width, N >= 1, floating, on the
    model's device (cast to its dtype, as pixels are), and finite (one sum over them, as for pixels)."""
    hidden = _last_hidden(encoder_outputs)
    want = f"a float tensor (B, N, {width}): the encoder's tokens (N >= 1, D = the encoder's width {width})"
    fix = "pass what model.encode(pixel_values) returned, from this model's encoder"
    if not hidden.is_floating_point():
        raise _input("encoder_outputs", "must hold floating-point features", given=hidden.dtype, expected=want,
                     fix=fix)
    if hidden.dim() != 3 or hidden.shape[-1] != width or hidden.shape[1] == 0:
        raise _input("encoder_outputs", "does not have the encoder's shape", given=tuple(hidden.shape),
                     expected=want, fix=fix)
    if home is not None:
        _same_device("encoder_outputs", hidden, home)
        if hidden.dtype != home.dtype:
            hidden = hidden.to(home.dtype)
    _refuse_non_finite("encoder_outputs", hidden, "encode finite pixels; a NaN here turns every caption to noise")
    return hidden


def check_token_ids(name: str, ids: Any, B: int, vocab: int, home: Tensor | None, *, ignore: int | None = None,
                    max_len: int | None = None) -> tuple[Tensor, int | None]:
    """``ids`` as the decoder reads them: an integer (B, T) tensor on the model's device, T <= ``max_len``, every id
    in [0, vocab) (or ``ignore``: then T >= 1, and the ids come back as int64 for the loss). Returns the ids and how
    many are not ``ignore`` (None while tracing). One pass over the B*T ids, read back once."""
    span = f"[0, {vocab - 1}]" + (f" or {ignore} (ignored)" if ignore is not None else "")
    want = f"an integer tensor (B={B}, T) of token ids in {span}"
    if not isinstance(ids, Tensor):
        raise _input(name, "must be a tensor", given=type(ids).__name__, expected=want,
                     fix=f"convert with torch.tensor({name}, dtype=torch.long)")
    if ids.dtype not in _INT_DTYPES:
        raise _input(name, "must hold integer token ids", given=ids.dtype, expected=want,
                     fix="pass the tokenizer's ids as a LongTensor (.long() if they are whole numbers)")
    if ids.dim() != 2 or ids.shape[0] != B or (ignore is not None and ids.shape[1] == 0):
        fix = (f"batch one sequence with {name}.unsqueeze(0)" if ids.dim() == 1 else
               "give every row at least one label (the end-of-sequence token)" if ids.dim() == 2 and ids.shape[0] == B
               else f"pass one row per image ({B} rows), T tokens each")
        raise _input(name, "has the wrong shape", given=tuple(ids.shape), expected=want, fix=fix)
    if isinstance(max_len, int) and ids.shape[1] > max_len:
        raise _input(name, f"holds {ids.shape[1]} tokens per row, more than the decoder reads", given=tuple(ids.shape),
                     expected=f"at most {max_len} tokens (the decoder's positions)",
                     fix=f"truncate to {max_len} tokens (the tokenizer's max_length)")
    _same_device(name, ids, home)
    if ignore is not None or ids.dtype not in (torch.int64, torch.int32):
        ids = ids.long()  # what cross_entropy and nn.Embedding read
    if _skip_values(ids):
        return ids, (0 if ids.numel() == 0 else None)
    ignored = ids == ignore if ignore is not None else torch.zeros_like(ids, dtype=torch.bool)
    lo, hi = torch.aminmax(ids.masked_fill(ignored, 0))
    lo, hi, skipped = torch.stack((lo.long(), hi.long(), ignored.sum())).tolist()
    if lo < 0 or hi >= vocab:
        raise _input(name, f"holds token ids from {lo} to {hi}, outside the vocabulary (vocab_size={vocab})",
                     expected=want, fix="use the tokenizer that matches this decoder"
                     + ("; mark the positions to ignore with -100" if ignore is not None else ""))
    return ids, ids.numel() - skipped


def check_mask(mask: Any, shape: tuple[int, ...], home: Tensor | None) -> None:
    """A decoder attention mask: a tensor shaped like the decoder inputs, on the model's device."""
    if not isinstance(mask, Tensor) or tuple(mask.shape) != shape:
        raise _input("decoder_attention_mask", "is not shaped like decoder_input_ids",
                     given=tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__,
                     expected=f"a 0/1 tensor of shape {shape}", fix="1 marks a real token, 0 padding: one per token")
    _same_device("decoder_attention_mask", mask, home)
