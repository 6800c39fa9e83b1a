"""The single-stream composition kind: visual embeddings and text tokens through one BERT encoder together
(transformers' VisualBert*). The visual embeddings (region features from any detector, or a vision encoder's
tokens) are projected to the hidden width and get their own token-type and position embeddings; a task head sits
on top.

A spec::

    kind: single-stream
    text: {name: bert, config: {...}}        # a BERT-family text encoder (bert, roberta)
    vision: {name: vit, config: {...}}       # optional: its tokens become the visual embeddings
    projection: auto                         # vision width -> visual_embedding_dim: auto | none | linear | mlp
    visual_embedding_dim: 512                # width of the visual embeddings (default: the vision width, else 512)
    bypass_transformer: false                # the text alone through the encoder, then one extra layer with both
    special_visual_initialize: true          # visual type/position tables start as copies of the text's
    head: {kind: vqa, num_labels: 3129, labels: [...]}   # or pretraining | visual-reasoning | multiple-choice |
                                                         #    region-to-phrase | none

Parameter names: ``text.*`` (the text encoder: embeddings, layers, pooler), ``visual.*`` (the visual projection
and embeddings), ``additional_layer.*`` (bypass_transformer), ``vision.*`` and ``vision_projection.*`` (with
``vision:``), and the head's ``lm_head.*`` / ``seq_relationship.*`` (pretraining, region-to-phrase),
``classifier.*`` (vqa, visual-reasoning, multiple-choice), ``region_attention.*`` (region-to-phrase). Its
transformers layout is ``visual_bert`` (``splice.core.visual_bert_format``).

``bypass_transformer``: transformers' forward fails on that path (it indexes one query row of a mask built for
one query: an IndexError, then passes a tuple to the pooler). This kind computes what VisualBERT's authors meant:
the text alone through the encoder's layers under its own mask, then text and visual tokens together through
``additional_layer`` under the combined mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

import splice
from splice.core.composer import build_part, count_params, plugin_call, resolve_part
from splice.core.configs import checked_config
from splice.core.errors import Problem, unknown_problem
from splice.core.inputs import check_pixels, check_token_ids, home_tensor, input_error
from splice.core.kernels import Linear
from splice.core.kinds import Kind, Plan, TransformersFormat
from splice.core.meta import params_on_meta
from splice.core.models import CaptionEncoding, ComposedModel
from splice.core.plugins import get_registry
from splice.core.roles import check_output_width
from splice.core.spec import ComponentSpec, CompositionSpec, ProjectionSpec
from splice.core.visual_bert_format import (ARCHITECTURES, MODEL_TYPE, export_visual_bert, spec_from_visual_bert_config,
                                            split_visual_bert_state)
from splice.plugins.bert import BertLayer, BertLMHead, BertTextEncoder

KIND = "single-stream"
HEADS = ("pretraining", "vqa", "visual-reasoning", "multiple-choice", "region-to-phrase", "none")
HeadKind = Literal["pretraining", "vqa", "visual-reasoning", "multiple-choice", "region-to-phrase", "none"]
CLASSIFIERS = ("vqa", "visual-reasoning")  # the heads with num_labels and an answer vocabulary
DEFAULT_VISUAL_DIM = 512  # transformers' VisualBertConfig default


class HeadSpec(BaseModel):
    """The task head: its kind and, for vqa / visual-reasoning, the number of answers and their names."""

    model_config = ConfigDict(extra="forbid")

    kind: HeadKind = Field(description="pretraining (masked LM + sentence-image) | vqa | visual-reasoning (NLVR2) | "
                           "multiple-choice | region-to-phrase | none")
    num_labels: int | None = Field(None, strict=True, ge=1, le=1_000_000, description="vqa / visual-reasoning: "
                                   "answers to score (default: the labels' count; visual-reasoning: 2)")
    labels: list[str] | None = Field(None, max_length=1_000_000, description="vqa / visual-reasoning: the answer "
                                     "vocabulary, id order (transformers' id2label); set by training when absent")


class SingleStreamSpec(BaseModel):
    """Visual embeddings and text in one BERT encoder, with a task head (VisualBERT)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["single-stream"]
    text: ComponentSpec = Field(description="a BERT-family text encoder (`splice list --kind text_encoder`)")
    vision: ComponentSpec | None = Field(None, description="a registered vision encoder whose tokens become the "
                                         "visual embeddings (none: pass visual_embeds, e.g. a detector's regions)")
    projection: Union[str, ProjectionSpec] = Field(
        "auto", description="vision width -> visual_embedding_dim: auto (a Linear exactly when they differ) | none "
        "| linear | mlp | another registered projection, or {kind, config}")
    visual_embedding_dim: int | None = Field(None, strict=True, ge=1, le=65536, description="width of the visual "
                                             "embeddings (default: the vision encoder's width, else 512)")
    bypass_transformer: bool = Field(False, description="the text alone through the encoder, then text + visual "
                                     "through one additional layer (VisualBERT's bypass)")
    special_visual_initialize: bool = Field(True, description="the visual token-type and position tables start "
                                            "as copies of the text's")
    head: Union[HeadKind, HeadSpec] = Field("none", description="the task head, a name or {kind, num_labels, labels}")
    freeze: list[Literal["vision", "text", "visual", "head"]] = Field(
        default_factory=list, description="parts whose weights stay fixed")

    @property
    def head_spec(self) -> HeadSpec:
        return HeadSpec(kind=self.head) if isinstance(self.head, str) else self.head

    projection_kind = CompositionSpec.projection_kind  # read `projection` as the encoder-decoder spec does
    projection_config = CompositionSpec.projection_config


@dataclass
class SingleStreamOutput:
    loss: Tensor | None
    logits: Tensor | None  # the head's scores: (B, num_labels), (B, C) choices, (B, L, Nv) regions, (B, L, V) MLM
    last_hidden_state: Tensor  # (B, T + Nv, D)
    pooler_output: Tensor  # (B, D)
    prediction_logits: Tensor | None = None  # pretraining: (B, T + Nv, V)
    seq_relationship_logits: Tensor | None = None  # pretraining: (B, 2)


class VisualEmbeddings(nn.Module):
    """The visual side of VisualBERT's embeddings: ``projection`` (Dv -> D), ``token_type`` and ``position`` tables;
    their sum goes through the text embeddings' LayerNorm (per token, so normalising it apart is the same)."""

    def __init__(self, visual_dim: int, hidden_size: int, type_vocab_size: int, max_positions: int):
        super().__init__()
        self.projection = Linear(visual_dim, hidden_size)
        self.token_type = nn.Embedding(type_vocab_size, hidden_size)
        self.position = nn.Embedding(max_positions, hidden_size)

    def forward(self, visual_embeds: Tensor, token_type_ids: Tensor, alignment: Tensor | None,
                text_positions: nn.Embedding) -> Tensor:
        x = self.projection(visual_embeds) + self.token_type(token_type_ids)  # (B, Nv, D)
        zeros = torch.zeros(visual_embeds.shape[:-1], dtype=torch.long, device=visual_embeds.device)  # (B, Nv)
        position = self.position(zeros)  # (B, Nv, D)
        if alignment is not None:
            # each region's position: the mean of the text positions it is aligned to (-1: no word), plus position 0
            real = (alignment != -1).to(x.dtype)  # (B, Nv', A)
            words = text_positions(alignment.clamp(min=0)) * real[..., None]  # (B, Nv', A, D)
            words = words.sum(2) / real.sum(2).clamp(min=1.0)[..., None]  # (B, Nv', D)
            position = position + words[:, : x.shape[1]]
        return x + position  # (B, Nv, D)


class RegionToPhraseAttention(nn.Module):
    """One head of attention scores from the selected tokens to the visual tokens (transformers'
    ``VisualBertRegionToPhraseAttention``: width D / heads, ``value`` kept but unused)."""

    def __init__(self, hidden_size: int, heads: int):
        super().__init__()
        self.head_size = hidden_size // heads
        self.query = Linear(hidden_size, self.head_size)
        self.key = Linear(hidden_size, self.head_size)
        self.value = Linear(hidden_size, self.head_size)

    def forward(self, query: Tensor, key: Tensor, key_mask: Tensor) -> Tensor:
        q, k = self.query(query), self.key(key)  # (B, L, hs), (B, Nv, hs)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_size)  # (B, L, Nv)
        blocked = (1.0 - key_mask.to(scores.dtype))[:, None, :] * torch.finfo(scores.dtype).min  # (B, 1, Nv)
        return scores + blocked  # (B, L, Nv)


def _mask(name: str, mask: Any, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """A 0/1 mask shaped ``shape`` as a bool tensor on ``device`` (ones when None)."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not isinstance(mask, Tensor) or tuple(mask.shape) != shape:
        raise input_error(name, "has the wrong shape", given=tuple(mask.shape) if isinstance(mask, Tensor) else
                          type(mask).__name__, expected=f"a 0/1 tensor of shape {shape}",
                          fix="1 marks a real token, 0 padding: one per token")
    return mask.to(device).bool()


def _types(name: str, ids: Any, shape: tuple[int, ...], types: int, device: torch.device, default: int) -> Tensor:
    """Token-type ids shaped ``shape`` within ``types`` (``default`` everywhere when None)."""
    if ids is None:
        return torch.full(shape, default, dtype=torch.long, device=device)
    want = f"an integer tensor of shape {shape} with types in [0, {types - 1}]"
    if not isinstance(ids, Tensor) or ids.is_floating_point() or tuple(ids.shape) != shape:
        raise input_error(name, "is not an integer tensor of the right shape", given=tuple(ids.shape) if
                          isinstance(ids, Tensor) else type(ids).__name__, expected=want, fix="pass one type per token")
    if ids.numel() and not ids.is_meta and (int(ids.min()) < 0 or int(ids.max()) >= types):
        raise input_error(name, f"holds types from {int(ids.min())} to {int(ids.max())}", expected=want,
                          fix=f"use types below type_vocab_size={types} (VisualBERT: 0 text, 1 visual)")
    return ids.to(device).long()


def _per_choice(name: str, value: Any, C: int, dims: int) -> Any:
    """A multiple-choice input as (B * C, ...): flattened when it has the choice axis (``dims`` dimensions),
    repeated for each choice when it is shared (one fewer)."""
    if value is None:
        return None
    if not isinstance(value, Tensor) or value.dim() not in (dims, dims - 1):
        raise input_error(name, "has the wrong number of dimensions for multiple choice", given=tuple(
            value.shape) if isinstance(value, Tensor) else type(value).__name__, expected=f"{dims} dimensions "
            f"(B, C, ...), or {dims - 1} (B, ...) shared by every choice", fix="stack one row per choice")
    return value.flatten(0, 1) if value.dim() == dims else value.repeat_interleave(C, dim=0)


class SingleStreamModel(ComposedModel):
    """A BERT-family ``text`` encoder reading text and visual tokens together, ``visual`` embeddings for the
    visual tokens, an optional ``vision`` encoder (and ``vision_projection``) that makes them from pixels, an
    ``additional_layer`` (bypass_transformer) and the head the spec names."""

    def __init__(self, text: BertTextEncoder, vision: nn.Module | None, vision_projection: nn.Module | None, *,
                 spec: dict):
        super().__init__(spec)
        c, head = spec["text"]["config"], spec["head"]
        D = text.hidden_size
        self.text, self.vision, self.vision_projection = text, vision, vision_projection
        self.head_kind, self.bypass = head["kind"], spec["bypass_transformer"]
        self.visual_embedding_dim, self.dropout_p = spec["visual_embedding_dim"], c["hidden_dropout_prob"]
        self.heads = c["num_attention_heads"]
        self.visual = VisualEmbeddings(self.visual_embedding_dim, D, c["type_vocab_size"], c["max_position_embeddings"])
        self.additional_layer = BertLayer(0, D, self.heads, c["intermediate_size"], c["hidden_act"],
                                          c["layer_norm_eps"], c["attention_probs_dropout_prob"],
                                          c["hidden_dropout_prob"]) if self.bypass else None
        mlm = self.head_kind in ("pretraining", "region-to-phrase")  # transformers' region head keeps cls.*
        self.lm_head = BertLMHead(D, text.vocab_size, c["hidden_act"], c["layer_norm_eps"],
                                  tied=c.get("tie_word_embeddings", True)) if mlm else None
        self.seq_relationship = Linear(D, 2) if mlm else None
        out = 1 if self.head_kind == "multiple-choice" else head.get("num_labels")
        self.classifier = Linear(D, out) if self.head_kind in (*CLASSIFIERS, "multiple-choice") else None
        self.region_attention = RegionToPhraseAttention(D, self.heads) if self.head_kind == "region-to-phrase" else None
        if not self.visual.projection.weight.is_meta:
            self._init_new(c["initializer_range"], spec["special_visual_initialize"])

    @torch.no_grad()
    def _init_new(self, std: float, special_visual_initialize: bool) -> None:
        """transformers' init for the parts this kind adds; the visual tables copied from the text's when asked."""
        from splice.plugins._shared import normal_init

        for module in (self.visual, self.additional_layer, self.lm_head, self.seq_relationship, self.classifier,
                       self.region_attention):
            if module is not None:
                normal_init(module, std)
        if self.lm_head is not None:
            nn.init.zeros_(self.lm_head.bias)
        if special_visual_initialize:
            self.visual.token_type.weight.copy_(self.text.embeddings.token_type.weight)
            self.visual.position.weight.copy_(self.text.embeddings.position.weight)

    @property
    def answer_labels(self) -> list[str] | None:
        """The answer vocabulary of a vqa / visual-reasoning head (id order), saved in the spec; None: not set."""
        return self.spec["head"].get("labels")

    def set_answer_labels(self, labels: list[str]) -> None:
        n = self.spec["head"].get("num_labels")
        if self.head_kind not in CLASSIFIERS or len(labels) > n or len(set(labels)) != len(labels):
            raise input_error("head.labels", "do not fit this head", given=labels[:8], expected=f"at most {n} distinct "
                              f"answers for a {'/'.join(CLASSIFIERS)} head", fix="raise head.num_labels, or merge "
                              "answers")
        self.spec["head"]["labels"] = list(labels)

    def vision_tower(self) -> nn.Module | None:
        return self.vision

    def freeze_groups(self) -> dict[str, list[nn.Parameter]]:
        params = lambda *ms: [p for m in ms if m is not None for p in m.parameters()]  # noqa: E731
        return {"vision": params(self.vision, self.vision_projection), "text": params(self.text),
                "visual": params(self.visual, self.additional_layer),
                "head": params(self.lm_head, self.seq_relationship, self.classifier, self.region_attention)}

    # -- the stream ---------------------------------------------------------------------------------------

    def visual_from_pixels(self, pixel_values: Tensor) -> Tensor:
        """(B, N, visual_embedding_dim): the vision encoder's tokens, projected when the widths differ."""
        if self.vision is None:
            raise input_error("pixel_values", "this model has no vision encoder", expected="visual_embeds (B, Nv, "
                              f"{self.visual_embedding_dim})", fix="pass visual_embeds (region features), or compose "
                              "with a `vision:` encoder")
        tokens = self.vision(check_pixels(pixel_values, self.vision)).last_hidden_state  # (B, N, D_vision)
        return tokens if self.vision_projection is None else self.vision_projection(tokens)  # (B, N, Dv)

    def _visual(self, visual_embeds: Tensor | None, pixel_values: Tensor | None) -> Tensor | None:
        if pixel_values is not None:
            if visual_embeds is not None:
                raise input_error("visual_embeds", "given with pixel_values", expected="one of the two",
                                  fix="pass visual_embeds (region features) or pixel_values (through the vision "
                                  "encoder), not both")
            return self.visual_from_pixels(pixel_values)
        if visual_embeds is None:
            return None
        Dv = self.visual_embedding_dim
        if not isinstance(visual_embeds, Tensor) or visual_embeds.dim() != 3 or visual_embeds.shape[-1] != Dv \
                or not visual_embeds.is_floating_point():
            raise input_error("visual_embeds", "is not a batch of visual embeddings", given=tuple(visual_embeds.shape)
                              if isinstance(visual_embeds, Tensor) else type(visual_embeds).__name__,
                              expected=f"a float tensor (B, Nv, {Dv}) (visual_embedding_dim)",
                              fix="pass one row of region features per text")
        home = home_tensor(self.visual)
        return visual_embeds.to(home.dtype) if home is not None else visual_embeds

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None, visual: Tensor | None,
              visual_token_type_ids: Tensor | None, image_text_alignment: Tensor | None) -> Tensor:
        """(B, T + Nv, D): the text's embeddings, then the visual tokens' (through the same LayerNorm)."""
        text, device = self.text, input_ids.device
        B, T = input_ids.shape
        types = _types("token_type_ids", token_type_ids, (B, T), text.type_vocab_size, device, 0)
        x = text.embeddings(input_ids, text.positions(input_ids, 0), types)  # (B, T, D)
        if visual is None:
            return x
        vtypes = _types("visual_token_type_ids", visual_token_type_ids, tuple(visual.shape[:2]), text.type_vocab_size,
                        device, 1)
        if image_text_alignment is not None and (image_text_alignment.dim() != 3 or image_text_alignment.shape[0] != B
                                                 or image_text_alignment.shape[1] < visual.shape[1]):
            raise input_error("image_text_alignment", "is not one row of word positions per visual token",
                              given=tuple(image_text_alignment.shape), expected=f"(B={B}, Nv>={visual.shape[1]}, A) "
                              "text positions, -1 for none", fix="pad each region's positions with -1")
        v = self.visual(visual, vtypes, image_text_alignment, text.embeddings.position)  # (B, Nv, D)
        from splice.core.kernels import dropout

        v = dropout(text.embeddings.norm(v), text.embeddings.dropout_p, self.training)  # (B, Nv, D)
        return torch.cat([x, v], dim=1)  # (B, T + Nv, D)

    def encode(self, x: Tensor, text_mask: Tensor, visual_mask: Tensor | None) -> Tensor:
        """(B, T + Nv, D): every layer over text and visual tokens together; with ``bypass_transformer`` the text
        alone through the layers under its own mask, then both through ``additional_layer``."""
        both = text_mask if visual_mask is None else torch.cat([text_mask, visual_mask], dim=1)  # (B, L)
        if self.bypass and visual_mask is not None:
            T = text_mask.shape[1]
            h = self._layers(x[:, :T], text_mask)  # (B, T, D)
            return self.additional_layer(torch.cat([h, x[:, T:]], dim=1), _sdpa(both), False, None, None, None)
        return self._layers(x, both)

    def _layers(self, x: Tensor, mask: Tensor) -> Tensor:
        sdpa = _sdpa(mask)  # (B, 1, 1, L)
        for layer in self.text.layers:
            x = layer(x, sdpa, False, None, None, None)  # (B, L, D)
        return x


    # -- forward ------------------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, visual_embeds: Tensor | None = None,
                pixel_values: Tensor | None = None, visual_attention_mask: Tensor | None = None,
                visual_token_type_ids: Tensor | None = None, image_text_alignment: Tensor | None = None,
                labels: Tensor | None = None, sentence_image_labels: Tensor | None = None,
                region_to_phrase_position: Tensor | None = None) -> SingleStreamOutput:
        """The head's outputs (transformers' ``VisualBert*`` of the same head), ``loss`` when ``labels`` are given
        (pretraining: ``labels`` (B, T + Nv) for the masked LM, ``sentence_image_labels`` (B,) added when given;
        vqa: soft scores (B, num_labels), or answer ids (B,); visual-reasoning, multiple-choice: ids (B,);
        region-to-phrase: (B, T + Nv, Nv) with ``region_to_phrase_position`` (B, T + Nv)). Visual tokens come
        from ``visual_embeds`` (B, Nv, Dv) or ``pixel_values`` through the vision encoder; none: text alone.

        Unlike transformers, vqa's ``logits`` are the raw scores with or without labels (transformers returns
        their log-softmax when given labels)."""
        if input_ids is None:
            raise input_error("input_ids", "is missing", expected="(B, T) token ids ([CLS] text [SEP])",
                              fix="tokenize the text with the model's tokenizer")
        if self.head_kind == "multiple-choice":
            return self._multiple_choice(input_ids, attention_mask, token_type_ids, visual_embeds, pixel_values,
                                         visual_attention_mask, visual_token_type_ids, image_text_alignment, labels)
        visual = self._visual(visual_embeds, pixel_values)  # (B, Nv, Dv) or None
        hidden, pooled, text_mask, visual_mask = self._stream(input_ids, attention_mask, token_type_ids, visual,
                                                              visual_attention_mask, visual_token_type_ids,
                                                              image_text_alignment)
        kind = self.head_kind
        if kind == "pretraining":
            return self._pretraining(hidden, pooled, labels, sentence_image_labels)
        if kind == "vqa":
            return self._vqa(hidden, pooled, text_mask, labels)
        if kind == "visual-reasoning":
            logits = self.classifier(self._drop(pooled))  # (B, num_labels)
            loss = None if labels is None else F.cross_entropy(logits.float(), self._ids("labels", labels, logits))
            return SingleStreamOutput(loss, logits, hidden, pooled)
        if kind == "region-to-phrase":
            return self._region_to_phrase(hidden, pooled, text_mask, visual_mask, region_to_phrase_position, labels)
        if labels is not None:
            raise input_error("labels", "this model has no head to compute a loss with (head: none)", expected="no "
                              "labels", fix="compose with a head (vqa, pretraining, ...) to train one")
        return SingleStreamOutput(None, None, hidden, pooled)

    def _stream(self, input_ids, attention_mask, token_type_ids, visual, visual_attention_mask,
                visual_token_type_ids, image_text_alignment) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(hidden (B, L, D), pooled (B, D), text mask (B, T), visual mask (B, Nv) or None)."""
        B = input_ids.shape[0] if isinstance(input_ids, Tensor) and input_ids.dim() else 0
        input_ids, _ = check_token_ids("input_ids", input_ids, B, self.text.vocab_size, home_tensor(self.visual),
                                       max_len=self.text.max_positions)
        if input_ids.shape[1] == 0:
            raise input_error("input_ids", "holds no tokens", given=tuple(input_ids.shape), expected="(B, T), T >= 1",
                              fix="give every text at least [CLS] and [SEP]")
        device = input_ids.device
        text_mask = _mask("attention_mask", attention_mask, tuple(input_ids.shape), device)  # (B, T)
        visual_mask = None
        if visual is not None:
            if visual.shape[0] != B:
                raise input_error("visual_embeds", f"holds {visual.shape[0]} rows for {B} texts",
                                  given=tuple(visual.shape), expected=f"(B={B}, Nv, Dv)", fix="one row per text")
            visual_mask = _mask("visual_attention_mask", visual_attention_mask, tuple(visual.shape[:2]), device)
        x = self.embed(input_ids, token_type_ids, visual, visual_token_type_ids, image_text_alignment)
        hidden = self.encode(x, text_mask, visual_mask)  # (B, L, D)
        return hidden, self.text.pooler(hidden), text_mask, visual_mask

    def _drop(self, x: Tensor) -> Tensor:
        from splice.core.kernels import dropout

        return dropout(x, self.dropout_p, self.training)

    @staticmethod
    def _ids(name: str, labels: Tensor, logits: Tensor) -> Tensor:
        """Class ids (B,) for a cross-entropy over ``logits`` (B, K)."""
        B, K = logits.shape
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.numel() != B:
            raise input_error(name, "are not one class id per row", given=tuple(labels.shape) if isinstance(
                labels, Tensor) else type(labels).__name__, expected=f"an integer tensor (B={B},) in [0, {K - 1}]",
                fix="pass the index of the right answer for each row")
        labels = labels.reshape(-1).to(logits.device).long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= K):
            raise input_error(name, f"hold ids from {int(labels.min())} to {int(labels.max())}",
                              expected=f"ids in [0, {K - 1}]", fix="use ids below the head's number of classes")
        return labels

    def _pretraining(self, hidden: Tensor, pooled: Tensor, labels: Tensor | None,
                     sentence_image_labels: Tensor | None) -> SingleStreamOutput:
        scores = self.lm_head(hidden, self.text.embeddings.word.weight)  # (B, L, V)
        relation = self.seq_relationship(pooled)  # (B, 2)
        loss = None
        if labels is not None:
            B, L, V = scores.shape
            labels, _ = check_token_ids("labels", labels, B, V, hidden, ignore=-100)
            if labels.shape[1] != L:
                raise input_error("labels", "do not cover the whole sequence", given=tuple(labels.shape),
                                  expected=f"(B, {L}): one label per text and visual token (-100: not predicted)",
                                  fix="pad the labels with -100 over the visual tokens")
            loss = F.cross_entropy(scores.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
            if sentence_image_labels is not None:
                loss = loss + F.cross_entropy(relation.float(), self._ids("sentence_image_labels",
                                                                          sentence_image_labels, relation))
        return SingleStreamOutput(loss, scores, hidden, pooled, prediction_logits=scores,
                                  seq_relationship_logits=relation)

    def _vqa(self, hidden: Tensor, pooled: Tensor, text_mask: Tensor, labels: Tensor | None) -> SingleStreamOutput:
        """The last text token before [SEP] (the text mask's length - 2, as VisualBERT's code) through the
        classifier; the loss: KL divergence to the soft answer scores (batch mean)."""
        index = text_mask.long().sum(dim=1) - 2  # (B,)
        if index.numel() and int(index.min()) < 0:
            raise input_error("attention_mask", "marks fewer than 2 text tokens in a row", expected="[CLS] question "
                              "[SEP]: at least 2 real tokens", fix="tokenize the question with its special tokens")
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # (B, D)
        logits = self.classifier(self._drop(picked))  # (B, K)
        loss = None
        if labels is not None:
            if isinstance(labels, Tensor) and not labels.is_floating_point():
                labels = F.one_hot(self._ids("labels", labels, logits), logits.shape[1]).float()  # (B, K)
            elif not isinstance(labels, Tensor) or tuple(labels.shape) != tuple(logits.shape):
                raise input_error("labels", "are not answer scores", given=tuple(labels.shape) if isinstance(
                    labels, Tensor) else type(labels).__name__, expected=f"float scores {tuple(logits.shape)} or "
                    f"answer ids ({logits.shape[0]},)", fix="pass one score per answer, or the right answer's id")
            loss = F.kl_div(F.log_softmax(logits.float(), dim=-1), labels.float(), reduction="batchmean")
        return SingleStreamOutput(loss, logits, hidden, pooled)

    def _region_to_phrase(self, hidden: Tensor, pooled: Tensor, text_mask: Tensor, visual_mask: Tensor | None,
                          positions: Tensor | None, labels: Tensor | None) -> SingleStreamOutput:
        """Scores (B, L, Nv) of each position's token (``region_to_phrase_position``: which token, -1: none)
        against the visual tokens; the loss: KL divergence to ``labels`` (batch mean)."""
        B, L, _ = hidden.shape
        if visual_mask is None or positions is None:
            raise input_error("region_to_phrase_position" if visual_mask is not None else "visual_embeds",
                              "is missing: region-to-phrase scores text tokens against visual tokens",
                              expected=f"region_to_phrase_position (B, {L}) and visual_embeds or pixel_values",
                              fix="pass the visual tokens and, for each position, the token to score (-1: none)")
        if not isinstance(positions, Tensor) or tuple(positions.shape) != (B, L) or positions.is_floating_point():
            raise input_error("region_to_phrase_position", "has the wrong shape", given=tuple(positions.shape) if
                              isinstance(positions, Tensor) else type(positions).__name__,
                              expected=f"integer positions (B={B}, {L}), -1 for none", fix="one per token")
        positions = positions.to(hidden.device).long().clamp(min=0)  # -1 reads token 0, as transformers
        selected = hidden.gather(1, positions[..., None].expand(B, L, hidden.shape[-1]))  # (B, L, D)
        logits = self.region_attention(selected, hidden[:, text_mask.shape[1]:], visual_mask)  # (B, L, Nv)
        loss = None
        if labels is not None:
            loss = F.kl_div(F.log_softmax(logits.float(), dim=-1), labels.to(logits.device).float(),
                            reduction="batchmean")
        return SingleStreamOutput(loss, logits, hidden, pooled)

    def _multiple_choice(self, input_ids, attention_mask, token_type_ids, visual_embeds, pixel_values,
                         visual_attention_mask, visual_token_type_ids, image_text_alignment, labels):
        """Choices (B, C, T) each read with the visual tokens, one score each (B, C); cross-entropy over them."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 3:
            raise input_error("input_ids", "are not choices", given=tuple(input_ids.shape) if isinstance(
                input_ids, Tensor) else type(input_ids).__name__, expected="(B, C, T): C choices per example",
                fix="stack the choices' token ids along dimension 1")
        B, C = input_ids.shape[:2]
        if pixel_values is not None and isinstance(pixel_values, Tensor) and pixel_values.dim() == 5:
            visual_embeds = self._visual(None, pixel_values.flatten(0, 1)).unflatten(0, (B, C))  # (B, C, N, Dv)
            pixel_values = None
        elif pixel_values is not None:
            visual_embeds = self._visual(visual_embeds, pixel_values)  # (B, N, Dv), shared by the choices
        flat = {name: _per_choice(name, value, C, dims) for name, value, dims in (
            ("input_ids", input_ids, 3), ("attention_mask", attention_mask, 3), ("token_type_ids", token_type_ids, 3),
            ("visual_embeds", visual_embeds, 4), ("visual_attention_mask", visual_attention_mask, 3),
            ("visual_token_type_ids", visual_token_type_ids, 3), ("image_text_alignment", image_text_alignment, 4))}
        visual = self._visual(flat.pop("visual_embeds"), None)
        hidden, pooled, _, _ = self._stream(flat["input_ids"], flat["attention_mask"], flat["token_type_ids"], visual,
                                            flat["visual_attention_mask"], flat["visual_token_type_ids"],
                                            flat["image_text_alignment"])
        logits = self.classifier(self._drop(pooled)).view(B, C)  # (B, C)
        loss = None if labels is None else F.cross_entropy(logits.float(), self._ids("labels", labels, logits))
        return SingleStreamOutput(loss, logits, hidden, pooled)

    # -- training (splice.train; see ComposedModel) ------------------------------------------------------
    # A batch from splice.vqa's reader: pixel_values (B, C, H, W), input_ids / attention_mask (B, T) (the question
    # with the tokenizer's special tokens), labels (B,) answer ids in ``answer_labels``, questions, answers.

    def training_data(self, path, *, seed: int, eval_path=None):
        """Question/answer rows (``splice.vqa.load_qa_data``) for a vqa or visual-reasoning head."""
        if self.head_kind not in ("vqa", "visual-reasoning"):
            return None
        from splice.vqa import load_qa_data

        return load_qa_data(path, self, seed=seed, eval_path=eval_path)

    def caption_encoding(self) -> CaptionEncoding:
        """Questions as the text encoder reads them: with the tokenizer's special tokens ([CLS] ... [SEP])."""
        return CaptionEncoding(special_tokens=True, eos=None, max_len=self.text.max_positions,
                               vocab_size=self.text.vocab_size, component="text")

    def training_weight(self, batch: dict) -> int:
        return int(batch["labels"].shape[0])  # the heads' losses are means over the batch's rows

    def training_loss_sum(self, call: nn.Module, batch: dict) -> Tensor:
        """The head's loss on the batch times its rows (vqa: cross-entropy to the answer, which is the KL
        divergence to its one-hot scores; visual-reasoning: cross-entropy)."""
        if self.head_kind not in CLASSIFIERS:
            raise input_error("head", f"splice train trains the {' and '.join(CLASSIFIERS)} heads from question / "
                              "answer rows", given=self.head_kind, expected=" or ".join(CLASSIFIERS),
                              fix="train this head with your own loop on model(..., labels=...).loss")
        out = call(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                   attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss.float() * batch["labels"].shape[0]

    @torch.no_grad()
    def evaluate_training(self, source, *, n: int | None, batch_size: int, precision: str) -> dict:
        """The held-out loss and answer accuracy (per category when the rows have one)."""
        from splice.train.optim import autocast_for

        device, was_training = home_tensor(self.visual).device, self.training
        self.eval()
        loss_sum, right, total, by = 0.0, 0, 0, {}
        try:
            with autocast_for(precision, device):
                for batch in source.eval_batches(n, batch_size):
                    if batch["pixel_values"] is None:
                        continue
                    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                    out = self(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"], labels=batch["labels"])
                    loss_sum += float(out.loss) * batch["labels"].shape[0]  # the loss and the answers, one pass
                    hits = (out.logits.argmax(dim=-1) == batch["labels"]).tolist()
                    right, total = right + sum(hits), total + len(hits)
                    for cat, hit in zip(batch.get("categories") or [None] * len(hits), hits):
                        if cat is not None:
                            by.setdefault(cat, []).append(hit)
        finally:
            self.train(was_training)
        out = {"loss": loss_sum / max(total, 1), "accuracy": right / max(total, 1), "n": total}
        if by:
            out["by_category"] = {c: {"accuracy": sum(v) / len(v), "n": len(v)} for c, v in sorted(by.items())}
        return out

def _sdpa(mask: Tensor) -> Tensor:
    """(B, L) 0/1 -> the SDPA mask (B, 1, 1, L), True = attend; a row with no real key attends everywhere (as
    transformers: no NaN)."""
    keys = mask.bool()
    return (keys | ~keys.any(dim=-1, keepdim=True))[:, None, None, :]


# -- validate / assemble ------------------------------------------------------------------------------------


@dataclass
class SingleStreamPlan(Plan):
    """The single-stream kind's plan: its parts, the projection of the vision tokens, and the resolved values."""

    projection: str | None = None
    projection_config: BaseModel | None = None
    visual_dim: int = DEFAULT_VISUAL_DIM
    head: dict | None = None

    def resolved_spec(self) -> dict:
        out = super().resolved_spec()
        out["visual_embedding_dim"], out["head"] = self.visual_dim, dict(self.head or {})
        return out


def _head(spec: SingleStreamSpec, problems: list[Problem]) -> dict:
    """The head as a full mapping: kind, num_labels and labels where they apply, each checked."""
    head = spec.head_spec
    n, labels = head.num_labels, head.labels
    if head.kind not in CLASSIFIERS:
        for name, value in (("num_labels", n), ("labels", labels)):
            if value is not None:
                problems.append(Problem(f"head.{name}", f"a {head.kind} head has no answers to name", given=value,
                                        expected=f"no {name} (only {' and '.join(CLASSIFIERS)} heads have them)",
                                        fix=f"remove head.{name}"))
        return {"kind": head.kind}
    if n is None:
        n = len(labels) if labels else 2 if head.kind == "visual-reasoning" else None
    if n is None:
        problems.append(Problem("head.num_labels", "a vqa head needs its number of answers", given=None,
                                expected="an integer >= 1 (VQA v2: 3129), or head.labels",
                                fix="add `num_labels: N` (or the answer list as `labels:`) to the head"))
    if labels is not None and n is not None and (len(labels) > n or len(set(labels)) != len(labels)):
        problems.append(Problem("head.labels", "not a list of distinct answers that fits num_labels",
                                given=labels, expected=f"at most {n} distinct answers", fix="remove the repeated "
                                "answers, or raise head.num_labels"))
    return {"kind": head.kind, "num_labels": n, "labels": labels}


def _decide_projection(plan: SingleStreamPlan, vision_width: int | None) -> None:
    """The visual embedding width, and the projection the vision tokens need to reach it."""
    spec, problems = plan.spec, plan.problems
    kind = spec.projection_kind
    plan.visual_dim = spec.visual_embedding_dim or vision_width or DEFAULT_VISUAL_DIM
    if vision_width is None:
        if kind != "auto":
            problems.append(Problem("projection", "there is no vision encoder whose tokens it would project",
                                    given=kind, expected="auto (or no projection key)", fix="remove `projection`, "
                                    "or add a `vision:` encoder"))
        return
    if kind == "auto":
        plan.projection = "linear" if vision_width != plan.visual_dim else None
    elif kind == "none":
        if vision_width != plan.visual_dim:
            problems.append(Problem("projection", f"`projection: none` but the vision width {vision_width} differs "
                                    f"from visual_embedding_dim {plan.visual_dim}", given="none",
                                    expected="equal widths, or a projection", fix="use `projection: auto` (or "
                                    f"linear / mlp), or set visual_embedding_dim: {vision_width}",
                                    error="incompatible"))
    else:
        registry = get_registry()
        if not registry.has("projection", kind):
            problems.append(unknown_problem("projection", kind, ["auto", "none", *registry.names("projection")],
                                            path="projection"))
            return
        plan.projection = kind
        plan.projection_config = checked_config(registry.get("projection", kind), spec.projection_config,
                                                "projection.config", problems)


def validate(spec: SingleStreamSpec, source: str | None = None) -> SingleStreamPlan:
    """Resolve the text (and vision) encoder, decide the visual width, projection and head, build everything on
    the meta device and count it; the problems are in the plan."""
    plan = SingleStreamPlan(spec=spec, source=source, kind=KIND)
    text = resolve_part("text", spec.text, plan.problems, kind="text_encoder")
    vision = resolve_part("vision", spec.vision, plan.problems, kind="encoder") if spec.vision is not None else None
    plan.head = _head(spec, plan.problems)
    if text is None or (spec.vision is not None and vision is None) or plan.problems:
        return plan
    plan.parts.extend(p for p in (text, vision) if p is not None)
    with params_on_meta():
        model = _build(plan, check=True)
    if model is None:
        return plan
    total = count_params(model)
    text.params = count_params(model.text)
    plan.params = {"total": total, "text": text.params}
    if vision is not None:
        vision.params = count_params(model.vision)
        plan.params.update({"vision": vision.params, "vision projection": count_params(model.vision_projection)})
    plan.params["new"] = total - sum(v for k, v in plan.params.items() if k != "total")  # visual, fusion, head
    plan.params["frozen"] = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    source_line = (f"vision {vision.family} tokens ({vision.width})"
                   + (f" -> {plan.projection} -> {plan.visual_dim}" if plan.projection else "")) if vision else \
        f"visual_embeds (B, Nv, {plan.visual_dim})"
    plan.lines += [f"visual tokens {source_line} -> visual projection -> {text.width}",
                   "stream        " + ("text through the encoder, then text + visual through one additional layer "
                                       "(bypass_transformer)" if spec.bypass_transformer else
                                       "text + visual tokens through every layer"),
                   f"head          {plan.head['kind']}" + (f", {plan.head['num_labels']} answers"
                                                           if plan.head.get("num_labels") else "")]
    plan.meta_model = model
    return plan


def assemble(plan: SingleStreamPlan) -> SingleStreamModel:
    model = _build(plan)
    plan.raise_for_problems()
    assert model is not None
    return model


def _build(plan: SingleStreamPlan, *, check: bool = False) -> SingleStreamModel | None:
    """The model from its parts; None (with the problems in the plan) when a part fails. ``check`` (validate):
    the text encoder must be BERT-family, and the widths decide the projection, which is dry-run."""
    problems, parts = plan.problems, {p.role: p for p in plan.parts}
    text = build_part(parts["text"], problems)
    vision = build_part(parts["vision"], problems) if "vision" in parts else None
    if text is None or ("vision" in parts and vision is None):
        return None
    if not isinstance(text, BertTextEncoder):
        problems.append(Problem("text.name", "not a BERT-family text encoder: the visual tokens join its embeddings "
                                "and layers", given=parts["text"].family, expected="bert or roberta (a "
                                "BertTextEncoder)", fix="use `text: {name: bert}`", error="incompatible"))
        return None
    if check:
        _decide_projection(plan, vision.hidden_size if vision is not None else None)
    proj = None
    if plan.projection is not None:
        entry = get_registry().get("projection", plan.projection)
        config = plan.projection_config or entry.make_config()
        widths = vision.hidden_size, plan.visual_dim
        proj = plugin_call(problems, entry, "projection", lambda: entry.builder(config)(*widths))
        if proj is not None and check:
            check_output_width(entry, proj, "projection", *widths, problems)
    if problems:
        return None
    model = SingleStreamModel(text, vision, proj, spec=plan.resolved_spec())
    model.freeze(plan.spec.freeze)
    return model


FORMAT = TransformersFormat("VisualBert", model_types=(MODEL_TYPE,), architectures=ARCHITECTURES,
                            spec_from_config=spec_from_visual_bert_config, split_state=split_visual_bert_state,
                            export=export_visual_bert)
DESCRIPTION = ("visual embeddings and text tokens through one BERT encoder, with a task head (VisualBERT: VQA, "
               "NLVR2, multiple choice, region-to-phrase, pre-training)")


@splice.hookimpl
def register_kinds(register):
    register(Kind(name=KIND, spec_model=SingleStreamSpec, validate=validate, assemble=assemble,
                  model_class=SingleStreamModel, formats=(FORMAT,), description=DESCRIPTION))
