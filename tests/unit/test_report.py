"""The report: headlines of each method and of "X+finch" against X at the middle of their overlap,
relative changes over the whole overlap, intervals over seeds, the cost column, and values it
cannot give."""

import math
import statistics

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
  # Both sweeps span task loss 1.0 to 2.0: read at 1.5, halfway along each, where anchor+finch
  # forgets 0.10 (+0.01 a seed) and anchor 0.20 (+0.01 a seed).
  pair = headline["anchor+finch_vs_anchor_forgetting_change"]
  assert pair["task_loss"] == pytest.approx(1.5)
  assert pair["overlap_task_loss"] == pytest.approx([1.0, 2.0])
  changes = [(0.10 - 0.20) / 0.20, (0.11 - 0.21) / 0.21]
  assert pair["mean"] == pytest.approx(statistics.fmean(changes))
  assert pair["per_seed"] == pytest.approx({"0": changes[0], "1": changes[1]})
  half = 12.706204736174707 * statistics.stdev(changes) / math.sqrt(2)  # t(0.975, 1 dof)
  assert pair["ci"] == pytest.approx([pair["mean"] - half, pair["mean"] + half])
  assert pair["seeds"] == 2
  assert out["methods"]["anchor+finch"]["extra_bytes"] == 0
  text = report.markdown_table(out)
  lo, hi = (100 * c for c in pair["ci"])
  assert f"anchor+finch_vs_anchor_forgetting_change: {100 * pair['mean']:+.1f}% " in text
  assert f"[{lo:+.1f}%, {hi:+.1f}%], n=2" in text
  assert "mean [95% CI lo, hi], n seeds, t-interval" in text
  assert "nan" not in text


def test_the_memory_column_reads_in_units_with_its_sign():
  """A remedy that holds a copy of the base reads "+538.2 MB"; SGD, which keeps one moment
  fewer than AdamW, reads below 0; the baseline itself reads 0."""
  assert report.memory_size(538153828) == "+538.2 MB"
  assert report.memory_size(-1046813184) == "-1.05 GB"
  assert report.memory_size(20) == "+20 B"
  assert report.memory_size(0) == "0"
  runs = [r | {"held_bytes": 16 + 2_500_000 * (r["method"] == "anchor")} for r in RUNS]
  text = report.markdown_table(report.build_report("standard", BEFORE, runs))
  assert "| memory beside the baseline's |" in text
  assert "| +2.5 MB |" in text and "| 0 |" in text


def test_a_combined_method_naming_its_finch_reading_is_also_read_against_its_remedy():
  runs = RUNS + _sweep("anchor+finch_target", (0, 1), [(1e-4, 2.0, 0.08), (1e-3, 1.0, 0.2)])
  out = report.build_report("standard", BEFORE, runs)
  pair = out["headline"]["anchor+finch_target_vs_anchor_forgetting_change"]
  assert pair["mean"] == pytest.approx(statistics.fmean([0.14 / 0.2 - 1, 0.15 / 0.21 - 1]))
  assert "anchor+finch_target_vs_standard_forgetting_change" in out["headline"]
  assert report.without_finch("finch_target") == "finch_target"
  assert report.without_finch("sgdm+finch") == "sgdm"


def test_a_method_that_never_reaches_the_target_says_so_and_one_seed_shows_no_spread():
  runs = _sweep("standard", (0,), [(1e-4, 2.0, 0.2), (1e-3, 1.0, 0.4)]) + _sweep(
    "lora", (0,), [(1e-4, 2.5, 0.3), (1e-3, 2.2, 0.35)]
  )
  out = report.build_report("standard", BEFORE, runs)
  assert math.isnan(out["methods"]["lora"]["forgetting"])  # its sweep stops before 1.0
  text = report.markdown_table(out)
  assert "not reached" in text
  assert "nan" not in text
  assert "| standard | 1.5000 | 1.0000 | 1.3000 | 0.3000, n=1 |" in text  # one seed: no interval
  assert "[" not in text.split("| --- |", 1)[1].split("\n\n")[0]
  assert math.isnan(out["headline"]["lora_vs_standard_forgetting_change"]["task_loss"])


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
  assert at_loss["target"] == pytest.approx(1.5)  # the middle of 1.0 to 2.0
  assert at_accuracy["target"] == pytest.approx(0.625)  # the same point, read on the accuracy
  assert set(at_loss["measures"]) == {"forgetting", "retain_kl", "retain_nll_rise"}
  kl = at_accuracy["measures"]["retain_kl"]["anchor"]
  assert kl["mean"] == pytest.approx(2 * (0.2 + 0.21) / 2)
  assert kl["per_seed"] == pytest.approx({"0": 0.4, "1": 0.42})
  assert kl["seeds"] == 2
  text = report.markdown_table(out)
  assert "At matched task accuracy 0.6250" in text
  assert "| method | forgetting | retain_kl | retain_nll_rise |" in text
  assert "KL(base || fine-tuned)" in text


def test_a_task_score_every_run_shares_is_not_matched_at():
  # Exact match of paragraph-long answers is 0 at every run: matching at it would read each
  # method at "accuracy 0", wherever its sweep ends; the token accuracy beside it tells runs apart.
  runs = [dict(r, task_exact=0.0, task_accuracy=1.0 - r["task_loss"] / 4) for r in RUNS]
  out = report.build_report("standard", BEFORE, runs)
  assert set(out["measures"]) == {"task_loss", "task_accuracy"}
  assert out["measures"]["task_accuracy"]["target"] == pytest.approx(0.625)
  assert "task_exact" not in out["relative_change"]
  assert "At matched task exact" not in report.markdown_table(out)


def test_each_pair_reads_every_measure_at_the_middle_of_its_own_overlap():
  """Standard spans task loss 1.0 to 2.0, anchor 1.5 to 2.5 (shifted up): the pair's overlap is
  1.5 to 2.0 and is read at 1.75, where the overlap of all three methods would not be."""
  runs = _sweep("standard", (0, 1), [(1e-4, 2.0, 0.2), (1e-3, 1.0, 0.4)])
  runs += _sweep("anchor", (0, 1), [(1e-4, 2.5, 0.05), (1e-3, 1.5, 0.25)])
  runs += _sweep("lora", (0, 1), [(1e-4, 3.5, 0.1), (1e-3, 3.0, 0.2)])
  for r in runs:
    r["retain_kl"] = 3 * r["forgetting"]
  out = report.build_report("standard", BEFORE, runs)
  pair = out["headline"]["anchor_vs_standard_forgetting_change"]
  assert pair["task_loss"] == pytest.approx(1.75)
  kl = pair["measures"]["retain_kl"]
  # At 1.75 standard forgets 0.25 (+0.01 a seed) and anchor 0.20 (+0.01 a seed).
  assert kl["value"] == pytest.approx(3 * 0.205)
  assert kl["reference_value"] == pytest.approx(3 * 0.255)
  changes = [(0.20 - 0.25) / 0.25, (0.21 - 0.26) / 0.26]
  assert kl["change"]["mean"] == pytest.approx(statistics.fmean(changes))
  assert kl["change"]["per_seed"] == pytest.approx({"0": changes[0], "1": changes[1]})
  assert pair["measures"]["forgetting"]["change"]["mean"] == pytest.approx(pair["mean"])
  lora = out["headline"]["lora_vs_standard_forgetting_change"]["measures"]["retain_kl"]
  assert math.isnan(lora["value"]) and lora["change"]["n"] == 0  # no overlap with standard
  text = report.pair_measures_table(out)
  assert "| pair | read at | forgetting | retain_kl |" in text
  assert f"| anchor_vs_standard | 1.7500 | 0.2050 / 0.2550 ({100 * pair['mean']:+.1f}% [" in text
  assert "| lora_vs_standard | no overlap | - | - |" in text
  assert text in report.markdown_table(out)
  assert kl["per_seed"]["0"] == pytest.approx({"value": 0.60, "reference_value": 0.75})
  assert kl["per_seed"]["1"] == pytest.approx({"value": 0.63, "reference_value": 0.78})
  by_seed = report.per_seed_table(out)
  assert "| anchor_vs_standard | 1.7500 | 1 | 0.2100 / 0.2600 (-19.2%) | 0.6300 / 0.7800" in by_seed
  assert "lora_vs_standard" not in by_seed  # no overlap, no point to read each seed at
  assert by_seed in report.markdown_table(out)


def test_the_common_reading_says_which_methods_it_leaves_to_the_pairs():
  """Standard spans task loss 1.0-2.0 and anchor the same; lora's sweep (0.2-0.5) reaches none of
  it: the common reading is at 1.5 for two of the three methods, and the text says so instead
  of calling 1.0-2.0 the range every sweep reaches."""
  runs = RUNS[:8] + _sweep("lora", (0, 1), [(1e-4, 0.5, 0.3), (1e-3, 0.2, 0.5)])
  out = report.build_report("standard", BEFORE, runs)
  assert out["overlap_methods"] == ["standard", "anchor"]
  text = report.markdown_table(out)
  assert "the range the sweeps of 2 of the 3 methods reach (1.0000 to 2.0000; the others" in text
  assert "every sweep reaches" not in text
  assert "every sweep reaches (1.0000 to 2.0000)" in report.markdown_table(
    report.build_report("standard", BEFORE, RUNS[:8])
  )


def test_a_measure_whose_reference_straddles_0_is_read_as_a_difference():
  """The reference's answer-NLL rise is -0.002, +0.001, +0.004 over three seeds (near 0), the
  method's 0.001 above it each seed: relative changes of +50%, +100% and +25% would divide by
  noise, so the table gives the difference, +0.0010 each seed; the retain-loss rise, positive at
  every seed, stays relative."""
  runs = _sweep("standard", (0, 1, 2), [(1e-4, 2.0, 0.2), (1e-3, 1.0, 0.4)])
  runs += _sweep("anchor", (0, 1, 2), [(1e-4, 2.0, 0.1), (1e-3, 1.0, 0.3)])
  for r in runs:
    r["retain_nll_rise"] = -0.002 + 0.003 * r["seed"] + 0.001 * (r["method"] == "anchor")
  out = report.build_report("standard", BEFORE, runs)
  nll = out["headline"]["anchor_vs_standard_forgetting_change"]["measures"]["retain_nll_rise"]
  assert nll["difference"]["mean"] == pytest.approx(0.001)
  assert nll["difference"]["per_seed"] == pytest.approx({"0": 0.001, "1": 0.001, "2": 0.001})
  assert nll["change"]["per_seed"] == pytest.approx({"0": 0.5, "1": 1.0, "2": 0.25})
  assert not report.relative_is_read(nll)
  forgetting = out["headline"]["anchor_vs_standard_forgetting_change"]["measures"]["forgetting"]
  assert report.relative_is_read(forgetting)
  # Positive at every seed but 0.001, 0.002, 0.030: its interval takes in 0, so no relative change.
  noisy = {str(s): {"value": 1.0, "reference_value": v} for s, v in enumerate((0.001, 0.002, 0.03))}
  assert not report.relative_is_read({"per_seed": noisy})
  assert report.relative_is_read({"per_seed": {"0": {"value": 1.0, "reference_value": 0.001}}})
  # Below 0 at every seed (the reference's retain loss fell): -0.022 against -0.048 is a fall
  # 0.026 smaller, which a relative change would print as "+54%", more forgetting.
  fell = {str(s): {"value": -0.022, "reference_value": -0.048 - 0.001 * s} for s in range(3)}
  assert not report.relative_is_read({"per_seed": fell})
  table = report.pair_measures_table(out)
  assert "(difference +0.0010 [+0.0010, +0.0010], n=3) |" in table
  assert "+58.3%" not in table  # the mean relative change, which the table no longer prints
  by_seed = report.per_seed_table(out)
  assert "| 1.5000 | 1 | 0.2100 / 0.3100 (-32.3%) | 0.0020 / 0.0010 (+0.0010) |" in by_seed


def test_a_headline_whose_reference_rise_straddles_0_reads_the_difference():
  """The reference's retain-loss rise is -0.01, 0.00, +0.01 over three seeds at every rate (a
  language run where English barely moves), the method's 0.005 below it: a relative change
  would read -50%, -inf or -50% by seed; the headline, the table over the overlap and the plot
  give the difference, -0.005, instead."""
  runs = _sweep("standard", (0, 1, 2), [(1e-4, 2.0, -0.01), (1e-3, 1.0, -0.01)])
  runs += _sweep("anchor", (0, 1, 2), [(1e-4, 2.0, -0.015), (1e-3, 1.0, -0.015)])
  out = report.build_report("standard", BEFORE, runs)
  text = report.markdown_table(out)
  assert "anchor_vs_standard_forgetting_change: difference -0.0050 [-0.0050, -0.0050], n=3" in text
  assert "relative change in forgetting at matched" not in text
  curve = out["relative_change"]["task_loss"]["anchor_vs_standard"]
  assert curve["read_as_change"]["forgetting"] == [False] * report.GRID_POINTS
  assert curve["differences"]["forgetting"][4]["mean"] == pytest.approx(-0.005)
  table = report.relative_change_table(out)
  assert "| -0.0050 diff at 1.5000 |" in table and "%" not in table.split("\n")[-1]
  # Where the reference rises at every seed, the same pair reads relative changes as before.
  for r in runs:
    r["forgetting"] += 0.1
  curve = report.build_report("standard", BEFORE, runs)["relative_change"]["task_loss"]
  assert all(curve["anchor_vs_standard"]["read_as_change"]["forgetting"])


def test_a_method_screened_at_one_seed_is_set_beside_the_references_value_at_that_seed():
  """The reference ran seeds 0, 1, 2 (forgetting 0.30, 0.31, 0.32 at the middle), the method
  seed 0 alone (0.15): its pair reads 0.15 against 0.30, the -50% its change says, not against
  the reference's mean over seeds the method never ran (0.31)."""
  runs = _sweep("standard", (0, 1, 2), [(1e-4, 2.0, 0.2), (1e-3, 1.0, 0.4)])
  runs += _sweep("anchor", (0,), [(1e-4, 2.0, 0.1), (1e-3, 1.0, 0.2)])
  entry = report.build_report("standard", BEFORE, runs)["headline"]
  entry = entry["anchor_vs_standard_forgetting_change"]
  assert entry["task_loss"] == pytest.approx(1.5)
  assert entry["mean"] == pytest.approx(-0.5) and entry["seeds"] == 1
  assert entry["forgetting"] == pytest.approx(0.15)
  assert entry["reference_forgetting"] == pytest.approx(0.30)
  forgetting = entry["measures"]["forgetting"]
  assert forgetting["value"] == pytest.approx(0.15)
  assert forgetting["reference_value"] == pytest.approx(0.30)
  assert forgetting["change"]["mean"] == pytest.approx(-0.5)


def test_seed_interval_is_the_t_interval_with_n_minus_1_degrees_of_freedom():
  out = report.seed_interval({0: 1.0, 1: 2.0, 2: 3.0})
  half = 4.302652729749464 / math.sqrt(3)  # t(0.975, 2) * sd 1 / sqrt(3)
  assert out["mean"] == pytest.approx(2.0)
  assert out["ci"] == pytest.approx([2.0 - half, 2.0 + half])
  assert half == pytest.approx(2.4841, abs=1e-4)
  assert out["n"] == 3 and out["per_seed"] == {"0": 1.0, "1": 2.0, "2": 3.0}
  one = report.seed_interval({0: 1.0, 1: float("nan")})  # a seed that did not reach the target
  assert one["mean"] == 1.0 and one["n"] == 1 and all(math.isnan(c) for c in one["ci"])


def test_methods_keep_every_seed_and_give_a_95_percent_interval():
  out = report.build_report("standard", BEFORE, RUNS)
  entry = out["methods"]["anchor"]  # 0.20 and 0.21 at task loss 1.5
  assert entry["forgetting_per_seed"] == pytest.approx({"0": 0.2, "1": 0.21})
  half = 12.706204736174707 * statistics.stdev([0.2, 0.21]) / math.sqrt(2)
  assert entry["forgetting_ci"] == pytest.approx([0.205 - half, 0.205 + half])
  assert "0.2050 [0.1415, 0.2685], n=2" in report.markdown_table(out)


def _line(method, seed, lr, task_loss, forgetting, **extra):
  return _run(method, lr, seed, task_loss, forgetting) | extra


def test_relative_change_over_the_overlap_and_the_headline_at_its_middle():
  """Standard forgets 3 - L at task loss L across 1.0 to 3.0; FINCH forgets 1 + 0.1 * seed
  across 1.4 to 2.6. Their overlap is 1.4 to 2.6, the headline is read at 2.0 (where the change
  is +5%, while the old reading at the overlap's edge, 1.4, says -34%), and the change at target
  L is (1 + 0.1 s) / (3 - L) - 1, averaged over the two seeds."""
  runs = []
  for seed in (0, 1):
    for lr, loss in [(1e-4, 3.0), (1e-3, 2.0), (1e-2, 1.0)]:
      runs.append(_line("standard", seed, lr, loss, 3.0 - loss, task_fact_accuracy=1 - loss / 4))
    for lr, loss in [(1e-4, 2.6), (1e-3, 2.0), (1e-2, 1.4)]:
      runs.append(_line("finch", seed, lr, loss, 1.0 + 0.1 * seed, task_fact_accuracy=1 - loss / 4))
  out = report.build_report("standard", BEFORE, runs)
  assert out["target_task_loss"] == pytest.approx(2.0)
  assert out["overlap_task_loss"] == pytest.approx([1.4, 2.6])
  losses = {name: m["task_loss"] for name, m in out["methods"].items()}
  assert max(losses.values()) <= 1.05 * min(losses.values())
  headline = out["headline"]["finch_vs_standard_forgetting_change"]
  assert headline["task_loss"] == pytest.approx(2.0)
  assert headline["mean"] == pytest.approx(0.05)
  curve = out["relative_change"]["task_loss"]["finch_vs_standard"]
  targets = [1.4 + 0.15 * i for i in range(9)]
  assert curve["targets"] == pytest.approx(targets)
  assert curve["middle"] == pytest.approx(2.0)
  want = [1.05 / (3 - t) - 1 for t in targets]
  assert [p["mean"] for p in curve["measures"]["forgetting"]] == pytest.approx(want)
  assert curve["measures"]["forgetting"][0]["per_seed"] == pytest.approx(
    {"0": 1 / 1.6 - 1, "1": 1.1 / 1.6 - 1}
  )
  # The same against matched task accuracy 1 - L / 4: 0.35 to 0.65, middle 0.5 (L = 2.0).
  by_accuracy = out["relative_change"]["task_fact_accuracy"]["finch_vs_standard"]
  assert [by_accuracy["lo"], by_accuracy["middle"], by_accuracy["hi"]] == pytest.approx(
    [0.35, 0.5, 0.65]
  )
  assert [p["mean"] for p in by_accuracy["measures"]["forgetting"]] == pytest.approx(
    [1.05 / (3 - 4 * (1 - a)) - 1 for a in by_accuracy["targets"]]
  )
  assert out["measures"]["task_fact_accuracy"]["target"] == pytest.approx(0.5)
  text = report.markdown_table(out)
  assert "| finch_vs_standard | -34.4% at 1.4000 |" in text
  assert "+5.0% at 2.0000" in text


def test_the_cost_column_says_within_noise_when_the_interval_covers_one():
  # 16 rounds in which the machine's load moves both methods alike.
  load = [1.0, 1.3, 0.9, 1.1, 1.6, 1.0, 0.95, 1.2, 1.05, 1.4, 1.0, 0.9, 1.1, 1.25, 1.0, 1.15]
  noise = [
    1.02,
    0.97,
    1.01,
    0.99,
    1.03,
    0.98,
    1.0,
    1.01,
    0.99,
    1.02,
    0.97,
    1.0,
    1.03,
    0.98,
    1.01,
    0.99,
  ]
  times = {
    "standard": [0.1 * x for x in load],
    "finch": [0.1 * x * n for x, n in zip(load, noise, strict=True)],
    "slow": [0.1 * x * 1.1 * n for x, n in zip(load, noise, strict=True)],
  }
  cost = report.step_time_ratios(times, "standard")
  ratios = sorted(noise)
  assert cost["finch"]["ratio"] == pytest.approx(statistics.median(noise))
  assert cost["finch"]["ci"] == pytest.approx([ratios[3], ratios[12]])  # 4th and 13th of 16
  assert cost["finch"]["coverage"] == pytest.approx(1 - 2 * 697 / 2**16)  # P(B(16, 1/2) <= 3)
  assert cost["finch"]["within_noise"] and not cost["slow"]["within_noise"]
  assert cost["slow"]["ratio"] == pytest.approx(1.1 * statistics.median(noise))
  assert cost["standard"]["ratio"] == 1.0
  out = report.build_report(
    "standard",
    BEFORE,
    [r for r in RUNS if r["method"] != "anchor+finch"]
    + [dict(r, method="finch") for r in RUNS if r["method"] == "anchor"]
    + [dict(r, method="slow") for r in RUNS if r["method"] == "anchor"],
    times,
  )
  assert out["methods"]["finch"]["step_time_rounds"] == pytest.approx(times["finch"])
  text = report.markdown_table(out)
  lo, hi = cost["finch"]["ci"]
  assert f"| {cost['finch']['ratio']:.3f} [{lo:.3f}, {hi:.3f}] within noise |" in text
  slow = cost["slow"]
  assert f"| {slow['ratio']:.3f} [{slow['ci'][0]:.3f}, {slow['ci'][1]:.3f}] |" in text
  # Below six rounds no pair of order statistics covers 95%: the interval says what it covers.
  few = report.median_interval([1.0, 1.1, 0.9])
  assert few["ci"] == [0.9, 1.1] and few["coverage"] == pytest.approx(0.75)


def test_each_method_is_paired_with_the_baseline_rounds_of_its_own_timing():
  first = {"standard": [1.0, 2.0, 1.0], "a": [2.0, 4.0, 2.0], "b": [1.5, 3.0, 1.5]}
  second = {"standard": [3.0, 3.0, 3.0], "b": [3.3, 3.3, 3.3]}
  sessions = [{"step_times": first}, {"step_times": second}]
  cost = report.session_ratios(sessions, "standard")
  assert cost["a"]["ratio"] == pytest.approx(2.0)  # against the first timing's baseline
  assert cost["b"]["ratio"] == pytest.approx(1.1)  # the latest timing of b
  assert cost["standard"]["rounds"] == second["standard"]
  # One mapping of rounds is one timing.
  assert report.session_ratios(first, "standard")["b"]["ratio"] == pytest.approx(1.5)
  assert report.session_ratios([], "standard") == {}


def test_a_sweep_of_three_or_more_runs_is_read_along_its_bend_not_straight_lines():
  """KL 0.5, 0.2, 0.1 at task losses 1, 2, 3: forgetting bends up as the loss falls. At 1.5 the
  straight line between the two runs beside it reads 0.35; the monotone cubic through all three
  (PCHIP: slopes -0.4 and -0.15 at losses 1 and 2) reads 0.31875, below the line and between the
  runs. Two runs are read on their line; the rate on a log scale between its runs."""
  runs = [
    {"learning_rate": lr, "task_loss": loss, "retain_kl": kl}
    for lr, loss, kl in ((1e-5, 3.0, 0.1), (2e-5, 2.0, 0.2), (4e-5, 1.0, 0.5))
  ]
  assert report.interpolate(runs, "task_loss", 1.5, "retain_kl") == pytest.approx(0.31875)
  assert report.interpolate(runs[1:], "task_loss", 1.5, "retain_kl") == pytest.approx(0.35)
  assert report.interpolate(runs, "task_loss", 2.0, "retain_kl") == pytest.approx(0.2)
  rate = report.interpolate(runs, "task_loss", 1.5, "learning_rate")
  assert 2e-5 < rate < 4e-5
  assert math.isnan(report.interpolate(runs, "task_loss", 0.9, "retain_kl"))


def test_the_headline_shows_the_straight_line_reading_where_it_differs():
  """Three rates per sweep, forgetting bending upward for the reference and straight for the
  method: at the middle (task loss 2) the cubic and the line read the reference differently,
  and the headline prints both; with two rates per sweep they agree and only one is printed."""
  points_ref = [(1e-4, 3.0, 0.1), (3e-4, 1.5, 0.2), (1e-3, 1.0, 0.6)]
  points_method = [(1e-4, 3.0, 0.1), (3e-4, 2.0, 0.3), (1e-3, 1.0, 0.5)]
  runs = _sweep("standard", (0, 1), points_ref) + _sweep("anchor", (0, 1), points_method)
  out = report.build_report("standard", BEFORE, runs)
  h = out["headline"]["anchor_vs_standard_forgetting_change"]
  assert h["task_loss"] == pytest.approx(2.0)
  # The line between (3.0, 0.1) and (1.5, 0.2) reads 0.1667 at 2.0; the method's run there
  # 0.3 (each +0.01 per seed).
  for seed, change in h["change_on_lines"]["per_seed"].items():
    reference, method = 0.1 + 0.1 / 1.5 + 0.01 * int(seed), 0.3 + 0.01 * int(seed)
    assert change == pytest.approx((method - reference) / reference)
  assert abs(h["change_on_lines"]["mean"] - h["mean"]) >= 0.01
  assert f"; on straight lines between the rates: {100 * h['change_on_lines']['mean']:+.1f}%" in (
    report.markdown_table(out)
  )
  two = report.build_report("standard", BEFORE, RUNS)
  assert "on straight lines" not in report.markdown_table(two)


def test_each_run_is_read_against_its_seeds_reference_at_its_own_task_loss():
  """The method's seeds land at task losses 1.2 and 1.3 (no loss lies in both seeds' sweeps, so
  no common target): run by run, seed 0 (forgetting 0.30 at 1.2, the reference's line 0.36
  there) reads -16.7%, seed 1 (0.28 at 1.3, the reference 0.35) -20%; with the reference
  straddling 0 the figure is the difference instead."""
  runs = _sweep("standard", (0, 1), [(1e-4, 2.0, 0.2), (1e-3, 1.0, 0.4)])
  runs += [_run("anchor", 1e-3, 0, 1.2, 0.30), _run("anchor", 1e-3, 1, 1.3, 0.28)]
  runs += [_run("anchor", 2e-3, 1, 2.5, 0.9)]  # beyond the reference's sweep: left out
  read = report.run_matched(runs, "anchor", "standard", "forgetting")
  assert [r["seed"] for r in read["runs"]] == [0, 1]
  assert read["runs"][0]["reference_value"] == pytest.approx(0.36)
  assert read["change"]["per_seed"] == pytest.approx({"0": -0.06 / 0.36, "1": -0.2})
  assert read["read_as_change"]
  out = report.build_report("standard", BEFORE, runs)
  assert math.isnan(out["headline"]["anchor_vs_standard_forgetting_change"]["mean"])
  assert "| anchor_vs_standard | 2 | -18.3% [" in report.run_matched_table(out)
  for r in runs:
    if r["method"] == "standard":
      r["forgetting"] = 0.01 if r["seed"] == 0 else -0.01
  read = report.run_matched(runs, "anchor", "standard", "forgetting")
  assert not read["read_as_change"]
  assert read["difference"]["per_seed"] == pytest.approx({"0": 0.29, "1": 0.29})


def test_held_out_runs_are_read_closer_along_the_bend_than_on_the_line():
  """KL = 1 / loss^2 at task losses 4, 3, 2, 1 (one seed), a bend like forgetting's: left out,
  the run at loss 3 (KL 0.1111) reads 0.15625 on the line between its neighbours (+41%), and
  closer along the cubic through the three others; the ends are never left out."""
  runs = [
    {"method": "adamw", "seed": 0, "learning_rate": lr, "task_loss": loss, "retain_kl": loss**-2}
    for lr, loss in ((1e-5, 4.0), (2e-5, 3.0), (4e-5, 2.0), (8e-5, 1.0))
  ]
  rows = report.held_out_readings(runs, "adamw", "retain_kl")
  assert [r["learning_rate"] for r in rows] == [2e-5, 4e-5]
  first = rows[0]
  assert first["value"] == pytest.approx(1 / 9) and first["line"] == pytest.approx(0.15625)
  for row in rows:
    assert abs(row["cubic"] - row["value"]) < abs(row["line"] - row["value"])
  table = report.held_out_table(runs, "adamw", "retain_kl")
  assert "| 0 | 2e-05 | 0.1111 | 0.1562 (+40.6%) |" in table
  assert "line: mean error +" in table and "over 2 runs" in table


def test_an_overlap_of_one_point_fills_the_middle_column_of_the_overlap_table():
  """Two methods whose sweeps share one task loss: the table over the overlap has a cell for
  each of its five columns, the reading in the middle, not one cell under "low end"."""
  runs = _sweep("standard", (0,), [(1e-4, 2.0, 0.2), (1e-3, 1.0, 0.4)])
  runs += _sweep("anchor", (0,), [(1e-4, 1.0, 0.3), (1e-3, 0.5, 0.5)])
  table = report.relative_change_table(report.build_report("standard", BEFORE, runs))
  assert "| anchor_vs_standard | - | - | -25.0% at 1.0000 | - | - |" in table


def test_sweeps_of_one_rate_have_no_overlap_and_read_not_reached():
  # One rate per method, two seeds at different losses: no loss lies within every seed's sweep.
  runs = [
    _run(m, 1e-3, seed, 1.0 + 0.1 * seed + 0.05 * i, 0.5)
    for i, m in enumerate(["standard", "finch"])
    for seed in (0, 1)
  ]
  span = report.overlap(report._per_seed_sweeps(runs), "task_loss", False)
  assert span["methods"] == [] and math.isnan(span["middle"])
  out = report.build_report("standard", BEFORE, runs)
  assert math.isnan(out["methods"]["finch"]["forgetting"])


def test_a_pair_without_overlap_has_no_headline_even_where_some_seeds_reach_the_target():
  """The method's seed 1 ran one rate: no task loss lies within both its seeds' sweeps, so the
  pair has no headline, though seed 0 alone reaches the reference's middle (1.5)."""
  runs = _sweep("standard", (0, 1), [(1e-4, 2.0, 0.2), (1e-3, 1.0, 0.4)])
  runs += _sweep("anchor", (0,), [(1e-4, 2.0, 0.1), (1e-3, 1.0, 0.3)])
  runs += [_run("anchor", 1e-3, 1, 0.9, 0.3)]
  headline = report.build_report("standard", BEFORE, runs)["headline"]
  pair = headline["anchor_vs_standard_forgetting_change"]
  assert math.isnan(pair["task_loss"]) and math.isnan(pair["mean"]) and pair["seeds"] == 0
  assert math.isnan(pair["forgetting"])
  assert "anchor_vs_standard_forgetting_change: not reached" in report.markdown_table(
    report.build_report("standard", BEFORE, runs)
  )


def _diagram(confidence, accuracy):
  return {"bin_start": [0.5], "share": [1.0], "confidence": [confidence], "accuracy": [accuracy]}


def test_the_reliability_diagram_shows_the_base_and_each_methods_matched_run(tmp_path):
  runs = [
    {
      **r,
      "probes_reliability_before": _diagram(0.6, 0.7),
      "probes_reliability_after": _diagram(0.8, 0.5 if r["method"] == "standard" else 0.7),
    }
    for r in RUNS
  ]
  out = report.build_report("standard", BEFORE, runs)
  assert report.reliability_sets(runs) == ["probes"]
  figure = report.plot_reliability(out)
  labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
  assert labels[0] == "base model" and len(labels) == 4  # the base and three methods
  lines = figure.axes[0].get_lines()[1:]  # after the diagonal
  assert [tuple(line.get_ydata()) for line in lines] == [(0.7,), (0.5,), (0.7,), (0.7,)]
  report.write_report(str(tmp_path), out)
  assert (tmp_path / "reliability.png").stat().st_size > 10_000
  report.write_report(str(tmp_path / "without"), report.build_report("standard", BEFORE, RUNS))
  assert not (tmp_path / "without" / "reliability.png").exists()
