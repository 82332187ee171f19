"""The remedies as config options, end to end: replay share, KL on base samples, LoRA, compare."""

import json
import os

import jax
import numpy as np
import pytest

from finch_jax import configure, data, experiment, inputs, lora, sweep
from tests.integration.test_trainer import small_config


def _replay_config(**changes):
  return small_config(**{"replay.share": 0.25, "data.batch_size": 8, "data.seq_len": 64, **changes})


def test_replay_share_of_examples_in_batches(tmp_path):
  config = _replay_config()
  batches = iter(inputs.train_batches(config, str(tmp_path), seed=0))
  replayed = total = 0
  for _ in range(40):
    batch = next(batches)
    for row in range(batch["inputs"].shape[0]):
      ids = batch["segment_ids"][row]
      for segment in np.unique(ids[ids > 0]):
        marks = batch["replay"][row][ids == segment]
        assert marks.min() == marks.max()  # an example is replay data or not, as a whole
        replayed += int(marks[0])
        total += 1
  batches.close()
  assert total > 300
  assert abs(replayed / total - 0.25) < 0.05


def test_replay_examples_come_from_the_replay_split(tmp_path):
  config = _replay_config(**{"replay.share": 0.5})
  batch = next(iter(inputs.train_batches(config, str(tmp_path), seed=0)))
  tokenizer = configure.make_tokenizer(config)
  base_names = {r["text"].split(" was born")[0] for r in _split(config, tmp_path, "pretrain")}
  new_names = {r["text"].split(" was born")[0] for r in _split(config, tmp_path, "finetune")}
  ids = batch["segment_ids"][0]
  for segment in np.unique(ids[ids > 0]):
    where = ids == segment
    text = tokenizer.decode(batch["inputs"][0][where])
    pool = base_names if batch["replay"][0][where][0] else new_names
    assert any(name in text for name in pool if name), text


def _split(config, tmp_path, split):
  source = inputs.source(config, str(tmp_path), {"name": "", "split": split})
  return [{"text": data.decode_text(source[i]["text"])} for i in range(len(source))]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("base"))
  experiment.train_and_evaluate(small_config(mode="pretrain", num_train_steps=20), workdir)
  return workdir


def test_kl_on_base_samples_finetune_runs_and_logs_the_kl(tmp_path, base):
  config = small_config(
    mode="finetune",
    base_checkpoint=base,
    **{
      "replay.share": 0.2,
      "replay.data": {"name": "base_samples"},
      "replay.kl_weight": 1.0,
      "replay.num_samples": 8,
      "replay.sample_len": 24,
    },
  )
  report = experiment.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  kls = [r["kl"] for r in records if "kl" in r]
  assert kls and all(np.isfinite(kls)) and max(kls) > 0
  samples = np.load(inputs.sample_cache(tmp_path, config, config.seed))
  assert len(samples.files) == 8
  assert np.isfinite(report["methods"]["finch"]["forgetting"])


def test_lora_finetune_trains_adapters_only_and_checkpoints_them(tmp_path, base):
  config = small_config(mode="finetune", base_checkpoint=base, **{"lora.rank": 2})
  trainer = configure.make_trainer(config)
  abstract = trainer.abstract_state()
  expected = lora.expected_num_params(trainer.model_config, configure.lora_config(config))
  assert lora.num_params(abstract.params) == expected
  report = experiment.train_and_evaluate(config, str(tmp_path))
  entry = report["methods"]["finch"]
  # The base's weights were not trained, only the adapters: the task loss still moved.
  assert (
    entry["task_loss"]
    < json.load(open(os.path.join(tmp_path, "report.json")))["before"]["task_loss"]
  )


def test_compare_runs_every_method_and_reports_costs(tmp_path):
  config = small_config(
    num_train_steps=4,
    eval_every=0,
    **{
      "compare.seeds": (0,),
      "replay.num_samples": 4,
      "replay.sample_len": 16,
      "data.calibration_sets": ("retain",),
    },
  )
  config.compare.pretrain = {"num_train_steps": 10, "eval_every": 0, "checkpoint_every": 10}
  rates = (1e-3, 3e-3)
  config.compare.methods = {
    "standard": {"finch": {"enabled": False}, "learning_rates": rates},
    "finch": {"finch": {"enabled": True}, "learning_rates": rates},
    "replay": {"finch": {"enabled": False}, "replay": {"share": 0.2}, "learning_rates": rates},
    "kl_base+finch": {
      "replay": {"share": 0.2, "data": {"name": "base_samples"}, "kl_weight": 1.0},
      "learning_rates": rates,
    },
    "anchor": {
      "finch": {"enabled": False},
      "optimizer": {"anchor_strength": 1.0},
      "learning_rates": rates,
    },
    "lora": {"finch": {"enabled": False}, "lora": {"rank": 2}, "learning_rates": rates},
  }
  report = sweep.compare(config, str(tmp_path))
  assert set(report["methods"]) <= set(config.compare.methods)
  runs = report["runs"]
  assert {r["method"] for r in runs} == set(config.compare.methods)
  held = {r["method"]: r["held_bytes"] for r in runs}
  params = sum(
    x.size * 4 for x in jax.tree.leaves(configure.make_trainer(config).abstract_state().params)
  )
  # Anchoring keeps one copy of the weights more; KL keeps the base model; LoRA trains adapters
  # of a frozen base, so its optimizer state is small.
  assert held["anchor"] - held["standard"] == params
  kl_config = configure.method_configs(config)["kl_base+finch"]
  samples = np.load(inputs.sample_cache(tmp_path / "base", kl_config, kl_config.seed))
  assert held["kl_base+finch"] - held["finch"] == params + sum(x.nbytes for x in samples.values())
  assert held["lora"] < held["standard"]
  # Step times come from an interleaved timing of every method in the same process.
  ratios = {name: m["step_time_ratio"] for name, m in report["methods"].items()}
  assert ratios["standard"] == 1.0 and all(0.2 < r < 10 for r in ratios.values())
  # Calibration before and after, with the reliability diagram's data, in every run's summary.
  for r in runs:
    for when in ("before", "after"):
      diagram = r[f"retain_reliability_{when}"]
      assert sum(diagram["share"]) == pytest.approx(1.0), (r["method"], when)
      assert r[f"retain_ece_{when}"] >= 0.0
  for name in ("report.json", "report.md", "frontier.png", "curves.png", "reliability.png"):
    assert os.path.exists(tmp_path / name)
