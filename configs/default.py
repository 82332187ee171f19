"""The embedded demo: pretrain a tiny base, fine-tune it with and without FINCH, compare fairly.

`python train.py` runs this. It builds the embedded biographies dataset, pretrains a ~0.4M
parameter transformer on the base population (cached in WORKDIR/base), then fine-tunes it on a
new population with AdamW alone and with FINCH around the same AdamW, each over a learning-rate
sweep and two seeds, and reports forgetting at matched task loss. It is sized to finish in about
five minutes on two CPU cores (50 people a population); `full_size` gives the larger benchmark
of RESULTS.md (100 people a population, twice the rows a step), which configs/compare.py uses.
"""

import ml_collections

from finch_jax.models import LlamaConfig


def get_config() -> ml_collections.ConfigDict:
  """The default configuration; every other config starts from it."""
  config = ml_collections.ConfigDict()
  config.mode = "compare"  # "pretrain", "finetune" or "compare" (sweeps + matched report).
  config.seed = 0  # Parameter initialisation and data order.
  config.num_train_steps = 120  # Optimizer steps of one (fine-tuning) run.
  config.grad_accum_steps = 1  # Micro-batches per step; FINCH sees their mean loss.
  config.log_every = 20  # Steps between metrics records (metrics.jsonl, TensorBoard).
  config.eval_every = 60  # Steps between evaluations of the eval sets (and at the end).
  config.checkpoint_every = 120  # Steps between checkpoints (and at the end).
  config.keep_checkpoints = 2  # Checkpoints kept in WORKDIR/checkpoints.
  config.base_checkpoint = ""  # Workdir of the base model to fine-tune (mode "finetune").
  config.loss_chunk_size = 0  # Tokens per row whose logits the loss makes at once (0: all).

  config.data = ml_collections.ConfigDict()
  config.data.name = "embedded/biographies"  # Dataset: embedded/..., local_text:PATH or TFDS.
  config.data.data_dir = ""  # Where datasets are built; "" means WORKDIR/data.
  config.data.options = {  # Builder options per dataset (non-alphanumerics as "_").
    "embedded_biographies": {"num_base_people": 50, "num_new_people": 16},
  }
  config.data.train = {"name": "", "split": "finetune"}  # Training split ("" = data.name).
  # Named loss sets; forgetting = retain loss after - before. The tiny model memorises text
  # rather than generalising facts across phrasings, so its knowledge is read on the text it
  # learned (use "task_eval"/"retain_eval" for held-out phrasings with larger models).
  config.data.eval_sets = {
    "task": {"name": "", "split": "finetune"},
    "retain": {"name": "", "split": "pretrain"},
  }
  config.data.fact_sets = {  # Named fact-recall sets (accuracy of greedy completion).
    "task": {"name": "", "split": "task_facts"},
    "retain": {"name": "", "split": "retain_facts"},
  }
  config.data.seq_len = 128  # Tokens per row (byte-level tokenizer).
  config.data.batch_size = 8  # Rows per global batch.
  config.data.packing = True  # Pack several examples per row with segment ids.
  config.data.eval_examples = 100  # Examples per eval set, drawn by a stable hash; 0 means all.
  config.data.fact_examples = 0  # Facts per fact set; 0 means all.
  config.data.max_prompt_len = 48  # Prompt width of fact batches.
  # More measures of what changed, each read before and after fine-tuning (whole logits):
  config.data.token_accuracy = False  # NAME_accuracy (and NAME_exact for instruction sets).
  config.data.kl_sets = ()  # Eval sets with NAME_kl: KL(base || model) of next-token predictions.
  config.data.calibration_sets = ()  # Fact sets with NAME_ece: first answer token's calibration.
  config.data.answer_len = 40  # Answer width of fact batches.
  # Tokenizer: a directory with tokenizer.json; "" means the base checkpoint's when it is a
  # Hugging Face directory, else bytes (ByteTokenizer, the embedded benchmarks' tokenizer).
  config.data.tokenizer = ""

  config.model = LlamaConfig.tiny().__dict__.copy()  # Architecture (LlamaConfig fields).

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # Data-parallel devices (-1: all that the other axes leave).
  config.mesh.fsdp = 1  # Devices parameters and batch are sharded over (FSDP).
  config.mesh.tensor = 1  # Tensor-parallel devices (heads, MLP, vocabulary).

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"  # "adamw" or "sgd".
  config.optimizer.learning_rate = 1e-3  # Peak learning rate.
  config.optimizer.schedule = "constant"  # "constant" or "cosine" after warm-up.
  config.optimizer.warmup_steps = 0  # Linear warm-up steps.
  config.optimizer.final_lr_fraction = 0.0  # Cosine: final rate as a fraction of the peak.
  config.optimizer.weight_decay = 0.0  # AdamW's decoupled weight decay.
  config.optimizer.b1 = 0.9  # Adam's first-moment decay.
  config.optimizer.b2 = 0.95  # Adam's second-moment decay.
  config.optimizer.eps = 1e-8  # Adam's epsilon.
  config.optimizer.momentum = 0.9  # SGD's momentum (0 for none).
  config.optimizer.grad_clip = 1.0  # Global gradient-norm clip; 0 disables.
  config.optimizer.anchor_strength = 0.0  # Pull toward the base weights per unit lr (0: off).

  config.finch = ml_collections.ConfigDict()
  config.finch.enabled = True  # Scale the optimizer's updates by FINCH.
  config.finch.reading = "first"  # Reference: "first", "first_k", "running" or "target".
  config.finch.reference_steps = ml_collections.config_dict.placeholder(int)  # "first_k": k.
  config.finch.reference_decay = ml_collections.config_dict.placeholder(float)  # "running": decay.
  config.finch.reference_loss = ml_collections.config_dict.placeholder(float)  # "target": loss.
  config.finch.loss_floor = 0.0  # Lower bound of the loss.
  config.finch.min_scale = 0.1  # Smallest multiplier.
  config.finch.max_scale = 4.0  # Largest multiplier.
  config.finch.ema_decay = 0.0  # Smoothing of the loss FINCH reads (0: each batch).

  # Replay: a share of each batch's examples from other data, trained on by cross-entropy or,
  # with kl_weight > 0, by the KL divergence to the base model's next-token distribution.
  config.replay = ml_collections.ConfigDict()
  config.replay.share = 0.0  # Share of training examples drawn from the replay data (0: off).
  config.replay.data = {"name": "", "split": "pretrain"}  # Replay data, or name "base_samples".
  config.replay.kl_weight = 0.0  # > 0: replay tokens train on KL to the base, not on their text.
  config.replay.num_samples = 256  # base_samples: sequences sampled from the base model.
  config.replay.sample_len = 96  # base_samples: tokens sampled after BOS.
  config.replay.temperature = 1.0  # base_samples: softmax temperature.

  # LoRA: train low-rank adapters on the attention and MLP projections, base weights frozen.
  config.lora = ml_collections.ConfigDict()
  config.lora.rank = 0  # Adapter rank r (0: off, every weight is trained).
  config.lora.alpha = 16.0  # The adapters' product is scaled by alpha / rank.
  config.lora.targets = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
  )

  config.compare = ml_collections.ConfigDict()
  config.compare.baseline = "standard"  # The method others are measured against.
  config.compare.seeds = (0, 1)  # Seeds of every sweep point (data order).
  # Name -> config overrides and the learning rates to sweep. The rates are 1.4x apart and
  # placed where the two sweeps overlap (task loss about 0.2 to 0.4 here), so the matched reading
  # interpolates between near neighbours: with rates 3.3x apart the straight-line and the cubic
  # reading of the same runs gave -5.5% and +12.9%.
  config.compare.methods = {
    "standard": {"finch": {"enabled": False}, "learning_rates": (1.4e-4, 2e-4, 3e-4)},
    "finch": {"finch": {"enabled": True}, "learning_rates": (7e-5, 1e-4, 1.4e-4)},
  }
  # Runs trained at once, each on an equal share of the devices; 0: one run per device on a
  # single-process CPU machine (train.py makes each core a device), one at a time elsewhere.
  config.compare.concurrent_runs = 0
  # Methods to sweep now, in order (the baseline always); (): all. A study kept in results_dir
  # grows a few methods a session, and its report reads every run kept there.
  config.compare.only = ()
  # The cost column: every method's step timed in alternating rounds of `steps` steps each; the
  # ratio to the baseline is the median over rounds of the paired ratios, with a 95% interval
  # from order statistics (16 rounds: the 4th to 13th smallest). The one place these are set.
  config.compare.timing = {"rounds": 16, "steps": 1}
  # A study's results directory (e.g. docs/results/STUDY): one summary per finished run, reused by
  # fingerprint on a rerun; `python -m finch_jax.report DIR` rebuilds its report. "": none.
  config.compare.results_dir = ""
  # A finished sweep run keeps its result and curves; its checkpoints (the model and optimizer
  # state, 3 GB a run for a 135M-parameter model) are removed once the result is written,
  # unless this is True: a study of 180 runs would otherwise fill a disk.
  config.compare.keep_run_checkpoints = False
  config.compare.pretrain = {  # Overrides that make the base model (cached in WORKDIR/base).
    "num_train_steps": 320,
    "checkpoint_every": 160,
    "eval_every": 0,
    "log_every": 50,
    "data": {"train": {"name": "", "split": "pretrain"}, "batch_size": 32},
    "optimizer": {
      "learning_rate": 3e-3,
      "schedule": "cosine",
      "warmup_steps": 50,
      "final_lr_fraction": 0.1,
    },
  }
  return config


def full_size(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the embedded benchmark at the size RESULTS.md measured: 100 people a
  population, 150 steps of 16 rows, a base pretrained for 600 steps, evaluations of 200
  examples every 50 steps and the cost column timed over 24 rounds of 2 steps."""
  config.num_train_steps = 150
  config.log_every = 25
  config.eval_every = 50
  config.checkpoint_every = 150
  config.data.eval_examples = 200
  config.data.options["embedded_biographies"] = {"num_base_people": 100, "num_new_people": 100}
  config.data.batch_size = 16
  config.compare.timing = {"rounds": 24, "steps": 2}
  config.compare.pretrain["num_train_steps"] = 600
  config.compare.pretrain["checkpoint_every"] = 200
  return config
