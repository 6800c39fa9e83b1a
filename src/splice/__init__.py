"""splice: compose any vision encoder with any text decoder."""

from __future__ import annotations

import pluggy

hookimpl = pluggy.HookimplMarker("splice")

from splice.core.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    IncompatibleComponentsError,
    InputError,
    PluginError,
    Problem,
    SpliceError,
    UnknownComponentError,
)
from splice.core.interfaces import (  # noqa: E402
    DecoderOutput,
    EncoderOutput,
    HFInterop,
    LayerSpec,
    Preprocessing,
)

__version__ = "0.1.0"
