"""The request broker's bookkeeping, on real ZeroMQ sockets: credit, what each worker holds, and what happens to it
when the worker dies."""

from __future__ import annotations

import asyncio
import os
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

from modelship.serving.dispatch.broker import Broker, HungPolicy, _BrokerState
from modelship.serving.dispatch.transport import (
    ERROR,
    OK,
    Addresses,
    Client,
    Worker,
    decode_requests,
    encode_answers,
    encode_requests,
    identity,
    uids,
)
from modelship.serving.errors import RequestError


def sockets(ctx: zmq.Context, name: str) -> tuple[zmq.Socket, zmq.Socket, zmq.Socket, zmq.Socket]:
    """(the broker's ROUTER, a worker's DEALER, the broker's answer PUSH, the API server's answer PULL)."""
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"inproc://{name}-back")
    dealer = worker_socket(ctx, name, 1000)
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"inproc://{name}-answers")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"inproc://{name}-answers")
    return router, dealer, push, pull


def message(*ids: bytes) -> list[zmq.Frame]:
    """One API server's message holding a request per id, each one row of its id's last byte."""
    return [
        zmq.Frame(f) for f in encode_requests(0, "m/1", [(i, np.full((1, 2), float(i[-1]), np.float32)) for i in ids])
    ]


def worker_socket(ctx: zmq.Context, name: str, pid: int) -> zmq.Socket:
    """A worker incarnation's DEALER: worker 0, as the process `pid` would name itself."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, identity(0, pid))
    dealer.connect(f"inproc://{name}-back")
    return dealer


def incarnation(state: _BrokerState, name: str, pid: int) -> tuple[bytes, zmq.Socket]:
    """A new worker process at the broker: its identity (as its first ask showed it) and its DEALER."""
    dealer = worker_socket(zmq.Context.instance(), name, pid)
    dealer.send_multipart([b"ready", struct.pack("!I", 1), b""])
    assert state.back.poll(2000)
    who, *_ = state.back.recv_multipart()
    return who, dealer


def take(dealer: zmq.Socket) -> tuple[int, list[bytes]]:
    """What the broker sent a worker: (the message's sequence number, its requests' ids)."""
    seq, *frames = dealer.recv_multipart()
    return struct.unpack("!Q", seq)[0], [r.uid for r in decode_requests(frames)]


def received(dealer: zmq.Socket) -> list[bytes]:
    return take(dealer)[1]


def broker_with_worker(name: str) -> tuple[_BrokerState, bytes, zmq.Socket, zmq.Socket]:
    """(the broker's state, its worker's identity as the broker saw it in a ready message, the worker's DEALER, the
    API server's answer PULL)."""
    router, dealer, push, pull = sockets(zmq.Context.instance(), name)
    dealer.send_multipart([b"ready", struct.pack("!I", 2), b""])
    identity, *_ = router.recv_multipart()
    return _BrokerState(router, [push]), identity, dealer, pull


def answered(pull: zmq.Socket) -> list[tuple[bytes, int, Any]]:
    """(uid, status, error detail) of each request in the next answer message an API server gets."""
    assert pull.poll(2000)
    return [(uid, status, detail) for uid, status, _, detail in pickle.loads(pull.recv_multipart()[0])[0]]


def test_credit_holding_and_requeue_on_death() -> None:
    state, who, dealer, pull = broker_with_worker("a")
    state.waiting.extend(message(bytes([i])) for i in range(3))
    state.dispatch()
    assert state.credit == {} and len(state.waiting) == 3  # no credit yet: nothing sent
    state.ready(who, 2)
    state.dispatch()
    got = [r for _ in range(2) for r in decode_requests(dealer.recv_multipart()[1:])]
    assert [r.uid for r in got] == [b"\x00", b"\x01"] and got[1].x.tolist() == [[1.0, 1.0]]
    assert len(state.held[who]) == 2 and len(state.waiting) == 1 and state.credit[who] == 0
    state.dead(who)  # what it held goes back to the front, in order
    assert [uids(f)[0] for f in state.waiting] == [b"\x00", b"\x01", b"\x02"]
    state.ready(who, 3)  # the dead incarnation's late "ready" gives it nothing
    state.dispatch()
    assert not dealer.poll(100) and len(state.waiting) == 3
    second, replacement = incarnation(state, "a", 1001)
    state.ready(second, 3)
    state.dispatch()
    assert [received(replacement) for _ in range(3)] == [[b"\x00"], [b"\x01"], [b"\x02"]]
    state.dead(second)  # and it dies too: the two it held twice are answered 503, not retried again
    got = answered(pull) + answered(pull)
    assert sorted(uid for uid, *_ in got) == [b"\x00", b"\x01"]
    assert all(status == ERROR and detail[0] == 503 for _, status, detail in got)
    assert [uids(f) for f in state.waiting] == [[b"\x02"]]  # its first death: requeued
    assert state.attempts == {b"\x02": 1}


def test_a_ready_acknowledges_only_the_messages_it_names_never_one_sent_after_it() -> None:
    # the ordering that lost requests: the broker hands a worker message B in the moment after the worker sent the
    # "ready" that acknowledges A, and before that "ready" reached the broker; the worker then dies holding B
    state, who, dealer, _ = broker_with_worker("r")
    state.ready(who, 2)
    state.waiting.append(message(b"A"))
    state.dispatch()
    seq_a, ids = take(dealer)
    assert ids == [b"A"]
    state.waiting.append(message(b"B"))  # the worker has answered A and asked again; its ask is on the way
    state.dispatch()
    seq_b, ids = take(dealer)
    assert ids == [b"B"] and seq_b != seq_a
    state.ready(who, 2, (seq_a,))  # the ask arrives: it acknowledges A, and only A
    assert [uids(frames) for frames, _ in state.held[who].values()] == [[b"B"]]
    assert state.credit[who] == 1  # B is on its way to the worker: it uses up one of the two asked for
    state.dead(who)
    assert [uids(f) for f in state.waiting] == [[b"B"]]  # B goes to the next worker: nothing is lost


def test_a_replacement_that_asks_before_its_predecessors_death_is_reported_changes_nothing_of_it() -> None:
    state, first, dealer, _ = broker_with_worker("h")
    state.ready(first, 4)
    state.waiting.extend([message(b"old0"), message(b"old1")])
    state.dispatch()
    assert [received(dealer) for _ in range(2)] == [[b"old0"], [b"old1"]]  # it took them, and then died
    second, replacement = incarnation(state, "h", 1001)
    state.ready(second, 4)  # the new incarnation's first ask arrives before the old one's death
    state.waiting.append(message(b"new0"))
    state.dispatch()
    state.dead(first)
    assert [uids(f) for f in state.waiting] == [[b"old0"], [b"old1"]]  # the predecessor's, in order
    assert [uids(frames) for frames, _ in state.held[second].values()] == [[b"new0"]]  # the replacement's stays
    assert received(replacement) == [b"new0"]


def test_a_worker_holding_a_message_far_longer_than_recent_ones_took_is_hung() -> None:
    state, who, dealer, _ = broker_with_worker("g")
    state.policy = HungPolicy(floor=1.0, factor=10.0)
    state.ready(who, 8, now=0.0)
    for i in range(3):  # three messages that each take 0.2 s: the threshold is max(1.0, 10 x 0.2) = 2 s
        state.waiting.append(message(bytes([i])))
        state.dispatch(now=10.0 * i)
        seq, _ = take(dealer)
        state.ready(who, 8, (seq,), now=10.0 * i + 0.2)
    assert state.threshold() == pytest.approx(2.0)
    state.waiting.append(message(b"stuck"))
    state.dispatch(now=100.0)
    assert state.hung(101.9) == [] and state.hung(102.1) == [who]
    state.dead(who)  # the broker kills it and gives what it held to the next worker
    assert [uids(f) for f in state.waiting] == [[b"stuck"]] and state.attempts == {b"stuck": 1}
    assert state.hung(200.0) == []


def test_the_broker_loop_survives_an_error_keeps_what_it_held_and_beats_a_heartbeat(tmp_path: Path) -> None:
    addresses = Addresses.fresh(str(tmp_path), 1)
    broker = Broker(addresses)
    broken = {"times": 0}
    dispatch = _BrokerState.dispatch

    def dispatch_failing_once(self: _BrokerState, now: float | None = None) -> None:
        if self.waiting and broken["times"] == 0:
            broken["times"] += 1
            raise RuntimeError("a bug in the broker")
        dispatch(self, now)

    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.bind(addresses.answers[0])
    _BrokerState.dispatch = dispatch_failing_once  # type: ignore[method-assign]
    try:
        broker.start()
        assert time.monotonic() - broker.pulse[0] < 1.0
        push = ctx.socket(zmq.PUSH)
        push.connect(addresses.requests_in)
        push.send_multipart(message(b"kept"))
        worker = Worker(addresses, 0)
        batch = worker.next_batch(4, 0.0)
        assert [r.uid for r in batch] == [b"kept"] and broken["times"] == 1  # it failed, and carried on holding it
        deadline = time.monotonic() + 5
        while broker.pulse[1] != 1:  # the worker that asked counts as able to answer
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert time.monotonic() - broker.pulse[0] < 1.0
        worker.ctx.destroy(linger=0)
        push.close(linger=0)
    finally:
        _BrokerState.dispatch = dispatch  # type: ignore[method-assign]
        broker.stop()
    assert not broker._thread.is_alive()
    pull.close(linger=0)


def test_a_message_of_several_requests_is_handed_out_held_and_requeued_whole() -> None:
    state, who, dealer, pull = broker_with_worker("b")
    state.waiting.extend([message(b"a0", b"a1", b"a2"), message(b"b0")])
    state.ready(who, 2)
    state.dispatch()  # a message is not split: all three go, and the credit of two is spent
    got = decode_requests(dealer.recv_multipart()[1:])
    assert [(r.uid, r.x.tolist()) for r in got] == [(b"a0", [[48.0] * 2]), (b"a1", [[49.0] * 2]), (b"a2", [[50.0] * 2])]
    assert state.credit[who] == 0 and [uids(f) for f in state.waiting] == [[b"b0"]]
    state.dead(who)
    assert [uids(f) for f in state.waiting] == [[b"a0", b"a1", b"a2"], [b"b0"]]
    second, replacement = incarnation(state, "b", 1001)
    state.ready(second, 8)
    state.dispatch()
    assert [received(replacement) for _ in range(2)] == [[b"a0", b"a1", b"a2"], [b"b0"]]
    state.dead(second)  # the message's second death: each of its requests is answered 503
    assert [(uid, status, detail[0]) for uid, status, detail in answered(pull)] == [
        (b"a0", ERROR, 503), (b"a1", ERROR, 503), (b"a2", ERROR, 503)
    ]  # fmt: skip
    assert [uids(f) for f in state.waiting] == [[b"b0"]]


def test_a_request_is_not_handed_to_a_worker_already_gone_and_counts_no_attempt() -> None:
    state, who, dealer, _ = broker_with_worker("c")
    dealer.close(linger=0)  # the worker's process is gone; nobody has said so yet
    time.sleep(0.2)
    state.ready(who, 2)  # the credit it had asked for before it went
    state.waiting.append(message(b"r0"))
    state.dispatch()
    assert [uids(f) for f in state.waiting] == [[b"r0"]] and who not in state.credit
    assert state.held[who] == {} and state.attempts == {}
    state.dead(who)  # when its death is reported, nothing is counted against the request either
    assert [uids(f) for f in state.waiting] == [[b"r0"]] and state.attempts == {}


def test_a_worker_runs_a_message_larger_than_its_batch_in_batches_and_asks_again_only_after(tmp_path: Path) -> None:
    addresses = Addresses.fresh(str(tmp_path), 1)
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.bind(addresses.requests_out)
    worker = Worker(addresses, 0)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(worker.next_batch, 1, 0.0)
        assert router.poll(5000)
        who, ready, size, acks, status = router.recv_multipart()
        assert (who, ready, struct.unpack("!I", size), acks, status) == (identity(0, os.getpid()), b"ready", (1,), b"",
                                                                         b"")  # fmt: skip
        router.send_multipart([who, struct.pack("!Q", 7), *message(b"r0", b"r1", b"r2")])
        assert [r.uid for r in first.result(5)] == [b"r0"]
        assert [r.uid for r in worker.next_batch(1, 0.0)] == [b"r1"]
        assert [r.uid for r in worker.next_batch(1, 0.0)] == [b"r2"]
        assert not router.poll(200)  # it held the message until every request in it ran: no "ready" before
        pool.submit(worker.next_batch, 1, 0.0)
        assert router.poll(5000)
        _, ready, _, acks, _ = router.recv_multipart()
        assert ready == b"ready" and struct.unpack("!Q", acks) == (7,)  # it acknowledges the message it ran
        router.send_multipart([who, struct.pack("!Q", 8), *message(b"r3")])  # lets the waiting call return
    worker.ctx.destroy(linger=0)


def test_a_worker_says_what_it_holds_with_its_ask_and_again_when_that_changes_while_idle(tmp_path: Path) -> None:
    addresses = Addresses.fresh(str(tmp_path), 1)
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.bind(addresses.requests_out)
    news = [b'{"generation": 1}', None, None, b'{"generation": 2}']  # what refresh() finds, call after call

    def refresh() -> bytes | None:
        return news.pop(0) if news else None

    worker = Worker(addresses, 0, refresh)  # its first status, from start-up, goes with its first ask
    with ThreadPoolExecutor(1) as pool:
        pool.submit(worker.next_batch, 4, 0.0)
        assert router.poll(5000)
        who, _, _, acks, status = router.recv_multipart()
        assert (acks, status) == (b"", b'{"generation": 1}')
        assert router.poll(5000)  # idle, it loaded a version: the same ask again, with the news
        _, ready, size, acks, status = router.recv_multipart()
        assert (ready, struct.unpack("!I", size), acks, status) == (b"ready", (4,), b"", b'{"generation": 2}')
        router.send_multipart([who, struct.pack("!Q", 1), *message(b"r0")])  # lets the waiting call return
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
            call = asyncio.ensure_future(client.call("m/1", np.zeros((1, 2), np.float32), 5.0))
            [uid] = uids(await asyncio.to_thread(requests.recv_multipart, copy=False))
            answers.send_multipart(encode_answers([(uid, *answer(uid))]))
            return await call

        with pytest.raises(RequestError) as died:  # e.g. the broker's 503 after two deaths: no rows at all
            await ask_and_answer(lambda uid: (ERROR, (503, "two inference workers died on this request")))
        assert died.value.status == 503
        answers.send_multipart([b"not a pickled answer", b""])  # logged, and the reader carries on
        logits = await ask_and_answer(lambda uid: (OK, np.ones((1, 5), np.float32)))
        assert logits.tolist() == [[1.0] * 5]
        client.close()  # an API server's client lives as long as its process; this one ends here

    asyncio.run(scenario())


def test_readiness_needs_a_beating_broker_and_a_worker_that_can_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelship.serving.dispatch import broker

    pulse = [time.monotonic(), 1.0]
    monkeypatch.setattr(broker, "PULSE", pulse)
    assert broker.broker_ready()
    pulse[1] = 0.0  # every worker dead or not yet warm
    assert not broker.broker_ready()
    pulse[:] = [time.monotonic() - broker.PULSE_STALE - 0.1, 2.0]  # a broker that stopped beating: gone or stuck
    assert not broker.broker_ready()
