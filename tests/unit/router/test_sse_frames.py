"""The per-token SSE frames assembled from pre-encoded bytes are the JSON a plain json.dumps of the
chunk gives, for awkward text too."""

from __future__ import annotations

import json

import pytest

from triphase.router.openai.responses import TAIL, frame, frame_head, json_reason

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
