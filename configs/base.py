"""Shared defaults of every atr-jax config: the reference system (SPEC 8) on Clotho v2.1.

Configs are code: each experiment file imports `get_base_config()` and overrides what differs. Every key is
documented here; `--config.<key>=<value>` on the command line overrides one (an unknown key is an error).
"""
import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 20  # Reference seed: parameters, data order, dropout and SpecAugment all derive from it.

  config.data = ml_collections.ConfigDict()
  config.data.dataset = "clotho"  # Clotho v2.1 layout (captions CSVs + audio folders), see README.
  config.data.raw_dir = ""  # The Clotho-layout folder (the TFDS manual_dir). Required.
  config.data.data_dir = ""  # Where prepared TFRecords go; "" = ~/.cache/atr_jax/prepared/<name>-<hash>.
  config.data.generate_synthetic = False  # Generate the synthetic dataset into raw_dir when it is absent.
  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.num_development = 1000
  config.data.synthetic.num_validation = 200
  config.data.synthetic.num_evaluation = 200
  config.data.synthetic.duration_s = 3.0
  config.data.synthetic.seed = 0
  config.data.train_split = "development"
  config.data.val_split = "validation"
  config.data.test_split = "evaluation"
  config.data.train_max_frames = 3001  # Random crop (or pad + mask) of each training clip, frames at 100/s.
  config.data.eval_max_frames = 3001  # Evaluation clips are embedded whole (padding is masked) up to this length.
  config.data.shuffle_buffer = 2000  # (clip, caption) pairs held by the shuffle buffer of each process.

  config.model = ml_collections.ConfigDict()
  config.model.audio = ml_collections.ConfigDict()
  config.model.audio.channels = (64, 128, 256, 512, 1024, 2048)  # CNN14 ConvBlock widths.
  config.model.audio.last_pool = (2, 2)  # Block-6 pooling: (2, 2) as the retrieval reference, (1, 1) as PANNs.
  config.model.audio.dropout = 0.2
  config.model.audio.spec_augment = True
  config.model.text = ml_collections.ConfigDict()
  config.model.text.model_dir = "~/models/bert-base-uncased"  # Local HF folder: config.json, weights, tokenizer.
  config.model.text.pretrained = True  # Load the folder's weights (else random init of that architecture).
  config.model.text.pooling = "cls"  # "cls" (reference) or "mean" (sentence-transformers).
  config.model.text.dropout = 0.2  # Overrides the HF config's dropout; None keeps it.
  config.model.text.max_len = 64  # Tokens per caption (padded to a fixed length: no recompilation).
  config.model.embed_dim = 1024
  config.model.head_hidden = 2048
  config.model.dtype = "float32"

  config.loss = ml_collections.ConfigDict()
  config.loss.name = "infonce"
  config.loss.temperature = 0.07
  config.loss.learnable_temperature = False

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 1e-4  # Adam.
  config.optim.text_learning_rate = None  # Learning rate of the BERT body; None = optim.learning_rate.
  config.optim.grad_clip_norm = 2.0  # Global-norm clipping; 0 disables.
  config.optim.decay_every_epochs = 20  # StepLR of the reference: x decay_factor every this many epochs.
  config.optim.decay_factor = 0.1

  config.train = ml_collections.ConfigDict()
  config.train.global_batch_size = 64  # Over all devices and processes; must be divisible by the device count.
  config.train.num_epochs = 50
  config.train.log_every_steps = 50

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 64  # Global clips/captions per embedding step (fixed: the last batch is padded).
  config.eval.selection_metric = "t2a_mAP10"  # Validation metric (higher is better) that picks the best checkpoint.
  return config
