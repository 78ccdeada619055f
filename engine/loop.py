"""One training epoch: mixed precision, gradient accumulation, clipping, a stop on a non-finite
loss, progress with an ETA."""
import contextlib
import datetime
import math
import time

import torch
from torch.nn.parallel import DistributedDataParallel

import utils
from engine import emulate
from engine.checkpoints import LAST_CHECKPOINT, TrainState
from engine.precision import autocast


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite: the run stops before the optimizer step."""


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
                    window_size=1, stats_fmt='{:.3f}', loss_weights=None, streams=None):
    """Train one epoch; return the averaged meters as the original's strings.

    loss_fn(model, batch, epoch, i, num_iters) -> dict of named scalar losses; the engine
        sums them (each times loss_weights[name], default 1; the logs show them unweighted),
        scales for accumulation and backpropagates (i: micro-batch index).
    lr_fn(step): called before each optimizer step with the step index within the epoch
        (the original's per-iteration warm-up); per-epoch schedules stay in the script.
    state: TrainState whose global_step is advanced.
    streams: engine.rng.RankStreams; when it plays several ranks, each step is one step of
        that many processes (engine/emulate.py) and every rank's losses are logged.
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
    emulated = streams is not None and streams.emulated
    if emulated:  # each item: every emulated rank's batch
        data_loader = emulate.RankBatches(data_loader, streams, epoch)
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
            if emulated:
                rank_losses = emulate.forward_backward(model, batch, loss_fn, streams, (epoch, i, num_iters),
                                                       config, device, scaler, loss_weights)
            else:
                with autocast(config, device):
                    losses = loss_fn(model, batch, epoch, i, num_iters)
                scaler.scale(emulate.total_loss(losses, loss_weights) / group_size).backward()
                rank_losses = [losses]

        rank_values = [{name: value.item() for name, value in losses.items()} for losses in rank_losses]
        for loss_values in rank_values:
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

        for loss_values in rank_values:  # as every process logs its own; synchronize averages them
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

