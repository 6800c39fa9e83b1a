"""Tokenizers kept only as a sentencepiece model (``sentencepiece.bpe.model``: XLM-R, TrOCR-small, Donut;
``spiece.model``: T5), turned into a ``tokenizers.Tokenizer`` as transformers 5 does, with no extra dependency.

A ``.model`` file is a protobuf ``ModelProto``; this module reads the few fields the conversion needs (the pieces
with their scores and types, the model type, the special ids, the normalizer's precompiled character map) with a
bounded wire-format reader, then builds what transformers 5's ``XLMRobertaTokenizer`` / ``T5Tokenizer`` build from
the same file: a Unigram model over their re-ordered vocabulary, the ``Precompiled`` normalizer, whitespace split +
``Metaspace``, their special-token templates and added tokens. Token ids equal transformers' (tested).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

__all__ = ["SpmModel", "read_spm", "spm_tokenizer", "SPM_CLASSES"]

# tokenizer_class (tokenizer_config.json, "Fast" removed) -> the layout of its vocabulary
SPM_CLASSES = ("XLMRobertaTokenizer", "T5Tokenizer")
UNIGRAM, CONTROL, USER_DEFINED = 1, 3, 4


@dataclass
class SpmModel:
    """What the conversion reads of a sentencepiece ``ModelProto`` (defaults as in sentencepiece_model.proto)."""

    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type)
    model_type: int = UNIGRAM
    unk_id: int = 0
    byte_fallback: bool = False
    precompiled_charsmap: bytes = b""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError(f"a truncated or oversized varint at byte {pos}")
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not b & 0x80:
            return value, pos


def _fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message: ints for varints, bytes for length-delimited."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"wire type {wire} at byte {pos} (not a sentencepiece model)")
        if pos > len(buf):
            raise ValueError("the file ends inside a field (truncated)")
        yield number, wire, value


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def read_spm(data: bytes) -> SpmModel:
    """The fields of a sentencepiece ``ModelProto`` the conversion needs; ``ValueError`` for anything else."""
    model = SpmModel()
    for number, wire, value in _fields(data):
        if number == 1 and wire == 2:  # pieces
            piece, score, kind = "", 0.0, 1
            for n, w, v in _fields(value):
                if n == 1 and w == 2:
                    piece = v.decode("utf-8")
                elif n == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif n == 3 and w == 0:
                    kind = v
            model.pieces.append((piece, score, kind))
        elif number == 2 and wire == 2:  # trainer_spec
            for n, w, v in _fields(value):
                if w == 0 and n in (3, 35, 40):
                    setattr(model, {3: "model_type", 35: "byte_fallback", 40: "unk_id"}[n],
                            bool(v) if n == 35 else _signed(v))
        elif number == 3 and wire == 2:  # normalizer_spec
            model.precompiled_charsmap = next((v for n, w, v in _fields(value) if n == 2 and w == 2), b"")
    if not model.pieces:
        raise ValueError("no pieces (not a sentencepiece model)")
    if model.model_type != UNIGRAM:
        raise ValueError(f"model_type {model.model_type} (splice converts unigram models, as XLM-R's and T5's are)")
    return model


def _vocabulary(model: SpmModel, cls: str, options: dict) -> tuple[list[tuple[str, float]], int, list[str], str]:
    """(vocabulary, unk id, special tokens, template) of transformers 5's tokenizer class ``cls``."""
    pieces = [(p, s) for p, s, _ in model.pieces]
    if cls == "XLMRobertaTokenizer":  # fairseq's order: <s> <pad> </s> <unk>, the pieces after spm's 3, <mask>
        vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces[3:], ("<mask>", 0.0)]
        return vocab, 3, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "xlmr"
    extra = options.get("extra_ids", 100)  # T5: the pieces, then <extra_id_N-1> ... <extra_id_0>
    if type(extra) is not int or not 0 <= extra <= 10_000:
        raise ValueError(f"extra_ids={extra!r} in tokenizer_config.json (expected an integer 0..10000)")
    extras = [f"<extra_id_{i}>" for i in range(extra - 1, -1, -1)]
    specials = [p for p, _, kind in model.pieces if kind in (CONTROL, 2)] + extras  # control pieces and <unk>
    return pieces + [(e, 0.0) for e in extras], 2, specials, "t5"


def spm_tokenizer(data: bytes, cls: str, options: dict):
    """A ``tokenizers.Tokenizer`` for a sentencepiece model, as transformers 5's ``cls`` builds it. ``options``:
    the folder's tokenizer_config.json (``extra_ids``; ``added_tokens_decoder`` for the added tokens' flags)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    model = read_spm(data)
    vocab, unk_id, specials, template = _vocabulary(model, cls, options)
    tok = Tokenizer(Unigram(vocab, unk_id=unk_id, byte_fallback=False))
    if model.precompiled_charsmap:
        tok.normalizer = normalizers.Precompiled(model.precompiled_charsmap)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    flags = {v.get("content"): v for v in (options.get("added_tokens_decoder") or {}).values() if isinstance(v, dict)}
    keys = ("single_word", "lstrip", "rstrip")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False,
                                       **{k: bool(flags.get(t, {}).get(k, False)) for k in keys}) for t in specials])
    ids = {t: i for i, (t, _) in enumerate(vocab)}
    if template == "xlmr":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])])
    elif "</s>" in ids:
        tok.post_processor = processors.TemplateProcessing(
            single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", ids["</s>"])])
    return tok
