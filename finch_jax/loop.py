"""The fit loop: steps, metrics (JSONL and TensorBoard), progress, evaluation, checkpoints and
preemption.

`fit(trainer, state, batches, ...)` runs a `finch_jax.trainer.Trainer`'s step until the last step,
logging window means, evaluating, checkpointing after every step (the checkpointer decides), and
turning SIGTERM/SIGINT into a checkpoint of the step reached and a `Preempted` exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter, record_writer

from finch_jax import files
from finch_jax.trainer import Trainer, TrainState


class MetricsWriter:
  """One JSON object per logged step in `metrics.jsonl`, and TensorBoard event files.

  Every record is strict JSON: a value that is not finite (the loss of a window whose every step
  was skipped, say) is written as `null`. Each record is in the file when `write` returns, so a
  run killed after it keeps it.

  The workdir is local or in a bucket (`gs://BUCKET/...`); paths are `etils.epath.Path`s. A
  bucket's objects cannot be appended to (gcsfs's append mode silently overwrites), so there the
  whole file is uploaded again at each record: one upload per logged step, of a file that grows
  by about 300 bytes a record. TensorBoard's event files go to a bucket through epath as well
  (`_BucketEventFile`): held in memory and uploaded whole at each of TensorBoard's flushes
  (every two minutes) and at `close`.

  Args:
    workdir: where `metrics.jsonl` and `tensorboard/` go; records are appended.
    enabled: False on the processes that do not write (all but process 0).
    truncate_after: the step a run starts from (0, or the checkpoint it resumed from). Records
      past it were written by an attempt that did not reach its next checkpoint and are redone
      now, so they are dropped: `metrics.jsonl` holds one record per logged step, as an
      uninterrupted run's does, and TensorBoard is told to discard its events past that step
      (`purge_step`), so its curves show each step once.
  """

  def __init__(
    self,
    workdir: str | os.PathLike,
    *,
    enabled: bool = True,
    truncate_after: int | None = None,
  ):
    self.enabled = enabled
    if enabled:
      directory = epath.Path(workdir)
      directory.mkdir(parents=True, exist_ok=True)
      self._path = directory / "metrics.jsonl"
      if truncate_after is not None:
        _drop_records_after(self._path, truncate_after)
      self._remote = files.is_remote(workdir)
      if self._remote:
        self._lines = _read_lines(self._path) if self._path.exists() else []
      else:
        self._file = self._path.open("a")  # noqa: SIM115
      # TensorBoard drops the events of earlier runs from `purge_step` on; a fresh run has none.
      purge = truncate_after + 1 if truncate_after else None
      # Event files are named by the second they were opened in: the suffix keeps a quick
      # resume from writing over the file of the attempt it resumes.
      self._tb = SummaryWriter(
        os.fspath(directory / "tensorboard"),
        purge_step=purge,
        filename_suffix=f".{os.getpid()}.from{truncate_after or 0}",
      )

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Appends one record for `step`."""
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    line = json.dumps(record, allow_nan=False) + "\n"
    if self._remote:
      self._lines.append(line)
      self._path.write_text("".join(self._lines))  # an object is replaced whole, or not at all
    else:
      self._file.write(line)
      self._file.flush()
    for key, value in record.items():
      if key != "step" and isinstance(value, int | float):
        self._tb.add_scalar(key, value, int(step))

  def close(self) -> None:
    """Flushes and closes the files."""
    if self.enabled:
      if not self._remote:
        self._file.close()
      self._tb.close()


class _BucketEventFile:
  """A TensorBoard event file in a bucket, written through epath for tensorboardX.

  The events are kept in memory and the whole file is uploaded when tensorboardX flushes (an
  object cannot be appended to), and not again while nothing new was written. tensorboardX's own
  `gs://` writer does the same through google-cloud-storage, but it also uploads from `__del__`,
  and its writers stay referenced until the interpreter exits (an `atexit` hook per file): each
  file went up again at exit, when the network may be gone and the upload retries for minutes.
  """

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._buffer = io.BytesIO()
    self._uploaded = -1  # bytes in the bucket's copy; -1 before the first upload

  def write(self, data: bytes) -> None:
    """Appends `data` to the file (in memory)."""
    self._buffer.write(data)

  def flush(self) -> None:
    """Uploads the whole file, if it grew since the last upload."""
    if self._buffer.tell() != self._uploaded:
      self._path.write_bytes(self._buffer.getvalue())
      self._uploaded = self._buffer.tell()

  def close(self) -> None:
    """Uploads what is left."""
    self.flush()


class _BucketEventFiles:
  """tensorboardX's factory of record writers for `gs://` paths (`register_writer_factory`)."""

  def open(self, path: str) -> _BucketEventFile:
    """The writer of the event file at `path`."""
    return _BucketEventFile(path)

  def directory_check(self, path: str) -> None:
    """Nothing to make: a bucket has no directories."""
    del path


# tensorboardX picks a record writer by the path's scheme; this one replaces its own for gs://.
record_writer.register_writer_factory("gs", _BucketEventFiles())


def _read_lines(path: epath.Path) -> list[str]:
  """The lines of the text file at `path`, each with its newline (a torn last one without)."""
  with path.open() as f:
    return f.readlines()


def _drop_records_after(path: epath.Path, step: int) -> None:
  """Rewrites the JSONL file at `path` without its records past `step` (and torn lines)."""
  if not path.exists():
    return
  lines = _read_lines(path)
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:  # a line cut short when the process died mid-write
      continue
    if line.endswith("\n") and record.get("step", 0) <= step:
      kept.append(line)
  if len(kept) == len(lines):
    return
  logging.info("Dropped %d records past step %d from %s.", len(lines) - len(kept), step, path)
  files.write_text(path, "".join(kept))  # a crash here cannot lose the records that are kept


def _jsonable(value: Any) -> Any:
  """A metric as JSON: Python numbers (lists for arrays), None where not finite."""
  value = np.asarray(value).tolist()
  if isinstance(value, list):
    return [_jsonable(v) for v in value]
  return None if isinstance(value, float) and not math.isfinite(value) else value


class ProgressBar:
  """A one-line console progress report with the time left, rewritten in place on a terminal
  (one line per update elsewhere, e.g. in a log file).

  Not `tqdm` (which the sweep's bar over runs uses): a training run's output usually goes to a
  log file (a pod's, a batch job's), where tqdm rewrites one line with carriage returns, and its
  time left counts compilation into the pace; this bar writes a readable line per update there
  and measures the pace from its first update, after the step has compiled."""

  def __init__(self, total: int, *, enabled: bool = True, stream=sys.stderr, description: str = ""):
    self.total, self.enabled, self.stream = total, enabled, stream
    self.description = description
    self._tty = stream.isatty()
    self._first: tuple[int, float] | None = None  # (step, time) of the first update

  def update(self, step: int, text: str) -> None:
    """Shows `step` of `total`, a short text and, from the second update on, the time left at
    the pace since the first (which includes compilation)."""
    if not self.enabled:
      return
    now = time.perf_counter()
    if self._first is None:
      self._first = (step, now)
    first_step, first_time = self._first
    left = ""
    if step > first_step:
      seconds = (now - first_time) / (step - first_step) * (self.total - step)
      left = f", {format_duration(seconds)} left"
    width = 24
    done = int(width * step / max(self.total, 1))
    head = f"{self.description}: " if self.description else ""
    line = f"{head}[{'#' * done}{'.' * (width - done)}] {step}/{self.total} {text}{left}"
    self.stream.write(("\r" + line + "\x1b[K") if self._tty else (line + "\n"))
    self.stream.flush()

  def close(self) -> None:
    """Ends the line."""
    if self.enabled and self._tty:
      self.stream.write("\n")


def format_duration(seconds: float) -> str:
  """'45 s', '3 min 20 s' or '1 h 05 min'."""
  seconds = max(int(round(seconds)), 0)
  if seconds < 60:
    return f"{seconds} s"
  if seconds < 3600:
    return f"{seconds // 60} min {seconds % 60:02d} s"
  return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


@dataclasses.dataclass
class FitResult:
  """What `fit` hands back."""

  state: TrainState
  evals: list[dict[str, float]]  # one record per evaluation: step and each named value


class Preempted(SystemExit):
  """Raised by `fit` after SIGTERM or SIGINT, once the checkpoint of the step reached is saved.

  A `SystemExit` whose `code` is 128 + the signal number (143 for SIGTERM, 130 for SIGINT), the
  code a shell reports for a process that signal ended: `python train.py` exits with it and no
  traceback, a scheduler that retries failed jobs sees an unfinished run rather than a success,
  and `except Exception` does not swallow it. Rerunning the same command resumes from `step`.

  Attributes:
    signum: the signal received.
    step: the step whose checkpoint was saved.
    state: the training state at that step (for callers of `fit` without a checkpointer).
  """

  def __init__(self, signum: int, step: int, state: TrainState, message: str):
    super().__init__(128 + signum)
    self.signum, self.step, self.state, self.message = signum, step, state, message

  def __str__(self) -> str:
    return self.message


class StopRequests:
  """Turns SIGTERM and SIGINT into a request to stop at the next step boundary.

  The handler only sets a flag; the loop reads it once per step (a Python attribute, no device
  sync). A second SIGINT raises KeyboardInterrupt at once, for a user who will not wait for the
  checkpoint. With several processes they must all stop at the same step, or the save (and every
  collective after it) would hang: there SIGTERM is left to JAX's preemption service, which agrees
  on a step across processes without a collective per step, and SIGINT is handed to it as a
  SIGTERM. Signals ignored when the run started (`nohup`, background jobs) stay ignored.

  Runs that train at once in threads of one process (`finch_jax.sweep`) share one: the main
  thread enters it (only it may set handlers) and passes it to each `fit` as `stop`, so every run
  saves its step and stops.
  """

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}
    self._multi = jax.process_count() > 1
    self._sync = self._multi and bool(jax.config.jax_enable_preemption_service)

  def __enter__(self) -> StopRequests:
    if threading.current_thread() is not threading.main_thread():
      return self  # Python only lets the main thread set handlers; signals then act as usual.
    if self._multi and not self._sync:
      logging.warning(
        "JAX's preemption service is off (jax_enable_preemption_service): SIGTERM and SIGINT "
        "end this multi-process run without a checkpoint of the step reached."
      )
      return self
    for signum in (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT):
      previous = signal.getsignal(signum)
      if previous is not signal.SIG_IGN:
        self._previous[signum] = previous
        signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous.clear()

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.signum is not None:
      if signum == signal.SIGINT:
        raise KeyboardInterrupt
      return  # A repeated SIGTERM: the checkpoint is already on its way.
    self.signum = signum
    if self._multi:
      os.kill(os.getpid(), signal.SIGTERM)  # To JAX's preemption notifier, see the docstring.

  def reached(self, step: int) -> bool:
    """Whether to stop after `step` (the same answer on every process)."""
    if self._sync:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signum is not None

  def preempted(self, step: int, state: TrainState, checkpointer: Any) -> Preempted:
    """The exception to raise once the checkpoint of `step` is saved."""
    signum = self.signum or signal.SIGTERM  # Other processes hear of it from JAX's service.
    where = getattr(checkpointer, "directory", None)
    saved = (
      f"the checkpoint of step {step} is in {where}; rerun the same command to resume"
      if where
      else "nothing was saved (fit was given no checkpointer)"
    )
    message = f"Stopped by {signal.Signals(signum).name} after step {step}: {saved}."
    return Preempted(signum, step, state, message)


def _window_to_json(window: list[Mapping[str, Any]]) -> dict[str, Any]:
  """Per-step metrics not yet logged, as JSON that `_window_from_json` reads back bit for bit."""
  if not window:
    return {"dtypes": {}, "steps": []}
  dtypes = {k: str(np.asarray(v).dtype) for k, v in window[0].items()}
  steps = [{k: np.asarray(v).tolist() for k, v in m.items()} for m in window]
  return {"dtypes": dtypes, "steps": steps}


def _window_from_json(data: Mapping[str, Any] | None) -> list[dict[str, np.ndarray]]:
  if not data:
    return []
  dtypes = data["dtypes"]
  return [{k: np.asarray(v, dtypes[k]) for k, v in m.items()} for m in data["steps"]]


def fit(
  trainer: Trainer,
  state: TrainState,
  batches: Iterator[Mapping[str, np.ndarray]],
  *,
  num_train_steps: int,
  log_every: int = 50,
  eval_every: int = 0,
  evaluate: Callable[[Any], dict[str, float]] | None = None,
  writer: MetricsWriter | None = None,
  checkpointer: Any = None,
  progress: bool = True,
  description: str = "",
  tokens_per_batch: int | None = None,
  resume: Mapping[str, Any] | None = None,
  stop: StopRequests | None = None,
) -> FitResult:
  """Trains `state` until `num_train_steps`, logging, evaluating and checkpointing on the way.

  Metrics stay on device between logging steps; each logged record holds the means over the
  steps since the last one, plus tokens/s, step time and the share of time spent waiting for
  input. `evaluate(params, step)` runs every `eval_every` steps and at the end; its values are
  logged with the step. `checkpointer.maybe_save(step, state, force=..., extra=...)` is called
  after every step (forced at the end); `extra` is a function, called only when a checkpoint is
  written, that returns the metrics of the unfinished logging window and the evaluations so far
  (JSON), which a resumed run passes back as `resume`.

  Preemption: while `fit` runs, SIGTERM and SIGINT only set a flag. At the next step boundary
  `fit` saves the checkpoint of that step (data iterator included) and raises `Preempted`, a
  `SystemExit` with code 128 + the signal number: 143 for SIGTERM, 130 for SIGINT. So `python
  train.py` stops with that exit code and a one-line message, no traceback; a scheduler sees an
  unfinished run; and rerunning the same command resumes from the saved step, ending with the
  parameters and logged losses of an uninterrupted run, bit for bit. A second SIGINT interrupts at
  once. With several processes JAX's preemption service picks one step for all of them.

  Args:
    trainer: the `Trainer` whose step runs.
    state: where to start; its `step` is the first step's index.
    batches: this process's batches (numpy), e.g. a Grain iterator.
    num_train_steps: the step to stop at.
    log_every: steps per metrics record.
    eval_every: steps between evaluations (0: only at the end).
    evaluate: `evaluate(params, step) -> {name: value}` with the model's parameters
      (`trainer.full_params(state.params)`), or None.
    writer: where records go, or None.
    checkpointer: a `finch_jax.checkpoint.Checkpointer`, or None.
    progress: show a progress bar on process 0.
    description: what the bar says it is running (e.g. "run 3 of 12: finch lr 0.001 seed 0").
    tokens_per_batch: tokens in a global batch, for tokens/s.
    resume: `extra` of the checkpoint `state` was restored from (`Checkpointer.restored_extra`).
    stop: the stop requests to read, entered by the caller (runs in threads share the main
      thread's); None: `fit` listens for the signals itself.

  Raises:
    Preempted: after SIGTERM or SIGINT, once the checkpoint is saved.
  """
  resume = resume or {}
  bar = ProgressBar(
    num_train_steps, enabled=progress and jax.process_index() == 0, description=description
  )
  # The unfinished window comes back from the checkpoint, so a resumed run logs the same means.
  window = _Window(_window_from_json(resume.get("metrics_window")), tokens_per_batch)
  evals: list[dict[str, float]] = [dict(e) for e in resume.get("evals", [])]

  def extra() -> dict[str, Any]:
    return {
      "metrics_window": _window_to_json(jax.device_get(window.pending)),
      "evals": [{k: _jsonable(v) for k, v in e.items()} for e in evals],
    }

  with contextlib.nullcontext(stop) if stop is not None else StopRequests() as stop:
    for step in range(int(state.step), num_train_steps):
      with window.waiting_for_input():
        batch = trainer.global_batch(next(batches))
      state, metrics = trainer.train_step(state, batch)
      window.add(metrics)
      done = step + 1
      if done % log_every == 0 or done == num_train_steps:
        record = window.close()
        if writer:
          writer.write(done, record)
        bar.update(done, "loss " + ("-" if record["loss"] is None else f"{record['loss']:.4f}"))
      if evaluate and ((eval_every and done % eval_every == 0) or done == num_train_steps):
        result = {"step": done, **evaluate(trainer.full_params(state.params), done)}
        evals.append(result)
        if writer:
          writer.write(done, {k: v for k, v in result.items() if k != "step"})
        window.restart_clock()  # evaluation time is not training time
      stopping = stop.reached(done)
      if checkpointer is not None:
        checkpointer.maybe_save(done, state, force=stopping or done == num_train_steps, extra=extra)
      if stopping:
        bar.close()
        error = stop.preempted(done, state, checkpointer)
        logging.warning("%s", error)
        raise error
  bar.close()
  return FitResult(state=state, evals=evals)


class _Window:
  """The steps since the last logged record: their on-device metrics and their timings."""

  def __init__(self, pending: list[Mapping[str, Any]], tokens_per_batch: int | None):
    self.pending = pending
    self.tokens_per_batch = tokens_per_batch
    self.timed_steps = 0  # steps of the window run by this process, for the timings
    self.input_time = 0.0
    self.start = time.perf_counter()

  @contextlib.contextmanager
  def waiting_for_input(self):
    """Times the body as waiting for input."""
    t = time.perf_counter()
    yield
    self.input_time += time.perf_counter() - t

  def add(self, metrics: Mapping[str, Any]) -> None:
    """A step's metrics (left on device until the window closes)."""
    self.pending.append(metrics)
    self.timed_steps += 1

  def restart_clock(self) -> None:
    """Time from now on counts as training time."""
    self.start = time.perf_counter()

  def close(self) -> dict[str, Any]:
    """The record of the window (means over its steps; a loss averages the finite steps only,
    None when there is none), and a new empty window."""
    values = jax.device_get(self.pending)
    elapsed = max(time.perf_counter() - self.start, 1e-9)
    record = {k: _finite_mean([v[k] for v in values]) for k in values[0]}
    record["num_skipped"] = int(values[-1]["num_skipped"])
    record["step_time"] = elapsed / max(self.timed_steps, 1)
    record["input_wait_share"] = self.input_time / elapsed
    if self.tokens_per_batch:
      record["tokens_per_second"] = self.tokens_per_batch * self.timed_steps / elapsed
    self.pending, self.timed_steps, self.input_time = [], 0, 0.0
    self.restart_clock()
    return record


def _finite_mean(values: list[Any]) -> float | None:
  """The mean of the finite values, None when there is none (every step of a window skipped)."""
  finite = [v for v in values if np.isfinite(v)]
  return float(np.mean(finite)) if finite else None


__all__ = ["FitResult", "MetricsWriter", "Preempted", "ProgressBar", "fit", "format_duration"]
