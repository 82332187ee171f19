"""The convergence reading: forgetting when each run first reaches a task accuracy, and the steps
it took to get there.

The matched reading (`finch_jax.report`) compares methods where their sweeps end: at a task loss
every sweep passes after a fixed number of steps. A user who fine-tunes until the model has
learned what it should asks something else: train until the task accuracy reaches its plateau,
how much has the model forgotten by then, and how long did it take? A small constant rate also
forgets little, but it takes longer to get there; this reading shows both.

Along each run's evaluation curve (the base model's values at step 0, then every `eval_every`
steps) the first crossing of the target accuracy is found and read by linear interpolation
between the two evaluations around it: the step (steps to target) and the forgetting measures
there (the retain loss's rise over the base and the KL to the base, on the retain text). The
target is the plateau every method attains: each method's best final accuracy (mean over seeds
at a rate, best over its rates), lowest over methods, unless the caller names one.

Each method is read at every rate (mean over seeds with a 95% t-interval, every seed's value
kept); its summary is the rate that forgets least at the target (the lowest KL to the base,
`RANK_BY`) among the rates whose every seed reaches it, with the steps that rate took. Time to
target is steps to target times the method's step time: the cost of reaching the plateau,
beside the step-time ratio.

The plateau is a single crossing near the top of each curve, where a run that wobbles by one
answer reads many steps later: the same reading is also taken at lower targets on the way
(`LOWER_TARGETS`, those below the plateau), so a difference that holds all along the curve can
be told from one made by where the last answer happened to land.

A curve with fewer than `MIN_EVALS` evaluations cannot place a crossing to better than a large
fraction of the run; such runs have no convergence reading.

Pure: this module reads finished runs (dicts); it runs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from finch_jax.intervals import INTERVAL_NOTE, formatted, seed_interval

PLATEAU = "the plateau every method attains: each method's best final value, lowest over methods"
KEY = "task_exact"  # exact-match answers: whether the run can say what it was taught
LOWER_TARGETS = (0.5, 0.75, 0.9)  # read on the way to the plateau, as well as at it
MIN_EVALS = 4  # evaluations along a run (besides the base model's) for a crossing to mean much
# "Forgets least": the lowest KL to the base on the retain text. The retain loss's rise is read
# too, but a method that trains on text like the retain text (replay; KL to the base on the
# base's own samples) lowers it without keeping the base's predictions, and in a setting whose
# task is itself English it falls for every method.
RANK_BY = "retain_kl"
# The forgetting measures read at the crossing: name -> (curve key, subtract the base's value).
AT_TARGET = {"forgetting": ("retain_loss", True), "retain_kl": ("retain_kl", False)}


def curve_points(run: Mapping[str, Any], before: Mapping[str, float]) -> list[dict[str, float]]:
  """The run's evaluations in step order, the base model's values as step 0 (its KL to itself is
  0), each with `step` and whatever the evaluation measured."""
  base = {"step": 0, "retain_kl": 0.0, **{k: v for k, v in before.items() if _is_number(v)}}
  return [base, *sorted((dict(p) for p in run.get("curve", ())), key=lambda p: p["step"])]


def crossing(
  points: Sequence[Mapping[str, float]], key: str, target: float, before: Mapping[str, float]
) -> dict[str, float] | None:
  """The first point along `points` where `key` reaches `target`, by linear interpolation between
  the evaluations around it: `{"step", "forgetting", "retain_kl"}` there, or None when the run
  never reaches it. A measure missing from either evaluation is NaN."""
  read = [p for p in points if key in p]
  if read and read[0][key] >= target:
    return {"step": float(read[0]["step"]), **{name: 0.0 for name in AT_TARGET}}
  for a, b in zip(read, read[1:], strict=False):
    if not a[key] < target <= b[key]:
      continue
    t = (target - a[key]) / (b[key] - a[key])
    out = {"step": (1 - t) * a["step"] + t * b["step"]}
    for name, (source, relative) in AT_TARGET.items():
      if source in a and source in b:
        value = (1 - t) * a[source] + t * b[source]
        out[name] = value - before[source] if relative else value
      else:
        out[name] = math.nan
    return out
  return None


def eligible(runs: Sequence[Mapping[str, Any]], key: str = KEY) -> bool:
  """Whether every run's curve has `key` at `MIN_EVALS` evaluations or more."""
  return bool(runs) and all(
    sum(key in p for p in run.get("curve", ())) >= MIN_EVALS for run in runs
  )


def plateau_target(runs: Sequence[Mapping[str, Any]], key: str = KEY) -> float:
  """The accuracy every method attains: each method's best final `key` (mean over the seeds of
  a rate, best over its rates), lowest over methods."""
  return min(_best_final(by_rate, key)[1] for by_rate in _by_method_and_rate(runs).values())


def _best_final(by_rate: Mapping[float, Sequence[Mapping[str, Any]]], key: str) -> tuple:
  """`(rate, mean over its seeds)` of the rate whose runs end with the highest mean `key`."""
  means = {rate: sum(r[key] for r in rs) / len(rs) for rate, rs in by_rate.items()}
  rate = max(means, key=means.get)
  return rate, means[rate]


def _by_method_and_rate(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[float, list]]:
  """`{method: {learning rate: [its runs, one per seed]}}`, methods in order of appearance."""
  out: dict[str, dict[float, list]] = {}
  for run in runs:
    out.setdefault(run["method"], {}).setdefault(run["learning_rate"], []).append(run)
  return out


def convergence(
  runs: Sequence[Mapping[str, Any]],
  before: Mapping[str, float],
  key: str = KEY,
  target: float | None = None,
  step_times: Mapping[str, float] | None = None,
) -> dict[str, Any]:
  """report.json's `convergence`: for every method and rate, the steps to `target` and the
  forgetting there, per seed and over seeds; each method's least-forgetting rate that reaches it
  with every seed; its time to target where `step_times` (seconds per step by method) are given.

  `target` None: `plateau_target`, and `set_by` names the method whose plateau it is (the one
  that learns least: a target far below the others' plateaus says that method never learned the
  task as well, which the `final` values show).

  With the plateau as target, `lower_targets` reads each of `LOWER_TARGETS` below it the same
  way: `{target: {method: its "best" there, or None}}`.

  Returns:
    `{"key", "target", "target_rule", "set_by", "lower_targets", "methods": {name: {"rates":
    {rate: {"step", "forgetting", "retain_kl", "final"} each a seed_interval, "seeds",
    "seeds_reaching_target"}, "best": {...} or None, "best_final": {"learning_rate", "mean"}}}}`;
    `final` is `key` at the end of each run.
  """
  rule = "given" if target is not None else PLATEAU
  grouped = _by_method_and_rate(runs)
  finals = {method: _best_final(by_rate, key) for method, by_rate in grouped.items()}
  set_by = None if target is not None else min(finals, key=lambda m: finals[m][1])
  target = finals[set_by][1] if target is None else float(target)
  methods = {
    method: {
      **_read_at(by_rate, before, key, target, (step_times or {}).get(method)),
      "best_final": {"learning_rate": finals[method][0], "mean": finals[method][1]},
    }
    for method, by_rate in grouped.items()
  }
  lower = {}
  if set_by is not None:
    for t in (t for t in LOWER_TARGETS if t < target):
      lower[f"{t:g}"] = {
        method: _read_at(by_rate, before, key, t, (step_times or {}).get(method))["best"]
        for method, by_rate in grouped.items()
      }
  return {
    "key": key,
    "target": target,
    "target_rule": rule,
    "set_by": set_by,
    "lower_targets": lower,
    "methods": methods,
  }


def _read_at(
  by_rate: Mapping[float, Sequence[Mapping[str, Any]]],
  before: Mapping[str, float],
  key: str,
  target: float,
  step_time: float | None,
) -> dict[str, Any]:
  """One method's runs read at `target`: `{"rates": {rate: ...}, "best": ... or None}`, as in
  `convergence`'s `methods`."""
  rates = {}
  for rate, rate_runs in sorted(by_rate.items()):
    reads = {r["seed"]: crossing(curve_points(r, before), key, target, before) for r in rate_runs}
    reached = {s: c for s, c in reads.items() if c is not None}
    rates[rate] = {
      **{
        name: seed_interval({s: c[name] for s, c in reached.items()})
        for name in ("step", *AT_TARGET)
      },
      "final": seed_interval({r["seed"]: r[key] for r in rate_runs}),
      "seeds": len(reads),
      "seeds_reaching_target": len(reached),
    }
  complete = {r: e for r, e in rates.items() if e["seeds_reaching_target"] == e["seeds"]}
  best = None
  if complete:
    rate = min(complete, key=lambda r: complete[r][RANK_BY]["mean"])
    best = {"learning_rate": rate, **complete[rate]}
    if step_time is not None:
      best["time_to_target"] = best["step"]["mean"] * step_time
  return {"rates": {f"{r:.3g}": e for r, e in rates.items()}, "best": best}


def markdown(section: Mapping[str, Any], baseline: str | None = None) -> str:
  """The convergence reading as a Markdown table: each method's least-forgetting rate at the
  target, the steps it took, the `key` it ended with and, where timed, the time relative to the
  baseline's. A method that never reaches the target shows the best it ended with, and at which
  rate."""
  key, target = section["key"].replace("_", " "), section["target"]
  set_by = section.get("set_by")
  rule = section["target_rule"] + (f"; here {set_by}'s" if set_by else "")
  lines = [
    f"\nConvergence: each run read where its {key} first reaches {target:.3f} ({rule}), "
    "interpolated between evaluations; each method at its rate that forgets least there (the "
    "lowest KL to the base) among those whose every seed reaches it; final "
    f"{key}: at the end of the run; {INTERVAL_NOTE}.\n",
    "| method | learning rate | steps to target | forgetting at target | KL at target "
    f"| final {key} | time to target vs baseline |",
    "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  methods = section["methods"]
  base_time = (methods.get(baseline, {}).get("best") or {}).get("time_to_target")
  for name, entry in methods.items():
    best = entry["best"]
    if best is None:
      final = entry.get("best_final")
      final = f"{final['mean']:.3f} (at {final['learning_rate']:.3g})" if final else "-"
      lines.append(f"| {name} | - | not reached | - | - | {final} | - |")
      continue
    formats = {"step": ".1f", "final": ".3f"}  # the forgetting measures: ".4f"
    cells = [
      formatted(best[m]["mean"], formats.get(m, ".4f"), best[m]["ci"], best[m]["n"])
      for m in ("step", *AT_TARGET, "final")
    ]
    time = best.get("time_to_target")
    ratio = f"{time / base_time:.2f}" if time is not None and base_time else "-"
    lines.append(f"| {name} | {best['learning_rate']:.3g} | " + " | ".join(cells) + f" | {ratio} |")
  lower = section.get("lower_targets") or {}
  if lower:
    lines += [
      f"\nOn the way: the same reading where the {key} first reaches each lower target (KL at "
      "target, then the steps to it, at the method's rate that forgets least there):\n",
      "| method | " + " | ".join(f"{key} {t}" for t in lower) + " |",
      "| --- |" + " --- |" * len(lower),
    ]
    for name in methods:
      cells = []
      for reads in lower.values():
        best = reads.get(name)
        if best is None:
          cells.append("not reached")
          continue
        kl, step = best["retain_kl"], best["step"]
        cells.append(f"{formatted(kl['mean'], '.4f', kl['ci'], kl['n'])}; {step['mean']:.0f} steps")
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _is_number(value: Any) -> bool:
  return isinstance(value, int | float) and not isinstance(value, bool)


__all__ = [
  "AT_TARGET",
  "KEY",
  "LOWER_TARGETS",
  "MIN_EVALS",
  "PLATEAU",
  "RANK_BY",
  "convergence",
  "crossing",
  "curve_points",
  "eligible",
  "markdown",
  "plateau_target",
]
