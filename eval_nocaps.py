"""Zero-shot captioning on NoCaps: caption the val and test images with a COCO-finetuned BLIP.

    python eval_nocaps.py --config configs/nocaps.yaml --output_dir output/NoCaps
    torchrun --nproc_per_node=8 eval_nocaps.py --config configs/nocaps.yaml

Writes result/val.json and result/test.json ([{image_id, caption}], one per image) in the
format of the official evaluation server, as the original. Captions come from beam search
with the config's num_beams / max_length / min_length and repetition penalty 1.1 (the
original's NoCaps setting), prompt stripped.

When ground truth is at hand (`val_gt_file` / `test_gt_file`: COCO-format caption files such
as nocaps_val_4500_captions.json; default none, the original's behaviour) the results are
also scored locally (BLEU-1..4, METEOR, ROUGE-L, CIDEr) and written to evaluate.txt.
"""
import os

import utils
from captioning import generate_captions
from data import create_dataset, create_loader, create_sampler
from data.utils import save_result
from engine import checkpoints, cli, logs, preflight, training
from metrics import caption_eval
from models.blip import blip_decoder

# Keys of configs/nocaps.yaml, all read below.
REQUIRED_KEYS = ('image_root', 'ann_root', 'pretrained', 'vit', 'batch_size', 'image_size',
                 'max_length', 'min_length', 'num_beams', 'prompt')
TASK_DEFAULTS = {
    'med_config': 'configs/med_config.json',
    'vit_grad_ckpt': False,   # (the original builds the model without these two)
    'vit_ckpt_layer': 0,
    'val_gt_file': None,      # COCO-format ground truth of a split: score its results locally
    'test_gt_file': None,
}
REPETITION_PENALTY = 1.1  # the original's NoCaps generation setting
SPLITS = ('val', 'test')


def check_gt_files(config, config_path):
    for split in SPLITS:
        path = config[f'{split}_gt_file']
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f'{config_path}: {split}_gt_file: ground-truth file {path!r} does not exist')


def main(args, config, device):
    os.makedirs(args.result_dir, exist_ok=True)
    #### Dataset ####
    print('Creating captioning dataset')
    datasets = create_dataset('nocaps', config)
    preflight.check_images(datasets, config)
    # each rank captions its share; the padded repeats are dropped by save_result
    samplers = create_sampler(datasets, [False, False], utils.get_world_size(), utils.get_rank())
    loaders = create_loader(datasets, samplers, batch_size=[config['batch_size']] * 2,
                            num_workers=[config['num_workers']] * 2, is_trains=[False, False],
                            collate_fns=[None, None])

    #### Model ####
    print('Creating model')
    model = blip_decoder(pretrained=config['pretrained'], image_size=config['image_size'], vit=config['vit'],
                         vit_grad_ckpt=config['vit_grad_ckpt'], vit_ckpt_layer=config['vit_ckpt_layer'],
                         prompt=config['prompt'], med_config=config['med_config'])
    if not args.resume:  # (a --resume checkpoint replaces every weight)
        training.require_trained_weights(model, config)
    model = model.to(device)
    checkpoints.resume(args, model)  # --resume FILE: that training checkpoint's weights

    metrics = {}
    for split, loader in zip(SPLITS, loaders):
        result = generate_captions(model, loader, device, config, repetition_penalty=REPETITION_PENALTY,
                                   header=f"Evaluation ({split}):")
        result_file = save_result(result, args.result_dir, split, remove_duplicate='image_id')
        gt_file = config[f'{split}_gt_file']
        if gt_file and utils.is_main_process():
            scores = caption_eval(gt_file, result_file)
            metrics.update({f'{split}_{k}': v for k, v in scores.eval.items()})
    if metrics:
        print(metrics)
        logs.log_json(args.output_dir, metrics, filename='evaluate.txt')


def run(argv=None):
    args, config = cli.parse_args_and_config(
        'BLIP zero-shot captioning on NoCaps', './configs/nocaps.yaml', 'output/NoCaps',
        defaults=TASK_DEFAULTS, required=REQUIRED_KEYS, known=(), argv=argv, doc=__doc__)
    args.evaluate = True  # evaluation only: --resume loads weights, nothing resumes on its own
    preflight.check_paths(config, args.config, dirs=['image_root'], files=['pretrained'])
    check_gt_files(config, args.config)
    args.result_dir = os.path.join(args.output_dir, 'result')  # made by main
    training.launch(main, args, config)


if __name__ == '__main__':
    cli.main(run)
