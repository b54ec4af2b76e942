"""The user's serving design as a baseline: plain FastAPI, one forward pass per request.

This is the tutorial's ``OptimizedModelServer.predict_single`` behind a FastAPI route: stdlib
``json`` decoding (``await request.json()``), ``torch.tensor(list)``, one forward with batch size 1,
``.tolist()`` -- no cache, no batching. Two knobs turn it into the stronger baseline the issue's
targets compare against (the same server with orjson + numpy, and ``gc.freeze()`` after loading):

    SEED_JSON=orjson SEED_GC_FREEZE=1 uvicorn benchmarks.baselines.seed_fastapi:app

``POST /const`` reads the body and returns a constant: the HTTP floor of this stack.
The model is the project's demo MLP (same weights as ``infercache serve``), one torch thread.
"""

from __future__ import annotations

import gc
import json
import os
from typing import Any

import numpy as np
import orjson
import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response

torch.set_num_threads(1)

USE_ORJSON = os.environ.get("SEED_JSON", "stdlib") == "orjson"
GC_FREEZE = os.environ.get("SEED_GC_FREEZE", "0") == "1"


from infercache.models.demo import build_mlp  # noqa: E402 - the same weights as demo_mlp()

model = build_mlp(seed=0)
with torch.no_grad():  # the tutorial's warm-up: ten forwards
    for _ in range(10):
        model(torch.randn(1, 784))
if GC_FREEZE:
    gc.collect()
    gc.freeze()

app = FastAPI(title="seed baseline")
_CONST = b'{"output":[0.0],"cached":true}'


@app.post("/predict")
async def predict(request: Request) -> Any:
    """One forward pass per request, as in the tutorial."""
    if USE_ORJSON:
        data = orjson.loads(await request.body())
        x = torch.from_numpy(np.asarray(data["input"], dtype=np.float32)).unsqueeze(0)
        with torch.no_grad():
            out = model(x).numpy()[0]
        return Response(
            orjson.dumps({"output": out, "cached": False}, option=orjson.OPT_SERIALIZE_NUMPY),
            media_type="application/json",
        )
    data = json.loads(await request.body())
    x = torch.tensor(data["input"], dtype=torch.float32)
    if x.dim() == 1:
        x = x.unsqueeze(0)
    with torch.no_grad():
        prediction = model(x).cpu().numpy().tolist()
    return Response(
        json.dumps({"output": prediction[0], "cached": False}), media_type="application/json"
    )


@app.post("/const")
async def const(request: Request) -> Response:
    """The HTTP floor: read the body, return a constant."""
    await request.body()
    return Response(_CONST, media_type="application/json")
