"""One real Encore server on loopback, shared by the e2e tests (see e2e_server.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.e2e_server import API_KEY, Server, start_server, stop_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("encore-e2e"))
    yield srv
    stop_server(srv)


@pytest.fixture()
def client(server: Server):
    import openai

    return openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture()
def model(client) -> str:
    return client.models.list().data[0].id
