"""The user's serving design for the MiniLM model: FastAPI, one forward pass per request.

The same shape as ``seed_fastapi.py`` with ``SEED_JSON=orjson SEED_GC_FREEZE=1`` (the issue's
stronger baseline), serving all-MiniLM-L6-v2 (text in, 384 floats out) from the same bundled
weights as ``infercache serve --model minilm=infercache.models.minilm:minilm``. Each request is
encoded alone (batch of one), on the event loop, with one torch thread.

    uvicorn benchmarks.baselines.seed_minilm:app
"""

from __future__ import annotations

import gc
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from infercache.models.minilm import minilm

runner = minilm(threads=1, warmup=True, freeze_gc=False)
gc.collect()
gc.freeze()

app = FastAPI(title="seed MiniLM baseline")


@app.post("/predict")
async def predict(request: Request) -> Any:
    """One forward pass per request."""
    data = orjson.loads(await request.body())
    out = runner.predict_single(data["input"])
    return Response(
        orjson.dumps({"output": out, "cached": False}, option=orjson.OPT_SERIALIZE_NUMPY),
        media_type="application/json",
    )
