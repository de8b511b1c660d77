"""The request broker's bookkeeping, on real ZeroMQ sockets: credit, what each worker holds, and what happens to it
when the worker dies."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import zmq

from modelship.serving.transport import ERROR, OK, _BrokerState, decode_request, encode_answers, encode_request


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


def request(uid: bytes) -> list[zmq.Frame]:
    return [zmq.Frame(f) for f in encode_request(uid, 0, np.full((1, 2), float(uid[-1]), np.float32))]


def test_credit_holding_and_requeue_on_death() -> None:
    ctx = zmq.Context()
    router, dealer, push, pull = sockets(ctx, "a")
    dealer.send_multipart([b"ready", struct.pack("!I", 2)])
    identity, *_ = router.recv_multipart()
    state = _BrokerState(router, [push])
    state.waiting.extend(request(bytes([i])) for i in range(3))
    state.dispatch()
    assert state.credit == {} and len(state.waiting) == 3  # no credit yet: nothing sent
    state.ready(identity, 2)
    state.dispatch()
    got = [decode_request(dealer.recv_multipart()) for _ in range(2)]
    assert [r.uid for r in got] == [b"\x00", b"\x01"] and got[1].x.tolist() == [[1.0, 1.0]]
    assert len(state.held[identity]) == 2 and len(state.waiting) == 1 and state.credit[identity] == 0
    state.dead(identity)  # what it held goes back to the front, in order
    assert [pickle.loads(f[0].bytes)[0] for f in state.waiting] == [b"\x00", b"\x01", b"\x02"]
    state.ready(identity, 3)  # a replacement with the same identity
    state.dispatch()
    assert [decode_request(dealer.recv_multipart()).uid for _ in range(3)] == [b"\x00", b"\x01", b"\x02"]
    state.dead(identity)  # and it dies too: the two it held twice are answered 503, not retried again
    assert pull.poll(2000)
    answered = [pickle.loads(pull.recv_multipart()[0])[0][0] for _ in range(2)]
    assert sorted(uid for uid, *_ in answered) == [b"\x00", b"\x01"]
    assert all(status == ERROR and detail[0] == 503 for _, status, _, detail in answered)
    assert [pickle.loads(f[0].bytes)[0] for f in state.waiting] == [b"\x02"]  # its first death: requeued
    assert state.attempts == {b"\x02": 1}


def test_answers_carry_rows_and_errors_in_order() -> None:
    frames = encode_answers([(b"a", OK, np.ones((2, 3), np.float32)), (b"b", ERROR, (504, "late")),
                             (b"c", OK, np.zeros((1, 3), np.float32))])  # fmt: skip
    meta, row_shape, dtype = pickle.loads(frames[0])
    assert meta == [(b"a", OK, 2, None), (b"b", ERROR, 0, (504, "late")), (b"c", OK, 1, None)]
    body = np.frombuffer(bytes(frames[1]), dtype=dtype).reshape(-1, *row_shape)
    assert body.tolist() == [[1.0] * 3, [1.0] * 3, [0.0] * 3]
