"""Schemathesis against the real server's OpenAPI schema: no 500s, no hangs, JSON errors.

The number of examples per operation is bounded (and ``deadline=None``: timing is not the point
here) so that the whole module stays well under a minute on two cores. Every operation is called
without and with the admin token; no answer may be a 500 (503/504 are allowed: they are load
answers, not bugs), and every 4xx must be a JSON ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from infercache.bench.process import ServerProcess

ADMIN = "schema-admin-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("schema")
    with ServerProcess.infercache(
        "--admin-token", ADMIN, "--sql-url", "none", "--request-timeout", "5", cwd=workdir
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def api_schema(server: ServerProcess) -> Any:
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


def _json_errors(response: Any) -> None:
    if 400 <= response.status_code < 500:
        body = response.json()
        assert set(body) == {"error"}, body
        assert isinstance(body["error"]["code"], str) and body["error"]["code"]
        assert isinstance(body["error"]["message"], str)


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_never_500s(case: Any, server: ServerProcess) -> None:
    for headers in (None, {"Authorization": f"Bearer {ADMIN}"}):
        response = case.call(base_url=server.url, headers=headers, timeout=10)
        assert response.status_code < 500 or response.status_code in (503, 504), (
            case.method,
            case.formatted_path,
            response.status_code,
            response.text[:500],
        )
        if response.headers.get("content-type", "").startswith("application/json"):
            _json_errors(response)
