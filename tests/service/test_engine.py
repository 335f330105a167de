"""The engine: batching of tiles across requests, overload, deadlines and device OOM."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.engine import Engine, _Job, is_out_of_memory
from service.errors import DeadlineExceededError
from service.settings import Settings
from tests.service.helpers import encode, png_mask, scene

IMAGE = encode(scene(40, 40, seed=9))


def _post(client: TestClient, data: bytes = IMAGE):
    return client.post("/segment", files={"image": ("x.png", data)})


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


class Gate:
    """Wraps ``Predictor.run_batch``: records batch sizes; the first ``hold`` calls wait
    until ``open()``."""

    def __init__(self, engine: Engine, hold: int = 1) -> None:
        self.real = engine.predictor.run_batch
        self.sizes: list[int] = []
        self.entered = threading.Event()
        self._open = threading.Event()
        self._hold = hold

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.sizes.append(batch.shape[0])
        if len(self.sizes) <= self._hold:
            self.entered.set()
            assert self._open.wait(60)
        return self.real(batch)

    def open(self) -> None:
        self._open.set()

    def arm(self) -> None:
        """Hold the next forward pass again and forget what was recorded."""
        self.sizes.clear()
        self.entered.clear()
        self._open.clear()


@pytest.fixture
def gated(app_factory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., tuple]]:
    """``gated(**settings)`` -> (client, engine, gate) with the first forward pass held."""
    with ExitStack() as stack:

        def make(**settings) -> tuple[TestClient, Engine, Gate]:
            client = stack.enter_context(app_factory(**settings))
            engine = client.app.state.engine
            gate = Gate(engine)
            stack.callback(gate.open)  # never leave the batcher waiting at teardown
            monkeypatch.setattr(engine.predictor, "run_batch", gate)
            return client, engine, gate

        yield make


# ----- batching --------------------------------------------------------------------------------


def _job(n: int, size: int = 32, deadline: float | None = None) -> _Job:
    tiles = torch.zeros((n, 3, size, size), dtype=torch.uint8)
    return _Job(tiles, deadline if deadline is not None else time.monotonic() + 60)


@pytest.fixture
def idle_engine(service_settings: Settings) -> Iterator[Engine]:
    engine = Engine(service_settings.model_copy(update={"batch_timeout_ms": 0.0}))
    yield engine
    engine.stop()


def test_jobs_of_equal_shape_share_a_batch_and_others_wait(idle_engine: Engine) -> None:
    a1, b, a2, a3 = _job(1), _job(1, size=64), _job(1), _job(1)
    for job in (a1, b, a2, a3):
        idle_engine._queue.put(job)

    assert idle_engine._collect() == [a1, a2, a3]
    assert idle_engine._collect() == [b]
    assert idle_engine._collect() == []


def test_a_batch_stops_at_batch_max_tiles(idle_engine: Engine) -> None:
    jobs = [_job(2), _job(2), _job(2)]  # batch_max_tiles is 4
    for job in jobs:
        idle_engine._queue.put(job)

    assert idle_engine._collect() == jobs[:2]
    assert idle_engine._collect() == jobs[2:]


def test_given_up_and_expired_jobs_are_never_computed(idle_engine: Engine) -> None:
    cancelled, expired, live = _job(1), _job(1, deadline=time.monotonic() - 1), _job(1)
    cancelled.future.cancel()
    for job in (cancelled, expired, live):
        idle_engine._queue.put(job)

    assert idle_engine._collect() == [live]
    with pytest.raises(DeadlineExceededError):
        expired.future.result(timeout=0)


def test_concurrent_requests_share_one_forward_pass(gated) -> None:
    client, engine, gate = gated(batch_max_tiles=4)
    gate.open()
    expected = png_mask(_post(client).content)
    gate.arm()
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(_post, client)
        assert gate.entered.wait(30)  # the batcher is busy with the first request
        others = [pool.submit(_post, client) for _ in range(3)]
        _wait_for(lambda: engine._queue.qsize() == 3, "three queued requests")
        gate.open()
        answers = [first.result(60)] + [f.result(60) for f in others]

    assert gate.sizes == [1, 3]  # three requests, one forward pass
    for answer in answers:
        np.testing.assert_array_equal(png_mask(answer.content), expected)


def test_concurrent_requests_with_different_images_each_get_their_own_mask(gated) -> None:
    # Images of different sizes whose tiles share one shape (the small ones pad up to 64 px,
    # the large one is cut into 64 px tiles), so the batcher can put them in one forward pass.
    client, engine, gate = gated(batch_max_tiles=8)
    images = {
        "held": scene(48, 48, seed=20),
        "square": scene(40, 40, seed=21),
        "wide": scene(35, 60, seed=22),
        "tiled": scene(100, 90, seed=23),  # four tiles in one job
    }
    gate.open()
    expected = {}
    for name, image in images.items():
        expected[name] = png_mask(_post(client, encode(image)).content)
        assert expected[name].shape == image.shape[:2]
        assert len(np.unique(expected[name])) > 1, f"{name}: a constant mask compares nothing"
    gate.arm()
    with ThreadPoolExecutor(4) as pool:
        held = pool.submit(_post, client, encode(images["held"]))
        assert gate.entered.wait(30)  # the batcher is busy with the first request
        others = {n: pool.submit(_post, client, encode(images[n])) for n in list(images)[1:]}
        _wait_for(lambda: engine._queue.qsize() == 3, "three queued requests")
        gate.open()
        answers = {"held": held.result(60)} | {n: f.result(60) for n, f in others.items()}

    assert gate.sizes == [1, 1 + 1 + 4]  # the three waiting requests shared one forward pass
    for name, answer in answers.items():
        assert answer.status_code == 200, answer.text
        np.testing.assert_array_equal(png_mask(answer.content), expected[name], err_msg=name)


# ----- overload and deadlines ------------------------------------------------------------------


def test_a_full_queue_is_503_with_retry_after_and_the_service_recovers(gated) -> None:
    client, engine, gate = gated(max_queue=1, retry_after_s=3)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_post, client)
        assert gate.entered.wait(30)

        try:
            second = pool.submit(_post, client)
            # Refused at once, or admitted (counted in flight) to wait behind the held batch.
            _wait_for(lambda: second.done() or engine.in_flight > 1, "the second request")
            refused_at_once = second.done()
            healthy = client.get("/healthz").status_code
            ready = client.get("/readyz").json()
        finally:
            gate.open()  # never leave the first request waiting, whatever failed above
        assert first.result(60).status_code == 200
        refused = second.result(60)

    assert refused_at_once, "the second request was admitted past max_queue"
    assert healthy == 200
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "overloaded"
    assert refused.headers["retry-after"] == "3"
    assert ready["queue"] == {"in_flight": 1, "capacity": 1}
    assert _post(client).status_code == 200
    assert engine.in_flight == 0


def test_a_request_past_its_deadline_is_504_and_its_tiles_are_dropped(gated) -> None:
    client, engine, gate = gated(request_timeout_s=0.5)
    with ThreadPoolExecutor(2) as pool:
        stuck = pool.submit(_post, client)
        assert gate.entered.wait(30)
        queued = pool.submit(_post, client)
        late, waiting = stuck.result(60), queued.result(60)

    for response in (late, waiting):
        assert response.status_code == 504
        error = response.json()["error"]
        assert error["code"] == "timeout"
        assert "SATSEG_REQUEST_TIMEOUT_S" in error["message"]
    gate.open()
    assert _post(client).status_code == 200
    # The held batch, then the new request: the queued request's tile never ran.
    assert gate.sizes == [1, 1]


# ----- device out of memory --------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: out of memory"),
    ],
    ids=["cuda-oom", "allocator-runtime-error"],
)
def test_out_of_memory_in_the_forward_pass_is_503_then_the_next_request_works(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    predictor = client.app.state.engine.predictor
    real_forward = predictor.forward
    calls = []

    def forward_once_oom(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 1:
            raise error
        return real_forward(x)

    emptied = []
    monkeypatch.setattr(predictor, "forward", forward_once_oom)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))

    refused = _post(client)
    after = _post(client)

    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "out_of_memory"
    assert "retry-after" in refused.headers
    assert emptied == [1]
    assert after.status_code == 200


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: out of memory"),
    ],
    ids=["cuda-oom", "allocator-runtime-error"],
)
def test_out_of_memory_in_the_tiled_path_is_503_then_the_next_request_works(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    # The request thread's own allocations (the image on the device, the blend accumulator of
    # a large scene, the tile stack) fail there, not in the batcher: here the tiled path's
    # model call raises it on the first tile batch.
    engine = client.app.state.engine
    real_submit = engine._submit
    calls = []

    def submit_once_oom(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 1:
            raise error
        return real_submit(*args, **kwargs)

    emptied = []
    monkeypatch.setattr(engine, "_submit", submit_once_oom)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    large = encode(scene(100, 90, seed=5))  # more than one tile: the tiled, blended path

    refused = client.post("/segment", files={"image": ("large.png", large)})
    after = client.post("/segment", files={"image": ("large.png", large)})

    assert refused.status_code == 503
    assert refused.headers["content-type"] == "application/json"
    assert refused.json()["error"]["code"] == "out_of_memory"
    assert "smaller image" in refused.json()["error"]["message"]
    assert "retry-after" in refused.headers
    assert emptied == [1]
    assert after.status_code == 200
    assert png_mask(after.content).shape == (100, 90)


def test_another_forward_failure_is_a_500_and_the_batcher_survives(
    app_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    with app_factory(client_kw={"raise_server_exceptions": False}) as client:
        predictor = client.app.state.engine.predictor
        real_forward = predictor.forward
        calls = []

        def forward(x: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            if len(calls) == 1:
                raise ValueError("broken kernel")
            return real_forward(x)

        monkeypatch.setattr(predictor, "forward", forward)
        failed, after = _post(client), _post(client)

    assert failed.status_code == 500
    assert failed.json() == {
        "error": {"code": "internal_error", "message": "The server failed to handle this request."}
    }
    assert after.status_code == 200


def test_out_of_memory_is_recognised_by_type_or_message() -> None:
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 20 MiB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))
