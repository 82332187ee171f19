"""Train, fine-tune or compare from a config file.

python train.py                                  # configs/default.py into ./workdir/default
python train.py --config configs/NAME.py --workdir DIR [--config.key=value ...]

Several processes (one per host, or several on one machine):
python train.py ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I
On a TPU pod, SLURM or Kubernetes the cluster's environment is read instead.
"""

import logging as pylogging
import os
import sys
from typing import Any, NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # `configs` is importable from any working directory.


def _exit_unknown_field(error: Exception) -> NoReturn:
  """Ends the run on a `--config.a.b` that names no field, in one line instead of a traceback."""
  detail: Any = error
  while isinstance(detail, BaseException) and detail.args:
    detail = detail.args[0]
  key, _, hint = str(detail).partition("\n")
  key = key.strip("'\"")
  given = [arg.split("=", 1)[0] for arg in sys.argv[1:] if arg.startswith("--config.")]
  named = [arg for arg in given if key in arg.split(".")[1:]] or given
  sys.exit(
    f"FATAL Flags parsing error: {', '.join(named)}: the config has no field {key!r}. {hint}\n"
    "Every field is listed, with a comment, in configs/default.py."
  )


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError) as error:  # --config.a.b with an unknown field
    _exit_unknown_field(error)


try:
  config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "configs", "default.py"), "Experiment config file."
  )
except (KeyError, AttributeError) as error:  # without --config the overrides are parsed here
  _exit_unknown_field(error)
flags.DEFINE_string("workdir", os.path.join("workdir", "default"), "Where the run writes.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
FLAGS = flags.FLAGS


class _NotCustomDataConfiguration(pylogging.Filter):
  def filter(self, record: pylogging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")


def _one_device_per_core(config) -> None:
  """A comparison on one machine trains one run per CPU core at once (`compare.concurrent_runs`
  0): XLA:CPU then trains faster than one run over all cores. JAX makes the cores devices only
  if told before it starts, so this sets XLA_FLAGS, unless they already give a device count or
  the run spans several processes. The count divides every batch size of the comparison, so the
  base model's pretraining can spread its batch over the same devices."""
  flags_now = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in flags_now or FLAGS.num_processes:
    return
  if config.get("mode") != "compare" or config.get("compare", {}).get("concurrent_runs", 0):
    return
  pretrain = config.compare.get("pretrain", {}) or {}
  batches = [config.data.batch_size, pretrain.get("data", {}).get("batch_size", 0)]
  count = len(os.sched_getaffinity(0))
  while count > 1 and any(b % count for b in batches):
    count -= 1
  if count > 1:
    os.environ["XLA_FLAGS"] = f"{flags_now} --xla_force_host_platform_device_count={count}".strip()


def main(argv):
  del argv
  _one_device_per_core(FLAGS.config)
  # Imported here, after flag parsing: JAX reads XLA_FLAGS and the platform when first imported.
  from finch_jax import experiment, sharding
  from finch_jax.validate import ConfigError

  sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
  # TFDS warns "Using custom data configuration" each time a dataset with builder options is
  # opened (every run of a sweep): nothing a user can act on, so it is not shown.
  logging.get_absl_logger().addFilter(_NotCustomDataConfiguration())
  try:
    experiment.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except ConfigError as error:  # its message names every problem and its fix: no traceback
    sys.exit(f"FATAL {error}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
