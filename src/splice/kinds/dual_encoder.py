"""The dual-encoder composition kind: a vision encoder and a text encoder, each pooled and projected into one
space, trained contrastively (transformers' VisionTextDualEncoderModel; LiT with ``freeze: [vision]``).

A spec::

    kind: dual-encoder
    vision: {name: vit, config: {...}}      # any registered vision encoder
    text: {name: bert, config: {...}}       # any registered text encoder (bidirectional, pooled)
    projection_dim: 512
    logit_scale_init: 2.6592                # log(1 / 0.07), as transformers
    loss: clip                              # clip (symmetric cross-entropy) | siglip (pairwise sigmoid)
    freeze: [vision]                        # LiT: a locked image tower

The image's vector is what transformers' vision model returns as ``pooler_output`` (``VISION_POOLING``): ViT and
DeiT pass the class token through a dense + tanh pooler (``vision_pooler``, owned here since splice's vision
encoders return tokens only), BEiT mean-pools its patch tokens through its ``fc_norm`` (or takes the class token),
Swin averages its tokens; any other vision encoder gives its own ``pooler_output`` (CLIP: the class token through
``post_layernorm``) or has its tokens averaged. The text's vector is the text encoder's
``pooler_output`` (BERT's pooler). Its transformers layout is ``vision-text-dual-encoder``
(``splice.core.dual_encoder_format``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

import splice
from splice.core.composer import build_part, count_params, resolve_part
from splice.core.dual_encoder_format import (ARCHITECTURE, MODEL_TYPE, export_dual_encoder, spec_from_dual_config,
                                            split_dual_state)
from splice.core.inputs import check_pixels, check_token_ids, home_tensor, input_error
from splice.core.kinds import Kind, Plan, TransformersFormat
from splice.core.meta import params_on_meta
from splice.core.models import CaptionEncoding, ComposedModel
from splice.core.spec import ComponentSpec

KIND = "dual-encoder"

# vision family -> how its tokens become one vector, as transformers' model of that type pools (pooler_output)
VISION_POOLING = {"vit": "dense", "deit": "dense", "deit_distilled": "dense", "beit": "head", "swin": "mean",
                  "donut_swin": "mean"}
POOLING_LINES = {
    "dense": "the class token through a dense + tanh pooler (transformers' ViT/DeiT pooler)",
    "head": "the encoder's own pooled features (BEiT: mean of the patch tokens through fc_norm, or the class token)",
    "mean": "the mean of the encoder's tokens",
    "own": "the encoder's own pooled vector (pooler_output, as CLIP's) when it gives one, else the mean of its tokens",
}


class DualEncoderSpec(BaseModel):
    """A dual encoder: a vision and a text tower, projected into a shared space."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["dual-encoder"]
    vision: ComponentSpec = Field(description="a registered vision encoder (`splice list --kind encoder`)")
    text: ComponentSpec = Field(description="a registered text encoder (`splice list --kind text_encoder`)")
    projection_dim: int = Field(512, strict=True, ge=1, le=65536, description="width of the shared space")
    logit_scale_init: float = Field(2.6592, strict=True, ge=-20.0, le=20.0, description="the initial log temperature "
                                    "(log(1/0.07), as transformers; SigLIP uses log(10) = 2.3026)")
    logit_bias_init: float = Field(-10.0, strict=True, ge=-100.0, le=100.0, description="loss: siglip only: the initial bias "
                                   "added to every logit (SigLIP: -10)")
    loss: Literal["clip", "siglip"] = Field("clip", description="clip: symmetric cross-entropy (transformers' "
                                            "clip_loss) | siglip: pairwise sigmoid with a learned bias")
    freeze: list[Literal["vision", "text", "projections"]] = Field(
        default_factory=list, description="parts whose weights stay fixed ([vision]: LiT)")


@dataclass
class DualEncoderOutput:
    loss: Tensor | None
    logits_per_image: Tensor  # (B_img, B_txt)
    logits_per_text: Tensor  # (B_txt, B_img)
    image_embeds: Tensor  # (B_img, P), normalised
    text_embeds: Tensor  # (B_txt, P), normalised


def clip_loss(logits_per_text: Tensor) -> Tensor:
    """transformers' ``clip_loss``: the mean of the text->image and image->text cross-entropies, pair i = row i."""
    labels = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)  # (B,)
    return (F.cross_entropy(logits_per_text, labels) + F.cross_entropy(logits_per_text.t(), labels)) / 2.0


def siglip_loss(logits_per_text: Tensor) -> Tensor:
    """SigLIP's pairwise sigmoid loss: every pair a binary task, +1 on the diagonal, -1 elsewhere; summed over the
    images, averaged over the texts (transformers' SiglipModel)."""
    B = logits_per_text.shape[0]
    signs = 2 * torch.eye(B, device=logits_per_text.device, dtype=logits_per_text.dtype) - 1  # (B, B)
    return -F.logsigmoid(signs * logits_per_text).sum(dim=-1).mean()


class DualEncoderModel(ComposedModel):
    """``vision`` and ``text`` towers, ``visual_projection`` and ``text_projection`` (no bias) into
    ``projection_dim``, and a learned ``logit_scale`` (``logit_bias`` too with ``loss: siglip``). Parameter names
    follow transformers' VisionTextDualEncoderModel at the top level; ``vision_pooler`` is the ViT/DeiT pooler."""

    def __init__(self, vision: nn.Module, text: nn.Module, *, spec: dict, pooling: str):
        super().__init__(spec)
        Dv, Dt, P = vision.hidden_size, text.hidden_size, spec["projection_dim"]
        self.vision, self.text, self.pooling, self.loss_kind = vision, text, pooling, spec["loss"]
        self.vision_pooler = nn.Linear(Dv, Dv) if pooling == "dense" else None
        self.visual_projection = nn.Linear(Dv, P, bias=False)
        self.text_projection = nn.Linear(Dt, P, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(spec["logit_scale_init"])))
        self.logit_bias = nn.Parameter(torch.tensor(float(spec["logit_bias_init"]))) if self.loss_kind == "siglip" \
            else None
        for linear in (self.vision_pooler, self.visual_projection, self.text_projection):
            if linear is not None and not linear.weight.is_meta:
                nn.init.normal_(linear.weight, std=0.02)  # transformers' init (initializer_range 0.02)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)

    def vision_tower(self) -> nn.Module:
        return self.vision

    @torch.no_grad()
    def claim_pretrained(self, role: str, tensors: dict[str, Tensor]) -> dict[str, str]:
        """A pretrained ViT/DeiT folder's ``pooler.dense`` fills ``vision_pooler``, as transformers'
        ``from_vision_text_pretrained`` keeps the vision model's pooler."""
        if role != "vision" or self.vision_pooler is None:
            return {}
        taken = {}
        for kind in ("weight", "bias"):
            value, target = tensors.get(f"pooler.dense.{kind}"), getattr(self.vision_pooler, kind)
            if value is not None and value.shape == target.shape:
                target.copy_(value)
                taken[f"pooler.dense.{kind}"] = f"vision_pooler.{kind}"
        return taken

    def freeze_groups(self) -> dict[str, list[nn.Parameter]]:
        pooler = list(self.vision_pooler.parameters()) if self.vision_pooler is not None else []
        heads = [self.logit_scale] + ([self.logit_bias] if self.logit_bias is not None else [])
        return {"vision": list(self.vision.parameters()) + pooler, "text": list(self.text.parameters()),
                "projections": list(self.visual_projection.parameters()) + list(self.text_projection.parameters())
                + heads}

    # -- features -----------------------------------------------------------------------------------------

    def pooled_image(self, pixel_values: Tensor) -> Tensor:
        """(B, D_vision): the image as one vector, as transformers' vision model's ``pooler_output``."""
        out = self.vision(check_pixels(pixel_values, self.vision))
        tokens = out.last_hidden_state  # (B, N, D)
        if self.pooling == "dense":
            return torch.tanh(self.vision_pooler(tokens[:, 0]))  # (B, D)
        if self.pooling == "head":
            return self.vision.model.forward_head(tokens, pre_logits=True)  # (B, D)
        if self.pooling == "own" and out.pooler_output is not None:
            return out.pooler_output  # (B, D)
        return tokens.mean(dim=1)  # (B, D)

    def pooled_text(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                    token_type_ids: Tensor | None = None) -> Tensor:
        """(B, D_text): the text encoder's ``pooler_output`` (the mean of its real tokens when it has none)."""
        B = input_ids.shape[0] if isinstance(input_ids, Tensor) and input_ids.dim() else 0
        home = home_tensor(self.text_projection)
        input_ids, _ = check_token_ids("input_ids", input_ids, B, self.text.vocab_size, home,
                                       max_len=self.text.max_positions)
        out = self.text(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        if out.pooler_output is not None:
            return out.pooler_output  # (B, D)
        hidden = out.last_hidden_state  # (B, T, D)
        if attention_mask is None:
            return hidden.mean(dim=1)
        weights = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (B, D)

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        """(B, projection_dim): the projected, unnormalised image features."""
        return self.visual_projection(self.pooled_image(pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                          token_type_ids: Tensor | None = None) -> Tensor:
        """(B, projection_dim): the projected, unnormalised text features."""
        return self.text_projection(self.pooled_text(input_ids, attention_mask, token_type_ids))

    # -- forward ------------------------------------------------------------------------------------------

    def forward(self, pixel_values: Tensor | None = None, input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                return_loss: bool = True) -> DualEncoderOutput:
        """Similarities of every image with every text; ``loss`` (pair i = image i with text i) when
        ``return_loss`` and the batches are the same size."""
        for name, value in (("pixel_values", pixel_values), ("input_ids", input_ids)):
            if value is None:
                raise input_error(name, "is missing: a dual encoder scores images against texts", expected=(
                    "pixel_values (B_img, C, H, W) and input_ids (B_txt, T)"), fix="pass both; for one side only, "
                    "use get_image_features / get_text_features")
        image = F.normalize(self.get_image_features(pixel_values), dim=-1)  # (B_img, P)
        text = F.normalize(self.get_text_features(input_ids, attention_mask, token_type_ids), dim=-1)  # (B_txt, P)
        logits_per_text = self.pair_logits(image, text)  # (B_txt, B_img)
        loss = None
        if return_loss:
            if image.shape[0] != text.shape[0]:
                raise input_error("input_ids", "the contrastive loss pairs image i with text i, but the batches differ",
                                  given=f"{image.shape[0]} images, {text.shape[0]} texts",
                                  expected="as many texts as images", fix="pass one caption per image, or "
                                  "return_loss=False to score every image against every text")
            loss = self.pair_loss(logits_per_text)
        return DualEncoderOutput(loss, logits_per_text.t(), logits_per_text, image, text)

    def pair_logits(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """(B_txt, B_img) ``logits_per_text`` of normalised embeddings: scaled cosines (plus the bias: siglip)."""
        logits = text_embeds @ image_embeds.t() * self.logit_scale.exp()
        return logits + self.logit_bias if self.logit_bias is not None else logits

    def pair_loss(self, logits_per_text: Tensor) -> Tensor:
        """The spec's contrastive loss, text i paired with image i."""
        return clip_loss(logits_per_text) if self.loss_kind == "clip" else siglip_loss(logits_per_text)

    # -- training (splice.train; see ComposedModel) ------------------------------------------------------

    def caption_encoding(self) -> CaptionEncoding:
        """Captions as the text encoder reads them: with the tokenizer's special tokens ([CLS] ... [SEP])."""
        return CaptionEncoding(special_tokens=True, eos=None, max_len=self.text.max_positions,
                               vocab_size=self.text.vocab_size, component="text")

    def text_inputs(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask), each (B, T), from a batch's caption rows (-100 after each row's end)."""
        real = labels != -100  # (B, T)
        return labels.masked_fill(~real, getattr(self.text, "pad_token_id", 0)), real.long()

    def training_weight(self, batch: dict) -> int:
        return int(batch["labels"].shape[0])  # the loss is a mean over the batch's pairs

    def training_loss_sum(self, call: nn.Module, batch: dict) -> Tensor:
        """The contrastive loss of the batch times its pairs. In a multi-process training run the embeddings are
        gathered from every process with their gradients first (``gather_with_grad``), so every process scores
        its images against all texts of the global batch: the negatives grow with the world size."""
        from splice.train.distributed import gather_with_grad

        ids, mask = self.text_inputs(batch["labels"])
        out = call(pixel_values=batch["pixel_values"], input_ids=ids, attention_mask=mask, return_loss=False)
        image, text = out.image_embeds, out.text_embeds  # (B, P) each
        if self.training:  # evaluation runs in one process
            image, text = gather_with_grad(image), gather_with_grad(text)  # (B_global, P)
        return self.pair_loss(self.pair_logits(image, text)) * out.image_embeds.shape[0]

    @torch.no_grad()
    def evaluate_training(self, source, *, n: int | None, batch_size: int, precision: str) -> dict:
        """The held-out loss, image->text and text->image recall@1 among the held-out pairs (a hit: the top
        text's caption is the image's own, duplicates included), and zero-shot accuracy over the caption set
        (``source.caption_set()``, else the held-out captions)."""
        from splice.train.optim import autocast_for

        device, was_training = home_tensor(self.text_projection).device, self.training
        self.eval()
        images, texts, captions, categories, loss_sum = [], [], [], [], 0.0
        try:
            with autocast_for(precision, device):
                for batch in source.eval_batches(n, batch_size):
                    if batch["pixel_values"] is None:
                        continue
                    ids, mask = self.text_inputs(batch["labels"].to(device))
                    out = self(pixel_values=batch["pixel_values"].to(device), input_ids=ids, attention_mask=mask)
                    loss_sum += float(out.loss) * ids.shape[0]
                    images.append(out.image_embeds.float())
                    texts.append(out.text_embeds.float())
                    captions += batch["captions"]
                    categories += batch.get("categories") or [None] * ids.shape[0]
                caption_set = list(source.caption_set()) if hasattr(source, "caption_set") else sorted(set(captions))
                labels = self._caption_embeds(caption_set, batch_size, device)
        finally:
            self.train(was_training)
        return retrieval_figures(torch.cat(images), torch.cat(texts), captions, labels, caption_set, loss_sum,
                                 categories=categories)

    def _caption_embeds(self, captions: list[str], batch_size: int, device: torch.device) -> Tensor | None:
        """(C, P) normalised embeddings of ``captions`` through the model's tokenizer (None without one)."""
        if self.tokenizer is None or not captions:
            return None
        from splice.zero_shot import tokenize

        ids, mask = tokenize(self, captions)
        return torch.cat([F.normalize(self.get_text_features(ids[i: i + batch_size].to(device),
                                                             mask[i: i + batch_size].to(device)), dim=-1).float()
                          for i in range(0, len(captions), batch_size)])


def retrieval_figures(images: Tensor, texts: Tensor, captions: list[str], labels: Tensor | None,
                      caption_set: list[str], loss_sum: float, categories: list | None = None) -> dict:
    """Recall@1 both ways among the held-out pairs and zero-shot accuracy over ``caption_set``, from normalised
    embeddings: ``images``/``texts`` (N, P), ``labels`` (C, P) for ``caption_set`` (None: not measured); image->text
    recall@1 per category too when the rows have ``categories``."""
    n = len(captions)
    index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([index[c] for c in captions])  # (N,) one id per distinct caption
    same = ids[:, None] == ids[None, :]  # (N, N) pairs with the same caption
    sims = images @ texts.t()  # (N_img, N_txt)
    rows = torch.arange(n)
    hits = same[rows, sims.argmax(dim=1)] if n else torch.zeros(0, dtype=torch.bool)  # (N,) image i's top text
    out = {"loss": loss_sum / max(n, 1), "n": n,
           "image_to_text_recall@1": float(hits.float().mean()) if n else 0.0,
           "text_to_image_recall@1": float(same[sims.argmax(dim=0), rows].float().mean()) if n else 0.0}
    if labels is not None and n:
        guess = (images @ labels.t()).argmax(dim=1).tolist()  # (N,)
        out["zero_shot_accuracy"] = sum(caption_set[g] == c for g, c in zip(guess, captions)) / n
        out["caption_set"] = len(caption_set)
    if categories and any(c is not None for c in categories):
        by = {}
        for cat, hit in zip(categories, hits.tolist()):
            by.setdefault(cat, []).append(hit)
        out["by_category"] = {c: {"image_to_text_recall@1": sum(v) / len(v), "n": len(v)}
                              for c, v in sorted(by.items(), key=lambda kv: str(kv[0]))}
    return out


# -- validate / assemble ------------------------------------------------------------------------------------


def validate(spec: DualEncoderSpec, source: str | None = None) -> Plan:
    """Resolve both towers, build everything on the meta device and count it; the problems are in the plan."""
    plan = Plan(spec=spec, source=source, kind=KIND)
    vision = resolve_part("vision", spec.vision, plan.problems, kind="encoder")
    text = resolve_part("text", spec.text, plan.problems, kind="text_encoder")
    if vision is None or text is None:
        return plan
    plan.parts.extend((vision, text))
    with params_on_meta():
        model = _build(plan)
    if model is None:
        return plan
    vision.params, text.params = count_params(model.vision), count_params(model.text)
    total, pooler = count_params(model), count_params(model.vision_pooler)
    plan.params = {"total": total, "vision": vision.params, "text": text.params,
                   **({"vision pooler": pooler} if pooler else {}),
                   "projections": total - vision.params - text.params - pooler,
                   "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad)}
    plan.lines += [f"image vector: {POOLING_LINES[model.pooling]}",
                   f"projections  vision {vision.width} -> {spec.projection_dim}, text {text.width} -> "
                   f"{spec.projection_dim} (no bias)",
                   f"loss         {spec.loss}, logit_scale init {spec.logit_scale_init} "
                   f"(temperature {math.exp(-spec.logit_scale_init):.4g})"
                   + (f", logit_bias init {spec.logit_bias_init}" if spec.loss == "siglip" else "")]
    plan.meta_model = model
    return plan


def assemble(plan: Plan) -> DualEncoderModel:
    model = _build(plan)
    plan.raise_for_problems()
    assert model is not None
    return model


def _build(plan: Plan) -> DualEncoderModel | None:
    vision_part, text_part = plan.parts
    vision = build_part(vision_part, plan.problems)
    text = build_part(text_part, plan.problems)
    if vision is None or text is None:
        return None
    pooling = VISION_POOLING.get(vision_part.family, "own")
    if pooling == "head" and not callable(getattr(getattr(vision, "model", None), "forward_head", None)):
        pooling = "mean"
    model = DualEncoderModel(vision, text, spec=plan.resolved_spec(), pooling=pooling)
    model.freeze(plan.spec.freeze)
    return model


FORMAT = TransformersFormat("VisionTextDualEncoder", model_types=(MODEL_TYPE,), architectures=(ARCHITECTURE,),
                            spec_from_config=spec_from_dual_config, split_state=split_dual_state,
                            export=export_dual_encoder)
DESCRIPTION = ("a vision and a text encoder projected into one space, trained contrastively (zero-shot "
               "classification, retrieval, LiT)")


@splice.hookimpl
def register_kinds(register):
    register(Kind(name=KIND, spec_model=DualEncoderSpec, validate=validate, assemble=assemble,
                  model_class=DualEncoderModel, formats=(FORMAT,), description=DESCRIPTION))
