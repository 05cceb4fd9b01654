"""HttpFraming: where a client is in its request stream, and when its head or body is owed."""

from __future__ import annotations

import pytest

from triphase.router.connections import HttpFraming

HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"


def framing() -> HttpFraming:
    f = HttpFraming(head_timeout_s=10, body_timeout_s=30)
    f.opened(now=0)
    return f


@pytest.mark.parametrize("chunks, deadline, body_left", [
    ([], 10, 0),                                   # a new connection owes its first head
    ([(1, b"POST / HT")], 10, 0),                  # a partial head keeps the connection's deadline
    ([(1, HEAD)], 31, 5),                          # the head is in: the body is owed 30 s after it
    ([(1, HEAD + b"ab")], 31, 3),
    ([(1, HEAD + b"abcde")], None, 0),             # the request is in: nothing owed while it is served
    ([(1, HEAD + b"abcde"), (50, b"G")], 60, 0),   # the next head: owed 10 s after its first byte
    ([(1, HEAD[:20]), (2, HEAD[20:40]), (3, HEAD[40:] + b"abcde")], None, 0),  # split anywhere
    ([(1, HEAD[:-2]), (2, b"\r\n")], 32, 5),       # the head's end split across reads
    ([(1, b"GET /healthz HTTP/1.1\r\n\r\n")], None, 0),  # no body
    ([(1, HEAD + b"abcde" + b"GET / HTTP/1.1\r\n\r\n")], None, 0),  # pipelined
])
def test_deadlines_follow_the_request_stream(chunks, deadline, body_left):
    f = framing()
    for now, data in chunks:
        f.feed(data, now)
    assert (f.deadline, f.body_left) == (deadline, body_left)


def test_expiry():
    f = framing()
    f.feed(b"POST / HTTP/1.1\r\n", now=1)
    assert not f.expired(9.9) and f.expired(10)


def test_chunked_bodies_and_oversized_heads_are_not_followed():
    f = framing()
    f.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", now=1)
    assert not f.following and not f.expired(10**6)
    g = framing()
    g.feed(b"GET / HTTP/1.1\r\nX: " + b"a" * (70 << 10), now=1)
    assert not g.following and g.too_large


@pytest.mark.parametrize("chunks, too_large", [
    ([b"GET / HTTP/1.1\r\nAuthorization: Bearer " + b"k" * 8200], True),  # a line still arriving
    ([b"GET / HTTP/1.1\r\nAuthorization: Bearer " + b"k" * 8200 + b"\r\n\r\n"], True),  # a whole head
    ([b"GET / HTTP/1.1\r\nA: " + b"k" * 5000, b"k" * 5000 + b"\r\n\r\n"], True),  # split across reads
    ([b"GET / HTTP/1.1\r\n" + b"A: " + b"k" * 8000 + b"\r\n" + b"B: " + b"k" * 8000 + b"\r\n\r\n"], False),
    ([b"GET /" + b"p" * 8200 + b" HTTP/1.1\r\n\r\n"], True),  # the request line
])
def test_heads_with_a_line_over_the_limit_are_refused(chunks, too_large):
    f = framing()
    for data in chunks:
        f.feed(data, now=1)
    assert f.too_large is too_large
