"""The decode loop's figures: cumulative histograms, token counters and the gauges of the last step."""

from __future__ import annotations

from gpufleet.workers.child.generation_stats import GenerationStats


def test_sequences_add_up_and_latencies_land_in_cumulative_buckets() -> None:
    stats = GenerationStats()
    stats.finished(
        "m", prompt_tokens=10, prefill_tokens=4, generated_tokens=3, first_token_s=0.02, inter_token_s=[0.004, 0.3]
    )
    stats.finished("m", prompt_tokens=5, prefill_tokens=5, generated_tokens=0, first_token_s=0.0, inter_token_s=[])
    stats.gauges("m", running=2, waiting=1, kv_used_bytes=100, kv_reserved_bytes=1000)
    report = stats.report()["m"]
    assert (report.prompt_tokens, report.prefill_tokens, report.generated_tokens) == (15, 9, 3)
    assert report.ttft_s_buckets["0.01"] == 0 and report.ttft_s_buckets["0.025"] == 1
    assert report.ttft_s_buckets["+Inf"] == 1  # a sequence that generated nothing has no first token
    assert report.itl_s_buckets["0.005"] == 1 and report.itl_s_buckets["0.25"] == 1 and report.itl_s_buckets["0.5"] == 2
    assert abs(report.itl_s_sum - 0.304) < 1e-9
    assert (report.sequences_running, report.sequences_waiting, report.kv_free_bytes) == (2, 1, 900)
