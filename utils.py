"""Shared helpers for the BLIP scripts, the original's utils.py in scope:

- distributed: optional. Without torchrun's environment variables everything runs as one
  process with no process group, and every helper below degrades to the single-process
  answer (gathers return their input, barriers do nothing).
- logging: `SmoothedValue` and `MetricLogger` print running averages with an ETA.
- learning-rate schedules: the original's cosine, warm-up and step formulas.
- seeding.
"""
import builtins
import datetime
import math
import os
import random
import time
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist

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
    NCCL when args.device is CUDA, gloo otherwise (CPU runs and tests). Returns the job's
    store when it created the group (engine.monitor shares it), else None.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print("Not using distributed mode")
        args.distributed = False
        args.rank, args.world_size, args.gpu = 0, 1, 0
        return None

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
    store = None
    if not dist.is_initialized():
        # the rendezvous init_process_group would do, kept: the rank monitor shares its store
        store, _, _ = next(dist.rendezvous(dist_url, args.rank, args.world_size, timeout=timeout))
        store.set_timeout(timeout)
        dist.init_process_group(backend=args.dist_backend, store=store, world_size=args.world_size,
                                rank=args.rank, timeout=timeout, **init_kwargs)
    barrier()
    setup_for_distributed(args.rank == 0)
    return store


DIST_TIMEOUT_MINUTES = 10  # evaluation gathers wait at most this for the slowest rank
_DOING = "starting"


def report_progress(doing):
    """What this process is doing, e.g. 'at Train Epoch: [3] 120/500' (the rank monitor names it
    when the process stops)."""
    global _DOING
    _DOING = doing


def current_progress():
    return _DOING


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
# Seeding and the device
# ---------------------------------------------------------------------------------------

def set_seed(seed):
    """Seed Python, NumPy and torch (CPU and every GPU). Scripts pass seed + rank."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"
