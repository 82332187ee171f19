"""What keys a comparison's cached run (everything that determines it, and nothing else), and
runs that train at once."""

import collections
import glob
import json
import os
import signal
import subprocess
import sys
import time
import types

import jax
import pytest

from configs import default
from finch_jax import configure, loop, plan, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(**changes):
  return configure.override(default.get_config(), changes)


def test_fingerprint_changes_with_what_determines_a_run():
  base = _config()
  key = configure.fingerprint(base, learning_rate=1e-3, seed=0)
  assert key == configure.fingerprint(_config(), learning_rate=1e-3, seed=0)  # deterministic
  changed = {
    "steps": _config(num_train_steps=151),
    "batch": _config(data={"batch_size": 3}),
    "eval sets": _config(data={"eval_examples": 64}),
    "model": _config(model={"d_ff": 128}),
    "finch": _config(finch={"max_scale": 2.0}),
    "base model": _config(compare={"pretrain": {"num_train_steps": 601}}),
  }
  for what, config in changed.items():
    assert configure.fingerprint(config, learning_rate=1e-3, seed=0) != key, what
  assert configure.fingerprint(base, learning_rate=3e-3, seed=0) != key
  assert configure.fingerprint(base, learning_rate=1e-3, seed=1) != key
  # Not what the run computes: checkpoint cadence, other methods and their rates, the seeds list.
  same = {
    "cadence": _config(checkpoint_every=7, keep_checkpoints=1),
    "rates": _config(compare={"methods": {"standard": {"learning_rates": (1.0,)}}}),
    "seeds": _config(compare={"seeds": (5,)}),
  }
  for what, config in same.items():
    assert configure.fingerprint(config, learning_rate=1e-3, seed=0) == key, what


def test_fingerprint_reads_the_local_data_files(tmp_path):
  data = tmp_path / "train.jsonl"
  data.write_text('{"prompt": "a", "response": "b"}\n')
  config = _config(data={"train": {"name": f"jsonl:{data}", "split": "train"}})
  key = configure.fingerprint(config)
  data.write_text('{"prompt": "a", "response": "changed"}\n')
  os.utime(data, ns=(1, 1))
  assert configure.fingerprint(config) != key


def _edited(path, text):
  """Writes `text` at `path` with another modification time, as an edit a while later does."""
  path.write_text(text)
  os.utime(path, ns=(1, 1))


def test_fingerprint_counts_nested_text_of_a_local_text_directory(tmp_path):
  nested = tmp_path / "text" / "chapters" / "one.txt"
  nested.parent.mkdir(parents=True)
  nested.write_text("First paragraph.\n\nSecond.\n")
  config = _config(data={"train": {"name": f"local_text:{tmp_path / 'text'}", "split": "train"}})
  key = configure.fingerprint(config)
  assert configure.fingerprint(config) == key  # the same data: the same key
  _edited(nested, "First paragraph, edited.\n\nSecond.\n")
  assert configure.fingerprint(config) != key
  assert str(nested) in configure.input_files(config)


def test_fingerprint_counts_the_files_a_recursive_jsonl_glob_matches(tmp_path):
  nested = tmp_path / "sft" / "part1" / "deep" / "train.jsonl"
  nested.parent.mkdir(parents=True)
  nested.write_text('{"prompt": "a", "response": "b"}\n')
  name = f"jsonl:{tmp_path / 'sft'}/**/*.jsonl"
  config = _config(data={"train": {"name": name, "split": "train"}})
  key = configure.fingerprint(config)
  assert configure.fingerprint(config) == key
  _edited(nested, '{"prompt": "a", "response": "changed"}\n')
  assert configure.fingerprint(config) != key


def test_fingerprint_counts_the_tokenizer_files(tmp_path):
  tokenizer = tmp_path / "tokenizer" / "tokenizer.json"
  tokenizer.parent.mkdir()
  tokenizer.write_text('{"model": {"vocab": {"a": 0}}}')
  config = _config(data={"tokenizer": str(tokenizer.parent)})
  key = configure.fingerprint(config)
  assert configure.fingerprint(config) == key
  _edited(tokenizer, '{"model": {"vocab": {"a": 0, "b": 1}}}')
  assert configure.fingerprint(config) != key


def test_fingerprint_counts_the_package_files_a_debian_build_reads(tmp_path):
  dictd = tmp_path / "usr" / "share" / "dictd"
  dictd.mkdir(parents=True)
  for name in ("elements.index", "elements.dict.dz"):
    (dictd / name).write_text("x")
  config = _config(data={"fact_sets": {"retain": {"name": "debian/elements", "split": "facts"}}})
  config.data.options = {"debian_elements": {"root": str(tmp_path)}}
  key = configure.fingerprint(config)
  assert configure.fingerprint(config) == key
  _edited(dictd / "elements.index", "an upgraded package")
  assert configure.fingerprint(config) != key
  assert str(dictd / "elements.index") in configure.input_files(config)


def test_fingerprint_counts_the_checkpoint_files_of_a_base_workdir(tmp_path):
  step = tmp_path / "base" / "checkpoints" / "320" / "params"
  step.mkdir(parents=True)
  (step / "data").write_text("weights")
  (tmp_path / "base" / "metrics.jsonl").write_text("{}\n")
  config = _config(base_checkpoint=str(tmp_path / "base"))
  key = configure.fingerprint(config)
  (tmp_path / "base" / "metrics.jsonl").write_text('{}\n{"step": 1}\n')  # a log: not the base
  assert configure.fingerprint(config) == key
  _edited(step / "data", "weights trained further")
  assert configure.fingerprint(config) != key


def test_claim_sets_a_run_of_another_fingerprint_aside(tmp_path):
  run_dir = tmp_path / "runs" / "finch" / "lr0.001_seed0"
  plan.claim(str(run_dir), "aaaa")
  (run_dir / "result.json").write_text("{}")
  plan.claim(str(run_dir), "aaaa")  # unchanged: kept
  assert (run_dir / "result.json").exists()
  plan.claim(str(run_dir), "bbbb")  # changed: the old run is set aside, nothing deleted
  assert not (run_dir / "result.json").exists()
  assert (tmp_path / "runs" / "finch" / "lr0.001_seed0.stale-aaaa" / "result.json").exists()
  with open(run_dir / configure.FINGERPRINT_FILE) as f:
    assert json.load(f) == {"fingerprint": "bbbb"}


def test_a_config_flipped_back_and_forth_keeps_every_old_run(tmp_path):
  """A -> B -> A -> B: the second time A's run is set aside, its name is taken."""
  run_dir = tmp_path / "run"
  for n, key in enumerate(["aaaa", "bbbb", "aaaa", "bbbb"]):
    plan.claim(str(run_dir), key)
    (run_dir / "result.json").write_text(str(n))
  kept = {p.name: (p / "result.json").read_text() for p in tmp_path.iterdir()}
  assert kept == {"run.stale-aaaa": "0", "run.stale-bbbb": "1", "run.stale-aaaa-2": "2", "run": "3"}


def test_on_several_processes_the_old_run_is_moved_before_any_process_goes_on(
  tmp_path, monkeypatch
):
  """Process 0 sets the old run aside and stamps the new one; every process (process 0 after
  that) waits at a barrier, so none opens the old run's checkpoints while they move."""
  run_dir = tmp_path / "run"
  moved = tmp_path / "run.stale-aaaa"
  plan.claim(str(run_dir), "aaaa")
  barriers = []  # whether the old run had been moved when a process reached the barrier
  monkeypatch.setattr(plan.shd, "barrier", lambda name: barriers.append(moved.exists()))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  plan.claim(str(run_dir), "bbbb")
  assert barriers == [False]  # process 1 touches nothing and waits
  assert json.loads((run_dir / configure.FINGERPRINT_FILE).read_text()) == {"fingerprint": "aaaa"}
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  plan.claim(str(run_dir), "bbbb")
  assert barriers == [False, True]  # process 0 moved it, then waited
  assert json.loads((run_dir / configure.FINGERPRINT_FILE).read_text()) == {"fingerprint": "bbbb"}


class _FakeRun:
  """A sweep run that trains (its plan reuses nothing)."""

  def __init__(self, name, behaviour):
    self.name = self.method = name
    self.behaviour, self.reuses = behaviour, None


class _FakeExecutor:
  """Brings a `_FakeRun` to its result by doing what its `behaviour(stop)` does, logging that it
  started."""

  workdir = base = None

  def __init__(self):
    self.started = []

  def result(self, sweep_run, trainer, evaluator, *, progress, stop):
    self.started.append(sweep_run.name)
    return sweep_run.behaviour(stop)


def _trains(seconds):
  """A run of `seconds` that stops at its next step when asked, as `loop.fit` does."""

  def behaviour(stop):
    for step in range(int(seconds / 0.02)):
      time.sleep(0.02)
      if stop.reached(step):
        raise stop.preempted(step, None, None)
    return {"trained": seconds}

  return behaviour


def _fails(stop):
  time.sleep(0.2)
  raise ValueError("this run failed")


def _signalled(stop):
  time.sleep(0.2)  # the other run has started
  os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler preempting the job would
  return _trains(3.0)(stop)


def _run_at_once(runs, executor, monkeypatch):
  """`sweep._concurrent_results` of fake runs, two at a time, without models."""
  worker = types.SimpleNamespace(trainers=collections.defaultdict(lambda: None), evaluator=None)
  monkeypatch.setattr(sweep, "_Worker", lambda *args: worker)
  with sweep._Progress(runs, at_once=2) as progress:
    return sweep._concurrent_results(executor, runs, [["d0"], ["d1"]], None, {}, progress)


def test_a_failed_run_stops_the_sweep_at_once(monkeypatch):
  runs = [_FakeRun("fails", _fails), _FakeRun("long", _trains(3.0))]
  runs += [_FakeRun(f"queued{i}", _trains(0.0)) for i in range(3)]
  executor = _FakeExecutor()
  start = time.perf_counter()
  with pytest.raises(ValueError, match="this run failed"):
    _run_at_once(runs, executor, monkeypatch)
  assert time.perf_counter() - start < 2.0  # the run in flight stopped at its next step
  assert sorted(executor.started) == ["fails", "long"]  # no queued run started


def test_sigterm_stops_a_concurrent_sweep_without_starting_queued_runs(monkeypatch):
  runs = [_FakeRun("signalled", _signalled), _FakeRun("long", _trains(3.0))]
  runs += [_FakeRun(f"queued{i}", _trains(0.0)) for i in range(3)]
  executor = _FakeExecutor()
  start = time.perf_counter()
  with pytest.raises(loop.Preempted) as stopped:
    _run_at_once(runs, executor, monkeypatch)
  assert stopped.value.code == 128 + signal.SIGTERM
  assert time.perf_counter() - start < 2.0
  assert sorted(executor.started) == ["long", "signalled"]


def _train(workdir, device_count, *overrides):
  """train.py in a fresh process whose CPU is `device_count` devices."""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={device_count}"}
  command = [sys.executable, os.path.join(ROOT, "train.py"), f"--workdir={workdir}", *overrides]
  done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def _results(workdir):
  found = {}
  for path in glob.glob(os.path.join(workdir, "runs", "*", "*", "result.json")):
    with open(path) as f:
      result = json.load(f)
    found[(result["method"], result["learning_rate"], result["seed"])] = result
  return found


@pytest.mark.slow
def test_runs_trained_at_once_give_the_separate_runs_results(tmp_path):
  """A sweep whose runs train two at a time, one per device, ends with each run's numbers as
  the same sweep run one at a time on one device gives them."""
  small = [
    "--config.data.options.embedded_biographies.num_base_people=16",
    "--config.data.options.embedded_biographies.num_new_people=16",
    "--config.data.seq_len=64",
    "--config.data.batch_size=8",
    "--config.data.eval_examples=16",
    f"--config.data.data_dir={tmp_path / 'data'}",
  ]
  sweep_flags = [
    *small,
    "--config.num_train_steps=8",
    "--config.eval_every=4",
    "--config.log_every=4",
    "--config.checkpoint_every=8",
    "--config.compare.timing.rounds=1",
    "--config.compare.timing.steps=1",
    "--config.compare.methods.standard.learning_rates=(0.001,)",
    "--config.compare.methods.finch.learning_rates=(0.001,)",
  ]
  # The first pretrains the base (over both devices); the second fine-tunes that same base.
  pretrain = ["--config.compare.pretrain.num_train_steps=10"]
  together = _train(tmp_path / "together", 2, *sweep_flags, *pretrain)
  base = f"--config.base_checkpoint={tmp_path / 'together' / 'base'}"
  alone = _train(tmp_path / "alone", 1, *sweep_flags, base, "--config.compare.concurrent_runs=1")
  assert "2 training at once" in together and "training at once" not in alone
  expected = _results(tmp_path / "alone")
  assert len(expected) == 4  # 2 methods x 2 seeds
  got = _results(tmp_path / "together")
  assert got.keys() == expected.keys()
  measured = ("task_loss", "retain_loss", "curve", "retain_fact_accuracy")
  for key, result in expected.items():
    assert {k: got[key][k] for k in measured} == {k: result[k] for k in measured}, key
    # Forgetting subtracts the base's retain loss, measured once over all the devices there and
    # on one here: its float32 sums add in another order, the last bit of a float32 apart.
    assert got[key]["forgetting"] == pytest.approx(result["forgetting"], rel=1e-6, abs=1e-6), key


def test_only_sweeps_the_named_methods_and_the_baseline():
  config = default.get_config()
  config.compare.methods = {
    "standard": {"finch": {"enabled": False}, "learning_rates": (1e-3,)},
    "finch": {"finch": {"enabled": True}, "learning_rates": (1e-3,)},
    "cosine": {"optimizer": {"schedule": "cosine"}, "learning_rates": (1e-3,)},
  }
  assert set(plan.methods_to_train(config)) == {"standard", "finch", "cosine"}
  config.compare.only = ("cosine",)
  assert list(plan.methods_to_train(config)) == ["standard", "cosine"]
  config.compare.only = ("nope",)
  with pytest.raises(ValueError, match="compare.only names \\['nope'\\]"):
    plan.methods_to_train(config)


def test_the_plan_lists_every_run_with_its_fingerprint_and_what_it_reuses(tmp_path):
  """Without training: a run the study's store keeps, one finished in the workdir, one made for
  another fingerprint, one whose result was cut short, one whose summary is another config's;
  the plan reads them and writes nothing."""
  config = _config(compare={"seeds": (0, 1)})
  config.compare.methods = {
    "standard": {"finch": {"enabled": False}, "learning_rates": (1e-3, 2e-3)},
    "finch": {"finch": {"enabled": True}, "learning_rates": (1e-3, 2e-3)},
  }
  configs = configure.method_configs(config)
  key = {
    (name, rate, seed): configure.fingerprint(configs[name], learning_rate=rate, seed=seed)
    for name in configs
    for rate in (1e-3, 2e-3)
    for seed in (0, 1)
  }
  store, workdir = plan.ResultsStore(tmp_path / "study"), tmp_path / "workdir"
  store.write(
    {
      "method": "standard",
      "learning_rate": 1e-3,
      "seed": 0,
      "fingerprint": key[("standard", 1e-3, 0)],
    }
  )
  store.write({"method": "finch", "learning_rate": 2e-3, "seed": 1, "fingerprint": "another"})

  def finished(name, rate, seed, fingerprint, result='{"task_loss": 1.0}'):
    run_dir = workdir / "runs" / name / f"lr{rate:.3g}_seed{seed}"
    plan.claim(run_dir, fingerprint)
    (run_dir / "result.json").write_text(result)

  finished("standard", 1e-3, 1, key[("standard", 1e-3, 1)])
  finished("standard", 2e-3, 0, "another")
  finished("finch", 1e-3, 0, key[("finch", 1e-3, 0)], result='{"task_loss": 1.')
  written = sorted(p for p in tmp_path.rglob("*"))

  the_plan = plan.plan(config, workdir, store)

  assert sorted(p for p in tmp_path.rglob("*")) == written
  assert list(the_plan.methods) == list(configs) == ["finch", "standard"]  # a ConfigDict sorts
  got = {(r.method, r.learning_rate, r.seed): (r.fingerprint, r.reuses) for r in the_plan.runs}
  assert list(got) == list(key)  # method, then rate, then seed
  assert {k: fingerprint for k, (fingerprint, _) in got.items()} == key
  reuses = {k: reused for k, (_, reused) in got.items() if reused is not None}
  assert reuses == {
    ("standard", 1e-3, 0): plan.KEPT_IN_STORE,
    ("standard", 1e-3, 1): plan.KEPT_IN_WORKDIR,
  }
  assert len(the_plan.to_train()) == 6


def test_one_clock_counts_the_runs_read_back_as_done_from_the_start():
  runs = [types.SimpleNamespace(name=f"run{i}", reuses=None) for i in range(4)]
  runs[0].reuses, runs[1].reuses = plan.KEPT_IN_STORE, plan.KEPT_IN_WORKDIR
  descriptions = []
  with sweep._Progress(runs, at_once=1) as progress:
    for sweep_run in runs:
      with progress.run(sweep_run) as description:
        descriptions.append(description)
    with pytest.raises(ValueError), progress.run(runs[3]):
      raise ValueError("a run that fails is not done")
    assert progress.bar.n == 4 and progress.bar.total == 4
  assert descriptions[:2] == ["run0", "run1"]  # read back: no bar of their own
  assert descriptions[2].startswith("sweeps 2/4 runs done, ") and "left: run2" in descriptions[2]
  assert descriptions[3].startswith("sweeps 3/4 runs done, ") and "left: run3" in descriptions[3]
