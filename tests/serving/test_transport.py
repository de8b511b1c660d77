"""The request broker's bookkeeping, on real ZeroMQ sockets: credit, what each worker holds, and what happens to it
when the worker dies."""

from __future__ import annotations

import asyncio
import pickle
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from modelship.serving.transport import (
    ERROR,
    OK,
    Addresses,
    Client,
    Worker,
    WorkerError,
    _BrokerState,
    decode_requests,
    encode_answers,
    encode_requests,
    identity,
    uids,
)


def sockets(ctx: zmq.Context, name: str) -> tuple[zmq.Socket, zmq.Socket, zmq.Socket, zmq.Socket]:
    """(the broker's ROUTER, a worker's DEALER, the broker's answer PUSH, the API server's answer PULL)."""
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"inproc://{name}-back")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"worker-0")
    dealer.connect(f"inproc://{name}-back")
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"inproc://{name}-answers")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"inproc://{name}-answers")
    return router, dealer, push, pull


def message(*ids: bytes) -> list[zmq.Frame]:
    """One API server's message holding a request per id, each one row of its id's last byte."""
    return [zmq.Frame(f) for f in encode_requests(0, [(i, np.full((1, 2), float(i[-1]), np.float32)) for i in ids])]


def received(dealer: zmq.Socket) -> list[bytes]:
    return [r.uid for r in decode_requests(dealer.recv_multipart())]


def broker_with_worker(name: str) -> tuple[_BrokerState, bytes, zmq.Socket, zmq.Socket]:
    """(the broker's state, its worker's identity as the broker saw it in a ready message, the worker's DEALER, the
    API server's answer PULL)."""
    router, dealer, push, pull = sockets(zmq.Context.instance(), name)
    dealer.send_multipart([b"ready", struct.pack("!I", 2)])
    identity, *_ = router.recv_multipart()
    return _BrokerState(router, [push]), identity, dealer, pull


def test_credit_holding_and_requeue_on_death() -> None:
    state, identity, dealer, pull = broker_with_worker("a")
    state.waiting.extend(message(bytes([i])) for i in range(3))
    state.dispatch()
    assert state.credit == {} and len(state.waiting) == 3  # no credit yet: nothing sent
    state.ready(identity, 2)
    state.dispatch()
    got = [r for _ in range(2) for r in decode_requests(dealer.recv_multipart())]
    assert [r.uid for r in got] == [b"\x00", b"\x01"] and got[1].x.tolist() == [[1.0, 1.0]]
    assert len(state.held[identity]) == 2 and len(state.waiting) == 1 and state.credit[identity] == 0
    state.dead(identity)  # what it held goes back to the front, in order
    assert [uids(f)[0] for f in state.waiting] == [b"\x00", b"\x01", b"\x02"]
    state.ready(identity, 3)  # a replacement with the same identity
    state.dispatch()
    assert [received(dealer) for _ in range(3)] == [[b"\x00"], [b"\x01"], [b"\x02"]]
    state.dead(identity)  # and it dies too: the two it held twice are answered 503, not retried again
    assert pull.poll(2000)
    answered = [pickle.loads(pull.recv_multipart()[0])[0][0] for _ in range(2)]
    assert sorted(uid for uid, *_ in answered) == [b"\x00", b"\x01"]
    assert all(status == ERROR and detail[0] == 503 for _, status, _, detail in answered)
    assert [uids(f) for f in state.waiting] == [[b"\x02"]]  # its first death: requeued
    assert state.attempts == {b"\x02": 1}


def test_a_message_of_several_requests_is_handed_out_held_and_requeued_whole() -> None:
    state, identity, dealer, pull = broker_with_worker("b")
    state.waiting.extend([message(b"a0", b"a1", b"a2"), message(b"b0")])
    state.ready(identity, 2)
    state.dispatch()  # a message is not split: all three go, and the credit of two is spent
    got = decode_requests(dealer.recv_multipart())
    assert [(r.uid, r.x.tolist()) for r in got] == [(b"a0", [[48.0] * 2]), (b"a1", [[49.0] * 2]), (b"a2", [[50.0] * 2])]
    assert state.credit[identity] == 0 and [uids(f) for f in state.waiting] == [[b"b0"]]
    state.dead(identity)
    assert [uids(f) for f in state.waiting] == [[b"a0", b"a1", b"a2"], [b"b0"]]
    state.ready(identity, 8)
    state.dispatch()
    assert [received(dealer) for _ in range(2)] == [[b"a0", b"a1", b"a2"], [b"b0"]]
    state.dead(identity)  # the message's second death: each of its requests is answered 503
    assert pull.poll(2000)
    meta = pickle.loads(pull.recv_multipart()[0])[0]
    assert [(uid, status, detail[0]) for uid, status, _, detail in meta] == [(b"a0", ERROR, 503), (b"a1", ERROR, 503),
                                                                            (b"a2", ERROR, 503)]  # fmt: skip
    assert [uids(f) for f in state.waiting] == [[b"b0"]]


def test_a_request_is_not_handed_to_a_worker_already_gone_and_counts_no_attempt() -> None:
    state, identity, dealer, _ = broker_with_worker("c")
    dealer.close(linger=0)  # the worker's process is gone; nobody has said so yet
    time.sleep(0.2)
    state.ready(identity, 2)  # the credit it had asked for before it went
    state.waiting.append(message(b"r0"))
    state.dispatch()
    assert [uids(f) for f in state.waiting] == [[b"r0"]] and identity not in state.credit
    assert state.held[identity] == [] and state.attempts == {}
    state.dead(identity)  # when the monitor reports it, nothing is counted against the request either
    assert [uids(f) for f in state.waiting] == [[b"r0"]] and state.attempts == {}


def test_a_worker_runs_a_message_larger_than_its_batch_in_batches_and_asks_again_only_after(tmp_path: Path) -> None:
    addresses = Addresses.fresh(str(tmp_path), 1)
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.bind(addresses.requests_out)
    worker = Worker(addresses, 0)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(worker.next_batch, 1, 0.0)
        assert router.poll(5000)
        who, ready, size = router.recv_multipart()
        assert (who, ready, struct.unpack("!I", size)) == (identity(0), b"ready", (1,))
        router.send_multipart([who, *message(b"r0", b"r1", b"r2")])
        assert [r.uid for r in first.result(5)] == [b"r0"]
        assert [r.uid for r in worker.next_batch(1, 0.0)] == [b"r1"]
        assert [r.uid for r in worker.next_batch(1, 0.0)] == [b"r2"]
        assert not router.poll(200)  # it held the message until every request in it ran: no "ready" before
        pool.submit(worker.next_batch, 1, 0.0)
        assert router.poll(5000) and router.recv_multipart()[1] == b"ready"
        router.send_multipart([who, *message(b"r3")])  # lets the waiting call return
    worker.ctx.destroy(linger=0)


def test_answers_carry_rows_and_errors_in_order() -> None:
    frames = encode_answers([(b"a", OK, np.ones((2, 3), np.float32)), (b"b", ERROR, (504, "late")),
                             (b"c", OK, np.zeros((1, 3), np.float32))])  # fmt: skip
    meta, row_shape, dtype = pickle.loads(frames[0])
    assert meta == [(b"a", OK, 2, None), (b"b", ERROR, 0, (504, "late")), (b"c", OK, 1, None)]
    body = np.frombuffer(bytes(frames[1]), dtype=dtype).reshape(-1, *row_shape)
    assert body.tolist() == [[1.0] * 3, [1.0] * 3, [0.0] * 3]


def test_an_api_server_keeps_reading_answers_after_an_error_only_message_and_a_malformed_one(tmp_path: Path) -> None:
    addresses = Addresses.fresh(str(tmp_path), 1)
    ctx = zmq.Context.instance()
    requests = ctx.socket(zmq.PULL)  # stands in for the broker: sees each request, answers as a worker would
    requests.bind(addresses.requests_in)

    async def scenario() -> None:
        client = Client(addresses, 0)
        answers = ctx.socket(zmq.PUSH)
        answers.connect(addresses.answers[0])

        async def ask_and_answer(answer: Callable[[bytes], tuple[int, Any]]) -> np.ndarray:
            call = asyncio.ensure_future(client.call(np.zeros((1, 2), np.float32), 5.0))
            [uid] = uids(await asyncio.to_thread(requests.recv_multipart, copy=False))
            answers.send_multipart(encode_answers([(uid, *answer(uid))]))
            return await call

        with pytest.raises(WorkerError) as died:  # e.g. the broker's 503 after two deaths: no rows at all
            await ask_and_answer(lambda uid: (ERROR, (503, "two inference workers died on this request")))
        assert died.value.status == 503
        answers.send_multipart([b"not a pickled answer", b""])  # logged, and the reader carries on
        logits = await ask_and_answer(lambda uid: (OK, np.ones((1, 5), np.float32)))
        assert logits.tolist() == [[1.0] * 5]
        client.close()  # an API server's client lives as long as its process; this one ends here

    asyncio.run(scenario())
