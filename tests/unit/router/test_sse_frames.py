"""The per-token SSE frames assembled from pre-encoded bytes are the JSON a plain json.dumps of the
chunk gives, for awkward text too; a client that fell behind gets its pending frames in one write; the
fast path's writer frames a text's event as the response's body is framed and refuses what the
request's task must write."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from triphase.router.errors import BadRequest, RouterError
from triphase.router.openai.responses import TAIL, frame, frame_head, json_reason
from triphase.router.openai.routes import MAX_COALESCED, Straight, coalesced
from triphase.router.worker_session import BACKLOG

BASE = {"id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": 'we"ird\\model'}


@pytest.mark.parametrize("text", ["", " hello", 'quote " and \\ backslash', "line\nbreak", "é ☃ 🙂", "\x00"])
@pytest.mark.parametrize("reason", [None, "stop", "length"])
@pytest.mark.parametrize("index", [0, 3, 15])
def test_completion_frame_equals_json_dumps(text, reason, index):
    assembled = (frame_head(BASE, index) + b'"text": ' + json.dumps(text).encode() + b', "finish_reason": '
                 + json_reason(reason) + b', "logprobs": null' + TAIL)
    expected = {**BASE, "choices": [{"index": index, "text": text, "finish_reason": reason, "logprobs": None}]}
    assert assembled == frame(expected)
    assert json.loads(assembled.removeprefix(b"data: ")) == expected


def writes(events: list[tuple[bytes, int]], error: Exception | None = None,
           ) -> tuple[list[bytes], list[bytes], Exception | None]:
    """What `coalesced` writes for frames each made while `backlog` more deltas of the request waited,
    what it leaves for the stream's ending, and the error the frames ended with."""
    async def frames():
        for data, backlog in events:
            BACKLOG.set(backlog)
            yield data
        if error is not None:
            raise error

    async def collect():
        out: list[bytes] = []
        tail: list[bytes] = []
        try:
            async for data in coalesced(frames(), tail):
                out.append(data)
        except RouterError as exc:
            return out, tail, exc
        return out, tail, None

    return asyncio.run(collect())


def test_a_client_that_fell_behind_gets_its_pending_events_in_one_write():
    out, tail, _ = writes([(b"a", 0), (b"b", 2), (b"c", 1), (b"d", 0), (b"e", 0)])
    assert out == [b"a", b"bcd", b"e"] and tail == []


def test_one_write_holds_at_most_max_coalesced_events():
    out, tail, _ = writes([(b"x", 5)] * (MAX_COALESCED + 3))
    assert [len(data) for data in out] == [MAX_COALESCED] and tail == [b"x"] * 3


def test_the_last_events_of_a_stream_whose_end_came_with_them_are_left_for_the_ending():
    """The end counts in the backlog: the last delta's event and the usage event after it are written
    with `data: [DONE]`, one write for the stream's end."""
    out, tail, _ = writes([(b"a", 0), (b"last", 1), (b"usage", 1)])
    assert out == [b"a"] and tail == [b"last", b"usage"]


def test_events_owed_before_an_error_are_written_before_it():
    out, tail, error = writes([(b"a", 1), (b"b", 1)], BadRequest("the request broke"))
    assert out == [] and tail == [b"a", b"b"] and isinstance(error, BadRequest)


def test_straight_writes_a_texts_event_framed_as_the_body_is_and_refuses_what_its_task_must_write():
    """routes.Straight over a real socket whose peer reads when the test says: nothing before the
    response's start went out, then each text as one event (a chunk of its own when the body is
    chunked; an empty text accepted and nothing written), and a refusal once the socket holds more than
    HIGH_WATER unsent bytes or is closing."""
    def event(text: str) -> bytes:
        return b"data: " + text.encode() + b"\n\n"

    async def scenario() -> None:
        ours, peer = socket.socketpair()
        peer.setblocking(False)
        _, writer = await asyncio.open_connection(sock=ours)
        loop = asyncio.get_running_loop()
        for chunked, expected in ((True, b"a\r\ndata: hi\n\n\r\n"), (False, b"data: hi\n\n")):
            straight = Straight(writer.transport, chunked, event)
            assert straight("hi") is False  # aiohttp has not written the status line and headers yet
            straight.open = True
            assert straight("") is True and straight("hi") is True
            assert await loop.sock_recv(peer, 1024) == expected
        writer.transport.write(b"x" * (Straight.HIGH_WATER * 64))  # more than the socket's buffers hold
        assert writer.transport.get_write_buffer_size() > Straight.HIGH_WATER
        assert straight("hi") is False
        writer.close()
        assert straight("") is False
        peer.close()

    asyncio.run(scenario())
