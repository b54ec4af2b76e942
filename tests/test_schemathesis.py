"""Schemathesis against the real server's OpenAPI schema: no 500s, no hangs, JSON errors.

Positive (schema-conforming) and negative (schema-violating) cases for every operation. The
number of examples per operation and mode is bounded (and ``deadline=None``: timing is not the point
here) so that the whole module stays well under a minute on two cores. Every operation is called
without and with the admin token; no answer may be a 500 (503/504 are allowed: they are load
answers, not bugs), and every 4xx must be a JSON ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from infercache.bench.process import ServerProcess

ADMIN = "schema-admin-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("schema")
    with ServerProcess.infercache(
        "--admin-token", ADMIN, "--sql-url", "none", "--request-timeout", "5", cwd=workdir
    ) as proc:
        yield proc


def _json_errors(response: Any) -> None:
    if 400 <= response.status_code < 500:
        body = response.json()
        assert set(body) == {"error"}, body
        assert isinstance(body["error"]["code"], str) and body["error"]["code"]
        assert isinstance(body["error"]["message"], str)


def test_api_never_500s(server: ServerProcess) -> None:
    # Driven through Hypothesis directly: schemathesis' pytest plugin (from_fixture) does not
    # work with pytest 9 here.
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for operation, mode in itertools.product(operations, list(schemathesis.GenerationMode)):

        @settings(
            max_examples=15,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        @given(case=operation.as_strategy(mode))
        def check(case: Any) -> None:
            for headers in (None, {"Authorization": f"Bearer {ADMIN}"}):
                response = case.call(base_url=server.url, headers=headers, timeout=10)
                assert response.status_code < 500 or response.status_code in (503, 504), (
                    case.method,
                    case.formatted_path,
                    response.status_code,
                    response.text[:500],
                )
                ctype = response.headers.get("content-type") or ""
                if isinstance(ctype, list):  # schemathesis' Response: header -> list of values
                    ctype = ctype[0] if ctype else ""
                if ctype.startswith("application/json"):
                    _json_errors(response)

        try:
            check()
        except Unsatisfiable:
            # nothing to violate (no parameters and no body): negative mode has no cases
            assert mode == schemathesis.GenerationMode.NEGATIVE
