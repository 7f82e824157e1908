"""An idle engine's wait for a batch: for requests on their way (``Engine.arriving``) only,
once the request path counts them; all of ``batch_wait_ms`` for direct callers."""

from __future__ import annotations

import time

import pytest
from hotmerge.generation import GenerationRequest, SamplingParams

from tests.helpers import make_engine, tiny_llama

LONG_WAIT_MS = 60_000  # far beyond any test's deadline: a wait that does not end early fails


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(tiny_llama(tmp_path), tmp_path / "adapters", batch_wait_ms=LONG_WAIT_MS)
    yield engine
    engine.stop()


def request(text: str) -> GenerationRequest:
    return GenerationRequest(text, SamplingParams(max_new_tokens=3))


def test_a_lone_request_is_not_held_back(engine):
    with engine.arriving():
        handle = engine.submit(request("alone"), deadline=time.monotonic() + 20)
    assert handle.wait().generated_tokens == 3  # DeadlineExceeded if the engine waited on
    assert engine.arrivals.on_the_way == 0


def test_requests_on_their_way_go_in_one_step(engine):
    with engine.arriving():  # the second request, on its way while the first is queued
        with engine.arriving():
            first = engine.submit(request("first"), deadline=time.monotonic() + 20)
        time.sleep(0.3)
        assert sum(engine.stats.prefill_batch_sizes.values()) == 0  # the engine still waits
        second = engine.submit(request("second"), deadline=time.monotonic() + 20)
    first.wait(), second.wait()
    assert engine.stats.prefill_batch_sizes == {2: 1}


def test_a_refused_request_is_no_longer_on_its_way(engine):
    with pytest.raises(RuntimeError), engine.arriving():
        raise RuntimeError("refused on the request path")
    assert engine.arrivals.on_the_way == 0
    handle = engine.submit(request("after"), deadline=time.monotonic() + 20)
    assert handle.wait().generated_tokens == 3


def test_the_request_path_counts_its_requests(tmp_path):
    """Through the server (gRPC, then the request path): a lone request is not held back."""
    from hotmerge.client import HotmergeClient
    from hotmerge.server import start_server

    from tests.helpers import tiny_server_config

    (tmp_path / "adapters").mkdir()
    config = tiny_server_config(
        tmp_path, tiny_llama(tmp_path), tmp_path / "adapters", batch_wait_ms=LONG_WAIT_MS
    )
    server = start_server(config)
    try:
        with HotmergeClient(server.target, timeout=20) as client:  # DEADLINE_EXCEEDED if held
            reply = client.generate("alone", max_new_tokens=3)
        assert reply.generated_tokens == 3
        assert server.engine.arrivals.counted and server.engine.arrivals.on_the_way == 0
    finally:
        server.stop(0)
