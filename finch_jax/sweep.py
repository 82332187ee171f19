"""A comparison: one base model, then each method's learning-rate sweep over seeds, then the
report at matched task loss (`finch_jax.report`).

`compare(config, workdir)` pretrains (or reuses) the base in `workdir/base`, runs every method of
`compare.methods` at each of its learning rates and each seed of `compare.seeds` in
`workdir/runs/METHOD/lrRATE_seedSEED`, times every method's step back to back, and writes
report.json, report.md and the plots.

A finished run leaves `result.json` beside its checkpoints, stamped with the fingerprint of
everything that determines it (`finch_jax.configure.fingerprint`: the effective config, the
rate and seed, the files its data and base read). A rerun reuses a run only when that
fingerprint is unchanged; otherwise the old directory is set aside (renamed with its
fingerprint, nothing deleted) and the run is redone. The base model is kept the same way. Every
file a rerun reads to decide this is written whole or not at all (`finch_jax.files`).

When runs train several at once, a run that fails, or SIGTERM/SIGINT, stops the others at their
next step (each saves its checkpoint) and starts no queued run; the first error is raised then.

With `compare.results_dir` set, the comparison is also a study that can grow across sessions:
each finished run's summary (its fingerprint, the code version, every measure before and after,
its curves thinned to at most `MAX_CURVE_POINTS` points) is written there as
`runs/METHOD/lrRATE_seedSEED.json`, with `study.json` (baseline, methods, step timings) and the
report of every run the directory holds. A run whose summary there has the same fingerprint is
not trained again, whatever the workdir holds; `python -m finch_jax.report DIR` rebuilds the
report from those files alone.

The workdir is local or in a bucket (`gs://BUCKET/...`): every path is an `etils.epath.Path`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import jax
import ml_collections
from etils import epath
from flax import nnx

import finch_jax
from finch_jax import configure, files, run
from finch_jax import sharding as shd
from finch_jax.data import debian, probes
from finch_jax.loop import Preempted, StopRequests, format_duration
from finch_jax.report import (
  STORE_RUNS,
  STUDY_FILE,
  build_report,
  markdown_table,
  report_from_store,
  write_report,
)
from finch_jax.trainer import Trainer

FINGERPRINT_FILE = configure.FINGERPRINT_FILE


def _print(text: str) -> None:
  if jax.process_index() == 0:
    print(text, flush=True)


def _fmt(values: Mapping[str, Any]) -> str:
  keys = ("task_loss", "retain_loss", "forgetting", "task_fact_accuracy", "retain_fact_accuracy")
  return "  ".join(f"{k} {values[k]:.4f}" for k in keys if k in values)


def _tree_bytes(tree: Any) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


MAX_CURVE_POINTS = 50  # per curve in a run's summary


def thinned(points: list[dict[str, Any]], max_points: int = MAX_CURVE_POINTS) -> list:
  """At most `max_points` of `points`, evenly spaced, the first and the last kept."""
  if len(points) <= max_points:
    return list(points)
  keep = sorted({round(i * (len(points) - 1) / (max_points - 1)) for i in range(max_points)})
  return [points[i] for i in keep]


# Keys of a metrics record that time the machine rather than describe the training.
_TIMING_KEYS = ("step_time", "input_wait_share", "tokens_per_second")


def _training_records(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The training records of metrics.jsonl (loss, FINCH's scale, ...), without the timings."""
  with (epath.Path(workdir) / "metrics.jsonl").open() as f:
    records = [r for r in map(json.loads, f) if "loss" in r]
  return [{k: v for k, v in r.items() if k not in _TIMING_KEYS} for r in records]


def _median_step_time(workdir: str | os.PathLike) -> float:
  with (epath.Path(workdir) / "metrics.jsonl").open() as f:
    times = [r["step_time"] for r in map(json.loads, f) if "step_time" in r]
  # The first logged window includes compilation.
  return statistics.median(times[1:] if len(times) > 1 else times)


def _run_name(learning_rate: float, seed: int) -> str:
  return f"lr{learning_rate:.3g}_seed{seed}"


def claim(directory: str | os.PathLike, key: str) -> None:
  """Makes `directory` hold the run of fingerprint `key`: a directory made for another
  fingerprint is renamed aside (`DIR.stale-OLDKEY`, or `DIR.stale-OLDKEY-2`, ... when that name
  is taken: a config flipped back and forth, a rename cut short), never deleted, and the key is
  recorded (written whole or not at all).

  Process 0 does this while the others wait (every process calls `claim`), so no process opens
  the old run's checkpoints while they move. In a bucket a rename copies each object and deletes
  the original, so it is not atomic: a run stopped during it leaves the old run split between
  the two names, with nothing lost, and the rerun sets the rest aside under a free name.
  """
  if jax.process_index() == 0:
    directory = epath.Path(directory)
    path = directory / FINGERPRINT_FILE
    stamp = files.read_json(path)  # None: absent, or cut short by an older version's crash
    old = stamp.get("fingerprint") if isinstance(stamp, dict) else None
    if old != key:
      if old is not None:
        moved = files.set_aside(directory, f".stale-{old}")
        _print(f"{directory}: its config or data changed; the old run is kept in {moved.name}.")
      elif directory.is_dir() and any(directory.iterdir()):
        # Made before runs were fingerprinted: which config made it is unknown, so it is redone.
        files.set_aside(directory, ".stale-unknown")
      files.write_json(path, {"fingerprint": key})
  shd.barrier("finch_jax.sweep.claim")


def compare(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Pretrains (or reuses) the base, runs every method's sweep, writes and prints the report."""
  # Every run of the comparison reads the one dataset built under the top workdir.
  config = configure.override(config, {"data": {"data_dir": configure.data_dir(config, workdir)}})
  groups = run_device_groups(config)  # before any training: a bad value fails at once
  base_dir = epath.Path(workdir) / "base"
  base = _base_model(config, base_dir)
  config = _with_known_probes(config, base, base_dir)
  configs = _methods_to_train(config, configure.method_configs(config))
  trainers = {name: configure.make_trainer(cfg) for name, cfg in configs.items()}
  evaluator = run.Evaluator(config, workdir, next(iter(trainers.values())), base=base)
  before = _evaluate_base(evaluator, base, base_dir)
  _print("base model: " + _fmt(before))
  store = ResultsStore(config.compare.results_dir) if config.compare.results_dir else None
  if store is not None and jax.process_index() == 0:
    store.write_study(config.compare.baseline, list(configs), {}, report=False)
  sweep_runs = []
  for name, cfg in configs.items():
    samples = run.replay_samples(cfg, trainers[name], base, cache_dir=base_dir)
    for learning_rate in config.compare.methods[name].learning_rates:
      for seed in config.compare.seeds:
        sweep_runs.append(SweepRun(name, cfg, float(learning_rate), int(seed), samples, store))
  if len(groups) == 1:
    clock = _SweepClock([r.to_train(workdir) for r in sweep_runs])
    runs = []
    for sweep_run in sweep_runs:
      with clock.run(sweep_run) as description:
        runs.append(
          sweep_run.result(
            workdir, base, trainers[sweep_run.method], evaluator, before, description
          )
        )
  else:
    runs = _concurrent_results(sweep_runs, groups, config, configs, workdir, base, before)
  timing = config.compare.timing
  _print(
    f"Timing each method's train step in {timing.rounds} alternating rounds of {timing.steps} "
    "step(s) each (the cost column)..."
  )
  step_times = measure_step_times(
    trainers,
    {name: _first_batch(cfg, workdir, trainers[name], base) for name, cfg in configs.items()},
    base,
    rounds=timing.rounds,
    steps=timing.steps,
  )
  _print("Reading the sweeps at matched task loss and writing the report...")
  report = build_report(config.compare.baseline, before, runs, step_times)
  if jax.process_index() == 0:
    write_report(workdir, report)
    if store is not None:
      store.write_study(config.compare.baseline, list(configs), step_times)
    _print("\n" + markdown_table(report))
  return report


def _methods_to_train(
  config: ml_collections.ConfigDict, configs: dict[str, ml_collections.ConfigDict]
) -> dict[str, ml_collections.ConfigDict]:
  """The methods this invocation sweeps: `compare.only` (the baseline always among them), in
  that order, or all. A study that grows over sessions trains a few methods at a time; its
  results directory holds the others, and its report reads them all."""
  only = list(config.compare.get("only", ()) or ())
  if not only:
    return configs
  if unknown := [name for name in only if name not in configs]:
    raise ValueError(
      f"compare.only names {unknown}, which compare.methods lacks; choose among {list(configs)}."
    )
  baseline = config.compare.baseline
  return {name: configs[name] for name in dict.fromkeys([baseline, *only])}


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

  def write_study(
    self,
    baseline: str,
    methods: list[str],
    step_times: Mapping[str, list[float]],
    report: bool = True,
  ) -> None:
    """Writes study.json (the baseline, the order of the methods, the latest step timings),
    then, with `report`, the report of every run the directory holds. A sweep writes it before
    its first run too, so the runs it keeps can be read even if it stops before the end."""
    # Methods swept in earlier sessions keep their place and their timings.
    earlier = files.read_json(self.directory / STUDY_FILE) or {}
    methods = list(dict.fromkeys([*earlier.get("methods", []), *methods]))
    step_times = {**earlier.get("step_times", {}), **step_times}
    files.write_json(
      self.directory / STUDY_FILE,
      {"baseline": baseline, "methods": methods, "step_times": step_times},
      indent=1,
    )
    if report:
      write_report(self.directory, report_from_store(self.directory))


@functools.cache
def code_version() -> str:
  """The code that ran: `git describe --always --dirty` of the package's checkout, else the
  installed package's version."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    described = subprocess.run(
      ["git", "-C", here, "describe", "--always", "--dirty", "--tags"],
      capture_output=True,
      text=True,
      timeout=30,
      check=True,
    )
    return f"git {described.stdout.strip()}"
  except (OSError, subprocess.SubprocessError):
    return f"finch_jax {finch_jax.__version__}"


def _base_model(config: ml_collections.ConfigDict, base_dir: epath.Path) -> Any:
  """The comparison's base model: `config.base_checkpoint` when set (a pretrained model or a
  pretraining run's workdir), else pretrained in `base_dir`, or resumed or reused from there."""
  if config.base_checkpoint:
    claim(base_dir, configure.fingerprint(config))
    _print(f"Loading the base model from {config.base_checkpoint}...")
    return run.base_params(config, configure.make_trainer(config))
  pre = configure.pretrain_config(config)
  claim(base_dir, configure.fingerprint(pre))
  trainer = configure.make_trainer(pre)
  description = f"pretraining the base model ({pre.num_train_steps} steps)"
  return run.run_training(pre, base_dir, trainer=trainer, description=description).state.params


KNOWN_PROBES = "recalled"  # data.options.debian_elements.known: the probes the base recalls


def _with_known_probes(
  config: ml_collections.ConfigDict, base: Any, base_dir: epath.Path
) -> ml_collections.ConfigDict:
  """With `known: "recalled"` for `debian/elements`, the config whose probe set is what the base
  model recalls before fine-tuning (computed once, kept in `base_dir/known_probes.jsonl`):
  forgetting of knowledge is measurable only on what the model knew."""
  if configure.dataset_options(config, "debian/elements").get("known") != KNOWN_PROBES:
    return config
  _print("Finding the element probes the base model recalls...")
  trainer = configure.make_trainer(config)
  path = probes.known_probes(
    probes.element_probes(debian.elements()),
    nnx.merge(trainer.graphdef, base),
    configure.make_tokenizer(config),
    os.fspath(base_dir / "known_probes.jsonl"),
  )
  return configure.override(config, {"data": {"options": {"debian_elements": {"known": path}}}})


def _evaluate_base(evaluator: run.Evaluator, base: Any, base_dir: epath.Path) -> dict[str, float]:
  """The eval sets on the base model, kept in `base_dir/eval_before.json`."""
  path = base_dir / "eval_before.json"
  before = files.read_json(path)
  if before is not None:
    return before
  _print("Evaluating the base model on the task and retain sets...")
  before = evaluator(base)
  if jax.process_index() == 0:
    files.write_json(path, before)
  return before


def run_device_groups(config: ml_collections.ConfigDict) -> list[list[jax.Device]]:
  """The devices of each run that trains at once (`compare.concurrent_runs`, read by
  `sharding.concurrent_runs`): equal groups of consecutive devices, one group of all devices
  when runs take turns."""
  devices = jax.devices()
  wanted = int(config.compare.get("concurrent_runs", 0) or 0)
  try:
    count = shd.concurrent_runs(
      wanted,
      config.mesh,
      len(devices),
      process_count=jax.process_count(),
      cpu_cores=shd.cpu_cores(),
    )
  except ValueError as error:
    raise ValueError(f"compare.concurrent_runs={wanted}: {error}") from None
  size = len(devices) // count
  return [devices[i * size : (i + 1) * size] for i in range(count)]


class _Worker:
  """What one of the runs training at once holds: its trainers (one per method) and evaluator,
  compiled for its own devices."""

  def __init__(self, devices, config, configs, workdir, base):
    self.trainers = {
      name: configure.make_trainer(cfg, mesh=shd.make_mesh(**cfg.mesh.to_dict(), devices=devices))
      for name, cfg in configs.items()
    }
    self.evaluator = run.Evaluator(config, workdir, next(iter(self.trainers.values())), base=base)


def _concurrent_results(
  sweep_runs: list[SweepRun],
  groups: list[list[jax.Device]],
  config: ml_collections.ConfigDict,
  configs: Mapping[str, ml_collections.ConfigDict],
  workdir: str | os.PathLike,
  base: Any,
  before: Mapping[str, float],
) -> list[dict[str, Any]]:
  """Every run's result, `len(groups)` runs training at once in threads, each on its group of
  devices; in the order of `sweep_runs`. A run's numbers are those it gives alone on a mesh of
  the same shape (`tests/test_sweep.py`). SIGTERM or SIGINT, or a run that fails, stops every
  run at its next step, with its checkpoint saved (`loop.StopRequests`), and starts no queued
  run; the first error is raised as soon as the runs in flight have stopped."""
  workers: queue.Queue[_Worker] = queue.Queue()
  for devices in groups:
    workers.put(_Worker(devices, config, configs, workdir, base))
  clock = _ConcurrentClock([r.to_train(workdir) for r in sweep_runs], len(groups))

  def result(sweep_run: SweepRun, stop: _SweepStop) -> dict[str, Any]:
    if stop.stopping():
      raise stop.not_started(sweep_run)
    worker = workers.get()
    try:
      with clock.run(sweep_run):
        return sweep_run.result(
          workdir,
          base,
          worker.trainers[sweep_run.method],
          worker.evaluator,
          before,
          progress=False,
          stop=stop,
        )
    except BaseException:
      stop.failed.set()  # before this thread takes a queued run
      raise
    finally:
      workers.put(worker)

  with _SweepStop() as stop, ThreadPoolExecutor(len(groups)) as pool:
    futures = [pool.submit(result, sweep_run, stop) for sweep_run in sweep_runs]
    done, _ = wait(futures, return_when=FIRST_EXCEPTION)
    failed = [f for f in futures if f in done and f.exception() is not None]
    if failed:
      stop.failed.set()  # the runs in flight save and stop at their next step
      for future in futures:
        future.cancel()  # the queued ones never start
      raise failed[0].exception()  # once the pool has waited for the runs in flight
    return [future.result() for future in futures]


class _SweepStop(StopRequests):
  """The `StopRequests` of runs training at once, which a failed run sets as well: every run in
  flight then stops at its next step, saving its checkpoint, and no queued run starts."""

  def __init__(self):
    super().__init__()
    self.failed = threading.Event()

  def stopping(self) -> bool:
    """Whether the sweep is stopping (a signal came, or a run failed)."""
    return self.failed.is_set() or self.signum is not None

  def reached(self, step: int) -> bool:
    """Whether to stop after `step`."""
    return self.failed.is_set() or super().reached(step)

  def preempted(self, step: int, state: Any, checkpointer: Any) -> Preempted:
    """The exception a run stopped by a signal, or by another run's failure, raises."""
    if self.signum is not None:
      return super().preempted(step, state, checkpointer)
    where = getattr(checkpointer, "directory", None)
    message = f"Stopped after step {step} because another run of the sweep failed" + (
      f": the checkpoint of step {step} is in {where}." if where else "."
    )
    return Preempted(signal.SIGTERM, step, state, message)

  def not_started(self, sweep_run: SweepRun) -> Preempted:
    """The exception of a queued run that is not started because the sweep is stopping."""
    signum = self.signum or signal.SIGTERM
    message = f"{sweep_run.name} was not started: the sweep is stopping. Rerun to resume it."
    return Preempted(signum, 0, None, message)


class _SweepClock:
  """Says which run of the sweeps is running and, from the runs trained so far, about how long
  the rest will take (runs read back from an earlier sweep take no time)."""

  def __init__(self, to_train: list[bool]):
    """`to_train[i]`: whether run i trains (False: its result is read back)."""
    self.to_train, self.total = to_train, len(to_train)
    self.index, self.trained, self.seconds = 0, 0, 0.0

  @contextlib.contextmanager
  def run(self, sweep_run: SweepRun):
    """Times the body, yielding the progress bar's description of the run."""
    self.index += 1
    left = ""
    if self.trained:
      remaining = self.seconds / self.trained * sum(self.to_train[self.index - 1 :])
      left = f", about {format_duration(remaining)} left in the sweeps"
    start = time.perf_counter()
    yield f"run {self.index} of {self.total}{left}: {sweep_run.name}"
    elapsed = time.perf_counter() - start
    if elapsed > 1.0:  # trained, not read back
      self.trained, self.seconds = self.trained + 1, self.seconds + elapsed


class _ConcurrentClock:
  """`_SweepClock` for runs that train `width` at a time: one line as each run starts (which
  runs are training, about how long is left) and the run's own line as it ends."""

  def __init__(self, to_train: list[bool], width: int):
    self.to_train, self.total, self.width = to_train, len(to_train), width
    self.started, self.trained, self.seconds = 0, 0, 0.0
    self.running: dict[str, float] = {}
    self.lock = threading.Lock()

  @contextlib.contextmanager
  def run(self, sweep_run: SweepRun):
    """Times the body and says what is running."""
    with self.lock:
      self.started += 1
      self.running[sweep_run.name] = time.perf_counter()
      left = ""
      if self.trained:
        per_run = self.seconds / self.trained / self.width  # wall seconds a run adds
        remaining = per_run * sum(self.to_train[self.started - 1 :])
        left = f", about {format_duration(remaining)} left in the sweeps"
      _print(
        f"run {self.started} of {self.total} ({len(self.running)} training at once"
        f"{left}): {', '.join(self.running)}"
      )
    try:
      yield
    finally:
      with self.lock:
        elapsed = time.perf_counter() - self.running.pop(sweep_run.name)
        if elapsed > 1.0:  # trained, not read back
          self.trained, self.seconds = self.trained + 1, self.seconds + elapsed


class SweepRun:
  """One method at one learning rate and seed, fine-tuned from the base."""

  def __init__(
    self,
    method: str,
    config: ml_collections.ConfigDict,
    learning_rate: float,
    seed: int,
    samples: Any,
    store: ResultsStore | None = None,
  ):
    self.method, self.config, self.samples, self.store = method, config, samples, store
    self.learning_rate, self.seed = learning_rate, seed
    self.fingerprint = configure.fingerprint(config, learning_rate=learning_rate, seed=seed)

  @property
  def name(self) -> str:
    """How the console names this run."""
    return f"{self.method} lr {self.learning_rate:.3g} seed {self.seed}"

  def _dir(self, workdir: str | os.PathLike) -> epath.Path:
    return epath.Path(workdir) / "runs" / self.method / _run_name(self.learning_rate, self.seed)

  def to_train(self, workdir: str | os.PathLike) -> bool:
    """Whether `result` will train this run (False: a finished run of the same fingerprint)."""
    if self.store is not None and self.store.find(self) is not None:
      return False
    run_dir = self._dir(workdir)
    stamp = files.read_json(run_dir / FINGERPRINT_FILE)
    if not isinstance(stamp, dict) or stamp.get("fingerprint") != self.fingerprint:
      return True
    return files.read_json(run_dir / "result.json") is None

  def result(
    self,
    workdir: str | os.PathLike,
    base: Any,
    trainer: Trainer,
    evaluator: run.Evaluator,
    before: Mapping[str, float],
    description: str = "",
    *,
    progress: bool = True,
    stop: StopRequests | None = None,
  ) -> dict[str, Any]:
    """The run's result: read from its `result.json` when its fingerprint is unchanged, else
    trained with `trainer` (resuming its own checkpoints) and written there; `description`
    names it on the progress bar (shown with `progress`); `stop` as for `loop.fit`. With a
    results store, a summary of the same fingerprint there is the result, and a new result is
    kept there."""
    if self.store is not None and (kept := self.store.find(self)) is not None:
      return kept
    run_dir = self._dir(workdir)
    claim(run_dir, self.fingerprint)
    result_path = run_dir / "result.json"
    result = files.read_json(result_path)  # None: not finished (or cut short): redone
    if result is not None:
      return self._kept(result, before)
    fit = run.run_training(
      self.config,
      run_dir,
      trainer=trainer,
      init_params=base,
      learning_rate=self.learning_rate,
      seed=self.seed,
      evaluator=evaluator,
      progress=progress,
      samples=self.samples,
      description=description or self.name,
      stop=stop,
    )
    result = self._summary(fit, run_dir, trainer, evaluator, before)
    if jax.process_index() == 0:
      files.write_json(result_path, result)
    _print(f"{self.method:>10s} lr={self.learning_rate:<8.3g} seed={self.seed}: " + _fmt(result))
    return self._kept(result, before)

  def _kept(self, result: dict[str, Any], before: Mapping[str, float]) -> dict[str, Any]:
    """`result` as the results store keeps it, written there when there is a store. A result
    written before runs recorded these gets the base's measures and an unknown code version."""
    summary = {"before": dict(before), "code_version": "unknown", **result}
    summary["curve"] = thinned(summary["curve"])
    if self.store is not None and jax.process_index() == 0:
      self.store.write(summary)
    return summary

  def _summary(
    self,
    fit: Any,
    run_dir: epath.Path,
    trainer: Trainer,
    evaluator: run.Evaluator,
    before: Mapping[str, float],
  ) -> dict[str, Any]:
    final = fit.evals[-1]
    result = {
      "method": self.method,
      "learning_rate": self.learning_rate,
      "seed": self.seed,
      "fingerprint": self.fingerprint,
      "code_version": code_version(),
      "task_loss": final["task_loss"],
      "retain_loss": final["retain_loss"],
      "forgetting": final["retain_loss"] - before["retain_loss"],
      # Every measure of the eval sets on the base model and after fine-tuning.
      "before": dict(before),
      "after": {k: v for k, v in final.items() if k != "step"},
      "curve": thinned(fit.evals),
      "train_curve": thinned(_training_records(run_dir)),
      "step_time": _median_step_time(run_dir),
      "optimizer_state_bytes": _tree_bytes(fit.state.opt_state),
      # What the method holds on top of the model it trains: trained weights (or adapters),
      # optimizer state, the frozen base or reference model, replay samples.
      "held_bytes": trainer.held_bytes(fit.state) + sum(x.nbytes for x in self.samples or ()),
    }
    for set_name in evaluator.fact_sets:
      result[f"{set_name}_fact_accuracy"] = final[f"{set_name}_fact_accuracy"]
    if "retain_fact_accuracy" in result:
      result["retain_accuracy_drop"] = (
        before["retain_fact_accuracy"] - result["retain_fact_accuracy"]
      )
    # The further measures, when the config asks for them (`data.token_accuracy`, `kl_sets`,
    # `calibration_sets`): the task's token accuracy and exact answers, KL to the base on the
    # retain text, the rise of the retain facts' answer NLL (forgetting in confidence), and
    # calibration before and after (not a forgetting measure: a model that forgets may grow
    # better or worse calibrated).
    for key in ("task_accuracy", "task_exact", "retain_kl"):
      if key in final:
        result[key] = final[key]
    if "retain_answer_nll" in final:
      result["retain_nll_rise"] = final["retain_answer_nll"] - before["retain_answer_nll"]
    for key in final:
      if key.endswith(("_ece", "_overconfidence")):
        result[f"{key}_before"], result[f"{key}_after"] = before[key], final[key]
    return result


def _first_batch(
  config: ml_collections.ConfigDict, workdir: str | os.PathLike, trainer: Trainer, base: Any
) -> dict[str, Any]:
  """A training batch of a method (its replay marker included), on the mesh."""
  samples = run.replay_samples(config, trainer, base, cache_dir=epath.Path(workdir) / "base")
  iterator = iter(run.train_batches(config, workdir, config.seed, samples))
  batch = trainer.global_batch(next(iterator))
  iterator.close()
  return batch


def measure_step_times(
  trainers: Mapping[str, Trainer],
  batches: Mapping[str, Any],
  base: Any,
  *,
  rounds: int,
  steps: int,
) -> dict[str, list[float]]:
  """Seconds per train step of each method in each of `rounds` rounds, timed in turn in the same
  process (`compare.timing` of configs/default.py sets both counts).

  In every round each method runs `steps` steps on a fixed batch of its own, starting from the
  base, the order rotating every round; so a load that comes and goes on the machine touches
  the methods of one round alike, and `report.step_time_ratios` reads the rounds as pairs (the
  median of the paired ratios, with an interval). The step times logged during the sweeps
  (`metrics.jsonl`) ran minutes apart and vary with the load.

  Returns:
    `{name: [seconds per step in round 0, round 1, ...]}`.
  """
  if rounds < 1 or steps < 1:
    raise ValueError(
      f"compare.timing rounds={rounds}, steps={steps}: give at least 1 of each (about 16 rounds "
      "give the cost column a 95% interval)."
    )
  names = list(trainers)
  states = {}
  for name in names:  # compiled before timing; a step's output feeds the next
    state = trainers[name].create_state(base)
    # Two steps: the second takes the first's output, whose placement can differ from a new
    # state's, and so may compile again.
    for _ in range(2):
      state, _ = trainers[name].train_step(state, batches[name])
    states[name] = state
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
  return times


__all__ = [
  "FINGERPRINT_FILE",
  "MAX_CURVE_POINTS",
  "ResultsStore",
  "SweepRun",
  "claim",
  "code_version",
  "compare",
  "measure_step_times",
  "thinned",
]
