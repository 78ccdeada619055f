"""The training machinery every BLIP task script shares.

A task script (train_retrieval.py, train_caption.py, ...) reads like the task: data, model,
epoch loop, evaluation, logging. Everything around that lives here:

- command line and config: the original's arguments plus `--resume` and `KEY=VALUE`
  overrides, the engine's config keys with defaults that reproduce the original, checks
  that fail before any training starts (`parse_args_and_config`, `check_paths`);
- set-up: distributed mode (only under torchrun), device, seeding with seed + rank (`setup`);
- the model: DDP only when a process group exists (`wrap_model`), activation
  checkpointing of the text layers (`set_text_grad_checkpointing`);
- one training epoch (`train_one_epoch`): mixed precision (`amp`), gradient accumulation
  (`accum_steps`, no DDP gradient sync on the non-final micro-steps), optional clipping
  (`clip_grad_norm`), a stop on a NaN/Inf loss, progress with ETA;
- checkpoints: `checkpoint_best.pth` in the original's format (`save_model`),
  `checkpoint_last.pth` every epoch with everything needed to continue
  (`save_last_checkpoint`, `resume`), written atomically between the epoch's training and its
  evaluation (`mark_evaluated` records that the evaluation finished); `log.txt` /
  `evaluate.txt` JSON lines (`log_json`), in step with the checkpoint on resume.

Resume works at epoch granularity: a run killed mid-epoch restarts that epoch from the
state saved at the end of the previous one (model, optimizer, scaler, counters, best metric,
RNG states), so it continues as the uninterrupted run would have.
"""
import contextlib
import datetime
import inspect
import json
import math
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import utils

# New config keys. Their defaults reproduce the original scripts, so official configs run
# unchanged; they are passed to utils.load_config as `defaults`, so overriding them from the
# command line is allowed.
ENGINE_DEFAULTS = {
    'amp': 'none',            # 'bf16' | 'fp16' | 'none' (float32, as the original)
    'accum_steps': 1,         # micro-batches per optimizer step (global batch = bs * world * accum)
    'clip_grad_norm': None,   # max global gradient norm; None: no clipping (the original)
    'text_grad_ckpt': False,  # activation checkpointing of the text transformer layers
    'num_workers': 4,         # data loader workers per split (the original's value)
    'check_images': 'exists',  # before training, every image exists and opens: full | exists | off
    'save_safetensors': False,  # also write checkpoint_best.safetensors (the weights alone)
    'keep_previous_last': True,  # keep the epoch before as checkpoint_last_previous.pth: an auto-resume
                                 # falls back to it when checkpoint_last.pth is damaged (twice the disk)
    'synthetic': None,        # toy configs: {root, seed, num_images, ...} of data/synthetic.py,
                              # generated on first use (see prepare_synthetic_data)
}
AMP_MODES = ('none', 'bf16', 'fp16')

# Numeric keys the scripts read, and the values that mean something: (integer?, lowest, whether
# the lowest itself is allowed, highest). check_config applies them to every key a config has.
VALUE_RULES = {
    'max_epoch': (True, 1, True, None), 'batch_size': (True, 1, True, None),
    'batch_size_train': (True, 1, True, None), 'batch_size_test': (True, 1, True, None),
    'num_workers': (True, 0, True, None), 'image_size': (True, 1, True, None),
    'queue_size': (True, 1, True, None), 'embed_dim': (True, 1, True, None),
    'k_test': (True, 0, True, None),  # 0: rank by ITC alone
    'rerank_batch_size': (True, 1, True, None), 'num_frm_test': (True, 1, True, None),
    'num_beams': (True, 1, True, None), 'max_length': (True, 1, True, None),
    'min_length': (True, 0, True, None), 'vit_ckpt_layer': (True, 0, True, None),
    'warmup_steps': (True, 0, True, None),
    'init_lr': (False, 0, True, None), 'min_lr': (False, 0, True, None),
    'warmup_lr': (False, 0, True, None), 'weight_decay': (False, 0, True, None),
    'lr_decay_rate': (False, 0, False, 1), 'alpha': (False, 0, True, 1),
    'momentum': (False, 0, True, 1),
    'num_captions': (True, 1, True, None), 'top_p': (False, 0, False, 1),
    'itm_threshold': (False, 0, True, 1), 'chunk_size': (True, 1, True, None),
}

LAST_CHECKPOINT = 'checkpoint_last.pth'
EVALUATED = 'checkpoint_last_evaluated.pth'  # small: what the evaluation after checkpoint_last changed
PREVIOUS_CHECKPOINT = 'checkpoint_last_previous.pth'  # the checkpoint_last.pth before, while keep_previous_last
BEST_CHECKPOINT = 'checkpoint_best.pth'


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite: the run stops before the optimizer step."""


# --------------------------------------------------------------------------- command line

def _add_engine_args(parser):
    parser.add_argument('--no_auto_resume', action='store_true',
                        help=f'do not continue from {LAST_CHECKPOINT} in --output_dir')


def parse_args_and_config(description, default_config, default_output_dir, defaults=None,
                          required=(), known=None, argv=None, add_args=None):
    """The original's command line plus --resume and config overrides; returns (args, config).

    Arguments (utils.add_common_args): --config, --output_dir, --evaluate, --device, --seed,
    --world_size, --dist_url, --distributed, --resume (alias --checkpoint), --no_auto_resume,
    and KEY=VALUE / a.b.c=VALUE overrides (trailing words or after --opts).
    defaults: the task's optional config keys with the values that reproduce the original
        (merged with ENGINE_DEFAULTS under the file's values; overrides of them are allowed).
    required: keys the task reads that have no default (a missing one is an error naming it).
    known: when given, every key of the file must be in known, required or the defaults; an
        override may add a key of known that the file lacks.
    add_args(parser): script-specific arguments.
    """
    all_defaults = {**ENGINE_DEFAULTS, **(defaults or {})}

    def add_all_args(parser):
        _add_engine_args(parser)
        if add_args is not None:
            add_args(parser)

    # --help ends with the calling script's examples (the command lines of its docstring)
    caller_doc = inspect.currentframe().f_back.f_globals.get('__doc__') or ''
    examples = [line.strip() for line in caller_doc.splitlines() if line.startswith(('    python', '    torchrun'))]
    epilog = '\n\n'.join(part for part in (
        'examples:\n' + '\n'.join(f'  {line}' for line in examples) if examples else '',
        _config_keys_help(required, all_defaults)) if part)
    args, config = utils.parse_args_and_config(description, default_config, default_output_dir,
                                               defaults=all_defaults, argv=argv, add_args=add_all_args,
                                               epilog=epilog, optional=known or ())
    check_config(config, args.config, required, known, all_defaults)
    return args, config


def _config_keys_help(required, defaults):
    """--help's list of the config keys a script reads: the ones the file must set, and the
    ones with defaults (what KEY=VALUE overrides change when the file does not set them)."""
    def wrapped(words):
        lines, line = [], ' '
        for word in words:
            if len(line) + len(word) > 88:
                lines.append(line)
                line = ' '
            line += f' {word}'
        return '\n'.join(lines + [line])
    parts = []
    if required:
        parts.append('config keys the file must set:\n' + wrapped(sorted(required)))
    if defaults:
        parts.append('config keys with defaults (when the file does not set them; KEY=VALUE overrides):\n'
                     + wrapped(f'{key}={json.dumps(value)}' for key, value in sorted(defaults.items())))
    return '\n\n'.join(parts)


def check_config(config, path, required=(), known=None, defaults=ENGINE_DEFAULTS):
    """Missing required keys, unknown keys (when `known` is given) and engine values."""
    utils.require_keys(config, required, path)
    if known is not None:
        valid = set(known) | set(required) | set(defaults) | set(ENGINE_DEFAULTS)
        unknown = sorted(set(config) - valid)
        if unknown:
            raise utils.ConfigError(f"config file {path}: unknown key(s) {', '.join(unknown)}; "
                                    f"valid keys: {', '.join(sorted(valid))}")
    for key, rule in VALUE_RULES.items():
        if key in config:
            check_value(config[key], key, path, *rule)
    if config['amp'] not in AMP_MODES:
        raise utils.ConfigError(f"config file {path}: amp must be one of {', '.join(AMP_MODES)}; "
                                f"got {config['amp']!r}")
    accum = config['accum_steps']
    if not isinstance(accum, int) or isinstance(accum, bool) or accum < 1:
        raise utils.ConfigError(f'config file {path}: accum_steps must be an integer >= 1; got {accum!r}')
    clip = config['clip_grad_norm']
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip <= 0):
        raise utils.ConfigError(f'config file {path}: clip_grad_norm must be a positive number '
                                f'or null; got {clip!r}')


def check_images(datasets, config):
    """Every image of the datasets exists and opens, before any work (`check_images` mode), so
    an epoch is never lost to a missing val/test image. Every rank checks (each then fails alike,
    none waits at a collective for one that failed)."""
    from data.utils import check_image_files
    files = [item for dataset in datasets if hasattr(dataset, 'image_files') for item in dataset.image_files()]
    check_image_files(files, config.get('check_images', 'exists'))


def check_value(value, key, path, integer, lowest, lowest_allowed=True, highest=None):
    """ConfigError naming key, value and file unless value is a number in the allowed range."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = is_number and math.isfinite(value) and (not integer or isinstance(value, int))
    ok = ok and (value >= lowest if lowest_allowed else value > lowest) and (highest is None or value <= highest)
    if not ok:
        kind = 'an integer' if integer else 'a number'
        bounds = f"{'>=' if lowest_allowed else '>'} {lowest}" + (f' and <= {highest}' if highest is not None else '')
        raise utils.ConfigError(f'config file {path} (or its command-line overrides): {key} must be {kind} '
                                f'{bounds}; got {value!r}')


# --------------------------------------------------------------------------- set-up

def setup(args, config):
    """Distributed mode, device, seeds and the config copy, in the original's order; returns the device.

    Fails before any work for a --resume file that does not exist or a CUDA device that is
    not there. Under torchrun each rank gets its own GPU (LOCAL_RANK).
    """
    if args.resume and not os.path.isfile(args.resume):
        raise FileNotFoundError(f'--resume: checkpoint {args.resume!r} does not exist')
    if str(args.device).startswith('cuda') and not torch.cuda.is_available():
        raise RuntimeError(f'--device {args.device}: CUDA is not available here; use --device cpu')
    utils.init_distributed_mode(args)
    device = torch.device(args.device)
    if device.type == 'cuda' and args.distributed:
        device = torch.device('cuda', args.gpu)

    # fix the seed for reproducibility (each rank its own stream, as the original)
    utils.set_seed(args.seed + utils.get_rank())
    torch.backends.cudnn.benchmark = True

    os.makedirs(args.output_dir, exist_ok=True)
    if utils.is_main_process():
        remove_stale_temporaries(args.output_dir)
        utils.save_config(config, args.output_dir)
    return device


def remove_stale_temporaries(output_dir):
    """Delete the temporary files an atomic save leaves when its process is killed mid-write
    (`.NAME.XXXX.tmp` beside NAME); the files they were to replace are intact."""
    for name in sorted(os.listdir(output_dir)):
        if name.startswith('.') and name.endswith('.tmp') and os.path.isfile(os.path.join(output_dir, name)):
            os.remove(os.path.join(output_dir, name))
            print(f'removed {os.path.join(output_dir, name)}, left by a save that was killed mid-write')


def is_url(value):
    return isinstance(value, str) and value.startswith(('http://', 'https://'))


def _cached_download(url):
    # where models.blip.download_cached_file keeps the URL's file (None if unknown)
    try:
        from models.blip import cached_checkpoint_path
    except ImportError:
        return None
    return cached_checkpoint_path(url)


def check_url(url, what, timeout=20):
    """Fail early for a checkpoint URL that is not cached and cannot be fetched.

    A HEAD request: 404/410 or an unreachable host is an error naming the URL; other answers
    (some servers refuse HEAD) are left to the downloader.
    """
    cached = _cached_download(url)
    if cached and os.path.isfile(cached):
        return
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method='HEAD'), timeout=timeout):
            pass
    except urllib.error.HTTPError as error:
        if error.code in (404, 410):
            raise FileNotFoundError(f'{what}: checkpoint URL {url} does not exist '
                                    f'(HTTP {error.code})') from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, 'reason', error)
        raise FileNotFoundError(f'{what}: checkpoint URL {url} cannot be reached ({reason}); '
                                f'download it by hand and set the key to the file') from None


def prepare_synthetic_data(config):
    """Generate the synthetic shapes dataset a toy config names, the first time it is used.

    config['synthetic'] = {root, seed, num_images, ...} (keyword arguments of
    data.synthetic.make_synthetic). Runs before any process group exists, so concurrent
    torchrun processes serialise on a lock file; the finished marker (root/synthetic.json,
    written last) tells the others it is done. A dataset written by an older version of
    data/synthetic.py is written again. A no-op for real-data configs.
    """
    spec = config.get('synthetic')
    if not spec:
        return
    spec = dict(spec)
    root = spec.pop('root')
    from data import synthetic

    def finished():
        try:
            with open(os.path.join(root, 'synthetic.json'), encoding='utf-8') as f:
                return json.load(f).get('version') == synthetic.DATA_VERSION
        except (OSError, ValueError):
            return False

    if finished():
        return
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    with open(os.path.abspath(root) + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not finished():
            print(f'generating the synthetic dataset in {root} (version {synthetic.DATA_VERSION})',
                  flush=True)
            marker = os.path.join(root, 'synthetic.json')
            if os.path.exists(marker):
                os.remove(marker)  # an interrupted regeneration must not look finished
            synthetic.make_synthetic(root, **spec)


def check_paths(config, config_path, dirs=(), files=()):
    """Fail before any work for a data folder or checkpoint that does not exist.

    dirs: keys naming folders (image_root, ...); files: keys naming checkpoint files or URLs
    (pretrained, ...). Empty values are skipped. A toy config's synthetic dataset is
    generated first (prepare_synthetic_data).
    """
    prepare_synthetic_data(config)
    for key in dirs:
        path = config.get(key)
        if path and not os.path.isdir(path):
            raise FileNotFoundError(f'{config_path}: {key}: data folder {path!r} does not exist')
    for key in files:
        path = config.get(key)
        if not path:
            continue
        if is_url(path):
            check_url(path, f'{config_path}: {key}')
        elif not os.path.isfile(path):
            raise FileNotFoundError(f'{config_path}: {key}: checkpoint {path!r} does not exist')


# --------------------------------------------------------------------------- model

def wrap_model(model, args, find_unused_parameters=False):
    """(model, model_without_ddp): DDP only when a process group exists."""
    if not utils.is_dist_avail_and_initialized():
        return model, model
    device_ids = [args.gpu] if next(model.parameters()).is_cuda else None
    # No buffer broadcast from rank 0 before every forward: BLIP's only changing buffers are
    # the ITC queues, which every rank updates identically from gathered features (at full
    # size they are ~118 MB, which DDP would otherwise copy at every step). They must start
    # equal, though (each rank built its random queues from its own seed): broadcast once.
    if 'forward_sync_buffers' in inspect.signature(DistributedDataParallel).parameters:
        no_forward_sync = {'forward_sync_buffers': False}
    else:
        no_forward_sync = {'broadcast_buffers': False}
    ddp = DistributedDataParallel(model, device_ids=device_ids,
                                  find_unused_parameters=find_unused_parameters, **no_forward_sync)
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    return ddp, model


def set_text_grad_checkpointing(model, enabled=True):
    """Turn activation checkpointing of the text transformer layers on or off.

    The text stacks (models/med.py, nlvr_encoder.py) carry the `gradient_checkpointing` flag
    of transformers' encoders; the visual encoder has its own switch (vit_grad_ckpt) set at
    construction, so it is left alone. Returns the number of stacks changed.
    """
    changed = 0
    for name, module in model.named_modules():
        if name.startswith('visual_encoder'):
            continue
        if isinstance(getattr(module, 'gradient_checkpointing', None), bool):
            module.gradient_checkpointing = enabled
            changed += 1
    if enabled and changed == 0:
        raise ValueError(f'text_grad_ckpt: {type(model).__name__} has no text layers that '
                         f'support activation checkpointing')
    return changed


def prepare_training(model, args, config, device):
    """Everything between building a task's model and its epoch loop, the same for every task.

    Moves the model to the device, turns on text activation checkpointing when the config
    asks (text_grad_ckpt), wraps it in DDP when a process group exists, builds the original's
    AdamW (init_lr, weight_decay) and the GradScaler (amp), and resumes (--resume or the output
    folder's last checkpoint). Returns (model, model_without_ddp, optimizer, scaler, state).
    """
    if args.evaluate and not args.resume:  # (a --resume checkpoint replaces every weight)
        require_trained_weights(model, config)
    model = model.to(device)
    if config['text_grad_ckpt']:
        set_text_grad_checkpointing(model)
    model, model_without_ddp = wrap_model(model, args)
    optimizer = torch.optim.AdamW(params=model.parameters(), lr=config['init_lr'],
                                  weight_decay=config['weight_decay'])
    scaler = make_grad_scaler(config, device)
    state = resume(args, model_without_ddp, optimizer, scaler)
    return model, model_without_ddp, optimizer, scaler, state


def require_trained_weights(model, config):
    """For evaluation: refuse a `pretrained` checkpoint that lacks weights of the model, which
    would be evaluated at their random initial values (e.g. a captioning checkpoint given to
    train_retrieval.py --evaluate). Fine-tuning loads such checkpoints as the original does
    (the missing heads are listed as newly initialised when loading)."""
    if not config.get('pretrained'):
        return
    from models.blip import require_weights

    source, msg = getattr(model, 'loaded_from', (config['pretrained'], None))
    if msg is not None:
        require_weights(model, msg, source, 'they would be evaluated at their random initial values. '
                                            'Is it a checkpoint of this task? (Fine-tuning from it is allowed.)')


# --------------------------------------------------------------------------- precision

def autocast(config, device):
    """The autocast context the config asks for (a no-op for amp: none)."""
    amp = config.get('amp', 'none')
    if amp == 'none':
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == 'bf16' else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(config, device):
    """A GradScaler, enabled for fp16 on CUDA only (bf16 and float32 need none)."""
    enabled = config.get('amp', 'none') == 'fp16' and device.type == 'cuda'
    return torch.amp.GradScaler(device.type, enabled=enabled)


# --------------------------------------------------------------------------- training

@dataclass
class TrainState:
    """Counters that survive a restart (stored in checkpoint_last.pth)."""
    start_epoch: int = 0     # the next epoch to run
    global_step: int = 0     # optimizer steps taken so far
    best: float = 0.0        # best validation metric so far (what the task compares)
    best_epoch: int = 0
    extra: dict = field(default_factory=dict)  # task values to keep (plain types), e.g. test metrics at the best epoch
    # resumed between the training of epoch start_epoch and the end of its evaluation: the
    # training stats it logs (the script evaluates that epoch without training it again)
    train_stats: Optional[dict] = None


def resumed_train_stats(state, epoch):
    """The training stats of `epoch` when this run resumed after training it but before its
    evaluation finished (then only its evaluation runs), else None (train it)."""
    return state.train_stats if epoch == state.start_epoch else None


def set_epoch(data_loader, epoch):
    """Reshuffle a distributed sampler for this epoch (no-op for other samplers)."""
    sampler = getattr(data_loader, 'sampler', None)
    if hasattr(sampler, 'set_epoch'):
        sampler.set_epoch(epoch)


def _check_finite(loss_values, epoch, i, global_step):
    for name, value in loss_values.items():
        if not math.isfinite(value):
            message = (f'{name} is {value} at epoch {epoch}, iteration {i} (after {global_step} '
                       f'optimizer steps): stopping before the optimizer step. Checkpoints '
                       f'already written were left as they were; lower the learning rate or '
                       f'use amp=bf16/none, then rerun to continue from {LAST_CHECKPOINT}.')
            print(message, flush=True)
            raise NonFiniteLossError(message)


def train_one_epoch(model, data_loader, optimizer, epoch, device, config, loss_fn, *,
                    scaler=None, state=None, lr_fn=None, header=None, print_freq=50,
                    window_size=1, stats_fmt='{:.3f}', loss_weights=None):
    """Train one epoch; return the averaged meters as the original's strings.

    loss_fn(model, batch, epoch, i, num_iters) -> dict of named scalar losses; the engine
        sums them (each times loss_weights[name], default 1; the logs show them unweighted),
        scales for accumulation and backpropagates (i: micro-batch index).
    lr_fn(step): called before each optimizer step with the step index within the epoch
        (the original's per-iteration warm-up); per-epoch schedules stay in the script.
    state: TrainState whose global_step is advanced.
    """
    model.train()
    accum_steps = config.get('accum_steps', 1)
    clip = config.get('clip_grad_norm')
    scaler = scaler if scaler is not None else torch.amp.GradScaler(device.type, enabled=False)
    state = state if state is not None else TrainState()
    is_ddp = isinstance(model, DistributedDataParallel)

    metric_logger = utils.MetricLogger(delimiter='  ')
    metric_logger.add_meter('lr', utils.SmoothedValue(window_size=window_size, fmt='{value:.6f}'))
    header = header or f'Train Epoch: [{epoch}]'
    num_iters = len(data_loader)
    epoch_start = time.time()

    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(metric_logger.log_every(data_loader, print_freq, header)):
        # micro-batches are grouped into optimizer steps; a short last group is averaged over
        # its own size, so every step sees the mean gradient of the samples it covers
        group_start = i - i % accum_steps
        group_size = min(accum_steps, num_iters - group_start)
        is_step = i == group_start + group_size - 1
        if lr_fn is not None and i == group_start:
            lr_fn(i // accum_steps)

        # gradients are all-reduced only on the micro-batch that ends an optimizer step
        sync = model.no_sync() if (is_ddp and not is_step) else contextlib.nullcontext()
        with sync:
            with autocast(config, device):
                losses = loss_fn(model, batch, epoch, i, num_iters)
            loss = sum(value if loss_weights is None else loss_weights.get(name, 1.0) * value
                       for name, value in losses.items())
            scaler.scale(loss / group_size).backward()

        loss_values = {name: value.item() for name, value in losses.items()}
        _check_finite(loss_values, epoch, i, state.global_step)

        if is_step:
            if clip is not None:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                metric_logger.update(grad_norm=grad_norm.item())
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state.global_step += 1

        for name in loss_values:
            if name not in metric_logger.meters:
                metric_logger.add_meter(name, utils.SmoothedValue(window_size=window_size, fmt='{value:.4f}'))
        metric_logger.update(**loss_values)
        metric_logger.update(lr=optimizer.param_groups[0]['lr'])

    # gather the stats from all processes
    metric_logger.synchronize_between_processes()
    print('Averaged stats:', metric_logger.global_avg())
    _print_progress(epoch, config.get('max_epoch'), time.time() - epoch_start)
    return {k: stats_fmt.format(meter.global_avg) for k, meter in metric_logger.meters.items()}


def _print_progress(epoch, max_epoch, seconds):
    """'epoch N/M' and the training time the remaining epochs will take at this epoch's pace."""
    took = datetime.timedelta(seconds=int(seconds))
    if not max_epoch:
        print(f'epoch {epoch + 1} trained in {took}')
        return
    left = max_epoch - epoch - 1
    print(f'epoch {epoch + 1}/{max_epoch} trained in {took}'
          + (f'; the other {left} epoch(s) take about {datetime.timedelta(seconds=int(seconds * left))} '
             f'more (training only)' if left > 0 else '; training done'), flush=True)


# --------------------------------------------------------------------------- checkpoints

def _rng_state():
    """This process's RNG states in plain types (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': (kind, keys.tolist(), pos, has_gauss, cached),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    random.setstate(state['python'])
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _gather_rng_states():
    """Every rank's RNG states, indexed by rank (a collective under DDP)."""
    own = _rng_state()
    if not utils.is_dist_avail_and_initialized():
        return [own]
    states = [None] * utils.get_world_size()
    dist.all_gather_object(states, own)
    return states


def save_model(path, model_without_ddp, optimizer, config, epoch):
    """The original's checkpoint ({'model', 'optimizer', 'config', 'epoch'}), atomically, main only."""
    if utils.is_main_process():
        utils.save_checkpoint({
            'model': model_without_ddp.state_dict(),
            'optimizer': optimizer.state_dict(),
            'config': config,
            'epoch': epoch,
        }, path)


def save_last_checkpoint(output_dir, model_without_ddp, optimizer, scaler, config, epoch, state,
                         train_stats=None):
    """Write checkpoint_last.pth for a finished epoch. Call on every rank (gathers RNG states).

    Holds model (queues are buffers, so they are in it), optimizer, scaler, epoch, global
    step, best metric and epoch, every rank's RNG states (python, numpy, torch, cuda) and
    the config. `model` / `epoch` keep the original layout, so it also loads as `pretrained`.
    train_stats: given when written between training and evaluation (so a failing evaluation
    never costs the epoch): a resumed run then evaluates that epoch first (resumed_train_stats),
    unless mark_evaluated recorded that its evaluation finished.
    """
    rng_states = _gather_rng_states()
    if utils.is_main_process():
        utils.save_checkpoint({
            'model': model_without_ddp.state_dict(),
            'optimizer': optimizer.state_dict(),
            'scaler': scaler.state_dict() if scaler is not None else None,
            'config': config,
            'epoch': epoch,
            'global_step': state.global_step,
            'best': state.best,
            'best_epoch': state.best_epoch,
            'extra': state.extra,
            'rng_states': rng_states,
            **({'evaluated': False, 'train_stats': train_stats} if train_stats is not None else {}),
        }, os.path.join(output_dir, LAST_CHECKPOINT),
            keep_previous=os.path.join(output_dir, PREVIOUS_CHECKPOINT) if config.get('keep_previous_last', True)
            else None)
    utils.barrier()


def mark_evaluated(output_dir, epoch, state):
    """After the evaluation of an epoch whose checkpoint_last.pth was written before it: save what
    the evaluation changed (best metric and epoch, extra, every rank's RNG states) in a small
    file beside it, so a resumed run continues at the next epoch without evaluating again.
    Call on every rank."""
    rng_states = _gather_rng_states()
    if utils.is_main_process():
        utils.save_checkpoint({'epoch': epoch, 'global_step': state.global_step, 'best': state.best,
                               'best_epoch': state.best_epoch, 'extra': state.extra, 'rng_states': rng_states},
                              os.path.join(output_dir, EVALUATED))
    utils.barrier()


def _evaluated_state(path, checkpoint):
    """The evaluation state saved by mark_evaluated for this very checkpoint, or None."""
    evaluated = os.path.join(os.path.dirname(path), EVALUATED)
    if not os.path.isfile(evaluated):
        return None
    try:
        saved = utils.load_checkpoint_file(evaluated)
    except utils.CheckpointError:
        return None  # cut by a kill: the evaluation is redone
    same = saved.get('epoch') == checkpoint['epoch'] and saved.get('global_step') == checkpoint.get('global_step')
    return saved if same else None


def find_resume_checkpoint(args):
    """--resume, else the output folder's checkpoint_last.pth when present (training only)."""
    if args.resume:
        return args.resume
    if args.evaluate or getattr(args, 'no_auto_resume', False):
        return ''
    for name in (LAST_CHECKPOINT, PREVIOUS_CHECKPOINT):  # the previous alone: killed between two renames
        path = os.path.join(args.output_dir, name)
        if os.path.isfile(path):
            return path
    return ''


def _load_auto_resumed(path, output_dir):
    """checkpoint_last.pth, or, when it is damaged, the previous one kept beside it (the
    damaged file is renamed *.damaged, so the next save keeps the good one); (path, checkpoint)."""
    try:
        return path, utils.load_checkpoint_file(path)
    except (utils.CheckpointError, FileNotFoundError) as error:
        previous = os.path.join(output_dir, PREVIOUS_CHECKPOINT)
        fallback = None
        if os.path.abspath(path) != os.path.abspath(previous) and os.path.isfile(previous):
            try:
                fallback = utils.load_checkpoint_file(previous)
            except utils.CheckpointError:
                pass
        if fallback is None:
            raise utils.CheckpointError(
                f"cannot resume from the output folder's last checkpoint: {error}. To start this run afresh "
                f"in the same folder, pass --no_auto_resume (the file is then overwritten at the end of the "
                f"first epoch)") from error
        utils.barrier()  # every rank has read the folder before the main one renames
        if utils.is_main_process() and os.path.isfile(path):
            os.replace(path, path + '.damaged')
        print(f"WARNING: {error}. Resuming from {previous} instead (epoch {fallback.get('epoch')}, the "
              f"checkpoint before it); the damaged file is kept as {path}.damaged", flush=True)
        return previous, fallback


def resume(args, model_without_ddp, optimizer=None, scaler=None):
    """Continue from --resume or the output folder's last checkpoint; returns a TrainState.

    Call after building model and optimizer, right before the epoch loop (the RNG states
    are restored last, so the next epoch draws what the uninterrupted run would have).
    With --evaluate only the model weights are loaded.
    """
    path = find_resume_checkpoint(args)
    if not path:
        return TrainState()
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--resume: checkpoint {path!r} does not exist')
    if args.resume:
        checkpoint = utils.load_checkpoint_file(path)
    else:
        path, checkpoint = _load_auto_resumed(path, args.output_dir)
    if not isinstance(checkpoint, dict) or 'model' not in checkpoint:
        raise ValueError(f"--resume: {path} is not a training checkpoint (no 'model' entry); "
                         f"to start from its weights, set pretrained={path}")
    model_without_ddp.load_state_dict(checkpoint['model'])
    if args.evaluate:
        print(f'loaded model weights from {path} (epoch {checkpoint["epoch"]})')
        return TrainState()
    missing = [k for k in ('optimizer', 'epoch') if k not in checkpoint]
    if missing:
        raise ValueError(f'--resume: {path} has no {", ".join(missing)}: it is not a training '
                         f'checkpoint; to start from its weights, set pretrained={path}')
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint['optimizer'])
    if scaler is not None and checkpoint.get('scaler'):
        scaler.load_state_dict(checkpoint['scaler'])
    # The original's per-epoch checkpoints (pretrain.py's --checkpoint) hold only model,
    # optimizer, config and epoch: they resume too, with RNG streams from --seed.
    rng_states = checkpoint.get('rng_states')
    if rng_states is None:
        print(f'resume: {path} holds no RNG states (an original-format checkpoint): RNG streams '
              f'continue from --seed, not from where the run stopped')
    elif len(rng_states) == utils.get_world_size():
        _set_rng_state(rng_states[utils.get_rank()])
    else:
        print(f'resume: {path} was written by {len(rng_states)} process(es), this run has '
              f'{utils.get_world_size()}: RNG states not restored (seeds from --seed)')
    state = TrainState(start_epoch=checkpoint['epoch'] + 1, global_step=checkpoint.get('global_step', 0),
                       best=checkpoint.get('best', 0.0), best_epoch=checkpoint.get('best_epoch', 0),
                       extra=checkpoint.get('extra') or {})
    pending = checkpoint.get('evaluated') is False  # saved between training and evaluation
    evaluated = _evaluated_state(path, checkpoint) if pending else None
    if evaluated is not None:  # its evaluation finished too
        state.best, state.best_epoch, state.extra = evaluated['best'], evaluated['best_epoch'], evaluated['extra']
        if len(evaluated['rng_states']) == utils.get_world_size():
            _set_rng_state(evaluated['rng_states'][utils.get_rank()])
    if pending and evaluated is None:
        state.start_epoch, state.train_stats = checkpoint['epoch'], checkpoint['train_stats']
        print(f'resumed from {path}: epoch {checkpoint["epoch"]} trained, {state.global_step} optimizer steps; '
              f'evaluating epoch {checkpoint["epoch"]} (its evaluation had not finished), then continuing at '
              f'epoch {checkpoint["epoch"] + 1}')
    else:
        print(f'resumed from {path}: epoch {checkpoint["epoch"]} done, {state.global_step} optimizer '
              f'steps; continuing at epoch {state.start_epoch}')
    if utils.is_main_process():
        drop_log_lines_from(args.output_dir, state.start_epoch)
    return state


def drop_log_lines_from(output_dir, epoch, filename='log.txt'):
    """Keep log.txt in step with the checkpoint a run resumes from: a run killed after logging
    an epoch but before its checkpoint_last.pth was written redoes that epoch, so its line (and
    any later one) goes; the redone epoch writes it again."""
    path = os.path.join(output_dir, filename)
    if not os.path.isfile(path):
        return
    with open(path, encoding='utf-8') as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            line_epoch = json.loads(line).get('epoch')
        except (ValueError, AttributeError):
            continue  # a line cut by the kill
        if not isinstance(line_epoch, int) or line_epoch < epoch:
            kept.append(line if line.endswith('\n') else line + '\n')
    if kept != lines:
        with open(path + '.tmp', 'w', encoding='utf-8') as f:
            f.writelines(kept)
        os.replace(path + '.tmp', path)
        print(f'{path}: {len(lines) - len(kept)} line(s) of epoch {epoch} or later removed (they are redone)')


# --------------------------------------------------------------------------- logging

def split_stats(**splits):
    """Every split's stats in one flat dict, each key prefixed by its split's name, in the
    order given: split_stats(train={'loss': ...}, val={'acc': ...}) ->
    {'train_loss': ..., 'val_acc': ...} (the original's log.txt keys)."""
    return {f'{split}_{key}': value for split, stats in splits.items() for key, value in stats.items()}


def update_best(state, score, epoch, output_dir, model_without_ddp, optimizer, config, save=True):
    """The original's checkpoint_best.pth rule: when `score` beats every earlier epoch's
    (strictly, so the first of equal epochs stays), record it in `state` and, with `save`,
    write the checkpoint. Returns whether it improved."""
    if not score > state.best:
        return False
    state.best, state.best_epoch = score, epoch
    if save:
        save_model(os.path.join(output_dir, BEST_CHECKPOINT), model_without_ddp, optimizer, config, epoch)
        if config.get('save_safetensors') and utils.is_main_process():
            # the weights alone, safe to share and load anywhere a .pth goes (pretrained:, predict.py)
            utils.save_safetensors(model_without_ddp.state_dict(),
                                   os.path.join(output_dir, BEST_CHECKPOINT.replace('.pth', '.safetensors')))
    return True


def print_elapsed(start_time, what='Training time'):
    """The original's closing line: `what` and the time since start_time as H:MM:SS."""
    print(f'{what} {datetime.timedelta(seconds=int(time.time() - start_time))}')


def log_json(output_dir, stats, filename='log.txt'):
    """Append one JSON line to output_dir/filename (main process only), as the original."""
    if utils.is_main_process():
        with open(os.path.join(output_dir, filename), 'a') as f:
            f.write(json.dumps(stats) + '\n')


def end_epoch(device):
    """What the original does between epochs (a barrier only when a group exists)."""
    utils.barrier()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
