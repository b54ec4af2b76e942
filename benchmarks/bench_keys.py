"""Key derivation: fingerprint() per algorithm vs the seed's md5(json.dumps) / md5(str(array)).

Run: python benchmarks/bench_keys.py [--quick]
Prints per-call cost in µs and the speed-up over the seed's derivation on the same input, all in one
run (ratios hold on a shared machine where absolute times drift).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import per_call_us, table
from infercache.keys import ALGORITHMS, fingerprint


def seed_key(data: object) -> str:
    """The seed's InMemoryCache._generate_key: json for lists/dicts, str() for anything else."""
    key_string = json.dumps(data, sort_keys=True) if isinstance(data, list | dict) else str(data)
    return hashlib.md5(key_string.encode()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    scale = 0.2 if args.quick else 1.0
    rng = np.random.default_rng(0)
    vec = rng.random(784, dtype=np.float32)
    inputs = {
        "list of 784 floats": ([float(v) for v in vec], 2000),
        "float32[784]": (vec, 20000),
        "float32[3,224,224]": (rng.random((3, 224, 224), dtype=np.float32), 300),
        "dict (text request)": ({"text": "hello world " * 8, "lang": "en", "top_k": 5}, 20000),
    }
    rows = []
    for label, (value, number) in inputs.items():
        n = max(20, int(number * scale))
        seed_us = per_call_us(lambda v=value: seed_key(v), number=max(10, n // 10))
        row = [label, f"{seed_us:.1f}"]
        for alg in ALGORITHMS:
            us = per_call_us(lambda v=value, a=alg: fingerprint(v, algorithm=a), number=n)
            row.append(f"{us:.2f} ({seed_us / us:.0f}x)")
        rows.append(row)
    header = ["input", "seed md5 µs", *[f"{a} µs (x seed)" for a in ALGORITHMS]]
    print(table(rows, header))
    print("\ndefault algorithm: blake3 (cryptographic); xxh3 only for trusted inputs")


if __name__ == "__main__":
    main()
