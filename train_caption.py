"""Image captioning on COCO (Karpathy splits): fine-tune BLIP's decoder, score with COCO metrics.

    python train_caption.py --config configs/caption_coco.yaml --output_dir output/caption_coco
    python train_caption.py --config configs/caption_coco.yaml --evaluate
    torchrun --nproc_per_node=8 train_caption.py --config configs/caption_coco.yaml amp=bf16

Every epoch (as the original) the val and test images are captioned with beam search
(`num_beams`, `max_length`, `min_length`; the generated text starts with `prompt`, which is
cut off), each rank's captions are merged into result/{val,test}_epoch<N>.json and scored
against the COCO ground truth in `coco_gt_root`: BLEU-1..4, METEOR, ROUGE-L, CIDEr (SPICE
only when its Stanford CoreNLP jars are installed; skipped offline with a warning). The best
epoch has the highest val CIDEr + BLEU-4 and is kept in checkpoint_best.pth.

Your own images and captions: `dataset: custom` with train_file / val_file / test_file (or one
data_file), see configs/caption_custom.yaml and data/custom_dataset.py; the ground truth of
the metrics is then each split's own captions, written to result/{val,test}_gt.json.
"""
import os
import time
from functools import partial

import utils
from captioning import generate_captions
from data import check_dataset_config, create_dataset, create_loader, create_sampler
from data.custom_dataset import CUSTOM_DEFAULTS
from data.utils import coco_gt_file, save_result, write_json_atomic
from engine import cli, logs, preflight, training
from engine.config import require_keys
from metrics import caption_eval
from models.blip import blip_decoder

# Keys of configs/caption_coco.yaml, all read below (the data keys, image_root, ann_root and
# coco_gt_root or those of dataset: custom, are checked in run).
REQUIRED_KEYS = ('pretrained', 'vit', 'vit_grad_ckpt',
                 'vit_ckpt_layer', 'batch_size', 'init_lr', 'image_size', 'max_length', 'min_length',
                 'num_beams', 'prompt', 'weight_decay', 'min_lr', 'max_epoch')
# Data keys that only some datasets read (COCO/Flickr30k annotation folders, or dataset: custom).
OPTIONAL_KEYS = ('ann_root', 'coco_gt_root', *CUSTOM_DEFAULTS)
# Model options the official config leaves to blip_decoder's defaults (tiny test models set them).
TASK_DEFAULTS = {'med_config': 'configs/med_config.json',
                 'dataset': 'coco'}  # coco (Karpathy splits) | custom (your own data)


def train_step(model, batch, epoch, i, num_iters, device):
    image, caption, _ = batch
    loss = model(image.to(device, non_blocking=True), caption)
    return {'loss': loss}


def ground_truth_files(config, result_dir, **splits):
    """{split: COCO-format ground-truth file}: COCO's own (in coco_gt_root, downloaded when
    missing), or for your own data each split's captions, written to result_dir/<split>_gt.json."""
    if config['dataset'] != 'custom':
        return {split: coco_gt_file(config['coco_gt_root'], split) for split in splits} if utils.is_main_process() else {}
    files = {split: os.path.join(result_dir, f'{split}_gt.json') for split in splits}
    if utils.is_main_process():
        for split, dataset in splits.items():
            write_json_atomic(dataset.coco_ground_truth(), files[split])
    return files


def main(args, config, device):
    os.makedirs(args.result_dir, exist_ok=True)
    #### Dataset ####
    print('Creating captioning dataset')
    train_dataset, val_dataset, test_dataset = create_dataset(f"caption_{config['dataset']}", config)
    # --evaluate reads no training image: only val/test need to be there
    preflight.check_images(([] if args.evaluate else [train_dataset]) + [val_dataset, test_dataset], config)
    gt_files = ground_truth_files(config, args.result_dir, val=val_dataset, test=test_dataset)
    # val/test are split over ranks too; the padded repeats are dropped by save_result
    samplers = create_sampler([train_dataset, val_dataset, test_dataset], [True, False, False],
                              utils.get_world_size(), utils.get_rank())
    train_loader, val_loader, test_loader = create_loader(
        [train_dataset, val_dataset, test_dataset], samplers,
        batch_size=[config['batch_size']] * 3, num_workers=[config['num_workers']] * 3,
        is_trains=[True, False, False], collate_fns=[None, None, None])

    #### Model ####
    print('Creating model')
    model = blip_decoder(pretrained=config['pretrained'], image_size=config['image_size'], vit=config['vit'],
                         vit_grad_ckpt=config['vit_grad_ckpt'], vit_ckpt_layer=config['vit_ckpt_layer'],
                         prompt=config['prompt'], med_config=config['med_config'])
    run = training.prepare_training(model, args, config, device)
    model_without_ddp, state = run.model_without_ddp, run.state

    def train_epoch(epoch):
        return run.fine_tune_epoch(epoch, train_loader, partial(train_step, device=device),
                                   header=f'Train Caption Epoch: [{epoch}]')

    print('Start training')
    start_time = time.time()
    for epoch, train_stats in run.epochs(train_epoch):
        val_result = generate_captions(model_without_ddp, val_loader, device, config)
        val_result_file = save_result(val_result, args.result_dir, f'val_epoch{epoch}', remove_duplicate='image_id')
        test_result = generate_captions(model_without_ddp, test_loader, device, config)
        test_result_file = save_result(test_result, args.result_dir, f'test_epoch{epoch}', remove_duplicate='image_id')

        if utils.is_main_process():
            coco_val = caption_eval(gt_files['val'], val_result_file)
            coco_test = caption_eval(gt_files['test'], test_result_file)

            if args.evaluate:
                logs.log_json(args.output_dir, logs.split_stats(val=coco_val.eval, test=coco_test.eval),
                              filename='evaluate.txt')
            else:
                # as the original: the best epoch by val CIDEr + BLEU-4
                score = float(coco_val.eval['CIDEr'] + coco_val.eval['Bleu_4'])  # (a plain float for the checkpoint)
                run.update_best(score, epoch)
                logs.log_json(args.output_dir, {
                    **logs.split_stats(train=train_stats, val=coco_val.eval, test=coco_test.eval),
                    'epoch': epoch, 'best_epoch': state.best_epoch})

    logs.print_elapsed(start_time)


def run(argv=None):
    args, config = cli.parse_args_and_config(
        'BLIP image captioning (COCO Karpathy splits)', './configs/caption_coco.yaml', 'output/Caption_coco',
        defaults=TASK_DEFAULTS, required=REQUIRED_KEYS,
        known=OPTIONAL_KEYS, argv=argv, doc=__doc__)
    dataset = f"caption_{config['dataset']}"
    check_dataset_config(dataset, config, args.config)
    if dataset == 'caption_coco':
        require_keys(config, ['coco_gt_root'], args.config)
    preflight.check_paths(config, args.config, dirs=['image_root'], files=['pretrained'])
    args.result_dir = os.path.join(args.output_dir, 'result')  # made by main
    training.launch(main, args, config)


if __name__ == '__main__':
    cli.main(run)
