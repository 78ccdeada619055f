"""Image-text retrieval on COCO and Flickr30k: fine-tune BLIP with ITC + ITM, evaluate recall@K.

    python train_retrieval.py --config configs/retrieval_coco.yaml --output_dir output/retrieval_coco
    python train_retrieval.py --config configs/retrieval_flickr.yaml --evaluate
    torchrun --nproc_per_node=8 train_retrieval.py --config configs/retrieval_coco.yaml amp=bf16

Evaluation ranks every text for every image (and back) as the original: ITC similarity picks
the top `k_test` candidates, each is re-scored by its raw ITM logit (class 1) plus its ITC
similarity, everything else gets -100.
"""
import time
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

import engine
import utils
from data import create_dataset, create_loader, create_sampler
from models.blip_retrieval import blip_retrieval

# Keys of configs/retrieval_{coco,flickr}.yaml, all read below.
REQUIRED_KEYS = ('image_root', 'ann_root', 'dataset', 'pretrained', 'vit', 'batch_size_train',
                 'batch_size_test', 'vit_grad_ckpt', 'vit_ckpt_layer', 'init_lr', 'image_size',
                 'queue_size', 'alpha', 'k_test', 'negative_all_rank', 'weight_decay', 'min_lr',
                 'max_epoch')
# Model options the official configs leave to blip_retrieval's defaults (tiny test models set them).
TASK_DEFAULTS = {'med_config': 'configs/med_config.json', 'embed_dim': 256, 'momentum': 0.995}
TEXT_BATCH = 256  # texts per forward when computing text features (the original's)


def train_step(model, batch, epoch, i, num_iters, config, device):
    image, caption, idx = batch
    image = image.to(device, non_blocking=True)
    idx = idx.to(device, non_blocking=True)
    # momentum distillation ramps up over the first epoch
    alpha = config['alpha'] if epoch > 0 else config['alpha'] * min(1, i / num_iters)
    loss_ita, loss_itm = model(image, caption, alpha=alpha, idx=idx)
    return {'loss_itm': loss_itm, 'loss_ita': loss_ita}


def _rows_of_this_rank(num_rows):
    # the original's split of the re-ranking work: contiguous blocks of rows per rank
    step = num_rows // utils.get_world_size() + 1
    start = min(num_rows, utils.get_rank() * step)
    return start, min(num_rows, start + step)


@torch.no_grad()
def _itm_scores(model, cross_kv, text_ids, text_atts, device):
    """Raw ITM logit (class 1) of one image against each text, in one batch.

    cross_kv: the image's cross-attention keys/values (text_encoder.compute_cross_kv), shared
    by every text without copies. Columns that are padding in every text are cut first:
    padded keys are masked out, so the [CLS] output does not depend on them.
    """
    length = int(text_atts.sum(dim=1).max())
    text_ids, text_atts = text_ids[:, :length].to(device), text_atts[:, :length].to(device)
    # every image token is visible, so no image mask is needed (the original's all-ones one)
    output = model.text_encoder(text_ids, attention_mask=text_atts, cross_kv=cross_kv, return_dict=True)
    return model.itm_head(output.last_hidden_state[:, 0, :])[:, 1].float()


@torch.no_grad()
def evaluation(model, data_loader, device, config):
    """Score matrices (images x texts, texts x images) as numpy arrays, as the original.

    ITM scores are computed once per (image, text) pair, grouped by image: an image's
    cross-attention keys/values are projected once, then the texts it is paired with (its
    top-k, and the texts that have it in their top-k) are scored in batches of k_test.
    Under N processes each rank re-ranks its block of image rows and text rows, then the
    matrices are summed over ranks; rows a rank does not own hold zeros, so the sum equals
    the one-process result exactly.
    """
    model.eval()
    metric_logger = utils.MetricLogger(delimiter='  ')
    print('Computing features for evaluation...')
    start_time = time.time()

    text_ids, text_atts, text_embeds = text_features(model, data_loader.dataset.text, device, config)

    image_feats, image_embeds = [], []
    for image, _ in metric_logger.log_every(data_loader, 50, 'Image features:'):
        image = image.to(device)
        with engine.autocast(config, device):
            image_feat = model.visual_encoder(image)
            image_embed = model.vision_proj(image_feat[:, 0, :])
        image_feats.append(image_feat.cpu())  # kept on the host, as the original
        image_embeds.append(F.normalize(image_embed.float(), dim=-1))
    image_feats = torch.cat(image_feats, dim=0)
    image_embeds = torch.cat(image_embeds, dim=0)

    sims_matrix = image_embeds @ text_embeds.t()
    score_matrix_i2t, score_matrix_t2i = rerank(model, sims_matrix, image_feats, text_ids, text_atts,
                                                device, config)

    engine.print_elapsed(start_time, 'Evaluation time')
    return score_matrix_i2t.cpu().numpy(), score_matrix_t2i.cpu().numpy()


@torch.no_grad()
def text_features(model, texts, device, config):
    """(token ids with [ENC] first, for ITM; attention masks; normalised ITC features) of texts."""
    metric_logger = utils.MetricLogger(delimiter='  ')
    text_ids, text_atts, text_embeds = [], [], []
    for i in metric_logger.log_every(range(0, len(texts), TEXT_BATCH), 50, 'Text features:'):
        text_input = model.tokenizer(texts[i:i + TEXT_BATCH], padding='max_length', truncation=True,
                                     max_length=35, return_tensors='pt').to(device)
        with engine.autocast(config, device):
            text_output = model.text_encoder(text_input.input_ids, attention_mask=text_input.attention_mask,
                                             mode='text')
            text_embed = model.text_proj(text_output.last_hidden_state[:, 0, :])
        text_embeds.append(F.normalize(text_embed.float(), dim=-1))
        text_ids.append(text_input.input_ids)
        text_atts.append(text_input.attention_mask)
    text_embeds = torch.cat(text_embeds, dim=0)
    text_ids = torch.cat(text_ids, dim=0)
    text_atts = torch.cat(text_atts, dim=0)
    text_ids[:, 0] = model.tokenizer.enc_token_id  # ITM reads [ENC] first
    return text_ids, text_atts, text_embeds


@torch.no_grad()
def rerank(model, sims_matrix, image_feats, text_ids, text_atts, device, config):
    """The two score matrices (tensors) from ITC similarities (images x texts) and ITM.

    image_feats: (images, tokens, width) visual encoder outputs (the cross-attention input),
    on any device; text_ids / text_atts from text_features. Each rank re-ranks its rows and
    the result is summed over ranks (see evaluation). eval_retrieval_video.py uses it with
    videos in place of images.
    """
    k_test = config['k_test']
    metric_logger = utils.MetricLogger(delimiter='  ')
    num_images, num_texts = sims_matrix.shape

    # top-k candidates of this rank's image rows and text rows
    i_start, i_end = _rows_of_this_rank(num_images)
    t_start, t_end = _rows_of_this_rank(num_texts)
    # (k is capped at the number of candidates, where the original would fail)
    i2t_sim, i2t_idx = sims_matrix[i_start:i_end].topk(k=min(k_test, num_texts), dim=1)
    t2i_sim, t2i_idx = sims_matrix.t()[t_start:t_end].topk(k=min(k_test, num_images), dim=1)
    i2t_images = torch.arange(i_start, i_end, device=device)[:, None].expand_as(i2t_idx)
    t2i_texts = torch.arange(t_start, t_end, device=device)[:, None].expand_as(t2i_idx)

    # every (image, text) pair to score, once, sorted by image
    i2t_keys = (i2t_images * num_texts + i2t_idx).flatten()
    t2i_keys = (t2i_idx * num_texts + t2i_texts).flatten()
    pair_keys = torch.unique(torch.cat([i2t_keys, t2i_keys]))
    pair_images, pair_texts = pair_keys // num_texts, pair_keys % num_texts
    pair_scores = torch.empty(len(pair_keys), device=device)
    images_to_score, counts = torch.unique_consecutive(pair_images, return_counts=True)
    offsets = torch.cumsum(counts, dim=0) - counts
    for image_index, offset, count in metric_logger.log_every(
            list(zip(images_to_score.tolist(), offsets.tolist(), counts.tolist())), 50, 'Re-ranking:'):
        with engine.autocast(config, device):
            # the image's keys/values are projected once for all its candidate texts
            cross_kv = model.text_encoder.compute_cross_kv(image_feats[image_index:image_index + 1].to(device))
            for begin in range(offset, offset + count, k_test):
                end = min(begin + k_test, offset + count)
                texts_of_pair = pair_texts[begin:end]
                pair_scores[begin:end] = _itm_scores(model, cross_kv, text_ids[texts_of_pair],
                                                     text_atts[texts_of_pair], device)

    # fill the rows this rank owns: -100 except the top-k, which get ITM logit + similarity
    filler = -100.0 if utils.get_world_size() == 1 else 0.0
    score_matrix_i2t = torch.full((num_images, num_texts), filler, device=device)
    score_matrix_t2i = torch.full((num_texts, num_images), filler, device=device)
    score_matrix_i2t[i_start:i_end] = -100.0
    score_matrix_t2i[t_start:t_end] = -100.0
    i2t_itm = pair_scores[torch.searchsorted(pair_keys, i2t_keys)].view_as(i2t_sim)
    t2i_itm = pair_scores[torch.searchsorted(pair_keys, t2i_keys)].view_as(t2i_sim)
    score_matrix_i2t[i2t_images, i2t_idx] = i2t_itm + i2t_sim
    score_matrix_t2i[t2i_texts, t2i_idx] = t2i_itm + t2i_sim

    if utils.get_world_size() > 1:
        utils.barrier()
        utils.all_reduce_sum(score_matrix_i2t)
        utils.all_reduce_sum(score_matrix_t2i)
    return score_matrix_i2t, score_matrix_t2i


@torch.no_grad()
def itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """Recall@1/5/10 (percent) in both directions and their means, as the original computes them."""
    # image -> text: the rank of the best-placed of the image's captions
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        order = np.argsort(score)[::-1]
        ranks[index] = min((np.where(order == i)[0][0] for i in img2txt[index]), default=1e20)
    tr1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    tr5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    tr10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)

    # text -> image: the rank of the caption's image
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        order = np.argsort(score)[::-1]
        ranks[index] = np.where(order == txt2img[index])[0][0]
    ir1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    ir5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    ir10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)

    tr_mean = (tr1 + tr5 + tr10) / 3
    ir_mean = (ir1 + ir5 + ir10) / 3
    r_mean = (tr_mean + ir_mean) / 2
    return {'txt_r1': tr1, 'txt_r5': tr5, 'txt_r10': tr10, 'txt_r_mean': tr_mean,
            'img_r1': ir1, 'img_r5': ir5, 'img_r10': ir10, 'img_r_mean': ir_mean,
            'r_mean': r_mean}


def main(args, config, device):
    #### Dataset ####
    print('Creating retrieval dataset')
    train_dataset, val_dataset, test_dataset = create_dataset(f"retrieval_{config['dataset']}", config)
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

    print('Start training')
    start_time = time.time()
    for epoch in range(state.start_epoch, config['max_epoch']):
        if not args.evaluate:
            engine.set_epoch(train_loader, epoch)
            utils.cosine_lr_schedule(optimizer, epoch, config['max_epoch'], config['init_lr'], config['min_lr'])
            train_stats = engine.train_one_epoch(model, train_loader, optimizer, epoch, device, config,
                                                 partial(train_step, config=config, device=device),
                                                 scaler=scaler, state=state)

        score_val_i2t, score_val_t2i = evaluation(model_without_ddp, val_loader, device, config)
        score_test_i2t, score_test_t2i = evaluation(model_without_ddp, test_loader, device, config)

        if utils.is_main_process():
            val_result = itm_eval(score_val_i2t, score_val_t2i, val_loader.dataset.txt2img,
                                  val_loader.dataset.img2txt)
            print(val_result)
            # as the original: the best epoch by val r_mean is kept, and the test result
            # reported is the one at the best epoch
            # (the original also copied the weights when only evaluating)
            improved = engine.update_best(state, val_result['r_mean'], epoch, args.output_dir, model_without_ddp,
                                          optimizer, config, save=not args.evaluate)
            if improved or 'test_result' not in state.extra:
                state.extra['test_result'] = itm_eval(score_test_i2t, score_test_t2i,
                                                      test_loader.dataset.txt2img, test_loader.dataset.img2txt)
                print(state.extra['test_result'])
            test_result = state.extra['test_result']

            if args.evaluate:
                engine.log_json(args.output_dir, engine.split_stats(val=val_result, test=test_result),
                                filename='evaluate.txt')
            else:
                engine.log_json(args.output_dir, {
                    **engine.split_stats(train=train_stats, val=val_result, test=test_result),
                    'epoch': epoch, 'best_epoch': state.best_epoch})
        if args.evaluate:
            break

        engine.save_last_checkpoint(args.output_dir, model_without_ddp, optimizer, scaler, config, epoch, state)
        engine.end_epoch(device)

    engine.print_elapsed(start_time)


def run(argv=None):
    args, config = engine.parse_args_and_config(
        'BLIP image-text retrieval (COCO, Flickr30k)', './configs/retrieval_flickr.yaml',
        'output/Retrieval_flickr', defaults=TASK_DEFAULTS, required=REQUIRED_KEYS, known=(), argv=argv)
    engine.check_paths(config, args.config, dirs=['image_root'], files=['pretrained'])
    device = engine.setup(args, config)
    main(args, config, device)


if __name__ == '__main__':
    run()
