"""Every default of the project, typed and commented. No logic, no I/O.

Scripts build their command-line flags from the names below (``IMAGE_SIZE`` becomes
``--image-size``), so editing this file and passing a flag are two ways to say the same thing.
A flag always wins over this file; the resolved values are written next to each output.

What a setting may be is written beside it, under its name plus a suffix, and the same bound is
applied everywhere the setting can come from: a flag, the router's YAML file, a saved
preprocessing spec (``utils.config.check_value``):

* ``NAME_CHOICES``: a tuple of the allowed values (also the flag's argparse choices);
* ``NAME_RANGE``: an interval in the usual notation, a string: ``[`` and ``]`` include the bound,
  ``(`` and ``)`` exclude it, ``inf`` is no bound (always with a parenthesis). ``"[32, 4096]"`` is
  32 <= x <= 4096, ``"[1, inf)"`` is "at least 1", ``"(0, 1)"`` is strictly between 0 and 1. For a
  tuple constant (``WINDOW_PERCENTILES``) it bounds each element. NaN is never inside.

Every numeric constant has one of the two, or is listed in UNBOUNDED of tests/utils/test_config.py
with its reason (that test checks it, so a new setting cannot skip validation), and ``utils.config.check_constants`` refuses defaults below that break
them. Checks that relate two settings (split ratios summing to 1, low < high percentiles,
ROUTER_RETRY_MAX_S >= ROUTER_RETRY_INITIAL_S) are code: ``utils.config.validate`` and
``utils/routing/operations/config.py``.
"""

from __future__ import annotations

# --- Labels ---------------------------------------------------------------------------------
# Order matters: it is the order of the model's outputs. The same code trains any label set
# (e.g. the 22 UNIFESP body parts) by passing --class-names.
CLASS_NAMES: tuple[str, ...] = ("abdominal", "adult_chest", "pediatric_chest", "spine", "others")

# --- Preprocessing spec (saved with every model; see utils/preprocessing.py) ----------------
IMAGE_SIZE: int = 512  # the paper resized every image to 512x512
IMAGE_SIZE_RANGE: str = "[32, 4096]"  # the backbones downsample 32x; 4096^2 is past any X-ray detail
CHANNELS: int = 1  # gray; ImageNet-weight models replicate it to 3 inside the graph. 3 = replicate in the pipeline
CHANNELS_CHOICES: tuple[int, ...] = (1, 3)
ASPECT: str = "stretch"  # "stretch" as the paper did, or "letterbox" (keeps aspect, pads black)
ASPECT_CHOICES: tuple[str, ...] = ("stretch", "letterbox")
# Used only when a DICOM has neither a VOI LUT nor a window: the display range is the
# [low, high] percentile range of the pixels, which ignores burned-in labels and collimation.
WINDOW_PERCENTILES: tuple[float, float] = (0.5, 99.5)
WINDOW_PERCENTILES_RANGE: str = "[0, 100]"

# --- Data -----------------------------------------------------------------------------------
DATA_DIR: str = "data/prepared"  # a prepared dataset: images/ + labels.csv (prepare.py writes it)
DEMO_DIR: str = "data/demo"  # where --demo generates and prepares the synthetic set
RUNS_DIR: str = "runs"  # training runs are written to RUNS_DIR/<backbone>-<timestamp>
SPLIT_RATIOS: tuple[float, float, float] = (0.7, 0.15, 0.15)  # train, val, test
SPLIT_RATIOS_RANGE: str = "[0, 1]"
SEED: int = 42  # the paper's seed; seeds splits, shuffling, augmentation and weights
SEED_RANGE: str = "[0, 4294967295]"  # what numpy (keras.utils.set_random_seed) accepts: 0 .. 2**32 - 1
WORKERS: int = 0  # processes for prepare.py; 0 means one per CPU core
WORKERS_RANGE: str = "[0, inf)"

# --- Untrusted input -----------------------------------------------------------------------
# Declared sizes are checked before anything is allocated or decoded: a 644-byte header can
# declare 20000 x 20000 pixels. The largest projection X-rays (stitched long-leg/spine) are
# about 7000 x 3500; 50 megapixels per frame leaves room and bounds one decode to ~0.4 GB.
MAX_IMAGE_PIXELS: int = 50_000_000  # Rows x Columns x SamplesPerPixel of one frame; larger -> image_too_large
MAX_IMAGE_PIXELS_RANGE: str = "[1, inf)"

# --- Input pipeline -------------------------------------------------------------------------
CACHE: bool = False  # cache decoded images in memory (about 0.8 MB/image at 512x512x3 uint8)
SHUFFLE_BUFFER: int = 2048  # larger than most splits here, so shuffling is close to uniform
SHUFFLE_BUFFER_RANGE: str = "[1, inf)"
AUGMENT_ROTATION_DEG: float = 10.0  # rotation drawn per image in [-r, r]; the paper used 5-10
AUGMENT_ROTATION_DEG_RANGE: str = "[0, 180]"
AUGMENT_BRIGHTNESS: float = 0.1  # additive brightness delta, fraction of the 0-255 range
AUGMENT_BRIGHTNESS_RANGE: str = "[0, 1]"
AUGMENT_CONTRAST: float = 0.1  # contrast factor drawn in [1 - c, 1 + c]
AUGMENT_CONTRAST_RANGE: str = "[0, 1]"  # above 1 the drawn factor could be negative (an inverted image)
HORIZONTAL_FLIP: bool = False  # off: laterality matters on X-rays (the paper flipped, p=0.5)
AUGMENT_SCALE: float = 0.0  # zoom drawn per image in [1 - s, 1 + s] about the centre (0: off, as the paper)
AUGMENT_SCALE_RANGE: str = "[0, 0.5]"
AUGMENT_TRANSLATE: float = 0.0  # shift drawn per image and axis in [-t, t] of the image size (0: off, as the paper)
AUGMENT_TRANSLATE_RANGE: str = "[0, 0.3]"
AUGMENT_SHEAR_DEG: float = 0.0  # horizontal shear drawn per image in [-h, h] degrees (0: off, as the paper)
AUGMENT_SHEAR_DEG_RANGE: str = "[0, 30]"
# The look of other detectors and processing, drawn per image (all 0: off, as the paper):
AUGMENT_GAMMA: float = 0.0  # gamma curve x**exp(u), u drawn in [-g, g] (0.3: gamma 0.74-1.35)
AUGMENT_GAMMA_RANGE: str = "[0, 2]"
AUGMENT_SHARPNESS: float = 0.0  # unsharp-mask amount drawn in [-s, s]: below 0 blurs (-1 = Gaussian sigma 1 px), above 0 sharpens
AUGMENT_SHARPNESS_RANGE: str = "[0, 1]"
AUGMENT_NOISE: float = 0.0  # Gaussian noise whose SD is drawn in [0, n] of the 0-255 range
AUGMENT_NOISE_RANGE: str = "[0, 0.5]"
# How another site renders X-rays (test.py --shift measures what breaks the model): each is a probability per image.
AUGMENT_BORDER: float = 0.0  # collimation borders / letterbox bars: black or white bands up to a fifth of the side deep
AUGMENT_BORDER_RANGE: str = "[0, 1]"
AUGMENT_INVERT: float = 0.0  # the gray scale inverted (a viewer or export that mishandles MONOCHROME1)
AUGMENT_INVERT_RANGE: str = "[0, 0.5]"
AUGMENT_EQUALISE: float = 0.0  # global histogram equalisation (the strong processing some systems apply)
AUGMENT_EQUALISE_RANGE: str = "[0, 1]"
AUGMENT_RESAMPLE: float = 0.0  # a lower-resolution detector or export: shrunk up to RESAMPLE_MAX times, enlarged back
AUGMENT_RESAMPLE_RANGE: str = "[0, 1]"
AUGMENT_JPEG: float = 0.0  # a lossy JPEG export: re-encoded at a quality drawn in [JPEG_QUALITY_MIN, 95]
AUGMENT_JPEG_RANGE: str = "[0, 1]"

# --- Model ----------------------------------------------------------------------------------
BACKBONE: str = "mobilenet_v1"  # the paper's best model; `python training.py --help` lists all
WEIGHTS: str = "none"  # "none" (from scratch, as the paper), "imagenet", or a .keras/.weights.h5 path
DROPOUT: float = 0.2  # dropout before the classification layer
DROPOUT_RANGE: str = "[0, 1)"
BN_MOMENTUM: float = 0.9  # Keras default 0.99 starves from-scratch BN statistics; 0.9 = PyTorch
BN_MOMENTUM_RANGE: str = "[0, 1]"
BN_RECALIBRATION_STEPS: int = 0  # >0: before each validation, refresh BN statistics on N un-augmented train batches
BN_RECALIBRATION_STEPS_RANGE: str = "[0, inf)"

# --- Optimisation (the paper's recipe, read from its code) ----------------------------------
RECIPE: str = "none"  # a preset of the flags below (utils/train/recipes.py): "paper", "small-data"; flags given win; "none": this file alone
EPOCHS: int = 50  # the paper trained 50 epochs and kept the best validation epoch
EPOCHS_RANGE: str = "[1, inf)"
BATCH_SIZE: int = 32  # per replica; the paper used 32
BATCH_SIZE_RANGE: str = "[1, inf)"
MAX_LR: float = 0.01  # one-cycle peak learning rate
MAX_LR_RANGE: str = "[0, inf)"
WARMUP_FRACTION: float = 0.3  # one-cycle: share of steps spent rising to MAX_LR
WARMUP_FRACTION_RANGE: str = "[0, 1)"
LR_START_DIV: float = 25.0  # one-cycle starts at MAX_LR / 25
LR_START_DIV_RANGE: str = "(0, inf)"
LR_FINAL_DIV: float = 1e4  # torch's final_div_factor: the last lr is MAX_LR / LR_START_DIV / 1e4
LR_FINAL_DIV_RANGE: str = "(0, inf)"
WEIGHT_DECAY: float = 1e-4  # coupled L2, as torch Adam(weight_decay=...)
WEIGHT_DECAY_RANGE: str = "[0, inf)"
CLIP_VALUE: float = 0.1  # gradient value clipping
CLIP_VALUE_RANGE: str = "[0, inf)"  # 0 = no clipping
LABEL_SMOOTHING: float = 0.0  # 0 as in the paper; 0.1 can help with noisy labels
LABEL_SMOOTHING_RANGE: str = "[0, 1)"
CLASS_WEIGHTS: bool = False  # weight the loss by inverse class frequency
FREEZE_EPOCHS: int = 0  # with pretrained weights: epochs with the backbone frozen before fine-tuning
FREEZE_EPOCHS_RANGE: str = "[0, inf)"
MIXED_PRECISION: str = "auto"  # "auto" = on when a GPU is present, else off; "on" / "off"
MIXED_PRECISION_CHOICES: tuple[str, ...] = ("auto", "on", "off")
XLA: bool = False  # jit_compile; slower on CPU, sometimes faster on GPU
FOLDS: int = 0  # >= 2: K-fold cross-validation grouped by patient and stratified by label (one run per fold, pooled out-of-fold predictions); 0: train once on the prepared splits
FOLDS_RANGE: str = "[0, 20]"  # 1 is refused: one fold leaves nothing to train on

# --- Fine-tuning (training.py --finetune RUN_DIR: the run's model on new labels, e.g. the router's corrections) --
FINETUNE_EPOCHS: int = 5  # a short schedule: the model already knows the task; --epochs overrides
FINETUNE_EPOCHS_RANGE: str = "[1, inf)"
FINETUNE_MAX_LR: float = 1e-4  # one-cycle peak learning rate of a fine-tune (from scratch: MAX_LR); --max-lr overrides
FINETUNE_MAX_LR_RANGE: str = "(0, inf)"
FINETUNE_REHEARSAL: float = 4.0  # rehearsal: up to this many of the parent run's training images per new training image are mixed back in (stratified by class, seeded) so that the model does not forget; 0 = none
FINETUNE_REHEARSAL_RANGE: str = "[0, inf)"
FINETUNE_FREEZE_BATCHNORM: bool = True  # BatchNorm layers keep the parent's statistics (inference mode) while fine-tuning: a few dozen images would otherwise move them
FINETUNE_HOLDOUT: float = 0.2  # when the new data has no val split, this share of its patients (grouped, stratified, seeded) is held out to validate and calibrate on with the parent's validation set, so that the best epoch, the temperature and the threshold also see the new site; 0 = never
FINETUNE_HOLDOUT_RANGE: str = "[0, 0.5]"
FINETUNE_HOLDOUT_MIN_PATIENTS: int = 20  # ...but only from this many patients of new training data up: fewer corrections all train
FINETUNE_HOLDOUT_MIN_PATIENTS_RANGE: str = "[2, inf)"

# --- Evaluation -----------------------------------------------------------------------------
SPLIT: str = "test"  # which split test.py evaluates
SPLIT_CHOICES: tuple[str, ...] = ("train", "val", "test")
BOOTSTRAP_RESAMPLES: int = 1000  # percentile-bootstrap resamples for every confidence interval
BOOTSTRAP_RESAMPLES_RANGE: str = "[1, inf)"
CONFIDENCE_LEVEL: float = 0.95  # two-sided level of the confidence intervals
CONFIDENCE_LEVEL_RANGE: str = "(0, 1)"
BOOTSTRAP_UNIT: str = "auto"  # "auto" = by patient group when groups are known, else "image"
BOOTSTRAP_UNIT_CHOICES: tuple[str, ...] = ("auto", "group", "image")
MAX_SKIPPED_SHARE: float = 0.01  # test.py fails when more than this share of the listed images cannot be read (a missing codec must not bias the metric); 1 = never fail
MAX_SKIPPED_SHARE_RANGE: str = "[0, 1]"
TARGET_ACCURACY: float = 0.995  # calibration recommends the lowest confidence threshold whose auto-routed images reach this accuracy on the validation split (predict.py / router --threshold auto)
TARGET_ACCURACY_RANGE: str = "(0, 1]"
CALIBRATION_BINS: int = 15  # equal-width confidence bins of the expected calibration error and the reliability diagram
CALIBRATION_BINS_RANGE: str = "[1, 1000]"
OOD_QUANTILE: float = 0.995  # each part of the out-of-distribution score is thresholded at this quantile of the validation split's scores
OOD_QUANTILE_RANGE: str = "[0.5, 1)"
OOD_COMPONENTS: int = 128  # principal components of the first stage's statistics in the OOD score's Mahalanobis distance
OOD_COMPONENTS_RANGE: str = "[1, 512]"
OOD_NEGATIVES_PER_KIND: int = 40  # synthetic non-radiographs per kind (10 kinds) the OOD score's learned part is fitted against; 0 = Mahalanobis only
OOD_NEGATIVES_PER_KIND_RANGE: str = "[0, 1000]"

# --- Backfill (backfill.py: an archive on Ray Data; flags keep these names without the prefix) ----
BACKFILL_WORKERS: int = 0  # decoding actors, 1 CPU each; 0: the cluster's CPUs less the inference actors'
BACKFILL_WORKERS_RANGE: str = "[0, inf)"
BACKFILL_INFERENCE_WORKERS: int = 1  # actors holding the model
BACKFILL_INFERENCE_WORKERS_RANGE: str = "[1, inf)"
BACKFILL_INFERENCE_CPUS: float = 1.0  # CPUs reserved per inference actor
BACKFILL_INFERENCE_CPUS_RANGE: str = "[0, inf)"
BACKFILL_INFERENCE_GPUS: float = 0.0  # GPUs per inference actor (Keras on a GPU node)
BACKFILL_INFERENCE_GPUS_RANGE: str = "[0, inf)"
BACKFILL_ROWS_PER_FILE: int = 1000  # rows per Parquet part
BACKFILL_ROWS_PER_FILE_RANGE: str = "[1, inf)"
BACKFILL_NUM_CPUS: int = 0  # CPUs Ray offers when it starts on this machine; 0: all cores
BACKFILL_NUM_CPUS_RANGE: str = "[0, inf)"
BACKFILL_CORRECTION_THRESHOLD: float = 0.95  # propose a tag correction only at this confidence or above
BACKFILL_CORRECTION_THRESHOLD_RANGE: str = "[0, 1]"
# DICOMweb sources (dicomweb+https://host/dicom-web?from=YYYYMMDD&to=YYYYMMDD, utils/backfill/dicomweb.py): QIDO-RS
# lists, WADO-RS fetches. Secrets come from a file or an environment variable on each Ray node, never the URL or a flag.
BACKFILL_DICOMWEB_USER: str = ""  # HTTP basic user for DICOMweb sources (password: --dicomweb-password-file or -env); empty: a token or nothing
BACKFILL_DICOMWEB_PASSWORD_ENV: str = "BACKFILL_DICOMWEB_PASSWORD"  # environment variable holding that user's password
BACKFILL_DICOMWEB_PASSWORD_FILE: str = ""  # file holding that password (wins over the variable)
BACKFILL_DICOMWEB_TOKEN_ENV: str = "BACKFILL_DICOMWEB_TOKEN"  # environment variable holding a bearer token (used without a user)
BACKFILL_DICOMWEB_TOKEN_FILE: str = ""  # file holding a bearer token (wins over the variable)
BACKFILL_DICOMWEB_CA: str = ""  # PEM bundle that verifies an https archive; empty: the system's
BACKFILL_DICOMWEB_CERT: str = ""  # client certificate (PEM) for an archive that asks for one
BACKFILL_DICOMWEB_KEY: str = ""  # its private key, when not in the certificate file
BACKFILL_DICOMWEB_TIMEOUT_S: float = 60.0  # an archive silent this long on one request has failed it
BACKFILL_DICOMWEB_TIMEOUT_S_RANGE: str = "(0, 3600]"
BACKFILL_DICOMWEB_RETRIES: int = 2  # a request unanswered or answered 429/5xx is tried again this often (after 1 s, 2 s...)
BACKFILL_DICOMWEB_RETRIES_RANGE: str = "[0, 10]"
BACKFILL_DICOMWEB_PAGE_SIZE: int = 100  # QIDO-RS results asked per request (limit); at most the archive's own cap
BACKFILL_DICOMWEB_PAGE_SIZE_RANGE: str = "[1, 100000]"
BACKFILL_DICOMWEB_LIST_THREADS: int = 4  # studies whose series and instances are listed at once
BACKFILL_DICOMWEB_LIST_THREADS_RANGE: str = "[1, 64]"
BACKFILL_DICOMWEB_MAX_INSTANCE_MB: int = 2048  # a larger instance is not fetched (a fetch_failed row)
BACKFILL_DICOMWEB_MAX_INSTANCE_MB_RANGE: str = "[1, 1000000]"
BACKFILL_DICOMWEB_MODALITIES: tuple[str, ...] = ("CR", "DX", "DR", "RG")  # series listed, by Modality (the header guard's); * = every series

# --- Demo -----------------------------------------------------------------------------------
DEMO_IMAGES_PER_CLASS: int = 40  # synthetic DICOMs per class for --demo
DEMO_IMAGES_PER_CLASS_RANGE: str = "[1, inf)"
DEMO_IMAGE_SIZE: int = 128  # --demo trains at this size so it finishes in minutes on a CPU
DEMO_IMAGE_SIZE_RANGE: str = IMAGE_SIZE_RANGE  # it is the demo spec's image_size
DEMO_BACKBONE: str = "mobilenet_v1"  # backbone trained by --demo
DEMO_EPOCHS: int = 8  # epochs trained by --demo (about a minute on 2 CPU cores)
DEMO_EPOCHS_RANGE: str = "[1, inf)"

# --- Predict and router ---------------------------------------------------------------------
THRESHOLD: float = 0.5  # top probability below this -> label "uncertain" (the manual-review route)
THRESHOLD_RANGE: str = "[0, 1]"
SORT_MODE: str = "copy"  # how --sort-into places files: "copy", "hardlink" (same disk) or "symlink"
SORT_MODE_CHOICES: tuple[str, ...] = ("copy", "hardlink", "symlink")
COLOUR_SHARE_LIMIT: float = 0.02  # a DICOM with more of its pixels coloured is out_of_distribution (X-rays are gray; coloured burned-in marks stay below); 1 = off
COLOUR_SHARE_LIMIT_RANGE: str = "[0, 1]"
PROJECTION_ONLY: bool = True  # predict/test/backfill: a DICOM whose Modality is not CR/DX/DR/RG is not_projection_radiography, never shown to the model
DECODE_WORKERS: int = 0  # decoders for predict.py, test.py and the router; 0 = 1 process per core, or 2 threads per core (at most 8)
DECODE_WORKERS_RANGE: str = "[0, inf)"
DECODE_POOL: str = "processes"  # "processes": a file that hangs or crashes a codec costs only its row; "threads": trusted files only
DECODE_POOL_CHOICES: tuple[str, ...] = ("processes", "threads")
DECODE_TIMEOUT_S: float = 30.0  # a file whose decoding takes longer is given up (its worker process is killed): reason decode_timeout
DECODE_TIMEOUT_S_RANGE: str = "(0, inf)"
DECODE_MEMORY_LIMIT_MB: int = 4096  # address-space cap of each decoding process; a file needing more fails alone (0 = no cap)
DECODE_MEMORY_LIMIT_MB_RANGE: str = "[0, inf)"  # 0 = no cap
DECODE_THREADS: int = 0  # OpenJPEG threads per JPEG 2000 frame; 0 = cores / decoding processes (1 when each core has one)
DECODE_THREADS_RANGE: str = "[0, 64]"
ROUTER_AE_TITLE: str = "BODYPART_ROUTER"  # the router's own AE title (16 characters at most)
ROUTER_HOST: str = "0.0.0.0"  # address the router listens on; 127.0.0.1 keeps it local
ROUTER_PORT: int = 11112  # the router's DICOM port (11112 is the registered non-privileged one)
ROUTER_PORT_RANGE: str = "[1, 65535]"
ROUTER_SPOOL_DIR: str = "router-spool"  # received files, the queue database and the audit log
ROUTER_BATCH_SIZE: int = 16  # most images classified in one model call
ROUTER_BATCH_SIZE_RANGE: str = "[1, inf)"
ROUTER_BATCH_WAIT_MS: int = 200  # wait at most this long for a batch to fill before classifying
ROUTER_BATCH_WAIT_MS_RANGE: str = "[0, inf)"
ROUTER_MAX_ASSOCIATIONS: int = 10  # simultaneous incoming associations
ROUTER_MAX_ASSOCIATIONS_RANGE: str = "[1, inf)"
ROUTER_RETRY_INITIAL_S: float = 2.0  # first retry delay when a destination fails; doubles each time
ROUTER_RETRY_INITIAL_S_RANGE: str = "(0, inf)"
ROUTER_RETRY_MAX_S: float = 60.0  # longest delay between retries (a down destination is retried forever)
ROUTER_RETRY_MAX_S_RANGE: str = "(0, inf)"  # and at least ROUTER_RETRY_INITIAL_S (utils/routing/operations/config.py)
ROUTER_MAX_ATTEMPTS: int = 10  # an object its destination refuses this often is marked failed (kept in spool)
ROUTER_MAX_ATTEMPTS_RANGE: str = "[1, inf)"
ROUTER_MAX_CLASSIFY_ATTEMPTS: int = 3  # an object whose classification dies this often (crash, kill) goes to "unreadable"
ROUTER_MAX_CLASSIFY_ATTEMPTS_RANGE: str = "[1, inf)"
ROUTER_MODE: str = "route"  # "shadow": classify and record, but forward by the site's existing rule (the shadow: block)
ROUTER_MODE_CHOICES: tuple[str, ...] = ("route", "shadow")
# Free-space reserve on the spool's filesystem: below it new objects are refused (0xA700, the sender
# keeps its copy) while classification and forwarding go on, so the spool drains instead of deadlocking.
ROUTER_MIN_FREE_MB: int = 100  # room to drain (database commits, audit lines, quarantine copies); objects in flight are counted on top; 0 = off
ROUTER_MIN_FREE_MB_RANGE: str = "[0, inf)"
ROUTER_MIN_FREE_PERCENT: float = 0.0  # also keep this % of the filesystem free (the larger of the two counts); 0 = off
ROUTER_MIN_FREE_PERCENT_RANGE: str = "[0, 50]"
# Drift (utils/routing/operations/drift.py): the model's decisions of the last hour and day against its validation set
ROUTER_DRIFT_MIN_IMAGES: int = 50  # a window with fewer model decisions claims nothing
ROUTER_DRIFT_MIN_IMAGES_RANGE: str = "[1, inf)"
ROUTER_DRIFT_P_VALUE: float = 0.001  # a drift test alarms below this p-value
ROUTER_DRIFT_P_VALUE_RANGE: str = "(0, 0.5]"
# TLS (the ``tls:`` block of the router's YAML and each destination's ``tls:``, utils/routing/tls.py): the switches'
# defaults; the blocks' keys are these names without the ROUTER_TLS_ prefix. Certificates have no default.
ROUTER_TLS_REQUIRE_CLIENT_CERT: bool = True  # the router's port: senders must show a certificate signed by its ca
ROUTER_TLS_CHECK_HOSTNAME: bool = True  # a destination's certificate must name its host (or server_hostname)
# DICOMweb destinations (a destination ``{dicomweb: URL, ...}`` in the router's YAML, utils/routing/delivery/dicomweb.py):
# objects sent by STOW-RS. The destination's keys are these names without the ROUTER_DICOMWEB_ prefix.
ROUTER_DICOMWEB_TIMEOUT_S: float = 60.0  # connecting, or waiting for the next bytes of an answer, longer than this: down
ROUTER_DICOMWEB_TIMEOUT_S_RANGE: str = "(0, 3600]"
ROUTER_DICOMWEB_BATCH: int = 16  # objects sent in one STOW-RS request at most
ROUTER_DICOMWEB_BATCH_RANGE: str = "[1, 64]"  # 64: the objects a forwarder takes from the queue at a time
ROUTER_DICOMWEB_BATCH_MB: int = 64  # ... and megabytes at most (a larger object goes alone)
ROUTER_DICOMWEB_BATCH_MB_RANGE: str = "[1, 4096]"
# The Orthanc source (``orthanc_source:`` block of the router's YAML, utils/routing/intake/orthanc_source.py): the router
# follows an Orthanc's /changes feed and fetches each new instance itself (a durable hand-off; Orthanc's own
# forwarding jobs are not retried). These are the block's keys without the ROUTER_ORTHANC_ prefix.
ROUTER_ORTHANC_POLL_S: float = 1.0  # once caught up, ask Orthanc for new changes this often
ROUTER_ORTHANC_POLL_S_RANGE: str = "(0, 3600]"
ROUTER_ORTHANC_BATCH: int = 100  # changes asked for per /changes request (Orthanc answers at most its own cap)
ROUTER_ORTHANC_BATCH_RANGE: str = "[1, 1000]"
ROUTER_ORTHANC_TIMEOUT_S: float = 30.0  # one REST request to Orthanc longer than this counts as Orthanc unreachable
ROUTER_ORTHANC_TIMEOUT_S_RANGE: str = "(0, 600]"
ROUTER_ORTHANC_START_FROM: str = "latest"  # a new spool begins at Orthanc's latest change, or at its first ("beginning")
ROUTER_ORTHANC_START_FROM_CHOICES: tuple[str, ...] = ("latest", "beginning")
ROUTER_ORTHANC_MODALITIES: tuple[str, ...] = ("CR", "DX", "DR", "RG")  # series Modality fetched; () = every instance
ROUTER_ORTHANC_PASSWORD_ENV: str = "ROUTER_ORTHANC_PASSWORD"  # the environment variable with the Orthanc password (or password_file)
# Prometheus metrics (the ``metrics:`` block of the router's YAML, utils/routing/operations/metrics.py): off unless the block is
# there; the block's keys are these names without the ROUTER_METRICS_ prefix. Needs the prometheus-client package.
ROUTER_METRICS_HOST: str = "127.0.0.1"  # address /metrics listens on; local unless configured (no authentication)
ROUTER_METRICS_PORT: int = 9108  # /metrics port (Prometheus exporters' convention: a 91xx port of one's own)
ROUTER_METRICS_PORT_RANGE: str = "[1, 65535]"
# The web console (the ``console:`` block of the router's YAML, utils/routing/operations/console.py): off unless the block is
# there; the block's keys are these names without the ROUTER_CONSOLE_ prefix. Needs starlette, uvicorn, jinja2,
# python-multipart. Actions need the token (from an environment variable or a file, never the YAML) or a user.
ROUTER_CONSOLE_HOST: str = "127.0.0.1"  # address the console listens on; local unless configured
ROUTER_CONSOLE_PORT: int = 8108  # the console's port
ROUTER_CONSOLE_PORT_RANGE: str = "[0, 65535]"  # 0: any free port (tests)
ROUTER_CONSOLE_ALLOWED_HOSTS: tuple[str, ...] = ()  # Host names served (DNS rebinding); (): bind address, localhost
ROUTER_CONSOLE_TRUSTED_PROXIES: tuple[str, ...] = ()  # reverse proxies in front; any: every page needs login
ROUTER_CONSOLE_TOKEN_ENV: str = "ROUTER_CONSOLE_TOKEN"  # environment variable holding the operators' token
ROUTER_CONSOLE_SESSION_HOURS: float = 8.0  # a login ends this long after it, however much it is used
ROUTER_CONSOLE_SESSION_HOURS_RANGE: str = "(0, 168]"
ROUTER_CONSOLE_IDLE_MINUTES: float = 30.0  # ... or earlier, after this long without a request
ROUTER_CONSOLE_IDLE_MINUTES_RANGE: str = "(0, 10080]"
ROUTER_CONSOLE_MAX_FAILURES: int = 10  # failed authentications a client address may make before 429 ...
ROUTER_CONSOLE_MAX_FAILURES_RANGE: str = "[1, 1000]"
ROUTER_CONSOLE_FAILURE_WINDOW_S: float = 300.0  # ... given back at MAX_FAILURES per this many seconds
ROUTER_CONSOLE_FAILURE_WINDOW_S_RANGE: str = "(0, 86400]"
ROUTER_CONSOLE_REVIEW_DAYS: float = 30.0  # copies of objects under review (spool/review/) are kept this long
ROUTER_CONSOLE_REVIEW_DAYS_RANGE: str = "(0, 3650]"
ROUTER_CONSOLE_REVIEW_MAX_MB: int = 2000  # ... and at most this much of them, oldest deleted first
ROUTER_CONSOLE_REVIEW_MAX_MB_RANGE: str = "[1, 10000000]"
# STOW-RS intake (the ``stow:`` block of the router's YAML, utils/routing/intake/stow.py): off unless the block is there;
# the block's keys are these names without the ROUTER_STOW_ prefix. POST /studies on a port of its own, into the same
# spool as C-STORE. Senders authenticate with the token (environment variable or file) or a user of users_file;
# without either the port may listen on a loopback address only.
ROUTER_STOW_HOST: str = "127.0.0.1"  # address STOW-RS listens on; local unless configured
ROUTER_STOW_PORT: int = 8104  # the STOW-RS port (HTTP, or HTTPS with the block's tls)
ROUTER_STOW_PORT_RANGE: str = "[0, 65535]"  # 0: any free port (tests)
ROUTER_STOW_TOKEN_ENV: str = "ROUTER_STOW_TOKEN"  # environment variable holding the senders' bearer token
ROUTER_STOW_MAX_REQUEST_MB: int = 2048  # largest request body (one study, all its parts); larger: 413
ROUTER_STOW_MAX_REQUEST_MB_RANGE: str = "[1, 1000000]"
ROUTER_STOW_MAX_INSTANCE_MB: int = 1024  # largest single part (one instance); larger: that part fails (A700)
ROUTER_STOW_MAX_INSTANCE_MB_RANGE: str = "[1, 1000000]"
ROUTER_STOW_MAX_CONCURRENT: int = 4  # uploads received at once; one more is answered 503 with Retry-After
ROUTER_STOW_MAX_CONCURRENT_RANGE: str = "[1, 256]"
ROUTER_STOW_MAX_FAILURES: int = 10  # failed authentications a client address may make before 429 ...
ROUTER_STOW_MAX_FAILURES_RANGE: str = "[1, 1000]"
ROUTER_STOW_FAILURE_WINDOW_S: float = 300.0  # ... given back at MAX_FAILURES per this many seconds
ROUTER_STOW_FAILURE_WINDOW_S_RANGE: str = "(0, 86400]"
