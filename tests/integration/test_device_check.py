"""benchmarks/device_check.py's dry run: every part runs on tiny shapes on the CPU, and the JSON
says which parts need a device."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARTS = ("mfu_llama_1b", "attention_cudnn", "memory_chunked", "mfu_qwen3_0_6b", "smollm2_knowledge")


@pytest.mark.slow
def test_dry_run_traces_every_part_and_names_what_needs_a_device(tmp_path):
  env = dict(os.environ)
  # One CPU device, as on a laptop (the suite's eight would split the tiny batch eight ways).
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
    "--xla_force_host_platform_device_count=8", ""
  )
  out = tmp_path / "dry.json"
  done = subprocess.run(
    [sys.executable, "benchmarks/device_check.py", "--out", str(out), "--dry_run"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stdout + done.stderr
  report = json.loads(out.read_text())
  assert report["dry_run"] and report["platform"] == "cpu"
  assert list(report["parts"]) == list(PARTS)
  assert report["needs_device"] == list(PARTS)
  statuses = {name: part["status"] for name, part in report["parts"].items()}
  assert statuses == dict.fromkeys(PARTS, "traced"), report["not_run"]
  assert report["wrong"] == {} and report["not_run"] == {}

  mfu = report["parts"]["mfu_llama_1b"]["result"]
  assert mfu["shape"] == "tiny" and mfu["finch_step_time_ratio"] > 0
  assert mfu["adamw"]["mfu"] is None  # no peak for a CPU

  attention = report["parts"]["attention_cudnn"]["result"]
  assert attention["implementation"] == "xla"  # cuDNN's call, through XLA's implementation
  for name, error in attention["error_against_float32"].items():
    assert 0 < error <= attention["tolerance"][name], name

  memory = report["parts"]["memory_chunked"]["result"]
  # Even at these sizes the chunked forms hold less than the whole logits or scores.
  assert memory["loss_chunked"]["temp_bytes"] < memory["loss_plain"]["temp_bytes"]
  assert memory["attention_chunked"]["temp_bytes"] < memory["attention_reference"]["temp_bytes"]
  assert memory["chunked_against_plain_error"]["loss"] < 1e-4

  assert report["parts"]["smollm2_knowledge"]["result"] == {"validated": True}


def test_without_an_accelerator_nothing_runs_and_the_exit_status_is_zero(tmp_path):
  out = tmp_path / "check.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(
    [sys.executable, "benchmarks/device_check.py", "--out", str(out)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stdout + done.stderr
  report = json.loads(out.read_text())
  assert set(report["not_run"]) == set(PARTS)
  assert all("no accelerator" in reason for reason in report["not_run"].values())
  assert "not run: mfu_llama_1b: no accelerator" in done.stdout
