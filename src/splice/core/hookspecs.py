"""The whole plugin API.

A plugin is a module (or object) with functions marked ``@splice.hookimpl`` named like the specs below.
Each hook receives a ``register`` callback and returns nothing. For components::

    register(name, builder, config_cls, *, aliases=(), tiny=None, hf=None, description=None)

``builder(config) -> nn.Module`` takes an instance of ``config_cls`` (a pydantic model); ``tiny`` is a dict of
config values small enough for tests; ``hf`` an optional ``splice.HFInterop`` saying how to read checkpoints
written by transformers. ``register_kinds`` is the exception: its ``register`` takes one ``splice.Kind``.
Built-in plugins (the ``encoder-decoder`` kind included) register through these same hooks.

The rules (docs/writing-a-plugin.md, "Rules and limits"): a ``register`` call with bad arguments is recorded as
the plugin's failure and skipped; a hook that raises (``SystemExit`` included) or runs longer than
``SPLICE_PLUGIN_TIMEOUT`` seconds is recorded; what a hook prints goes to stderr; a function marked
``@splice.hookimpl`` under a name that is not one of the hooks below is reported, not ignored. Each registered
builder and config class is wrapped: an exception raised inside it (other than a ``SpliceError``) becomes a
``PluginError`` naming the component, the plugin and its distribution.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("splice")


@hookspec
def register_encoders(register):
    """Register vision encoders: ``builder(config)`` returns a module satisfying ``VisionEncoder``."""


@hookspec
def register_decoders(register):
    """Register text decoders: ``builder(config)`` returns a module satisfying ``TextDecoder``."""


@hookspec
def register_text_encoders(register):
    """Register text encoders: ``builder(config)`` returns a module satisfying ``TextEncoder`` (bidirectional,
    with a pooled output; the dual-encoder and single-stream kinds use them)."""


@hookspec
def register_adapters(register):
    """Register cross-attention kinds: ``builder(config)`` returns a ``CrossAttentionAdapter``."""


@hookspec
def register_projections(register):
    """Register projections: ``builder(config)`` returns a callable ``(in_width, out_width) -> nn.Module``."""


@hookspec
def register_kinds(register):
    """Register composition kinds: ``register(splice.Kind(name, spec_model, validate, assemble, model_class,
    formats=(), description=""))``. The spec's ``kind:`` field picks one (none: ``encoder-decoder``)."""
