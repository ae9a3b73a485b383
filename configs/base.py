"""Shared defaults of every atr-jax config: the reference system (SPEC 8) on Clotho v2.1.

Configs are code: each experiment file imports `get_base_config()` and overrides what differs. Every key is
documented here; `--config.<key>=<value>` on the command line overrides one (an unknown key is an error).
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 20  # Reference seed: parameters, data order, dropout and SpecAugment all derive from it.

  config.data = ml_collections.ConfigDict()
  # Dataset of raw_dir: "clotho", "audiocaps" or "wavcaps" (one split, train: for extra_train), in any of the raw
  # folder layouts docs/data.md lists (native, aac-datasets, the reference's; detected). Validation and test always
  # come from this dataset.
  config.data.dataset = "clotho"
  config.data.raw_dir = ""  # The raw dataset folder (the TFDS manual_dir). Required.
  # AudioCaps audio file name made from a row of the official CSVs ({youtube_id}, {start_time}, {audiocap_id}); the
  # renamed CSVs (file_name,caption[_1..5]) name their files themselves.
  config.data.audiocaps_file_pattern = "{youtube_id}.wav"
  # More training data, comma-separated "dataset:raw_dir:split" entries trained on together with train_split, e.g.
  # "audiocaps:~/data/audiocaps:train" (each is prepared into its own default folder on first use).
  config.data.extra_train = ""
  # WavCaps (dataset or extra_train "wavcaps:DIR:train"): CSV whose column `id` lists the Freesound ids kept out of
  # training (Clotho's evaluation clips, e.g. aac-datasets' blacklist_clotho.full.csv); "" = none.
  config.data.wavcaps_exclude_csv = ""
  # Caption cleaning before tokenisation (data_pipelines/captions.py): "reference" (SPEC 7: lower-case, the marks
  # , . ! ? ; : " replaced by spaces), "dcase2025" (SPEC 11b: lower-case, every ASCII punctuation mark deleted, no
  # space put in: "dog's" -> "dogs") or "raw".
  config.data.caption_cleaning = "reference"
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
  # Random crop (or pad + mask) of each training clip, frames at 100/s; 0 = the longest clip of the training sources
  # (read from the prepared data: 3001 for Clotho's 30 s, 1001 for AudioCaps' 10 s).
  config.data.train_max_frames = 0
  # Random crop (frames) of each clip of the extra_train sources, padded to the batch's train_max_frames; with
  # train_max_frames = 0 their clips count toward "the longest clip" only up to this. 1001 = 10 s, as the DCASE 2025
  # baseline and WavCaps pre-training crop (WavCaps clips run to tens of minutes); 0 = crop them as train_split.
  config.data.extra_train_max_frames = 1001
  # What the prepared records hold per clip: "log_mel" (64-band float16 log-mel: CNN14, ResNet38) or "waveform"
  # (int16 32 kHz samples: PaSST, whose front end runs on the device, with its random mel band in training). Must be
  # what model.audio.arch takes (checked at startup); each is prepared into its own folder.
  config.data.audio_feature = "log_mel"
  config.data.shuffle_buffer = 2000  # (clip, caption) pairs held by the shuffle buffer of each input shard.
  # Input shards: each reads its own TFRecord files and fills its own slice of every global batch; each process
  # runs num_input_shards / process_count of them. 0 = one per process. Fixing it (e.g. 8) makes the global batches
  # (and so an exact resume) independent of the number of processes.
  config.data.num_input_shards = 0

  config.model = ml_collections.ConfigDict()
  config.model.audio = ml_collections.ConfigDict()
  # Audio tower: "cnn14" or "resnet38" (PANNs, SPEC 3; data.audio_feature "log_mel"), or "passt" (PaSST-S, SPEC 11;
  # data.audio_feature "waveform").
  config.model.audio.arch = "cnn14"
  config.model.audio.channels = (64, 128, 256, 512, 1024, 2048)  # CNN14 ConvBlock widths.
  config.model.audio.last_pool = (2, 2)  # Block-6 pooling: (2, 2) as the retrieval reference, (1, 1) as PANNs.
  config.model.audio.dropout = 0.2  # After each CNN14 ConvBlock; after ResNet38's stem, trunk and last ConvBlock.
  config.model.audio.spec_augment = True
  config.model.audio.resnet = ml_collections.ConfigDict()  # ResNet38 only.
  config.model.audio.resnet.widths = (64, 128, 256, 512)  # Widths of the stages layer1..4 (stem = widths[0]).
  config.model.audio.resnet.blocks = (3, 4, 6, 3)  # Basic blocks per stage.
  config.model.audio.resnet.out_features = 2048  # Width of conv_block_after1 = the clip embedding.
  config.model.audio.resnet.block_dropout = 0.2  # Inside each basic block: 0.2 as the reference, 0.1 as PANNs.
  config.model.audio.passt = ml_collections.ConfigDict()  # PaSST only (defaults: PaSST-S, 86 M parameters).
  config.model.audio.passt.embed_dim = 768  # Token width = the clip embedding's.
  config.model.audio.passt.depth = 12  # Transformer blocks.
  config.model.audio.passt.num_heads = 12
  config.model.audio.passt.mlp_dim = 3072
  # Structured patchout in training: time columns and frequency rows of 16x16 patches dropped per 10 s segment.
  config.model.audio.passt.patchout_time = 15
  config.model.audio.passt.patchout_freq = 2
  # Orbax folder written by `python -m scripts.convert_weights` (a converted PANNs Cnn14/ResNet38 .pth, as the
  # reference starts from, or the PaSST-S .pt) whose variables initialise the audio tower: a missing folder is an error.
  # "scratch" = random initialisation, deliberately.
  config.model.audio.init_from = "~/models/panns/cnn14"
  config.model.text = ml_collections.ConfigDict()
  # Text tower: "bert" (HF BERT and RoBERTa folders, with HF's pooler; SPEC 4) or "roberta" (a RoBERTa folder
  # without a pooling layer, the DCASE 2025 baseline; SPEC 11).
  config.model.text.arch = "bert"
  # Local HF folder (config.json, model.safetensors or pytorch_model.bin, tokenizer files) of a BERT or RoBERTa
  # model, or a hub name such as "bert-base-uncased" (downloaded where the network allows).
  config.model.text.model_dir = "~/models/bert-base-uncased"
  config.model.text.pretrained = True  # Load the folder's weights (else random init of that architecture).
  config.model.text.pooling = "cls"  # "cls" (reference) or "mean" (sentence-transformers).
  config.model.text.dropout = 0.2  # Overrides the HF config's dropout; None keeps it.
  config.model.text.max_len = 64  # Tokens per caption (padded to a fixed length: no recompilation).
  config.model.embed_dim = 1024
  config.model.head_hidden = (
    2048  # Hidden width of the two-layer MLP heads; 0 = one Linear layer (DCASE 2025 baseline).
  )
  config.model.dtype = "float32"  # Compute dtype: "float32" or "bfloat16" (parameters and Adam stay float32).
  config.model.remat = False  # Recompute each tower's activations in the backward pass (less memory, ~30% slower).
  # Towers frozen by optim.frozen run with train=False (BatchNorm on running statistics, no dropout/SpecAugment);
  # False = the reference (frozen BatchNorm keeps updating its statistics, dropout stays on).
  config.model.frozen_in_inference_mode = True

  config.loss = ml_collections.ConfigDict()
  # One of triplet_max, triplet_sum, triplet_weighted, ntxent, infonce, siglip (SPEC 5), infonce_multi (SPEC 11:
  # every caption of the same clip in the global batch is a positive); see atr_jax/losses.py.
  config.loss.name = "infonce"
  config.loss.temperature = 0.07  # ntxent / infonce: tau (the initial value when learnable).
  # ntxent / infonce: train log tau (CLIP style, clipped to [0.01, 1]); infonce_multi: train tau itself.
  config.loss.learnable_temperature = False
  config.loss.multi_positive_temperature = 0.05  # infonce_multi: |tau| (the initial value when learnable).
  config.loss.margin = 0.2  # triplet_*: the margin m.
  config.loss.siglip_scale = 10.0  # siglip: scale t of the logits t*S + b (the initial value when learnable).
  config.loss.siglip_bias = -10.0  # siglip: bias b (the initial value when learnable).
  config.loss.siglip_learnable = True  # siglip: train log t and b (as the SigLIP paper).
  config.loss.siglip_chunked = False  # siglip: ring of ppermutes over devices, never a B_local x B_global block.
  # Weight of the contrastive loss: total = loss.weight x contrastive + distill.weight x distillation (when on).
  config.loss.weight = 1.0

  # Ensemble distillation (SPEC 11, DCASE 2024 rank 1): the student's logits C = S / tau (tau: the loss's temperature;
  # a loss with one is needed) learn the teachers' soft targets softmax(C_t), C_t = the teachers' mean cosine
  # similarity over the global batch / tau; see atr_jax/losses.py and atr_jax/distillation.py.
  config.distill = ml_collections.ConfigDict()
  # Comma-separated teacher folders written by `python -m atr_jax.retrieve embed-train --workdir RUN --out DIR`
  # (embeddings of every training clip and caption, checked against the training set at startup); "" = off.
  config.distill.teachers = ""
  config.distill.weight = 1.0  # Weight of the distillation term.

  config.optim = ml_collections.ConfigDict()
  config.optim.name = "adam"  # "adam" or "adamw" (decoupled weight decay optim.weight_decay).
  config.optim.weight_decay = 0.0  # adamw only.
  config.optim.learning_rate = 1e-4  # Peak learning rate.
  config.optim.text_learning_rate = None  # Learning rate of the BERT body; None = optim.learning_rate.
  # Subtrees not trained (no update, no Adam state, left out of gradient clipping): any of "audio", "text",
  # "audio_head", "text_head".
  config.optim.frozen = ()
  config.optim.grad_clip_norm = 2.0  # Global-norm clipping; 0 disables.
  # "step" (the reference: x decay_factor every decay_every_epochs), "cosine" (linear warmup over warmup_epochs,
  # then cosine to end_learning_rate over decay_epochs), "plateau" (x plateau_factor when the validation loss has not
  # improved for plateau_patience epochs: the DCASE submission) or "constant".
  config.optim.schedule = "step"
  config.optim.decay_every_epochs = 20.0  # (May be fractional.)
  config.optim.decay_factor = 0.1
  config.optim.warmup_epochs = 1.0  # cosine only.
  config.optim.decay_epochs = 0.0  # cosine only: epochs of the decay after the warm-up; 0 = to the end of training.
  config.optim.end_learning_rate = 0.0  # cosine only: where the decay ends (kept until the end of training).
  config.optim.plateau_factor = 0.5
  config.optim.plateau_patience = 5

  config.train = ml_collections.ConfigDict()
  config.train.global_batch_size = 64  # Over all devices and processes; must be divisible by the device count.
  config.train.num_epochs = 50
  config.train.log_every_steps = 50
  # The latest state is also checkpointed every this many steps (0: at epoch ends only), so that a killed run loses
  # at most this many steps; it resumes exactly (same data order and random streams).
  config.train.checkpoint_every_steps = 500
  # Micro-batches per step: the global batch's embeddings are computed in pieces and the contrastive loss still sees
  # the whole global batch (gradient caching). Equal to one big batch up to rounding except that BatchNorm normalises
  # each micro-batch by its own statistics (running statistics: one update per step from the pooled moments) and
  # dropout/SpecAugment bits are drawn per micro-batch; see README. Must divide global_batch_size / device_count.
  config.train.grad_accum_steps = 1
  # "replicated" (pure data parallelism) or "fsdp" (parameters and Adam state sharded over the data axis along their
  # largest divisible dimension; for large text towers such as RoBERTa-large).
  config.train.param_sharding = "replicated"

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 64  # Global clips/captions per embedding step (fixed: the last batch is padded).
  # Longest audio (seconds) the audio tower embeds at once, in evaluation, retrieval, zero-shot and embed-train alike:
  # a longer clip is cut into segments of this length, embedded one by one and combined (the mean of the tower's
  # outputs weighted by their 10 s blocks; atr_jax/evaluation.py states the rule per tower). 30 s keeps every
  # Clotho and AudioCaps clip whole, as CNN14 is trained on them, and is a multiple of PaSST's 10 s segments; it
  # bounds the device memory of an embedding batch (eval.batch_size x this) however long the clips.
  config.eval.max_segment_s = 30.0
  config.eval.selection_metric = "t2a_mAP10"  # Validation metric (higher is better) that picks the best checkpoint.
  # Validation captions shown in TensorBoard after each epoch with their top-5 clips and the top hit's audio; 0: none.
  config.eval.num_retrieval_examples = 4
  # DCASE 2025 graded relevance CSV (query,audio_filenames) of the test split: the test also reports
  # t2a_mAP10_graded and t2a_mAP16_graded (SPEC 11) in results.json. "": none.
  config.eval.relevance_csv = ""
  # Zero-shot classification accuracy (per fold and mean) at every validation, logged to TensorBoard as zeroshot/*
  # (`atr_jax.zeroshot`): dataset "esc50" or "urbansound8k" in the folder root, or csv (file,label[,fold]; relative
  # files below root, default the CSV's folder). Class embedding = mean over the prompts ("{}" = the class name).
  # generate_synthetic: write a synthetic ESC-50-layout set to root when it does not exist (the demo's). "": off.
  config.eval.zeroshot = ml_collections.ConfigDict()
  config.eval.zeroshot.dataset = ""
  config.eval.zeroshot.root = ""
  config.eval.zeroshot.csv = ""
  config.eval.zeroshot.prompts = ("the sound of a {}",)
  config.eval.zeroshot.generate_synthetic = False

  # Audio moment retrieval (`atr_jax.moments`, SPEC 12): the QD-DETR (AM-DETR) model, its losses and its training.
  config.moments = ml_collections.ConfigDict()
  # The trained atr-jax workdir whose audio and text towers give the frame and token features. Required.
  config.moments.encoder_workdir = ""
  # train: when encoder_workdir holds no checkpoint, train it first with this config (minus `moments`:
  # atr_jax.train.train_and_evaluate); otherwise a missing encoder is an error.
  config.moments.train_encoder = False
  # A moment workdir whose best parameters start the training (fine-tuning, e.g. Clotho-Moment then CASTELLA);
  # "" starts from a fresh initialisation. Its model config must equal moments.model.
  config.moments.init_from = ""
  config.moments.data = ml_collections.ConfigDict()
  config.moments.data.dir = ""  # Folder holding each split's annotations and recordings (the names below). Required.
  # Each split's annotation file (lighthouse JSONL or CASTELLA JSON) and recordings folder (<vid>.<ext>) inside
  # data.dir; "{split}" is replaced by train_split, val_split or test_split.
  config.moments.data.annotations = "{split}.jsonl"
  config.moments.data.audio_dir = "{split}"
  config.moments.data.train_split = "train"
  config.moments.data.val_split = "val"
  config.moments.data.test_split = "test"
  config.moments.data.features = "clap_like"  # Frame setting of atr_jax.moments.features (the baseline's).
  # train: when data.dir is absent, synthesise a Clotho-Moment-style set there (`data_pipelines.moments`) from the
  # Clotho-layout folder synthetic_clips_dir ("" = config.data.raw_dir, generated first if the config says so).
  config.moments.data.synthesize = False
  config.moments.data.synthetic_clips_dir = ""
  # > 0: when synthetic_clips_dir is absent, first generate our synthetic Clotho-layout set there
  # (`data_pipelines.synthetic`, config.data.synthetic's clip counts and seed) with clips of about this many seconds.
  config.moments.data.synthetic_clip_seconds = 0.0
  config.moments.data.synthetic_duration = 60  # Seconds per synthetic recording (Clotho-Moment's 60).
  config.moments.data.synthetic_seed = 0
  # The zero-training baseline (atr_jax.moments.sliding_window): windows of these lengths in frames, scored by the
  # dual encoder's frame-to-query similarity, best first; a window with merge_overlap of its length inside a better
  # one is merged into it (dropped); the best num_windows kept.
  config.moments.sliding_window = ml_collections.ConfigDict()
  config.moments.sliding_window.window_frames = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
  config.moments.sliding_window.merge_overlap = 0.5
  config.moments.sliding_window.num_windows = 10  # Ranked windows kept per query (the metrics read at most 10).
  config.moments.model = ml_collections.ConfigDict()
  config.moments.model.hidden_dim = 256  # d: width of every layer after the input projections.
  config.moments.model.num_heads = 8
  config.moments.model.ffn_dim = 1024
  config.moments.model.dropout = 0.1  # Inside the transformer layers.
  config.moments.model.input_dropout = 0.5  # Before each layer of the audio and text input projections.
  config.moments.model.num_input_layers = 2  # Layers (LayerNorm, dropout, Dense) of each input projection.
  config.moments.model.num_cross_layers = 2  # Audio-to-text cross-attention encoder layers.
  config.moments.model.num_encoder_layers = 2  # Self-attention layers over [global token, frames].
  config.moments.model.num_decoder_layers = 2  # DAB-style decoder layers (each refines the anchors).
  config.moments.model.num_queries = 10  # Learnable (centre, width) anchors = predicted windows per query.
  config.moments.model.dtype = "float32"  # Compute dtype: "float32" or "bfloat16" (parameters stay float32).
  config.moments.loss = ml_collections.ConfigDict()
  # Matching costs and loss weights (the same numbers): span L1 on (centre, width), 1 - gIoU, foreground CE.
  config.moments.loss.span_weight = 10.0
  config.moments.loss.giou_weight = 1.0
  config.moments.loss.label_weight = 4.0
  config.moments.loss.background_weight = 0.1  # CE weight of the "background" class (unmatched anchors).
  config.moments.loss.saliency_weight = 1.0  # Hinge + rank-contrastive + mismatched-query terms together.
  config.moments.loss.saliency_margin = 0.2  # Hinge margin between a frame inside and one outside the window.
  config.moments.loss.saliency_pairs = 2  # (inside, outside) frame pairs drawn per query for the hinge.
  config.moments.loss.rank_tau = 0.5  # Temperature of the rank-contrastive term.
  config.moments.train = ml_collections.ConfigDict()
  config.moments.train.global_batch_size = 32  # Queries per step over all devices (a multiple of the device count).
  config.moments.train.num_epochs = 200
  config.moments.train.learning_rate = 1e-4  # AdamW, constant.
  config.moments.train.weight_decay = 1e-4  # AdamW's, on every parameter (as upstream).
  config.moments.train.grad_clip_norm = 0.1  # Global-norm clipping of the gradients.
  config.moments.train.max_windows = 5  # Windows per query in a step: its first and a random draw of the others.
  # Frames the model sees at once: training keeps a recording's first max_frames frames, inference cuts longer
  # recordings into half-overlapping segments of this many frames and merges their windows.
  config.moments.train.max_frames = 300
  config.moments.train.max_tokens = 32  # Text tokens kept per query.
  config.moments.train.segment_merge_iou = 0.7  # Merging segments: a window this close to a better one is dropped.
  config.moments.train.eval_every_epochs = 1  # Validation (and checkpoint) every this many epochs.
  config.moments.train.log_every_steps = 50  # TensorBoard train/<loss term> scalars every this many steps.
  return config
