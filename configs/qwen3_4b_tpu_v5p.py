"""A FINCH fine-tune of Qwen3-4B on a TPU v5p-32 slice (16 chips, 95 GiB HBM each, 4 hosts).

Every host runs the same command; JAX reads the slice from the TPU environment
(docs/pod.md):

  huggingface-cli download Qwen/Qwen3-4B --local-dir /path/to/Qwen3-4B   # on every host
  python train.py --config configs/qwen3_4b_tpu_v5p.py --workdir gs://BUCKET/qwen3-4b-finch \
      --config.base_checkpoint=/path/to/Qwen3-4B \
      --config.data.train.name=jsonl:/path/train.jsonl \
      --config.data.eval_sets.task.name=jsonl:/path/eval.jsonl \
      --config.data.eval_sets.retain.name=local_text:/path/retain_text \
      --config.data.eval_sets.retain.split=validation

With the base checkpoint given, the architecture and the tokenizer come from its config.json and
tokenizer.json; `config.model` below says the same (it is what the memory check compiles, and
what runs without a Hugging Face directory).

Data: `data.train` is the SFT set, JSONL instruction data (`{"prompt", "response"}` or chat
`{"messages": [...]}` per line; the loss counts response tokens only). Forgetting is read from
two eval sets: `task`, held-out data of the new task, and `retain`, text whose loss must not
rise: by default text the base model samples itself (`base_samples`, which needs no data), or
local text of your own as in the command above.
The paths in `get_config` are examples; `finch_jax.validate` names any that does not exist.

Sizes (Qwen3-4B, tied embeddings): 4,022,468,096 parameters, of which 389M are the embedding.
Memory per chip, measured by `python benchmarks/pod_memory.py` (docs/pod.md): 37.8 GiB of 95
compiled by XLA:CPU on 16 fake devices (60% headroom), 37.5 GiB compiled by the TPU compiler
itself for the v5p-32 topology (61% headroom).

Choices, and why:
- Slice: v5p-32, 16 chips in 4 hosts. Memory alone would fit a v5p-8 (4 chips); 16 chips are
  chosen for time. A step of 262k tokens costs about 4.1e10 FLOPs per token (6 x 4.0e9 for the
  weights, 7e9 for attention over 4096 positions, and a third more for remat's recomputation),
  1.1e16 FLOPs: 3.7 s on 16 chips at 40% of v5p's 459 bf16 TFLOP/s, so 1000 steps take about
  an hour. On another slice keep 8 rows per data-parallel group per micro-batch:
  grad_accum_steps = batch_size / (8 x chips / 4), e.g. 4 on a v5p-16 (8 chips).
- Mesh: tensor parallelism over the 4 chips of each host (heads, KV heads, MLP and the
  151,936-entry vocabulary: 32, 8, 9728 and 151936 all divide by 4), times 4 data-parallel
  groups (mesh.data=-1). The vocabulary is what decides it: the logits of 8 rows of 4096 tokens
  are 8 x 4096 x 151936 x 4 B = 19.9 GB in float32, and tensor parallelism splits them 4 ways.
  FSDP over all 16 chips would split the parameters further; with the logits made whole its
  temporaries measured 154 GiB per chip on XLA:CPU, with the chunked loss 38 GiB, about what
  tensor parallelism needs, but every layer's weights would then be gathered for 2 rows per
  chip, so mesh.fsdp stays 1. Each host's 4 chips form one tensor-parallel group, so the
  activation all-reduces (2 per layer forward, 2 for remat's recomputation, 2 backward, 168 MB
  each) stay on ICI within the host's chips and the batch splits by host.
- Precision: bfloat16 compute, float32 parameters and Adam moments. Bytes per parameter: 4
  (params) + 4 (gradients, float32 because they are taken with respect to the float32 params) + 8
  (Adam's two moments) = 16 B, 64.4 GB in all; split 4 ways, 16.1 GB per chip, 12.1 GB of it
  (params and moments, 11.24 GiB) held between steps. bfloat16 params would halve that but lose
  the updates: an AdamW step at a 1e-5 learning rate changes a weight by about 1e-5 of its size,
  below bfloat16's 2^-8 relative precision, so most updates would round away.
- Remat: on, with JAX's default policy (`remat_policy="nothing_saveable"`): only each block's
  input is saved, everything inside is recomputed in the backward pass, a third more compute.
  Saved per chip: 36 layers x 8 rows x 4096 x 2560 x 2 B = 6.0 GB. Without remat every layer
  would also keep its MLP activations and attention's intermediates: over 250 GB.
  `remat_policy="dots_with_no_batch_dims_saveable"` keeps the projections' outputs and
  recomputes only attention and the elementwise work: 76.7 GiB per chip on XLA:CPU, past the
  75% budget.
- Attention: `attention="auto"`, the splash kernel on TPU (cuDNN's flash kernel on the GPUs):
  blocks of 512 queries and keys, the causal half skipped, no [4096, 4096] score matrix (the
  einsum path held 4.3 GB of float32 scores per chip, and their gradient, for one layer).
- Loss: `loss_chunk_size=512` makes the logits 512 tokens of each row at a time from the final
  hidden states; the whole logits of 8 rows, with the softmax and its gradient, were 5.0 GB each
  per chip. Same loss to float32 rounding.
- Scanned layers: the 36 blocks' weights are stacked and applied by `nnx.scan`, so the compiler
  sees one block: the TPU compiler compiles the step in 79 s of CPU time instead of 225 s
  (XLA:CPU: 9 s instead of 66 s). It costs memory: 8.3 GiB more temporaries per chip on the
  TPU compiler (37.5 GiB against 29.2 GiB unscanned), well within the budget; set
  `--config.model.scan_layers=False` for the lower figure.
- Batch: 64 rows x 4096 tokens = 262,144 tokens per step, in 2 micro-batches of 32 rows
  (grad_accum_steps=2): 8 rows per data-parallel group at a time, which measured within budget
  with room to spare (16 rows would roughly double the 26 GiB of temporaries). FINCH sees the
  mean loss of all 64 rows. 4096 tokens holds most SFT conversations whole (rows are packed).
- Optimizer: AdamW, peak 1e-5 (full fine-tunes of 4B models use 1e-5 to 2e-5; FINCH raises the
  step up to max_scale=4 times as the loss falls, so its base rate sits at the low end),
  50 warm-up steps, cosine to 10%, no weight decay (decay pulls weights toward zero, not toward
  the base model, which is forgetting by another name), gradients clipped at norm 1.
- FINCH on, with its defaults (reference = the first batch's loss, scale in [0.1, 4]).
"""

import ml_collections

from configs import default

# The machine this config is written for; benchmarks/pod_memory.py and the tests read it.
TARGET = {
  "name": "TPU v5p-32",  # Slice name (Cloud TPU counts 2 TensorCores per v5p chip).
  "devices": 16,  # JAX devices: one per chip.
  "processes": 4,  # Hosts of the slice, one process each (4 chips per host).
  "hbm_gib": 95.0,  # HBM per chip.
  "usable_fraction": 1.0,  # Share of HBM a JAX process can allocate (TPU: all of it).
  "tpu_topology": "v5p:2x2x4",  # The slice's chips, for compiling with libtpu without it.
}

# Qwen3-4B as its Hugging Face config.json describes it (Qwen/Qwen3-4B).
QWEN3_4B = dict(
  model_type="qwen3",
  vocab_size=151936,
  d_model=2560,
  num_layers=36,
  num_heads=32,
  num_kv_heads=8,
  head_dim=128,
  d_ff=9728,
  tie_embeddings=True,
  rope_theta=1_000_000.0,
  norm_eps=1e-6,
  max_len=40960,
  bos_token_id=151643,
  eos_token_id=151645,
)


def get_config() -> ml_collections.ConfigDict:
  """Qwen3-4B fine-tuning with FINCH on a TPU v5p-32 slice."""
  config = default.get_config()
  config.mode = "finetune"
  config.num_train_steps = 1000  # 262M tokens; set from your data: epochs x tokens / 262,144.
  config.grad_accum_steps = 2  # 2 micro-batches of 32 rows: 2 rows per chip at a time.
  config.log_every = 10
  config.eval_every = 200
  config.checkpoint_every = 200
  config.base_checkpoint = ""  # --config.base_checkpoint=/path/to/Qwen3-4B (Hugging Face dir).
  config.data.name = ""
  config.data.train = {"name": "jsonl:/data/sft/train.jsonl", "split": "train"}
  config.data.eval_sets = {
    "task": {"name": "jsonl:/data/sft/eval.jsonl", "split": "eval"},  # held-out SFT data
    # Text whose loss must not rise: here what the base model samples itself (needs no data);
    # your own: --config.data.eval_sets.retain.name=local_text:DIR (and .split=validation).
    "retain": {"name": "base_samples", "split": "samples"},
  }
  config.data.fact_sets = {}
  config.data.seq_len = 4096
  config.data.batch_size = 64  # 4 rows per chip on 16 chips.
  config.data.eval_examples = 512
  config.model = dict(
    **QWEN3_4B,
    dtype="bfloat16",  # compute
    param_dtype="float32",  # parameters, gradients and Adam's moments
    remat=True,  # recompute each block in the backward pass
    remat_policy="nothing_saveable",  # keep only each block's input (JAX's default)
    scan_layers=True,  # one block compiled and scanned 36 times: compiles in a fraction
    attention="auto",  # splash on TPU, cuDNN's flash kernel on GPU: no [4096, 4096] scores
  )
  config.loss_chunk_size = 512  # logits of 512 tokens per row at a time, never all 4096
  config.mesh.data = -1  # 4 data-parallel groups on 16 chips, one per host
  config.mesh.fsdp = 1  # see the docstring: FSDP's temporaries measured 154 GiB per chip
  config.mesh.tensor = 4  # heads, MLP and vocabulary over the 4 chips of a host
  config.optimizer.learning_rate = 1e-5
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 50
  config.optimizer.final_lr_fraction = 0.1
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip = 1.0
  config.finch.enabled = True
  return config
