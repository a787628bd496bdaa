"""Default experiment: ML-ECS on the embedded activity dataset, 8 edge clients.

Run: python launch/train.py --config=configs/default.py --workdir=/tmp/ml_ecs
Override any field with --config.FIELD=VALUE, e.g. --config.data.num_clients=20.

Seeds: `seed` is the training seed (backbone pretraining, model initialisation, client
sampling and batches); `data.seed` is the partition seed (public split, client modality
sets, label skew, train/test split, missing-sample masks). Vary them separately.
Every field is checked by ml_ecs.config.validation.validate before any work is done.
"""
import ml_collections


def backbone(width: int, layers: int, heads: int, max_len: int = 32, hf: str = '',
             frozen_dtype: str = 'float32') -> ml_collections.ConfigDict:
  """hf: '' = our own decoder, pretrained on the task text; else a Hugging Face GPT-2-family
  hub name or checkpoint directory, whose config then decides width/layers/heads/mlp/max_len
  (ml_ecs/backbones/resolve.py); the LoRA fields stay these. frozen_dtype: how the frozen weights
  are held on each device, 'float32' or 'bfloat16' (half the bytes; computed with in float32)."""
  return ml_collections.ConfigDict(dict(
      width=width, layers=layers, heads=heads, mlp_ratio=4, max_len=max_len,
      lora_rank=4, lora_alpha=8.0, lora_targets=('qkv', 'attn_out', 'mlp_in', 'mlp_out'), hf=hf,
      frozen_dtype=frozen_dtype))


def model(backbone_cfg: ml_collections.ConfigDict, encoder_width: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      encoder_width=encoder_width, d_enc=32, adapter_rank=4, lora_alpha=8.0, d_fuse=64, d_z=32,
      prompt_len=4, backbone=backbone_cfg))


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                      # training seed (see the module docstring)
  c.data = ml_collections.ConfigDict(dict(
      name='embedded',            # 'embedded', 'synthetic', 'urfall', 'npz', 'hf' or 'tfds' (ml_ecs/data/loaders.py)
      path='',                    # file or directory of local files for the other sources
      split='train',              # split read by 'hf' / 'tfds'
      columns=ml_collections.ConfigDict(dict(
          modalities=(),          # 'name' or 'name=column' entries; () = every array-valued column
          label='label', sequence_id='', text='')),   # '' = none (one sequence per sample / class names)
      class_names=(),             # names of plain integer labels
      synthetic_recordings=0,     # data.name='synthetic': recordings of the latent model (0 = enough for num_clients)
      synthetic_windows=10,       # data.name='synthetic': windows (samples) per recording
      num_clients=8,
      public_fraction=0.2,        # of all sequences; shared by server and clients
      max_public_sequences=0,     # caps the public split at this many sequences (0 = no cap): a fixed cloud
                                  # dataset whatever the federation's size (the server encodes it every round)
      public_test_fraction=0.3,   # of the public sequences; the server's test split
      client_test_fraction=0.25,  # of each client's sequences
      test_order='recordings',    # order of the test splits, whose first eval.max_test_per_client (max_server_test)
                                  # windows are scored: 'recordings' (dataset order: whole recordings, the first
                                  # few) or 'interleaved' (round-robin over every test recording)
      client_val_fraction=0.0,    # of each client's training sequences (and of the public train split): tuning only
      public_holdout_fraction=0.1,  # of the public training sequences, held out of all training: every node's
                                  # SE-CCL reliability (LM loss) is measured on these same labelled samples
      dirichlet_alpha=0.5,
      modality_sets=(),           # explicit per-client modality tuples; empty = draw
      num_device_types=3,         # clients of one type share modalities + encoders (a cohort); 0 = all differ
      modality_missing_rate=0.3,  # per device type (or client) and modality, when drawn
      sample_missing_rate=0.1,    # per sample and present modality
      public_per_client=128,
      label_fraction=1.0,         # of each client's private training windows that carry their answer text;
                                  # the rest is unlabelled: no LM loss, still used by CCL (modality-to-
                                  # modality term when the anchor is text, ml_ecs/losses/ccl.py)
      public_labels=True,         # False: clients see the public split unlabelled (public stage = SE-CCL only)
      server_label_fraction=1.0,  # of the server's public training samples that carry their answer text
      seed=0,                     # partition seed
      modality_seed=-1,           # >= 0: draws the modality sets apart from the partition seed (-1: from it)
      encoders=ml_collections.ConfigDict(dict(
          accel=('conv1d', 'transformer', 'mlp'),
          depth=('mlp',),
          image=('mlp', 'conv1d'),
      )),
  ))
  c.text = ml_collections.ConfigDict(dict(
      vocab_size=384, instruction='describe the activity:', instr_len=10, answer_len=12))
  c.edge_model = model(backbone(width=64, layers=2, heads=4), encoder_width=32)
  c.server_model = model(backbone(width=128, layers=4, heads=4), encoder_width=64)
  c.pretrain = ml_collections.ConfigDict(dict(
      steps=300, batch_size=32, learning_rate=3e-3,
      corpus='answers',           # 'answers': the answer paraphrases; 'generic': random word sequences over
  ))                              # the answers' vocabulary, never an answer sentence (ml_ecs/backbones/pretrain.py)
  c.train = ml_collections.ConfigDict(dict(
      rounds=30, client_fraction=1.0, public_steps=4, private_steps=12, server_steps=12,
      batch_size=16, learning_rate=3e-3, weight_decay=0.0, clip_norm=1.0, eval_every=5,
      server_learning_rate=3e-3,  # the server stage's (peak) rate: one value for every method, never tuned per
                                  # method (train.learning_rate is the clients'); the server trains the same
                                  # architecture under every method, so methods differ only in what it sees
      lr_schedule='warmup_cosine',  # 'constant' or 'warmup_cosine' (per stage optimizer, over rounds x its steps)
      warmup_steps=10,            # linear warm-up steps of 'warmup_cosine' (capped below the total)
      host_state=False,           # True: cohort state/data stay in host numpy, only each round's sampled block
                                  # goes to the devices (large federations, small client_fraction)
      client_chunk=8,             # clients per vmapped block inside a cohort (lax.map); 0 = one vmap
      conv_impl='auto',           # convolutions: 'xla' (lax.conv), 'matmul' (windows @ kernel, ml_ecs/models/conv.py)
                                  # or 'auto' (the faster, measured per cohort at setup and cached)
      checkpoint_every=5,         # rounds between checkpoints; the last round is always saved (0 = only it)
      keep_checkpoints=2,         # newest checkpoints kept (>= 2: a corrupt newest falls back)
      # Simulated faults (ml_ecs/core/faults.py), drawn from the round key (deterministic, resume-exact):
      dropout_rate=0.0,           # P(a sampled client fails after training, before its upload)
      straggler_rate=0.0,         # P(a sampled client is slow): its time is 1 + Exp(straggler_slowdown)
      straggler_slowdown=2.0,     # mean extra time of a straggler, in units of a normal client's round time
      deadline=1.5,               # the server waits this long (same unit); later uploads are late
      straggler_policy='drop',    # late uploads: 'drop', or 'discount' (weight x deadline / time)
  ))
  # Robust aggregation of the shared-LoRA updates (update = uploaded shared - global before the round).
  c.aggregation = ml_collections.ConfigDict(dict(
      clip_norm=0.0,              # clip each client's update to this L2 norm (0 = off)
      rule='mean',                # 'mean' (MMA weights), 'norm_outlier' (reject norm > median + k * MAD),
                                  # 'trimmed_mean' or 'median' (coordinate-wise, unweighted)
      outlier_k=3.0,              # k of 'norm_outlier'
      trim_fraction=0.1,          # fraction trimmed at each end by 'trimmed_mean'
  ))
  # Central DP (DP-FedAvg) of the aggregated shared LoRA; see docs/faults_and_privacy.md.
  c.dp = ml_collections.ConfigDict(dict(
      enabled=False,
      clip_norm=1.0,              # per-client update clipping bound S
      noise_multiplier=1.0,       # z: Gaussian noise std = z * S * (largest client weight / total weight)
      delta=1e-5,
      accountant='rdp',           # 'rdp' or 'pld' (dp-accounting)
      noise_representations=False,  # also clip + noise the SE-CCL representations the server aggregates
      repr_clip_norm=1.0,         # per-client bound on the L2 norm of its uploaded representation matrix
      repr_noise_multiplier=1.0,
  ))
  c.method = ml_collections.ConfigDict(dict(
      name='ml_ecs',              # a strategy of ml_ecs/algorithms/registry.py; the main job and the grid apply it
                                  # (method fields given on the command line override the strategy's)
      # CCL (ml_ecs/losses/ccl.py)
      ccl='gram',                 # 'gram', 'infonce' or 'none'
      lambda_ccl=0.1, tau_ccl=0.2,
      ccl_anchor='text',          # GRAM anchor: 'text' (answer-text embedding, as GRAM) or 'modality' (node's first)
      # AMT (ml_ecs/algorithms/ml_ecs/amt.py)
      amt=True,                   # private LoRA + gates; False = shared LoRA only
      gates='convex',             # 'convex': g*shared + (1-g)*private; 'scaled': 2*sigmoid per adapter (original)
      gate_init=2.0,              # convex gate logit at init: g = sigmoid(2) = 0.88 toward shared
      # MMA (ml_ecs/algorithms/ml_ecs/mma.py)
      modality_params='projection',  # modality-specific shared parameters: 'projection' (same init on every
                                     # holder, from modality name + seed) or 'adapter' (original LoRA adapters)
      mma_backbone='samples',     # backbone shared LoRA weights: 'samples', 'modality', 'modality_samples'
      mma_modality='observations',  # modality leaves: 'observations' (present samples), 'client', 'samples'
      # SE-CCL (ml_ecs/algorithms/ml_ecs/se_ccl.py)
      se_ccl=True, lambda_se_ccl=0.5, tau_se_ccl=0.2,
      se_ccl_head='mlp',          # 'mlp': align a private projection head's output, 'none': align z itself
      se_ccl_warmup=2,            # no alignment (either side) before this 0-based round
      se_ccl_reliability='lm',    # 'lm': align only to sides whose LM loss is <= one's own; 'none'
      fedprox_mu=0.0,             # FedProx proximal weight on the shared LoRA
      communicate=True,           # False = local-only training
      zero_fill=False,            # baseline fusion: zero-filled missing modalities
      modality_dropout=0.0,       # baseline: drop present modalities in training batches
  ))
  c.eval = ml_collections.ConfigDict(dict(
      max_test_per_client=64, max_server_test=256,
      split='test',               # 'val': evaluate on the validation splits (tuning), never the test data
      clients_per_eval=0,         # clients decoded per evaluation (0 = all), drawn per cohort from (seed, round);
                                  # rows report client/evaluated beside the client means
      final_full=False,           # with clients_per_eval: the last round's evaluation decodes every client
  ))
  # The client axis of every cohort is sharded over this many devices (0 = all visible).
  c.mesh = ml_collections.ConfigDict(dict(num_devices=0))
  return c
