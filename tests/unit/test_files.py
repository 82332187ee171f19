"""Files that decide what a rerun reuses are written whole or not at all, and a torn one left by
an older version is redone rather than failing every rerun (`finch_jax.files`)."""

import builtins
import errno
import json
import logging

import numpy as np
import pytest

from configs import default
from finch_jax import configure, files, plan, sweep


class _DiskFullAfterHalf:
  """A file object whose writes stop half way with ENOSPC, as a full disk or a kill leaves it."""

  def __init__(self, file):
    self._file = file

  def write(self, data):
    self._file.write(data[: len(data) // 2])
    self._file.flush()
    raise OSError(errno.ENOSPC, "No space left on device")

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self._file.close()

  def __getattr__(self, name):
    return getattr(self._file, name)


@pytest.fixture
def full_disk_for(monkeypatch):
  """`full_disk_for(name)`: from now on, every write of a file whose name holds `name` fails
  half way (the temporary file of an atomic write included)."""

  def arm(name: str) -> None:
    real_open = builtins.open

    def failing_open(file, mode="r", *args, **kwargs):
      handle = real_open(file, mode, *args, **kwargs)
      if any(m in mode for m in "wax") and name in str(file):
        return _DiskFullAfterHalf(handle)
      return handle

    monkeypatch.setattr(builtins, "open", failing_open)

  return arm


def test_a_write_cut_short_leaves_the_previous_file(tmp_path, full_disk_for):
  path = tmp_path / "result.json"
  files.write_json(path, {"task_loss": 1.5, "curve": list(range(100))})
  full_disk_for("result.json")
  with pytest.raises(OSError, match="No space left"):
    files.write_json(path, {"task_loss": 2.5, "curve": list(range(1000))})
  assert json.loads(path.read_text())["task_loss"] == 1.5  # whole, and the old one
  assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no partial file left


def test_a_first_write_cut_short_leaves_no_file(tmp_path, full_disk_for):
  full_disk_for("eval_before.json")
  with pytest.raises(OSError):
    files.write_json(tmp_path / "eval_before.json", {"retain_loss": 3.0})
  assert list(tmp_path.iterdir()) == []


def test_a_claim_cut_short_leaves_no_torn_stamp_and_the_rerun_claims(
  tmp_path, full_disk_for, monkeypatch
):
  """The fingerprint stamp decides what a rerun reuses: a crash while writing it must not leave
  a file that every later rerun fails to read."""
  run_dir = tmp_path / "runs" / "finch" / "lr0.001_seed0"
  plan.claim(str(run_dir), "aaaa")
  (run_dir / "result.json").write_text("{}")
  full_disk_for(configure.FINGERPRINT_FILE)
  with pytest.raises(OSError):
    plan.claim(str(run_dir), "bbbb")  # sets the old run aside, then the write fails
  stamp = run_dir / configure.FINGERPRINT_FILE
  assert not stamp.exists()  # none rather than a torn one
  monkeypatch.undo()  # room on the disk again
  plan.claim(str(run_dir), "bbbb")
  assert json.loads(stamp.read_text()) == {"fingerprint": "bbbb"}
  assert (run_dir.parent / "lr0.001_seed0.stale-aaaa" / "result.json").exists()


def test_a_torn_json_is_read_as_absent_with_a_warning(tmp_path, caplog):
  path = tmp_path / "eval_before.json"
  path.write_text('{"retain_loss": 3.1, "task_lo')
  with caplog.at_level(logging.WARNING):
    assert files.read_json(path) is None
  assert f"{path} is not valid JSON" in caplog.text and "redone" in caplog.text
  assert files.read_json(tmp_path / "absent.json") is None


def test_a_torn_eval_before_is_measured_again(tmp_path, caplog):
  """A comparison's base evaluation cut short by an older version's crash is redone, not a
  JSONDecodeError at every rerun."""
  (tmp_path / "eval_before.json").write_text('{"retain_loss": 3.1, "task_lo')
  measured = {"retain_loss": 3.25, "task_loss": 4.5}
  with caplog.at_level(logging.WARNING):
    before = sweep._evaluate_base(lambda base: dict(measured), None, tmp_path)
  assert before == measured
  assert json.loads((tmp_path / "eval_before.json").read_text()) == measured
  assert "is not valid JSON" in caplog.text


def test_a_torn_result_makes_the_run_train_again(tmp_path):
  config = default.get_config()
  sweep_run = plan.planned_run("finch", config, 1e-3, 0, tmp_path)
  run_dir = tmp_path / "runs" / "finch" / "lr0.001_seed0"
  plan.claim(str(run_dir), sweep_run.fingerprint)
  (run_dir / "result.json").write_text('{"method": "finch", "task_loss": 1.2')  # cut short
  assert plan.planned_run("finch", config, 1e-3, 0, tmp_path).reuses is None
  files.write_json(run_dir / "result.json", {"method": "finch", "task_loss": 1.2})
  assert plan.planned_run("finch", config, 1e-3, 0, tmp_path).reuses == plan.KEPT_IN_WORKDIR


def test_a_torn_fingerprint_stamp_sets_the_run_aside(tmp_path):
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  (run_dir / configure.FINGERPRINT_FILE).write_text('{"fingerpr')
  (run_dir / "metrics.jsonl").write_text("{}\n")
  plan.claim(str(run_dir), "cccc")
  assert json.loads((run_dir / configure.FINGERPRINT_FILE).read_text()) == {"fingerprint": "cccc"}
  assert (tmp_path / "run.stale-unknown" / "metrics.jsonl").exists()  # kept, not deleted


def test_sample_arrays_round_trip_and_a_torn_cache_is_absent(tmp_path, caplog):
  arrays = [np.arange(5, dtype=np.int32), np.arange(3, dtype=np.int32) * 7]
  path = tmp_path / "base_samples-x.npz"
  files.write_arrays(path, arrays)
  got = files.read_arrays(path)
  assert [a.tolist() for a in got] == [[0, 1, 2, 3, 4], [0, 7, 14]]
  path.write_bytes(path.read_bytes()[:40])
  with caplog.at_level(logging.WARNING):
    assert files.read_arrays(path) is None
  assert "cannot be read" in caplog.text


def test_set_aside_never_renames_onto_an_existing_name(tmp_path):
  for n in range(3):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text(str(n))
    files.set_aside(tmp_path / "run", ".stale-aaaa")
  kept = {p.name: (p / "result.json").read_text() for p in tmp_path.iterdir()}
  assert kept == {"run.stale-aaaa": "0", "run.stale-aaaa-2": "1", "run.stale-aaaa-3": "2"}


def test_the_remote_path_test():
  assert files.is_remote("gs://bucket/run") and files.is_remote("s3://b/x")
  assert not files.is_remote("/tmp/run") and not files.is_remote("runs/gs:x")


def test_files_under_walks_directories_recursively(tmp_path):
  (tmp_path / "a" / "b").mkdir(parents=True)
  (tmp_path / "a" / "b" / "deep.txt").write_text("x")
  (tmp_path / "top.txt").write_text("y")
  assert files.files_under(tmp_path) == [str(tmp_path / "a/b/deep.txt"), str(tmp_path / "top.txt")]
  assert files.files_under(tmp_path / "top.txt") == [str(tmp_path / "top.txt")]
  assert files.files_under(tmp_path / "missing") == []
