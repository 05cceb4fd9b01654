"""Scheduler: token budget, decode-first chunked prefill, preemption by recompute, pinning."""

import pytest

from triphase.workers.engine.kv_cache_manager import KVCacheManager
from triphase.workers.engine.request import Request, RequestStatus
from triphase.workers.engine.sampling import SamplingParams
from triphase.workers.engine.scheduler import Scheduler, SchedulerConfig


def make(num_blocks=16, block_size=4, budget=8, max_seqs=8, max_len=64):
    kv = KVCacheManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_seqs, budget, max_len), kv)


def req(rid, n, max_tokens=8, start=0):
    return Request(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens))


def run_step(s, token=7):
    """Schedule and pretend the model ran: every request that reached its end samples `token`."""
    out = s.schedule()
    sampled = {i.request.request_id: token for i in out.scheduled if i.samples}
    s.update(out, sampled)
    return out


def shape(out):
    return [(i.request.request_id, i.num_new_tokens) for i in out.scheduled]


def test_long_prompt_is_chunked_under_the_budget():
    s = make(budget=8)
    s.add(req("a", 20))
    assert shape(run_step(s)) == [("a", 8)]
    assert shape(run_step(s)) == [("a", 8)]
    out = run_step(s)
    assert shape(out) == [("a", 4)] and out.scheduled[0].samples
    assert s.running[0].output_token_ids == [7]


def test_decodes_go_first_and_prefill_takes_the_rest_of_the_budget():
    s = make(budget=8)
    s.add(req("a", 3))
    run_step(s)  # a prefilled, has its first token
    s.add(req("b", 30, start=100))
    out = run_step(s)
    assert shape(out) == [("a", 1), ("b", 7)]
    assert [i.request.request_id for i in out.scheduled if i.samples] == ["a"]
    out = run_step(s)
    assert shape(out) == [("a", 1), ("b", 7)]


def test_block_ids_are_exact():
    s = make(block_size=4, budget=16)
    s.add(req("a", 6))
    s.add(req("b", 5, start=50))
    out = run_step(s)
    assert [i.block_ids for i in out.scheduled] == [[0, 1], [2, 3]]


def test_preemption_frees_blocks_and_recomputes_later():
    # 4 blocks of 4 tokens; two requests of 7 prompt tokens need 2 blocks each, then grow.
    s = make(num_blocks=4, block_size=4, budget=32)
    a, b = req("a", 7, max_tokens=6), req("b", 7, max_tokens=6, start=50)
    s.add(a)
    s.add(b)
    run_step(s)  # both prefilled: tokens 8 each -> 2 blocks each, pool full
    out = run_step(s)  # both decode token 8 (pos 7) in their 2nd block: fits
    assert shape(out) == [("a", 1), ("b", 1)]
    out = run_step(s)  # a needs a 3rd block: b (most recent) is preempted
    assert out.preempted == ["b"]
    assert shape(out) == [("a", 1)]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert s.waiting[0] is b and s.kv.block_ids("a") == [0, 1, 3]  # b's tail block reused first
    s.finish(a, RequestStatus.FINISHED_STOPPED)
    out = run_step(s)
    # b comes back: prompt + its 2 generated tokens are recomputed, prefix cache permitting.
    assert out.scheduled[0].request is b
    assert b.num_computed_tokens == b.num_tokens - 1


def test_abort_frees_blocks_immediately():
    s = make()
    r = req("a", 10)
    s.add(r)
    run_step(s)
    assert s.kv.num_free_blocks < 16
    s.finish(r, RequestStatus.FINISHED_ABORTED)
    assert s.kv.num_free_blocks == 16 and not s.has_work


def test_prefilled_requests_stay_pinned_until_released():
    s = make(budget=16)
    r = Request("p", list(range(9)), SamplingParams(max_tokens=4), prefill_only=True)
    s.add(r)
    run_step(s)
    s.finish(r, RequestStatus.PREFILLED)
    assert s.kv.block_ids("p") == [0, 1, 2]
    assert s.kv.num_free_blocks == 13
    assert s.release("p") and s.kv.num_free_blocks == 16
    assert not s.release("p")


def test_max_num_seqs_limits_admission():
    s = make(max_seqs=2, budget=64)
    for i in range(3):
        s.add(req(f"r{i}", 3, start=10 * i))
    out = run_step(s)
    assert [i.request.request_id for i in out.scheduled] == ["r0", "r1"]
    assert len(s.waiting) == 1


def test_rejects_prompts_that_can_never_run():
    s = make(num_blocks=4, block_size=4, max_len=64)
    assert s.max_len == 16  # the KV cache (4 x 4 tokens) is the tighter limit
    with pytest.raises(ValueError, match="at most 15 fit"):
        s.add(req("long", 16))
    s.add(req("ok", 10, max_tokens=100))  # admitted; it will end with "length" at 16 tokens
    assert make(num_blocks=64, max_len=32).max_len == 32
