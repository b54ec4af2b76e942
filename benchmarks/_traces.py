"""Synthetic request traces for the L1 hit-ratio benchmark (deterministic, seeded).

Each generator returns a numpy ``int64`` array of object ids, one per request. Ids are scattered
through a random permutation so that an id's value says nothing about its popularity (a policy
or a hash must not profit from "small id = popular").

- :func:`zipf`: independent requests, P(rank r) proportional to 1 / r**alpha.
- :func:`scan_polluted`: a Zipf trace where a share of the requests is replaced by bursts of
  one-time keys (a batch job, a crawler): LRU flushes its hot set, a frequency-aware policy not.
- :func:`drifting`: Zipf whose ranking slides over time: the hot set changes continuously, so a
  policy must forget old popularity (aging) as well as count.
"""

from __future__ import annotations

import numpy as np


def _zipf_ranks(rng: np.random.Generator, n_keys: int, n_req: int, alpha: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n_keys + 1, dtype=np.float64) ** alpha
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranks = np.searchsorted(cdf, rng.random(n_req), side="right")
    return np.minimum(ranks, n_keys - 1).astype(np.int64)


def zipf(n_keys: int, n_req: int, alpha: float, seed: int = 1) -> np.ndarray:
    """``n_req`` requests over ``n_keys`` keys with Zipf(alpha) popularity."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_keys).astype(np.int64)
    return perm[_zipf_ranks(rng, n_keys, n_req, alpha)]


def scan_polluted(
    n_keys: int,
    n_req: int,
    alpha: float = 0.9,
    scan_share: float = 0.2,
    scan_len: int | None = None,
    seed: int = 2,
) -> np.ndarray:
    """Zipf(alpha) with ``scan_share`` of the requests in bursts of never-repeated keys.

    Bursts are ``scan_len`` long (default: 2 % of ``n_keys``, twice a 1 % cache) and placed at
    random; scan ids start at ``n_keys`` so they never collide with the Zipf keys.
    """
    rng = np.random.default_rng(seed)
    trace = zipf(n_keys, n_req, alpha, seed=seed)
    scan_len = scan_len or max(1, n_keys // 50)
    n_bursts = max(1, int(n_req * scan_share) // scan_len)
    starts = np.sort(rng.choice(n_req // scan_len, size=n_bursts, replace=False)) * scan_len
    next_id = n_keys
    for start in starts:
        end = min(n_req, start + scan_len)
        trace[start:end] = np.arange(next_id, next_id + (end - start))
        next_id += end - start
    return trace


def drifting(
    n_keys: int, n_req: int, alpha: float = 0.9, drift: float = 0.2, seed: int = 3
) -> np.ndarray:
    """Zipf(alpha) whose ranking slides by ``drift * n_keys`` ranks over the trace.

    Request t maps rank r to key ``(r + offset(t)) mod n_keys`` with offset growing linearly from
    0 to ``drift * n_keys``: every ~``n_req / (drift * n_keys)`` requests the hottest key cools down
    by one rank and a colder one heats up.
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_keys).astype(np.int64)
    ranks = _zipf_ranks(rng, n_keys, n_req, alpha)
    offset = (np.arange(n_req, dtype=np.int64) * int(drift * n_keys)) // max(1, n_req)
    return perm[(ranks + offset) % n_keys]


def next_access(trace: np.ndarray) -> np.ndarray:
    """For each request, the index of the next request for the same id (or -1): Belady's oracle."""
    n = len(trace)
    order = np.lexsort((np.arange(n), trace))
    nxt = np.full(n, -1, dtype=np.int64)
    same = trace[order[1:]] == trace[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


TRACES = {
    "zipf0.7": lambda k, n: zipf(k, n, 0.7, seed=7),
    "zipf0.9": lambda k, n: zipf(k, n, 0.9, seed=9),
    "zipf1.1": lambda k, n: zipf(k, n, 1.1, seed=11),
    "scan20%": lambda k, n: scan_polluted(k, n, 0.9, 0.2),
    "drift": lambda k, n: drifting(k, n, 0.9, 0.2),
}
