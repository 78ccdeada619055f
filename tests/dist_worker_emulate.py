"""One training step of a tiny contrastive model under `torchrun --nproc_per_node=N` (gloo):
the reference tests/test_emulate.py compares one process emulating N ranks against.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker_emulate.py OUT KIND NEGATIVE_ALL_RANK

Rank 0 writes OUT: every parameter's gradient after DDP's average, every rank's losses and
the queues after the step. The model, the batches and the seeds come from the functions
below, which the test uses for its emulated step.
"""
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import utils  # noqa: E402
from engine.rng import RankStreams  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SEED = 7
BATCH = 4
ALPHA = 0.4
TINY_VIT = {'width': 64, 'depth': 2, 'heads': 4, 'patch_size': 16}
LOSS_NAMES = {'retrieval': ('loss_ita', 'loss_itm'), 'pretrain': ('loss_ita', 'loss_itm', 'loss_lm')}


def build(kind, negative_all_rank, world_size):
    """The tiny model, the same weights in every process (seeded here)."""
    torch.manual_seed(0)
    common = dict(image_size=32, vit=TINY_VIT, embed_dim=16, queue_size=BATCH * world_size * 3, momentum=0.9)
    if kind == 'retrieval':
        from models.blip_retrieval import BLIP_Retrieval
        return BLIP_Retrieval(med_config=str(REPO / 'configs/shapes/med_config_retrieval.json'),
                              negative_all_rank=negative_all_rank, **common)
    from models.blip_pretrain import BLIP_Pretrain
    return BLIP_Pretrain(med_config=str(REPO / 'configs/shapes/bert_config.json'), vit_checkpoint=None,
                         bert_checkpoint=None, **common)


def rank_inputs(kind, rank):
    """Rank `rank`'s batch as the model's forward arguments: images from its own generator,
    captions of different lengths, image ids with pairs of the same image."""
    generator = torch.Generator().manual_seed(100 + rank)
    words = ['red', 'square', 'blue', 'circle', 'on', 'a', 'green', 'background', 'small', 'large']
    captions = [' '.join(words[(rank * 3 + b * 2 + k) % len(words)] for k in range(3 + b))
                for b in range(BATCH)]
    inputs = {'image': torch.randn(BATCH, 3, 32, 32, generator=generator), 'caption': captions, 'alpha': ALPHA}
    if kind == 'retrieval':
        inputs['idx'] = torch.tensor([rank * BATCH + b // 2 for b in range(BATCH)])
    return inputs


def main(out, kind, negative_all_rank):
    utils.init_distributed_mode(SimpleNamespace(device='cpu', dist_url='env://'))
    rank, world_size = utils.get_rank(), utils.get_world_size()
    model = build(kind, negative_all_rank, world_size)
    RankStreams(SEED, [rank])  # this rank's training streams, seeded as the engine seeds them
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    losses = ddp(**rank_inputs(kind, rank))
    sum(losses).backward()

    every_rank = utils.concat_all_gather(torch.stack([loss.detach() for loss in losses])[None])
    if rank == 0:
        torch.save({
            'grads': {name: p.grad for name, p in model.named_parameters() if p.grad is not None},
            'losses': every_rank,
            'buffers': {name: b for name, b in model.named_buffers()},
        }, out)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2], sys.argv[3] == 'True')
