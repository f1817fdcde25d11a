"""``capture --plan``'s stage times: the arithmetic from a calibration, and the plan that prints them."""

from __future__ import annotations

import pytest

from capture.plan.timing import FORWARD_EFFICIENCY, STATISTICS_OVERHEAD, Calibration, estimate


def test_stage_times_follow_the_work_and_the_rates():
    cal = Calibration(forward_flops=1e9, products_flops=2e9, disk_bytes_per_s=1e6)
    times = estimate(cal, body_params=1000, n_layers=2, hidden=4, vocab=10, batches=[(2, 5), (1, 3)],
                     n_passes=4, store_bytes=3e6, statistics_rows=100)
    flops = (2 * 1000 * 10 + 2 * 2 * 4 * 2 * 25) + (2 * 1000 * 3 + 2 * 2 * 4 * 1 * 9)
    assert times.forwards == pytest.approx(4 * flops / (1e9 * FORWARD_EFFICIENCY))
    assert times.writes == pytest.approx(3.0)
    assert times.residuals == pytest.approx(3.0)  # writes overlap the forwards: the slower one counts
    assert times.statistics == pytest.approx(STATISTICS_OVERHEAD * 100 * 4 * 2 * 10 * 4 / 2e9)
    assert times.total == pytest.approx(times.residuals + times.statistics)


def test_the_plan_prints_each_stages_time(make_model, tmp_path, capsys):
    from cli import main

    base, sft = make_model("llama", seed=0), make_model("llama", seed=1)
    args = ["capture", "--base", str(base), "--sft", str(sft), "--prompt", "The moon is bright.", "--plan",
            "--store", str(tmp_path / "s.zarr")]
    assert main(args) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("predicted time: "))
    assert "residuals ~" in line and "lens statistics ~" in line and "calibrated here: matmul" in line
    assert main([*args, "--no-lens"]) == 0
    assert "lens statistics ~" not in capsys.readouterr().out
    assert not (tmp_path / "s.zarr").exists() and not list(tmp_path.glob(".resdiff-calibration-*"))
