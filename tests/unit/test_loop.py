"""The fit loop's records: strict JSON metrics and TensorBoard curves that survive a resume."""

import json

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from finch_jax.loop import MetricsWriter, _Window


def test_metrics_jsonl_is_strict_json_with_null_for_values_not_measured(tmp_path):
  writer = MetricsWriter(str(tmp_path))
  writer.write(1, {"loss": float("nan"), "grad_norm": np.float32("inf"), "lr": 0.5})
  writer.close()
  line = (tmp_path / "metrics.jsonl").read_text().strip()
  # json.loads accepts NaN; a strict parser (JavaScript, jq) does not: parse strictly.
  record = json.loads(line, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
  assert record == {"step": 1, "loss": None, "grad_norm": None, "lr": 0.5}


def test_a_window_with_a_skipped_step_logs_the_mean_of_the_finite_ones():
  window = _Window([], tokens_per_batch=None)
  for loss, skipped in ((1.0, 0), (float("nan"), 1), (3.0, 1)):
    window.add({"loss": np.float32(loss), "num_skipped": np.int32(skipped)})
  record = window.close()
  assert record["loss"] == 2.0
  assert record["num_skipped"] == 1
  window.add({"loss": np.float32("nan"), "num_skipped": np.int32(2)})
  assert window.close()["loss"] is None  # every step of the window skipped: nothing to average


def _scalars(logdir, tag):
  accumulator = EventAccumulator(str(logdir))
  accumulator.Reload()
  return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
  first = MetricsWriter(str(tmp_path), truncate_after=0)
  for step in (10, 20, 30):  # steps 20 and 30 are lost: the run resumes from step 10
    first.write(step, {"loss": float(step)})
  first.close()
  resumed = MetricsWriter(str(tmp_path), truncate_after=10)
  for step in (20, 30, 40):
    resumed.write(step, {"loss": step + 0.5})
  resumed.close()
  assert _scalars(tmp_path / "tensorboard", "loss") == [
    (10, 10.0),
    (20, 20.5),
    (30, 30.5),
    (40, 40.5),
  ]
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  expected = [(10, 10.0), (20, 20.5), (30, 30.5), (40, 40.5)]
  assert [(r["step"], r["loss"]) for r in records] == expected
