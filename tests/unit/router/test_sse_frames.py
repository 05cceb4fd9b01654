"""The per-token SSE frames assembled from pre-encoded bytes are the JSON a plain json.dumps of the
chunk gives, for awkward text too."""

from __future__ import annotations

import json

import pytest

from triphase.router.openai.routes import TAIL, _frame, _frame_head, _json_reason

BASE = {"id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": 'we"ird\\model'}


@pytest.mark.parametrize("text", ["", " hello", 'quote " and \\ backslash', "line\nbreak", "é ☃ 🙂", "\x00"])
@pytest.mark.parametrize("reason", [None, "stop", "length"])
def test_completion_frame_equals_json_dumps(text, reason):
    frame = (_frame_head(BASE) + b'"text": ' + json.dumps(text).encode() + b', "finish_reason": '
             + _json_reason(reason) + b', "logprobs": null' + TAIL)
    expected = {**BASE, "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}]}
    assert frame == _frame(expected)
    assert json.loads(frame.removeprefix(b"data: ")) == expected
