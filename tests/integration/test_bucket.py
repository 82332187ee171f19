"""Workdirs in a bucket: `--workdir gs://BUCKET/run` writes every file there and nothing locally,
resumes after SIGTERM bit for bit, keeps the previous checkpoint when a write fails, and a
bucket that is missing, read-only or reached without credentials is named before anything
compiles.

The bucket is a GCS-compatible server on 127.0.0.1 (gcp-storage-emulator, from the test extra),
started in this process for the module, one bucket per test. Each client finds it through its
own variable: gcsfs (epath's `gs://`: metrics, TensorBoard's events, reports, the data set's
upload) and google-cloud-storage (orbax's bucket calls) through STORAGE_EMULATOR_HOST,
TensorStore (orbax's arrays) through TENSORSTORE_GCS_HTTP_URL, array_record's reader through
CLOUD_STORAGE_EMULATOR_ENDPOINT. None of them needs credentials there, and the variables below
keep every credential lookup on the machine.
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

# gcsfs picks its file system when imported: by default one that first asks a gRPC control API
# for the bucket's layout, which the emulator does not serve (it serves the JSON API, which is
# what the other one uses). The `train.py` processes get the same from the fixture's variables.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import fsspec  # noqa: E402
import gcsfs  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from gcp_storage_emulator import server as emulator  # noqa: E402
from gcp_storage_emulator.handlers import objects  # noqa: E402

from configs import pretrain_tiny  # noqa: E402
from finch_jax import configure, plan, report, run  # noqa: E402
from finch_jax.checkpoint import Checkpointer, CheckpointError  # noqa: E402
from finch_jax.loop import MetricsWriter  # noqa: E402
from finch_jax.trainer import TrainState  # noqa: E402
from finch_jax.validate import ConfigError, validate  # noqa: E402
from tests.integration import test_drills  # noqa: E402
from tests.unit.test_report import BEFORE, RUNS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# configs/pretrain_tiny.py shrunk to seconds; log_every=2 is what test_drills.run_leg expects.
NUM_STEPS = 12
# The drills' small model and data; their mode, evaluations and checkpoint count left out.
OVERRIDES = {
  **{
    k: v
    for k, v in test_drills.OVERRIDES.items()
    if k not in ("mode", "eval_every", "keep_checkpoints")
  },
  "num_train_steps": NUM_STEPS,
  "optimizer.warmup_steps": 2,
}


def tiny_config(**changes):
  """The config the `train.py` legs read from CONFIG_TEMPLATE, built here."""
  config = pretrain_tiny.get_config()
  for key, value in {**OVERRIDES, **changes}.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config


# ----- the emulator ----------------------------------------------------------------------------


class Emulator:
  """The GCS-compatible server, and buckets whose writes it refuses (HTTP 403)."""

  def __init__(self, port: int):
    self.url = f"http://127.0.0.1:{port}"
    self.read_only: set[str] = set()
    self.fs = gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True, use_listings_cache=False)

  def bucket(self, name: str) -> str:
    """A new empty bucket; returns its name."""
    self.fs.mkdir(name)
    return name

  def files(self, prefix: str) -> list[str]:
    """Every object under `gs://PREFIX`, as paths relative to it."""
    return sorted(path.removeprefix(prefix + "/") for path in self.fs.find(prefix))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _bucket_of(path: str) -> str:
  """The bucket a JSON-API or upload request path names (`.../b/BUCKET/o...`)."""
  match = re.search(r"/b/([^/?]+)", path)
  return match.group(1) if match else path.lstrip("/").split("/", 1)[0]


def _patch_emulator(monkeypatch, state: dict) -> None:
  """What the emulator lacks, and the fault this file injects.

  - Downloads carry `x-goog-generation`, as GCS's do: TensorStore takes an object's generation
    from it and conditions its next write of that object on it (OCDBT's manifest), which fails
    with "Malformed StorageGeneration" without it.
  - A request that would change a bucket listed in `read_only` gets 403, as GCS answers a caller
    without write permission; its body is read first so that the client sees the answer.
  - The emulator has no `moveTo` (an object's rename) and answers 501, which gcsfs retries for
    half a minute before it copies and deletes instead; a 400 makes it do that at once.
  """
  download = objects.download

  def with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # not found: the response already says so
      return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", 1))

  handlers = tuple(
    (regex, {m: with_generation if h is download else h for m, h in methods.items()})
    for regex, methods in emulator.HANDLERS
  )
  monkeypatch.setattr(objects, "download", with_generation)  # `objects.get` calls it by name
  monkeypatch.setattr(emulator, "HANDLERS", handlers)

  handle = emulator.Router.handle

  def answer(request, code: int, message: str) -> None:
    request.rfile.read(int(request.headers.get("Content-Length") or 0))
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    request.send_response(code)
    request.send_header("Content-Type", "application/json")
    request.send_header("Content-Length", str(len(body)))
    request.end_headers()
    request.wfile.write(body)

  def intercepting(router, method):
    request = router._request_handler
    if method != "GET" and _bucket_of(request.path) in state["emulator"].read_only:
      answer(request, 403, "Permission denied (test).")
    elif "/moveTo/" in request.path:
      answer(request, 400, "moveTo is not served here.")
    else:
      handle(router, method)

  monkeypatch.setattr(emulator.Router, "handle", intercepting)


@pytest.fixture(scope="module")
def gcs():
  """The emulator on a free loopback port, and this process's clients pointed at it."""
  assert gcsfs.GCSFileSystem is gcsfs.core.GCSFileSystem, "gcsfs was imported before this file"
  with pytest.MonkeyPatch.context() as monkeypatch:
    state: dict = {}
    _patch_emulator(monkeypatch, state)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    for name, value in {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # array_record's reader (google-cloud-cpp)
      "TENSORSTORE_GCS_HTTP_URL": url,  # orbax's arrays
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore's token; the emulator takes any
      "FSSPEC_GCS_TOKEN": "anon",  # gcsfs in the `train.py` processes: no credential lookup
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # see the imports
      # Should anything still look for credentials, it finds none and asks no metadata server.
      "NO_GCE_CHECK": "true",
      "GCE_METADATA_HOST": "127.0.0.1:9",
      "GCE_METADATA_IP": "127.0.0.1:9",
    }.items():
      monkeypatch.setenv(name, value)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    # fsspec read FSSPEC_* when it was imported, maybe before this fixture: the same here. No
    # listing cache: this process reads what the `train.py` processes write.
    monkeypatch.setitem(fsspec.config.conf, "gcs", {"token": "anon", "use_listings_cache": False})
    instance = emulator.create_server("127.0.0.1", port, in_memory=True)
    instance.start()
    try:
      state["emulator"] = Emulator(port)
      yield state["emulator"]
    finally:
      gc.collect()  # anything that still uploads when collected does it while there is a server
      instance.stop()


# ----- a whole run in a bucket -----------------------------------------------------------------


@pytest.mark.slow
def test_a_run_in_a_bucket_resumes_bit_for_bit_and_writes_nothing_locally(gcs, tmp_path):
  """`python train.py --workdir gs://BUCKET/run`, SIGTERM after step 6, the same command again:
  its metrics.jsonl holds the losses of a local run, bit for bit, its last checkpoint the same
  state, and the working directory and the temporary one hold nothing of it."""
  legs, scratch = tmp_path / "legs", tmp_path / "tmp"  # the legs' working and temporary dirs
  legs.mkdir()
  scratch.mkdir()
  (legs / "driver.py").write_text(test_drills.DRIVER)
  config_file = test_drills.CONFIG_TEMPLATE.format(
    base="pretrain_tiny", overrides=json.dumps(OVERRIDES)
  )
  (legs / "drill_config.py").write_text(config_file)
  env = {
    **os.environ,
    "TMPDIR": str(scratch),
    # Compiled once, loaded by the second leg (a loaded program is the same program).
    "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }
  bucket = gcs.bucket("finch-run")
  workdir = f"gs://{bucket}/run"

  code, log = test_drills.run_leg(str(legs), workdir, 6, signal.SIGTERM, env)
  assert code == 128 + signal.SIGTERM, log
  assert f"Stopped by SIGTERM after step 7: the checkpoint of step 7 is in {workdir}" in log, log
  assert "Traceback" not in log, log
  code, log = test_drills.run_leg(str(legs), workdir, NUM_STEPS, signal.SIGTERM, env)
  assert code == 0, log
  assert "Traceback" not in log, log

  # The same config run here, in a local workdir: the yardstick.
  local = str(tmp_path / "local")
  config = tiny_config(**{"data.data_dir": str(tmp_path / "data")})
  reference = run.pretrain(config, local)
  got, want = test_drills.records(workdir), test_drills.records(local)
  assert sorted(got) == sorted(want)
  assert got == want  # every loss (and evaluation) bit for bit, no step logged twice
  trainer = configure.make_trainer(config)
  test_drills.assert_same_state(
    _restored(f"{workdir}/checkpoints", trainer.abstract_state(), NUM_STEPS), reference.state
  )

  files = gcs.files(f"{bucket}/run")
  assert "metrics.jsonl" in files
  assert sum(f.startswith("tensorboard/events.out.tfevents.") for f in files) == 2  # a leg each
  assert {f.split("/")[1] for f in files if f.startswith("checkpoints/")} == {"8", "12"}
  dataset_info = r"data/embedded_corpus/[^/]+/\d+\.\d+\.\d+/dataset_info\.json"
  assert any(re.fullmatch(dataset_info, f) for f in files), files
  # Nothing written locally: the legs' directory holds the test's own files (no `gs:` folder,
  # no workdir), and the temporary directory no file (the dataset was built there, uploaded and
  # deleted; TFDS leaves an empty directory per builder it makes, which is all that remains).
  scaffolding = {"driver.py", "drill_config.py", "__pycache__", "leg6.paused", "leg6.sent"}
  scaffolding |= {"leg6.log", f"leg{NUM_STEPS}.log"}
  assert set(os.listdir(legs)) <= scaffolding, sorted(os.listdir(legs))
  assert [f for _, _, names in os.walk(scratch) for f in names] == []


def _restored(directory: str, abstract_state: TrainState, step: int) -> TrainState:
  checkpointer = Checkpointer(directory, save_every=0)
  try:
    return jax.device_get(checkpointer.restore(abstract_state, step=step))
  finally:
    checkpointer.close()


# ----- the other files of a workdir ------------------------------------------------------------


def test_reports_metrics_and_sweep_records_are_kept_in_the_bucket(gcs):
  """The report and its plots, metrics.jsonl cut back to the step a run resumes from, and a
  sweep run's fingerprint, with a run of another fingerprint renamed aside (not deleted)."""
  bucket = gcs.bucket("finch-files")
  workdir = f"gs://{bucket}/wd"
  report.write_report(workdir, report.build_report("standard", BEFORE, RUNS))
  files = gcs.files(f"{bucket}/wd")
  assert files == ["curves.png", "frontier.png", "relative_change.png", "report.json", "report.md"]
  assert gcs.fs.cat(f"{bucket}/wd/frontier.png").startswith(b"\x89PNG")
  assert json.loads(gcs.fs.cat(f"{bucket}/wd/report.json"))["baseline"] == "standard"

  writer = MetricsWriter(workdir)
  for step in (2, 4, 6):
    writer.write(step, {"loss": step / 10})
  writer.close()
  writer = MetricsWriter(workdir, truncate_after=4)  # resumed from step 4: step 6 is redone
  writer.write(6, {"loss": 0.65})
  writer.close()
  lines = gcs.fs.cat(f"{bucket}/wd/metrics.jsonl").decode().splitlines()
  assert [json.loads(line) for line in lines] == [
    {"step": 2, "loss": 0.2},
    {"step": 4, "loss": 0.4},
    {"step": 6, "loss": 0.65},
  ]

  run_dir = f"{workdir}/runs/standard/lr0.001_seed0"
  plan.claim(run_dir, "first")
  gcs.fs.pipe(f"{run_dir}/result.json".removeprefix("gs://"), b"{}")
  plan.claim(run_dir, "first")  # the same fingerprint: kept as it is
  assert gcs.files(run_dir.removeprefix("gs://")) == [configure.FINGERPRINT_FILE, "result.json"]
  plan.claim(run_dir, "second")
  assert gcs.files(run_dir.removeprefix("gs://")) == [configure.FINGERPRINT_FILE]
  stale = f"{run_dir}.stale-first".removeprefix("gs://")
  assert gcs.files(stale) == [configure.FINGERPRINT_FILE, "result.json"]


def test_a_bucket_base_is_fingerprinted_and_runs_set_aside_never_collide(gcs):
  """The files of a base checkpoint in a bucket key the runs made from it; a config flipped
  A -> B -> A -> B keeps every old run under its own name (a rename onto a taken name would
  merge two runs' objects)."""
  bucket = gcs.bucket("finch-flips")
  weights = f"{bucket}/base/checkpoints/10/params/data"
  gcs.fs.pipe(weights, b"weights")
  config = configure.override(
    pretrain_tiny.get_config(), {"base_checkpoint": f"gs://{bucket}/base"}
  )
  key = configure.fingerprint(config)
  assert configure.fingerprint(config) == key
  gcs.fs.pipe(weights, b"weights trained further")
  assert configure.fingerprint(config) != key

  run_dir = f"gs://{bucket}/runs/lr0.001_seed0"
  for n, fingerprint in enumerate(["aaaa", "bbbb", "aaaa", "bbbb"]):
    plan.claim(run_dir, fingerprint)
    gcs.fs.pipe(f"{run_dir}/result.json".removeprefix("gs://"), str(n).encode())
  kept = {
    name: gcs.fs.cat(f"{bucket}/runs/{name}/result.json").decode()
    for name in {path.split("/")[0] for path in gcs.files(f"{bucket}/runs")}
  }
  assert kept == {
    "lr0.001_seed0": "3",
    "lr0.001_seed0.stale-aaaa": "0",
    "lr0.001_seed0.stale-aaaa-2": "2",
    "lr0.001_seed0.stale-bbbb": "1",
  }


# ----- a failed write --------------------------------------------------------------------------


def _state(step: int, value: float) -> TrainState:
  return TrainState(
    step=jnp.asarray(step, jnp.int32),
    params={"w": jnp.full((4, 3), value, jnp.float32)},
    opt_state={"mu": jnp.full((4, 3), -value, jnp.float32)},
    num_skipped=jnp.asarray(0, jnp.int32),
  )


def test_a_refused_write_in_a_bucket_names_the_step_to_resume_and_keeps_the_last_checkpoint(gcs):
  """The bucket refuses every write during the save of step 8 (as a revoked permission or a
  failing link would make it fail): CheckpointError names the bucket, the fix and step 4, which
  is still complete and restores exactly."""
  bucket = gcs.bucket("finch-faulty")
  directory = f"gs://{bucket}/run/checkpoints"
  checkpointer = Checkpointer(directory, save_every=4)
  assert checkpointer.maybe_save(4, _state(4, 1.0))
  checkpointer.close()

  checkpointer = Checkpointer(directory, save_every=4)
  gcs.read_only.add(bucket)
  try:
    with pytest.raises(CheckpointError) as error:
      checkpointer.maybe_save(8, _state(8, 2.0))
      checkpointer.close()  # an asynchronous save fails here at the latest
  finally:
    gcs.read_only.discard(bucket)
  message = str(error.value)
  assert f"Could not write the checkpoint of step 8 to {directory}" in message
  assert "Check the network and that these credentials may still write to that bucket" in message
  assert "it resumes from step 4" in message

  checkpointer = Checkpointer(directory, save_every=4)
  try:
    assert checkpointer.latest_step() == 4
    restored = jax.device_get(checkpointer.restore(_state(0, 0.0), step=4))
  finally:
    checkpointer.close()
  test_drills.assert_same_state(restored, jax.device_get(_state(4, 1.0)))


# ----- bad workdirs, named before anything compiles ---------------------------------------------


def _workdir_problem(workdir: str) -> str:
  with pytest.raises(ConfigError) as error:
    validate(tiny_config(), workdir)
  problems = error.value.problems
  assert len(problems) == 1, problems  # one line
  return problems[0]


def test_a_bucket_that_does_not_exist_is_named_with_the_command_that_makes_it(gcs):
  problem = _workdir_problem("gs://finch-no-such-bucket/run")
  assert problem.startswith("--workdir='gs://finch-no-such-bucket/run': the bucket ")
  assert "does not exist: create it (gcloud storage buckets create gs://finch-no-such-bucket" in (
    problem
  )
  assert not gcs.fs.exists("finch-no-such-bucket")  # and it was not made behind the user's back


def test_a_read_only_bucket_is_named_with_the_role_to_grant(gcs):
  bucket = gcs.bucket("finch-read-only")
  gcs.read_only.add(bucket)
  try:
    problem = _workdir_problem(f"gs://{bucket}/run")
  finally:
    gcs.read_only.discard(bucket)
  assert "is read-only for these credentials" in problem
  assert "roles/storage.objectUser" in problem and "or use another --workdir" in problem
  assert gcs.files(bucket) == []  # the check left nothing behind


def test_a_bucket_workdir_that_passes_leaves_nothing_behind(gcs):
  bucket = gcs.bucket("finch-writable")
  validate(tiny_config(), f"gs://{bucket}/run")
  assert gcs.files(bucket) == []


def test_a_file_in_place_of_a_local_workdir_is_named(tmp_path):
  (tmp_path / "wd").write_text("not a directory")
  problem = _workdir_problem(str(tmp_path / "wd"))
  assert "is a file, not a directory: move it or use another --workdir." in problem


@pytest.mark.slow
def test_a_bucket_without_credentials_is_named_by_train_py_before_anything_runs(tmp_path):
  """No emulator, no key file, no gcloud login, not on a Google VM: `train.py` stops with one
  line naming the fix, before any request leaves the machine, and writes nothing locally."""
  env = {
    k: v
    for k, v in os.environ.items()
    if k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")
  }
  home, cwd = tmp_path / "home", tmp_path / "cwd"
  home.mkdir()
  cwd.mkdir()
  env.update(
    HOME=str(home),  # no ~/.config/gcloud/application_default_credentials.json
    CLOUDSDK_CONFIG=str(home / "gcloud"),
    NO_GCE_CHECK="true",  # not a Compute Engine VM: no metadata server is asked
    GCE_METADATA_HOST="127.0.0.1:9",
    GCE_METADATA_IP="127.0.0.1:9",
    XLA_FLAGS="",
  )
  start = time.monotonic()
  result = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "train.py"),
      f"--config={os.path.join(ROOT, 'configs', 'pretrain_tiny.py')}",
      "--workdir=gs://finch-some-bucket/run",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=cwd,
    env=env,
  )
  assert result.returncode == 1, result.stderr[-3000:]
  assert "--workdir='gs://finch-some-bucket/run': no Google Cloud credentials found: run " in (
    result.stderr
  ), result.stderr[-3000:]
  assert "gcloud auth application-default login" in result.stderr
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert os.listdir(cwd) == []  # no `gs:` folder, no workdir
  assert time.monotonic() - start < 120
