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

Under torchrun with M processes, N must be a multiple of M: process p plays ranks
p*N/M .. (p+1)*N/M - 1. The model is then not wrapped in DDP; the world batch is gathered
across processes, the gradients that the losses send to other processes' image embeddings
are summed back to them (what all_gather_with_grad's backward does), and the parameters'
gradients are summed over processes before the optimizer step (each already divided by N).
"""
import torch
from torch.utils.data import DataLoader

import utils
from data import create_sampler
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
    if emulate > 1 and emulate % world_size:
        raise ConfigError(f'{where}: emulate_world_size={emulate} under torchrun with {world_size} '
                          f'processes: it must be a multiple of the number of processes (each plays '
                          f'emulate_world_size / processes ranks)')
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
    """The RNG streams of the ranks this process plays: its share of the N emulated ranks, or
    its own rank when it plays one."""
    world_size, rank = utils.get_world_size(), utils.get_rank()
    per_process = max(1, config.get('emulate_world_size', 1) // world_size)
    return RankStreams(seed, range(rank * per_process, (rank + 1) * per_process))


def num_ranks(streams):
    """N: the ranks of the run (every process plays as many as this one)."""
    return len(streams.ranks) * utils.get_world_size()


def rank_loader(loader, num_replicas, rank):
    """A copy of the training `loader` that draws what rank `rank` of `num_replicas` draws
    (create_sampler's sampler, as under torchrun; its epoch is set by RankBatches)."""
    (sampler,) = create_sampler([loader.dataset], [True], num_replicas, rank)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      worker_init_fn=loader.worker_init_fn)


class RankBatches:
    """An epoch of emulated steps: each item lists every rank's batch, each fetched under the
    rank's streams (augmentation and the loader's seed draw from them)."""

    def __init__(self, data_loader, streams, epoch):
        self.streams = streams
        self.loaders = [rank_loader(data_loader, num_ranks(streams), rank) for rank in streams.ranks]
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

    step: (epoch, i, num_iters) as loss_fn takes them. Under torchrun the gradients are then
    summed over the processes (the model is not in DDP when a process plays several ranks).
    """
    n = num_ranks(streams)

    def backward(losses):
        scaler.scale(total_loss(losses, loss_weights) / n).backward()

    if hasattr(model, 'rank_losses'):
        if not isinstance(loss_fn, ForwardLosses):
            raise TypeError(f'emulating {type(model).__name__} needs its loss_fn as engine.emulate.ForwardLosses')
        inputs = [loss_fn.inputs(batch, *step) for batch in batches]
        all_losses = _contrastive(model, inputs, loss_fn.named, streams, config, device, backward)
    else:
        all_losses = []
        for rank, batch in zip(streams.ranks, batches):
            with streams.use(rank):
                with autocast(config, device):
                    losses = loss_fn(model, batch, *step)
                backward(losses)
            all_losses.append({name: value.detach() for name, value in losses.items()})
    if utils.get_world_size() > 1:
        _sum_over_processes([p.grad for p in model.parameters() if p.grad is not None])
    return all_losses


def _sum_over_processes(tensors):
    """Sum each tensor over the processes, in place, with one all-reduce."""
    flat = utils.all_reduce_sum(torch.cat([t.reshape(-1) for t in tensors]))
    for tensor, total in zip(tensors, flat.split([t.numel() for t in tensors])):
        tensor.copy_(total.view_as(tensor))


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
    world = model.world_of(cached).gathered()

    # 2. each rank's losses from the cached features, made leaves; backward into them
    embeds = [own.image_embeds.detach().requires_grad_() for own in cached]
    text_feats = [own.text_feat.detach().requires_grad_() for own in cached]
    world_embeds = _WorldEmbeds(embeds) if model.gathers_image_embeds else None
    all_losses = []
    for j, (rank, kwargs) in enumerate(zip(streams.ranks, inputs)):
        with streams.use(rank):
            with autocast(config, device):
                own = model.with_leaves(cached[j], embeds[j], text_feats[j])
                rank_world = world.for_rank(rank * len(embeds[j]), world_embeds and world_embeds.tensor())
                losses = named(model.rank_losses(own, rank_world, kwargs['alpha']))
            backward(losses)
        all_losses.append({name: value.detach() for name, value in losses.items()})
    if world_embeds is not None:
        world_embeds.return_gradients()
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


class _WorldEmbeds:
    """The image embeddings of every rank as one tensor (all_gather_with_grad's output): this
    process's leaves, and the other processes' embeddings as leaves of their own whose
    gradients return_gradients() sends back to them (an all-reduce, as that backward does)."""

    def __init__(self, embeds):
        self.local, self.process, self.parts = embeds, utils.get_rank(), None
        if utils.get_world_size() > 1:
            gathered = utils.concat_all_gather(torch.cat(embeds).detach()).chunk(utils.get_world_size())
            self.parts = [None if p == self.process else part.clone().requires_grad_()
                          for p, part in enumerate(gathered)]

    def tensor(self):
        own = torch.cat(self.local)  # a fresh cat per rank: its graph reaches this process's leaves
        if self.parts is None:
            return own
        return torch.cat([own if part is None else part for part in self.parts])

    def return_gradients(self):
        if self.parts is None:
            return
        zeros = torch.zeros_like(next(part for part in self.parts if part is not None))  # parts are alike
        grads = torch.cat([zeros if part is None or part.grad is None else part.grad for part in self.parts])
        mine = utils.all_reduce_sum(grads).chunk(utils.get_world_size())[self.process]
        for leaf, grad in zip(self.local, mine.split([len(leaf) for leaf in self.local])):
            leaf.grad = grad.clone() if leaf.grad is None else leaf.grad + grad
