"""The optimizer a config describes: base optimizer, schedule, clipping, anchoring, FINCH.

`make_optimizer(optimizer, finch, num_train_steps)` builds the chain

    clip_by_global_norm -> inject_hyperparams(adamw | sgd [+ anchor_to_init]) -> schedule -> FINCH

The peak learning rate sits in the optimizer state (`optax.inject_hyperparams`), not in the
compiled step, so one jitted step serves a whole learning-rate sweep; the schedule is a shape with
peak 1 that multiplies it. FINCH comes last, so it scales whatever the base optimizer proposes;
`finch_keywords` reads which of its readings the config names.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import optax

from finch_jax.remedies import anchor_to_init
from finch_jax.transform import DEFAULT_MAX_SCALE, finch, scale_by_finch

# FINCH's readings (what it compares the loss with; see `finch_jax.scale_by_finch`) by the name a
# config gives them, each with the one field it reads: the first finite loss, the mean of the
# first `reference_steps`, a running average of decay `reference_decay`, a target loss.
READINGS = {
  "first": None,
  "first_k": "reference_steps",
  "running": "reference_decay",
  "target": "reference_loss",
}


OPTIMIZERS = ("adamw", "sgd")

# (optimizer field, whether a value is valid, what is valid) of the optimizer's numbers.
_RANGES: tuple[tuple[str, Callable[[float], bool], str], ...] = (
  ("learning_rate", lambda v: v > 0, "a positive peak rate, e.g. 1e-3"),
  ("final_lr_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
  ("weight_decay", lambda v: v >= 0, ">= 0"),
  ("b1", lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.9"),
  ("b2", lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.95"),
  ("eps", lambda v: v > 0, "> 0, e.g. 1e-8"),
  ("momentum", lambda v: 0 <= v < 1, "in [0, 1); 0 for none"),
  ("grad_clip", lambda v: v >= 0, ">= 0; 0 disables clipping"),
  ("anchor_strength", lambda v: v >= 0, ">= 0 (0: off)"),
)

# What a config's `finch` block may hold: `enabled`, the reading and `scale_by_finch`'s options.
_FINCH_PARAMETERS = inspect.signature(scale_by_finch).parameters
FINCH_OPTIONS = tuple(sorted({*_FINCH_PARAMETERS, "reading"}))


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def optimizer_problems(optimizer: Mapping[str, Any], num_train_steps: int) -> list[tuple[str, str]]:
  """(field of `optimizer`, what is wrong and the fix) for each problem `make_optimizer` would
  meet: a number out of its range, a bad warm-up or schedule, an unknown name. Builds nothing.

  Args:
    optimizer: as for `make_optimizer` (a config's `optimizer` block).
    num_train_steps: the run's length, for the schedule.
  """
  o = dict(optimizer)
  problems = [
    (key, f"must be {requirement}.")
    for key, ok, requirement in _RANGES
    if key in o and not (_is_number(o[key]) and ok(o[key]))
  ]
  if "learning_rate" not in o:
    problems.append(("learning_rate", f"must be set: {_RANGES[0][2]}."))
  warmup = o.get("warmup_steps", 0)
  if not isinstance(warmup, numbers.Integral) or isinstance(warmup, bool) or warmup < 0:
    return [*problems, ("warmup_steps", "must be an integer >= 0.")]
  try:
    schedule_shape(
      o.get("schedule", "constant"), num_train_steps, warmup, o.get("final_lr_fraction", 0.0)
    )
  except ValueError as error:
    return [*problems, ("schedule", str(error))]
  if not problems and o.get("name", "adamw") not in OPTIMIZERS:
    problems.append(("name", f"Unknown optimizer {o.get('name')!r}: use 'adamw' or 'sgd'."))
  return problems


def finch_problems(
  finch_options: Mapping[str, Any], flag: Callable[[str], str] = lambda path: f"--config.{path}"
) -> list[tuple[str, str]]:
  """(field of `finch_options`, what is wrong and the fix) for the first problem FINCH's
  options hold (`finch_keywords`, then `scale_by_finch`'s own ranges); [] when FINCH is off
  or they are fine. Options that are not in `FINCH_OPTIONS` are left out. `flag(path)` names
  the flag that sets `finch.<field>` in the fix."""
  options = {k: v for k, v in finch_options.items() if k in FINCH_OPTIONS}
  if not finch_options.get("enabled", False):
    return []
  try:
    keywords = finch_keywords(options)
  except ValueError as error:  # messages start with the field to change
    field = str(error).split()[0]
    return [(field if options.get(field) is not None else "reading", str(error))]
  try:
    scale_by_finch(**keywords)
  except (TypeError, ValueError) as error:  # scale_by_finch's range checks name the option first
    field = str(error).split()[0]
    if field not in options:
      return [("", str(error))]
    # A reading's own field has no default: its reading needs it set.
    default = _FINCH_PARAMETERS[field].default
    default = "" if field in READINGS.values() else f" (default: {default!r})"
    return [(field, f"{error} Set {flag(f'finch.{field}')} accordingly{default}.")]
  return []


def schedule_shape(
  kind: str, num_train_steps: int, warmup_steps: int = 0, final_fraction: float = 0.0
) -> optax.Schedule:
  """A learning-rate schedule with peak 1: linear warm-up, then `constant` or `cosine` decay."""
  if kind not in ("constant", "cosine"):
    raise ValueError(f"Unknown schedule {kind!r}: use 'constant' or 'cosine'.")
  if kind == "constant":
    after = optax.constant_schedule(1.0)
  else:
    decay_steps = max(num_train_steps - warmup_steps, 1)
    after = optax.cosine_decay_schedule(1.0, decay_steps, alpha=final_fraction)
  if warmup_steps <= 0:
    return after
  warmup = optax.linear_schedule(0.0, 1.0, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(
  optimizer: Mapping[str, Any], finch_options: Mapping[str, Any] | None, num_train_steps: int
) -> tuple[optax.GradientTransformationExtraArgs, optax.Schedule]:
  """The optimizer a config asks for, and its schedule shape (peak 1).

  Args:
    optimizer: `name` ('adamw' or 'sgd'), `learning_rate` (peak), `schedule`, `warmup_steps`,
      `final_lr_fraction`, `weight_decay`, `b1`, `b2`, `eps` (adamw), `momentum` (sgd),
      `grad_clip` (global norm; 0 disables) and `anchor_strength`: when > 0, each step also
      moves the weights `learning_rate * anchor_strength` of the way back to where fine-tuning
      started (`finch_jax.remedies.anchor_to_init`, decoupled like AdamW's weight decay; its
      state holds a copy of the starting weights).
    finch_options: None or a mapping with `enabled`, `reading` and the keyword arguments of
      `finch_jax.finch` (read by `finch_keywords`); when enabled, FINCH scales the base
      optimizer's updates.
    num_train_steps: length of the run, for decaying schedules.

  Returns:
    (optimizer, schedule shape). The effective learning rate at step t is
    `learning_rate * shape(t)`, times FINCH's scale when it is on.
  """
  o = dict(optimizer)
  if problems := optimizer_problems(o, num_train_steps):
    field, message = problems[0]
    raise ValueError(f"optimizer.{field}={o.get(field)!r}: {message}")
  shape = schedule_shape(
    o.get("schedule", "constant"),
    num_train_steps,
    o.get("warmup_steps", 0),
    o.get("final_lr_fraction", 0.0),
  )
  name = o.get("name", "adamw")
  anchor = o.get("anchor_strength", 0.0)
  if name == "adamw":
    core = optax.inject_hyperparams(_anchored_adamw if anchor else optax.adamw)(
      learning_rate=o["learning_rate"],
      b1=o.get("b1", 0.9),
      b2=o.get("b2", 0.95),
      eps=o.get("eps", 1e-8),
      weight_decay=o.get("weight_decay", 0.0),
      **({"anchor_strength": anchor} if anchor else {}),
    )
  else:  # sgd
    core = optax.inject_hyperparams(_anchored_sgd if anchor else optax.sgd)(
      learning_rate=o["learning_rate"],
      momentum=o.get("momentum", 0.9) or None,
      **({"anchor_strength": anchor} if anchor else {}),
    )
  parts = [optax.clip_by_global_norm(o["grad_clip"])] if o.get("grad_clip", 0) else []
  base = optax.chain(*parts, core, optax.scale_by_schedule(shape))
  if finch_options and finch_options.get("enabled", False):
    return finch(base, **finch_keywords(finch_options)), shape
  return optax.with_extra_args_support(base), shape


def finch_keywords(finch_options: Mapping[str, Any]) -> dict[str, Any]:
  """The keyword arguments of `finch_jax.finch` that a config's `finch` block describes.

  `reading` ('first' when absent) names what FINCH compares the loss with (`READINGS`); the
  one field that reading reads is passed on, and the other readings' fields must be unset
  (None), so a config says which reading it means. The remaining fields (`loss_floor`,
  `min_scale`, `max_scale`, `ema_decay`, ...) pass through; `enabled` is dropped.

  Raises:
    ValueError: starting with the field to change, for an unknown reading, a reading without
      its field, another reading's field set, 'running' with no decay, or 'target' with
      `max_scale` above 1.
  """
  options = {k: v for k, v in finch_options.items() if k != "enabled"}
  reading = options.pop("reading", "first")
  if reading not in READINGS:
    raise ValueError(
      f"reading {reading!r} is not one of FINCH's readings: use one of "
      f"{', '.join(map(repr, READINGS))}."
    )
  given = {field: options.pop(field, None) for field in READINGS.values() if field}
  field = READINGS[reading]
  for name, other in READINGS.items():
    if other and other != field and given[other] is not None:
      raise ValueError(
        f"{other} ({given[other]}) is read only by reading {name!r}, not by {reading!r}: "
        f"set finch.reading={name!r}, or leave finch.{other} unset."
      )
  if field is None:
    return options
  value = given[field]
  if value is None:
    raise ValueError(f"{field} must be set for reading {reading!r}: {_NEEDS[field]}")
  if reading == "running" and not value:
    raise ValueError(f"{field} must be in (0, 1) for reading 'running': {_NEEDS[field]}")
  if reading == "target" and float(options.get("max_scale", DEFAULT_MAX_SCALE)) > 1:
    raise ValueError(
      f"max_scale ({options.get('max_scale', DEFAULT_MAX_SCALE)}) above 1 lets reading 'target' "
      "raise the rate above the base rate once the loss is below the target: set "
      "finch.max_scale=1."
    )
  return {**options, field: value}


_NEEDS = {
  "reference_steps": "set finch.reference_steps to how many first losses to average, e.g. 8.",
  "reference_decay": "set finch.reference_decay to the running average's decay, e.g. 0.99.",
  "reference_loss": "set finch.reference_loss to the target task loss.",
}


def _anchored_adamw(
  learning_rate, b1, b2, eps, weight_decay, anchor_strength
) -> optax.GradientTransformation:
  """AdamW with a decoupled pull toward the starting weights beside its weight decay."""
  return optax.chain(
    optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
    optax.add_decayed_weights(weight_decay),
    anchor_to_init(anchor_strength),
    optax.scale_by_learning_rate(learning_rate),
  )


def _anchored_sgd(learning_rate, momentum, anchor_strength) -> optax.GradientTransformation:
  """SGD (with momentum) plus a decoupled pull toward the starting weights."""
  # None when there is no momentum; a number, or under inject_hyperparams an array, when there is.
  parts = [optax.trace(decay=momentum)] if momentum is not None else []
  return optax.chain(
    *parts, anchor_to_init(anchor_strength), optax.scale_by_learning_rate(learning_rate)
  )


__all__ = [
  "FINCH_OPTIONS",
  "OPTIMIZERS",
  "READINGS",
  "finch_keywords",
  "finch_problems",
  "make_optimizer",
  "optimizer_problems",
  "schedule_shape",
]
