"""The comparison of configs/compare.py on real text: English fortunes, then German ones.

Debian's fortune databases are the corpus (about 2.5 MB of English quotations, jokes and
aphorisms; 2.9 MB of German ones). Install them, then run:

  sudo apt-get install fortunes fortunes-de   # also fortunes-es, fortunes-it
  python train.py --config configs/fortunes.py --workdir workdir/fortunes

The base (the tiny byte-level transformer of configs/default.py) is pretrained on the English
files; every method then fine-tunes it on the German ones, and forgetting is the rise of the
loss on held-out English fortunes (5% of them, chosen by a hash of the text). Records are the
texts between lines holding only "%" (`unit="percent"` of the local-text builder; the `.u8`
files are the UTF-8 ones). For Spanish or Italian set `--config.data.name` (and the task and
replay specs follow) to `local_text:/usr/share/games/fortunes/es/*.u8`, or the Italian files.
About 30 minutes on two CPU cores.
"""

import ml_collections

from configs import compare
from finch_jax.data.builders import options_key

ENGLISH = "local_text:/usr/share/games/fortunes/*.u8"
GERMAN = "local_text:/usr/share/games/fortunes/de/*.u8"
FORTUNE_OPTIONS = {"unit": "percent", "validation_fraction": 0.05}


def get_config() -> ml_collections.ConfigDict:
  """Pretrain on English fortunes, fine-tune on German ones, compare every method."""
  config = compare.get_config()
  config.data.name = GERMAN  # what fine-tuning learns ("" in a spec means this)
  config.data.options = {
    options_key(ENGLISH): FORTUNE_OPTIONS,
    options_key(GERMAN): FORTUNE_OPTIONS,
  }
  config.data.train = {"name": "", "split": "train"}
  config.data.eval_sets = {
    "task": {"name": "", "split": "validation"},
    "retain": {"name": ENGLISH, "split": "validation"},
  }
  config.data.fact_sets = {}
  config.data.eval_examples = 300
  config.compare.pretrain.num_train_steps = 1500
  config.compare.pretrain.checkpoint_every = 500
  config.compare.pretrain.data = {"train": {"name": ENGLISH, "split": "train"}, "batch_size": 32}
  methods = compare.methods()
  for spec in methods.values():
    if spec.get("replay", {}).get("data", {}).get("name") == "":
      spec["replay"] = {**spec["replay"], "data": {"name": ENGLISH, "split": "train"}}
  config.compare.methods = methods
  return config
