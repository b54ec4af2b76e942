"""Value encoding: our msgpack codec vs pickle and json on typical prediction outputs.

Run: python benchmarks/bench_codec.py [--quick]
Encode + decode round trip per value, in µs, and payload sizes; pickle is what the seed stores in
Redis (unsafe to load), json is its other path (it cannot hold arrays without .tolist()).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import per_call_us, table
from infercache.codec import decode, encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    scale = 0.2 if args.quick else 1.0
    rng = np.random.default_rng(0)
    values = {
        "logits float32[10]": (rng.random(10, dtype=np.float32), 20000),
        "embedding float32[384]": (rng.random(384, dtype=np.float32), 20000),
        "image float32[3,224,224]": (rng.random((3, 224, 224), dtype=np.float32), 300),
    }
    rows = []
    for label, (arr, number) in values.items():
        n = max(20, int(number * scale))
        ours = per_call_us(lambda a=arr: decode(encode(a)), number=n)
        pkl = per_call_us(lambda a=arr: pickle.loads(pickle.dumps(a, protocol=5)), number=n)
        js = per_call_us(
            lambda a=arr: np.asarray(json.loads(json.dumps(a.tolist())), a.dtype),
            number=max(5, n // 10),
        )
        assert np.array_equal(decode(encode(arr)), arr)
        rows.append(
            [
                label,
                f"{ours:.2f}",
                f"{pkl:.2f} ({pkl / ours:.2f}x)",
                f"{js:.1f} ({js / ours:.1f}x)",
                f"{len(encode(arr))} / {len(pickle.dumps(arr, protocol=5))} / "
                f"{len(json.dumps(arr.tolist()))}",
            ]
        )
    header = [
        "value",
        "codec µs",
        "pickle µs (/ours)",
        "json µs (/ours)",
        "bytes codec/pickle/json",
    ]
    print(table(rows, header))


if __name__ == "__main__":
    main()
