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
import tempfile
import time
from functools import partial

import torch

import engine
import ranking
import utils
from data import check_dataset_config, create_dataset, create_loader, create_sampler
from data.custom_dataset import CUSTOM_DEFAULTS
from models.blip_retrieval import blip_retrieval
from ranking import itm_eval, itm_eval_topk  # noqa: F401 (the task's metrics, train_retrieval.itm_eval*)

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
DENSE_LIMIT = 2 ** 28  # eval_mode auto: dense matrices up to this many entries (1 GB each in float32)
TOKENS_IN_MEMORY_BYTES = 32 * 2 ** 30  # eval_tokens auto: image tokens past this go to a memory-mapped file


def train_step(model, batch, epoch, i, num_iters, config, device):
    image, caption, idx = batch
    image = image.to(device, non_blocking=True)
    idx = idx.to(device, non_blocking=True)
    # momentum distillation ramps up over the first epoch
    alpha = config['alpha'] if epoch > 0 else config['alpha'] * min(1, i / num_iters)
    loss_ita, loss_itm = model(image, caption, alpha=alpha, idx=idx)
    return {'loss_itm': loss_itm, 'loss_ita': loss_ita}


@torch.no_grad()
def evaluation_topk(model, data_loader, device, config):
    """Top-k ranking of the eval set: (i2t_idx, i2t_score, t2i_idx, t2i_score).

    LongTensor / FloatTensor of shapes (images, k) and (texts, k), candidates by descending
    score: ITC similarity picks each row's k = k_test candidates, re-scored by ITM logit
    (class 1) + similarity; k_test 0 ranks by ITC alone (ranking.ITC_ONLY_K candidates). Memory
    is O((images + texts) x k). Optional config keys: `eval_progress_dir` (re-ranking progress
    is saved there and a rerun continues from it), `eval_tokens` (memory|disk|auto: the image
    tokens kept for re-ranking in host memory or in a memory-mapped float16 file in
    `eval_work_dir`), `rerank_batch_size` (pairs per ITM forward).
    """
    model.eval()
    print('Computing features for evaluation...')
    start_time = time.time()
    texts, num_images = data_loader.dataset.text, len(data_loader.dataset)
    text_ids, text_atts, text_embeds = ranking.text_features(model, texts, device, config)
    token_file = _token_file(model, config, num_images)
    image_feats, image_embeds = ranking.image_features(model, data_loader, device, config, token_file)
    try:
        result = ranking.rank(model, image_embeds, image_feats, text_embeds, text_ids, text_atts, device, config,
                              progress_dir=config.get('eval_progress_dir'))
    finally:
        del image_feats
        if token_file is not None:
            os.remove(token_file)
    engine.print_elapsed(start_time, 'Evaluation time')
    return tuple(tensor.cpu() for tensor in result)


def _token_file(model, config, num_images):
    """Where re-ranking keeps the image tokens: None (host memory) or a .npy file to memory-map."""
    mode = config.get('eval_tokens', 'auto')
    if mode not in ('auto', 'memory', 'disk'):
        raise ValueError(f"eval_tokens must be auto, memory or disk, not {mode!r}")
    vit = model.visual_encoder
    nbytes = num_images * (vit.patch_embed.num_patches + 1) * vit.embed_dim * 4
    if mode == 'memory' or (mode == 'auto' and nbytes <= TOKENS_IN_MEMORY_BYTES):
        return None
    folder = config.get('eval_work_dir') or tempfile.gettempdir()
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f'image_tokens_rank{utils.get_rank()}.npy')


def evaluation(model, data_loader, device, config):
    """Score matrices (images x texts, texts x images) as numpy arrays, as the original: each
    row's top-k candidates hold their scores (evaluation_topk), every other entry -100."""
    i2t_idx, i2t_score, t2i_idx, t2i_score = evaluation_topk(model, data_loader, device, config)
    num_images, num_texts = len(i2t_idx), len(t2i_idx)
    return (ranking.dense(i2t_idx, i2t_score, num_texts).numpy(),
            ranking.dense(t2i_idx, t2i_score, num_images).numpy())


def use_topk(config, num_images, num_texts):
    """Whether the scripts evaluate through the top-k lists (`eval_mode: topk`, or `auto` and a
    gallery whose dense matrices would pass DENSE_LIMIT entries); the metrics are the same."""
    mode = config.get('eval_mode', 'auto')
    if mode not in ('auto', 'dense', 'topk'):
        raise ValueError(f"eval_mode must be auto, dense or topk, not {mode!r}")
    return mode == 'topk' or (mode == 'auto' and num_images * num_texts > DENSE_LIMIT)


def evaluate_split(model, data_loader, device, config):
    """itm_eval's metrics of one split on the main process (None elsewhere), dense or top-k."""
    dataset = data_loader.dataset
    if use_topk(config, len(dataset), len(dataset.text)):
        i2t_idx, _, t2i_idx, _ = evaluation_topk(model, data_loader, device, config)
        return itm_eval_topk(i2t_idx, t2i_idx, dataset.txt2img, dataset.img2txt) if utils.is_main_process() else None
    score_i2t, score_t2i = evaluation(model, data_loader, device, config)
    return itm_eval(score_i2t, score_t2i, dataset.txt2img, dataset.img2txt) if utils.is_main_process() else None


def main(args, config, device):
    #### Dataset ####
    print('Creating retrieval dataset')
    train_dataset, val_dataset, test_dataset = create_dataset(f"retrieval_{config['dataset']}", config)
    # --evaluate reads no training image: only val/test need to be there
    engine.check_images(([] if args.evaluate else [train_dataset]) + [val_dataset, test_dataset], config)
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
    model, model_without_ddp, optimizer, scaler, state = engine.prepare_training(model, args, config, device)

    # re-ranking progress and memory-mapped image tokens live next to the run's outputs
    eval_config = {'eval_progress_dir': os.path.join(args.output_dir, 'eval_progress'),
                   'eval_work_dir': args.output_dir, **config}

    print('Start training')
    start_time = time.time()
    for epoch in range(state.start_epoch, config['max_epoch']):
        if not args.evaluate:
            train_stats = engine.resumed_train_stats(state, epoch)  # resumed before its evaluation: not again
            if train_stats is None:
                engine.set_epoch(train_loader, epoch)
                utils.cosine_lr_schedule(optimizer, epoch, config['max_epoch'], config['init_lr'], config['min_lr'])
                train_stats = engine.train_one_epoch(model, train_loader, optimizer, epoch, device, config,
                                                     partial(train_step, config=config, device=device),
                                                     scaler=scaler, state=state)
                # saved before the evaluation, so a failing one never costs the epoch
                engine.save_last_checkpoint(args.output_dir, model_without_ddp, optimizer, scaler, config,
                                            epoch, state, train_stats=train_stats)

        val_result = evaluate_split(model_without_ddp, val_loader, device, eval_config)
        test_now = evaluate_split(model_without_ddp, test_loader, device, eval_config)

        if utils.is_main_process():
            print(f'val (epoch {epoch}):', val_result)
            # as the original: the best epoch by val r_mean is kept, and the test result
            # reported is the one at the best epoch
            # (the original also copied the weights when only evaluating)
            improved = engine.update_best(state, val_result['r_mean'], epoch, args.output_dir, model_without_ddp,
                                          optimizer, config, save=not args.evaluate)
            if improved or 'test_result' not in state.extra:
                state.extra['test_result'] = test_now
                print(f'test (epoch {epoch}, the best so far by val r_mean):', state.extra['test_result'])
            test_result = state.extra['test_result']

            ranking_note = {'ranking': 'itc only (k_test 0)'} if config['k_test'] == 0 else {}
            if args.evaluate:
                engine.log_json(args.output_dir, {**engine.split_stats(val=val_result, test=test_result),
                                                  **ranking_note}, filename='evaluate.txt')
            else:
                engine.log_json(args.output_dir, {
                    **engine.split_stats(train=train_stats, val=val_result, test=test_result),
                    'epoch': epoch, 'best_epoch': state.best_epoch, **ranking_note})
        if args.evaluate:
            break

        engine.mark_evaluated(args.output_dir, epoch, state)  # a resumed run need not evaluate it again
        engine.end_epoch(device)

    engine.print_elapsed(start_time)


def run(argv=None):
    args, config = engine.parse_args_and_config(
        'BLIP image-text retrieval (COCO, Flickr30k)', './configs/retrieval_flickr.yaml',
        'output/Retrieval_flickr', defaults=TASK_DEFAULTS, required=REQUIRED_KEYS,
        known=OPTIONAL_KEYS, argv=argv)
    check_dataset_config(f"retrieval_{config['dataset']}", config, args.config)
    engine.check_paths(config, args.config, dirs=['image_root'], files=['pretrained'])
    device = engine.setup(args, config)
    main(args, config, device)


if __name__ == '__main__':
    run()
