"""What keys a comparison's cached run: everything that determines it, and nothing else."""

import json
import os

from configs import default
from finch_jax import configure, sweep


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
