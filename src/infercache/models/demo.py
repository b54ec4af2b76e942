"""The demo model: the user's MLP (Linear 784-256-128-10 with ReLU), with deterministic weights.

The tutorial builds ``nn.Sequential(Linear(784, 256), ReLU, Linear(256, 128), ReLU,
Linear(128, 10))`` with random weights. Here the weights come from a local ``torch.Generator``
seeded with ``seed`` (the global RNG is left alone), so every process, test and benchmark gets the
same weights, hence the same version digest and the same cache keys.

Load it with ``ModelRunner.load("infercache.models.demo:demo_mlp")`` or ``infercache serve``.
"""

from __future__ import annotations

import math
from typing import Any

from infercache.models.runners import ModelRunner
from infercache.models.spec import InputSpec

__all__ = ["INPUT_SPEC", "build_mlp", "demo_mlp"]

#: One MNIST-sized image, flattened.
INPUT_SPEC = InputSpec(shape=(784,), dtype="float32", max_batch=1024)


def build_mlp(seed: int = 0) -> Any:
    """The user's ``nn.Sequential`` MLP with weights drawn from a generator seeded with ``seed``."""
    import torch
    from torch import nn

    model = nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                bound = 1.0 / math.sqrt(layer.in_features)  # torch's default init range
                layer.weight.uniform_(-bound, bound, generator=gen)
                layer.bias.uniform_(-bound, bound, generator=gen)
    return model.eval()


def demo_mlp(*, seed: int = 0, name: str = "mlp", **runner_options: Any) -> ModelRunner:
    """The demo MLP as a ModelRunner named ``"mlp"`` with input spec float32 ``(784,)``.

    ``runner_options`` go to :class:`ModelRunner` (``device``, ``threads``, ``compile``,
    ``quantize``, ``freeze_gc``, ...).
    """
    runner_options.setdefault("input_spec", INPUT_SPEC)
    return ModelRunner(build_mlp(seed), name=name, **runner_options)
