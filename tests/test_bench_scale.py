"""``make bench-scale``'s secure / plain column pairs each secure run with the plain run just before it."""

from __future__ import annotations

from simulation.bench_scale import ScaleResult, steady_ratio


def _row(sites: int, aggregation: str, steady_s: float | None) -> ScaleResult:
    return ScaleResult(sites=sites, aggregation=aggregation, setup_s=1.0, round0_s=1.0, first_round_s=2.0,
                       steady_round_s=steady_s, steady_round_server_s=steady_s, peak_pss_bytes=0, peak_rss_bytes=0,
                       cpu_s=0.0, mean_load=0.0, exit_code=0)


def test_a_repeated_site_count_divides_each_secure_run_by_its_own_plain_run() -> None:
    # prepare: `--sites 5 20 5` runs plain, secure for each count in turn
    rows = [_row(5, "plain", 4.0), _row(5, "secure", 4.2), _row(20, "plain", 10.0), _row(20, "secure", 9.0),
            _row(5, "plain", 3.0), _row(5, "secure", 3.3)]
    # act
    column = [steady_ratio(rows, r) for r in rows]
    # assert: 4.2 / 4.0, 9.0 / 10.0, 3.3 / 3.0; plain rows stay blank
    assert column == ["", "1.05×", "", "0.90×", "", "1.10×"]


def test_a_secure_run_without_a_plain_one_before_it_has_no_ratio() -> None:
    rows = [_row(5, "secure", 4.0), _row(5, "plain", 4.0), _row(20, "plain", None), _row(20, "secure", 9.0)]
    assert [steady_ratio(rows, r) for r in rows] == ["", "", "", ""]
