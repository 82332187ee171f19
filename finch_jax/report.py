"""Reading a comparison: forgetting at matched task loss, the report's tables and its plots.

FINCH changes the effective learning rate, so comparing methods at one nominal rate only shows
that larger steps learn more and forget more. Each method therefore runs a short sweep of
learning rates over several seeds; along each sweep (ordered by rate, keeping only points where
a higher rate gives a lower task loss) forgetting is interpolated linearly at a common task
loss. Where the data has facts to recall, the same is done at matched task fact-recall accuracy.
Seeds are interpolated one by one, so the spread over seeds is reported beside each mean.

Pure: this module reads finished runs (dicts) and writes files; it runs nothing.
"""

from __future__ import annotations

import io
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from etils import epath
from matplotlib.figure import Figure

from finch_jax import files

COMBINED_SUFFIX = "+finch"  # a method name "X+finch" is method X with FINCH on top

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
) -> float:
  """`value` at `key == target` along a monotone sweep; NaN when the sweep does not reach it."""
  sweep = monotone_sweep(points, key, increasing)
  for a, b in zip(sweep, sweep[1:], strict=False):
    lo, hi = sorted((a[key], b[key]))
    if lo <= target <= hi:
      t = 0.0 if hi == lo else (target - a[key]) / (b[key] - a[key])
      if value == "learning_rate":  # rates were swept on a log scale
        return math.exp((1 - t) * math.log(a[value]) + t * math.log(b[value]))
      return (1 - t) * a[value] + t * b[value]
  if len(sweep) == 1 and sweep[0][key] == target:
    return sweep[0][value]
  return float("nan")


def common_target(
  sweeps: Mapping[str, Sequence[Sequence[Mapping[str, float]]]], key: str, increasing: bool = False
) -> float:
  """The best `key` at which the most methods can be read, every seed of them.

  A sweep (one method and seed) can be read between the worst and the best `key` of its
  monotone part. Where one value lies within every sweep, that is the best such value (the best
  `key` every sweep reaches). Otherwise no value serves all methods, and the target is the best
  value that the sweeps of the most methods all span; the others read NaN there (their sweeps
  start beyond it or end before it) and are compared pairwise (`build_report`'s headlines).
  """
  spans = {}
  for method, method_sweeps in sweeps.items():
    spans[method] = []
    for points in method_sweeps:
      values = [p[key] for p in monotone_sweep(points, key, increasing)]
      spans[method].append((min(values), max(values)))
  candidates = sorted({v for ranges in spans.values() for r in ranges for v in r})

  def served(target: float) -> int:
    return sum(all(lo <= target <= hi for lo, hi in ranges) for ranges in spans.values())

  best = max(served(t) for t in candidates)
  reachable = [t for t in candidates if served(t) == best]
  return max(reachable) if increasing else min(reachable)


def _seed_means(runs: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, float]]:
  by_rate: dict[float, list] = {}
  for run in runs:
    by_rate.setdefault(run["learning_rate"], []).append(run)
  return [
    {"learning_rate": lr, **{k: float(np.mean([r[k] for r in rs])) for k in keys}}
    for lr, rs in sorted(by_rate.items())
  ]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  finite = [v for v in values if math.isfinite(v)]
  if not finite:
    return float("nan"), float("nan")
  return float(np.mean(finite)), float(np.std(finite)) if len(finite) > 1 else 0.0


def matched(
  runs: Sequence[Mapping[str, Any]], key: str, value: str, increasing: bool = False
) -> dict[str, Any]:
  """For every method in `runs`, `value` at the common `key`, per seed and on average."""
  methods = sorted({r["method"] for r in runs})
  by_method = {m: [r for r in runs if r["method"] == m] for m in methods}
  per_seed_sweeps = {
    m: [[r for r in rs if r["seed"] == seed] for seed in sorted({r["seed"] for r in rs})]
    for m, rs in by_method.items()
  }
  target = common_target(per_seed_sweeps, key, increasing)
  out = {"target": target, "methods": {}}
  for method, method_runs in by_method.items():
    seeds = sorted({r["seed"] for r in method_runs})
    per_seed = {}
    for seed in seeds:
      points = [r for r in method_runs if r["seed"] == seed]
      per_seed[seed] = {
        value: interpolate(points, key, target, value, increasing),
        "learning_rate": interpolate(points, key, target, "learning_rate", increasing),
      }
    mean, std = _mean_std([p[value] for p in per_seed.values()])
    out["methods"][method] = {
      value: mean,
      f"{value}_std": std,
      "per_seed": per_seed,
      "learning_rate": _mean_std([p["learning_rate"] for p in per_seed.values()])[0],
      "seeds_reaching_target": sum(math.isfinite(p[value]) for p in per_seed.values()),
    }
  return out


def relative_change(
  per_seed: Mapping[int, Mapping[str, float]],
  baseline: Mapping[int, Mapping[str, float]],
  value: str,
) -> tuple[float, float]:
  """Mean and spread over seeds of (method - baseline) / |baseline|, seeds paired."""
  changes = [
    (per_seed[s][value] - baseline[s][value]) / abs(baseline[s][value])
    for s in per_seed
    if s in baseline and baseline[s][value] != 0
  ]
  return _mean_std(changes)


# ----- the report ------------------------------------------------------------------------------


def build_report(
  baseline: str,
  before: Mapping[str, float],
  runs: Sequence[Mapping],
  step_times: Mapping[str, float] | None = None,
) -> dict[str, Any]:
  """report.json's content: methods at matched task loss, the headlines, every run.

  `baseline` names the method the others are measured against. `step_times` (seconds per step,
  timed back to back) give the cost column; without them the median step time logged in each
  method's runs stands in.
  """
  by_loss = matched(runs, "task_loss", "forgetting")
  report = {
    "matched_on": "task_loss",
    "target_task_loss": by_loss["target"],
    "baseline": baseline,
    "methods": _methods_at(by_loss, before, runs, baseline, step_times or {}),
    "headline": _headlines(by_loss["methods"], runs, baseline),
    "before": dict(before),
    "runs": [dict(r) for r in runs],
  }
  if all("task_fact_accuracy" in r and "retain_accuracy_drop" in r for r in runs):
    by_acc = matched(runs, "task_fact_accuracy", "retain_accuracy_drop", increasing=True)
    keys = ("retain_accuracy_drop", "retain_accuracy_drop_std", "learning_rate")
    report["at_matched_accuracy"] = {
      "target_task_fact_accuracy": by_acc["target"],
      "methods": {
        name: {**{k: e[k] for k in keys}, "seeds_reaching_target": e["seeds_reaching_target"]}
        for name, e in by_acc["methods"].items()
      },
    }
  report["measures"] = every_measure(runs)
  return report


# What each forgetting measure of a run is (lower is better for all of them).
FORGETTING_MEASURES = {
  "forgetting": "rise of the retain loss (nats per token)",
  "retain_accuracy_drop": "drop of the retain fact-recall accuracy",
  "retain_kl": "KL(base || fine-tuned) of next-token distributions on the retain text",
  "retain_ece_change": "rise of the expected calibration error on the retain facts",
}
# Task scores a comparison can be matched at, higher is better: fact recall, else token accuracy.
TASK_ACCURACIES = ("task_fact_accuracy", "task_accuracy")


def every_measure(runs: Sequence[Mapping]) -> dict[str, Any]:
  """Every forgetting measure the runs hold, read at matched task loss and, where the runs have a
  task accuracy, at matched task accuracy: `{"task_loss": {...}, "task_accuracy": {...}}`, each
  `{"target": ..., "measures": {measure: {method: {"mean", "std", "seeds"}}}}`."""
  measures = [m for m in FORGETTING_MEASURES if all(m in r for r in runs)]
  matchings = [("task_loss", False)]
  accuracy = next((a for a in TASK_ACCURACIES if all(a in r for r in runs)), None)
  if accuracy:
    matchings.append((accuracy, True))
  out = {}
  for key, increasing in matchings:
    target, by_measure = float("nan"), {}
    for measure in measures:
      result = matched(runs, key, measure, increasing=increasing)
      target = result["target"]
      by_measure[measure] = {
        name: {
          "mean": e[measure],
          "std": e[f"{measure}_std"],
          "seeds": e["seeds_reaching_target"],
          "learning_rate": e["learning_rate"],
        }
        for name, e in result["methods"].items()
      }
    out[key] = {"target": target, "measures": by_measure}
  return out


def measures_table(report: Mapping[str, Any]) -> str:
  """Every forgetting measure at each matching, as Markdown tables (methods in rows)."""
  lines = []
  for key, matching in report.get("measures", {}).items():
    measures = matching["measures"]
    if not measures:
      continue
    methods = list(next(iter(measures.values())))
    lines.append(
      f"\nAt matched {key.replace('_', ' ')} {_value(matching['target'], '.4f')} "
      "(mean ± std over the seeds that reach it):\n"
    )
    lines.append("| method | " + " | ".join(measures) + " |")
    lines.append("| --- " * (len(measures) + 1) + "|")
    for name in methods:
      entries = [measures[m][name] for m in measures]
      cells = [_value(e["mean"], ".4f", e["std"], e["seeds"]) for e in entries]
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(f"- {m}: {FORGETTING_MEASURES[m]}" for m in measures)
  return "\n".join(lines)


def _methods_at(
  by_loss: Mapping[str, Any],
  before: Mapping[str, float],
  runs: Sequence[Mapping],
  baseline: str,
  step_times: Mapping[str, float],
) -> dict[str, dict[str, Any]]:
  """Each method's entry of report.json at the matched task loss, with its cost column."""
  methods = {}
  for name, entry in by_loss["methods"].items():
    method_runs = [r for r in runs if r["method"] == name]
    logged_time = statistics.median(r["step_time"] for r in method_runs)
    methods[name] = {
      "task_loss": by_loss["target"],
      "retain_loss_before": before["retain_loss"],
      "retain_loss_after": before["retain_loss"] + entry["forgetting"],
      "forgetting": entry["forgetting"],
      "forgetting_std": entry["forgetting_std"],
      "forgetting_per_seed": {str(s): v["forgetting"] for s, v in entry["per_seed"].items()},
      "learning_rate": entry["learning_rate"],
      "seeds_reaching_target": entry["seeds_reaching_target"],
      "step_time": step_times.get(name) or logged_time,
      "step_time_in_runs": logged_time,
      "optimizer_state_bytes": method_runs[0]["optimizer_state_bytes"],
      "held_bytes": method_runs[0]["held_bytes"],
    }
  if baseline in methods:
    base_time, base_bytes = methods[baseline]["step_time"], methods[baseline]["held_bytes"]
    for entry in methods.values():
      entry["step_time_ratio"] = entry["step_time"] / base_time
      entry["extra_bytes"] = entry["held_bytes"] - base_bytes
  return methods


def _headlines(
  methods: Mapping[str, Any], runs: Sequence[Mapping], baseline: str
) -> dict[str, dict[str, float]]:
  """Each method against the baseline, and "X+finch" against X, at the task loss both reach.

  Pairwise, so that a method that cannot reach low losses does not move every other comparison
  up to its level.
  """
  headline = {}
  for name in methods:
    references = [baseline] + [name.removesuffix(COMBINED_SUFFIX)] * name.endswith(COMBINED_SUFFIX)
    for reference in dict.fromkeys(references):
      if reference == name or reference not in methods:
        continue
      pair = matched(
        [r for r in runs if r["method"] in (name, reference)], "task_loss", "forgetting"
      )
      ours, theirs = pair["methods"][name]["per_seed"], pair["methods"][reference]["per_seed"]
      mean, std = relative_change(ours, theirs, "forgetting")
      headline[f"{name}_vs_{reference}_forgetting_change"] = {
        "mean": mean,
        "std": std,
        "seeds": sum(
          math.isfinite(ours[s]["forgetting"]) and math.isfinite(theirs[s]["forgetting"])
          for s in ours
          if s in theirs
        ),
        "task_loss": pair["target"],
        "forgetting": pair["methods"][name]["forgetting"],
        "reference_forgetting": pair["methods"][reference]["forgetting"],
      }
  return headline


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


def _value(x: float | None, fmt: str, std: float | None = None, seeds: int = 1) -> str:
  """`x` formatted, "not reached" where it could not be measured; "± std" only over seeds."""
  if x is None or not math.isfinite(x):
    return "not reached"
  text = format(x, fmt)
  if std is not None and math.isfinite(std) and seeds > 1:
    text += f" ± {std:{fmt.lstrip('+')}}"  # a spread has no sign
  return text


def markdown_table(report: Mapping[str, Any]) -> str:
  """The comparison as a Markdown table plus the headline sentences."""
  lines = []
  if report.get("matched_on"):
    lines.append(
      f"Methods at matched task loss {report['target_task_loss']:.4f} "
      "(interpolated along each learning-rate sweep; mean ± std over seeds).\n"
    )
  lines.append(
    "| method | task loss | retain loss before | retain loss after | forgetting "
    "| seeds | learning rate | step time ratio | extra bytes |"
  )
  lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for name, m in report["methods"].items():
    seeds = m.get("seeds_reaching_target", 1)
    lines.append(
      f"| {name} | {_value(m['task_loss'], '.4f')} | {_value(m['retain_loss_before'], '.4f')} "
      f"| {_value(m['retain_loss_after'], '.4f')} "
      f"| {_value(m['forgetting'], '.4f', m.get('forgetting_std'), seeds)} "
      f"| {seeds} | {_value(m.get('learning_rate'), '.3g')} "
      f"| {m.get('step_time_ratio', 1.0):.3f} | {m.get('extra_bytes', 0)} |"
    )
  for key, h in report.get("headline", {}).items():
    target = h.get("task_loss", float("nan"))
    at = f" at matched task loss {target:.4f}" if math.isfinite(target) else ""
    change = _value(100 * h["mean"], "+.1f", 100 * h["std"], h.get("seeds", 2))
    change += "%" if math.isfinite(h["mean"]) else ""
    lines.append(f"\n{key}: {change} (relative change in forgetting{at}, seeds paired)")
  acc = report.get("at_matched_accuracy")
  if acc:
    target = _value(acc["target_task_fact_accuracy"], ".3f")
    lines.append(f"\nAt matched task fact-recall accuracy {target}:")
    lines.append("\n| method | retain fact-accuracy drop | learning rate |")
    lines.append("| --- | --- | --- |")
    for name, m in acc["methods"].items():
      drop = _value(
        m["retain_accuracy_drop"], ".4f", m["retain_accuracy_drop_std"], m["seeds_reaching_target"]
      )
      lines.append(f"| {name} | {drop} | {_value(m['learning_rate'], '.3g')} |")
  if len(report.get("measures", {}).get("task_loss", {}).get("measures", {})) > 1 or (
    "task_accuracy" in report.get("measures", {})
  ):
    lines.append(measures_table(report))
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
    for name, figure in plots.items():
      # Rendered in memory: matplotlib writes to local paths or to a file object, not to a bucket.
      png = io.BytesIO()
      figure.savefig(png, format="png", dpi=120)
      files.write_bytes(directory / name, png.getvalue())


def _line_styles(methods: Sequence[str]) -> dict[str, dict[str, Any]]:
  """A colour per remedy; a method with FINCH on top ("X+finch") dashed in X's colour."""
  bases = list(dict.fromkeys(m.removesuffix(COMBINED_SUFFIX) for m in methods))
  cmap = matplotlib.colormaps["tab20" if len(bases) > 10 else "tab10"]
  colors = {b: cmap(i) for i, b in enumerate(bases)}
  return {
    m: {
      "color": colors[m.removesuffix(COMBINED_SUFFIX)],
      "ls": "--" if m != m.removesuffix(COMBINED_SUFFIX) else "-",
    }
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
      [p["task_loss"] for p in frontier], [p["forgetting"] for p in frontier], marker="o",
      label=f"{name} (mean of seeds)", **styles[name],
    )
    if past:
      ax.scatter(
        [p["task_loss"] for p in past], [p["forgetting"] for p in past], s=40,
        facecolors="none", edgecolors=styles[name]["color"],
      )
    for p in means:
      ax.annotate(
        f"lr {p['learning_rate']:.2g}", (p["task_loss"], p["forgetting"]), fontsize=7,
        xytext=(3, 3), textcoords="offset points",
      )
    ax.scatter(
      [r["task_loss"] for r in method_runs], [r["forgetting"] for r in method_runs], s=10,
      alpha=0.5, color=styles[name]["color"],
    )
  ax.scatter([], [], s=10, alpha=0.5, color="grey", label="one seed's run")
  past_label = "rate past the lowest task loss"
  ax.scatter([], [], s=40, facecolors="none", edgecolors="grey", label=past_label)
  target = report.get("target_task_loss")
  if target is not None and math.isfinite(target):
    ax.axvline(target, color="grey", ls=":", lw=1, label=f"matched task loss {target:.3f}")
  ax.text(
    0.02, 0.97, "better: lower left (learns more, forgets less)", transform=ax.transAxes,
    va="top", color="grey", fontsize=8,
  )
  ax.set_xlabel("task loss after fine-tuning (lower is better)")
  ax.set_ylabel("forgetting: rise of the retain loss (lower is better)")
  ax.set_title("Which method forgets less at the same task loss?")
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def _task_loss(point: Mapping[str, float]) -> float:
  return point["task_loss"]


def nearest_run(report: Mapping[str, Any], name: str) -> Mapping[str, Any]:
  """The run of method `name` whose learning rate is nearest the one it matched at (the first
  seed), or its first run when it reached no match."""
  lr = report["methods"][name].get("learning_rate")
  candidates = [r for r in report["runs"] if r["method"] == name]
  if lr is None or not math.isfinite(lr):
    return candidates[0]
  return min(candidates, key=lambda r: (abs(math.log(r["learning_rate"] / lr)), r["seed"]))


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
