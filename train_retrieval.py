"""Image-text retrieval on COCO and Flickr30k: fine-tune BLIP with ITC + ITM, evaluate recall@K.

    python train_retrieval.py --config configs/retrieval_coco.yaml --output_dir output/retrieval_coco
    python train_retrieval.py --config configs/retrieval_flickr.yaml --evaluate
    torchrun --nproc_per_node=8 train_retrieval.py --config configs/retrieval_coco.yaml amp=bf16

Evaluation ranks every text for every image (and back) as the original: ITC similarity picks
the top `k_test` candidates, each is re-scored by its raw ITM logit (class 1) plus its ITC
similarity, everything else gets -100 (ranking.py). `k_test: 0` ranks by ITC alone (a fast
preview, labelled so in the logs). Large galleries are evaluated from the top-k lists alone
(`eval_mode: auto|dense|topk`), in memory O((images + texts) x k_test), with the same metrics.
"""
import os
import time
from functools import partial

import ranking
import utils
from data import check_dataset_config, create_dataset, create_loader, create_sampler
from data.custom_dataset import CUSTOM_DEFAULTS
from engine import cli, emulate, logs, preflight, training
from metrics import itm_eval, itm_eval_topk  # noqa: F401
from models.blip_retrieval import blip_retrieval

# the task's evaluation, importable as train_retrieval.evaluation_topk / itm_eval / itm_eval_topk
from ranking import evaluate_split, evaluation, evaluation_topk  # noqa: F401

# Keys of configs/retrieval_{coco,flickr}.yaml, all read below (the data keys, image_root and
# ann_root or those of your own data, dataset: custom, are checked by check_dataset_config).
REQUIRED_KEYS = ('dataset', 'pretrained', 'vit', 'batch_size_train',
                 'batch_size_test', 'vit_grad_ckpt', 'vit_ckpt_layer', 'init_lr', 'image_size',
                 'queue_size', 'alpha', 'k_test', 'negative_all_rank', 'weight_decay', 'min_lr',
                 'max_epoch')
# Data keys that only some datasets read (COCO/Flickr30k annotation folders, or dataset: custom).
OPTIONAL_KEYS = ('ann_root', *CUSTOM_DEFAULTS)
# Model options the official configs leave to blip_retrieval's defaults (tiny test models set them).
TASK_DEFAULTS = {'med_config': 'configs/med_config.json', 'embed_dim': 256, 'momentum': 0.995,
                 # evaluation at gallery scale (see evaluation_topk); the metrics are the same either way
                 'eval_mode': 'auto', 'eval_tokens': 'auto', 'rerank_batch_size': ranking.PAIRS_PER_FORWARD}


def train_inputs(batch, epoch, i, num_iters, config, device):
    """The model's forward arguments for a training batch."""
    image, caption, idx = batch
    # momentum distillation ramps up over the first epoch
    alpha = config['alpha'] if epoch > 0 else config['alpha'] * min(1, i / num_iters)
    return {'image': image.to(device, non_blocking=True), 'caption': caption, 'alpha': alpha,
            'idx': idx.to(device, non_blocking=True)}


def main(args, config, device):
    #### Dataset ####
    print('Creating retrieval dataset')
    train_dataset, val_dataset, test_dataset = create_dataset(f"retrieval_{config['dataset']}", config)
    # --evaluate reads no training image: only val/test need to be there
    preflight.check_images(([] if args.evaluate else [train_dataset]) + [val_dataset, test_dataset], config)
    samplers = create_sampler([train_dataset], [True], utils.get_world_size(), utils.get_rank()) + [None, None]
    train_loader, val_loader, test_loader = create_loader(
        [train_dataset, val_dataset, test_dataset], samplers,
        batch_size=[config['batch_size_train']] + [config['batch_size_test']] * 2,
        num_workers=[config['num_workers']] * 3, is_trains=[True, False, False],
        collate_fns=[None, None, None])

    #### Model ####
    print('Creating model')
    model = blip_retrieval(pretrained=config['pretrained'], image_size=config['image_size'], vit=config['vit'],
                           vit_grad_ckpt=config['vit_grad_ckpt'], vit_ckpt_layer=config['vit_ckpt_layer'],
                           queue_size=config['queue_size'], negative_all_rank=config['negative_all_rank'],
                           med_config=config['med_config'], embed_dim=config['embed_dim'],
                           momentum=config['momentum'])
    run = training.prepare_training(model, args, config, device)
    model_without_ddp, state = run.model_without_ddp, run.state

    # re-ranking progress and memory-mapped image tokens live next to the run's outputs
    eval_config = {'eval_progress_dir': os.path.join(args.output_dir, 'eval_progress'),
                   'eval_work_dir': args.output_dir, **config}

    loss_fn = emulate.ForwardLosses(partial(train_inputs, config=config, device=device), ('loss_ita', 'loss_itm'),
                                    logged=('loss_itm', 'loss_ita'))  # the original's log order
    train_epoch = partial(run.fine_tune_epoch, data_loader=train_loader, loss_fn=loss_fn)
    print('Start training')
    start_time = time.time()
    for epoch, train_stats in run.epochs(train_epoch):
        val_result = evaluate_split(model_without_ddp, val_loader, device, eval_config)
        test_now = evaluate_split(model_without_ddp, test_loader, device, eval_config)

        if utils.is_main_process():
            print(f'val (epoch {epoch}):', val_result)
            # as the original: the best epoch by val r_mean is kept, and the test result
            # reported is the one at the best epoch
            # (the original also copied the weights when only evaluating)
            improved = run.update_best(val_result['r_mean'], epoch, save=not args.evaluate)
            if improved or 'test_result' not in state.extra:
                state.extra['test_result'] = test_now
                print(f'test (epoch {epoch}, the best so far by val r_mean):', state.extra['test_result'])
            test_result = state.extra['test_result']

            ranking_note = {'ranking': 'itc only (k_test 0)'} if config['k_test'] == 0 else {}
            if args.evaluate:
                logs.log_json(args.output_dir, {**logs.split_stats(val=val_result, test=test_result),
                                                **ranking_note}, filename='evaluate.txt')
            else:
                logs.log_json(args.output_dir, {
                    **logs.split_stats(train=train_stats, val=val_result, test=test_result),
                    'epoch': epoch, 'best_epoch': state.best_epoch, **ranking_note})

    logs.print_elapsed(start_time)


def run(argv=None):
    args, config = cli.parse_args_and_config(
        'BLIP image-text retrieval (COCO, Flickr30k)', './configs/retrieval_flickr.yaml',
        'output/Retrieval_flickr', defaults=TASK_DEFAULTS, required=REQUIRED_KEYS,
        known=OPTIONAL_KEYS, argv=argv, doc=__doc__)
    check_dataset_config(f"retrieval_{config['dataset']}", config, args.config)
    preflight.check_paths(config, args.config, dirs=['image_root'], files=['pretrained'])
    training.launch(main, args, config)


if __name__ == '__main__':
    cli.main(run)
