"""Model runtime: :class:`ModelRunner` (torch, TorchScript, ONNX Runtime, callables) and
:class:`InputSpec`. The bundled models live in :mod:`infercache.models.demo` (the user's MLP) and
:mod:`infercache.models.minilm` (sentence embeddings, optional extra); they are imported on use so
that ``import infercache.models`` does not load torch."""

from __future__ import annotations

from infercache.models.runners import ModelRunner, freeze_gc
from infercache.models.spec import InputSpec

__all__ = ["InputSpec", "ModelRunner", "freeze_gc"]
