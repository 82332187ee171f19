"""What keys a comparison's cached run (everything that determines it, and nothing else), and
runs that train at once."""

import glob
import json
import os
import subprocess
import sys

import pytest

from configs import default
from finch_jax import configure, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_claim_sets_a_run_of_another_fingerprint_aside(tmp_path):
  run_dir = tmp_path / "runs" / "finch" / "lr0.001_seed0"
  sweep.claim(str(run_dir), "aaaa")
  (run_dir / "result.json").write_text("{}")
  sweep.claim(str(run_dir), "aaaa")  # unchanged: kept
  assert (run_dir / "result.json").exists()
  sweep.claim(str(run_dir), "bbbb")  # changed: the old run is set aside, nothing deleted
  assert not (run_dir / "result.json").exists()
  assert (tmp_path / "runs" / "finch" / "lr0.001_seed0.stale-aaaa" / "result.json").exists()
  with open(run_dir / sweep.FINGERPRINT_FILE) as f:
    assert json.load(f) == {"fingerprint": "bbbb"}


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
  measured = ("task_loss", "retain_loss", "forgetting", "curve", "retain_fact_accuracy")
  for key, result in expected.items():
    assert {k: got[key][k] for k in measured} == {k: result[k] for k in measured}, key
