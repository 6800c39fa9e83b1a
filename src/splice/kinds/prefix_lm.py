"""The prefix-LM composition kind: image features projected into a decoder-only language model's prompt
(transformers' LlavaForConditionalGeneration and VipLlavaForConditionalGeneration).

A spec::

    kind: prefix-lm
    vision: {name: clip_vision, config: {...}}    # any registered vision encoder that returns hidden_states
    language: {name: llama, config: {...}}        # any registered text decoder that takes inputs_embeds
    projector: vipllava                           # llava | vipllava | any registered projection, or {kind, config}
    vision_feature_layers: [-2, -5, -8, -11, 6]   # one int or a list; default: vipllava's list, else -2
    vision_feature_select_strategy: default       # default: the class token dropped | full: kept
    tokens: {image: 32000, pad: 32001, bos: 1, eos: 2}
    freeze: [vision, language]                    # stage one: the projector alone

The image runs through the vision encoder; the hidden states of ``vision_feature_layers`` (indices into the
encoder's ``hidden_states`` tuple: the embeddings, then each layer; negative from the end) lose their first token
(``default``) and are concatenated along the width, then the projector maps them to the language model's width.
The prompt holds one ``tokens.image`` id per feature position (``model.image_seq_length`` per image, as
transformers 5 expects); the projected features replace those positions' token embeddings, in order, and the
language model reads the result as ``inputs_embeds``.

The projectors are registered as ``projection`` entries (the registry kind the encoder-decoder's ``projection:``
draws on), not a new category: a projector has exactly a projection's contract, ``builder(config)(in_width,
out_width) -> module`` mapping (B, N, D_in) to (B, N, D_out), the composer passes both widths (the vision width
times the number of feature layers, and the language model's hidden size), and ``splice list --kind projection``
lists them. ``llava`` is LLaVA's ``linear_1 -> act -> linear_2``; ``vipllava`` puts VipLlava's
``projector_layernorm`` over the concatenated features first. Their module names are transformers', so the
``multi_modal_projector`` tensors map one to one. Any other projection (``linear``, ``mlp``) composes too; only
these two export to transformers.

The model's training contract (``splice.train``): see ``PrefixLMModel``. Its transformers layouts are
``llava`` and ``vipllava`` (``splice.core.prefix_lm_format``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt
from torch import Tensor, nn

import splice
from splice.core.composer import build_part, count_params, plugin_call, resolve_part
from splice.core.configs import checked_config
from splice.core.errors import InputError, Problem, unknown_problem
from splice.core.inputs import check_pixels, check_token_ids, home_tensor, input_error
from splice.core.kernels import Linear
from splice.core.kinds import Kind, Plan
from splice.core.meta import params_on_meta
from splice.core.models import CaptionEncoding, ComposedModel
from splice.core.plugins import get_registry
from splice.core.prefix_lm_format import FORMATS
from splice.core.registry import Entry
# roles' dry forward (its time bound, real zeros or meta, and off under ``unchecked`` while splice.load plans)
from splice.core.roles import _SKIPPED, _dry, check_output_width
from splice.core.spec import ComponentSpec, ProjectionSpec
from splice.plugins._shared import ACTIVATION_FNS, Eps

KIND = "prefix-lm"
VIPLLAVA_LAYERS = [-2, -5, -8, -11, 6]  # VipLlavaConfig's default vision_feature_layer
LLAVA_LAYER = -2  # LlavaConfig's default: the penultimate layer

# ---- projectors ------------------------------------------------------------------------------------------

Activation = Literal["gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"]  # transformers' projector_hidden_act


class LlavaProjectorConfig(BaseModel):
    """LLaVA's ``multi_modal_projector``: ``projector_hidden_act`` and ``multimodal_projector_bias``."""

    model_config = ConfigDict(extra="forbid")
    act: Activation = Field("gelu", description="the activation between the two linears (transformers' "
                            "projector_hidden_act; gelu is the exact GELU)")
    bias: bool = Field(True, description="biases on both linears (transformers' multimodal_projector_bias)")


class VipLlavaProjectorConfig(BaseModel):
    """VipLlava's ``multi_modal_projector``: ``projector_hidden_act`` and ``projector_layernorm_eps``."""

    model_config = ConfigDict(extra="forbid")
    act: Activation = Field("gelu", description="the activation between the two linears (projector_hidden_act)")
    eps: Eps = Field(1e-5, description="the LayerNorm's epsilon (transformers' projector_layernorm_eps)")


class LlavaProjector(nn.Module):
    """``linear_2(act(linear_1(x)))``: (B, N, D_in) -> (B, N, D_out), the hidden width D_out (transformers')."""

    def __init__(self, in_width: int, out_width: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.linear_1 = Linear(in_width, out_width, bias=bias)
        self.act_name = act
        self.linear_2 = Linear(out_width, out_width, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(ACTIVATION_FNS[self.act_name](self.linear_1(x)))  # (B, N, D_out)


class VipLlavaProjector(LlavaProjector):
    """``projector_layernorm`` over the concatenated features, then LLaVA's two linears (always with biases)."""

    def __init__(self, in_width: int, out_width: int, act: str = "gelu", eps: float = 1e-5):
        super().__init__(in_width, out_width, act, bias=True)
        self.projector_layernorm = nn.LayerNorm(in_width, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.projector_layernorm(x))  # (B, N, D_out)


def build_llava_projector(config: LlavaProjectorConfig):
    """LLaVA's projector: linear -> activation -> linear."""
    return lambda in_width, out_width: LlavaProjector(in_width, out_width, config.act, config.bias)


def build_vipllava_projector(config: VipLlavaProjectorConfig):
    """VipLlava's projector: LayerNorm over the concatenated layers, then linear -> activation -> linear."""
    return lambda in_width, out_width: VipLlavaProjector(in_width, out_width, config.act, config.eps)


# ---- the spec --------------------------------------------------------------------------------------------

LayerIndex = Annotated[int, Field(strict=True, ge=-4096, le=4096)]
LayerList = Annotated[list[LayerIndex], Field(min_length=1, max_length=64)]


class PrefixTokensSpec(BaseModel):
    """Special token ids of the language model's vocabulary."""

    model_config = ConfigDict(extra="forbid")
    image: NonNegativeInt | None = Field(None, description="the image placeholder: the prompt holds one per image "
                                         "feature position (required)")
    pad: NonNegativeInt | None = Field(None, description="fills finished sequences and left-padded prompts")
    bos: NonNegativeInt | None = Field(None, description="the first token of a prompt (for the tokenizer's side)")
    eos: NonNegativeInt | None = Field(None, description="end of sequence: generation stops here")


class PrefixLMSpec(BaseModel):
    """A vision encoder whose projected features fill the image-token positions of a language model's prompt."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["prefix-lm"]
    vision: ComponentSpec = Field(description="a registered vision encoder (`splice list --kind encoder`)")
    language: ComponentSpec = Field(description="a registered text decoder that takes inputs_embeds (llama, gpt2)")
    projector: Union[str, ProjectionSpec] = Field(
        "llava", description="llava (linear-GELU-linear) | vipllava (LayerNorm, then llava's) | another registered "
        "projection, or {kind, config} to set its options")
    vision_feature_layers: Union[LayerIndex, LayerList, None] = Field(
        None, description="the vision hidden states concatenated (indices into hidden_states: 0 the embeddings, "
        "-1 the last layer); default: [-2, -5, -8, -11, 6] for vipllava, else -2")
    vision_feature_select_strategy: Literal["default", "full"] = Field(
        "default", description="default: drop the first (class) token of each layer | full: keep every token")
    tokens: PrefixTokensSpec = Field(default_factory=PrefixTokensSpec)
    freeze: list[Literal["vision", "language", "projector"]] = Field(
        default_factory=list, description="parts whose weights stay fixed ([vision, language]: train the projector "
        "alone)")
    chat_template: str | None = Field(None, max_length=200_000, description="the Jinja chat template the prompts "
                                      "are built with (read from a transformers folder; saved with the model)")


@dataclass
class CausalLMOutput:
    loss: Tensor | None
    logits: Tensor  # (B, T, V)


# ---- the model -------------------------------------------------------------------------------------------


def token_embedding(decoder: nn.Module) -> nn.Module | None:
    """The decoder's input token embedding (``get_input_embeddings()``, else ``embed_tokens`` / ``wte``)."""
    get = getattr(decoder, "get_input_embeddings", None)
    if callable(get):
        return get()
    return next((m for m in (getattr(decoder, n, None) for n in ("embed_tokens", "wte", "word_embeddings"))
                 if isinstance(m, nn.Embedding)), None)


class PrefixLMModel(ComposedModel):
    """``vision``, ``projector`` and ``language``: the image's projected features in place of the prompt's image
    tokens, read by the language model.

    ``forward(input_ids, pixel_values, attention_mask=None, labels=None)``: ``input_ids`` (B, T) hold
    ``image_seq_length`` ``tokens.image`` ids per image, in order (the images of ``pixel_values`` (n_img, C, H, W)
    fill them one after the other, as transformers' ``masked_scatter``); ``attention_mask`` (B, T) marks padding
    (0); ``labels`` (B, T) the same positions as ``input_ids``, -100 where no loss is taken (image, prompt,
    padding): the loss predicts label t+1 from position t (shifted inside, transformers' causal-LM convention),
    the mean over the labels that are not -100.

    Training (``splice.train``) reads batches with the keys ``pixel_values`` (n_img, C, H, W), ``input_ids``
    (B, T) the full prompt + answer with the image tokens expanded, ``attention_mask`` (B, T) (optional: none
    means no padding), and ``labels`` (B, T) as above; the loss is weighted by the labels the shift leaves.
    """

    def __init__(self, vision: nn.Module, projector: nn.Module, language: nn.Module, *, spec: dict):
        super().__init__(spec)
        self.vision, self.projector, self.language = vision, projector, language
        self.tokens = dict(spec["tokens"])
        layers = spec["vision_feature_layers"]
        self.feature_layers = [layers] if isinstance(layers, int) else list(layers)
        self.keep_first = spec["vision_feature_select_strategy"] == "full"
        self._image_seq_length: int | None = None

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template (a transformers folder's ``chat_template.jinja``), kept in the spec."""
        return self.spec.get("chat_template")

    @chat_template.setter
    def chat_template(self, value: str | None) -> None:
        self.spec["chat_template"] = value

    def vision_tower(self) -> nn.Module:
        return self.vision

    def freeze_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"vision": list(self.vision.parameters()), "language": list(self.language.parameters()),
                "projector": list(self.projector.parameters())}

    # -- the image ------------------------------------------------------------------------------------------

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """(n_img, N, D_language): the feature layers' tokens (first token dropped unless ``full``), concatenated
        along the width and projected."""
        states = self.vision(check_pixels(pixel_values, self.vision), output_hidden_states=True).hidden_states
        if not states:
            raise InputError(f"vision encoder {self.spec['vision']['name']!r} returned no hidden_states\n    fix: "
                             "use a vision encoder whose forward(output_hidden_states=True) returns them")
        picked = [states[i] if self.keep_first else states[i][:, 1:] for i in self.feature_layers]  # (n, N, D_v)
        return self.projector(torch.cat(picked, dim=-1))  # (n_img, N, D)

    @property
    def image_seq_length(self) -> int:
        """Image tokens a prompt holds per image (the features of one image), from one blank image's forward."""
        if self._image_seq_length is None:
            pre = self.vision.preprocessing
            blank = torch.zeros(1, pre.in_chans, *pre.image_size, device=home_tensor(self).device)
            with torch.no_grad():
                self._image_seq_length = int(self.image_features(blank).shape[1])
        return self._image_seq_length

    def prompt_embeddings(self, input_ids: Tensor, pixel_values: Tensor | None) -> Tensor:
        """(B, T, D): the token embeddings of ``input_ids``, the image features in place of the image tokens."""
        embeds = token_embedding(self.language)(input_ids)  # (B, T, D)
        image = input_ids == self.tokens["image"]  # (B, T)
        count = int(image.sum())
        if pixel_values is None:
            if count:
                raise input_error("pixel_values", "missing: input_ids hold image tokens", given=None,
                                  expected=f"the images whose features fill the {count} image token(s)",
                                  fix="pass pixel_values, or remove the image tokens from the prompt")
            return embeds
        features = self.image_features(pixel_values)  # (n_img, N, D)
        n_img, N = features.shape[:2]
        if count != n_img * N:
            raise input_error("input_ids", f"hold {count} image token(s) (id {self.tokens['image']}), but the "
                              f"{n_img} image(s) give {n_img} x {N} = {n_img * N} feature positions",
                              given=count, expected=f"{n_img * N} image tokens ({N} per image, in order)",
                              fix=f"expand each image placeholder to {N} image tokens (model.image_seq_length), "
                              "one image per placeholder")
        return embeds.masked_scatter(image[..., None], features.to(embeds.dtype))  # (B, T, D)

    # -- forward ----------------------------------------------------------------------------------------------

    def _checked(self, input_ids: Any, attention_mask: Any) -> tuple[Tensor, Tensor | None]:
        """The ids (B, T) in the vocabulary and within the positions, and the mask (None when nothing is padding)."""
        B = input_ids.shape[0] if isinstance(input_ids, Tensor) and input_ids.dim() == 2 else 1
        home, lm = home_tensor(self.language), self.language
        ids, _ = check_token_ids("input_ids", input_ids, B, lm.vocab_size, home, max_len=lm.max_positions)
        if attention_mask is None:
            return ids, None
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(ids.shape):
            raise input_error("attention_mask", "is not shaped like input_ids", given=tuple(attention_mask.shape)
                              if isinstance(attention_mask, Tensor) else type(attention_mask).__name__,
                              expected=f"a 0/1 tensor of shape {tuple(ids.shape)}",
                              fix="1 marks a real token, 0 padding: one per token")
        mask = attention_mask.to(ids.device).long()
        return ids, (None if ids.numel() == 0 or bool((mask != 0).all()) else mask)

    def forward(self, input_ids: Tensor, pixel_values: Tensor | None = None, attention_mask: Tensor | None = None,
                labels: Tensor | None = None) -> CausalLMOutput:
        """Logits (B, T, V) for the prompt with the image features spliced in; ``loss`` with ``labels``."""
        ids, mask = self._checked(input_ids, attention_mask)
        logits = self.language(inputs_embeds=self.prompt_embeddings(ids, pixel_values), attention_mask=mask).logits
        loss = None
        if labels is not None:
            loss = self._loss_sum(logits, labels) / max(self._weight(labels), 1)
        return CausalLMOutput(loss, logits)

    def _loss_sum(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Summed cross-entropy of position t against label t+1, -100 ignored (0, in the graph, when none is left)."""
        if not isinstance(labels, Tensor) or tuple(labels.shape) != tuple(logits.shape[:2]):
            raise input_error("labels", "is not shaped like input_ids", given=tuple(labels.shape) if isinstance(
                labels, Tensor) else type(labels).__name__, expected=f"(B, T) = {tuple(logits.shape[:2])}, -100 "
                "where no loss is taken", fix="pass one label per input token (the input ids themselves, masked)")
        labels, _ = check_token_ids("labels", labels, labels.shape[0], logits.shape[-1], logits, ignore=-100)
        shifted = logits[:, :-1].flatten(0, 1).float()  # (B*(T-1), V)
        return F.cross_entropy(shifted, labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")

    @staticmethod
    def _weight(labels: Tensor) -> int:
        return int((labels[:, 1:] != -100).sum())

    def generate(self, input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                 attention_mask: Tensor | None = None, **options: Any) -> Tensor:
        """(B * num_return_sequences, T + new) token ids: the prompt, then the answer, as transformers' generate;
        ``attention_mask`` marks left padding. The prompt runs once per row (image features spliced in) and
        fills the KV cache; the options are ``splice.core.generation.generate``'s (greedy, beam, sampling)."""
        from splice.core.generation import generate_from_prompt

        if input_ids is None:
            raise input_error("input_ids", "missing: a prefix LM answers a prompt", expected="(B, T) token ids "
                              "with the image tokens expanded", fix="build the prompt with the chat template and "
                              f"{self.image_seq_length if pixel_values is not None else 'N'} image tokens per image")
        ids, mask = self._checked(input_ids, attention_mask)

        def prefill(cache) -> Tensor:  # (B, V): the next-token logits after the prompt
            embeds = self.prompt_embeddings(ids, pixel_values)
            return self.language(inputs_embeds=embeds, attention_mask=mask, cache=cache).logits[:, -1]

        return generate_from_prompt(self, self.language, ids, mask, prefill, **options)

    # -- training (splice.train; see ComposedModel) -------------------------------------------------------------

    def training_data(self, path, *, seed: int, eval_path=None):
        """``{"image", "question", "answer"}`` rows (JSONL or an image folder), prompts built as ``splice ask``
        builds them, the loss on the answer (``splice.ask.load_prompt_qa_data``)."""
        from splice.ask import load_prompt_qa_data

        return load_prompt_qa_data(path, self, seed=seed, eval_path=eval_path)

    def caption_encoding(self) -> CaptionEncoding:
        return CaptionEncoding(special_tokens=False, eos=self.tokens.get("eos"),
                               max_len=getattr(self.language, "max_positions", None),
                               vocab_size=getattr(self.language, "vocab_size", None), component="language")

    def training_weight(self, batch: dict) -> int:
        return self._weight(batch["labels"])  # the labels the shift leaves

    def training_loss_sum(self, call: nn.Module, batch: dict) -> Tensor:
        """The summed shifted cross-entropy of the batch (see the class docstring for its keys)."""
        if batch.get("input_ids") is None:
            raise input_error("batch['input_ids']", "missing: a prefix LM reads the full prompt + answer ids",
                              expected="input_ids (B, T) beside labels (B, T), pixel_values and attention_mask",
                              fix="build the batches with the question-answer data of the prefix-lm kind")
        logits = call(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                      attention_mask=batch.get("attention_mask")).logits
        return self._loss_sum(logits, batch["labels"])


# ---- validate / assemble ---------------------------------------------------------------------------------


@dataclass
class PrefixLMPlan(Plan):
    """The kind's plan: the parts, the projector and the feature layers it reads."""

    projector: Entry | None = None
    projector_config: BaseModel | None = None
    layers: list[int] | int = LLAVA_LAYER
    in_width: int = 0
    image_tokens: int | None = None  # per image; None: not measured (checks off while loading)

    def resolved_spec(self) -> dict:
        out = super().resolved_spec()
        out["projector"] = {"kind": self.projector.name, "config": self.projector_config.model_dump(mode="json")}
        out["vision_feature_layers"] = self.layers
        return out


def validate(spec: PrefixLMSpec, source: str | None = None) -> PrefixLMPlan:
    """Resolve the parts and the projector, build everything on the meta device and check every dimension: the
    feature layers against the vision encoder's hidden states, the projector's widths, the token ids."""
    registry = get_registry()
    plan = PrefixLMPlan(spec=spec, source=source, kind=KIND)
    problems = plan.problems
    vision = resolve_part("vision", spec.vision, problems, kind="encoder")
    language = resolve_part("language", spec.language, problems, kind="decoder")
    asked = spec.projector
    name, config = (asked, {}) if isinstance(asked, str) else (asked.kind, dict(asked.config))
    if registry.has("projection", name):
        plan.projector = registry.get("projection", name)
        plan.projector_config = checked_config(plan.projector, config, "projector.config", problems)
    else:
        problems.append(unknown_problem("projection", name, registry.names("projection"), path="projector"))
    layers = spec.vision_feature_layers
    plan.layers = layers if layers is not None else VIPLLAVA_LAYERS if name == "vipllava" else LLAVA_LAYER
    if spec.tokens.image is None:
        problems.append(Problem("tokens.image", "missing: the prompt's image placeholder id", expected="the id of "
                                "the image token in the language model's vocabulary (LLaVA's <image>: 32000)",
                                fix="add `tokens: {image: <id>}` to the spec"))
    if vision is None or language is None or plan.projector_config is None:
        return plan  # nothing to build
    plan.parts.extend((vision, language))
    with params_on_meta():
        model = _build(plan, check=True)
    if model is not None:
        _count(plan, model)
        plan.meta_model = model
    return plan


def assemble(plan: PrefixLMPlan) -> PrefixLMModel:
    """The planned model with real weights; a build that fails raises its problems."""
    model = _build(plan)
    if model is None:
        plan.raise_for_problems()
    return model


def _build(plan: PrefixLMPlan, check: bool = False) -> PrefixLMModel | None:
    """The parts, the projector between them, and the model; ``check`` (validate) dry-runs what it can."""
    vision_part, language_part = plan.parts
    vision = build_part(vision_part, plan.problems)
    language = build_part(language_part, plan.problems)
    if vision is None or language is None:
        return None
    _check_language(plan, language)
    layers = [plan.layers] if isinstance(plan.layers, int) else plan.layers
    plan.in_width = vision.hidden_size * len(layers)
    if check:
        _check_vision(plan, vision, layers)
    if plan.problems:
        return None
    entry, widths = plan.projector, (plan.in_width, language.hidden_size)
    projector = plugin_call(plan.problems, entry, "projector", lambda: entry.builder(plan.projector_config)(*widths))
    if projector is None or (check and not check_output_width(entry, projector, "projector", *widths, plan.problems)):
        return None
    model = PrefixLMModel(vision, projector, language, spec=plan.resolved_spec())
    model.freeze(plan.spec.freeze)
    return model


def _check_language(plan: PrefixLMPlan, language: nn.Module) -> None:
    """The language model takes embeddings, and the token ids lie in its vocabulary."""
    part, spec = plan.parts[1], plan.spec
    forward = getattr(language, "forward", None)
    takes = callable(forward) and "inputs_embeds" in inspect.signature(forward).parameters
    if not takes or token_embedding(language) is None:
        plan.problems.append(Problem(
            "language.name", f"decoder {part.family!r} cannot read the image features: a prefix LM needs "
            "forward(inputs_embeds=...) and its token embedding (get_input_embeddings, embed_tokens or wte)",
            given=part.family, expected="a decoder that takes inputs_embeds (llama, gpt2)",
            fix="pick such a decoder, or add inputs_embeds to the plugin", error="incompatible"))
    vocab = language.vocab_size
    for key, value in spec.tokens.model_dump().items():
        if value is not None and value >= vocab:
            plan.problems.append(Problem(
                f"tokens.{key}", f"token id {value} is outside the language model's vocabulary", given=value,
                expected=f"an id in 0..{vocab - 1} ({part.family!r} vocab_size {vocab})",
                fix=f"use an id below {vocab}, or enlarge language.config's vocabulary", error="incompatible"))
    if spec.tokens.image is not None and spec.tokens.image == spec.tokens.pad:
        plan.problems.append(Problem("tokens.pad", "the padding id is the image token's: padding would be read "
                                     "as image positions", given=spec.tokens.pad,
                                     expected=f"an id other than tokens.image ({spec.tokens.image})",
                                     fix="give padding its own id (LLaVA: <pad> 32001)"))


def _check_vision(plan: PrefixLMPlan, vision: nn.Module, layers: list[int]) -> None:
    """The feature layers against a dry forward's hidden states: each index exists, the layers agree in token
    count, and their widths add up to what the projector reads. Sets ``plan.in_width`` and ``plan.image_tokens``."""
    part, problems = plan.parts[0], plan.problems
    pre = vision.preprocessing
    c, (h, w) = pre.in_chans, pre.image_size
    out = _dry(part.entry, vision, "vision.name", f"a (1, {c}, {h}, {w}) image with output_hidden_states",
               lambda m, d: m(torch.zeros(1, c, h, w, device=d), output_hidden_states=True), problems)
    if out is None or out is _SKIPPED:
        return
    states = getattr(out, "hidden_states", None) or ()
    n = len(states)
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        problems.append(Problem(
            "vision_feature_layers", f"layer index(es) {bad} do not exist: vision {part.family!r} gives {n} hidden "
            "states (the embeddings, then each layer)" if n else f"vision {part.family!r} returns no hidden_states",
            given=plan.spec.vision_feature_layers if plan.spec.vision_feature_layers is not None else plan.layers,
            expected=f"indices in {-n}..{n - 1}" if n else "a vision encoder that returns hidden_states",
            fix=f"pick layers of the {n} (e.g. -2, the penultimate)" if n else "pick another vision encoder",
            error="incompatible"))
        return
    picked = [tuple(states[i].shape) for i in layers]  # each (1, N, D)
    drop = 0 if plan.spec.vision_feature_select_strategy == "full" else 1
    if len({s[1] for s in picked}) > 1 or picked[0][1] - drop < 1:
        problems.append(Problem(
            "vision_feature_layers", f"the layers' token counts differ or leave no feature: {[s[1] for s in picked]} "
            f"tokens ({'minus the class token' if drop else 'all kept'})", given=plan.layers,
            expected="layers of one token count (concatenated along the width), at least one token left",
            fix="pick layers of one stage (a ViT's or CLIP's layers all agree)", error="incompatible"))
        return
    plan.in_width, plan.image_tokens = sum(s[2] for s in picked), picked[0][1] - drop


def _count(plan: PrefixLMPlan, model: PrefixLMModel) -> None:
    vision, language = plan.parts
    vision.params, language.params = count_params(model.vision), count_params(model.language)
    projector = count_params(model.projector)
    plan.params = {"total": count_params(model), "vision": vision.params, "language": language.params,
                   "projector": projector,
                   "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad)}
    layers = plan.layers if isinstance(plan.layers, list) else [plan.layers]
    plan.lines += [
        f"image features: hidden states {layers} of {vision.family!r}, "
        f"{'class token dropped' if plan.spec.vision_feature_select_strategy == 'default' else 'every token'}, "
        f"concatenated ({plan.in_width} wide)",
        f"projector    {plan.projector.name}: {plan.in_width} -> {language.width}",
        f"image tokens {plan.image_tokens if plan.image_tokens is not None else '(not measured)'} per image "
        f"(tokens.image = {plan.spec.tokens.image})"]


@splice.hookimpl
def register_projections(register):
    register("llava", build_llava_projector, LlavaProjectorConfig, tiny={},
             description="LLaVA's projector: linear, activation, linear (transformers' multi_modal_projector)")
    register("vipllava", build_vipllava_projector, VipLlavaProjectorConfig, tiny={},
             description="VipLlava's projector: LayerNorm over the concatenated layers, then linear, activation, "
                         "linear")


@splice.hookimpl
def register_kinds(register):
    register(Kind(name=KIND, spec_model=PrefixLMSpec, validate=validate, assemble=assemble, model_class=PrefixLMModel,
                  formats=FORMATS, description="a vision encoder's multi-layer features projected into the image-token "
                  "slots of a language model's prompt (LLaVA, VipLlava: visual question answering)"))
