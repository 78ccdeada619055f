"""A toy task script on the shared engine, for tests/test_engine.py (in process and as a subprocess).

It has the shape of a real task script: data, model, epoch loop, evaluation, best/last
checkpoints, log.txt. A tiny regression MLP with dropout and a shuffled loader, so the RNG
states matter for resuming. Test hooks in the config: `nan_at: [epoch, iteration]` makes
the loss NaN there; `pause_at: [epoch, iteration]` writes output_dir/paused and sleeps there
(the test kills the process); `fail_eval_at: epoch` makes that epoch's evaluation fail;
`stop_after: epoch` interrupts the run when that epoch is done.
"""
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import utils  # noqa: E402
from engine import checkpoints, cli, logs, loop, precision, training

TOY_DEFAULTS = {'nan_at': None, 'pause_at': None, 'fail_eval_at': None, 'stop_after': None, 'num_samples': 48}
TOY_REQUIRED = ('batch_size_train', 'init_lr', 'min_lr', 'weight_decay', 'max_epoch')


def make_data(num_samples):
    g = torch.Generator().manual_seed(0)  # the data never depend on the run's seed
    x = torch.randn(num_samples, 8, generator=g)
    y = x[:, :1] * 2.0 - x[:, 1:2] + 0.1 * torch.randn(num_samples, 1, generator=g)
    return TensorDataset(x, y)


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1))
        self.register_buffer('seen', torch.zeros((), dtype=torch.long))  # a buffer, like a queue

    def forward(self, x):
        if self.training:
            self.seen += x.size(0)
        return self.net(x)


def make_loss_fn(config, output_dir):
    def loss_fn(model, batch, epoch, i, num_iters):
        if config['pause_at'] == [epoch, i]:
            Path(output_dir, 'paused').touch()
            time.sleep(600)
        x, y = batch
        loss = F.mse_loss(model(x).float(), y)
        if config['nan_at'] == [epoch, i]:
            loss = loss * float('nan')
        return {'loss_mse': loss}
    return loss_fn


@torch.no_grad()
def evaluate(model, data_loader):
    model.eval()
    errors = [F.mse_loss(model(x), y, reduction='sum') for x, y in data_loader]
    return {'mse': (sum(errors) / len(data_loader.dataset)).item()}


def main(args, config, device):
    dataset = make_data(config['num_samples'])
    train_loader = DataLoader(dataset, batch_size=config['batch_size_train'], shuffle=True, drop_last=True)
    val_loader = DataLoader(dataset, batch_size=16)

    model = ToyModel().to(device)
    model, model_without_ddp = training.wrap_model(model, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config['init_lr'], weight_decay=config['weight_decay'])
    scaler = precision.make_grad_scaler(config, device)
    state = checkpoints.resume(args, model_without_ddp, optimizer, scaler)
    loss_fn = make_loss_fn(config, args.output_dir)

    for epoch in range(state.start_epoch, config['max_epoch']):
        if not args.evaluate:
            train_stats = checkpoints.resumed_train_stats(state, epoch)
            if train_stats is None:
                loop.set_epoch(train_loader, epoch)
                utils.cosine_lr_schedule(optimizer, epoch, config['max_epoch'], config['init_lr'], config['min_lr'])
                train_stats = loop.train_one_epoch(model, train_loader, optimizer, epoch, device, config,
                                                     loss_fn, scaler=scaler, state=state)
                # before the evaluation, so a failing one never costs the epoch
                checkpoints.save_last_checkpoint(args.output_dir, model_without_ddp, optimizer, scaler, config,
                                            epoch, state, train_stats=train_stats)
        if config['fail_eval_at'] == epoch:
            raise RuntimeError(f'evaluation of epoch {epoch} failed (test hook)')
        val_stats = evaluate(model_without_ddp, val_loader)
        if args.evaluate:
            logs.log_json(args.output_dir, {f'val_{k}': v for k, v in val_stats.items()}, 'evaluate.txt')
            break
        score = -val_stats['mse']
        if epoch == 0 or score > state.best:
            state.best, state.best_epoch = score, epoch
            checkpoints.save_model(os.path.join(args.output_dir, checkpoints.BEST_CHECKPOINT),
                              model_without_ddp, optimizer, config, epoch)
        logs.log_json(args.output_dir, {**{f'train_{k}': v for k, v in train_stats.items()},
                                          **{f'val_{k}': v for k, v in val_stats.items()},
                                          'epoch': epoch, 'best_epoch': state.best_epoch})
        checkpoints.mark_evaluated(args.output_dir, epoch, state)
        if config['stop_after'] == epoch:
            raise KeyboardInterrupt(f'stopped after epoch {epoch} (test hook)')
        training.end_epoch(device)
    return model_without_ddp


def run(argv):
    args, config = cli.parse_args_and_config('engine toy task', 'toy.yaml', 'output/toy',
                                                defaults=TOY_DEFAULTS, required=TOY_REQUIRED,
                                                known=(), argv=argv, doc=__doc__)
    return training.launch(main, args, config)


if __name__ == '__main__':
    run(sys.argv[1:])
