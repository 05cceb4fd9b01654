"""Step rates: prefill tokens/s and decode step time from scheduled steps."""

from triphase.workers.engine.kv_cache_manager import KVCacheManager
from triphase.workers.engine.rates import StepRates, split
from triphase.workers.engine.request import Request
from triphase.workers.engine.sampling import SamplingParams
from triphase.workers.engine.scheduler import Scheduler, SchedulerConfig


def step(s: Scheduler):  # type: ignore[no-untyped-def]
    out = s.schedule()
    s.update(out, {i.request.request_id: 7 for i in out.scheduled if i.samples})
    return out


def test_prefill_chunks_and_decodes_are_told_apart_and_timed() -> None:
    s = Scheduler(SchedulerConfig(8, 8, 64), KVCacheManager(16, 4))
    s.add(Request("a", list(range(12)), SamplingParams(max_tokens=8)))
    rates = StepRates(window=4, decode_window=4)
    assert (rates.prefill_tokens_per_s, rates.decode_step_s) == (0.0, 0.0)
    first = step(s)  # 8 of a's 12 prompt tokens
    assert split(first) == (8, 0)
    rates.record(first, 0.5)
    second = step(s)  # the last 4 (it samples)
    rates.record(second, 0.5)
    assert rates.prefill_tokens_per_s == 12.0 and rates.decode_step_s == 0.0
    s.add(Request("b", list(range(3)), SamplingParams(max_tokens=8)))
    mixed = step(s)  # a decodes one token while b prefills 3
    assert split(mixed) == (3, 1)
    rates.record(mixed, 0.25)
    assert rates.decode_step_s == 0.25
    assert rates.prefill_tokens_per_s == 15 / 1.25
    for _ in range(4):  # the window holds the last 4 decode steps only
        rates.record(step(s), 0.1)
    assert abs(rates.decode_step_s - 0.1) < 1e-12
    assert rates.prefill_tokens_per_s == 15 / 1.25  # no prefill since: the last figure stays
    assert rates.prefill_tokens_total == 15  # every prompt token computed, beyond the window
