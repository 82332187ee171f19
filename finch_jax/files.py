"""Files on a local disk or in a bucket (`gs://BUCKET/...`): which a path names, writes that no
reader sees half done, JSON and sample caches read back safely, and setting a directory aside.

Every file a rerun reads to decide what to reuse or skip is written here: a run's
`fingerprint.json` and `result.json`, a comparison's `eval_before.json`, reports, the base
model's sample caches, the rewritten `metrics.jsonl`. A process killed mid-write, or a full disk,
then leaves the previous file or none, never a torn one. A torn file left by an older version
is read as absent, with a warning naming it, so the work it recorded is redone rather than every
rerun failing until someone deletes it.

Paths are `etils.epath.Path`s, as orbax's are, so the same code serves both kinds of store. This
module imports nothing of the package.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import threading
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """Whether `path` names an object store (`gs://...`, `s3://...`) rather than the local disk."""
  return "://" in os.fspath(path)


@contextlib.contextmanager
def staged(paths: Sequence[str]) -> Iterator[list[str]]:
  """Temporary local names beside `paths`, for writers that only take a file name (safetensors,
  tokenizers); on leaving the block without an error each replaces its path (a rename), so a
  reader never sees a half-written file and a crash while writing leaves the old files as they
  were. Temporary files are removed either way."""
  temporaries = [f"{path}.tmp{os.getpid()}" for path in paths]
  try:
    yield temporaries
    for temporary, path in zip(temporaries, paths, strict=True):
      os.replace(temporary, path)
  finally:
    for temporary in temporaries:
      with contextlib.suppress(FileNotFoundError):
        os.remove(temporary)


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` so that no reader ever sees it half written.

  A local file is written beside its target under a temporary name, flushed to the disk and
  renamed over the old one: a crash or a full disk leaves the old file (or none) and removes the
  partial one when it can. A bucket's object is replaced whole by its upload or not at all, so it
  is written in place; there a rename would be a copy and a delete, no more atomic than that.
  """
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(path):
    path.write_bytes(data)
    return
  # One name per writer: the threads of a comparison may write beside each other.
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_text(path: PathLike, text: str) -> None:
  """`write_bytes` of `text` in UTF-8."""
  write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, value: Any, **dumps_options: Any) -> None:
  """`value` as JSON at `path`, written as `write_bytes` writes (options go to `json.dumps`)."""
  write_text(path, json.dumps(value, **dumps_options))


def read_json(path: PathLike) -> Any | None:
  """The JSON value at `path`; None when there is no file, or when it does not parse (a file cut
  short by a crash of an older version): that is logged as a warning and the file is then treated
  as absent, so what it recorded is redone and the file written again."""
  path = epath.Path(path)
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  try:
    return json.loads(text)
  except ValueError as error:
    logging.warning(
      "%s is not valid JSON (%s; cut short by an interrupted write?): treating it as absent, "
      "so what it recorded is redone.",
      path,
      error,
    )
    return None


def write_arrays(path: PathLike, arrays: list[np.ndarray]) -> None:
  """`arrays` as an .npz file at `path` (entries `s0`, `s1`, ...), written as `write_bytes`."""
  npz = io.BytesIO()  # numpy writes local paths or file objects; a bucket takes the bytes
  np.savez(npz, **{f"s{i}": a for i, a in enumerate(arrays)})
  write_bytes(path, npz.getvalue())


def read_arrays(path: PathLike) -> list[np.ndarray] | None:
  """The arrays `write_arrays` wrote at `path`, in order; None when there is no file, or when it
  cannot be read whole (logged as a warning, the file then treated as absent)."""
  path = epath.Path(path)
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    return None
  try:
    with np.load(io.BytesIO(data)) as stored:
      return [stored[f"s{i}"] for i in range(len(stored.files))]
  except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as error:
    logging.warning("%s cannot be read (%s): treating it as absent, so it is redone.", path, error)
    return None


def stat(path: PathLike) -> tuple[int, float]:
  """(size in bytes, modification time in seconds) of the file at `path`. Local times keep the
  file system's resolution (an edit within the same second shows); a bucket's are whole seconds."""
  if is_remote(path):
    result = epath.Path(path).stat()
    return int(result.length), float(result.mtime)
  result = os.stat(path)
  return result.st_size, result.st_mtime


def files_under(path: PathLike) -> list[str]:
  """Every file at or below `path`, recursively, sorted: `[path]` for a file, [] when nothing is
  there."""
  root = epath.Path(path)
  if not root.exists():
    return []
  if not root.is_dir():
    return [os.fspath(root)]
  # A bucket's walk names directories without their scheme (fsspec's paths): put it back.
  scheme = os.fspath(root).split("://")[0] + "://" if is_remote(root) else ""
  found = []
  for directory, _, names in root.walk():
    directory = os.fspath(directory)
    if scheme and not is_remote(directory):
      directory = scheme + directory
    found.extend(os.fspath(epath.Path(directory) / name) for name in names)
  return sorted(found)


def set_aside(path: PathLike, suffix: str) -> epath.Path:
  """Renames `path` to `NAME<suffix>` beside it, or, when that name is taken (a run set aside
  before under the same name, or a rename a crash cut short in a bucket), to `NAME<suffix>-2`,
  `-3`, ...: never onto something that exists, so two set-aside runs are never merged.

  In a bucket a rename copies each object and deletes the original: not atomic, and a process
  stopped during it leaves the old contents split between the two names, nothing lost. Call it on
  one process only (see `finch_jax.sharding.barrier` for the others).

  Returns:
    The new path.
  """
  path = epath.Path(path)
  target, n = path.with_name(f"{path.name}{suffix}"), 1
  while target.exists():
    n += 1
    target = path.with_name(f"{path.name}{suffix}-{n}")
  return path.rename(target)


_GCS_ROLE = "roles/storage.objectUser"  # create, read, list and delete objects: what a run does


def workdir_problem(workdir: str) -> str | None:
  """Why a run cannot write into `workdir`, naming the fix; None when it can. A local
  directory must be one (or be possible to make) where this user may write; a bucket
  (`gs://BUCKET/...`) must exist and take writes from these credentials (`_bucket_problem`).
  Another store of epath's (s3://, ...) is not checked: the run itself says what is wrong."""
  if workdir.startswith("gs://"):
    return _bucket_problem(workdir)
  if is_remote(workdir):
    return None
  path = epath.Path(os.path.abspath(workdir))
  existing = path
  while not existing.exists():  # where making the directories would start
    existing = existing.parent
  if not existing.is_dir():
    where = "is a file" if existing == path else f"cannot be made: {existing} is a file"
    return f"{where}, not a directory: move it or use another --workdir."
  # os.access has no counterpart in epath; it answers for local paths, which these are.
  if not os.access(existing, os.W_OK | os.X_OK):
    return (
      f"is read-only: this user cannot write in {existing}; make it writable (chmod, or a "
      "writable mount) or use another --workdir."
    )
  return None


def _bucket_problem(workdir: str) -> str | None:
  """A `gs://` workdir: the package that reaches it, credentials, the bucket, write access.

  The bucket is checked by writing and deleting one empty object in the workdir, which needs
  only the object permissions the run needs anyway (not the bucket's metadata), and tells a
  missing bucket (404) from one these credentials may not write to (403).
  """
  bucket = workdir.removeprefix("gs://").split("/", 1)[0]
  if importlib.util.find_spec("gcsfs") is None:
    return (
      'a gs:// workdir needs the gcs extra: pip install -e ".[gcs]" (gcsfs, google-cloud-storage).'
    )
  # An emulator (STORAGE_EMULATOR_HOST, as in the tests) takes requests without credentials.
  if not os.environ.get("STORAGE_EMULATOR_HOST"):
    import google.auth  # with the gcs extra; needed for a bucket only
    import google.auth.exceptions

    try:
      google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
      return (
        "no Google Cloud credentials found: run `gcloud auth application-default login`, or "
        "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (on a Cloud TPU or "
        "Compute Engine VM, give the VM a service account)."
      )
  probe = epath.Path(workdir) / f".finch_jax_write_check.{uuid.uuid4().hex}"
  try:
    probe.write_bytes(b"")
    probe.unlink()
  except FileNotFoundError:
    return (
      f"the bucket gs://{bucket} does not exist: create it (gcloud storage buckets create "
      f"gs://{bucket} --location=REGION, the region of the machines) or fix its name."
    )
  except Exception as error:  # gcsfs: OSError("Forbidden ...") for 403, HttpError(code) else
    return _bucket_refused(bucket, error)
  return None


def _bucket_refused(bucket: str, error: Exception) -> str:
  """Why writing into the bucket failed: rejected credentials, no write permission, or no
  connection."""
  text, code = " ".join(str(error).split())[:200], getattr(error, "code", None)
  if code == 401:
    return (
      f"these Google Cloud credentials are rejected ({text}): run `gcloud auth "
      "application-default login` again, or point GOOGLE_APPLICATION_CREDENTIALS at a valid "
      "key file."
    )
  if code == 403 or text.startswith("Forbidden"):
    return (
      f"is read-only for these credentials ({text}): grant them {_GCS_ROLE} on "
      f"gs://{bucket} (gcloud storage buckets add-iam-policy-binding gs://{bucket} "
      f"--member=ACCOUNT --role={_GCS_ROLE}), or use another --workdir."
    )
  return (
    f"cannot be reached ({text}): check the network and the bucket's name, or use a local "
    "--workdir."
  )


__all__ = [
  "files_under",
  "is_remote",
  "read_arrays",
  "read_json",
  "set_aside",
  "stat",
  "workdir_problem",
  "write_arrays",
  "write_bytes",
  "write_json",
  "write_text",
]
