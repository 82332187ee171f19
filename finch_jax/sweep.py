"""A comparison: one base model, then each method's learning-rate sweep over seeds, then the
report at matched task loss (`finch_jax.report`).

`compare(config, workdir)` pretrains (or reuses) the base in `workdir/base`, plans the runs
(`finch_jax.plan`: every method at each of its learning rates and each seed of `compare.seeds`,
each with its fingerprint and what it reuses), trains the others in
`workdir/runs/METHOD/lrRATE_seedSEED` under one progress bar, times every method's step back to
back, and writes report.json, report.md and the plots.

A finished run leaves `result.json` beside its checkpoints, stamped with the fingerprint of
everything that determines it (`finch_jax.configure.fingerprint`: the effective config, the
rate and seed, the files its data and base read). A rerun reuses a run only when that
fingerprint is unchanged; otherwise the old directory is set aside (renamed with its
fingerprint, nothing deleted: `plan.claim`) and the run is redone. The base model is kept the
same way. Every file a rerun reads to decide this is written whole or not at all
(`finch_jax.files`).

When runs train several at once, a run that fails, or SIGTERM/SIGINT, stops the others at their
next step (each saves its checkpoint) and starts no queued run; the first error is raised then.

With `compare.results_dir` set, the comparison is also a study that can grow across sessions:
each finished run's summary (its fingerprint, the code version, every measure before and after,
its curves thinned to at most `MAX_CURVE_POINTS` points) is written there as
`runs/METHOD/lrRATE_seedSEED.json`, with `study.json` (baseline, methods, step timings) and the
report of every run the directory holds (`plan.ResultsStore`). A run whose summary there has the
same fingerprint is not trained again, whatever the workdir holds; `python -m finch_jax.report
DIR` rebuilds the report from those files alone.

The workdir is local or in a bucket (`gs://BUCKET/...`): every path is an `etils.epath.Path`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import jax
import ml_collections
import tqdm
from etils import epath

import finch_jax
from finch_jax import configure, files, inputs, measures, plan, run
from finch_jax import sharding as shd
from finch_jax.evaluate import Evaluator
from finch_jax.loop import Preempted, StopRequests
from finch_jax.report import build_report, markdown_table, write_report
from finch_jax.trainer import Trainer

MAX_CURVE_POINTS = 50  # per curve in a run's summary


def _print(text: str) -> None:
  """Prints a line on process 0 (above the sweep's progress bar while one is drawn)."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


def _fmt(values: Mapping[str, Any]) -> str:
  keys = ("task_loss", "retain_loss", "forgetting", "task_fact_accuracy", "retain_fact_accuracy")
  return "  ".join(f"{k} {values[k]:.4f}" for k in keys if k in values)


def _tree_bytes(tree: Any) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


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


def _claim(directory: str | os.PathLike, key: str) -> None:
  """`plan.claim`, saying where an old run of another fingerprint went."""
  moved = plan.claim(directory, key)
  if moved is not None:
    _print(f"{directory}: its config or data changed; the old run is kept in {moved.name}.")


def compare(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Pretrains (or reuses) the base, runs every method's sweep, writes and prints the report."""
  # Every run of the comparison reads the one dataset built under the top workdir.
  config = configure.override(config, {"data": {"data_dir": configure.data_dir(config, workdir)}})
  groups = run_device_groups(config)  # before any training: a bad value fails at once
  base_dir = epath.Path(workdir) / "base"
  base = _base_model(config, base_dir)
  config = inputs.with_known_probes(config, base, base_dir)
  store = plan.ResultsStore(config.compare.results_dir) if config.compare.results_dir else None
  the_plan = plan.plan(config, workdir, store)
  configs = the_plan.methods
  trainers = {name: configure.make_trainer(cfg) for name, cfg in configs.items()}
  evaluator = Evaluator(config, workdir, next(iter(trainers.values())), base=base)
  before = _evaluate_base(evaluator, base, base_dir)
  _print("base model: " + _fmt(before))
  if store is not None and jax.process_index() == 0:
    store.write_study(config.compare.baseline, list(configs), {}, report=False)
  samples = {
    name: inputs.replay_samples(cfg, trainers[name], base, cache_dir=base_dir)
    for name, cfg in configs.items()
  }
  executor = _Executor(workdir, base, before, samples, store)
  _print(_plan_line(the_plan, len(groups)))
  with _Progress(the_plan.runs, at_once=len(groups)) as progress:
    if len(groups) == 1:
      runs = _results_in_turn(executor, the_plan.runs, trainers, evaluator, progress)
    else:
      runs = _concurrent_results(executor, the_plan.runs, groups, config, configs, progress)
  baseline, timing = config.compare.baseline, config.compare.timing
  # A study's store keeps the timings of earlier sessions: only the methods it lacks are timed,
  # with the baseline, which pairs their rounds.
  keys = {
    name: configure.fingerprint(cfg) for name, cfg in configure.method_configs(config).items()
  }
  kept = store.current_timings(keys, baseline) if store is not None else []
  timed_before = {name for session in kept for name in session["step_times"]}
  to_time = [baseline] + [n for n in configs if n != baseline and n not in timed_before]
  step_times = {}
  if len(to_time) > 1 or not kept:
    _print(
      f"Timing {len(to_time)} methods' train steps in {timing.rounds} alternating rounds of "
      f"{timing.steps} step(s) each (the cost column)..."
    )
    step_times = measure_step_times(
      {name: trainers[name] for name in to_time},
      {name: _first_batch(configs[name], workdir, trainers[name], base) for name in to_time},
      base,
      rounds=timing.rounds,
      steps=timing.steps,
    )
  _print("Reading the sweeps at matched task loss and writing the report...")
  new = {"step_times": step_times, "fingerprints": {name: keys[name] for name in step_times}}
  timings = [*kept, new] if step_times else kept
  report = build_report(baseline, before, runs, timings)
  if jax.process_index() == 0:
    write_report(workdir, report)
    if store is not None:
      store.write_study(baseline, list(configs), step_times, fingerprints=keys)
    _print("\n" + markdown_table(report))
  return report


def _plan_line(the_plan: plan.Plan, at_once: int) -> str:
  """What the sweeps will do, in one line: how many runs, how many read back, how many train."""
  total, to_train = len(the_plan.runs), len(the_plan.to_train())
  line = f"The sweeps: {total} runs, {total - to_train} read back, {to_train} to train"
  return line + (f", {at_once} training at once." if at_once > 1 and to_train else ".")


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
    _claim(base_dir, configure.fingerprint(config))
    _print(f"Loading the base model from {config.base_checkpoint}...")
    return run.base_params(config, configure.make_trainer(config))
  pre = configure.pretrain_config(config)
  _claim(base_dir, configure.fingerprint(pre))
  trainer = configure.make_trainer(pre)
  description = f"pretraining the base model ({pre.num_train_steps} steps)"
  return run.run_training(pre, base_dir, trainer=trainer, description=description).state.params


def _evaluate_base(evaluator: Evaluator, base: Any, base_dir: epath.Path) -> dict[str, float]:
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
    self.evaluator = Evaluator(config, workdir, next(iter(self.trainers.values())), base=base)


def _results_in_turn(
  executor: _Executor,
  sweep_runs: Sequence[plan.SweepRun],
  trainers: Mapping[str, Trainer],
  evaluator: Evaluator,
  progress: _Progress,
) -> list[dict[str, Any]]:
  """Every run's result, one run at a time on all the devices, in the order of `sweep_runs`;
  each run's own progress bar carries the sweep's (`_Progress.run`)."""
  results = []
  for sweep_run in sweep_runs:
    with progress.run(sweep_run) as description:
      trainer = trainers[sweep_run.method]
      results.append(executor.result(sweep_run, trainer, evaluator, description=description))
  return results


def _concurrent_results(
  executor: _Executor,
  sweep_runs: Sequence[plan.SweepRun],
  groups: list[list[jax.Device]],
  config: ml_collections.ConfigDict,
  configs: Mapping[str, ml_collections.ConfigDict],
  progress: _Progress,
) -> list[dict[str, Any]]:
  """Every run's result, `len(groups)` runs training at once in threads, each on its group of
  devices; in the order of `sweep_runs`. A run's numbers are those it gives alone on a mesh of
  the same shape (`tests/integration/test_sweep.py`). SIGTERM or SIGINT, or a run that fails,
  stops every run at its next step, with its checkpoint saved (`loop.StopRequests`), and starts
  no queued run; the first error is raised as soon as the runs in flight have stopped."""
  workers: queue.Queue[_Worker] = queue.Queue()
  for devices in groups:
    workers.put(_Worker(devices, config, configs, executor.workdir, executor.base))

  def result(sweep_run: plan.SweepRun, stop: _SweepStop) -> dict[str, Any]:
    if stop.stopping():
      raise stop.not_started(sweep_run)
    worker = workers.get()
    try:
      with progress.run(sweep_run):
        trainer = worker.trainers[sweep_run.method]
        return executor.result(sweep_run, trainer, worker.evaluator, progress=False, stop=stop)
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

  def not_started(self, sweep_run: plan.SweepRun) -> Preempted:
    """The exception of a queued run that is not started because the sweep is stopping."""
    signum = self.signum or signal.SIGTERM
    message = f"{sweep_run.name} was not started: the sweep is stopping. Rerun to resume it."
    return Preempted(signum, 0, None, message)


class _Progress:
  """The sweep's one progress clock, a `tqdm` bar over its runs: how many are done of all, the
  time spent and the time left at the pace of the runs trained so far (a run read back counts
  as done from the start and takes no time), and which runs are training.

  Runs that train several at once show no bar of their own, so this one is drawn (on stderr, by
  process 0). A run that trains alone draws its own bar of steps (`loop.fit`), and this one then
  only names it: `run` yields the description that bar starts with ("sweeps 3/12 runs done,
  04:10 left: finch lr 0.001 seed 0")."""

  def __init__(self, runs: Sequence[plan.SweepRun], *, at_once: int):
    self.lock = threading.Lock()
    self.running: list[str] = []
    self.drawn = at_once > 1
    self.bar = tqdm.tqdm(
      total=len(runs),
      initial=sum(r.reuses is not None for r in runs),
      desc="sweeps",
      unit="run",
      bar_format="{desc} {n_fmt}/{total_fmt} runs |{bar}| {elapsed}<{remaining}{postfix}",
      smoothing=0,  # the pace of all the runs trained so far, not of the last few
      file=sys.stderr if self.drawn else io.StringIO(),
      disable=jax.process_index() != 0,
      dynamic_ncols=True,
    )

  def __enter__(self) -> _Progress:
    return self

  def __exit__(self, *exc_info) -> None:
    self.bar.close()

  def describe(self, sweep_run: plan.SweepRun) -> str:
    """The description of `sweep_run`'s own progress bar: the sweep's state, then the run."""
    if self.bar.disable:
      return sweep_run.name
    meter = dict(self.bar.format_dict, bar_format="{desc} {n_fmt}/{total_fmt} runs done")
    left = dict(meter, bar_format="{remaining}")
    return f"{tqdm.tqdm.format_meter(**meter)}, {tqdm.tqdm.format_meter(**left)} left: " + (
      sweep_run.name
    )

  @contextlib.contextmanager
  def run(self, sweep_run: plan.SweepRun) -> Iterator[str]:
    """Counts `sweep_run` done when the body ends (a run that trains) and names it while the
    body runs; yields the description of its own progress bar (`describe`)."""
    if sweep_run.reuses is not None:  # counted done from the start
      yield sweep_run.name
      return
    with self.lock:
      self.running.append(sweep_run.name)
      self.bar.set_postfix_str("training " + ", ".join(self.running))
      description = self.describe(sweep_run)
    trained = False
    try:
      yield description
      trained = True
    finally:
      with self.lock:
        self.running.remove(sweep_run.name)
        postfix = ("training " + ", ".join(self.running)) if self.running else ""
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(1) if trained else self.bar.refresh()


class _Executor:
  """Brings each run of a plan to its result, read back or trained from the base `base` in its
  directory under `workdir`; the results store `store`, when given, keeps every result."""

  def __init__(
    self,
    workdir: str | os.PathLike,
    base: Any,
    before: Mapping[str, float],
    samples: Mapping[str, Any],
    store: plan.ResultsStore | None,
  ):
    self.workdir, self.base, self.before, self.store = workdir, base, before, store
    self.samples = samples  # per method: the base model's samples it replays, or None

  def result(
    self,
    sweep_run: plan.SweepRun,
    trainer: Trainer,
    evaluator: Evaluator,
    *,
    description: str = "",
    progress: bool = True,
    stop: StopRequests | None = None,
  ) -> dict[str, Any]:
    """The run's result: the one it reuses (`plan.reused`), else trained with `trainer`
    (resuming its own checkpoints) and written to its `result.json`; `description` names it on
    the progress bar (shown with `progress`); `stop` as for `loop.fit`. With a results store,
    the result is kept there too."""
    run_dir = sweep_run.directory(self.workdir)
    if sweep_run.reuses != plan.KEPT_IN_STORE:
      _claim(run_dir, sweep_run.fingerprint)
    where, result = plan.reused(sweep_run, self.workdir, self.store)
    if where == plan.KEPT_IN_STORE:
      return result
    if where == plan.KEPT_IN_WORKDIR:
      return self._kept(result)
    fit = run.run_training(
      sweep_run.config,
      run_dir,
      trainer=trainer,
      init_params=self.base,
      learning_rate=sweep_run.learning_rate,
      seed=sweep_run.seed,
      evaluator=evaluator,
      progress=progress,
      samples=self.samples[sweep_run.method],
      description=description or sweep_run.name,
      stop=stop,
    )
    result = self._summary(sweep_run, fit, run_dir, trainer, evaluator)
    if jax.process_index() == 0:
      files.write_json(run_dir / plan.RESULT_FILE, result)
      # Its result written whole, a finished run needs its checkpoints no more (they are where
      # an interrupted run resumes from).
      if not sweep_run.config.compare.get("keep_run_checkpoints", False):
        checkpoints = run_dir / "checkpoints"
        if checkpoints.exists():
          checkpoints.rmtree()
    _print(
      f"{sweep_run.method:>10s} lr={sweep_run.learning_rate:<8.3g} seed={sweep_run.seed}: "
      + _fmt(result)
    )
    return self._kept(result)

  def _kept(self, result: dict[str, Any]) -> dict[str, Any]:
    """`result` as the results store keeps it, written there when there is a store. A result
    written before runs recorded these gets the base's measures and an unknown code version."""
    summary = {"before": dict(self.before), "code_version": "unknown", **result}
    summary["curve"] = thinned(summary["curve"])
    if self.store is not None and jax.process_index() == 0:
      self.store.write(summary)
    return summary

  def _summary(
    self,
    sweep_run: plan.SweepRun,
    fit: Any,
    run_dir: epath.Path,
    trainer: Trainer,
    evaluator: Evaluator,
  ) -> dict[str, Any]:
    """What a run that trained leaves in its `result.json`: its key, every measure before and
    after, its curves, its cost."""
    before, samples = self.before, self.samples[sweep_run.method]
    final = fit.evals[-1]
    result = {
      "method": sweep_run.method,
      "learning_rate": sweep_run.learning_rate,
      "seed": sweep_run.seed,
      "fingerprint": sweep_run.fingerprint,
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
      "held_bytes": trainer.held_bytes(fit.state) + sum(x.nbytes for x in samples or ()),
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
      if key.endswith("_calibration"):  # the reliability diagram, before (when kept) and after
        name = key.removesuffix("_calibration")
        if key in before:
          result[f"{name}_reliability_before"] = measures.reliability(before[key])
        result[f"{name}_reliability_after"] = measures.reliability(final[key])
    return result


def _first_batch(
  config: ml_collections.ConfigDict, workdir: str | os.PathLike, trainer: Trainer, base: Any
) -> dict[str, Any]:
  """A training batch of a method (its replay marker included), on the mesh."""
  samples = inputs.replay_samples(config, trainer, base, cache_dir=epath.Path(workdir) / "base")
  iterator = iter(inputs.train_batches(config, workdir, config.seed, samples))
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
  base (one method's state held at a time), the order rotating every round; so a load that
  comes and goes on the machine touches the methods of one round alike, and
  `report.step_time_ratios` reads the rounds as pairs (the median of the paired ratios, with an
  interval). The step times logged during the sweeps
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
  for name in names:  # compiled before timing
    # Two steps: the second takes the first's output, whose placement can differ from a new
    # state's, and so may compile again.
    state = trainers[name].create_state(base)
    for _ in range(2):
      state, _ = trainers[name].train_step(state, batches[name])
    jax.block_until_ready(state)
    del state
  times: dict[str, list[float]] = {name: [] for name in names}
  for round_index in range(rounds):
    shift = round_index % len(names)
    for name in names[shift:] + names[:shift]:
      # One method's state at a time, made fresh from the base outside the timed span: twelve
      # methods' optimizer states of a 135M-parameter model do not fit 24 GiB together.
      trainer = trainers[name]
      state = jax.block_until_ready(trainer.create_state(base))
      start = time.perf_counter()
      for _ in range(steps):
        state, _ = trainer.train_step(state, batches[name])
      jax.block_until_ready(state)
      times[name].append((time.perf_counter() - start) / steps)
      del state
  return times


__all__ = [
  "MAX_CURVE_POINTS",
  "code_version",
  "compare",
  "measure_step_times",
  "run_device_groups",
  "thinned",
]
