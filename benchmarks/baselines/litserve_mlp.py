"""LitServe serving the same demo MLP with its dynamic batching, for the server benchmark.

Run: ``python benchmarks/baselines/litserve_mlp.py PORT``. POST /predict with {"input": [...]};
GET /health. One worker, one torch thread, max_batch_size 32, a 5 ms batch window (LitServe's
batching waits up to ``batch_timeout`` to fill a batch).
"""

# No ``from __future__ import annotations``: LitServe builds its endpoint from the runtime
# annotation of ``decode_request``; a string annotation turns the body into a query parameter.
import sys
from typing import Any

import litserve as ls
import numpy as np
import torch

torch.set_num_threads(1)


class MLPAPI(ls.LitAPI):  # type: ignore[misc]
    def setup(self, device: str) -> None:
        from infercache.models.demo import build_mlp  # the same weights as demo_mlp()

        self.model = build_mlp(seed=0)

    def decode_request(self, request: dict[str, Any]) -> Any:
        return request["input"]

    def batch(self, inputs: list[Any]) -> torch.Tensor:
        return torch.from_numpy(np.asarray(inputs, dtype=np.float32))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)

    def unbatch(self, output: torch.Tensor) -> list[Any]:
        return list(output.numpy())

    def encode_response(self, output: Any) -> dict[str, Any]:
        return {"output": output.tolist()}


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    api = MLPAPI(max_batch_size=32, batch_timeout=0.005)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)
