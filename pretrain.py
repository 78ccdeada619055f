"""BLIP pre-training: image-text contrastive (ITC), image-text matching (ITM) and language
modelling (LM) losses on image-caption pairs, optionally with a new LAION shard each epoch.

    python pretrain.py --config configs/pretrain.yaml --output_dir output/Pretrain
    torchrun --nproc_per_node=8 pretrain.py --config configs/pretrain.yaml amp=bf16 accum_steps=2
    python pretrain.py --config configs/pretrain.yaml --checkpoint output/Pretrain/checkpoint_04.pth

As the original: the learning rate warms up linearly over the first `warmup_steps` steps of
epoch 0, then decays by `lr_decay_rate` per epoch (step_lr_schedule); the distillation
weight alpha ramps up over the first two epochs; every epoch writes checkpoint_%02d.pth.
checkpoint_last.pth (also written every epoch) holds what an interrupted run needs to
continue; a run restarted in the same --output_dir continues from it, and --checkpoint
(alias --resume) continues from any of those files, the original's included.

New config keys (defaults reproduce the original): `vit_checkpoint` ('default': the
original's ImageNet ViT weights; '' or null: random; or a file / URL) and `bert_checkpoint`
(the BERT weights the text encoder and decoder start from; '' or null: random).
"""
import os
import time
from functools import partial

import utils
from data import create_dataset, create_loader, create_sampler
from engine import checkpoints, cli, emulate, logs, loop, preflight, training
from models.blip_pretrain import DEFAULT_VIT_CHECKPOINTS, blip_pretrain

# Keys of configs/pretrain.yaml, all read below.
REQUIRED_KEYS = ('train_file', 'vit', 'vit_grad_ckpt', 'vit_ckpt_layer', 'image_size', 'batch_size',
                 'queue_size', 'alpha', 'weight_decay', 'init_lr', 'min_lr', 'warmup_lr', 'lr_decay_rate',
                 'max_epoch', 'warmup_steps')
TASK_DEFAULTS = {
    'laion_path': '',                       # folder of LAION *.json shards; '' for none
    'med_config': 'configs/bert_config.json',
    'embed_dim': 256,
    'momentum': 0.995,
    'vit_checkpoint': 'default',            # the original: DeiT-B (base) / in21k ViT-L (large)
    'bert_checkpoint': 'bert-base-uncased',  # the original: BertModel.from_pretrained('bert-base-uncased')
    # fork key: the training loss is ita * loss_ita + itm * loss_itm + lm * loss_lm (the
    # original's plain sum); weights left out are 1
    'loss_weights': {'ita': 1.0, 'itm': 1.0, 'lm': 1.0},
}
LOSSES = ('ita', 'itm', 'lm')
LOSS_NAMES = tuple(f'loss_{name}' for name in LOSSES)  # the model's losses, in its order
MIN_SCALE = 0.2  # random-resized-crop scale of pre-training (fine-tuning uses 0.5)


def train_inputs(batch, epoch, i, num_iters, config, device):
    """The model's forward arguments for a training batch."""
    image, caption = batch
    # the distillation weight ramps up over the first two epochs
    alpha = config['alpha'] * min(1, (epoch * num_iters + i) / (2 * num_iters))
    return {'image': image.to(device, non_blocking=True), 'caption': caption, 'alpha': alpha}


def build_loader(dataset, config):
    sampler = create_sampler([dataset], [True], utils.get_world_size(), utils.get_rank())
    return create_loader([dataset], sampler, batch_size=[config['batch_size']],
                         num_workers=[config['num_workers']], is_trains=[True], collate_fns=[None])[0]


def check_train_files(config, config_path):
    files = config['train_file']
    files = [files] if isinstance(files, str) else files
    if not files:
        raise ValueError(f'{config_path}: train_file lists no annotation file')
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{config_path}: train_file: annotation file {path!r} does not exist')


def loss_weights(config, config_path):
    """config['loss_weights'] checked and completed: {'loss_ita': w, 'loss_itm': w, 'loss_lm': w}."""
    weights = config['loss_weights']
    if not isinstance(weights, dict):
        raise ValueError(f'{config_path}: loss_weights must map {", ".join(LOSSES)} to numbers, '
                         f'got {weights!r}')
    for name, weight in weights.items():
        if name not in LOSSES:
            raise ValueError(f'{config_path}: loss_weights: unknown loss {name!r} (known: {", ".join(LOSSES)})')
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float('inf'):
            raise ValueError(f'{config_path}: loss_weights.{name} must be a number >= 0, got {weight!r}')
    return {f'loss_{name}': float(weights.get(name, 1.0)) for name in LOSSES}


def main(args, config, device):
    #### Dataset ####
    print('Creating dataset')
    dataset = create_dataset('pretrain', config, min_scale=MIN_SCALE)
    print(f'number of training samples: {len(dataset)}')
    data_loader = build_loader(dataset, config)

    #### Model ####
    print('Creating model')
    model = blip_pretrain(image_size=config['image_size'], vit=config['vit'], vit_grad_ckpt=config['vit_grad_ckpt'],
                          vit_ckpt_layer=config['vit_ckpt_layer'], queue_size=config['queue_size'],
                          med_config=config['med_config'], embed_dim=config['embed_dim'],
                          momentum=config['momentum'], vit_checkpoint=config['vit_checkpoint'] or None,
                          bert_checkpoint=config['bert_checkpoint'] or None)
    run = training.prepare_training(model, args, config, device)
    weights = loss_weights(config, args.config)

    loss_fn = emulate.ForwardLosses(partial(train_inputs, config=config, device=device), LOSS_NAMES)

    def train_epoch(epoch):
        nonlocal data_loader
        utils.step_lr_schedule(run.optimizer, epoch, config['init_lr'], config['min_lr'], config['lr_decay_rate'])
        if config['laion_path']:
            # this epoch's LAION shard; the shard's size may differ, so the sampler is rebuilt
            dataset.reload_laion(epoch)
            data_loader = build_loader(dataset, config)
        loop.set_epoch(data_loader, epoch)

        # linear warm-up during the first epoch, one value per optimizer step
        warmup = None
        if epoch == 0:
            warmup = partial(utils.warmup_lr_schedule, run.optimizer, max_step=config['warmup_steps'],
                             init_lr=config['warmup_lr'], max_lr=config['init_lr'])
        return run.train_one_epoch(epoch, data_loader, loss_fn, lr_fn=warmup, window_size=50, loss_weights=weights)

    print('Start training')
    start_time = time.time()
    for epoch, train_stats in run.epochs(train_epoch, evaluates=False):
        checkpoints.save_model(os.path.join(args.output_dir, f'checkpoint_{epoch:02d}.pth'),
                               run.model_without_ddp, run.optimizer, config, epoch)
        logs.log_json(args.output_dir, {**logs.split_stats(train=train_stats), 'epoch': epoch})

    logs.print_elapsed(start_time)


def run(argv=None):
    args, config = cli.parse_args_and_config(
        'BLIP pre-training (ITC + ITM + LM)', './configs/pretrain.yaml', 'output/Pretrain',
        defaults=TASK_DEFAULTS, required=REQUIRED_KEYS, known=(), argv=argv, doc=__doc__)
    if args.evaluate:
        raise SystemExit('pretrain.py has no evaluation: run it without --evaluate')
    preflight.check_paths(config, args.config, dirs=['laion_path'],
                       files=[] if config['vit_checkpoint'] == 'default' else ['vit_checkpoint'])
    if config['vit_checkpoint'] == 'default' and DEFAULT_VIT_CHECKPOINTS.get(str(config['vit'])):
        preflight.check_url(DEFAULT_VIT_CHECKPOINTS[config['vit']], f'{args.config}: vit_checkpoint (default)')
    check_train_files(config, args.config)
    loss_weights(config, args.config)
    training.launch(main, args, config)


if __name__ == '__main__':
    cli.main(run)
