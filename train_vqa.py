"""Visual question answering on VQA v2 (+ Visual Genome QA): fine-tune BLIP, answer the test questions.

    python train_vqa.py --config configs/vqa.yaml --output_dir output/VQA
    python train_vqa.py --config configs/vqa.yaml --evaluate
    torchrun --nproc_per_node=8 train_vqa.py --config configs/vqa.yaml amp=bf16

As the original: every epoch trains and saves checkpoint_%02d.pth (plus checkpoint_last.pth
to resume); the test questions are answered once, after training, into
result/vqa_result.json ([{question_id, answer}], what the official server expects). Answers
are ranked from the answer list (`inference: rank`: the k_test most likely first tokens,
then the best full answer) or generated (`inference: generate`, beam search).

When the test split carries the human answers (an `answer` list per question, as the
synthetic data and a re-split of VQA v2 val do), the VQA accuracy is also computed here and
written to evaluate.txt: the standard metric, see `metrics.vqa_accuracy`.
"""
import json
import os
import time
from functools import partial

import torch

import utils
from data import create_dataset, create_loader, create_sampler, vqa_collate_fn
from data.utils import save_result
from engine import checkpoints, cli, logs, precision, preflight, training
from engine.config import ConfigError
from metrics import vqa_accuracy
from models.blip_vqa import blip_vqa

# Keys of configs/vqa.yaml, all read below.
REQUIRED_KEYS = ('vqa_root', 'vg_root', 'train_files', 'ann_root', 'pretrained', 'vit', 'batch_size_train',
                 'batch_size_test', 'vit_grad_ckpt', 'vit_ckpt_layer', 'init_lr', 'image_size', 'k_test',
                 'inference', 'weight_decay', 'min_lr', 'max_epoch')
# Model options the official config leaves to blip_vqa's defaults (tiny test models set them).
TASK_DEFAULTS = {'med_config': 'configs/med_config.json'}
INFERENCE_MODES = ('rank', 'generate')


def train_step(model, batch, epoch, i, num_iters, device):
    image, question, answer, weights, n = batch
    image = image.to(device, non_blocking=True)
    weights = weights.to(device, non_blocking=True)
    loss = model(image, question, answer, train=True, n=n, weights=weights)
    return {'loss': loss}


@torch.no_grad()
def evaluation(model, data_loader, device, config):
    """Answer every question of the loader: [{'question_id': int, 'answer': str}] of this rank."""
    model.eval()
    metric_logger = utils.MetricLogger(delimiter='  ')
    header = 'Generate VQA test result:'

    if config['inference'] == 'rank':
        answer_list = data_loader.dataset.answer_list
        # every candidate tokenized once, [DEC] first (as the original)
        answer_candidates = model.tokenize_candidates(answer_list).to(device)

    result = []
    for image, question, question_id in metric_logger.log_every(data_loader, 50, header):
        image = image.to(device, non_blocking=True)
        with precision.autocast(config, device):
            if config['inference'] == 'generate':
                answers = model(image, question, train=False, inference='generate')
            else:
                answer_ids = model(image, question, answer_candidates, train=False, inference='rank',
                                   k_test=config['k_test'])
                answers = [answer_list[answer_id] for answer_id in answer_ids.tolist()]
        for ques_id, answer in zip(question_id, answers):
            result.append({'question_id': int(ques_id), 'answer': answer})
    return result


def has_human_answers(annotation):
    return bool(annotation) and all(isinstance(ann.get('answer'), list) and ann['answer'] for ann in annotation)


# --------------------------------------------------------------------------- main

def main(args, config, device):
    os.makedirs(args.result_dir, exist_ok=True)
    #### Dataset ####
    print('Creating vqa datasets')
    datasets = create_dataset('vqa', config)
    preflight.check_images(datasets[1:] if args.evaluate else datasets, config)  # --evaluate: the test images
    # the test questions are split over ranks too; padded repeats are dropped by save_result
    samplers = create_sampler(datasets, [True, False], utils.get_world_size(), utils.get_rank())
    train_loader, test_loader = create_loader(datasets, samplers,
                                              batch_size=[config['batch_size_train'], config['batch_size_test']],
                                              num_workers=[config['num_workers']] * 2, is_trains=[True, False],
                                              collate_fns=[vqa_collate_fn, None])

    #### Model ####
    print('Creating model')
    model = blip_vqa(pretrained=config['pretrained'], image_size=config['image_size'], vit=config['vit'],
                     vit_grad_ckpt=config['vit_grad_ckpt'], vit_ckpt_layer=config['vit_ckpt_layer'],
                     med_config=config['med_config'])
    run = training.prepare_training(model, args, config, device)
    model_without_ddp = run.model_without_ddp

    train_epoch = partial(run.fine_tune_epoch, data_loader=train_loader, loss_fn=partial(train_step, device=device))
    print('Start training')
    start_time = time.time()
    for epoch, train_stats in run.epochs(train_epoch, evaluates=False):  # (evaluated once, after training)
        logs.log_json(args.output_dir, {**logs.split_stats(train=train_stats), 'epoch': epoch})
        # the original's per-epoch checkpoint (run.epochs then writes the full state to resume from)
        checkpoints.save_model(os.path.join(args.output_dir, 'checkpoint_%02d.pth' % epoch),
                               model_without_ddp, run.optimizer, config, epoch)

    vqa_result = evaluation(model_without_ddp, test_loader, device, config)
    result_file = save_result(vqa_result, args.result_dir, 'vqa_result', remove_duplicate='question_id')

    annotation = test_loader.dataset.annotation
    if utils.is_main_process() and has_human_answers(annotation):
        with open(result_file) as f:
            accuracy = vqa_accuracy(json.load(f), annotation)
        print(f'VQA accuracy on the test split: {accuracy:.2f}')
        logs.log_json(args.output_dir, {'test_vqa_acc': accuracy, 'num_questions': len(annotation),
                                        'inference': config['inference']}, filename='evaluate.txt')

    logs.print_elapsed(start_time)


def run(argv=None):
    args, config = cli.parse_args_and_config(
        'BLIP visual question answering (VQA v2)', './configs/vqa.yaml', 'output/VQA',
        defaults=TASK_DEFAULTS, required=REQUIRED_KEYS, known=(), argv=argv, doc=__doc__)
    if config['inference'] not in INFERENCE_MODES:
        raise ConfigError(f"config file {args.config}: inference must be one of "
                          f"{', '.join(INFERENCE_MODES)}; got {config['inference']!r}")
    preflight.check_paths(config, args.config, dirs=['vqa_root', 'vg_root'], files=['pretrained'])
    args.result_dir = os.path.join(args.output_dir, 'result')  # made by main
    training.launch(main, args, config)


if __name__ == '__main__':
    cli.main(run)
