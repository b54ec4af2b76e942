"""infercache: a multi-level prediction cache and dynamic batching in front of any model.

The public names are imported lazily, so ``import infercache`` (and ``infercache --version``) stays
cheap and never drags in torch, redis or FastAPI unless the caller uses them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "fingerprint": "infercache.keys",
    "Codec": "infercache.codec",
    "MemoryCache": "infercache.tiers.memory",
    "RedisCache": "infercache.tiers.redis",
    "SQLCache": "infercache.tiers.sql",
    "MultiLevelCache": "infercache.multilevel",
    "DynamicBatcher": "infercache.batching",
    "ModelRunner": "infercache.models",
    "InputSpec": "infercache.models",
    "Predictor": "infercache.predictor",
    "Prediction": "infercache.predictor",
    "LatencyMonitor": "infercache.monitor",
    "StreamProcessor": "infercache.streaming",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from infercache.batching import DynamicBatcher
    from infercache.codec import Codec
    from infercache.keys import fingerprint
    from infercache.models import InputSpec, ModelRunner
    from infercache.monitor import LatencyMonitor
    from infercache.multilevel import MultiLevelCache
    from infercache.predictor import Prediction, Predictor
    from infercache.streaming import StreamProcessor
    from infercache.tiers.memory import MemoryCache
    from infercache.tiers.redis import RedisCache
    from infercache.tiers.sql import SQLCache


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'infercache' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
