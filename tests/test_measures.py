"""The further measures of what fine-tuning changed: token accuracy, KL to the base, calibration."""

import numpy as np
import pytest

from finch_jax import configure, run
from finch_jax.measures import expected_calibration_error
from tests.test_trainer import small_config


def test_expected_calibration_error_by_hand():
  # Bin sums [facts, summed confidence, facts right] over 10 bins: 2 facts at confidence 0.95,
  # one right (accuracy 0.5, gap 0.45), and 2 at 0.25, both right (gap 0.75).
  sums = np.zeros((3, 10))
  sums[:, 9] = [2, 1.9, 1]
  sums[:, 2] = [2, 0.5, 2]
  assert expected_calibration_error(sums) == pytest.approx(0.5 * 0.45 + 0.5 * 0.75)
  assert np.isnan(expected_calibration_error(np.zeros((3, 10))))


def test_evaluator_measures_accuracy_kl_and_calibration(tmp_path):
  config = small_config(
    **{
      "data.token_accuracy": True,
      "data.kl_sets": ("retain",),
      "data.calibration_sets": ("task", "retain"),
    }
  )
  trainer = configure.make_trainer(config)
  base = trainer.init_params(0)
  evaluator = run.Evaluator(config, str(tmp_path), trainer, base=base)
  at_base = evaluator(base)
  assert at_base["retain_kl"] == pytest.approx(0.0, abs=1e-6)  # the base against itself
  assert "task_kl" not in at_base
  for key in ("task_accuracy", "retain_accuracy", "task_ece", "retain_ece"):
    assert 0.0 <= at_base[key] <= 1.0, key
  # The plain loss and the measured one agree.
  plain = trainer.evaluate(base, evaluator.loss_sets["retain"])
  assert at_base["retain_loss"] == pytest.approx(plain)
  other = evaluator(trainer.init_params(1))
  assert other["retain_kl"] > 0.01  # another model predicts otherwise
