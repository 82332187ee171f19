"""Matched-task-loss reading of the sweeps, and the report the default run writes."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from finch_jax import report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(method, lr, seed, task_loss, forgetting_value, **extra):
  return {
    "method": method,
    "learning_rate": lr,
    "seed": seed,
    "task_loss": task_loss,
    "forgetting": forgetting_value,
    **extra,
  }


def test_monotone_sweep_stops_where_a_higher_rate_no_longer_helps():
  points = [
    run("a", lr, 0, loss, 0.0) for lr, loss in [(3e-3, 0.8), (1e-4, 2.0), (1e-3, 1.0), (1e-2, 0.9)]
  ]
  kept = report.monotone_sweep(points, "task_loss", increasing=False)
  assert [p["learning_rate"] for p in kept] == [1e-4, 1e-3, 3e-3]


def test_overlap_serves_the_most_methods_when_no_loss_serves_all():
  def sweep(*losses):
    # Rising rates, falling losses.
    return [[run("m", 10.0 ** (i - 5), 0, loss, 0.0) for i, loss in enumerate(losses)]]

  # Spans: a [0.5, 2.0], b [0.6, 1.5], c [0.3, 0.4] (already low at its lowest rate).
  sweeps = {"a": sweep(2.0, 0.5), "b": sweep(1.5, 0.6), "c": sweep(0.4, 0.3)}
  span = report.overlap(sweeps, "task_loss")
  assert (span["lo"], span["hi"], span["middle"]) == pytest.approx((0.6, 1.5, 1.05))
  assert span["methods"] == ["a", "b"]  # c's sweep lies below both
  del sweeps["c"]
  assert report.overlap(sweeps, "task_loss")["middle"] == pytest.approx(1.05)  # all of them


def test_interpolation_is_linear_in_task_loss_and_log_linear_in_rate():
  points = [run("a", 1e-4, 0, 2.0, 0.1), run("a", 1e-3, 0, 1.0, 0.3)]
  assert report.interpolate(points, "task_loss", 1.5, "forgetting") == pytest.approx(0.2)
  lr = report.interpolate(points, "task_loss", 1.5, "learning_rate")
  assert lr == pytest.approx(math.sqrt(1e-4 * 1e-3))
  assert math.isnan(report.interpolate(points, "task_loss", 0.5, "forgetting"))


def test_matched_reads_every_method_at_the_middle_of_the_losses_all_reach():
  runs = []
  for seed, shift in [(0, 0.0), (1, 0.02)]:
    # "standard" reaches 0.9, "finch" only 1.0: both span 1.0 to 2.0, read at 1.5.
    runs += [
      run("standard", 1e-4, seed, 2.0, 0.10 + shift),
      run("standard", 1e-3, seed, 0.9, 0.32 + shift),
    ]
    runs += [
      run("finch", 3e-5, seed, 2.0, 0.05 + shift),
      run("finch", 3e-4, seed, 1.0, 0.15 + shift),
    ]
  out = report.matched(runs, "task_loss", "forgetting")
  assert out["target"] == pytest.approx(1.5)
  # standard at 1.5: 0.5/1.1 of the way from 2.0 to 0.9.
  frac = (2.0 - 1.5) / (2.0 - 0.9)
  want_standard = 0.10 + frac * 0.22 + 0.01
  assert out["methods"]["standard"]["forgetting"] == pytest.approx(want_standard)
  assert out["methods"]["finch"]["forgetting"] == pytest.approx(0.11)  # 0.10 and 0.12
  half = 12.706204736174707 * 0.02 / math.sqrt(2) / math.sqrt(2)  # t(0.975, 1) * sd / sqrt(n)
  assert out["methods"]["finch"]["forgetting_ci"] == pytest.approx([0.11 - half, 0.11 + half])
  change = report.relative_change(
    out["methods"]["finch"]["per_seed"], out["methods"]["standard"]["per_seed"], "forgetting"
  )
  assert change["mean"] == pytest.approx(
    (
      (0.10 - (0.10 + frac * 0.22)) / (0.10 + frac * 0.22)
      + (0.12 - (0.12 + frac * 0.22)) / (0.12 + frac * 0.22)
    )
    / 2
  )
  assert change["n"] == 2


@pytest.mark.slow
def test_default_run_end_to_end_through_train_py(tmp_path):
  """The default command on shrunken sizes: base, sweeps, matched report, plots, cache reuse,
  and a results store that rebuilds the report alone and spares a rerun what it holds."""
  workdir, study = tmp_path / "wd", tmp_path / "study"
  args = [
    sys.executable,
    os.path.join(ROOT, "train.py"),
    f"--workdir={workdir}",
    "--config.model.num_layers=1",
    "--config.model.d_model=32",
    "--config.model.num_heads=2",
    "--config.model.num_kv_heads=1",
    "--config.model.d_ff=64",
    "--config.data.seq_len=32",
    "--config.data.batch_size=8",
    "--config.data.eval_examples=16",
    "--config.data.fact_examples=16",
    "--config.num_train_steps=8",
    "--config.eval_every=4",
    "--config.log_every=4",
    "--config.compare.seeds=(0,)",
    "--config.compare.methods.standard.learning_rates=(1e-3,1e-2)",
    "--config.compare.methods.finch.learning_rates=(1e-3,1e-2)",
    "--config.compare.pretrain.num_train_steps=10",
    "--config.compare.pretrain.data.batch_size=8",
    f"--config.compare.results_dir={study}",
  ]
  env = {**os.environ, "XLA_FLAGS": ""}
  first = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "| method | task loss" in first.stdout
  with open(workdir / "report.json") as f:
    report = json.load(f)
  assert set(report["methods"]) == {"standard", "finch"}
  for entry in report["methods"].values():
    for key in ("task_loss", "retain_loss_before", "retain_loss_after", "forgetting"):
      assert key in entry
  assert len(report["runs"]) == 4
  for name in ("report.md", "frontier.png", "curves.png", "base/metrics.jsonl"):
    assert (workdir / name).exists(), name
  with open(workdir / "runs" / "finch" / "lr0.001_seed0" / "metrics.jsonl") as f:
    record = json.loads(f.readline())
  assert {"step", "loss", "finch_scale"} <= set(record)
  # A finished run keeps its result and curves, not its checkpoints (the base keeps its own).
  assert not list(workdir.glob("runs/*/*/checkpoints"))
  assert (workdir / "base" / "checkpoints").is_dir()

  # The results store holds every run's summary; its files alone rebuild the same report.
  assert len(list(study.glob("runs/*/*.json"))) == 4
  (study / "report.json").unlink()
  rebuilt = subprocess.run(
    [sys.executable, "-m", "finch_jax.report", str(study)],
    capture_output=True,
    text=True,
    env=env,
    cwd=ROOT,
  )
  assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
  assert (study / "report.json").read_text() == (workdir / "report.json").read_text()

  # A second run reuses the base and every finished sweep point, from the workdir or from the
  # store: standard's runs are gone from the workdir and one of them from the store, so that one
  # alone trains again. The step timing of the cost column is read back from the store: the
  # methods' configs are those it was timed under.
  shutil.rmtree(workdir / "runs" / "standard")
  (study / "runs" / "standard" / "lr0.01_seed0.json").unlink()
  second = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
  assert second.returncode == 0, second.stderr[-3000:]
  assert [p.name for p in (workdir / "runs" / "standard").iterdir()] == ["lr0.01_seed0"]
  assert "Timing 2 methods' train steps" in first.stdout
  assert "Timing" not in second.stdout
  with open(workdir / "report.json") as f:
    again = json.load(f)

  def untimed(content):  # step times, logged or timed, vary; the JSON text reads NaN as NaN
    if isinstance(content, dict):
      return {k: untimed(v) for k, v in content.items() if "step_time" not in k}
    return [untimed(v) for v in content] if isinstance(content, list) else content

  for name, entry in report["methods"].items():
    assert json.dumps(untimed(again["methods"][name])) == json.dumps(untimed(entry))
    assert again["methods"][name]["step_time_rounds"] == entry["step_time_rounds"]
  assert untimed(again["runs"]) == untimed(report["runs"])

  # A changed field that determines the runs redoes them (the base, which the field does not
  # touch, is reused); the old runs are set aside, not deleted.
  third = subprocess.run(
    [*args, "--config.num_train_steps=4", "--config.compare.keep_run_checkpoints=True"],
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
    cwd=tmp_path,
  )
  assert third.returncode == 0, third.stderr[-3000:]
  with open(workdir / "report.json") as f:
    redone = json.load(f)
  assert [run["curve"][-1]["step"] for run in redone["runs"]] == [4] * 4
  assert len(list(workdir.glob("runs/*/lr*_seed0/checkpoints/4"))) == 4  # kept when asked
  assert "Timing 2 methods' train steps" in third.stdout  # timed again under the new configs
  timings = json.loads((study / "study.json").read_text())["step_times"]
  assert len(timings) == 1 and set(timings[0]["step_times"]) == {"standard", "finch"}
  finch_runs = {p.name for p in (workdir / "runs" / "finch").iterdir()}
  old = next(r for r in report["runs"] if r["method"] == "finch" and r["learning_rate"] == 1e-3)
  assert f"lr0.001_seed0.stale-{old['fingerprint']}" in finch_runs
  assert redone["before"] == report["before"]
  # The store's summaries of the old fingerprint were not reused, and now hold the new runs.
  kept = {json.loads(p.read_text())["fingerprint"] for p in study.glob("runs/*/*.json")}
  assert kept == {run["fingerprint"] for run in redone["runs"]}
