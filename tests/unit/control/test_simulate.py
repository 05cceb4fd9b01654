"""The planning model: profiles fitted and stored, the discrete-event pools against hand-computed
timelines, goodput and the best split."""

from __future__ import annotations

import json
import pathlib

import pytest

from triphase.common.profile import Profile
from triphase.control import plan_command
from triphase.control.simulate import Lengths, Request, poisson_requests, simulate

PROFILE = Profile(prefill_base_s=0.01, prefill_per_token_s=0.001, decode_base_s=0.04, decode_per_seq_s=0.02,
                  decode_per_context_token_s=0.0)


def test_a_fit_recovers_the_linear_models_and_survives_a_round_trip(tmp_path: pathlib.Path) -> None:
    prefill = [(n, 0.01 + 0.001 * n) for n in (16, 256, 1024)]
    decode = [(b, b * c, 0.04 + 0.02 * b + 1e-6 * b * c) for b in (1, 4, 8) for c in (128, 512)]
    profile = Profile.fit(prefill, decode, model="m", engine="sim")
    assert profile.prefill_base_s == pytest.approx(0.01) and profile.prefill_per_token_s == pytest.approx(0.001)
    assert profile.decode_base_s == pytest.approx(0.04) and profile.decode_per_seq_s == pytest.approx(0.02)
    assert profile.decode_per_context_token_s == pytest.approx(1e-6)
    profile.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == profile


def test_a_mixture_of_experts_fit_captures_the_experts_a_batch_touches(tmp_path: pathlib.Path) -> None:
    """64 experts, top-4: a decode step reads the experts its tokens touch, which grow with the batch
    until all are touched (concave in b). The fit recovers the per-expert cost; a dense (linear) fit of
    the same points mispredicts a batch it was not given."""
    truth = Profile(0, 0, 0.004, 0.0001, 0.0, decode_per_expert_s=0.0005, experts=64, top_k=4)
    assert truth.experts_touched(1) == pytest.approx(4) and truth.experts_touched(1000) == pytest.approx(64)
    prefill = [(n, 0.01 + 0.001 * n) for n in (16, 256)]
    decode = [(b, b * c, truth.decode_step_s(b, b * c)) for b in (1, 2, 4, 8, 16, 64) for c in (64, 512)]
    moe = Profile.fit(prefill, decode, experts=64, top_k=4)
    assert moe.decode_per_expert_s == pytest.approx(0.0005, rel=1e-6)
    assert moe.decode_step_s(32, 0) == pytest.approx(truth.decode_step_s(32, 0), rel=1e-6)
    dense = Profile.fit(prefill, decode)
    assert abs(dense.decode_step_s(32, 0) - truth.decode_step_s(32, 0)) > 0.1 * truth.decode_step_s(32, 0)
    moe.save(tmp_path / "moe.json")
    assert Profile.load(tmp_path / "moe.json") == moe
    assert json.loads((tmp_path / "moe.json").read_text())["moe"] == {"experts": 64, "top_k": 4}
    assert "moe" not in dense.to_json() and dense.experts_touched(8) == 0


@pytest.mark.parametrize("content, words", [
    ({"version": 2}, "version 2, expected 1"),
    ({"version": 1, "fit": {"prefill_base_s": 0, "prefill_per_token_s": 0, "decode_base_s": 0,
                            "decode_per_seq_s": 0, "decode_per_context_token_s": 0},
      "moe": {"experts": 8, "top_k": 9}}, "moe needs 1 <= top_k <= experts"),
    ({"version": 1, "fit": {"prefill_base_s": -1, "prefill_per_token_s": 0, "decode_base_s": 0,
                            "decode_per_seq_s": 0, "decode_per_context_token_s": 0}}, "coefficients must be"),
    ({"version": 1}, "'fit'"),
    ("not json", "is not a triphase profile"),
])
def test_a_bad_profile_is_an_error_naming_the_file(tmp_path: pathlib.Path, content: object, words: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=r"bad\.json") as error:
        Profile.load(path)
    assert words in str(error.value)
    with pytest.raises(ValueError, match="No such file"):
        Profile.load(tmp_path / "missing.json")


def test_one_request_takes_its_prefill_then_a_decode_step_per_token() -> None:
    result = simulate(PROFILE, 1, 1, [Request(0.0, 100, 5)])
    (outcome,) = result.outcomes
    assert outcome.ttft_s == pytest.approx(0.01 + 0.1)  # one prefill step of 100 tokens
    assert outcome.tpot_s == pytest.approx(0.04 + 0.02)  # four decode steps of one sequence each


def test_a_long_prompt_is_prefilled_in_chunks_and_queues_the_next() -> None:
    result = simulate(PROFILE, 1, 1, [Request(0.0, 1000, 1), Request(0.0, 24, 1)], chunk_tokens=512)
    first, second = result.outcomes
    # 512 tokens, then the first's last 488 with the whole second prompt (24): two full steps.
    assert first.ttft_s == pytest.approx(2 * (0.01 + 0.512))
    assert second.ttft_s == pytest.approx(first.ttft_s)


def test_sequences_on_one_decode_worker_share_its_steps() -> None:
    together = simulate(PROFILE, 1, 1, [Request(0.0, 10, 11), Request(0.0, 10, 11)])
    apart = simulate(PROFILE, 1, 2, [Request(0.0, 10, 11), Request(0.0, 10, 11)])
    assert [o.tpot_s for o in apart.outcomes] == pytest.approx([0.04 + 0.02] * 2)
    # The second prompt is prefilled a step later and joins at the next step boundary: from then on
    # the two share steps of two sequences (0.08 s), so both run slower than alone.
    first, second = (o.tpot_s for o in together.outcomes)
    assert first == pytest.approx((0.06 + 9 * 0.08) / 10)  # 1 step alone, then 9 shared
    assert 0.06 < second < 0.09


def test_requests_unfinished_at_the_horizon_count_as_misses() -> None:
    result = simulate(PROFILE, 1, 1, [Request(0.0, 10, 2), Request(0.0, 10, 10_000)], horizon_s=5.0)
    assert result.unfinished == 1 and result.attainment(10.0, 10.0) == 0.5


def test_the_same_seed_gives_the_same_workload() -> None:
    a = poisson_requests(2.0, 60, Lengths(10, 100), Lengths(5, 9), seed=3)
    assert a == poisson_requests(2.0, 60, Lengths(10, 100), Lengths(5, 9), seed=3)
    assert 80 < len(a) < 160 and all(10 <= r.prompt_tokens <= 100 and 5 <= r.output_tokens <= 9 for r in a)


def test_goodput_is_the_rate_where_attainment_crosses_the_target() -> None:
    assert plan_command.goodput([1, 2, 3], [1.0, 0.95, 0.85], 0.9) == pytest.approx(2.5)
    assert plan_command.goodput([1, 2], [0.5, 0.2], 0.9) == 0.0
    assert plan_command.goodput([1, 2], [1.0, 1.0], 0.9) == 2.0


def test_a_trace_is_scaled_to_each_rate_keeping_its_shape() -> None:
    trace = [Request(10.0, 5, 5), Request(11.0, 5, 5), Request(14.0, 5, 5)]  # 2 gaps over 4 s
    scaled = plan_command.at_rate(trace, 1.0)
    assert [r.arrival_s for r in scaled] == pytest.approx([0.0, 0.5, 2.0])


def test_decode_heavy_work_is_best_served_by_more_decode_workers() -> None:
    def workload(rate: float) -> list[Request]:
        return poisson_requests(rate, 120, Lengths(64, 64), Lengths(200, 200), seed=1)

    results = plan_command.plan(PROFILE, PROFILE, [(1, 3), (2, 2), (3, 1)], [0.5, 1.0, 2.0, 4.0], workload,
                                (2.0, 0.2), 0.9, 512, 64)
    best = max(results, key=lambda r: r.per_worker)
    assert (best.prefill, best.decode) == (1, 3)


@pytest.mark.parametrize("text", ["1", "0:2", "a:b", "2:"])
def test_a_bad_split_is_an_error(text: str) -> None:
    with pytest.raises(ValueError, match="PREFILL:DECODE"):
        plan_command._splits(text, 4)
