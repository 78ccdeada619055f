"""Shared helpers for the BLIP task scripts.

- distributed: optional. Without torchrun's environment variables everything runs as one
  process with no process group, and every helper below degrades to the single-process
  answer (gathers return their input, barriers do nothing).
- logging: `SmoothedValue` and `MetricLogger` print running averages with an ETA.
- learning-rate schedules: the original's cosine, warm-up and step formulas.
- seeding and atomic checkpoint writes.
- configs: YAML in (ruamel.yaml's `YAML(typ='safe')`), typed command-line overrides of any
  key, a copy written to the output folder; errors name the file and the key at fault.
"""
import argparse
import atexit
import builtins
import copy
import datetime
import errno
import json
import math
import os
import pickle
import random
import shutil
import sys
import tempfile
import time
import zipfile
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError


# ---------------------------------------------------------------------------------------
# Distributed (optional)
# ---------------------------------------------------------------------------------------

def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def setup_for_distributed(is_master):
    """Silence print() on every process but the master; print(..., force=True) still prints."""
    builtin_print = getattr(builtins.print, "_blip_original_print", builtins.print)

    def print(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    print._blip_original_print = builtin_print
    builtins.print = print


def init_distributed_mode(args):
    """Join the process group torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK.

    Sets args.distributed, args.rank, args.world_size, args.gpu (and args.dist_backend).
    Without those variables: one process, no process group, args.distributed = False.
    NCCL when args.device is CUDA, gloo otherwise (CPU runs and tests).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print("Not using distributed mode")
        args.distributed = False
        args.rank, args.world_size, args.gpu = 0, 1, 0
        return

    args.rank = int(os.environ["RANK"])
    args.world_size = int(os.environ["WORLD_SIZE"])
    args.gpu = int(os.environ.get("LOCAL_RANK", 0))
    args.distributed = True

    device = torch.device(getattr(args, "device", None) or default_device())
    init_kwargs = {}
    if device.type == "cuda":
        torch.cuda.set_device(args.gpu)
        args.dist_backend = "nccl"
        init_kwargs["device_id"] = torch.device("cuda", args.gpu)
    else:
        args.dist_backend = "gloo"
    dist_url = getattr(args, "dist_url", None) or "env://"
    minutes = getattr(args, "dist_timeout", None)
    minutes = DIST_TIMEOUT_MINUTES if minutes is None else minutes
    if not minutes > 0:
        raise ValueError(f"--dist_timeout must be a positive number of minutes, got {minutes}")
    timeout = datetime.timedelta(minutes=minutes)

    print(f"| distributed init (rank {args.rank}, world {args.world_size}, "
          f"backend {args.dist_backend}): {dist_url}", flush=True)
    if not dist.is_initialized():
        # the rendezvous init_process_group would do, kept: the rank monitor shares its store
        store, _, _ = next(dist.rendezvous(dist_url, args.rank, args.world_size, timeout=timeout))
        store.set_timeout(timeout)
        dist.init_process_group(backend=args.dist_backend, store=store, world_size=args.world_size,
                                rank=args.rank, timeout=timeout, **init_kwargs)
        start_rank_monitor(store, args.rank, args.world_size, timeout.total_seconds())
    barrier()
    setup_for_distributed(args.rank == 0)


# A collective that a frozen rank never joins fails only after --dist_timeout, and its error
# ("Timed out waiting 600000ms for recv operation") names no rank. So every process also runs a
# thread that ticks a key of the job's store and watches the others' ticks: the first process
# to notice that one stopped ticking (SIGSTOP, a hung machine, a lost network) names it.
DIST_TIMEOUT_MINUTES = 10  # evaluation gathers wait at most this for the slowest rank
_MONITOR = {"doing": "starting", "stop": None, "publish": None, "thread": None}


def report_progress(doing):
    """What this process is doing, e.g. 'training epoch 3, step 120' (named when it stops)."""
    _MONITOR["doing"] = doing


def _monitor_intervals(timeout_seconds):
    """(seconds between ticks, seconds without a tick after which a rank is reported)."""
    interval = min(10.0, max(0.5, timeout_seconds / 60))
    return interval, 6 * interval


def start_rank_monitor(store, rank, world_size, timeout_seconds):
    """Start this process's monitor thread (a daemon; it ends with the process or the store)."""
    import socket
    import threading
    interval, stale_after = _monitor_intervals(timeout_seconds)
    board = dist.PrefixStore("blip_rank_monitor", store)
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    stop = threading.Event()
    _MONITOR["stop"] = stop

    def publish(tick, **extra):
        board.set(f"rank{rank}", json.dumps({**me, "tick": tick, "doing": _MONITOR["doing"], **extra}))
    _MONITOR["publish"] = publish

    def watch():
        seen = {}  # rank -> (its last tick, when this process saw it change)
        reported = set()
        tick = 0
        try:
            while not stop.is_set():
                tick += 1
                publish(tick)
                now = time.monotonic()
                stalled = {}
                for other in range(world_size):
                    key = f"rank{other}"
                    if other == rank or not board.check([key]):
                        continue
                    beat = json.loads(board.get(key))
                    if beat.get("done"):
                        continue
                    if seen.get(other, (None,))[0] != beat["tick"]:
                        seen[other] = (beat["tick"], now)
                    elif now - seen[other][1] > stale_after:
                        stalled[other] = (beat, now - seen[other][1])
                # the lowest rank still ticking speaks, once per stall
                speaker = min(r for r in range(world_size) if r not in stalled)
                for other, (beat, quiet) in stalled.items():
                    if speaker == rank and other not in reported:
                        sys.stderr.write(
                            f"rank {other} (host {beat['host']}, pid {beat['pid']}) has not responded for "
                            f"{quiet:.0f} s; it was {beat['doing']}. It is frozen or stopped, or its machine "
                            f"cannot be reached: the other ranks wait for it at their next collective, and the "
                            f"job fails when --dist_timeout ({timeout_seconds / 60:g} min) has passed\n")
                        sys.stderr.flush()
                reported = set(stalled)
                stop.wait(interval)
        except Exception:  # the store is gone (the job is ending): nothing left to watch
            return

    thread = threading.Thread(target=watch, name="blip-rank-monitor", daemon=True)
    _MONITOR["thread"] = thread
    thread.start()
    atexit.register(stop_rank_monitor)


def stop_rank_monitor():
    """Tell the other ranks this one finished (so its silence is not reported); called at exit."""
    stop = _MONITOR["stop"]
    if stop is not None and not stop.is_set():
        stop.set()
        # joined, not left running: a daemon thread still inside a store call while the
        # interpreter shuts down aborts the process ("terminate called without an active exception")
        _MONITOR["thread"].join(timeout=10)
        try:
            _MONITOR["publish"](-1, done=True)
        except Exception:  # rank 0's store already closed: the job is over anyway
            pass


def barrier():
    """Wait for every process; a no-op without a process group."""
    if not is_dist_avail_and_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@torch.no_grad()
def concat_all_gather(tensor):
    """Concatenate `tensor` from every process along dim 0. No gradient flows back.

    Returns the input itself at world size 1 or without a process group.
    """
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each process the gradient of its own slice.

    Every process computes its own loss from the gathered tensor, so the gradient of this
    process's slice is the sum of what every process's loss sends to it: all-reduce the
    incoming gradients (SUM), then keep this rank's part. all_reduce works on every backend
    (gloo has no reduce_scatter).
    """

    @staticmethod
    def forward(ctx, tensor):
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return tuple(gathered)

    @staticmethod
    def backward(ctx, *grads):
        all_grads = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(all_grads, op=dist.ReduceOp.SUM)
        return all_grads[dist.get_rank()]


def all_gather_with_grad(tensor):
    """Concatenate `tensor` from every process along dim 0, keeping the autograd graph.

    Returns the input itself at world size 1 or without a process group.
    """
    if get_world_size() == 1:
        return tensor
    return torch.cat(_GatherWithGrad.apply(tensor), dim=0)


def all_reduce_sum(tensor):
    """Sum `tensor` over processes, in place; returns it. Unchanged without a group."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor):
    """Average `tensor` over processes, in place; returns it. Unchanged without a group."""
    world_size = get_world_size()
    if world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(world_size)
    return tensor


def _sync_device():
    # NCCL only reduces CUDA tensors; gloo wants CPU ones.
    if is_dist_avail_and_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------

class SmoothedValue:
    """A series of values: median / mean over a recent window, and the global average."""

    def __init__(self, window_size=20, fmt=None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        """Sum count and total over processes (the window is not synchronised)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=_sync_device())
        barrier()
        dist.all_reduce(t)
        count, total = t.tolist()
        self.count = int(count)
        self.total = total

    @property
    def median(self):
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self):
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self):
        return self.total / self.count

    @property
    def max(self):
        return max(self.deque)

    @property
    def value(self):
        return self.deque[-1]

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    """Named SmoothedValues, printed every few iterations with time per step and an ETA."""

    def __init__(self, delimiter="\t"):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            if not isinstance(value, (float, int)):
                raise TypeError(f"MetricLogger.update: '{name}' must be a number, "
                                f"got {type(value).__name__}")
            self.meters[name].update(value)

    def __getattr__(self, attr):
        meters = self.__dict__.get("meters", {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def global_avg(self):
        """'name: avg' for every meter, joined by the delimiter (as the original)."""
        return self.delimiter.join(f"{name}: {meter.global_avg:.4f}"
                                   for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def log_every(self, iterable, print_freq, header=None):
        """Yield from `iterable`, printing progress, meters and ETA every `print_freq` steps."""
        header = header or ""
        total = len(iterable)
        start_time = end = time.time()
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        counter_fmt = "[{0:" + str(len(str(total))) + "d}/{1}]"
        parts = [header, counter_fmt, "eta: {eta}", "{meters}", "time: {time}", "data: {data}"]
        if torch.cuda.is_available():
            parts.append("max mem: {memory:.0f}")
        log_msg = self.delimiter.join(parts)
        megabyte = 1024.0 * 1024.0

        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            report_progress(f"at {header.strip() or 'step'} {i + 1}/{total}")
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta_seconds = iter_time.global_avg * (total - i)
                fields = dict(eta=str(datetime.timedelta(seconds=int(eta_seconds))),
                              meters=str(self), time=str(iter_time), data=str(data_time))
                if torch.cuda.is_available():
                    fields["memory"] = torch.cuda.max_memory_allocated() / megabyte
                print(log_msg.format(i, total, **fields))
            end = time.time()

        total_time = time.time() - start_time
        total_time_str = str(datetime.timedelta(seconds=int(total_time)))
        print(f"{header} Total time: {total_time_str} ({total_time / max(total, 1):.4f} s / it)")
        report_progress(f"past {header.strip() or 'a loop'}")


def compute_acc(logits, label, reduction="mean"):
    """Top-1 accuracy of `logits` (N, C) against `label` (N,)."""
    correct = (torch.argmax(logits, dim=1) == label).float()
    if reduction == "none":
        return correct.detach()
    if reduction == "mean":
        return correct.mean().item()
    raise ValueError(f"compute_acc: reduction must be 'mean' or 'none', got {reduction!r}")


def compute_n_params(model, return_str=True):
    """Number of parameters, as '12.3M' / '45.6K' or as an int."""
    total = sum(p.numel() for p in model.parameters())
    if not return_str:
        return total
    return f"{total / 1e6:.1f}M" if total >= 1e6 else f"{total / 1e3:.1f}K"


# ---------------------------------------------------------------------------------------
# Learning-rate schedules (the original formulas); each sets every param group, returns lr
# ---------------------------------------------------------------------------------------

def _set_lr(optimizer, lr):
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    return lr


def cosine_lr_schedule(optimizer, epoch, max_epoch, init_lr, min_lr):
    """Half-cosine decay from init_lr (epoch 0) to min_lr (epoch max_epoch)."""
    lr = (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch)) + min_lr
    return _set_lr(optimizer, lr)


def warmup_lr_schedule(optimizer, step, max_step, init_lr, max_lr):
    """Linear warm-up from init_lr to max_lr over max_step steps, then flat."""
    lr = min(max_lr, init_lr + (max_lr - init_lr) * step / max_step)
    return _set_lr(optimizer, lr)


def step_lr_schedule(optimizer, epoch, init_lr, min_lr, decay_rate):
    """Exponential decay init_lr * decay_rate**epoch, floored at min_lr."""
    lr = max(min_lr, init_lr * (decay_rate ** epoch))
    return _set_lr(optimizer, lr)


# ---------------------------------------------------------------------------------------
# Seeding and checkpoints
# ---------------------------------------------------------------------------------------

def set_seed(seed):
    """Seed Python, NumPy and torch (CPU and every GPU). Scripts pass seed + rank."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def save_checkpoint(obj, path, keep_previous=None):
    """torch.save `obj` to `path` atomically.

    The bytes go to a temporary file in the same folder, are flushed and fsynced, then
    os.replace()d over `path`: a crash or a failing save leaves the old file intact and no
    temporary file behind. keep_previous: a path the old file is renamed to first, once the
    new one is completely written (so one good earlier version survives a damaged file).
    """
    return _write_atomically(path, lambda f: torch.save(obj, f), keep_previous)


def save_safetensors(state_dict, path):
    """A state dict of tensors to a .safetensors file, atomically (as save_checkpoint). Tensors
    that share memory (tied weights) are written as separate copies."""
    from safetensors.torch import save
    data = save({key: value.detach().cpu().clone().contiguous() for key, value in state_dict.items()})
    return _write_atomically(path, lambda f: f.write(data))


class WriteError(OSError):
    """A file could not be written (disk full, permissions); the previous version is intact."""


# torch.save's zip writer reports a failed write (ENOSPC included) as a RuntimeError like
# "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"
_TORCH_WRITE_FAILURE = ("unexpected pos", "inline_container", "PytorchStreamWriter")
_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _write_failure(path, error):
    """WriteError naming the file and, when it is that, the full disk."""
    free = None
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        pass
    full = getattr(error, "errno", None) in _NO_SPACE or (free is not None and free < 2 ** 20)
    reason = (f"no space left on the device ({free / 2 ** 20:.1f} MB free in {path.parent})"
              if full and free is not None else "no space left on the device" if full else str(error))
    previous = "the previous file is unchanged" if path.exists() else "nothing was written"
    return WriteError(f"could not write {path}: {reason}; {previous}")


def _write_atomically(path, write, keep_previous=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp_path, path)
    except BaseException as error:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        if isinstance(error, OSError) or (isinstance(error, RuntimeError)
                                          and any(s in str(error) for s in _TORCH_WRITE_FAILURE)):
            raise _write_failure(path, error) from error
        raise
    _fsync_dir(path.parent)
    return str(path)


def _fsync_dir(folder):
    # Makes the rename itself durable; not every platform lets a folder be opened.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_on_master(obj, path):
    """save_checkpoint on the main process only."""
    if is_main_process():
        save_checkpoint(obj, path)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and says why."""


def unsafe_load_allowed(allow_unsafe=None):
    """Whether a checkpoint needing full unpickling may be loaded: `allow_unsafe`, else the
    environment variable BLIP_UNSAFE_LOAD=1."""
    if allow_unsafe is not None:
        return bool(allow_unsafe)
    return os.environ.get('BLIP_UNSAFE_LOAD', '').lower() in ('1', 'true', 'yes')


def _safetensors_header(path, head):
    """The JSON header of a .safetensors file (8-byte little-endian length, then JSON), or None."""
    length = int.from_bytes(head[:8], 'little') if len(head) >= 9 else 0
    if head[8:9] != b'{' or not 0 < length < 100_000_000:
        return None
    with open(path, 'rb') as f:
        f.seek(8)
        text = f.read(length)
    try:
        return length, json.loads(text)
    except ValueError:
        return length, None  # cut inside its header


def check_checkpoint_file(path, source=None):
    """CheckpointError unless `path` looks like a whole checkpoint: a torch.save zip archive with
    its directory (torch >= 1.6), a legacy pickle, or a .safetensors file with all its tensor
    bytes. `source` (e.g. the URL it came from) is named in the message instead of the path.
    Returns the kind: 'safetensors' or 'torch'."""
    with open(path, 'rb') as f:
        head = f.read(64)
    size = os.path.getsize(path)
    name = source or path
    safetensors = _safetensors_header(path, head)
    if safetensors is not None:
        length, header = safetensors
        ends = [entry['data_offsets'][1] for key, entry in (header or {}).items() if key != '__metadata__']
        if header is None or size < 8 + length + max(ends, default=0):
            raise CheckpointError(f"{name} is a truncated .safetensors file ({size} bytes): an interrupted copy "
                                  f"or download?")
        return 'safetensors'
    if not head.startswith((b'PK\x03\x04', b'\x80')):
        if not head:
            kind = 'an empty file'
        elif head.lstrip()[:15].lower().startswith((b'<!doctype', b'<html', b'<?xml')):
            kind = 'an HTML/XML page (a server error or login page?)'
        else:
            kind = f'a file starting with {head[:24]!r}'
        raise CheckpointError(f"{name} is not a PyTorch checkpoint: it is {kind} ({size} bytes)")
    if head.startswith(b'PK') and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{name} is truncated or corrupt ({size} bytes, its zip directory is missing): "
                              f"an interrupted copy or download?")
    return 'torch'


def load_checkpoint_file(path, allow_unsafe=None):
    """torch.load a checkpoint onto the CPU with `weights_only=True`, or CheckpointError saying
    what is wrong with the file: not a checkpoint (an HTML error page, text, an empty file),
    truncated (an interrupted copy or download), or holding Python objects whose unpickling
    would run code from the file (then loaded only with the opt-in of `unsafe_load_allowed`)."""
    kind = check_checkpoint_file(path)
    size = os.path.getsize(path)
    if kind == 'safetensors':  # tensors only: safe by construction
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device='cpu')
        except SafetensorError as error:
            raise CheckpointError(f"{path} is not a valid .safetensors file ({size} bytes): {error}") from error
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        if not unsafe_load_allowed(allow_unsafe):
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            reason = next((line for line in lines if 'WeightsUnpickler error' in line),
                          lines[0] if lines else type(error).__name__).split('. Please use')[0]
            raise CheckpointError(
                f"checkpoint {path} holds Python objects that torch.load(weights_only=True) refuses to "
                f"unpickle ({reason}). Loading it runs arbitrary code from the file. If you trust it, opt in "
                f"with the environment variable BLIP_UNSAFE_LOAD=1 or load_checkpoint(..., allow_unsafe=True)."
            ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({size} bytes): {first}") from error
    return torch.load(path, map_location='cpu', weights_only=False)


# ---------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------

class ConfigError(ValueError):
    """A config file or an override is wrong; the message names the file and the key."""


def _read_yaml(path):
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    try:
        data = YAML(typ="safe").load(text)
    except YAMLError as e:
        raise ConfigError(f"malformed YAML in config file {path}:\n{e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, "
                          f"got a {type(data).__name__}")
    _check_key_names(data, path)
    return data


def _check_key_names(mapping, path, prefix=""):
    # `: value` or `1: value` parse as keys None / 1: no task reads such a key
    for key, value in mapping.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"config file {path}: {prefix}{key!r} is not a key name (a line "
                              f"'{key}: ...' or a missing key before ':')")
        if isinstance(value, dict):
            _check_key_names(value, path, f"{prefix}{key}.")


def _merge(base, update):
    """Recursive dict merge: values of `update` win; nested mappings are merged."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override_value(text):
    """Type a command-line value the way YAML would: '1e-5' -> float, '[1,2]' -> list,
    'true' -> bool, '~' / 'null' -> None. Empty text gives '' and text YAML cannot parse
    stays a string."""
    if text.strip() == "":
        return ""
    try:
        return YAML(typ="safe").load(text)
    except YAMLError:
        return text


def apply_override(config, override, source="config", optional=()):
    """Apply one 'key=value' / 'a.b.c=value' override to `config` in place.

    Every key on the path must already exist, or be a top-level key of `optional` (keys a
    task reads when present); otherwise ConfigError lists the valid keys.
    """
    key, sep, raw_value = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like key=value (for {source})")

    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the top level"
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: '{'.'.join(parts[:depth])}' in "
                              f"{source} is a {type(node).__name__}, not a mapping")
        if part not in node and not (depth == 0 and part in optional):
            valid = ", ".join(sorted(map(str, set(node) | (set(optional) if depth == 0 else set()))))
            raise ConfigError(f"unknown config key '{key}' in override {override!r} "
                              f"(not in {source} at {where}); valid keys: {valid}")
        if depth < len(parts) - 1:
            node = node[part]
    node[parts[-1]] = parse_override_value(raw_value)


def load_config(path, overrides=(), defaults=None, optional=()):
    """Read a YAML config, merge it over `defaults`, then apply `overrides`.

    path:      the YAML file. Missing, unreadable or malformed: ConfigError naming it.
    overrides: strings 'key=value' or 'a.b.c=value'; values are typed as YAML. A key that is
               neither in the file nor in `defaults` raises ConfigError listing valid keys.
    defaults:  values for keys the file may leave out (new keys whose defaults reproduce
               the original behaviour); the file's values win.
    optional:  top-level keys without a default that overrides may add.
    """
    config = _merge(copy.deepcopy(defaults or {}), _read_yaml(path))
    for override in overrides:
        apply_override(config, override, source=str(path), optional=optional)
    return config


def require_keys(config, keys, path):
    """Raise ConfigError naming the first key of `keys` (dotted for nested) that `config`
    (read from `path`) lacks."""
    for key in keys:
        node = config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"config file {path} is missing required key '{key}'")
            node = node[part]


def _plain(value):
    # YAML(typ='safe') dumps only plain types: turn tuples and Paths into lists and str.
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def save_config(config, output_dir):
    """Write `config` to output_dir/config.yaml (atomically); returns the path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "config.yaml"
    yaml = YAML(typ="safe")
    yaml.default_flow_style = False
    fd, tmp_path = tempfile.mkstemp(dir=output_dir, prefix=".config.yaml.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            yaml.dump(_plain(config), f)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    return str(path)


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def str2bool(text):
    """argparse type for true/false flags ('true', 'False', '1', 'no', ...)."""
    if isinstance(text, bool):
        return text
    lowered = text.strip().lower()
    if lowered in ("true", "t", "yes", "y", "1"):
        return True
    if lowered in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help as written (examples keep their lines), each option followed by its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = "%(default)" in text or "(default" in text
        if shown or action.default in (None, "", [], False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_common_args(parser, default_config=None, default_output_dir="output"):
    """The original scripts' command line, plus --resume and config-key overrides.

    Overrides come after --opts or as trailing positional words: `lr=1e-5 vit.depth=2`.
    """
    parser.add_argument("--config", default=default_config,
                        help="YAML config file (default: %(default)s)")
    parser.add_argument("--output_dir", default=default_output_dir,
                        help="folder for checkpoints, logs and the config copy")
    parser.add_argument("--evaluate", action="store_true", help="evaluate only, no training")
    parser.add_argument("--device", default=default_device(),
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--seed", default=42, type=int, help="base seed; each rank adds its rank")
    parser.add_argument("--world_size", default=1, type=int,
                        help="number of distributed processes (torchrun sets WORLD_SIZE)")
    parser.add_argument("--dist_url", default="env://",
                        help="url used to set up distributed training")
    parser.add_argument("--distributed", default=True, type=str2bool, metavar="{true,false}",
                        help="true/false; init_distributed_mode sets it from the environment")
    parser.add_argument("--dist_timeout", default=DIST_TIMEOUT_MINUTES, type=float, metavar="MINUTES",
                        help="how long a process waits for the others at a collective before the job "
                             "fails (raise it for long single-rank steps, e.g. merging big outputs); a "
                             "rank that stops is named after a tenth of it, at most a minute")
    parser.add_argument("--resume", "--checkpoint", dest="resume", default="",
                        help="checkpoint to resume training from (pretrain.py's --checkpoint)")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --opts init_lr=1e-5 vit_grad_ckpt=false")
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, same as --opts")
    return parser


def parse_args_and_config(description, default_config, default_output_dir="output",
                          defaults=None, argv=None, add_args=None, epilog=None, optional=()):
    """Parse the command line and load the config it names, overrides applied.

    add_args: optional function(parser) adding script-specific arguments.
    optional: top-level keys without a default that an override may add (load_config).
    Returns (args, config); args.overrides holds every override given. Writes nothing:
    call save_config(config, args.output_dir) on the main process.
    """
    parser = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=HelpFormatter)
    add_common_args(parser, default_config, default_output_dir)
    if add_args is not None:
        add_args(parser)
    args = parser.parse_intermixed_args(argv)
    args.overrides = list(args.opts) + list(args.overrides)
    for override in args.overrides:
        if "=" not in override:
            parser.error(f"config override {override!r} must look like key=value")
    if args.config is None:
        parser.error("--config is required")
    try:
        config = load_config(args.config, args.overrides, defaults=defaults, optional=optional)
    except ConfigError as e:
        parser.error(str(e))
    return args, config
