"""Checks of what a caller passes to a model at run time: pixels, encoder outputs, token ids, masks.

Each check raises one ``InputError`` naming the argument, what was given, what was expected and the fix, before
any tensor reaches torch. Used by ``models`` (forward, encode) and ``generation`` (generate).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from splice.core.errors import InputError, Problem


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def input_error(name: str, message: str, *, given: Any = None, expected: str = "", fix: str) -> InputError:
    return InputError([Problem(name, message, given=given, expected=expected, fix=fix)])


def home_tensor(module: nn.Module | None) -> Tensor | None:
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
        raise input_error(name, "is on another device than the model", given=str(t.device),
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
        raise input_error(name, f"{bad:,} of its {t.numel():,} values are NaN or Inf", expected="finite values", fix=fix)


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
        raise input_error("pixel_values", "must be a torch tensor", given=type(pixel_values).__name__, expected=want,
                     fix=f"convert with {how}, normalised with the encoder's mean and std (model.image_processor "
                     "or splice caption do both)")
    shape = tuple(pixel_values.shape)
    if not pixel_values.is_floating_point():
        raise input_error("pixel_values", "must hold floating-point (normalised) values", given=pixel_values.dtype,
                     expected=want, fix="convert with .float() after normalising with the encoder's mean and std")
    if pixel_values.dim() != 4:
        raise input_error("pixel_values", "must be a 4-D batch of images", given=shape, expected=want,
                     fix="batch a single image with pixel_values.unsqueeze(0); pass channels first")
    if c is not None and shape[1] != c:
        raise input_error("pixel_values", f"has {shape[1]} channel(s)", given=shape, expected=want,
                     fix=f"pass {c}-channel images channels first (a channels-last batch: .permute(0, 3, 1, 2))")
    if fixed and shape[2:] != (h, w):
        raise input_error("pixel_values", f"holds {shape[2]}x{shape[3]} images", given=shape, expected=want,
                     fix=f"resize the images to {h}x{w}, as the encoder's preprocessing does")
    home = home_tensor(encoder)
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
        raise input_error("encoder_outputs", "is not a tensor of encoder tokens", given=type(encoder_outputs).__name__,
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
        raise input_error("encoder_outputs", "must hold floating-point features", given=hidden.dtype, expected=want,
                     fix=fix)
    if hidden.dim() != 3 or hidden.shape[-1] != width or hidden.shape[1] == 0:
        raise input_error("encoder_outputs", "does not have the encoder's shape", given=tuple(hidden.shape),
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
        raise input_error(name, "must be a tensor", given=type(ids).__name__, expected=want,
                     fix=f"convert with torch.tensor({name}, dtype=torch.long)")
    if ids.dtype not in _INT_DTYPES:
        raise input_error(name, "must hold integer token ids", given=ids.dtype, expected=want,
                     fix="pass the tokenizer's ids as a LongTensor (.long() if they are whole numbers)")
    if ids.dim() != 2 or ids.shape[0] != B or (ignore is not None and ids.shape[1] == 0):
        fix = (f"batch one sequence with {name}.unsqueeze(0)" if ids.dim() == 1 else
               "give every row at least one label (the end-of-sequence token)" if ids.dim() == 2 and ids.shape[0] == B
               else f"pass one row per image ({B} rows), T tokens each")
        raise input_error(name, "has the wrong shape", given=tuple(ids.shape), expected=want, fix=fix)
    if isinstance(max_len, int) and ids.shape[1] > max_len:
        raise input_error(name, f"holds {ids.shape[1]} tokens per row, more than the decoder reads", given=tuple(ids.shape),
                     expected=f"at most {max_len} tokens (the decoder's positions)",
                     fix=f"truncate to {max_len} tokens (the tokenizer's max_length)")
    _same_device(name, ids, home)
    if ignore is not None or ids.dtype not in (torch.int64, torch.int32):
        ids = ids.long()  # what cross_entropy and nn.Embedding read
    if _skip_values(ids):
        return ids, (0 if ids.numel() == 0 else None)
    if ignore is None:
        lo, hi = torch.aminmax(ids)
        (lo, hi), skipped = torch.stack((lo.long(), hi.long())).tolist(), 0
    else:
        ignored = ids == ignore
        lo, hi = torch.aminmax(ids.masked_fill(ignored, 0))
        lo, hi, skipped = torch.stack((lo.long(), hi.long(), ignored.sum())).tolist()
    if lo < 0 or hi >= vocab:
        raise input_error(name, f"holds token ids from {lo} to {hi}, outside the vocabulary (vocab_size={vocab})",
                     expected=want, fix="use the tokenizer that matches this decoder"
                     + ("; mark the positions to ignore with -100" if ignore is not None else ""))
    return ids, ids.numel() - skipped


def check_mask(mask: Any, shape: tuple[int, ...], home: Tensor | None) -> None:
    """A decoder attention mask: a tensor shaped like the decoder inputs, on the model's device."""
    if not isinstance(mask, Tensor) or tuple(mask.shape) != shape:
        raise input_error("decoder_attention_mask", "is not shaped like decoder_input_ids",
                     given=tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__,
                     expected=f"a 0/1 tensor of shape {shape}", fix="1 marks a real token, 0 padding: one per token")
    _same_device("decoder_attention_mask", mask, home)
