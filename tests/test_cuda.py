"""The CUDA paths: ModelRunner on a GPU, fingerprints of CUDA tensors, the Predictor over both.

Skipped where torch sees no GPU (CI has none). Run on a GPU machine with
``python -m pytest tests/test_cuda.py``; results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from infercache.keys import fingerprint  # noqa: E402
from infercache.models import ModelRunner  # noqa: E402
from infercache.models.demo import build_mlp, demo_mlp  # noqa: E402
from infercache.predictor import Predictor  # noqa: E402
from infercache.tiers.memory import MemoryCache  # noqa: E402

XS = np.random.default_rng(3).standard_normal((8, 784)).astype(np.float32)


def reference(xs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return build_mlp()(torch.from_numpy(xs)).numpy()  # on the CPU


def test_runner_picks_the_gpu_and_matches_the_cpu_outputs() -> None:
    r = demo_mlp(freeze_gc=False)  # device=None: CUDA when available
    assert r.device.startswith("cuda")
    out = r.predict_batch(XS)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and not out.flags.writeable
    np.testing.assert_allclose(out, reference(XS), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r.predict_single(XS[2]), reference(XS[2:3])[0], rtol=1e-4, atol=1e-5)
    assert r.version == demo_mlp(device="cpu", freeze_gc=False).version  # keys do not move


def test_onnx_stays_off_on_the_gpu_and_jit_runs_there() -> None:
    r = demo_mlp(onnx=True, jit=True, freeze_gc=False)
    assert r.describe()["onnx"] == "off: CPU only"
    assert r.describe()["jit"] == "on"
    np.testing.assert_allclose(r.predict_batch(XS), reference(XS), rtol=1e-4, atol=1e-5)


def test_cuda_tensors_fingerprint_like_their_cpu_copies() -> None:
    t = torch.from_numpy(XS[0])
    assert fingerprint(t.cuda()) == fingerprint(t) == fingerprint(XS[0])
    bf = t.to(torch.bfloat16)
    assert fingerprint(bf.cuda()) == fingerprint(bf)


def test_predictor_on_a_gpu_model_caches_and_batches() -> None:
    async def main() -> None:
        runner = ModelRunner(build_mlp(), name="mlp", device="cuda", example_input=XS[0])
        p = Predictor(runner, MemoryCache(100))
        first = await asyncio.gather(*(p.predict(x) for x in XS))
        again = await p.predict(XS[4])
        assert [f.cached for f in first] == [False] * 8 and again.cached
        np.testing.assert_allclose(
            np.stack([f.output for f in first]), reference(XS), rtol=1e-4, atol=1e-5
        )
        stats = p.stats()
        assert stats["batcher"]["batches"] < 8  # concurrent misses shared forwards
        await p.close()

    asyncio.run(main())
