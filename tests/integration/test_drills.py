"""Reliability drills: a run is preempted, a batch goes NaN, a checkpoint is damaged, a disk fills.

Each drill runs the real thing on a tiny configuration and fails when the behaviour it checks
breaks: nothing of a run may be lost, a resumed run must end as an uninterrupted one would (bit
for bit), and every failure must say what to do. One uninterrupted run (`reference`) is the
yardstick for all of them; drills that resume reuse its trainer, so they do not compile again.
"""

from __future__ import annotations

import gc
import glob
import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from etils import epath

from configs import default
from finch_jax import configure, evaluate, inputs, loop, run
from finch_jax.checkpoint import Checkpointer, CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The default config shrunk to seconds (as in test_trainer.small_config), with log_every=2 so that
# a preemption between two records leaves an unfinished logging window, and an evaluation at step
# 8 and at the end so that evaluations have to survive a resume too.
NUM_STEPS = 16
OVERRIDES = {
  "mode": "pretrain",
  "model.num_layers": 1,
  "model.d_model": 32,
  "model.num_heads": 2,
  "model.num_kv_heads": 1,
  "model.d_ff": 64,
  "model.max_len": 128,
  "data.options": {"embedded_biographies": {"num_base_people": 20, "num_new_people": 10}},
  "data.seq_len": 32,
  "data.batch_size": 8,
  "data.eval_examples": 16,
  "data.eval_sets": {"task": {"name": "", "split": "finetune"}},
  "data.fact_sets": {},
  "num_train_steps": NUM_STEPS,
  "log_every": 2,
  "eval_every": 8,
  "checkpoint_every": 4,
  "keep_checkpoints": 10,  # every checkpoint stays, for the drills that inspect or damage them
}
# Orbax leaves the reads or writes of a checkpoint it gave up on as coroutines, collected later
# with an "exception ignored" report; in the drills that damage files or fill the disk, expected.
ABANDONED_IO = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
# Record fields that measure speed rather than what was computed.
TIMING_KEYS = {"step_time", "tokens_per_second", "input_wait_share"}
LEG_TIMEOUT_S = 300  # one `train.py` process; a leg takes 5-20 s on two busy cores


def drill_config(data_dir: str, **changes):
  """The drills' configuration; the `train.py` legs build the very same one from a file."""
  config = default.get_config()
  config.update_from_flattened_dict({**OVERRIDES, "data.data_dir": data_dir, **changes})
  return config


class Reference:
  """The uninterrupted run every drill compares with."""

  def __init__(self, root: str):
    self.data_dir = os.path.join(root, "data")
    self.workdir = os.path.join(root, "reference")
    self.config = drill_config(self.data_dir)
    self.trainer = configure.make_trainer(self.config)
    self.evaluator = evaluate.Evaluator(self.config, self.workdir, self.trainer)
    self.result = run.run_training(
      self.config, self.workdir, trainer=self.trainer, evaluator=self.evaluator, progress=False
    )

  def run(self, workdir: str, **kwargs):
    """run_training in `workdir` with the reference's config, trainer and evaluator."""
    kwargs = {"trainer": self.trainer, "evaluator": self.evaluator, "progress": False, **kwargs}
    return run.run_training(self.config, workdir, **kwargs)

  def checkpoint(self, workdir: str, step: int):
    """The state saved at `step` in `workdir`, on the host."""
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=0)
    try:
      return jax.device_get(checkpointer.restore(self.trainer.abstract_state(), step=step))
    finally:
      checkpointer.close()

  def copy(self, workdir: str) -> str:
    """A copy of the reference's workdir (checkpoints and metrics), to damage or resume."""
    shutil.copytree(self.workdir, workdir)
    return workdir


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return Reference(str(tmp_path_factory.mktemp("drills")))


def assert_same_state(got, want):
  """Bit for bit: parameters, optimizer state (FINCH's included), step and skipped steps."""
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))


def records(workdir: str) -> dict[tuple[str, int], dict]:
  """metrics.jsonl by (kind, step), asserting that no step is recorded twice (local or gs://)."""
  out = {}
  with (epath.Path(workdir) / "metrics.jsonl").open() as f:
    for line in f:
      record = json.loads(line)
      kind = "train" if "loss" in record else "eval"
      key = (kind, record["step"])
      assert key not in out, f"{kind} record of step {record['step']} written twice"
      out[key] = {k: v for k, v in record.items() if k not in TIMING_KEYS}
  return out


def assert_same_records(workdir: str, reference: Reference):
  got, want = records(workdir), records(reference.workdir)
  assert sorted(got) == sorted(want)
  for key in want:
    assert got[key] == want[key], f"{key}: {got[key]} != {want[key]}"


# ----- 1. preemption ---------------------------------------------------------------------------

DRIVER = textwrap.dedent(
  """
  # `python train.py ARGS` as a user runs it in a terminal, with one test hook: before the step
  # numbered DRILL_PAUSE_AT it tells the test (a .paused file) and waits for its signal (.sent).
  import os, runpy, signal, sys, time

  sys.argv = sys.argv[1:]
  # A terminal's foreground process gets both signals; CI may have started us ignoring SIGINT.
  signal.signal(signal.SIGINT, signal.default_int_handler)
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  pause_at, marker = int(os.environ["DRILL_PAUSE_AT"]), os.environ["DRILL_MARKER"]
  from finch_jax import trainer

  original = trainer.Trainer.train_step

  def train_step(self, state, batch):
    if int(state.step) == pause_at:
      open(marker + ".paused", "w").close()
      deadline = time.monotonic() + 120
      while not os.path.exists(marker + ".sent") and time.monotonic() < deadline:
        time.sleep(0.01)
    return original(self, state, batch)

  trainer.Trainer.train_step = train_step
  runpy.run_path(sys.argv[0], run_name="__main__")
  """
)

# A config file for `python train.py --config`: configs/{base}.py with OVERRIDES applied.
CONFIG_TEMPLATE = textwrap.dedent(
  """
  import json
  from configs import {base}

  OVERRIDES = json.loads({overrides!r})


  def get_config():
    config = {base}.get_config()
    for key, value in OVERRIDES.items():
      node = config
      *path, last = key.split(".")
      for part in path:
        node = node[part]
      node[last] = value
    return config
  """
)


def run_leg(tmp, workdir, pause_at, signum, env):
  """One `python train.py` until it has finished step `pause_at`; then `signum` is sent to it.

  Returns its exit code and output. A `pause_at` past the end runs the leg to completion.
  """
  marker = os.path.join(tmp, f"leg{pause_at}")
  command = [sys.executable, os.path.join(tmp, "driver.py"), os.path.join(ROOT, "train.py")]
  command += [f"--config={os.path.join(tmp, 'drill_config.py')}", f"--workdir={workdir}"]
  env = {**env, "DRILL_PAUSE_AT": str(pause_at), "DRILL_MARKER": marker}
  with open(marker + ".log", "w+") as log:
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    try:
      deadline = time.monotonic() + LEG_TIMEOUT_S
      while not os.path.exists(marker + ".paused") and process.poll() is None:
        assert time.monotonic() < deadline, "leg did not reach its step in time"
        time.sleep(0.01)
      if process.poll() is None:
        # It stands before step pause_at + 1: the records up to pause_at are written.
        logged = [step for kind, step in records(workdir) if kind == "train"]
        assert max(logged) == pause_at // 2 * 2
        os.kill(process.pid, signum)
        open(marker + ".sent", "w").close()
      process.wait(timeout=LEG_TIMEOUT_S)
    finally:
      if process.poll() is None:
        process.kill()
    log.seek(0)
    return process.returncode, log.read()


@pytest.mark.slow
def test_preempted_run_resumes_bit_for_bit(reference, tmp_path):
  """Three kills at random steps of `python train.py`, each rerun with the same command."""
  tmp = str(tmp_path)
  with open(os.path.join(tmp, "driver.py"), "w") as f:
    f.write(DRIVER)
  overrides = {**OVERRIDES, "data.data_dir": reference.data_dir}
  with open(os.path.join(tmp, "drill_config.py"), "w") as f:
    f.write(CONFIG_TEMPLATE.format(base="default", overrides=json.dumps(overrides)))
  # The legs share compiled programs through JAX's persistent cache (loading a compiled program
  # gives the same one); the reference compiled its own in this process.
  env = dict(os.environ)
  env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tmp, "jax_cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  workdir = os.path.join(tmp, "run")

  # This seed stops the legs after steps 6, 11 and 12 (a leg signalled after step k saves step
  # k + 1): SIGTERM and SIGINT then save odd steps, between records and periodic checkpoints, and
  # SIGKILL leaves records past the newest checkpoint. The asserts below keep that so.
  rng = np.random.default_rng(20260552)
  steps = sorted(rng.choice(np.arange(1, NUM_STEPS - 2), size=3, replace=False).tolist())
  kills = list(zip(steps, [signal.SIGTERM, signal.SIGKILL, signal.SIGINT], strict=True))
  resumed_from, saved_odd, records_dropped = 0, 0, 0
  for pause_at, signum in kills:
    pause_at = max(pause_at, resumed_from)  # a leg cannot stop before where it starts
    code, log = run_leg(tmp, workdir, pause_at, signum, env)
    if signum == signal.SIGKILL:  # No chance to save: the next leg resumes from an older step.
      assert code == -signal.SIGKILL, log
      checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=0)
      resumed_from = checkpointer.latest_step() or 0
      checkpointer.close()
      records_dropped += max(step for _, step in records(workdir)) > resumed_from
      continue
    # A clean exit: the documented code, a message instead of a traceback, the step saved.
    assert code == 128 + signum, log
    name = signal.Signals(signum).name
    match = re.search(rf"Stopped by {name} after step (\d+): the checkpoint of step \1 is in", log)
    assert match, log
    assert "Traceback" not in log and "rerun the same command to resume" in log
    resumed_from = int(match.group(1))
    assert pause_at < resumed_from < NUM_STEPS
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(resumed_from)))
    saved_odd += resumed_from % 2
  assert saved_odd and records_dropped  # the drill covered what it is meant to
  code, log = run_leg(tmp, workdir, NUM_STEPS, signal.SIGTERM, env)  # the rerun finishes
  assert code == 0, log

  assert_same_state(
    reference.checkpoint(workdir, NUM_STEPS), reference.checkpoint(reference.workdir, NUM_STEPS)
  )
  assert_same_records(workdir, reference)


def test_sigint_in_process_saves_then_resumes_logs_and_evaluations(
  reference, tmp_path, monkeypatch
):
  """Ctrl-C inside `fit` stops after that step with code 130; the resumed run carries on the
  unfinished logging window and the evaluations, and the handlers are put back."""
  workdir = str(tmp_path / "run")
  real_batches = inputs.train_batches

  def interrupted_batches(config, workdir, seed, *samples):
    fetched = 0

    def count(batch):
      nonlocal fetched
      fetched += 1
      if fetched == 9:  # fetching the batch of step 9: odd, between records, after an eval
        os.kill(os.getpid(), signal.SIGINT)
      return batch

    return real_batches(config, workdir, seed, *samples).map(count)

  def unhandled(signum, frame):  # what SIGINT does unless fit takes it over
    raise AssertionError("SIGINT was not handled by fit")

  monkeypatch.setattr(inputs, "train_batches", interrupted_batches)
  pytest_handler = signal.signal(signal.SIGINT, unhandled)  # not pytest's: it would end the session
  try:
    with pytest.raises(loop.Preempted) as stopped:
      reference.run(workdir)
    assert signal.getsignal(signal.SIGINT) is unhandled  # fit put the handler back
  finally:
    signal.signal(signal.SIGINT, pytest_handler)
  assert stopped.value.code == 130 and stopped.value.step == 9
  monkeypatch.undo()

  result = reference.run(workdir)
  assert_same_state(result.state, reference.result.state)
  assert result.evals == reference.result.evals  # the evaluation of step 8 came back
  assert_same_records(workdir, reference)


# ----- 2. a poisoned batch ---------------------------------------------------------------------


@pytest.mark.parametrize("finch_enabled", [True, False], ids=["finch", "no_finch"])
def test_poisoned_batch_is_skipped_counted_and_never_saved(
  reference, tmp_path, monkeypatch, finch_enabled
):
  poisoned = {5, 6}  # one window of records holds two bad batches; one checkpoint spans them
  real_batches = inputs.train_batches

  def poisoned_batches(config, workdir, seed, *samples):
    fetched = 0

    def poison(batch):
      nonlocal fetched
      fetched += 1
      if fetched in poisoned:
        batch = dict(batch, weights=np.full_like(batch["weights"], np.nan))
      return batch

    return real_batches(config, workdir, seed, *samples).map(poison)

  monkeypatch.setattr(inputs, "train_batches", poisoned_batches)
  if finch_enabled:
    trainer = reference.trainer
    result = reference.run(str(tmp_path), evaluator=None)
  else:
    config = drill_config(reference.data_dir, **{"finch.enabled": False})
    trainer = configure.make_trainer(config)
    result = run.run_training(config, str(tmp_path), trainer=trainer, progress=False)

  # Training went on to the end with finite parameters, and counted what it skipped.
  assert int(result.state.step) == NUM_STEPS and int(result.state.num_skipped) == 2
  train = {step: r for (kind, step), r in records(str(tmp_path)).items() if kind == "train"}
  assert sorted(train) == list(range(2, NUM_STEPS + 1, 2))
  for step, record in train.items():
    assert record["num_skipped"] == (2 if step >= 6 else 0)
    # The window of the two bad batches has no finite loss to average: strict JSON null.
    assert (record["loss"] is not None) == (step != 6)
  # Every checkpoint written holds finite numbers only.
  written = sorted(int(os.path.basename(p)) for p in glob.glob(str(tmp_path / "checkpoints/*")))
  assert written == [4, 8, 12, 16]
  checkpointer = Checkpointer(str(tmp_path / "checkpoints"), save_every=0)
  for step in written:
    state = jax.device_get(checkpointer.restore(trainer.abstract_state(), step=step))
    for leaf in jax.tree.leaves((state.params, state.opt_state)):
      assert np.all(np.isfinite(leaf)), f"non-finite value in checkpoint {step}"
    assert int(state.num_skipped) == (2 if step >= 8 else 0)
  checkpointer.close()


def test_non_finite_state_is_refused_at_save(reference, tmp_path):
  state = reference.trainer.create_state(reference.trainer.init_params(0))
  state = state.replace(
    params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(np.inf), state.params)
  )
  checkpointer = Checkpointer(str(tmp_path), save_every=1)
  with pytest.raises(FloatingPointError, match="Refusing to checkpoint step 1.*learning_rate"):
    checkpointer.maybe_save(1, state)
  checkpointer.close()
  assert not glob.glob(str(tmp_path / "1*"))


# ----- 3. a damaged checkpoint -----------------------------------------------------------------


def _remove_params_data(step_dir):
  files = glob.glob(os.path.join(step_dir, "params", "ocdbt.process_0", "d", "*"))
  assert files
  for path in files:
    os.remove(path)


def _truncate_opt_state_data(step_dir):
  files = glob.glob(os.path.join(step_dir, "opt_state", "ocdbt.process_0", "d", "*"))
  assert files
  for path in files:
    os.truncate(path, os.path.getsize(path) // 2)


@ABANDONED_IO
@pytest.mark.parametrize(
  "damage", [_remove_params_data, _truncate_opt_state_data], ids=["missing", "truncated"]
)
def test_damaged_latest_checkpoint_falls_back_to_the_newest_good_one(
  reference, tmp_path, caplog, damage
):
  workdir = reference.copy(str(tmp_path / "run"))
  checkpoints = os.path.join(workdir, "checkpoints")
  damage(os.path.join(checkpoints, str(NUM_STEPS)))
  with caplog.at_level(logging.WARNING):
    result = reference.run(workdir)
  warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  assert f"Skipping checkpoint step {NUM_STEPS} in {checkpoints}: it cannot be read" in warnings
  assert f"Resumed from step {NUM_STEPS - 4}, the newest readable checkpoint" in warnings
  # The damaged one is kept aside, and the run wrote that step again: as if nothing happened.
  assert os.path.isdir(os.path.join(checkpoints, f"{NUM_STEPS}.damaged"))
  assert_same_state(result.state, reference.result.state)
  assert_same_state(
    reference.checkpoint(workdir, NUM_STEPS), reference.checkpoint(reference.workdir, NUM_STEPS)
  )
  assert_same_records(workdir, reference)  # the records past step 12 were redone, not doubled


@ABANDONED_IO
def test_no_readable_checkpoint_stops_instead_of_starting_over(reference, tmp_path):
  workdir = reference.copy(str(tmp_path / "run"))
  checkpoints = os.path.join(workdir, "checkpoints")
  for step_dir in glob.glob(os.path.join(checkpoints, "*")):
    _remove_params_data(step_dir)
  before = sorted(os.listdir(checkpoints))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    metrics_before = f.read()
  with pytest.raises(CheckpointError) as error:
    reference.run(workdir)
  message = str(error.value)
  assert f"No checkpoint in {checkpoints} can be read" in message
  assert "step 16:" in message and "step 4:" in message  # each one's reason
  assert "did not start over" in message and "start from step 0" in message
  assert sorted(os.listdir(checkpoints)) == before  # nothing moved, nothing written
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert f.read() == metrics_before


# ----- 4. a full disk --------------------------------------------------------------------------


@pytest.mark.slow
@ABANDONED_IO
def test_full_disk_at_save_names_the_path_and_keeps_the_previous_checkpoint(reference, tmp_path):
  """Files may not grow past 64 KiB while the run resumes from step 8: the write of step 12's
  checkpoint fails in the background (EFBIG, as ENOSPC would), the error surfaces at the next save,
  and step 8 stays intact. RLIMIT_FSIZE binds root too, unlike a read-only directory."""
  workdir = reference.copy(str(tmp_path / "run"))
  checkpoints = os.path.join(workdir, "checkpoints")
  for step in (12, 16):
    shutil.rmtree(os.path.join(checkpoints, str(step)))
  saved = reference.checkpoint(workdir, 8)
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
  try:
    with pytest.raises(CheckpointError) as error:
      reference.run(workdir)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  gc.collect()  # the abandoned writes report now, not at interpreter exit
  message = str(error.value)
  assert f"Could not write the checkpoint of step 12 to {checkpoints}" in message
  assert "File too large" in message and "Free space on that disk" in message
  assert "it resumes from step 8" in message
  checkpointer = Checkpointer(checkpoints, save_every=0)
  assert checkpointer.latest_step() == 8
  checkpointer.close()
  assert_same_state(reference.checkpoint(workdir, 8), saved)
  # With room again, rerunning the same command finishes as if nothing had happened.
  result = reference.run(workdir)
  assert_same_state(result.state, reference.result.state)
  assert_same_records(workdir, reference)


def test_checkpoint_directory_that_cannot_be_created_is_named(tmp_path):
  blocked = tmp_path / "checkpoints"
  blocked.write_text("a file where the directory should be")
  with pytest.raises(CheckpointError, match=f"Cannot create.*{re.escape(str(blocked))}"):
    Checkpointer(str(blocked), save_every=1)


# ----- 5. determinism --------------------------------------------------------------------------


def test_two_fresh_runs_are_bit_identical(reference, tmp_path):
  """A fresh trainer (compiled anew) in a fresh workdir: the same parameters and records."""
  workdir = str(tmp_path / "run")
  trainer = configure.make_trainer(reference.config)
  evaluator = evaluate.Evaluator(reference.config, workdir, trainer)
  result = run.run_training(
    reference.config, workdir, trainer=trainer, evaluator=evaluator, progress=False
  )
  assert_same_state(result.state, reference.result.state)
  assert result.evals == reference.result.evals
  assert_same_records(workdir, reference)
