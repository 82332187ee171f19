"""Forgetting, measured fairly: learning-rate sweeps per method, read at matched task loss.

FINCH changes the effective learning rate, so comparing methods at one nominal rate only shows
that larger steps learn more and forget more. Each method therefore runs a short sweep of
learning rates over several seeds; along each sweep (ordered by rate, keeping only points where
a higher rate gives a lower task loss) forgetting is interpolated linearly at a common task
loss: the lowest task loss that every method reaches with every seed. Where the data has facts
to recall, the same is done at matched task fact-recall accuracy. Seeds are interpolated one by
one, so the spread over seeds is reported beside each mean.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from finch_jax import experiment

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


COMBINED_SUFFIX = "+finch"  # a method name "X+finch" is method X with FINCH on top

# ----- the comparison --------------------------------------------------------------------------


def override(config: ml_collections.ConfigDict, changes: Mapping[str, Any]) -> Any:
  """A copy of `config` with nested `changes` applied (unknown keys are an error)."""
  out = copy.deepcopy(config)

  def apply(node, updates, prefix):
    for key, value in updates.items():
      if key not in node:
        raise KeyError(f"Method override {prefix}{key} is not a config field.")
      if isinstance(value, Mapping) and isinstance(node[key], Mapping | ml_collections.ConfigDict):
        apply(node[key], value, f"{prefix}{key}.")
      else:
        node[key] = value

  with out.unlocked():
    apply(out, changes, "")
  return out


def pretrain_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config that trains the compare run's base model."""
  pre = override(config, config.compare.pretrain.to_dict())
  with pre.unlocked():
    pre.mode = "pretrain"
    pre.finch.enabled = False
  return pre


def method_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """One full config per method named in `compare.methods`."""
  out = {}
  for name, spec in config.compare.methods.items():
    changes = {k: v for k, v in spec.to_dict().items() if k != "learning_rates"}
    out[name] = override(config, changes)
  return out


def _tree_bytes(tree: Any) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _median_step_time(workdir: str) -> float:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    times = [r["step_time"] for r in map(json.loads, f) if "step_time" in r]
  # The first logged window includes compilation.
  return statistics.median(times[1:] if len(times) > 1 else times)


def _run_name(learning_rate: float, seed: int) -> str:
  return f"lr{learning_rate:.3g}_seed{seed}"


def compare(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Pretrains (or reuses) the base, runs every method's sweep, writes and prints the report."""
  primary = jax.process_index() == 0
  # Every run of the comparison reads the one dataset built under the top workdir.
  config = override(config, {"data": {"data_dir": experiment.data_dir(config, workdir)}})
  base_dir = os.path.join(workdir, "base")
  pre = pretrain_config(config)
  pre_trainer = experiment.make_trainer(pre)
  base_result = experiment.run_training(pre, base_dir, trainer=pre_trainer)
  base = base_result.state.params

  configs = method_configs(config)
  trainers = {name: experiment.make_trainer(cfg) for name, cfg in configs.items()}
  first = next(iter(trainers.values()))
  evaluator = experiment.Evaluator(config, workdir, first, base=base)
  before_path = os.path.join(base_dir, "eval_before.json")
  if os.path.exists(before_path):
    with open(before_path) as f:
      before = json.load(f)
  else:
    before = evaluator(base)
    if primary:
      with open(before_path, "w") as f:
        json.dump(before, f)
  _print(primary, "base model: " + _fmt(before))

  runs = []
  for name, cfg in configs.items():
    trainer = trainers[name]
    rates = config.compare.methods[name].learning_rates
    cache = os.path.join(base_dir, _samples_file(cfg))
    samples = experiment.replay_samples(cfg, trainer, base, cache=cache)
    for learning_rate in rates:
      for seed in config.compare.seeds:
        run_dir = os.path.join(workdir, "runs", name, _run_name(learning_rate, seed))
        result_path = os.path.join(run_dir, "result.json")
        if os.path.exists(result_path):
          with open(result_path) as f:
            runs.append(json.load(f))
          continue
        fit = experiment.run_training(
          cfg,
          run_dir,
          trainer=trainer,
          init_params=base,
          learning_rate=learning_rate,
          seed=seed,
          evaluator=evaluator,
          progress=False,
          samples=samples,
        )
        final = fit.evals[-1]
        run = {
          "method": name,
          "learning_rate": float(learning_rate),
          "seed": int(seed),
          "task_loss": final["task_loss"],
          "retain_loss": final["retain_loss"],
          "forgetting": final["retain_loss"] - before["retain_loss"],
          "curve": fit.evals,
          "step_time": _median_step_time(run_dir),
          "optimizer_state_bytes": _tree_bytes(fit.state.opt_state),
          # What the method holds on top of the model it trains: trained weights (or adapters),
          # optimizer state, the frozen base or reference model, replay samples.
          "held_bytes": trainer.held_bytes(fit.state) + sum(x.nbytes for x in samples or ()),
        }
        for set_name in evaluator.fact_sets:
          run[f"{set_name}_fact_accuracy"] = final[f"{set_name}_fact_accuracy"]
        if "retain_fact_accuracy" in run:
          run["retain_accuracy_drop"] = before["retain_fact_accuracy"] - run["retain_fact_accuracy"]
        if primary:
          with open(result_path, "w") as f:
            json.dump(run, f)
        runs.append(run)
        _print(primary, f"{name:>10s} lr={learning_rate:<8.3g} seed={seed}: " + _fmt(run))

  timing = config.compare.get("timing", {}) or {}
  step_times = measure_step_times(
    {name: trainers[name] for name in configs},
    {name: _first_batch(cfg, workdir, trainers[name], base) for name, cfg in configs.items()},
    base,
    rounds=timing.get("rounds", 5),
    steps=timing.get("steps", 10),
  )
  report = build_report(config, before, runs, step_times)
  if primary:
    write_report(workdir, report)
    _print(primary, "\n" + markdown_table(report))
  return report


def _first_batch(
  config: ml_collections.ConfigDict, workdir: str, trainer: Any, base: Any
) -> dict[str, Any]:
  """A training batch of a method (its replay marker included), on the mesh."""
  samples = experiment.replay_samples(
    config, trainer, base, cache=os.path.join(workdir, "base", _samples_file(config))
  )
  iterator = iter(experiment.train_batches(config, workdir, config.seed, samples))
  batch = trainer.global_batch(next(iterator))
  iterator.close()
  return batch


def _samples_file(config: ml_collections.ConfigDict) -> str:
  r = config.replay
  return f"replay_samples_n{r.num_samples}_len{r.sample_len}_t{r.temperature:g}.npz"


def measure_step_times(
  trainers: Mapping[str, Any],
  batches: Mapping[str, Any],
  base: Any,
  *,
  rounds: int = 5,
  steps: int = 10,
) -> dict[str, float]:
  """Seconds per train step of each method, timed back to back in the same process.

  The methods take turns (`rounds` rounds of `steps` steps each, the order rotating every
  round) on a fixed batch each, starting from the base, so a load that comes and goes on the
  machine touches them all alike; each method's figure is the median of its rounds. The step
  times logged during the sweeps (`metrics.jsonl`) ran minutes apart and vary with the load.
  """
  names = list(trainers)
  states = {}
  for name in names:  # compiled before timing; a step's output feeds the next
    states[name], _ = trainers[name].train_step(trainers[name].create_state(base), batches[name])
  jax.block_until_ready(states)
  times: dict[str, list[float]] = {name: [] for name in names}
  for round_index in range(rounds):
    shift = round_index % len(names)
    for name in names[shift:] + names[:shift]:
      trainer, state = trainers[name], states[name]
      start = time.perf_counter()
      for _ in range(steps):
        state, _ = trainer.train_step(state, batches[name])
      jax.block_until_ready(state)
      times[name].append((time.perf_counter() - start) / steps)
      states[name] = state
  return {name: statistics.median(values) for name, values in times.items()}


def build_report(
  config: ml_collections.ConfigDict,
  before: Mapping[str, float],
  runs: Sequence[Mapping],
  step_times: Mapping[str, float] | None = None,
) -> dict[str, Any]:
  """report.json's content: methods at matched task loss, the headline, every run.

  `step_times` (seconds per step, `measure_step_times`) give the cost column; without them the
  median step time logged in each method's runs stands in.
  """
  baseline = config.compare.baseline
  by_loss = matched(runs, "task_loss", "forgetting")
  methods = {}
  for name, entry in by_loss["methods"].items():
    method_runs = [r for r in runs if r["method"] == name]
    methods[name] = {
      "task_loss": by_loss["target"],
      "retain_loss_before": before["retain_loss"],
      "retain_loss_after": before["retain_loss"] + entry["forgetting"],
      "forgetting": entry["forgetting"],
      "forgetting_std": entry["forgetting_std"],
      "forgetting_per_seed": {str(s): v["forgetting"] for s, v in entry["per_seed"].items()},
      "learning_rate": entry["learning_rate"],
      "seeds_reaching_target": entry["seeds_reaching_target"],
      "step_time": (step_times or {}).get(name)
      or statistics.median(r["step_time"] for r in method_runs),
      "step_time_in_runs": statistics.median(r["step_time"] for r in method_runs),
      "optimizer_state_bytes": method_runs[0]["optimizer_state_bytes"],
      "held_bytes": method_runs[0]["held_bytes"],
    }
  if baseline in methods:
    base_time = methods[baseline]["step_time"]
    base_bytes = methods[baseline]["held_bytes"]
    for entry in methods.values():
      entry["step_time_ratio"] = entry["step_time"] / base_time
      entry["extra_bytes"] = entry["held_bytes"] - base_bytes
  # Headlines compare two methods at the task loss both reach (pairwise, so that a method that
  # cannot reach low losses does not move every other comparison up to its level): each method
  # against the baseline, and a method combined with FINCH ("X+finch") against X.
  headline = {}
  for name in by_loss["methods"]:
    references = [baseline] + [name.removesuffix(COMBINED_SUFFIX)] * name.endswith(COMBINED_SUFFIX)
    for reference in dict.fromkeys(references):
      if reference == name or reference not in by_loss["methods"]:
        continue
      pair = matched(
        [r for r in runs if r["method"] in (name, reference)], "task_loss", "forgetting"
      )
      mean, std = relative_change(
        pair["methods"][name]["per_seed"], pair["methods"][reference]["per_seed"], "forgetting"
      )
      headline[f"{name}_vs_{reference}_forgetting_change"] = {
        "mean": mean,
        "std": std,
        "task_loss": pair["target"],
        "forgetting": pair["methods"][name]["forgetting"],
        "reference_forgetting": pair["methods"][reference]["forgetting"],
      }
  report = {
    "matched_on": "task_loss",
    "target_task_loss": by_loss["target"],
    "baseline": baseline,
    "methods": methods,
    "headline": headline,
    "before": dict(before),
    "runs": [dict(r) for r in runs],
  }
  if all("task_fact_accuracy" in r and "retain_accuracy_drop" in r for r in runs):
    by_acc = matched(runs, "task_fact_accuracy", "retain_accuracy_drop", increasing=True)
    report["at_matched_accuracy"] = {
      "target_task_fact_accuracy": by_acc["target"],
      "methods": {
        name: {
          "retain_accuracy_drop": e["retain_accuracy_drop"],
          "retain_accuracy_drop_std": e["retain_accuracy_drop_std"],
          "learning_rate": e["learning_rate"],
          "seeds_reaching_target": e["seeds_reaching_target"],
        }
        for name, e in by_acc["methods"].items()
      },
    }
  return report


def single_run_report(
  name: str, config: ml_collections.ConfigDict, before: Mapping, after: Mapping
) -> dict[str, Any]:
  """report.json for one fine-tuning run (no sweep, so nothing to match)."""
  entry = {
    "task_loss": after["task_loss"],
    "retain_loss_before": before["retain_loss"],
    "retain_loss_after": after["retain_loss"],
    "forgetting": after["retain_loss"] - before["retain_loss"],
    "learning_rate": config.optimizer.learning_rate,
  }
  for key in ("task_fact_accuracy", "retain_fact_accuracy"):
    if key in after:
      entry[key] = after[key]
  return {"matched_on": None, "methods": {name: entry}, "before": dict(before), "runs": []}


# ----- output ----------------------------------------------------------------------------------


def _fmt(values: Mapping[str, Any]) -> str:
  keys = ("task_loss", "retain_loss", "forgetting", "task_fact_accuracy", "retain_fact_accuracy")
  return "  ".join(f"{k} {values[k]:.4f}" for k in keys if k in values)


def _print(primary: bool, text: str) -> None:
  if primary:
    print(text, flush=True)


def markdown_table(report: Mapping[str, Any]) -> str:
  """The comparison as a Markdown table plus the headline sentence."""
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
    std = m.get("forgetting_std")
    spread = f" ± {std:.4f}" if std is not None and math.isfinite(std) else ""
    lines.append(
      f"| {name} | {m['task_loss']:.4f} | {m['retain_loss_before']:.4f} "
      f"| {m['retain_loss_after']:.4f} | {m['forgetting']:.4f}{spread} "
      f"| {m.get('seeds_reaching_target', 1)} | {m.get('learning_rate', float('nan')):.3g} "
      f"| {m.get('step_time_ratio', 1.0):.3f} "
      f"| {m.get('extra_bytes', 0)} |"
    )
  for key, h in report.get("headline", {}).items():
    at = f" at matched task loss {h['task_loss']:.4f}" if "task_loss" in h else ""
    lines.append(
      f"\n{key}: {100 * h['mean']:+.1f}% ± {100 * h['std']:.1f}% "
      f"(relative change in forgetting{at}, seeds paired)"
    )
  acc = report.get("at_matched_accuracy")
  if acc:
    lines.append(f"\nAt matched task fact-recall accuracy {acc['target_task_fact_accuracy']:.3f}:")
    lines.append("\n| method | retain fact-accuracy drop | learning rate |")
    lines.append("| --- | --- | --- |")
    for name, m in acc["methods"].items():
      lines.append(
        f"| {name} | {m['retain_accuracy_drop']:.4f} ± "
        f"{m['retain_accuracy_drop_std']:.4f} | {m['learning_rate']:.3g} |"
      )
  return "\n".join(lines)


def write_report(workdir: str, report: Mapping[str, Any]) -> None:
  """Writes report.json, report.md and the plots into `workdir`."""
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("# Forgetting report\n\n" + markdown_table(report) + "\n")
  if report.get("runs"):
    plot(workdir, report)


def _line_styles(methods: Sequence[str], plt: Any) -> dict[str, dict[str, Any]]:
  """A colour per remedy; a method with FINCH on top ("X+finch") dashed in X's colour."""
  bases = list(dict.fromkeys(m.removesuffix(COMBINED_SUFFIX) for m in methods))
  colors = {
    b: plt.get_cmap("tab20" if len(bases) > 10 else "tab10")(i) for i, b in enumerate(bases)
  }
  return {
    m: {
      "color": colors[m.removesuffix(COMBINED_SUFFIX)],
      "ls": "--" if m != m.removesuffix(COMBINED_SUFFIX) else "-",
    }
    for m in methods
  }


def plot(workdir: str, report: Mapping[str, Any]) -> None:
  """frontier.png (task loss against forgetting per method) and curves.png (losses over steps)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = report["runs"]
  methods = list(report["methods"])
  fig, ax = plt.subplots(figsize=(6, 4.5))
  styles = _line_styles(methods, plt)
  for name in methods:
    means = _seed_means([r for r in runs if r["method"] == name], ["task_loss", "forgetting"])
    x, y = [p["task_loss"] for p in means], [p["forgetting"] for p in means]
    ax.plot(x, y, marker="o", label=name, **styles[name])
    for p in means:
      ax.annotate(f"{p['learning_rate']:.2g}", (p["task_loss"], p["forgetting"]), fontsize=7)
    ax.scatter(
      [r["task_loss"] for r in runs if r["method"] == name],
      [r["forgetting"] for r in runs if r["method"] == name],
      s=8,
      alpha=0.4,
    )
  if report.get("target_task_loss") is not None:
    ax.axvline(report["target_task_loss"], color="grey", ls="--", lw=1, label="matched task loss")
  ax.set_xlabel("task loss after fine-tuning (lower is better)")
  ax.set_ylabel("forgetting: retain loss rise")
  ax.set_title("Task loss against forgetting (labels: learning rate)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "frontier.png"), dpi=120)
  plt.close(fig)

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for name in methods:
    lr = report["methods"][name].get("learning_rate")
    candidates = [r for r in runs if r["method"] == name]
    if lr is not None and math.isfinite(lr):
      run = min(candidates, key=lambda r: (abs(math.log(r["learning_rate"] / lr)), r["seed"]))
    else:
      run = candidates[0]
    steps = [e["step"] for e in run["curve"]]
    label = f"{name} (lr {run['learning_rate']:.2g})"
    axes[0].plot(steps, [e["task_loss"] for e in run["curve"]], label=label, **styles[name])
    axes[1].plot(steps, [e["retain_loss"] for e in run["curve"]], label=label, **styles[name])
  axes[0].set_title("task loss")
  axes[1].set_title("retain loss")
  axes[1].axhline(report["before"]["retain_loss"], color="grey", ls="--", lw=1, label="before")
  for ax in axes:
    ax.set_xlabel("step")
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "curves.png"), dpi=120)
  plt.close(fig)
