"""A comparison's plan: every run it needs, each with its fingerprint and what it reuses.

`plan(config, workdir, store)` lists the runs of `compare.methods` (or of `compare.only` and the
baseline) at each of their learning rates and each seed of `compare.seeds`, in that order. Each
run is keyed by the fingerprint of everything that determines it (`configure.fingerprint`: the
method's effective config, the rate and seed, the files its data and base read) and reuses:

- the summary a study's results directory keeps for it (`ResultsStore`, `compare.results_dir`)
  when that summary has the run's fingerprint, whatever the workdir holds; else
- the finished run in `workdir/runs/METHOD/lrRATE_seedSEED` (its `result.json`) when that
  directory was claimed for the same fingerprint; else nothing: the run trains.

The plan reads files and writes none, so it can be checked without training. `claim` is the
directory rule the sweep applies before a run trains: a directory made for another fingerprint
is set aside (renamed, never deleted), and the fingerprint recorded. Every file a rerun reads to
decide what to reuse is written whole or not at all (`finch_jax.files`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from etils import epath

from finch_jax import configure, files
from finch_jax import sharding as shd
from finch_jax.report import (
  STORE_RUNS,
  STUDY_FILE,
  report_from_store,
  timing_sessions,
  write_report,
)

RESULT_FILE = "result.json"  # in a run directory: the finished run's result
KEPT_IN_STORE = "results store"  # `SweepRun.reuses`: the study's summary of the run
KEPT_IN_WORKDIR = "workdir"  # `SweepRun.reuses`: the run directory's result.json


def _run_name(learning_rate: float, seed: int) -> str:
  return f"lr{learning_rate:.3g}_seed{seed}"


def _stamp(directory: epath.Path) -> str | None:
  """The fingerprint `directory` was claimed for; None when it has none (or a torn one)."""
  stamp = files.read_json(directory / configure.FINGERPRINT_FILE)
  return stamp.get("fingerprint") if isinstance(stamp, dict) else None


def claim(directory: str | os.PathLike, key: str) -> epath.Path | None:
  """Makes `directory` hold the run of fingerprint `key`: a directory made for another
  fingerprint is renamed aside (`DIR.stale-OLDKEY`, or `DIR.stale-OLDKEY-2`, ... when that name
  is taken: a config flipped back and forth, a rename cut short; `DIR.stale-unknown` for one made
  before runs were fingerprinted), never deleted, and the key is recorded (written whole or not
  at all). Returns where the old run went, or None (nothing moved, or not process 0).

  Process 0 does this while the others wait (every process calls `claim`), so no process opens
  the old run's checkpoints while they move. In a bucket a rename copies each object and deletes
  the original, so it is not atomic: a run stopped during it leaves the old run split between
  the two names, with nothing lost, and the rerun sets the rest aside under a free name.
  """
  moved = None
  if jax.process_index() == 0:
    directory = epath.Path(directory)
    old = _stamp(directory)  # None: absent, or cut short by an older version's crash
    if old != key:
      if old is not None:
        moved = files.set_aside(directory, f".stale-{old}")
      elif directory.is_dir() and any(directory.iterdir()):
        # Made before runs were fingerprinted: which config made it is unknown, so it is redone.
        moved = files.set_aside(directory, ".stale-unknown")
      files.write_json(directory / configure.FINGERPRINT_FILE, {"fingerprint": key})
  shd.barrier("finch_jax.plan.claim")
  return moved


@dataclasses.dataclass(frozen=True, eq=False)
class SweepRun:
  """One method at one learning rate and seed, fine-tuned from the base: an entry of a plan."""

  method: str
  config: ml_collections.ConfigDict  # the method's effective config
  learning_rate: float
  seed: int
  fingerprint: str  # configure.fingerprint(config, learning_rate=..., seed=...)
  reuses: str | None = None  # KEPT_IN_STORE, KEPT_IN_WORKDIR, or None: the run trains

  @property
  def name(self) -> str:
    """How the console names this run."""
    return f"{self.method} lr {self.learning_rate:.3g} seed {self.seed}"

  def directory(self, workdir: str | os.PathLike) -> epath.Path:
    """Where the run trains: `workdir/runs/METHOD/lrRATE_seedSEED`."""
    return epath.Path(workdir) / "runs" / self.method / _run_name(self.learning_rate, self.seed)


class ResultsStore:
  """A study's results directory (`compare.results_dir`): one summary per finished run,
  `runs/METHOD/lrRATE_seedSEED.json`, plus `study.json` and the report of all of them.

  Every file is written atomically (a temporary file, then a rename), so a rerun that reads one
  to decide what to skip never reads half of it. A summary stands for its run only while its
  fingerprint is the run's (`configure.fingerprint`, the same key as a workdir's `result.json`).
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = epath.Path(directory)

  def path(self, method: str, learning_rate: float, seed: int) -> epath.Path:
    """Where the summary of a run is kept."""
    return self.directory / STORE_RUNS / method / f"{_run_name(learning_rate, seed)}.json"

  def find(self, sweep_run: SweepRun) -> dict[str, Any] | None:
    """The summary kept for `sweep_run`, or None when there is none of its fingerprint."""
    path = self.path(sweep_run.method, sweep_run.learning_rate, sweep_run.seed)
    if not path.exists():
      return None
    summary = files.read_json(path)
    return summary if summary and summary.get("fingerprint") == sweep_run.fingerprint else None

  def write(self, summary: Mapping[str, Any]) -> None:
    """Keeps a finished run's summary (replacing one of another fingerprint)."""
    path = self.path(summary["method"], summary["learning_rate"], summary["seed"])
    files.write_json(path, summary, indent=1)

  def timings(self) -> list[dict[str, dict[str, Any]]]:
    """The step timings study.json keeps (`report.timing_sessions`): one session per sweep that
    timed, each with the baseline it was paired with and the config key of each method."""
    return timing_sessions((files.read_json(self.directory / STUDY_FILE) or {}).get("step_times"))

  def current_timings(
    self, fingerprints: Mapping[str, str], baseline: str
  ) -> list[dict[str, dict[str, Any]]]:
    """The kept timings that still stand for the methods' configs (`fingerprints`, each method's
    `configure.fingerprint`): a session whose baseline was timed under another config is left
    out, and from the others each method timed under another config."""
    out = []
    for session in self.timings():
      keys = session["fingerprints"]
      if baseline not in keys or keys[baseline] != fingerprints.get(baseline):
        continue
      names = [n for n in session["step_times"] if keys.get(n) == fingerprints.get(n)]
      if set(names) - {baseline}:
        out.append(
          {
            "step_times": {n: session["step_times"][n] for n in names},
            "fingerprints": {n: keys[n] for n in names},
          }
        )
    return out

  def write_study(
    self,
    baseline: str,
    methods: list[str],
    step_times: Mapping[str, list[float]],
    fingerprints: Mapping[str, str] | None = None,
    report: bool = True,
  ) -> None:
    """Writes study.json (the baseline, the order of the methods, the step timings), then, with
    `report`, the report of every run the directory holds. A sweep writes it before its first
    run too, so the runs it keeps can be read even if it stops before the end.

    `step_times` (one sweep's alternating rounds, the baseline among them, timed under the
    configs `fingerprints` names) is kept beside the earlier sweeps' timings, not merged into
    them: a ratio pairs a method's rounds with the baseline's rounds of the same timing. A
    method timed again leaves its earlier timing; with `fingerprints`, so does every timing that
    no longer stands for its method's config (`current_timings`)."""
    # Methods swept in earlier sessions keep their place and their timings.
    earlier = files.read_json(self.directory / STUDY_FILE) or {}
    methods = list(dict.fromkeys([*earlier.get("methods", []), *methods]))
    kept = self.current_timings(fingerprints, baseline) if fingerprints else self.timings()
    retimed = set(step_times) - {baseline}
    sessions = []
    for session in kept:
      names = [n for n in session["step_times"] if n not in retimed]
      if set(names) - {baseline}:
        sessions.append(
          {
            part: {n: session[part][n] for n in names if n in session[part]}
            for part in ("step_times", "fingerprints")
          }
        )
    if step_times:
      keys = {n: fingerprints[n] for n in step_times} if fingerprints else {}
      sessions.append({"step_times": dict(step_times), "fingerprints": keys})
    files.write_json(
      self.directory / STUDY_FILE,
      {"baseline": baseline, "methods": methods, "step_times": sessions},
      indent=1,
    )
    if report:
      write_report(self.directory, report_from_store(self.directory))


def reused(
  sweep_run: SweepRun, workdir: str | os.PathLike, store: ResultsStore | None = None
) -> tuple[str | None, dict[str, Any] | None]:
  """What `sweep_run` reuses and the result it reuses: `(KEPT_IN_STORE, summary)` when `store`
  keeps a summary of its fingerprint; else `(KEPT_IN_WORKDIR, result)` when its directory in
  `workdir` was claimed for its fingerprint and holds a whole `result.json`; else `(None, None)`:
  the run trains (a torn `result.json` included)."""
  if store is not None and (summary := store.find(sweep_run)) is not None:
    return KEPT_IN_STORE, summary
  run_dir = sweep_run.directory(workdir)
  if _stamp(run_dir) == sweep_run.fingerprint:
    result = files.read_json(run_dir / RESULT_FILE)
    if result is not None:
      return KEPT_IN_WORKDIR, result
  return None, None


def planned_run(
  method: str,
  config: ml_collections.ConfigDict,
  learning_rate: float,
  seed: int,
  workdir: str | os.PathLike,
  store: ResultsStore | None = None,
) -> SweepRun:
  """The run of `method` (its effective `config`) at `learning_rate` and `seed`, with its
  fingerprint and what it reuses from `store` or `workdir` (`reused`)."""
  key = configure.fingerprint(config, learning_rate=learning_rate, seed=seed)
  sweep_run = SweepRun(method, config, learning_rate, seed, key)
  where, _ = reused(sweep_run, workdir, store)
  return dataclasses.replace(sweep_run, reuses=where)


def methods_to_train(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """The effective config of each method this invocation sweeps (`configure.method_configs`):
  `compare.only` (the baseline always among them), in that order, or all. A study that grows
  over sessions trains a few methods at a time; its results directory holds the others, and its
  report reads them all."""
  configs = configure.method_configs(config)
  only = list(config.compare.get("only", ()) or ())
  if not only:
    return configs
  problems = configure.compare_problems(config)
  if wrong := [text for field, text in problems if field == "compare.only"]:
    raise ValueError(f"compare.only {wrong[0]}")
  baseline = config.compare.baseline
  return {name: configs[name] for name in dict.fromkeys([baseline, *only])}


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a comparison runs: the methods it sweeps and their runs, in the order they run."""

  methods: dict[str, ml_collections.ConfigDict]  # name -> effective config
  runs: list[SweepRun]

  def to_train(self) -> list[SweepRun]:
    """The runs that train (reuse nothing)."""
    return [r for r in self.runs if r.reuses is None]


def plan(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  store: ResultsStore | None = None,
) -> Plan:
  """Every run of the comparison `config` with its fingerprint and what it reuses: for each
  method of `methods_to_train`, each of its learning rates, each seed of `compare.seeds`."""
  methods = methods_to_train(config)
  runs = [
    planned_run(name, method_config, float(learning_rate), int(seed), workdir, store)
    for name, method_config in methods.items()
    for learning_rate in config.compare.methods[name].learning_rates
    for seed in config.compare.seeds
  ]
  return Plan(methods, runs)


__all__ = [
  "KEPT_IN_STORE",
  "KEPT_IN_WORKDIR",
  "RESULT_FILE",
  "Plan",
  "ResultsStore",
  "SweepRun",
  "claim",
  "methods_to_train",
  "plan",
  "planned_run",
  "reused",
]
