"""The in-process runner (--in-process) on its own: batches, answers, failures, timeouts, a model that fails to load."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from modelship.serving.dispatch.in_process import Runner
from modelship.serving.dispatch.transport import Request
from modelship.serving.errors import RequestError


class Model:
    """Doubles its input; records each batch's row count. `gate` holds setup until a test opens it."""

    def __init__(self, fail_setup: bool = False, fail_run: bool = False):
        self.gate = threading.Event()
        self.batches: list[list[int]] = []
        self.loaded: list[bool] = []
        self.fail_setup, self.fail_run = fail_setup, fail_run

    def setup(self) -> None:
        self.gate.wait(10)
        if self.fail_setup:
            raise RuntimeError("cannot read model.onnx")

    def run(self, requests: list[Request]) -> list[np.ndarray]:
        self.batches.append([len(r.x) for r in requests])
        if self.fail_run:
            raise RuntimeError("out of memory")
        return [r.x * 2 for r in requests]

    def runner(self, max_batch: int = 32, window: float = 0.0) -> Runner:
        r = Runner(self.setup, self.run, (max_batch, window, 30.0), self.loaded.append)
        r.start()
        return r


def rows(*values: float) -> np.ndarray:
    return np.array(values, np.float32).reshape(-1, 1)


def test_waiting_requests_run_in_batches_of_at_most_max_batch_each_answered_with_its_own_rows() -> None:
    model = Model()

    async def main() -> list[np.ndarray]:
        runner = model.runner(max_batch=2)
        calls = [asyncio.ensure_future(runner.call("m/1", rows(i, i + 0.5), 5)) for i in range(5)]
        await asyncio.sleep(0.05)  # all five queued while the model loads
        model.gate.set()
        return await asyncio.gather(*calls)

    answers = asyncio.run(main())
    assert model.loaded == [True]
    assert model.batches == [[2, 2], [2, 2], [2]]
    for i, answer in enumerate(answers):
        np.testing.assert_array_equal(answer, rows(i, i + 0.5) * 2)


def test_the_batch_window_gathers_a_request_that_arrives_within_it() -> None:
    model = Model()
    model.gate.set()

    async def main() -> None:
        runner = model.runner(max_batch=4, window=0.5)
        first = asyncio.ensure_future(runner.call("m/1", rows(1), 5))
        await asyncio.sleep(0.1)
        await asyncio.gather(first, runner.call("m/1", rows(2), 5))

    asyncio.run(main())
    assert model.batches == [[1, 1]]


def test_a_failing_forward_pass_fails_its_batch_with_500_and_the_next_batch_runs() -> None:
    model = Model(fail_run=True)
    model.gate.set()

    async def main() -> np.ndarray:
        runner = model.runner()
        with pytest.raises(RequestError) as e:
            await runner.call("m/1", rows(1), 5)
        assert (e.value.status, e.value.message) == (500, "inference failed: RuntimeError")
        model.fail_run = False
        return await runner.call("m/1", rows(3), 5)

    np.testing.assert_array_equal(asyncio.run(main()), rows(6))


def test_a_request_whose_caller_timed_out_is_not_run() -> None:
    model = Model()

    async def main() -> None:
        runner = model.runner()
        with pytest.raises(TimeoutError):
            await runner.call("m/1", rows(1), 0.05)  # the model is still loading
        model.gate.set()
        np.testing.assert_array_equal(await runner.call("m/1", rows(2), 5), rows(4))

    asyncio.run(main())
    assert model.batches == [[1]]  # only the second request ran


def test_a_model_that_fails_to_load_answers_503_to_the_waiting_and_to_later_requests() -> None:
    model = Model(fail_setup=True)

    async def main() -> list[BaseException]:
        runner = model.runner()
        waiting = asyncio.ensure_future(runner.call("m/1", rows(1), 5))
        await asyncio.sleep(0.05)
        model.gate.set()
        errors = await asyncio.gather(waiting, return_exceptions=True)
        with pytest.raises(RequestError) as later:
            await runner.call("m/1", rows(2), 5)
        return [*errors, later.value]

    errors = asyncio.run(main())
    assert model.loaded == [False] and model.batches == []
    assert [(e.status, e.message) for e in errors if isinstance(e, RequestError)] == [
        (503, "the model failed to load; the server is shutting down")
    ] * 2
