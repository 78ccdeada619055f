"""Set-up and the epoch loop around a task: process group, device and seeds, the model wrapped
for DDP, optimizer and resume, and the per-epoch bookkeeping every training script shares."""
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import utils
from engine import checkpoints, emulate, loop, monitor, outlock
from engine.config import save_config
from engine.fileio import remove_stale_temporaries
from engine.precision import make_grad_scaler


def setup(args, config):
    """Distributed mode, device, seeds and the config copy, in the original's order; returns the device.

    Fails before any work for a --resume file that does not exist or a CUDA device that is
    not there. Under torchrun each rank gets its own GPU (LOCAL_RANK).
    """
    if args.resume and not os.path.isfile(args.resume):
        raise FileNotFoundError(f'--resume: checkpoint {args.resume!r} does not exist')
    if str(args.device).startswith('cuda') and not torch.cuda.is_available():
        raise RuntimeError(f'--device {args.device}: CUDA is not available here; use --device cpu')
    store = utils.init_distributed_mode(args)
    if store is not None:
        monitor.start_rank_monitor(store, args.rank, args.world_size, args.dist_timeout * 60)
    device = torch.device(args.device)
    if device.type == 'cuda' and args.distributed:
        device = torch.device('cuda', args.gpu)

    # fix the seed for reproducibility (each rank its own stream, as the original)
    utils.set_seed(args.seed + utils.get_rank())
    torch.backends.cudnn.benchmark = True

    os.makedirs(args.output_dir, exist_ok=True)
    if utils.is_main_process():
        outlock.acquire(args.output_dir)  # before anything is written there: one run per folder
        remove_stale_temporaries(args.output_dir)
        save_config(config, args.output_dir)
    return device


def launch(main, args, config):
    """What a script's run() ends with: setup, then main(args, config, device); the output
    folder is free for another run once main returns or fails."""
    device = setup(args, config)
    try:
        return main(args, config, device)
    finally:
        outlock.release(args.output_dir)


def wrap_model(model, args, find_unused_parameters=False, ddp=True):
    """(model, model_without_ddp): DDP only when a process group exists. ddp=False (a process
    playing several emulated ranks averages the gradients itself, engine/emulate.py): the
    parameters and buffers are made rank 0's, as DDP does, and the model is not wrapped."""
    if not utils.is_dist_avail_and_initialized():
        return model, model
    if not ddp:
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)
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


@dataclass
class Run:
    """A task's training run: the model (in DDP when a process group exists) and the module
    itself, the optimizer, the scaler, and the counters that survive a restart."""
    args: object
    config: dict
    device: torch.device
    model: torch.nn.Module
    model_without_ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    state: checkpoints.TrainState
    streams: object = None  # engine.rng.RankStreams of the ranks this process plays

    def train_one_epoch(self, epoch, data_loader, loss_fn, **train_kwargs):
        """loop.train_one_epoch with this run's model, optimizer, scaler, state and streams."""
        return loop.train_one_epoch(self.model, data_loader, self.optimizer, epoch, self.device, self.config, loss_fn,
                                    scaler=self.scaler, state=self.state, streams=self.streams, **train_kwargs)

    def fine_tune_epoch(self, epoch, data_loader, loss_fn, **train_kwargs):
        """The fine-tuning scripts' epoch, as the original's: the sampler reshuffled, the learning
        rate set by the cosine schedule (init_lr to min_lr over max_epoch), one pass of
        loop.train_one_epoch (train_kwargs: its header, window_size, ...); returns its stats."""
        loop.set_epoch(data_loader, epoch)
        config = self.config
        utils.cosine_lr_schedule(self.optimizer, epoch, config['max_epoch'], config['init_lr'], config['min_lr'])
        return self.train_one_epoch(epoch, data_loader, loss_fn, **train_kwargs)

    def epochs(self, train_epoch, evaluates=True):
        """The epochs left to run, as (epoch, train_stats); the loop body evaluates and logs.

        train_epoch(epoch) trains one epoch and returns its stats. With `evaluates`, each
        epoch's checkpoint_last.pth is written between its training and the body, so a failing
        evaluation never costs the epoch, and a run resumed before the evaluation finished
        evaluates that epoch again without training it; once the body is done, that the
        evaluation finished is recorded. Without it (pre-training, VQA) the checkpoint is
        written after the body. --evaluate: one (epoch, None), no training.
        """
        args, state = self.args, self.state
        if args.evaluate and not evaluates:
            return
        for epoch in range(state.start_epoch, self.config['max_epoch']):
            train_stats = None
            if not args.evaluate:
                train_stats = checkpoints.resumed_train_stats(state, epoch)  # trained before a kill: not again
                if train_stats is None:
                    train_stats = train_epoch(epoch)
                    if evaluates:
                        self._save_last(epoch, train_stats)
            yield epoch, train_stats
            if args.evaluate:
                return
            if evaluates:
                # a resumed run need not evaluate it again
                checkpoints.mark_evaluated(args.output_dir, epoch, state, self.streams)
            else:
                self._save_last(epoch)
            end_epoch(self.device)

    def _save_last(self, epoch, train_stats=None):
        checkpoints.save_last_checkpoint(self.args.output_dir, self.model_without_ddp, self.optimizer, self.scaler,
                                         self.config, epoch, self.state, train_stats=train_stats,
                                         streams=self.streams)

    def update_best(self, score, epoch, save=True):
        """checkpoints.update_best for this run: a new best `score` is recorded (and saved)."""
        return checkpoints.update_best(self.state, score, epoch, self.args.output_dir, self.model_without_ddp,
                                       self.optimizer, self.config, save=save)


def prepare_training(model, args, config, device):
    """Everything between building a task's model and its epoch loop, the same for every task.

    Moves the model to the device, turns on text activation checkpointing when the config
    asks (text_grad_ckpt), wraps it in DDP when a process group exists, builds the original's
    AdamW (init_lr, weight_decay) and the GradScaler (amp), seeds the training streams of the
    ranks this process plays (engine/rng.py; several with emulate_world_size), and resumes
    (--resume or the output folder's last checkpoint). Returns the Run.
    """
    if args.evaluate and not args.resume:  # (a --resume checkpoint replaces every weight)
        require_trained_weights(model, config)
    model = model.to(device)
    if config['text_grad_ckpt']:
        set_text_grad_checkpointing(model)
    streams = emulate.rank_streams(config, args.seed)
    model, model_without_ddp = wrap_model(model, args, ddp=not streams.emulated)
    optimizer = torch.optim.AdamW(params=model.parameters(), lr=config['init_lr'],
                                  weight_decay=config['weight_decay'])
    scaler = make_grad_scaler(config, device)
    state = checkpoints.resume(args, model_without_ddp, optimizer, scaler, streams)
    return Run(args, config, device, model, model_without_ddp, optimizer, scaler, state, streams)


def require_trained_weights(model, config):
    """For evaluation: refuse a `pretrained` checkpoint that lacks weights of the model, which
    would be evaluated at their random initial values (e.g. a captioning checkpoint given to
    train_retrieval.py --evaluate). Fine-tuning loads such checkpoints as the original does
    (the missing heads are listed as newly initialised when loading). The factories load
    without judging; this reads the checkpoint again (models.blip.require_weights)."""
    if not config.get('pretrained'):
        return
    from models.blip import require_weights

    require_weights(model, config['pretrained'], 'they would be evaluated at their random initial values. '
                                                 'Is it a checkpoint of this task? (Fine-tuning from it is allowed.)')


def end_epoch(device):
    """What the original does between epochs (a barrier only when a group exists)."""
    utils.barrier()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
