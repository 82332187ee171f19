"""Reading a comparison: forgetting at matched task loss, the report's tables and its plots.

FINCH changes the effective learning rate, so comparing methods at one nominal rate only shows
that larger steps learn more and forget more. Each method therefore runs a short sweep of
learning rates over several seeds; along each sweep (ordered by rate, keeping only points where
a higher rate gives a lower task loss) forgetting is interpolated at a common task loss: on the
line between two runs, along the monotone cubic through three or more (`interpolate`). The
same is done at matched task accuracy: fact recall, else exact answers, else token accuracy,
the first the runs all have that tells them apart (exact match of paragraph-long answers is 0
at every run, so such a study is matched at token accuracy).

Which task loss: every sweep (one method and seed) spans a range of task losses; the ranges of
the most methods overlap on an interval (`overlap`; a method whose sweeps miss it is read only
pairwise), and the common reading is at its arithmetic middle, where every sweep is interpolated
between two of its own points rather than at the end of one of them. Each pair of methods (a
method against the baseline, "X+finch" against X) is also read over the whole of its overlap, on
a grid of `GRID_POINTS` targets: the relative change of every forgetting measure as a function
of the target (report.json's `relative_change`, the plot relative_change.png).

Uncertainty: seeds are interpolated one by one and every seed's value is kept; a figure is the
mean over seeds with a 95% t-interval (t with n - 1 degrees of freedom), none with one seed. A
relative change pairs the seeds both methods have, and is given only where the reference's value
is clearly above 0 (`relative_is_read`); elsewhere the paired difference is. The cost column
times the methods' steps in alternating rounds; the step-time ratio is the median of the rounds'
paired ratios with a distribution-free interval from order statistics, and reads "within noise"
when that interval covers 1.

Convergence: where every run was evaluated often enough along the way (`finch_jax.convergence`),
the report also reads each run where its exact-match task accuracy first reaches the plateau every
method attains, and at lower targets on the way: the steps it took and the forgetting by then.

Calibration: where the runs keep a fact set's reliability diagram (`NAME_reliability_before`
and `_after`, from the calibration sets), reliability.png shows the base model's and each
method's run nearest the matched task loss.

A study kept across sessions is a directory of run summaries (`runs/METHOD/NAME.json`, one per
finished run) and `study.json` (the baseline, the methods' order, the step timings); `python -m
finch_jax.report DIR` rebuilds report.json, report.md and the plots there from those files alone
(`--held_out METHOD` checks the sweep reading against runs left out).

Run by run: each pair is also read with every run of the method against the reference's sweep of
its own seed at the run's own task loss (`run_matched`), which needs no task loss common to
every seed.

Pure: this module reads finished runs (dicts) and writes files; it runs nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import numbers
import os
import statistics
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from etils import epath
from matplotlib.figure import Figure
from scipy.interpolate import PchipInterpolator

from finch_jax import convergence, files
from finch_jax.intervals import (
  CONFIDENCE,
  INTERVAL_NOTE,
  SEED_INTERVAL,
  formatted,
  median_interval,
  seed_interval,
)

# A method named "X+finch" (or "X+finch_READING", naming FINCH's reading) is method X with FINCH
# on top, compared with X as well as with the baseline.
COMBINED_SUFFIX = "+finch"
GRID_POINTS = 9  # targets across each pair's overlap (odd: the middle is one of them)
MIDDLE = "the arithmetic middle of the overlap of every sweep's range"
STUDY_FILE = "study.json"  # in a results directory: baseline, methods, step timings
# One alternating timing `{method: seconds per step in each round}`, or a list of sessions
# (`timing_sessions`).
Timings = Mapping[str, Sequence[float]] | Sequence[Mapping[str, Any]]
STORE_RUNS = "runs"  # in a results directory: one summary per run, runs/METHOD/NAME.json


def step_time_ratios(
  step_times: Mapping[str, Sequence[float]], baseline: str
) -> dict[str, dict[str, Any]]:
  """Each method's step time against the baseline's, from rounds timed in turn.

  `step_times[name][i]` is the seconds per step of `name` in round i; the rounds pair the
  methods, so a load that comes and goes on the machine touches both sides of a ratio alike.

  Returns:
    `{name: {"step_time": median seconds, "rounds": [...], "ratio", "ci", "coverage",
    "within_noise"}}`; `ratio` is the median of the paired ratios, `within_noise` whether its
    interval covers 1.
  """
  out = {}
  base = step_times[baseline]
  for name, times in step_times.items():
    ratios = [t / b for t, b in zip(times, base, strict=True)]
    ratio = median_interval(ratios)
    out[name] = {
      "step_time": statistics.median(times),
      "rounds": [float(t) for t in times],
      "ratio": ratio["median"],
      "ci": ratio["ci"],
      "coverage": ratio["coverage"],
      "within_noise": bool(ratio["ci"][0] <= 1.0 <= ratio["ci"][1]),
    }
  return out


def timing_sessions(step_times: Any) -> list[dict[str, dict[str, Any]]]:
  """Step timings as a list of sessions, each `{"step_times": {method: seconds per step in each
  round}, "fingerprints": {method: the config key it was timed under}}` timed together, the
  baseline among them: a list of sessions as it is, one mapping of rounds as one session
  without keys, nothing (or an empty mapping) as none."""
  if not step_times:
    return []
  if isinstance(step_times, Mapping):
    return [{"step_times": dict(step_times), "fingerprints": {}}]
  return [
    {"step_times": dict(s["step_times"]), "fingerprints": dict(s.get("fingerprints", {}))}
    for s in step_times
  ]


def session_ratios(step_times: Timings, baseline: str) -> dict[str, dict[str, Any]]:
  """`step_time_ratios` of each timing session (`timing_sessions`) that holds the baseline, a
  method read from the latest session that timed it."""
  out: dict[str, dict[str, Any]] = {}
  for session in timing_sessions(step_times):
    if baseline in session["step_times"]:
      out.update(step_time_ratios(session["step_times"], baseline))
  return out


# ----- interpolation at matched task loss ------------------------------------------------------


def monotone_sweep(points: Sequence[Mapping[str, float]], key: str, increasing: bool) -> list:
  """Points sorted by learning rate, cut where a higher rate stops improving `key`.

  `increasing=False` for a loss (a higher rate should lower it), True for an accuracy.
  """
  ordered = sorted(points, key=lambda p: p["learning_rate"])
  kept = ordered[:1]
  for point in ordered[1:]:
    better = point[key] > kept[-1][key] if increasing else point[key] < kept[-1][key]
    if not better:
      break
    kept.append(point)
  return kept


def interpolate(
  points: Sequence[Mapping[str, float]],
  key: str,
  target: float,
  value: str,
  increasing: bool = False,
  line: bool = False,
) -> float:
  """`value` at `key == target` along a monotone sweep; NaN when the sweep does not reach it.

  Between two runs, straight; along three or more, the monotone cubic through them (PCHIP;
  `line=True`: straight lines between neighbouring runs, which the report prints beside the
  headline, since where rates lie far apart the two readings can differ by more than the seeds):
  forgetting grows faster than linearly as the task loss falls, so a straight line between two
  rates reads it too high in between (by 8-13% of the KL at a rate left out of a dense sweep, in
  both SmolLM2 settings), where the cubic follows the sweep's bend without overshooting its
  runs. The rate is read the same way on a log scale.
  """
  sweep = monotone_sweep(points, key, increasing)
  keys = [p[key] for p in sweep]
  if not keys or not min(keys) <= target <= max(keys):
    return float("nan")
  if len(sweep) == 1:
    return sweep[0][value]
  order = sorted(range(len(sweep)), key=lambda i: keys[i])
  x = np.array([keys[i] for i in order])
  y = np.array([sweep[i][value] for i in order], dtype=float)
  if value == "learning_rate":  # rates were swept on a log scale
    return float(np.exp(interpolate_monotone(x, np.log(y), target, line)))
  return float(interpolate_monotone(x, y, target, line))


def interpolate_monotone(x: np.ndarray, y: np.ndarray, target: float, line: bool = False) -> float:
  """y at `target` along strictly increasing `x`: linear between two points (or `line`), PCHIP
  along more."""
  if len(x) == 2 or line:
    return float(np.interp(target, x, y))
  return float(PchipInterpolator(x, y)(target))


def overlap(
  sweeps: Mapping[str, Sequence[Sequence[Mapping[str, float]]]], key: str, increasing: bool = False
) -> dict[str, Any]:
  """The range of `key` at which the most methods can be read, every seed of them, and its middle.

  A sweep (one method and seed) can be read between the worst and the best `key` of its
  monotone part. Where one value lies within every sweep, the overlap is the range every sweep
  reaches. Otherwise no value serves all methods: the overlap is that of the methods served at
  the best value the sweeps of the most methods all span, and the others read NaN there (their
  sweeps start beyond it or end before it; `build_report` compares them pairwise).

  Returns:
    `{"lo", "hi", "middle", "methods"}`: the range, its arithmetic middle (the target every
    method is read at), and the methods served; NaN and no methods when there is no sweep.
  """
  spans: dict[str, list[tuple[float, float]]] = {}
  for method, method_sweeps in sweeps.items():
    spans[method] = []
    for points in method_sweeps:
      values = [p[key] for p in monotone_sweep(points, key, increasing)]
      if values:
        spans[method].append((min(values), max(values)))
  candidates = sorted({v for ranges in spans.values() for r in ranges for v in r})
  if not candidates:
    return {"lo": float("nan"), "hi": float("nan"), "middle": float("nan"), "methods": []}

  def served(target: float) -> list[str]:
    return [m for m, ranges in spans.items() if ranges and all(a <= target <= b for a, b in ranges)]

  most = max(len(served(t)) for t in candidates)
  best = [t for t in candidates if len(served(t)) == most]
  methods = served(max(best) if increasing else min(best))
  if not methods:  # no value lies within every seed's sweep of any method (e.g. one rate each)
    return {"lo": float("nan"), "hi": float("nan"), "middle": float("nan"), "methods": []}
  lo = max(a for m in methods for a, _ in spans[m])
  hi = min(b for m in methods for _, b in spans[m])
  return {"lo": lo, "hi": hi, "middle": (lo + hi) / 2, "methods": methods}


def _per_seed_sweeps(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[list[Mapping]]]:
  """`{method: [runs of seed s, for each seed]}`."""
  out: dict[str, dict[int, list]] = {}
  for run in runs:
    out.setdefault(run["method"], {}).setdefault(run["seed"], []).append(run)
  return {m: [by_seed[s] for s in sorted(by_seed)] for m, by_seed in out.items()}


def _seed_means(runs: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, float]]:
  by_rate: dict[float, list] = {}
  for run in runs:
    by_rate.setdefault(run["learning_rate"], []).append(run)
  return [
    {"learning_rate": lr, **{k: float(np.mean([r[k] for r in rs])) for k in keys}}
    for lr, rs in sorted(by_rate.items())
  ]


def matched(
  runs: Sequence[Mapping[str, Any]],
  key: str,
  value: str,
  increasing: bool = False,
  target: float | None = None,
  line: bool = False,
) -> dict[str, Any]:
  """For every method in `runs`, `value` at `key == target`, per seed and over seeds.

  `target` None: the middle of the overlap of the sweeps (`overlap`). `line`: read on straight
  lines between the runs (`interpolate`).

  Returns:
    `{"target", "overlap", "methods": {name: {value: mean, f"{value}_ci": [lo, hi], "per_seed":
    {seed: {value, "learning_rate"}}, "learning_rate", "seeds_reaching_target"}}}`.
  """
  sweeps = _per_seed_sweeps(runs)
  span = overlap(sweeps, key, increasing)
  target = span["middle"] if target is None else target
  out = {"target": target, "overlap": span, "methods": {}}
  for method, seed_sweeps in sweeps.items():
    per_seed = {
      points[0]["seed"]: {
        value: interpolate(points, key, target, value, increasing, line),
        "learning_rate": interpolate(points, key, target, "learning_rate", increasing, line),
      }
      for points in seed_sweeps
    }
    summary = seed_interval({s: p[value] for s, p in per_seed.items()})
    rates = [p["learning_rate"] for p in per_seed.values() if math.isfinite(p["learning_rate"])]
    out["methods"][method] = {
      value: summary["mean"],
      f"{value}_ci": summary["ci"],
      "per_seed": per_seed,
      # The rates were swept on a log scale: their geometric mean.
      "learning_rate": math.exp(statistics.fmean(map(math.log, rates))) if rates else math.nan,
      "seeds_reaching_target": summary["n"],
    }
  return out


def _relative(value: float, reference: float) -> float:
  """(value - reference) / |reference|: the relative change every reading of the report gives."""
  return (value - reference) / abs(reference)


def relative_change(
  per_seed: Mapping[Any, Mapping[str, float]],
  baseline: Mapping[Any, Mapping[str, float]],
  value: str,
) -> dict[str, Any]:
  """(method - baseline) / |baseline| over the seeds both have, as `seed_interval` gives it.

  A seed where the baseline's value is 0 has no relative change and is left out.
  """
  changes = {
    s: _relative(per_seed[s][value], baseline[s][value])
    for s in per_seed
    if s in baseline and baseline[s][value] != 0
  }
  return seed_interval(changes)


def run_matched(
  runs: Sequence[Mapping[str, Any]], method: str, reference: str, measure: str
) -> dict[str, Any]:
  """Each run of `method` against `reference`'s sweep of the same seed, read at the run's own
  task loss: the reading that needs no task loss common to every seed (where a method's seeds
  land too far apart for one, the matched reading at a common target has nothing to read).

  A seed's change is the mean of its runs' relative changes; the interval is over seeds
  (`seed_interval`). Runs outside their seed's reference sweep are left out. Where the
  reference's values are not clearly above 0 (`relative_is_read`, on each seed's mean),
  `read_as_change` is False and the paired `difference` is the figure to read.

  Returns:
    `{"runs": [{"seed", "learning_rate", "task_loss", "value", "reference_value", "change"}],
    "change": seed_interval, "difference": seed_interval, "read_as_change": bool}`.
  """
  sweeps = {points[0]["seed"]: points for points in _per_seed_sweeps(runs).get(reference, [])}
  rows, by_seed = [], {}
  for run in runs:
    if run["method"] != method or run["seed"] not in sweeps:
      continue
    theirs = interpolate(sweeps[run["seed"]], "task_loss", run["task_loss"], measure)
    if not math.isfinite(theirs) or theirs == 0:
      continue
    row = {
      "seed": run["seed"],
      "learning_rate": run["learning_rate"],
      "task_loss": run["task_loss"],
      "value": run[measure],
      "reference_value": theirs,
      "change": _relative(run[measure], theirs),
    }
    rows.append(row)
    by_seed.setdefault(run["seed"], []).append(row)
  mean = lambda seed_rows, k: statistics.fmean(r[k] for r in seed_rows)  # noqa: E731
  seed_references = {
    s: {"reference_value": mean(rs, "reference_value")} for s, rs in by_seed.items()
  }
  return {
    "runs": rows,
    "change": seed_interval({s: mean(rs, "change") for s, rs in by_seed.items()}),
    "difference": seed_interval(
      {s: mean(rs, "value") - mean(rs, "reference_value") for s, rs in by_seed.items()}
    ),
    "read_as_change": relative_is_read({"per_seed": seed_references}),
  }


def change_curve(
  runs: Sequence[Mapping[str, Any]],
  method: str,
  reference: str,
  key: str,
  measures: Sequence[str],
  increasing: bool = False,
  points: int = GRID_POINTS,
) -> dict[str, Any]:
  """`method` against `reference` over the whole overlap of their sweeps: at `points` targets of
  `key` from one end of the overlap to the other, the relative change of each measure, seeds
  paired (`relative_change`).

  Where the reference's value is not clearly above 0 over the seeds at a target
  (`relative_is_read`), a relative change there divides by noise or reads backwards:
  `read_as_change` says so target by target, and `differences` holds the paired difference to
  read instead.

  Returns:
    `{"lo", "hi", "middle", "targets": [...], "measures": {measure: [seed_interval per
    target]}, "differences": {measure: [seed_interval per target]}, "read_as_change": {measure:
    [bool per target]}}`; no targets when the two methods' sweeps do not overlap.
  """
  pair = [r for r in runs if r["method"] in (method, reference)]
  span = overlap(_per_seed_sweeps(pair), key, increasing)
  both = {method, reference} <= set(span["methods"])
  if not both:
    targets = []
  elif span["lo"] == span["hi"]:
    targets = [span["lo"]]
  else:
    targets = [span["lo"] + (span["hi"] - span["lo"]) * i / (points - 1) for i in range(points)]
  curves: dict[str, list] = {m: [] for m in measures}
  differences: dict[str, list] = {m: [] for m in measures}
  read_as_change: dict[str, list] = {m: [] for m in measures}
  for target in targets:
    for measure in measures:
      read = matched(pair, key, measure, increasing, target=target)["methods"]
      ours, theirs = read[method]["per_seed"], read[reference]["per_seed"]
      curves[measure].append(relative_change(ours, theirs, measure))
      paired = [s for s in ours if s in theirs]
      differences[measure].append(
        seed_interval({s: ours[s][measure] - theirs[s][measure] for s in paired})
      )
      references = {s: {"reference_value": theirs[s][measure]} for s in paired}
      read_as_change[measure].append(relative_is_read({"per_seed": references}))
  lo, hi, middle = (span[k] if both else float("nan") for k in ("lo", "hi", "middle"))
  return {
    "lo": lo,
    "hi": hi,
    "middle": middle,
    "targets": targets,
    "measures": curves,
    "differences": differences,
    "read_as_change": read_as_change,
  }


# ----- the report ------------------------------------------------------------------------------

# What each forgetting measure of a run is (lower is better for all of them).
FORGETTING_MEASURES = {
  "forgetting": "rise of the retain loss (nats per token)",
  "retain_accuracy_drop": "drop of the retain fact-recall accuracy",
  "retain_kl": "KL(base || fine-tuned) of next-token distributions on the retain text",
  "retain_nll_rise": "rise of the retain facts' answer NLL per token (forgetting in confidence)",
}
# Task scores a comparison can be matched at, higher is better: fact recall, else exact answers,
# else token accuracy.
TASK_ACCURACIES = ("task_fact_accuracy", "task_exact", "task_accuracy")


def _ordered(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """The runs as plain dicts, methods in order of first appearance, each by rate then seed."""
  order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in runs))}
  key = lambda r: (order[r["method"]], r["learning_rate"], r["seed"])  # noqa: E731
  return [dict(r) for r in sorted(runs, key=key)]


def without_finch(name: str) -> str:
  """The method a combined method puts FINCH on: "X" for "X+finch" and "X+finch_target";
  `name` itself otherwise."""
  base, combined, _ = name.rpartition(COMBINED_SUFFIX)
  return base if combined and base else name


def _pairs(methods: Sequence[str], baseline: str) -> list[tuple[str, str]]:
  """(method, reference): each method against the baseline, and "X+finch" against X."""
  pairs = []
  for name in methods:
    references = [baseline, without_finch(name)]
    for reference in dict.fromkeys(references):
      if reference != name and reference in methods:
        pairs.append((name, reference))
  return pairs


def _matchings(runs: Sequence[Mapping]) -> list[tuple[str, bool]]:
  """(key, increasing) of what the runs can be matched at: task loss, and the first task
  accuracy the runs all have that tells them apart (exact match of paragraph-long answers is 0
  at every run, and a score every run shares has no middle to read at)."""
  accuracy = next(
    (a for a in TASK_ACCURACIES if all(a in r for r in runs) and len({r[a] for r in runs}) > 1),
    None,
  )
  return [("task_loss", False)] + [(accuracy, True)] * bool(accuracy)


def _measures(runs: Sequence[Mapping]) -> list[str]:
  return [m for m in FORGETTING_MEASURES if all(m in r for r in runs)]


def build_report(
  baseline: str,
  before: Mapping[str, float],
  runs: Sequence[Mapping],
  step_times: Timings | None = None,
) -> dict[str, Any]:
  """report.json's content: methods at matched task loss, the headlines, the relative changes
  over the whole overlap, every run.

  `baseline` names the method the others are measured against. `step_times[name][i]` (seconds
  per step of each method in round i of an alternating timing, `sweep.measure_step_times`), or
  a list of such timings (`timing_sessions`, a method read from the latest that timed it), give
  the cost column; a method without them has the ratio of the median step times logged in the
  runs, marked as such.
  """
  runs = _ordered(runs)
  by_loss = matched(runs, "task_loss", "forgetting")
  span = by_loss["overlap"]
  report = {
    "matched_on": "task_loss",
    "target_task_loss": by_loss["target"],
    "overlap_task_loss": [span["lo"], span["hi"]],
    "overlap_methods": span["methods"],
    "target_rule": MIDDLE,
    "interval": f"mean over seeds with its {CONFIDENCE:.0%} {SEED_INTERVAL} "
    "(t with n - 1 degrees of freedom); none with one seed",
    "baseline": baseline,
    "methods": _methods_at(by_loss, before, runs, baseline, step_times or {}),
    "headline": _headlines(runs, baseline),
    "relative_change": change_curves(runs, baseline),
    "before": dict(before),
    "runs": runs,
  }
  if all("task_fact_accuracy" in r and "retain_accuracy_drop" in r for r in runs):
    by_acc = matched(runs, "task_fact_accuracy", "retain_accuracy_drop", increasing=True)
    keys = ("retain_accuracy_drop", "retain_accuracy_drop_ci", "learning_rate")
    report["at_matched_accuracy"] = {
      "target_task_fact_accuracy": by_acc["target"],
      "methods": {
        name: {
          **{k: e[k] for k in keys},
          "retain_accuracy_drop_per_seed": {
            str(s): v["retain_accuracy_drop"] for s, v in e["per_seed"].items()
          },
          "seeds_reaching_target": e["seeds_reaching_target"],
        }
        for name, e in by_acc["methods"].items()
      },
    }
  report["measures"] = every_measure(runs)
  if convergence.eligible(runs):
    times = {name: m["step_time"] for name, m in report["methods"].items()}
    report["convergence"] = convergence.convergence(runs, before, step_times=times)
  report["code_versions"] = sorted({r["code_version"] for r in runs if "code_version" in r})
  return report


def change_curves(runs: Sequence[Mapping], baseline: str) -> dict[str, dict[str, Any]]:
  """`change_curve` of every pair (`_pairs`) and every forgetting measure the runs hold, against
  the target task loss and, where the runs have one, the target task accuracy:
  `{key: {"METHOD_vs_REFERENCE": curve}}`."""
  methods = list(dict.fromkeys(r["method"] for r in runs))
  measures = _measures(runs)
  return {
    key: {
      f"{name}_vs_{reference}": change_curve(runs, name, reference, key, measures, increasing)
      for name, reference in _pairs(methods, baseline)
    }
    for key, increasing in _matchings(runs)
  }


def every_measure(runs: Sequence[Mapping]) -> dict[str, Any]:
  """Every forgetting measure the runs hold, read at the middle of the overlap of task loss and,
  where the runs have a task accuracy, of task accuracy: `{"task_loss": {...}, ACCURACY:
  {...}}`, each `{"target": ..., "measures": {measure: {method: {"mean", "ci", "seeds",
  "per_seed", "learning_rate"}}}}`."""
  out = {}
  for key, increasing in _matchings(runs):
    target, by_measure = float("nan"), {}
    for measure in _measures(runs):
      result = matched(runs, key, measure, increasing=increasing)
      target = result["target"]
      by_measure[measure] = {
        name: {
          "mean": e[measure],
          "ci": e[f"{measure}_ci"],
          "seeds": e["seeds_reaching_target"],
          "per_seed": {str(s): v[measure] for s, v in e["per_seed"].items()},
          "learning_rate": e["learning_rate"],
        }
        for name, e in result["methods"].items()
      }
    out[key] = {"target": target, "measures": by_measure}
  return out


def _methods_at(
  by_loss: Mapping[str, Any],
  before: Mapping[str, float],
  runs: Sequence[Mapping],
  baseline: str,
  step_times: Timings,
) -> dict[str, dict[str, Any]]:
  """Each method's entry of report.json at the matched task loss, with its cost column."""
  timed = session_ratios(step_times, baseline)
  logged = {
    name: statistics.median(r["step_time"] for r in runs if r["method"] == name)
    for name in by_loss["methods"]
  }
  methods = {}
  for name, entry in by_loss["methods"].items():
    method_runs = [r for r in runs if r["method"] == name]
    methods[name] = {
      "task_loss": by_loss["target"],
      "retain_loss_before": before["retain_loss"],
      "retain_loss_after": before["retain_loss"] + entry["forgetting"],
      "forgetting": entry["forgetting"],
      "forgetting_ci": entry["forgetting_ci"],
      "forgetting_per_seed": {str(s): v["forgetting"] for s, v in entry["per_seed"].items()},
      "learning_rate": entry["learning_rate"],
      "seeds_reaching_target": entry["seeds_reaching_target"],
      "step_time_in_runs": logged[name],
      "optimizer_state_bytes": method_runs[0]["optimizer_state_bytes"],
      "held_bytes": method_runs[0]["held_bytes"],
    }
    if name in timed:
      cost = timed[name]
      methods[name].update(
        step_time=cost["step_time"],
        step_time_rounds=cost["rounds"],
        step_time_ratio=cost["ratio"],
        step_time_ratio_ci=cost["ci"],
        step_time_ratio_coverage=cost["coverage"],
        step_time_within_noise=cost["within_noise"],
        step_time_source="alternating rounds",
      )
    else:
      methods[name].update(step_time=logged[name], step_time_source="the runs' logs")
      if baseline in logged:
        methods[name]["step_time_ratio"] = logged[name] / logged[baseline]
  if baseline in methods:
    base_bytes = methods[baseline]["held_bytes"]
    for entry in methods.values():
      entry["extra_bytes"] = entry["held_bytes"] - base_bytes
  return methods


def _headlines(runs: Sequence[Mapping], baseline: str) -> dict[str, dict[str, Any]]:
  """Each method against the baseline, and "X+finch" against X, at the middle of the overlap of
  the two methods' sweeps.

  Pairwise, so that a method that cannot reach low losses does not move every other comparison
  up to its level.
  """
  headline = {}
  methods = list(dict.fromkeys(r["method"] for r in runs))
  for name, reference in _pairs(methods, baseline):
    pair_runs = [r for r in runs if r["method"] in (name, reference)]
    pair = matched(pair_runs, "task_loss", "forgetting")
    both = {name, reference} <= set(pair["overlap"]["methods"])
    ours, theirs = pair["methods"][name]["per_seed"], pair["methods"][reference]["per_seed"]
    line_change = seed_interval({})
    if both:
      # The same pair read on straight lines between the rates: how much the reading itself
      # moves the figure where the sweeps are coarse.
      on_lines = matched(pair_runs, "task_loss", "forgetting", target=pair["target"], line=True)
      line_change = relative_change(
        on_lines["methods"][name]["per_seed"],
        on_lines["methods"][reference]["per_seed"],
        "forgetting",
      )
    else:
      # No task loss within every seed's sweep of both: nothing is read for the pair (not the
      # seeds that happen to reach a target only one of the two methods set).
      ours, theirs = {}, {}
    change = relative_change(ours, theirs, "forgetting")
    forgetting, reference_forgetting = _paired_means(ours, theirs, "forgetting")
    headline[f"{name}_vs_{reference}_forgetting_change"] = {
      "mean": change["mean"],
      "ci": change["ci"],
      "seeds": change["n"],
      "per_seed": change["per_seed"],
      "task_loss": pair["target"] if both else float("nan"),
      "overlap_task_loss": [pair["overlap"][k] if both else float("nan") for k in ("lo", "hi")],
      "forgetting": forgetting,
      "reference_forgetting": reference_forgetting,
      "change_on_lines": line_change,
      "run_matched": {m: run_matched(pair_runs, name, reference, m) for m in _measures(pair_runs)},
      "measures": _pair_measures(runs, name, reference, pair["target"] if both else None),
    }
  return headline


def _paired_means(
  ours: Mapping[Any, Mapping[str, float]], theirs: Mapping[Any, Mapping[str, float]], key: str
) -> tuple[float, float]:
  """The means of `key` for two methods over the seeds where both have a value, the seeds their
  relative change and difference are read on: a method screened at one seed is set beside the
  reference's value at that seed, not the reference's mean over seeds it never ran."""
  both = [
    s for s in ours if s in theirs and math.isfinite(ours[s][key]) and math.isfinite(theirs[s][key])
  ]
  ours_mean, theirs_mean = (
    seed_interval({s: side[s][key] for s in both})["mean"] for side in (ours, theirs)
  )
  return ours_mean, theirs_mean


def _pair_measures(
  runs: Sequence[Mapping], name: str, reference: str, target: float | None
) -> dict[str, dict[str, Any]]:
  """Every forgetting measure of `name` and `reference` at task loss `target` (the middle of the
  pair's overlap; None where they do not overlap), with the relative change and the difference,
  seeds paired (the values too are means over the paired seeds): `{measure: {"value",
  "reference_value", "change": seed_interval, "difference": seed_interval, "per_seed": {seed:
  {"value", "reference_value"}}}}`.

  The difference is what to read where the reference is near 0 (a measure such as the answer-NLL
  rise, whose seeds fall on both sides of 0): a relative change there divides by noise."""
  pair = [r for r in runs if r["method"] in (name, reference)]
  out = {}
  for measure in _measures(pair):
    if target is None:
      nan = float("nan")
      out[measure] = {
        "value": nan,
        "reference_value": nan,
        "change": seed_interval({}),
        "difference": seed_interval({}),
        "per_seed": {},
      }
      continue
    read = matched(pair, "task_loss", measure, target=target)["methods"]
    ours, theirs = read[name]["per_seed"], read[reference]["per_seed"]
    value, reference_value = _paired_means(ours, theirs, measure)
    out[measure] = {
      "value": value,
      "reference_value": reference_value,
      "change": relative_change(ours, theirs, measure),
      "difference": seed_interval(
        {s: ours[s][measure] - theirs[s][measure] for s in ours if s in theirs}
      ),
      "per_seed": {
        str(s): {"value": ours[s][measure], "reference_value": theirs[s][measure]}
        for s in ours
        if s in theirs
      },
    }
  return out


def single_run_report(
  name: str, learning_rate: float, before: Mapping, after: Mapping
) -> dict[str, Any]:
  """report.json for one fine-tuning run (no sweep, so nothing to match)."""
  entry = {
    "task_loss": after["task_loss"],
    "retain_loss_before": before["retain_loss"],
    "retain_loss_after": after["retain_loss"],
    "forgetting": after["retain_loss"] - before["retain_loss"],
    "learning_rate": learning_rate,
  }
  for key in ("task_fact_accuracy", "retain_fact_accuracy"):
    if key in after:
      entry[key] = after[key]
  return {"matched_on": None, "methods": {name: entry}, "before": dict(before), "runs": []}


# ----- output ----------------------------------------------------------------------------------


def _change(entry: Mapping[str, Any]) -> str:
  """A relative change as "-16.4% [-19.0%, -13.8%], n=2"."""
  mean, (lo, hi), n = entry["mean"], entry["ci"], entry.get("n", entry.get("seeds"))
  if not math.isfinite(mean):
    return "not reached"
  text = f"{100 * mean:+.1f}%"
  if math.isfinite(lo) and math.isfinite(hi):
    text += f" [{100 * lo:+.1f}%, {100 * hi:+.1f}%]"
  return f"{text}, n={n}"


def _cost(entry: Mapping[str, Any], baseline: bool) -> str:
  """The step-time ratio cell: "1.012 [0.981, 1.046] within noise", or "(logs)" for a ratio of
  the step times the runs logged."""
  ratio = entry.get("step_time_ratio")
  if ratio is None:
    return "-"
  if baseline:
    return "1 (baseline)"
  if entry.get("step_time_source") != "alternating rounds":
    return f"{ratio:.3f} (logs)"
  lo, hi = entry["step_time_ratio_ci"]
  text = f"{ratio:.3f} [{lo:.3f}, {hi:.3f}]"
  if entry["step_time_ratio_coverage"] < CONFIDENCE:
    text += f" ({entry['step_time_ratio_coverage']:.0%} interval)"
  return text + (" within noise" if entry["step_time_within_noise"] else "")


def memory_size(n: float) -> str:
  """A signed byte count for a reader: "+538.2 MB", "-1.05 GB", "+20 B", "0"."""
  if not n:
    return "0"
  sign, size = ("+" if n > 0 else "-"), abs(n)
  for unit, scale, fmt in (("GB", 1e9, ".2f"), ("MB", 1e6, ".1f"), ("kB", 1e3, ".1f")):
    if size >= scale:
      return f"{sign}{size / scale:{fmt}} {unit}"
  return f"{sign}{size:.0f} B"


def markdown_table(report: Mapping[str, Any]) -> str:
  """The comparison as a Markdown table plus the headline sentences and the relative changes
  over the overlap."""
  lines = []
  if report.get("matched_on"):
    lo, hi = report["overlap_task_loss"]
    methods, served = report["methods"], report["overlap_methods"]
    reach, others = "every sweep reaches", ""
    if len(served) < len(methods):  # `overlap`: the range the sweeps of the most methods share
      reach = f"the sweeps of {len(served)} of the {len(methods)} methods reach"
      others = "; the others are read pairwise below"
    lines.append(
      f"Methods at matched task loss {formatted(report['target_task_loss'], '.4f')}, the "
      f"arithmetic middle of the range {reach} ({formatted(lo, '.4f')} to "
      f"{formatted(hi, '.4f')}{others}), interpolated along each learning-rate sweep; "
      f"{INTERVAL_NOTE}.\n"
    )
    timed = [m for m in report["methods"].values() if "step_time_rounds" in m]
    if timed:
      lines.append(
        f"Step time ratio: median over {len(timed[0]['step_time_rounds'])} alternating rounds "
        "of the paired ratio to the baseline's step, [95% interval from order statistics]; "
        '"within noise" where the interval covers 1.\n'
      )
  lines.append(
    "| method | task loss | retain loss before | retain loss after | forgetting "
    "| learning rate | step time ratio | memory beside the baseline's |"
  )
  lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for name, m in report["methods"].items():
    seeds = m.get("seeds_reaching_target") if report.get("matched_on") else None
    lines.append(
      f"| {name} | {formatted(m['task_loss'], '.4f')} "
      f"| {formatted(m['retain_loss_before'], '.4f')} "
      f"| {formatted(m['retain_loss_after'], '.4f')} "
      f"| {formatted(m['forgetting'], '.4f', m.get('forgetting_ci'), seeds)} "
      f"| {formatted(m.get('learning_rate'), '.3g')} | {_cost(m, name == report.get('baseline'))} "
      f"| {memory_size(m.get('extra_bytes', 0))} |"
    )
  lines += [_headline_text(key, h) for key, h in report.get("headline", {}).items()]
  lines.append(pair_measures_table(report))
  lines.append(per_seed_table(report))
  lines.append(run_matched_table(report))
  lines.append(relative_change_table(report))
  acc = report.get("at_matched_accuracy")
  if acc:
    target = formatted(acc["target_task_fact_accuracy"], ".3f")
    lines.append(f"\nAt matched task fact-recall accuracy {target}:")
    lines.append("\n| method | retain fact-accuracy drop | learning rate |")
    lines.append("| --- | --- | --- |")
    for name, m in acc["methods"].items():
      drop = formatted(
        m["retain_accuracy_drop"], ".4f", m["retain_accuracy_drop_ci"], m["seeds_reaching_target"]
      )
      lines.append(f"| {name} | {drop} | {formatted(m['learning_rate'], '.3g')} |")
  if len(report.get("measures", {}).get("task_loss", {}).get("measures", {})) > 1 or (
    len(report.get("measures", {})) > 1
  ):
    lines.append(measures_table(report))
  if "convergence" in report:
    lines.append(convergence.markdown(report["convergence"], report.get("baseline")))
  return "\n".join(lines)


def _headline_text(key: str, h: Mapping[str, Any]) -> str:
  """One pair's headline sentence: its relative change in forgetting where it was read (the
  difference where the reference is not clearly above 0), with the straight-line reading beside
  it where that differs by a point or more."""
  target = h["task_loss"]
  at = ""
  if math.isfinite(target):
    lo, hi = h["overlap_task_loss"]
    at = f" at matched task loss {target:.4f}, the middle of the pair's overlap {lo:.4f}-{hi:.4f}"
  forgetting = h.get("measures", {}).get("forgetting")
  if forgetting and math.isfinite(target) and not relative_is_read(forgetting):
    return (
      f"\n{key}: {_difference(forgetting['difference'])} (the reference's rise is not "
      f"clearly above 0 over the seeds, so the difference in forgetting, not a relative "
      f"change{at}; seeds paired)"
    )
  text = f"\n{key}: {_change(h)} (relative change in forgetting{at}; seeds paired)"
  on_lines = h.get("change_on_lines", {}).get("mean", float("nan"))
  if math.isfinite(on_lines) and abs(on_lines - h["mean"]) >= 0.01:
    text += f"; on straight lines between the rates: {_change(h['change_on_lines'])}"
  return text


def relative_is_read(entry: Mapping[str, Any]) -> bool:
  """Whether a pair's measure is read as a relative change: every seed's reference value is
  above 0 and, with more than one seed, the 95% interval of the reference's mean leaves 0 out.
  Otherwise the table gives the difference instead: near 0 the change divides by noise (a
  reference of 0.001 at one seed and 0.01 at the next), and below 0 the reference did not forget
  at all (English text that fine-tuning on English definitions made easier), where "54% more"
  of a fall that was smaller reads backwards."""
  refs = {s: v["reference_value"] for s, v in entry.get("per_seed", {}).items()}
  finite = [v for v in refs.values() if math.isfinite(v)]
  if not finite or not all(v > 0 for v in finite):
    return False
  lo, hi = seed_interval(refs)["ci"]
  return not (lo <= 0 <= hi)  # NaN (one seed) compares False: read by its sign alone


def _difference(entry: Mapping[str, Any]) -> str:
  """A difference as "difference -0.0043 [-0.0120, +0.0034], n=3"."""
  return "difference " + formatted(entry["mean"], "+.4f", entry["ci"], entry["n"])


def _change_or_difference(entry: Mapping[str, Any], as_change: bool) -> str:
  """A pair's reading of one measure: its relative change (`entry["change"]`), or with
  `as_change` False (the reference is not clearly above 0, so a relative change would divide by
  noise or read backwards) its difference (`entry["difference"]`)."""
  return _change(entry["change"]) if as_change else _difference(entry["difference"])


def pair_measures_table(report: Mapping[str, Any]) -> str:
  """Each pair at the middle of its own overlap, every forgetting measure: "method / reference
  (relative change)", the change's interval where seeds give one; the difference instead where
  a relative change would divide by noise (`relative_is_read`)."""
  rows = [(key, h) for key, h in report.get("headline", {}).items() if h.get("measures")]
  if not rows:
    return ""
  measures = list(dict.fromkeys(m for _, h in rows for m in h["measures"]))
  lines = [
    "\nEach pair at the middle of its own overlap of task loss, every measure: the method's "
    f"value / the reference's (relative change, seeds paired: {INTERVAL_NOTE}; the difference "
    "where a relative change would divide by noise, `relative_is_read`):\n",
    "| pair | read at | " + " | ".join(measures) + " |",
    "| --- " * (len(measures) + 2) + "|",
  ]
  for key, h in rows:
    pair = key.removesuffix("_forgetting_change")
    if not math.isfinite(h["task_loss"]):
      lines.append(f"| {pair} | no overlap |" + " - |" * len(measures))
      continue
    cells = []
    for measure in measures:
      entry = h["measures"].get(measure)
      if entry is None:
        cells.append("-")
        continue
      values = f"{formatted(entry['value'], '.4f')} / {formatted(entry['reference_value'], '.4f')}"
      as_change = relative_is_read(entry) or "difference" not in entry
      cells.append(f"{values} ({_change_or_difference(entry, as_change)})")
    lines.append(f"| {pair} | {h['task_loss']:.4f} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def per_seed_table(report: Mapping[str, Any]) -> str:
  """`pair_measures_table` seed by seed: each seed's values of the method and its reference at
  the middle of the pair's overlap, and their relative change."""
  rows = [
    (key.removesuffix("_forgetting_change"), h["task_loss"], h["measures"])
    for key, h in report.get("headline", {}).items()
    if h.get("measures") and math.isfinite(h["task_loss"])
  ]
  if not rows:
    return ""
  measures = list(dict.fromkeys(m for *_, by_measure in rows for m in by_measure))
  lines = [
    "\nThe same, seed by seed (the method's value / the reference's (relative change, or the "
    "difference where the table above gives it); "
    '"-" where a seed\'s sweep of one of the two does not reach the point):\n',
    "| pair | read at | seed | " + " | ".join(measures) + " |",
    "| --- " * (len(measures) + 3) + "|",
  ]
  for pair, target, by_measure in rows:
    seeds = sorted(
      {s for m in by_measure.values() for s in m["per_seed"]}, key=lambda s: (len(s), s)
    )
    for seed in seeds:
      cells = []
      for measure in measures:
        read = by_measure.get(measure, {})
        entry = read.get("per_seed", {}).get(seed)
        if entry is None or not all(map(math.isfinite, entry.values())):
          cells.append("-")
          continue
        # The seed's relative change as `relative_change` gave it (none where the reference is
        # 0), or its difference where the pair is read by difference.
        if relative_is_read(read) or "difference" not in read:
          change = read["change"]["per_seed"].get(seed)
          text = f" ({100 * change:+.1f}%)" if change is not None else ""
        else:
          text = f" ({read['difference']['per_seed'][seed]:+.4f})"
        cells.append(f"{entry['value']:.4f} / {entry['reference_value']:.4f}{text}")
      lines.append(f"| {pair} | {target:.4f} | {seed} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def run_matched_table(report: Mapping[str, Any]) -> str:
  """Each pair read run by run (`run_matched`): every run of the method against the reference
  of its seed at the run's own task loss, the relative change of each measure over seeds."""
  rows = [
    (key.removesuffix("_forgetting_change"), h["run_matched"])
    for key, h in report.get("headline", {}).items()
    if any(r["runs"] for r in h.get("run_matched", {}).values())
  ]
  if not rows:
    return ""
  measures = list(dict.fromkeys(m for _, by_measure in rows for m in by_measure))
  lines = [
    "\nEach run against the reference's sweep of its own seed, at the run's own task loss (no "
    "common target needed; relative change, a seed's runs averaged, then "
    f"{INTERVAL_NOTE}; the difference where the reference is not clearly above 0):\n",
    "| pair | runs | " + " | ".join(measures) + " |",
    "| --- " * (len(measures) + 2) + "|",
  ]
  for pair, by_measure in rows:
    n = max(len(r["runs"]) for r in by_measure.values())
    cells = []
    for m in measures:
      entry = by_measure.get(m)
      cells.append("-" if entry is None else _change_or_difference(entry, entry["read_as_change"]))
    lines.append(f"| {pair} | {n} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def relative_change_table(report: Mapping[str, Any]) -> str:
  """The relative change in forgetting of each pair across its overlap (five of the grid's
  targets: its ends, quarters and middle), as Markdown tables; the full grid of every measure is
  in report.json's `relative_change` and relative_change.png."""
  lines = []
  for key, pairs in report.get("relative_change", {}).items():
    rows = [
      (name, c) for name, c in pairs.items() if c["targets"] and "forgetting" in c["measures"]
    ]
    if not rows:
      continue
    lines.append(
      f"\nRelative change in forgetting across each pair's overlap of {key.replace('_', ' ')} "
      '(mean over paired seeds, at the target shown; relative_change.png; "diff": the '
      "difference, where the reference's value is not clearly above 0 over the seeds, "
      "`relative_is_read`):\n"
    )
    lines.append("| pair | low end | 1/4 | middle | 3/4 | high end |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for name, curve in rows:
      n = len(curve["targets"])
      cells = []
      for q in (0, 0.25, 0.5, 0.75, 1):
        if n == 1 and q != 0.5:  # an overlap of one point: its middle alone
          cells.append("-")
          continue
        i = round(q * (n - 1))
        mean = curve["measures"]["forgetting"][i]["mean"]
        text = f"{100 * mean:+.1f}%" if math.isfinite(mean) else "-"
        if not curve.get("read_as_change", {}).get("forgetting", [True] * n)[i]:
          text = f"{curve['differences']['forgetting'][i]['mean']:+.4f} diff"
        cells.append(f"{text} at {curve['targets'][i]:.4f}")
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def measures_table(report: Mapping[str, Any]) -> str:
  """Every forgetting measure at each matching, as Markdown tables (methods in rows)."""
  lines = []
  for key, matching in report.get("measures", {}).items():
    measures = matching["measures"]
    if not measures:
      continue
    methods = list(next(iter(measures.values())))
    lines.append(
      f"\nAt matched {key.replace('_', ' ')} {formatted(matching['target'], '.4f')} "
      f"(the middle of the overlap; {INTERVAL_NOTE}):\n"
    )
    lines.append("| method | " + " | ".join(measures) + " |")
    lines.append("| --- " * (len(measures) + 1) + "|")
    for name in methods:
      entries = [measures[m][name] for m in measures]
      cells = [formatted(e["mean"], ".4f", e["ci"], e["seeds"]) for e in entries]
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(f"- {m}: {FORGETTING_MEASURES[m]}" for m in measures)
  return "\n".join(lines)


def write_report(workdir: str | os.PathLike, report: Mapping[str, Any]) -> None:
  """Writes report.json, report.md and the plots into `workdir` (local or `gs://...`), each
  whole or not at all (`finch_jax.files`)."""
  directory = epath.Path(workdir)
  files.write_json(directory / "report.json", report, indent=2)
  files.write_text(
    directory / "report.md", "# Forgetting report\n\n" + markdown_table(report) + "\n"
  )
  if report.get("runs"):
    plots = {"frontier.png": plot_frontier(report), "curves.png": plot_curves(report)}
    if any(c["targets"] for pairs in report["relative_change"].values() for c in pairs.values()):
      plots["relative_change.png"] = plot_relative_change(report)
    if reliability_sets(report["runs"]):
      plots["reliability.png"] = plot_reliability(report)
    for name, figure in plots.items():
      # Rendered in memory: matplotlib writes to local paths or to a file object, not to a bucket.
      png = io.BytesIO()
      figure.savefig(png, format="png", dpi=120)
      files.write_bytes(directory / name, png.getvalue())


def _line_styles(methods: Sequence[str]) -> dict[str, dict[str, Any]]:
  """A colour per remedy; a method with FINCH on top ("X+finch") dashed in X's colour."""
  bases = list(dict.fromkeys(without_finch(m) for m in methods))
  cmap = matplotlib.colormaps["tab20" if len(bases) > 10 else "tab10"]
  colors = {b: cmap(i) for i, b in enumerate(bases)}
  return {
    m: {"color": colors[without_finch(m)], "ls": "--" if m != without_finch(m) else "-"}
    for m in methods
  }


def plot_frontier(report: Mapping[str, Any]) -> Figure:
  """Task loss against forgetting: each method's sweep (seed means, labelled with their learning
  rates), its frontier (the rates up to the one with the lowest task loss, the part matched
  on) joined, the rates past it as open markers, and every seed's run as a small dot."""
  runs, methods = report["runs"], list(report["methods"])
  styles = _line_styles(methods)
  fig = Figure(figsize=(7.5, 5))
  ax = fig.add_subplot()
  for name in methods:
    method_runs = [r for r in runs if r["method"] == name]
    means = _seed_means(method_runs, ["task_loss", "forgetting"])
    frontier = monotone_sweep(means, "task_loss", increasing=False)
    past = [p for p in means if p not in frontier]
    ax.plot(
      [p["task_loss"] for p in frontier],
      [p["forgetting"] for p in frontier],
      marker="o",
      label=f"{name} (mean of seeds)",
      **styles[name],
    )
    if past:
      ax.scatter(
        [p["task_loss"] for p in past],
        [p["forgetting"] for p in past],
        s=40,
        facecolors="none",
        edgecolors=styles[name]["color"],
      )
    for p in means:
      ax.annotate(
        f"lr {p['learning_rate']:.2g}",
        (p["task_loss"], p["forgetting"]),
        fontsize=7,
        xytext=(3, 3),
        textcoords="offset points",
      )
    ax.scatter(
      [r["task_loss"] for r in method_runs],
      [r["forgetting"] for r in method_runs],
      s=10,
      alpha=0.5,
      color=styles[name]["color"],
    )
  ax.scatter([], [], s=10, alpha=0.5, color="grey", label="one seed's run")
  past_label = "rate past the lowest task loss"
  ax.scatter([], [], s=40, facecolors="none", edgecolors="grey", label=past_label)
  target = report.get("target_task_loss")
  if target is not None and math.isfinite(target):
    lo, hi = report["overlap_task_loss"]
    ax.axvspan(lo, hi, color="grey", alpha=0.1, lw=0, label="task loss every sweep reaches")
    label = f"matched task loss {target:.3f} (its middle)"
    ax.axvline(target, color="grey", ls=":", lw=1, label=label)
  ax.text(
    0.02,
    0.97,
    "better: lower left (learns more, forgets less)",
    transform=ax.transAxes,
    va="top",
    color="grey",
    fontsize=8,
  )
  ax.set_xlabel("task loss after fine-tuning (lower is better)")
  ax.set_ylabel("forgetting: rise of the retain loss (lower is better)")
  ax.set_title("Which method forgets less at the same task loss?")
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def nearest_run(report: Mapping[str, Any], name: str) -> Mapping[str, Any]:
  """The run of method `name` whose learning rate is nearest the one it matched at (the first
  seed), or its first run when it reached no match."""
  lr = report["methods"][name].get("learning_rate")
  candidates = [r for r in report["runs"] if r["method"] == name]
  if lr is None or not math.isfinite(lr):
    return candidates[0]
  return min(candidates, key=lambda r: (abs(math.log(r["learning_rate"] / lr)), r["seed"]))


def reliability_sets(runs: Sequence[Mapping[str, Any]]) -> list[str]:
  """The fact sets whose reliability diagram the runs keep (`NAME_reliability_after`)."""
  suffix = "_reliability_after"
  return sorted({k.removesuffix(suffix) for r in runs for k in r if k.endswith(suffix)})


def plot_reliability(report: Mapping[str, Any]) -> Figure:
  """Reliability diagrams of each calibration set: the accuracy of the first answer token
  against its confidence, per confidence bin, for the base model and for each method's run
  nearest the matched task loss; on the diagonal a model is calibrated, below it
  over-confident, above it under-confident. A marker's area is the bin's share of probes."""
  sets = reliability_sets(report["runs"])
  methods = list(report["methods"])
  styles = _line_styles(methods)
  fig = Figure(figsize=(5.5 * len(sets), 5))
  axes = np.atleast_1d(fig.subplots(1, len(sets)))
  for ax, name in zip(axes, sets, strict=True):
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    base = next(
      (
        r[f"{name}_reliability_before"] for r in report["runs"] if f"{name}_reliability_before" in r
      ),
      None,
    )
    curves = [("base model", base, {"color": "black"})] if base else []
    for method in methods:
      run = nearest_run(report, method)
      if f"{name}_reliability_after" in run:
        label = f"{method} (lr {run['learning_rate']:.2g}, seed {run['seed']})"
        curves.append((label, run[f"{name}_reliability_after"], styles[method]))
    for label, data, style in curves:
      ax.plot(data["confidence"], data["accuracy"], label=label, **style)
      ax.scatter(
        data["confidence"],
        data["accuracy"],
        s=[400 * w for w in data["share"]],
        color=style.get("color"),
        alpha=0.3,
      )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"{name}: confidence in the first answer token")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def plot_curves(report: Mapping[str, Any]) -> Figure:
  """Task and retain loss over the steps of fine-tuning, from the base model (step 0), for each
  method's run nearest the matched task loss."""
  methods, before = list(report["methods"]), report["before"]
  styles = _line_styles(methods)
  fig = Figure(figsize=(11, 4.5))
  axes = fig.subplots(1, 2)
  for name in methods:
    run = nearest_run(report, name)
    steps = [0] + [e["step"] for e in run["curve"]]
    label = f"{name} (lr {run['learning_rate']:.2g}, seed {run['seed']})"
    for ax, key in zip(axes, ("task_loss", "retain_loss"), strict=True):
      values = [before[key]] + [e[key] for e in run["curve"]]
      ax.plot(steps, values, label=label, **styles[name])
  axes[0].set_ylabel("task loss (lower is better)")
  axes[1].set_ylabel("retain loss (lower: less forgotten)")
  axes[1].axhline(before["retain_loss"], color="grey", ls=":", lw=1, label="base model")
  for ax in axes:
    ax.set_xlabel("fine-tuning step")
    ax.legend(fontsize=7)
  target = report.get("target_task_loss")
  at = f" {target:.3f}" if target is not None and math.isfinite(target) else ""
  fig.suptitle(f"Each method's run nearest the matched task loss{at}")
  fig.tight_layout()
  return fig


def plot_relative_change(report: Mapping[str, Any]) -> Figure:
  """Each pair's relative change of every forgetting measure against the target it is read at,
  across the whole overlap of the pair's sweeps: one panel per measure (columns) and per
  matching (rows: task loss, task accuracy), the mean over paired seeds with its 95% interval
  shaded and the middle of the overlap (where the headline is read) marked."""
  matchings = {k: p for k, p in report["relative_change"].items() if p}
  measures = list(
    dict.fromkeys(m for pairs in matchings.values() for c in pairs.values() for m in c["measures"])
  )
  pairs = list(dict.fromkeys(name for p in matchings.values() for name in p))
  colors = matplotlib.colormaps["tab10" if len(pairs) <= 10 else "tab20"]
  fig = Figure(figsize=(4.2 * len(measures), 3.4 * len(matchings)))
  axes = np.asarray(fig.subplots(len(matchings), len(measures), squeeze=False))
  for row, (key, curves) in enumerate(matchings.items()):
    for col, measure in enumerate(measures):
      ax = axes[row, col]
      ax.axhline(0.0, color="grey", lw=1)
      for name, curve in curves.items():
        if not curve["targets"]:
          continue
        # A target where the reference is not clearly above 0 has no relative change: a gap.
        read = curve.get("read_as_change", {}).get(measure, [True] * len(curve["targets"]))
        points = [
          p if ok else seed_interval({})
          for p, ok in zip(curve["measures"][measure], read, strict=True)
        ]
        mean = [100 * p["mean"] for p in points]
        lo = [100 * p["ci"][0] for p in points]
        hi = [100 * p["ci"][1] for p in points]
        color = colors(pairs.index(name))
        ax.plot(curve["targets"], mean, marker=".", color=color, label=name.replace("_", " "))
        ax.fill_between(curve["targets"], lo, hi, color=color, alpha=0.2, lw=0)
        ax.axvline(curve["middle"], color=color, ls=":", lw=1)
      better = "lower" if key == "task_loss" else "higher"
      ax.set_xlabel(f"target {key.replace('_', ' ')} ({better} is better)")
      ax.set_ylabel(f"relative change in {measure} (%)")
      if key == "task_loss":
        ax.invert_xaxis()  # left to right: more learned
  axes[0, 0].legend(fontsize=7)
  fig.suptitle(
    "Change against the reference across the range both sweeps reach (below 0: forgets less);\n"
    "band: 95% t-interval over paired seeds; dotted: the middle, where the headline is read;\n"
    "gaps: targets where the reference's value is not clearly above 0 (report.json's "
    "`differences`)",
    fontsize=9,
  )
  fig.tight_layout()
  return fig


# ----- a study kept as run summaries -----------------------------------------------------------


class StoreError(ValueError):
  """A results directory that cannot be read as a study; the message names the file and fix."""


def _read_stored(path: str | os.PathLike) -> Any:
  """The JSON content of a store's file; StoreError naming the file when it is not JSON (a
  committed summary is never treated as absent, unlike a workdir's files)."""
  path = epath.Path(path)
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise StoreError(
      f"{path}: not JSON ({error}); restore it (e.g. `git checkout -- {path}`) or delete it so "
      "the sweep reruns that run."
    ) from error


RUN_SUMMARY_KEYS = ("method", "learning_rate", "seed", "fingerprint", "before", "task_loss")


def read_store(directory: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """`study.json` and every run summary (`runs/*/*.json`) of a results directory, the runs in
  the order of the study's methods (then any other method, by name), each by rate and seed.

  Raises:
    StoreError: a file missing, not JSON, not a run summary, or runs measured from different base
      models (their `before` differs).
  """
  directory = epath.Path(directory)
  study_path = directory / STUDY_FILE
  if not study_path.exists():
    raise StoreError(
      f"{study_path} is missing: a results directory is written by a sweep with "
      f"--config.compare.results_dir={directory}."
    )
  study = _read_stored(study_path)
  paths = sorted((directory / STORE_RUNS).glob("*/*.json"))
  if not paths:
    raise StoreError(f"{directory / STORE_RUNS} holds no run summary (runs/METHOD/NAME.json).")
  runs = []
  for path in paths:
    run = _read_stored(path)
    missing = [k for k in RUN_SUMMARY_KEYS if not isinstance(run, dict) or k not in run]
    if missing:
      raise StoreError(f"{path}: not a run summary (no {', '.join(missing)}); move it out.")
    runs.append((path, run))
  first_path, before = runs[0][0], runs[0][1]["before"]
  for path, run in runs[1:]:
    # The measures both hold: a run kept before a measure existed lacks it, and the reliability
    # bins are lists, not numbers.
    differs = [
      k
      for k in sorted(set(before) & set(run["before"]))
      if isinstance(before[k], numbers.Real)
      and not math.isclose(before[k], run["before"][k], rel_tol=1e-4)
    ]
    if differs:
      raise StoreError(
        f"{path} and {first_path} were measured from different base models ({differs[0]}: "
        f"{run['before'].get(differs[0])} against {before.get(differs[0])}): keep one base "
        "model's runs in one results directory."
      )
  order = {m: i for i, m in enumerate(study.get("methods", []))}
  methods = sorted({r["method"] for _, r in runs}, key=lambda m: (order.get(m, len(order)), m))
  rank = {m: i for i, m in enumerate(methods)}
  ordered = sorted(
    (r for _, r in runs), key=lambda r: (rank[r["method"]], r["learning_rate"], r["seed"])
  )
  return study, ordered


def report_from_store(directory: str | os.PathLike) -> dict[str, Any]:
  """The report of a results directory, from its files alone (`read_store`): the runs, the base
  model's measures they hold, the study's baseline and step timings."""
  study, runs = read_store(directory)
  if study["baseline"] not in {r["method"] for r in runs}:
    raise StoreError(
      f"{epath.Path(directory) / STUDY_FILE}: its baseline {study['baseline']!r} has no run "
      f"under {STORE_RUNS}/; rerun the sweep of that method with this results_dir."
    )
  return build_report(study["baseline"], runs[0]["before"], runs, study.get("step_times"))


def held_out_readings(
  runs: Sequence[Mapping[str, Any]], method: str, measure: str, key: str = "task_loss"
) -> list[dict[str, Any]]:
  """How well a sweep's reading finds a run it has not seen: each inner run of `method`'s sweeps
  (one seed's monotone sweep, not its ends) is left out and `measure` read at its `key` from the
  rest, on the straight line between its neighbours and by `interpolate` (the monotone cubic
  through the rest where three or more remain): `[{"seed", "learning_rate", "value", "line",
  "cubic"}]`. A reading that follows the sweep's bend misses by less than the line."""
  out = []
  for points in _per_seed_sweeps(runs).get(method, []):
    sweep = monotone_sweep(points, key, increasing=False)
    for i in range(1, len(sweep) - 1):
      target = sweep[i][key]
      out.append(
        {
          "seed": sweep[i]["seed"],
          "learning_rate": sweep[i]["learning_rate"],
          "value": sweep[i][measure],
          "line": interpolate([sweep[i - 1], sweep[i + 1]], key, target, measure),
          "cubic": interpolate(sweep[:i] + sweep[i + 1 :], key, target, measure),
        }
      )
  return out


def held_out_table(runs: Sequence[Mapping[str, Any]], method: str, measure: str) -> str:
  """`held_out_readings` as Markdown, with the mean relative error of each reading."""
  rows = held_out_readings(runs, method, measure)
  lines = [
    f"Each inner run of {method}'s sweeps left out and its {measure} read from the rest:\n",
    "| seed | learning rate | value | line (error) | cubic (error) |",
    "| --- | --- | --- | --- | --- |",
  ]
  errors: dict[str, list[float]] = {"line": [], "cubic": []}
  for row in rows:
    cells = [str(row["seed"]), f"{row['learning_rate']:.3g}", f"{row['value']:.4f}"]
    for reading in ("line", "cubic"):
      if row["value"] == 0:  # no relative error to give
        cells.append(f"{row[reading]:.4f}")
        continue
      error = _relative(row[reading], row["value"])
      errors[reading].append(error)
      cells.append(f"{row[reading]:.4f} ({100 * error:+.1f}%)")
    lines.append("| " + " | ".join(cells) + " |")
  for reading, values in errors.items():
    if values:
      lines.append(
        f"\n{reading}: mean error {100 * statistics.fmean(values):+.1f}%, mean absolute error "
        f"{100 * statistics.fmean(map(abs, values)):.1f}% over {len(values)} runs"
      )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m finch_jax.report DIR`: rebuilds DIR's report.json, report.md and plots from the
  run summaries and study.json there, and prints the table. `--held_out METHOD[:MEASURE]`
  instead prints how well the sweep reading finds METHOD's runs left out (`held_out_table`),
  writing nothing. Trains nothing."""
  parser = argparse.ArgumentParser(
    prog="python -m finch_jax.report",
    description="Rebuild a study's report from its results directory (runs/*/*.json, study.json).",
  )
  parser.add_argument("directory", help="the results directory, e.g. docs/results/STUDY")
  parser.add_argument(
    "--held_out",
    metavar="METHOD[:MEASURE]",
    help="instead of the report, check the reading: leave each inner run of METHOD's sweeps "
    "out and read MEASURE (default retain_kl) there from the rest (`held_out_readings`)",
  )
  args = parser.parse_args(argv)
  try:
    if args.held_out:
      method, _, measure = args.held_out.partition(":")
      print(held_out_table(read_store(args.directory)[1], method, measure or "retain_kl"))
      return 0
    report = report_from_store(args.directory)
  except StoreError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  write_report(args.directory, report)
  print(markdown_table(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
