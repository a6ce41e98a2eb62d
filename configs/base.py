"""Transformer-base (Vaswani et al. 2017) for English→Spanish: the reference config.

Every field jaxnmt reads is declared here, with a comment; the other configs start from
this one and change only what differs. Any field can be overridden on the command line.

  python -m jaxnmt.main --config=configs/base.py                      # workdir runs/base
  python -m jaxnmt.main --config=configs/base.py --workdir=runs/base4 \
      --config.model.num_encoder_layers=4 --config.optim.learning_rate=5e-4
  NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/local.sh --config=configs/base.py \
      --workdir=runs/base-mp

Measured figures (speed, MFU, memory): BUILD_NOTES.md, "Configs".
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()

  # 'translation' (encoder-decoder on sentence pairs) or 'lm' (decoder-only on text).
  config.task = 'translation'
  # Global seed: parameter init, dropout and the per-epoch shuffle of training data.
  config.seed = 0
  # Number of optimizer updates.
  config.num_train_steps = 100_000
  # Stop training after this many minutes of wall clock (0 = no limit); the model is
  # saved as usual. Useful for fixed-budget runs on small machines.
  config.train_time_limit_minutes = 0.0
  # Write training scalars (loss, lr, grad norm, tokens/s) every this many steps.
  config.log_every_steps = 100
  # Compute the validation loss every this many steps (and at the end).
  config.eval_every_steps = 2_000
  # Save a checkpoint every this many steps (and at the end).
  config.checkpoint_every_steps = 5_000
  # Keep this many newest checkpoints on disk ...
  config.keep_checkpoints = 3
  # ... and, while an eval worker runs, also those it has not scored, unless True.
  config.delete_unscored_checkpoints = False
  # Exponential moving average of the parameters, updated every step with this decay
  # (0 = off; 0.999 to 0.9999 are usual): saved in each checkpoint beside the
  # parameters, and the weights translate, eval and serve use by default when present.
  # Early on the decay is min(ema_decay, (1 + step) / (10 + step)).
  config.ema_decay = 0.0
  # Stop training once this many consecutive checkpoints scored by the eval worker
  # have not raised the best validation BLEU (0 = never; needs a running eval worker).
  config.early_stopping_patience = 0
  # At each validation the trainer greedily translates this many fixed validation
  # sentences into TensorBoard's text tab (0 = none).
  config.num_text_samples = 4
  # On SIGTERM (preemption) every process saves at the same step and exits 0; with
  # several processes they agree on that step every this many steps.
  config.preemption_check_every_steps = 10
  # Random-bit generator of dropout masks (a jax.random implementation):
  # 'threefry2x32' (JAX's default: the same masks on every mesh), 'philox4x32'
  # (cheaper on CPUs; one device only: jax 0.10 cannot shard it), 'rbg' / 'unsafe_rbg'
  # (XLA's RngBitGenerator; the masks depend on the backend and the sharding), or
  # 'auto': philox4x32 on a one-device mesh, else threefry2x32.
  config.dropout_rng = 'auto'
  # Fine-tuning: start a new run (in a fresh workdir) from the weights of another
  # jaxnmt run: its workdir (latest checkpoint), one of its checkpoints
  # (WORKDIR/checkpoints/<step>) or its averaged weights (WORKDIR/averaged/<name>).
  # The run starts at step 0 with a fresh optimizer and learning-rate schedule, and
  # with that run's tokenizer (its data is tokenized with it); the model fields must
  # match. A stopped fine-tuning run resumes from its own checkpoints. '' = off.
  # docs/fine-tuning.md.
  config.init_from = ''
  # Which weights of init_from: 'auto' (the moving average when that run kept one, as
  # translate uses by default; with init_from_optimizer its parameters), 'raw', 'ema',
  # or the name of averaged weights in that workdir (--mode=average).
  config.init_from_weights = 'auto'
  # Keep init_from's optimizer state (Adam's moments and count) instead of a fresh one;
  # the learning-rate schedule still starts over. Needs a checkpoint (not averaged
  # weights) and the same optimizer structure (gradient clipping on or off alike).
  config.init_from_optimizer = False

  # ---------------------------------------------------------------- parallelism
  # Device mesh: sizes of the ('data', 'fsdp', 'tensor') axes; their product must be
  # the number of devices, and one size may be -1 (= the remaining devices).
  # data: batch split; fsdp: batch split and parameters/optimizer state split;
  # tensor: attention heads, MLP hidden units and vocabulary split (Megatron style).
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1
  # Logical axis of each parameter/batch dimension -> comma-separated mesh axes that
  # split it ('' = replicated), e.g. --config.sharding_rules.embed=''.
  config.sharding_rules = ml_collections.ConfigDict()
  config.sharding_rules.batch = 'data,fsdp'
  config.sharding_rules.embed = 'fsdp'
  config.sharding_rules.heads = 'tensor'
  config.sharding_rules.mlp = 'tensor'
  config.sharding_rules.vocab = 'tensor'
  config.sharding_rules.head_dim = ''
  config.sharding_rules.length = ''

  # ---------------------------------------------------------------- data
  config.data = ml_collections.ConfigDict()
  # The training corpora, comma-separated: TSV files of `source<TAB>target` lines
  # (plain, .gz or .zst), a .zip holding one (the Tatoeba spa-eng.zip), or Moses-style
  # prefixes PREFIX (= the line-aligned files PREFIX.<source_lang> and
  # PREFIX.<target_lang>). For task 'lm': one UTF-8 text file. Empty:
  # $JAXNMT_DATA_DIR/<data.filename>, else downloaded from data.url to the cache.
  config.data.path = ''
  config.data.filename = 'spa-eng.zip'
  # Where the default corpus is downloaded from when no local copy exists.
  config.data.url = 'http://storage.googleapis.com/download.tensorflow.org/data/spa-eng.zip'
  # Sampling weights of the corpora in data.path, comma-separated (e.g. '0.9,0.1');
  # empty: in proportion to their sizes (every pair once per epoch).
  config.data.weights = ''
  # Tags (docs/back-translation.md): one tag name per corpus of data.path, '' for none;
  # 'bt' puts the symbol <bt> before each source of that corpus (e.g. ',bt').
  config.data.tags = ''
  # A multilingual model: one target language per corpus; each source then starts with
  # target_tag_format.format(lang) ('<2es>'; '>>{}<<' for OPUS-MT's style).
  config.data.target_langs = ''
  config.data.target_tag_format = '<2{}>'
  # Languages of the files: the first TSV column and PREFIX.<source_lang> are the source.
  config.data.source_lang = 'en'
  config.data.target_lang = 'es'
  # Train target_lang -> source_lang from the same files (es->en here).
  config.data.reverse = False
  # Named test sets scored by the eval worker, comma-separated name=corpus (TSV or
  # PREFIX as above), e.g. 'news=/data/newstest2013'. Their source sentences are kept
  # out of training.
  config.data.test_sets = ''
  # Filters of training pairs (counted in the manifest): longest side in tokens
  # (0 = no limit; longer pairs are otherwise truncated to max_*_length when batched),
  # the ratio longer/shorter side in tokens (0 = off), exact duplicates.
  config.data.filter_max_tokens = 250
  config.data.filter_max_length_ratio = 0.0
  config.data.dedup = False
  # Where the prepared shards, splits and tokenizer live ('' = WORKDIR/data); several
  # runs may share one prepared directory.
  config.data.prepared_dir = ''
  # Training pairs per ArrayRecord shard, and the worker processes that tokenize them
  # (0 = one per core).
  config.data.pairs_per_shard = 100_000
  config.data.prepare_workers = 0
  # Worker processes that pack training batches for each trainer process (0 = pack in
  # the trainer's background thread).
  config.data.pipeline_workers = 0
  # Seed of the train/validation/test split; independent of `seed` so the test set
  # stays the same across training runs.
  config.data.split_seed = 1234
  # Fractions of distinct source sentences held out for validation and test.
  config.data.valid_fraction = 0.01
  config.data.test_fraction = 0.02
  # Each held-out split keeps a uniform sample of at most this many of its pairs (the
  # rest are not trained on either), so a large corpus gives usable eval sets.
  config.data.max_heldout_pairs = 10_000
  # Packed row lengths in tokens: source side (incl. EOS) and target side (incl. BOS/EOS).
  # Sentences longer than this are truncated.
  config.data.max_source_length = 56
  config.data.max_target_length = 64
  # Rows of packed sentence pairs per global batch.
  config.data.batch_size = 64
  # Rows per batch for validation loss and decoding.
  config.data.eval_batch_size = 64
  # First-fit packing of several sentence pairs per row (False: one pair per padded
  # row, for comparison; most of such a batch is padding).
  config.data.packing = True
  # Batches prepared on the devices ahead of the step that uses them, by a background
  # thread (0 = transfer each batch just before its step).
  config.data.prefetch_to_device = 2
  # Write which pairs each step trained on (their global positions in the data order,
  # the same on any number of processes) to WORKDIR/train/pairs_<process>.jsonl: for
  # auditing a resume, or finding the batch behind a loss spike.
  config.data.trace_pairs = False
  # Before training, replace batch_size by the largest power-of-two multiple or
  # fraction of it whose compiled train step fits in device memory (see
  # device_memory_gb); the choice is logged and saved in the workdir's config.
  config.data.fit_batch_to_memory = False
  # Usable memory per device in GiB for fit_batch_to_memory; 0 = what the device
  # reports (GPU/TPU), or this machine's RAM divided among its local devices (CPU).
  config.data.device_memory_gb = 0.0

  # ---------------------------------------------------------------- tokenizer
  config.tokenizer = ml_collections.ConfigDict()
  # Size of the joint (source + target) SentencePiece vocabulary.
  config.tokenizer.vocab_size = 16_000
  # 'unigram' or 'bpe'.
  config.tokenizer.model_type = 'unigram'
  # Sentences sampled (uniformly, while the corpus streams by) from the training split
  # to train SentencePiece (0 = all: memory grows with the corpus).
  config.tokenizer.max_training_sentences = 2_000_000
  # An existing tokenizer model to use instead of training one ('' = train).
  config.tokenizer.path = ''
  # Tag symbols the tokenizer holds although no corpus uses them yet (comma-separated,
  # e.g. '<2de>,<2it>'): tags are fixed when the tokenizer is trained.
  config.tokenizer.reserved_tags = ''

  # ---------------------------------------------------------------- model
  config.model = ml_collections.ConfigDict()
  # Encoder and decoder layers.
  config.model.num_encoder_layers = 6
  config.model.num_decoder_layers = 6
  # Width of the residual stream.
  config.model.d_model = 512
  # Attention heads; d_model must divide by it.
  config.model.num_heads = 8
  # Hidden width of the feed-forward block.
  config.model.d_ff = 2048
  # 'relu', 'gelu' (tanh form), 'gelu_sigmoid' (x * sigmoid(1.702 x)), 'swish'
  # (x * sigmoid(x)) or 'swiglu' (gated), for every model kind.
  config.model.activation = 'relu'
  # 'layernorm' or 'rmsnorm'.
  config.model.norm = 'layernorm'
  # Dropout on residual branches, attention weights and the feed-forward hidden layer.
  config.model.dropout_rate = 0.1
  config.model.attention_dropout_rate = 0.1
  # True: LayerNorm before each sub-layer (pre-LN); False: after the residual (post-LN).
  config.model.pre_layer_norm = True
  # 'sinusoidal' or 'learned' position embeddings, or 'rope' (rotary, in self-attention).
  config.model.position_embedding = 'sinusoidal'
  # Share one embedding matrix between source, target and the output projection.
  config.model.share_embeddings = True
  # Biases on the attention projections (query, key, value, output) and on the logits
  # (Marian / OPUS-MT models have both).
  config.model.attention_bias = False
  config.model.output_bias = False
  # What the decoder reads at position 0: 'bos' (the BOS token's embedding) or 'zeros'
  # (a zero vector plus the position encoding, as Marian / OPUS-MT models).
  config.model.decoder_start = 'bos'
  # Compute dtype 'float32' or 'bfloat16' (params, norms, softmax and logits stay float32).
  config.model.dtype = 'float32'
  # 'einsum' or 'dot_product' (jax.nn.dot_product_attention; no attention dropout).
  config.model.attention = 'einsum'
  # Kernel of 'dot_product': '' (JAX picks), 'xla' or 'cudnn' (GPU flash attention, bf16).
  config.model.attention_implementation = ''
  # Recompute each layer in the backward pass: 'none', 'full' or 'dots' (saves matmuls).
  config.model.remat = 'none'

  # ---------------------------------------------------------------- optimizer
  config.optim = ml_collections.ConfigDict()
  # Peak learning rate, reached after `warmup_steps` of linear warmup.
  config.optim.learning_rate = 7e-4
  config.optim.warmup_steps = 4_000
  # 'rsqrt' (inverse square root after warmup) or 'cosine' (to 0 at num_train_steps).
  config.optim.schedule = 'rsqrt'
  # AdamW.
  config.optim.b1 = 0.9
  config.optim.b2 = 0.98
  config.optim.eps = 1e-9
  config.optim.weight_decay = 0.0
  # Clip the global gradient norm to this value (0 = no clipping).
  config.optim.grad_clip_norm = 1.0
  # Label smoothing of the cross entropy.
  config.optim.label_smoothing = 0.1
  # Split each batch into this many micro-batches whose gradients are summed before one
  # update (same update, less activation memory); batch_size must divide by it.
  config.optim.grad_accum_steps = 1
  # Output layer and loss fused, in this many slices of the target length: the
  # [batch, length, vocab] logits are never held whole (0 = the plain output layer).
  # Same loss and gradients, less step memory (measured: BUILD_NOTES.md, "Speed").
  config.optim.loss_chunks = 8

  # ---------------------------------------------------------------- decoding
  config.decode = ml_collections.ConfigDict()
  # Longest translation, in tokens: max_length_ratio * source tokens + max_length_offset
  # (for any source length: inputs longer than the training length are not truncated).
  config.decode.max_length_ratio = 1.5
  config.decode.max_length_offset = 10

  return config
