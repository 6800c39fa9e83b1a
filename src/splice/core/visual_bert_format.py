"""Folders written by transformers' ``VisualBertModel`` and ``VisualBertFor*`` classes, read (and written) without
transformers: the ``single-stream`` kind's layout.

On disk (``model_type: visual_bert``; the base model under ``visual_bert.`` in every head class, unprefixed in
``VisualBertModel``): BERT's embeddings, layers and pooler (read through the ``bert`` text encoder's
``HFInterop``), ``embeddings.visual_projection`` / ``visual_token_type_embeddings`` /
``visual_position_embeddings`` and, with ``bypass_transformer``, ``additional_layer.*``; then the head:
``cls.predictions.*`` + ``cls.seq_relationship.*`` (PreTraining; RegionToPhraseAlignment too, plus
``attention.{query,key,value}``), ``cls.*`` (QuestionAnswering, VisualReasoning, MultipleChoice). The head class
is read from ``architectures``; the answer vocabulary of a vqa / visual-reasoning head from ``id2label``. This
module reads the planned model's attributes only, so it does not import the kind (``splice.kinds.single_stream``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from splice.core.checkpoint import field_error
from splice.core.errors import CheckpointError, ConfigError, short
from splice.core.files import write_folder
from splice.core.keymap import DUPLICATE, Row, from_hf, to_hf
from splice.core.plugins import get_registry
from splice.core.transformers_format import map_part, part_config_from_hf

MODEL_TYPE = "visual_bert"
HEAD_ARCHITECTURE = {"none": "VisualBertModel", "pretraining": "VisualBertForPreTraining",
                     "vqa": "VisualBertForQuestionAnswering", "visual-reasoning": "VisualBertForVisualReasoning",
                     "multiple-choice": "VisualBertForMultipleChoice",
                     "region-to-phrase": "VisualBertForRegionToPhraseAlignment"}
ARCHITECTURES = tuple(HEAD_ARCHITECTURE.values())
BASE = "visual_bert."  # the base model's prefix in every head class
TEXT = "bert"  # the text encoder whose layout VisualBERT's text side is
CLASSIFIERS = ("vqa", "visual-reasoning")
VISUAL_DEFAULTS = {"visual_embedding_dim": 512, "bypass_transformer": False, "special_visual_initialize": True}
# what export_visual_bert writes: a folder holding only these (and config.json) may be replaced by a new export
EXPORT_FILES = frozenset({"config.json", "model.safetensors", "tokenizer.json"})
DEFAULT_LABEL = re.compile(r"LABEL_\d+")


def _head_of(config: dict) -> str:
    archs = config.get("architectures") if isinstance(config.get("architectures"), list) else []
    by_arch = {arch: head for head, arch in HEAD_ARCHITECTURE.items()}
    return next((by_arch[a] for a in archs if a in by_arch), "none")


def _check_config(config: object, source: str) -> None:
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: holds {short(config)}\n    expected: a JSON mapping (a transformers "
                              "config)\n    fix: save or download the folder again")
    for key, default in VISUAL_DEFAULTS.items():
        value = config.get(key, default)
        if type(value) is not type(default) or (key == "visual_embedding_dim" and not 1 <= value <= 65536):
            raise field_error(source, key, "not what VisualBertConfig holds here", given=value,
                              expected=f"{type(default).__name__} (the default is {default})",
                              fix="correct the value, or save the config again with transformers", cls=ConfigError)
    labels = config.get("id2label")
    if labels is not None and (not isinstance(labels, dict) or sorted(labels, key=str) != sorted(
            map(str, range(len(labels))), key=str) or not all(isinstance(v, str) for v in labels.values())):
        raise field_error(source, "id2label", "not a mapping of every id 0..N-1 to an answer", given=labels,
                          expected='{"0": "yes", "1": "no", ...}', fix="correct id2label, or remove it",
                          cls=ConfigError)


def spec_from_visual_bert_config(config: dict, source: str = "config.json") -> tuple[dict, dict]:
    """A ``single-stream`` spec for a transformers VisualBERT ``config.json`` (no generation defaults)."""
    _check_config(config, source)
    entry = get_registry().get("text_encoder", TEXT)
    text = part_config_from_hf(entry, {"pad_token_id": 1, **config}, source=source)  # VisualBERT's pad default is 1
    head: dict = {"kind": _head_of(config)}
    if head["kind"] in CLASSIFIERS:
        id2label = config.get("id2label") or {}
        names = [id2label[str(i)] for i in range(len(id2label))]
        head["num_labels"] = len(names) or config.get("num_labels") or 2
        if names and not all(DEFAULT_LABEL.fullmatch(n) for n in names):
            head["labels"] = names
    spec = {"kind": "single-stream", "text": {"name": TEXT, "config": text}, "head": head,
            **{key: config.get(key, default) for key, default in VISUAL_DEFAULTS.items()}}
    return spec, {}


def own_table(config: dict, head: str, prefix: str) -> list[Row]:
    """The tensors the kind owns (the text encoder's aside): the visual embeddings, the additional layer and the
    head, transformers' names (``prefix``: the base model's) -> ours, with transformers' shapes."""
    from splice.plugins.bert import LAYOUT, encoder_layer_rows

    d = LAYOUT.dims(config)
    D, V, I = d["hidden_size"], d["vocab_size"], d["intermediate_size"]
    Dv = config.get("visual_embedding_dim", VISUAL_DEFAULTS["visual_embedding_dim"])
    emb = prefix + "embeddings."
    rows = [Row(emb + "visual_projection.weight", "visual.projection.weight", (D, Dv)),
            Row(emb + "visual_projection.bias", "visual.projection.bias", (D,)),
            Row(emb + "visual_token_type_embeddings.weight", "visual.token_type.weight", (d["type_vocab_size"], D)),
            Row(emb + "visual_position_embeddings.weight", "visual.position.weight", (d["max_position_embeddings"], D))]
    if config.get("bypass_transformer", False):
        rows += [row.prefixed(prefix + "additional_layer.", "additional_layer.") for row in encoder_layer_rows(D, I)]
    if head in ("pretraining", "region-to-phrase"):
        rows += [Row(hf, "lm_" + ours, (D, D) if hf.endswith("dense.weight") else (D,)) for hf, ours in
                 LAYOUT.head.items()]
        rows += [Row(LAYOUT.head_bias, "lm_head.bias", (V,)), Row("cls.seq_relationship.weight",
                                                                   "seq_relationship.weight", (2, D)),
                 Row("cls.seq_relationship.bias", "seq_relationship.bias", (2,))]
        if not config.get("tie_word_embeddings", True):
            rows.append(Row(LAYOUT.head_decoder + ".weight", "lm_head.decoder.weight", (V, D)))
    if head in (*CLASSIFIERS, "multiple-choice"):
        K = 1 if head == "multiple-choice" else config.get("num_labels") or len(config.get("id2label") or {}) or 2
        rows += [Row("cls.weight", "classifier.weight", (K, D)), Row("cls.bias", "classifier.bias", (K,))]
    if head == "region-to-phrase":
        hs = D // config.get("num_attention_heads", 12)
        rows += [Row(f"attention.{m}.{p}", f"region_attention.{m}.{p}", (hs, D) if p == "weight" else (hs,))
                 for m in ("query", "key", "value") for p in ("weight", "bias")]
    return rows


def _is_text(name: str, prefix: str) -> bool:
    if not name.startswith(prefix):
        return False
    rest = name[len(prefix):]
    return not rest.startswith(("embeddings.visual_", "additional_layer.")) and \
        rest.partition(".")[0] in ("embeddings", "encoder", "pooler")


def split_visual_bert_state(source: str, tensors, plan, config: dict) -> tuple[dict, list, list, list]:
    """(state in splice's names, unused, unexpected, notes): the text side through the text encoder's mapping,
    the visual embeddings, additional layer and head through ``own_table``."""
    prefix = BASE if any(name.startswith(BASE) for name in tensors) else ""
    head = plan.meta_model.head_kind
    text_names = [name for name in tensors if _is_text(name, prefix)]
    group = {name[len(prefix):]: tensors[name] for name in text_names}
    where = prefix.rstrip(".") or "(base model)"
    text_part = next(p for p in plan.components() if p.role == "text")
    mapped, unused, unexpected, notes = map_part(source, text_part, group, config, where)
    state = {f"text.{k}": v for k, v in mapped.items()}
    tied = config.get("tie_word_embeddings", True)
    decoder = "cls.predictions.decoder."

    def name_of(name: str) -> str | None:
        return DUPLICATE if tied and name.startswith(decoder) or name == decoder + "bias" else name

    rest = {name: tensors[name] for name in tensors if name not in set(text_names)}
    dims = f"hidden_size={config.get('hidden_size')}, visual_embedding_dim={config.get('visual_embedding_dim')}"
    try:
        own, left = from_hf(rest, own_table(config, head, prefix), name_of, dims)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    state.update(own)
    if not prefix:
        unused = [n.removeprefix(f"{where}.") for n in unused]
        unexpected = [n.removeprefix(f"{where}.") for n in unexpected]
    return state, unused, unexpected + left, [f"text: {n}" for n in notes]


def _export_blockers(model) -> list[str]:
    spec, blockers = model.spec, []
    if model.vision is not None:
        blockers.append(f"vision {spec['vision']['name']!r} (transformers' VisualBERT reads visual_embeds, not "
                        "pixels; pass the vision tokens as visual_embeds instead)")
    if spec["text"]["name"] != TEXT:
        blockers.append(f"text {spec['text']['name']!r} (VisualBERT's text side is BERT's)")
    if model.lm_head is not None and model.lm_head.decoder is not None:
        blockers.append("an untied masked-LM decoder (transformers ties it to the word embeddings)")
    return blockers


def export_visual_bert(model, path) -> None:
    """Write a folder that transformers' ``VisualBert*`` class of the model's head loads with the same outputs;
    what it cannot express (a vision encoder, a RoBERTa text side) raises ``CheckpointError`` naming it."""
    from safetensors.torch import save_file

    blockers = _export_blockers(model)
    if blockers:
        raise CheckpointError("cannot export to transformers' VisualBert layout:\n  - " + "\n  - ".join(blockers)
                              + "\n    fix: save with model.save_pretrained (splice's own format) instead")
    spec, entry = model.spec, get_registry().get("text_encoder", TEXT)
    head = spec["head"]
    sub = entry.hf.config_to_hf(entry.config_cls(**spec["text"]["config"]).model_dump())
    config = {k: v for k, v in sub.items() if k not in ("is_decoder", "add_cross_attention")}
    config.update(model_type=MODEL_TYPE, architectures=[HEAD_ARCHITECTURE[head["kind"]]], tie_word_embeddings=True,
                  **{key: spec[key] for key in VISUAL_DEFAULTS})
    if head["kind"] in CLASSIFIERS:
        labels = head.get("labels") or []
        names = [labels[i] if i < len(labels) else f"LABEL_{i}" for i in range(head["num_labels"])]
        config.update(id2label={str(i): n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)})
    prefix = "" if head["kind"] == "none" else BASE
    tensors = {prefix + k: v for k, v in entry.hf.state_dict_to_hf(model.text.state_dict(), sub).items()}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("text.")}
    tensors.update(to_hf(own, own_table(config, head["kind"], prefix), layout="VisualBert",
                         fix="save with model.save_pretrained (splice's own format)"))

    def fill(tmp: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if model.tokenizer is not None:
            (tmp / "tokenizer.json").write_text(model.tokenizer.to_str())

    write_folder(path, fill, marker="config.json", owned=EXPORT_FILES, what="transformers export")
