"""What a run trains and on what: the model (a module, a saved folder, a spec) and the data sources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from splice.core.errors import InputError
from splice.train.config import TrainConfig


def _is_model_folder(source: Any) -> bool:
    if not isinstance(source, (str, Path)):
        return False
    p = Path(source)
    return p.is_dir() and ((p / "splice.json").is_file() or (p / "config.json").is_file())


def load_model(source: Any, *, seed: int = 0) -> nn.Module:
    """A model from a module, a saved folder (splice or transformers), a spec file, preset or dict."""
    import splice

    if isinstance(source, nn.Module):
        return source
    if _is_model_folder(source):
        return splice.load(source)
    if isinstance(source, str) and not Path(source).exists() and not source.endswith((".yaml", ".yml", ".json")):
        from splice.core.plugins import get_registry

        if source not in get_registry().compositions:
            return splice.load(source)  # a hub id (or a clear "no such folder")
    return splice.compose(source, seed=seed)


def attach_shapes_tokenizer(model: nn.Module) -> None:
    """Give a model without a tokenizer the shapes set's word-level one, checking that its ids fit."""
    from splice import synthetic

    if getattr(model, "tokenizer", None) is not None:
        return
    need, enc = synthetic.vocab_size(), model.caption_encoding()
    if enc.vocab_size is not None and enc.vocab_size < need:
        raise InputError(
            f"the shapes captions need {need} token ids, the {enc.component} has vocab_size {enc.vocab_size}\n"
            f"    fix: set {enc.component}.config.vocab_size: {need} (see examples/demo-captioner.yaml)"
        )
    model.tokenizer = synthetic.build_tokenizer(wrap=enc.special_tokens)
    tokens = getattr(model, "tokens", None)
    want = {"decoder_start": synthetic.BOS, "pad": synthetic.PAD, "eos": synthetic.EOS}
    if tokens is not None and any(tokens.get(k) != v for k, v in want.items()):
        print(f"note: the shapes tokenizer's special ids are {want}; the spec says {tokens} (used as given)")


def resolve_data(data: Any, model: nn.Module, cfg: TrainConfig, eval_data: Any = None):
    """(train source, eval source or None, reports) for ``"shapes"``, a folder / JSONL path, or source objects."""
    if isinstance(data, str) and data == "shapes":
        from splice.synthetic import ShapesData

        attach_shapes_tokenizer(model)
        source = ShapesData.for_model(model, seed=cfg.seed)
        return source, (eval_data if eval_data is not None else source), []
    if isinstance(data, (str, Path)):
        from splice.data import load_data

        from splice.train.optim import trained

        own = trained(model).training_data(data, seed=cfg.seed, eval_path=eval_data)
        if own is not None:  # the kind reads its own rows (a single stream's questions and answers)
            return own

        return load_data(data, model, seed=cfg.seed, eval_path=eval_data)
    if not hasattr(data, "get"):
        raise InputError(f"data: expected 'shapes', a folder, a .jsonl file or a source with get(); got {type(data).__name__}")
    return data, eval_data, []
