"""One process trains as N processes would (config `emulate_world_size: N`).

Each emulated rank r has what rank r of an N-process torchrun run has: the batches of
DistributedSampler(num_replicas=N, rank=r) and its own RNG streams seeded `seed + r`
(engine/rng.py), swapped in whenever the rank draws (its loader, its dropout, its negatives).
One step of the N-process run is then played as follows.

Tasks without a cross-rank term (captioning, VQA, NLVR2): each rank's batch forward and
backward in turn, its loss divided by N, one optimizer step: DDP's average of the ranks'
gradients.

Contrastive models (BLIP_Retrieval, BLIP_Pretrain: models/momentum.py runs their step in
parts), where a rank's loss reads the other ranks' features, in three passes (GradCache,
Gao et al. 2021), so memory stays about one rank's step plus the global batch's features:
1. once: temperature clamp and momentum update; then for each rank, under its streams, the
   online encoders without grad and the momentum encoders (the RNG state before the online
   encoders is kept);
2. for each rank: its losses from cached encoder outputs made leaves with grad (its own and,
   for ITM negatives across ranks, everyone's), backward of loss / N, which fills the
   leaves' gradients and the gradients of everything after the encoders; then the queues
   take the whole global batch once;
3. for each rank: its online encoders again, with grad, from the kept RNG state (the same
   dropout masks), backward from the leaves' gradients.

Under torchrun each process is one rank: N must then be 1 or the number of processes.
"""
import torch
from torch.utils.data import DataLoader, DistributedSampler

import utils
from engine import rng
from engine.config import ConfigError
from engine.precision import autocast
from engine.rng import RankStreams


class ForwardLosses:
    """A training loss_fn for a model whose forward returns its losses as a tuple.

    inputs(batch, epoch, i, num_iters) -> the forward's keyword arguments (on the device);
    names: the losses' names, in the forward's order; logged: the order the logs list them
    (default: names). Emulation needs the inputs apart from the call (a contrastive model is
    run in parts).
    """

    def __init__(self, inputs, names, logged=None):
        self.inputs, self.names, self.logged = inputs, tuple(names), tuple(logged or names)

    def named(self, losses):
        """The forward's tuple of losses as {name: loss}, in the logged order."""
        by_name = dict(zip(self.names, losses))
        return {name: by_name[name] for name in self.logged}

    def __call__(self, model, batch, epoch, i, num_iters):
        return self.named(model(**self.inputs(batch, epoch, i, num_iters)))


def total_loss(losses, weights=None):
    """The training loss: the sum of the named losses, each times weights[name] (default 1)."""
    return sum(value if weights is None else weights.get(name, 1.0) * value for name, value in losses.items())


def check_config(config, config_path, world_size):
    """emulate_world_size against accum_steps, the processes and the queue; an error names the keys."""
    emulate = config.get('emulate_world_size', 1)
    where = f'config file {config_path}'
    if emulate > 1 and config.get('accum_steps', 1) > 1:
        raise ConfigError(f'{where}: emulate_world_size={emulate} and accum_steps={config["accum_steps"]} '
                          f'cannot be combined: emulate_world_size already makes one optimizer step of '
                          f'the N ranks\' batches; set accum_steps=1')
    if emulate > 1 and world_size > 1 and emulate != world_size:
        raise ConfigError(f'{where}: emulate_world_size={emulate} under torchrun with {world_size} '
                          f'processes: a process plays one rank there, so emulate_world_size must be 1 or '
                          f'{world_size} (several emulated ranks per process is not supported yet)')
    batch_key = 'batch_size_train' if 'batch_size_train' in config else 'batch_size'
    ranks = max(emulate, world_size)
    if 'queue_size' in config and batch_key in config:
        global_batch = config[batch_key] * ranks
        if config['queue_size'] % global_batch:
            raise ConfigError(
                f'{where}: queue_size={config["queue_size"]} must be a multiple of the global batch '
                f'{global_batch} ({batch_key}={config[batch_key]} x {ranks} rank(s): '
                f'{"emulate_world_size" if emulate > 1 else "processes"}): every step enqueues the whole '
                f'global batch')
        if config.get('accum_steps', 1) > 1:
            print(f'note: accum_steps={config["accum_steps"]} reaches the global batch of the optimizer step, '
                  f'not the multi-GPU recipe: the momentum encoders move and the queue takes a batch at '
                  f'every micro-batch, and ITM negatives come from the micro-batch. emulate_world_size=N '
                  f'trains as N GPUs did (docs/emulate.md)', flush=True)


def rank_streams(config, seed):
    """The RNG streams of the ranks this process plays: range(N) when one process emulates N,
    else its own rank's."""
    emulate = config.get('emulate_world_size', 1)
    if emulate > 1 and utils.get_world_size() == 1:
        return RankStreams(seed, range(emulate))
    return RankStreams(seed, [utils.get_rank()])


def rank_loader(loader, num_replicas, rank):
    """A copy of the training `loader` that draws what rank `rank` of `num_replicas` draws
    (create_sampler's DistributedSampler; its epoch is set by RankBatches)."""
    sampler = DistributedSampler(loader.dataset, num_replicas=num_replicas, rank=rank, shuffle=True)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      worker_init_fn=loader.worker_init_fn)


class RankBatches:
    """An epoch of emulated steps: each item lists every rank's batch, each fetched under the
    rank's streams (augmentation and the loader's seed draw from them)."""

    def __init__(self, data_loader, streams, epoch):
        self.streams = streams
        self.loaders = [rank_loader(data_loader, len(streams.ranks), rank) for rank in streams.ranks]
        for loader in self.loaders:
            loader.sampler.set_epoch(epoch)

    def __len__(self):
        return len(self.loaders[0])

    def __iter__(self):
        iterators = []
        for rank, loader in zip(self.streams.ranks, self.loaders):
            with self.streams.use(rank):
                iterators.append(iter(loader))
        for _ in range(len(self)):
            batches = []
            for rank, iterator in zip(self.streams.ranks, iterators):
                with self.streams.use(rank):
                    batches.append(next(iterator))
            yield batches


def forward_backward(model, batches, loss_fn, streams, step, config, device, scaler, loss_weights=None):
    """One emulated step's forward and backward (no optimizer step); returns each rank's losses.

    step: (epoch, i, num_iters) as loss_fn takes them.
    """
    n = len(streams.ranks)

    def backward(losses):
        scaler.scale(total_loss(losses, loss_weights) / n).backward()

    if hasattr(model, 'rank_losses'):
        if not isinstance(loss_fn, ForwardLosses):
            raise TypeError(f'emulating {type(model).__name__} needs its loss_fn as engine.emulate.ForwardLosses')
        inputs = [loss_fn.inputs(batch, *step) for batch in batches]
        return _contrastive(model, inputs, loss_fn.named, streams, config, device, backward)

    all_losses = []
    for rank, batch in zip(streams.ranks, batches):
        with streams.use(rank):
            with autocast(config, device):
                losses = loss_fn(model, batch, *step)
            backward(losses)
        all_losses.append({name: value.detach() for name, value in losses.items()})
    return all_losses


def _contrastive(model, inputs, named, streams, config, device, backward):
    """The three passes of the module docstring; returns each rank's named losses (detached)."""
    model.start_step()

    # 1. encoders without grad, every rank under its streams
    cached, encoder_states = [], []
    for rank, kwargs in zip(streams.ranks, inputs):
        with streams.use(rank):
            encoder_states.append(rng.capture())
            with torch.no_grad(), autocast(config, device):
                own = model.encode(kwargs['image'], kwargs['caption'], kwargs.get('idx'))
                model.momentum_encode(own, kwargs['image'])
            cached.append(own)
    world = model.world_of(cached)

    # 2. each rank's losses from the cached features, made leaves; backward into them
    embeds = [own.image_embeds.detach().requires_grad_() for own in cached]
    text_feats = [own.text_feat.detach().requires_grad_() for own in cached]
    all_losses = []
    for j, (rank, kwargs) in enumerate(zip(streams.ranks, inputs)):
        with streams.use(rank):
            with autocast(config, device):
                own = model.with_leaves(cached[j], embeds[j], text_feats[j])
                rank_world = world.for_rank(j * len(embeds[j]),
                                            torch.cat(embeds) if model.gathers_image_embeds else None)
                losses = named(model.rank_losses(own, rank_world, kwargs['alpha']))
            backward(losses)
        all_losses.append({name: value.detach() for name, value in losses.items()})
    model.enqueue(world)

    # 3. the online encoders again, with grad and pass 1's dropout masks; backward from the leaves
    for j, (rank, kwargs) in enumerate(zip(streams.ranks, inputs)):
        with streams.use(rank), streams.replay(encoder_states[j]):
            with autocast(config, device):
                own = model.encode(kwargs['image'], kwargs['caption'])
            outputs = ((own.image_embeds, embeds[j]), (own.text_feat, text_feats[j]))
            pairs = [(tensor, leaf.grad) for tensor, leaf in outputs if leaf.grad is not None]
            if pairs:
                torch.autograd.backward([tensor for tensor, _ in pairs], [grad for _, grad in pairs])
    return all_losses
