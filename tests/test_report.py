"""The report: headlines of each method and of "X+finch" against X, and values it cannot give."""

import math

import pytest

from finch_jax import report

BEFORE = {"task_loss": 3.0, "retain_loss": 1.0}


def _run(method, lr, seed, task_loss, forgetting):
  return {
    "method": method,
    "learning_rate": lr,
    "seed": seed,
    "task_loss": task_loss,
    "retain_loss": BEFORE["retain_loss"] + forgetting,
    "forgetting": forgetting,
    "curve": [{"step": 5, "task_loss": task_loss + 0.5, "retain_loss": 1.0}],
    "step_time": 0.1,
    "optimizer_state_bytes": 8,
    "held_bytes": 16,
  }


def _sweep(method, seeds, points):
  return [_run(method, lr, s, loss, f + 0.01 * s) for s in seeds for lr, loss, f in points]


RUNS = (
  _sweep("standard", (0, 1), [(1e-4, 2.0, 0.2), (1e-3, 1.0, 0.4)])
  + _sweep("anchor", (0, 1), [(1e-4, 2.0, 0.1), (1e-3, 1.0, 0.3)])
  + _sweep("anchor+finch", (0, 1), [(1e-4, 2.0, 0.05), (1e-3, 1.0, 0.15)])
)


def test_headlines_put_each_method_against_the_baseline_and_x_finch_against_x():
  out = report.build_report("standard", BEFORE, RUNS)
  headline = out["headline"]
  assert set(headline) == {
    "anchor_vs_standard_forgetting_change",
    "anchor+finch_vs_standard_forgetting_change",
    "anchor+finch_vs_anchor_forgetting_change",
  }
  # At task loss 1.0 (both sweeps end there): anchor+finch 0.15(+0.01) against anchor 0.3(+0.01).
  pair = headline["anchor+finch_vs_anchor_forgetting_change"]
  assert pair["task_loss"] == pytest.approx(1.0)
  want = ((0.15 - 0.3) / 0.3 + (0.16 - 0.31) / 0.31) / 2
  assert pair["mean"] == pytest.approx(want)
  assert pair["seeds"] == 2
  assert out["methods"]["anchor+finch"]["extra_bytes"] == 0
  text = report.markdown_table(out)
  assert "anchor+finch_vs_anchor_forgetting_change: -" in text
  assert "± +" not in text  # a spread has no sign
  assert "nan" not in text


def test_a_method_that_never_reaches_the_target_says_so_and_one_seed_shows_no_spread():
  runs = _sweep("standard", (0,), [(1e-4, 2.0, 0.2), (1e-3, 1.0, 0.4)]) + _sweep(
    "lora", (0,), [(1e-4, 2.5, 0.3), (1e-3, 2.2, 0.35)]
  )
  out = report.build_report("standard", BEFORE, runs)
  assert math.isnan(out["methods"]["lora"]["forgetting"])  # its sweep stops before 1.0
  text = report.markdown_table(out)
  assert "not reached" in text
  assert "nan" not in text
  assert "±" not in text.split("\n", 2)[2]  # one seed: no spread in the table or headlines


def test_plots_show_the_base_model_at_step_zero_and_label_their_axes(tmp_path):
  out = report.build_report("standard", BEFORE, RUNS)
  curves = report.plot_curves(out)
  task_axis = curves.axes[0]
  first_line = task_axis.get_lines()[0]
  assert first_line.get_xdata()[0] == 0 and first_line.get_ydata()[0] == BEFORE["task_loss"]
  assert all(ax.get_ylabel() and ax.get_xlabel() for ax in curves.axes)
  frontier = report.plot_frontier(out)
  labels = [t.get_text() for t in frontier.axes[0].get_legend().get_texts()]
  assert "one seed's run" in labels
  # Each line is a method's frontier: a higher rate, a lower task loss, all along.
  for line in frontier.axes[0].get_lines()[:3]:
    xs = list(line.get_xdata())
    assert xs == sorted(xs, reverse=True)
  report.write_report(str(tmp_path), out)
  assert (tmp_path / "frontier.png").stat().st_size > 10_000


def test_every_measure_is_read_at_matched_loss_and_at_matched_accuracy():
  runs = [dict(r) for r in RUNS]
  for r in runs:  # accuracy rises as the task loss falls; KL and ECE grow with the rate
    r["task_accuracy"] = 1.0 - r["task_loss"] / 4
    r["retain_kl"] = 2 * r["forgetting"]
    r["retain_nll_rise"] = r["forgetting"] / 10
  out = report.build_report("standard", BEFORE, runs)
  at_loss, at_accuracy = out["measures"]["task_loss"], out["measures"]["task_accuracy"]
  assert at_loss["target"] == pytest.approx(1.0)
  assert at_accuracy["target"] == pytest.approx(0.75)  # the same point, read on the accuracy
  assert set(at_loss["measures"]) == {"forgetting", "retain_kl", "retain_nll_rise"}
  kl = at_accuracy["measures"]["retain_kl"]["anchor"]
  assert kl["mean"] == pytest.approx(2 * (0.3 + 0.31) / 2)
  assert kl["seeds"] == 2
  text = report.markdown_table(out)
  assert "At matched task accuracy 0.7500" in text
  assert "| method | forgetting | retain_kl | retain_nll_rise |" in text
  assert "KL(base || fine-tuned)" in text
