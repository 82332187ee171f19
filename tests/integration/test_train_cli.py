"""train.py as a user meets it: a config error is one message with its fix, no traceback."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_bad_config_value_prints_its_message_without_a_traceback(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "train.py"),
      f"--workdir={tmp_path / 'wd'}",
      "--config.finch.min_scale=-1.0",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=tmp_path,
    env={**os.environ, "XLA_FLAGS": ""},
  )
  assert result.returncode == 1
  assert "finch.min_scale=-1.0" in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / "wd").exists()
