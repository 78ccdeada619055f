"""NLVR2: fine-tune BLIP to judge whether a statement is true of a pair of images.

    python train_nlvr.py --config configs/nlvr.yaml --output_dir output/NLVR
    python train_nlvr.py --config configs/nlvr.yaml --evaluate
    torchrun --nproc_per_node=8 train_nlvr.py --config configs/nlvr.yaml amp=bf16

Each epoch trains with cross-entropy, then reports accuracy on the dev ('val') and test
splits; checkpoint_best.pth is the epoch with the best dev accuracy, as the original.

Evaluation is exact under any number of processes: each rank scores its own share of a
split (no DistributedSampler padding, so no sample counts twice) and the counts of correct
answers and of samples are summed over ranks before dividing. The dataset swaps the two
images (and 'left'/'right') at random in every split, as the original; here each sample
draws its swap from a seed of its own during evaluation, so the accuracy does not depend
on the number of processes, the loader workers or what ran before.
"""
import random
import time
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset

import utils
from data import create_dataset, create_loader, create_sampler
from engine import cli, logs, precision, preflight, training
from models.blip_nlvr import blip_nlvr

# Keys of configs/nlvr.yaml, all read below.
REQUIRED_KEYS = ('image_root', 'ann_root', 'pretrained', 'vit', 'batch_size_train', 'batch_size_test',
                 'vit_grad_ckpt', 'vit_ckpt_layer', 'max_epoch', 'image_size', 'weight_decay', 'init_lr',
                 'min_lr')
# Model options the official config leaves to blip_nlvr's defaults (tiny test models set them).
TASK_DEFAULTS = {'med_config': 'configs/med_config.json'}
STATS_FMT = '{:.4f}'  # the original's format of logged train and eval numbers


def train_step(model, batch, epoch, i, num_iters, device):
    image0, image1, text, targets = batch
    # left images first, then right images: the model splits the batch in two
    images = torch.cat([image0, image1], dim=0).to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    loss = model(images, text, targets=targets, train=True)
    return {'loss': loss}


class EvalShare(Dataset):
    """This rank's share of an evaluation split (every world_size-th sample), each sample
    drawn with its own seed.

    The NLVR2 dataset swaps the two images with probability 0.5 using Python's global
    `random`; seeding it per sample (and restoring the caller's state afterwards) makes the
    swap a function of (seed, index) only.
    """

    def __init__(self, dataset, seed, rank=0, world_size=1):
        self.dataset = dataset
        self.indices = range(rank, len(dataset), world_size)
        self.seed = seed

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        index = self.indices[i]
        outer_state = random.getstate()
        random.seed(self.seed * 1_000_003 + index)
        try:
            return self.dataset[index]
        finally:
            random.setstate(outer_state)


def eval_loader(dataset, batch_size, num_workers, seed):
    share = EvalShare(dataset, seed, utils.get_rank(), utils.get_world_size())
    # its own generator: evaluating leaves the training streams as they were (data/create_loader)
    return DataLoader(share, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                      pin_memory=torch.cuda.is_available(), drop_last=False, generator=torch.Generator())


@torch.no_grad()
def evaluate(model, data_loader, device, config):
    """Accuracy over every rank's share: {'acc': '0.8125'} (a fraction, formatted as the original)."""
    model.eval()
    metric_logger = utils.MetricLogger(delimiter='  ')
    correct = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for image0, image1, text, targets in metric_logger.log_every(data_loader, 50, 'Evaluation:'):
        images = torch.cat([image0, image1], dim=0).to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with precision.autocast(config, device):
            prediction = model(images, text, targets=targets, train=False)
        correct += (prediction.argmax(dim=1) == targets).sum()
        count += targets.size(0)

    # sum correct answers and samples over ranks, then divide (not a mean of rank means)
    totals = utils.all_reduce_sum(torch.stack([correct, count]))
    correct, count = totals.tolist()
    if count == 0:
        raise ValueError('evaluation split is empty')
    accuracy = correct / count
    print(f'Averaged stats: acc: {accuracy:.4f} ({int(correct)}/{int(count)})')
    return {'acc': STATS_FMT.format(accuracy)}


def main(args, config, device):
    #### Dataset ####
    print('Creating dataset')
    train_dataset, val_dataset, test_dataset = create_dataset('nlvr', config)
    # --evaluate reads no training image: only val/test need to be there
    preflight.check_images(([] if args.evaluate else [train_dataset]) + [val_dataset, test_dataset], config)
    train_sampler = create_sampler([train_dataset], [True], utils.get_world_size(), utils.get_rank())
    (train_loader,) = create_loader([train_dataset], train_sampler, batch_size=[config['batch_size_train']],
                                    num_workers=[config['num_workers']], is_trains=[True], collate_fns=[None])
    val_loader, test_loader = (eval_loader(dataset, config['batch_size_test'], config['num_workers'], args.seed)
                               for dataset in (val_dataset, test_dataset))

    #### Model ####
    print('Creating model')
    model = blip_nlvr(pretrained=config['pretrained'], image_size=config['image_size'], vit=config['vit'],
                      vit_grad_ckpt=config['vit_grad_ckpt'], vit_ckpt_layer=config['vit_ckpt_layer'],
                      med_config=config['med_config'])
    run = training.prepare_training(model, args, config, device)
    model_without_ddp, state = run.model_without_ddp, run.state

    train_epoch = partial(run.fine_tune_epoch, data_loader=train_loader, loss_fn=partial(train_step, device=device),
                          window_size=50, stats_fmt=STATS_FMT)
    print('Start training')
    start_time = time.time()
    for epoch, train_stats in run.epochs(train_epoch):
        val_stats = evaluate(model_without_ddp, val_loader, device, config)
        test_stats = evaluate(model_without_ddp, test_loader, device, config)

        if utils.is_main_process():
            if args.evaluate:
                logs.log_json(args.output_dir, logs.split_stats(val=val_stats, test=test_stats))
            else:
                # as the original: compared at the logged precision; best dev accuracy wins
                run.update_best(float(val_stats['acc']), epoch)
                logs.log_json(args.output_dir, {
                    **logs.split_stats(train=train_stats, val=val_stats, test=test_stats),
                    'epoch': epoch, 'best_epoch': state.best_epoch})

    if not args.evaluate:
        print(f'best epoch: {state.best_epoch}')
    logs.print_elapsed(start_time)


def run(argv=None):
    args, config = cli.parse_args_and_config(
        'BLIP NLVR2 fine-tuning and evaluation', './configs/nlvr.yaml', 'output/NLVR',
        defaults=TASK_DEFAULTS, required=REQUIRED_KEYS, known=(), argv=argv, doc=__doc__)
    preflight.check_paths(config, args.config, dirs=['image_root'], files=['pretrained'])
    training.launch(main, args, config)


if __name__ == '__main__':
    cli.main(run)
