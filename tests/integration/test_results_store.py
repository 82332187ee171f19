"""A study kept as run summaries: written atomically, reused by fingerprint, and enough to rebuild
the report without training; and the cost column's timing in alternating rounds. (A sweep
that writes the store and a rerun that trains only what it lacks:
tests/integration/test_forgetting.py.)"""

import json
import os
import subprocess
import sys
import weakref

import pytest

from finch_jax import configure, plan, report, sweep
from tests.integration.test_trainer import small_config
from tests.unit.test_report import BEFORE, RUNS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEP_TIMES = {"standard": [0.10, 0.12, 0.11], "anchor": [0.11, 0.12, 0.12]}
STEP_TIMES["anchor+finch"] = [0.12, 0.13, 0.11]


def _json(content):
  """The JSON text of `content`, which compares NaN with NaN as equal."""
  return json.dumps(content, sort_keys=True)


def _store(directory):
  store = plan.ResultsStore(directory)
  for r in RUNS:
    store.write({**r, "fingerprint": f"f{r['seed']}", "before": BEFORE, "code_version": "v"})
  return store


def test_the_report_rebuilt_from_the_store_alone_is_the_sweeps(tmp_path):
  store = _store(tmp_path / "study")
  store.write_study("standard", ["standard", "anchor", "anchor+finch"], STEP_TIMES)
  runs = [
    {**r, "fingerprint": f"f{r['seed']}", "before": BEFORE, "code_version": "v"} for r in RUNS
  ]
  want = report.build_report("standard", BEFORE, runs, STEP_TIMES)
  assert _json(report.report_from_store(tmp_path / "study")) == _json(want)
  for name in ("report.json", "report.md", "frontier.png", "curves.png", "relative_change.png"):
    assert (tmp_path / "study" / name).exists(), name
  (tmp_path / "study" / "report.json").unlink()
  done = subprocess.run(
    [sys.executable, "-m", "finch_jax.report", str(tmp_path / "study")],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert "| method | task loss" in done.stdout
  rebuilt = json.loads((tmp_path / "study" / "report.json").read_text())
  assert _json(rebuilt) == _json(json.loads(_json(want)))
  assert rebuilt["code_versions"] == ["v"]
  assert not [p for p in (tmp_path / "study").rglob("*.tmp")]  # written by rename


def test_a_store_that_cannot_be_read_names_the_file_and_the_fix(tmp_path):
  done = subprocess.run(
    [sys.executable, "-m", "finch_jax.report", str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
  )
  assert done.returncode == 2
  assert f"{tmp_path / 'study.json'} is missing" in done.stderr
  assert "--config.compare.results_dir=" in done.stderr
  store = _store(tmp_path)
  store.write_study("standard", ["standard"], {})
  other = dict(RUNS[0], seed=7, fingerprint="x", before={**BEFORE, "retain_loss": 2.0})
  store.write(other)
  with pytest.raises(
    report.StoreError, match="different base models .retain_loss: 2.0 against 1.0"
  ):
    report.report_from_store(tmp_path)
  # A run kept before a measure existed, or one with the reliability bins (a list), is from
  # the same base when the numbers both hold agree.
  newer = {**BEFORE, "probes_ece": 0.1, "probes_calibration": [[1.0], [0.5], [1.0]]}
  store.write(dict(RUNS[0], seed=7, fingerprint="x", before=newer))
  assert report.report_from_store(tmp_path)["before"] == BEFORE
  broken = store.path("standard", 1e-4, 7)
  broken.write_text("{")
  with pytest.raises(report.StoreError, match=f"{broken}: not JSON"):
    report.report_from_store(tmp_path)


def test_timings_of_several_sessions_are_kept_each_with_its_own_baseline_rounds(tmp_path):
  store = _store(tmp_path)
  keys = {"standard": "s", "anchor": "a", "anchor+finch": "af"}
  methods = ["standard", "anchor", "anchor+finch"]
  first = {"standard": [1.0, 1.0, 1.0], "anchor": [1.2, 1.2, 1.2]}
  store.write_study("standard", methods, first, fingerprints=keys)
  second = {"standard": [2.0, 2.0, 2.0], "anchor+finch": [3.0, 3.0, 3.0]}
  store.write_study("standard", methods, second, fingerprints=keys)
  cost = report.report_from_store(tmp_path)["methods"]
  assert cost["anchor"]["step_time_ratio"] == pytest.approx(1.2)
  assert cost["anchor+finch"]["step_time_ratio"] == pytest.approx(1.5)
  assert len(store.current_timings(keys, "standard")) == 2
  # The sweep's own write before its runs keeps them.
  store.write_study("standard", methods, {}, report=False)
  assert len(store.timings()) == 2
  # Timed again, anchor leaves its first timing (which then holds the baseline alone).
  store.write_study("standard", methods, {"standard": [1.0] * 3, "anchor": [1.1] * 3}, keys)
  assert [sorted(s["step_times"]) for s in store.timings()] == [
    ["anchor+finch", "standard"],
    ["anchor", "standard"],
  ]
  # A method whose config changed is timed again; a changed baseline voids every timing.
  assert [
    list(s["step_times"]) for s in store.current_timings({**keys, "anchor": "a2"}, "standard")
  ] == [["standard", "anchor+finch"]]
  assert store.current_timings({**keys, "standard": "s2"}, "standard") == []
  store.write_study("standard", methods, {}, fingerprints={**keys, "standard": "s2"})
  assert store.timings() == []
  assert report.report_from_store(tmp_path)["methods"]["anchor"]["step_time_source"] == (
    "the runs' logs"
  )


def test_a_summary_stands_for_its_run_only_with_the_same_fingerprint(tmp_path):
  store = plan.ResultsStore(tmp_path / "study")
  config, other_config = small_config(), small_config(num_train_steps=7)
  this = plan.planned_run("standard", config, 1e-3, 0, tmp_path / "wd", store)
  other = plan.planned_run("standard", other_config, 1e-3, 0, tmp_path / "wd", store)
  assert this.fingerprint != other.fingerprint
  assert store.find(this) is None and this.reuses is None
  summary = {**RUNS[0], "learning_rate": 1e-3, "fingerprint": this.fingerprint, "before": BEFORE}
  store.write(summary)
  assert (tmp_path / "study" / "runs" / "standard" / "lr0.001_seed0.json").exists()
  this = plan.planned_run("standard", config, 1e-3, 0, tmp_path / "wd", store)
  assert store.find(this) == summary and this.reuses == plan.KEPT_IN_STORE
  other = plan.planned_run("standard", other_config, 1e-3, 0, tmp_path / "wd", store)
  assert store.find(other) is None and other.reuses is None


def test_curves_are_thinned_to_at_most_50_points_keeping_both_ends():
  points = [{"step": i} for i in range(1, 301)]
  kept = sweep.thinned(points)
  assert len(kept) == 50 and kept[0]["step"] == 1 and kept[-1]["step"] == 300
  assert sweep.thinned(points[:20]) == points[:20]


class _State:
  def __init__(self, steps):
    self.steps = steps


class _FakeTrainer:
  """Records the order of its steps and checks that no other state is alive when it makes one;
  a state holds the number of steps taken."""

  def __init__(self, name, calls, live):
    self.name, self.calls, self.live = name, calls, live

  def create_state(self, base):
    assert not self.live, "a method's state was made while another one was held"
    return self._state(0)

  def train_step(self, state, batch):
    self.calls.append(self.name)
    return self._state(state.steps + 1), {}

  def _state(self, steps):
    state = _State(steps)
    self.live.add(state)
    return state


def test_step_times_are_timed_in_alternating_rounds():
  calls = []
  live = weakref.WeakSet()  # the states alive: one method's at a time fits a large model
  trainers = {name: _FakeTrainer(name, calls, live) for name in ("a", "b", "c")}
  times = sweep.measure_step_times(trainers, dict.fromkeys(trainers), None, rounds=4, steps=2)
  assert {name: len(t) for name, t in times.items()} == {"a": 4, "b": 4, "c": 4}
  # After two steps each to compile, every round has each method's steps, the order rotating.
  assert calls[:6] == ["a", "a", "b", "b", "c", "c"]
  assert calls[6:] == [
    *("a", "a", "b", "b", "c", "c"),
    *("b", "b", "c", "c", "a", "a"),
    *("c", "c", "a", "a", "b", "b"),
    *("a", "a", "b", "b", "c", "c"),
  ]
  with pytest.raises(ValueError, match="compare.timing rounds=0"):
    sweep.measure_step_times(trainers, dict.fromkeys(trainers), None, rounds=0, steps=2)


def test_the_timing_defaults_have_one_owner():
  source = open(os.path.join(ROOT, "finch_jax", "sweep.py")).read()
  assert "timing.get" not in source and "rounds: int = " not in source
  timing = small_config().compare.timing
  assert timing.rounds >= 16  # enough rounds for a 95% interval of the median


def test_a_file_touched_but_not_changed_keeps_the_fingerprint(tmp_path):
  """A package reinstalled in a new session gets new file times: a study's runs are still its."""
  data = tmp_path / "train.jsonl"
  data.write_text('{"prompt": "a", "response": "b"}\n')
  config = small_config()
  config.data.train = {"name": f"jsonl:{data}", "split": "train"}
  key = configure.fingerprint(config)
  os.utime(data, ns=(10**18, 10**18))
  assert configure.fingerprint(config) == key
  data.write_text('{"prompt": "a", "response": "c"}\n')  # same size, other content
  assert configure.fingerprint(config) != key
