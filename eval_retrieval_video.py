"""Zero-shot text-video retrieval (MSRVTT) with an image-text retrieval model (COCO-finetuned).

    python eval_retrieval_video.py --config configs/retrieval_msrvtt.yaml --output_dir output/Retrieval_msrvtt
    torchrun --nproc_per_node=8 eval_retrieval_video.py --config configs/retrieval_msrvtt.yaml

As the original: every sampled frame goes through the ViT; a video's ITC feature is the
mean of its frames' projected [CLS] features (normalised after averaging), and ITM reads
the frames' token sequences concatenated (num_frm_test x tokens per frame). The ranking is
ranking.py's, as for images: ITC similarity picks the top `k_test` candidates, each re-scored by its
raw ITM logit (class 1) plus its similarity, -100 elsewhere; under N processes each rank
re-ranks a block of rows and the matrices are summed. Reported: recall@1/5/10 both ways,
their means, and the median rank of text-to-video retrieval (vid_mdR), in test_result.txt.
"""
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import ranking
import utils
from data import create_dataset
from engine import cli, logs, precision, preflight, training
from metrics import itm_eval_video as itm_eval  # the original's name, kept importable here
from models.blip_retrieval import blip_retrieval

# Keys of configs/retrieval_msrvtt.yaml, all read below.
REQUIRED_KEYS = ('video_root', 'ann_root', 'pretrained', 'vit', 'batch_size', 'k_test', 'image_size',
                 'num_frm_test')
# Options the official config leaves to their defaults (the original's values).
TASK_DEFAULTS = {
    'med_config': 'configs/med_config.json',
    'embed_dim': 256,
    'queue_size': 57600,                  # only sizes the (unused) ITC queues of the model
    'frm_sampling_strategy': 'uniform',   # frames evenly spread over the clip
    'video_fmt': '.mp4',
}


@torch.no_grad()
def video_features(model, data_loader, device, config):
    """(frame tokens concatenated per video, on the host; normalised mean ITC feature per video)."""
    metric_logger = utils.MetricLogger(delimiter='  ')
    video_feats, video_embeds = [], []
    for video, _ in metric_logger.log_every(data_loader, 50, 'Video features:'):
        batch, num_frames = video.shape[:2]
        frames = video.flatten(0, 1).to(device, non_blocking=True)  # (B * N, C, H, W)
        with precision.autocast(config, device):
            frame_feat = model.visual_encoder(frames)
            frame_embed = model.vision_proj(frame_feat[:, 0, :])
        # ITC: the average of the frames' projected features, normalised afterwards
        video_embed = frame_embed.float().view(batch, num_frames, -1).mean(dim=1)
        video_embeds.append(F.normalize(video_embed, dim=-1))
        # ITM: every frame's tokens, one after the other
        video_feats.append(frame_feat.reshape(batch, -1, frame_feat.shape[-1]).cpu())
    return torch.cat(video_feats, dim=0), torch.cat(video_embeds, dim=0)


@torch.no_grad()
def evaluation(model, data_loader, device, config):
    """Score matrices (videos x texts, texts x videos) as numpy arrays, as the original."""
    model.eval()
    print('Computing features for evaluation...')
    start_time = time.time()

    text_ids, text_atts, text_embeds = ranking.text_features(model, data_loader.dataset.text, device, config)
    video_feats, video_embeds = video_features(model, data_loader, device, config)
    v2t_idx, v2t_score, t2v_idx, t2v_score = ranking.rank(model, video_embeds, video_feats, text_embeds,
                                                          text_ids, text_atts, device, config)

    logs.print_elapsed(start_time, 'Evaluation time')
    # the dense matrices: vid_mdR needs every text's full rank
    return (ranking.dense(v2t_idx, v2t_score, len(text_embeds)).cpu().numpy(),
            ranking.dense(t2v_idx, t2v_score, len(video_embeds)).cpu().numpy())


def main(args, config, device):
    #### Dataset ####
    print('Creating retrieval dataset')
    test_dataset = create_dataset('retrieval_msrvtt', config)
    # every rank computes every video's features (re-ranking is what is split), as the original
    test_loader = DataLoader(test_dataset, batch_size=config['batch_size'], num_workers=config['num_workers'],
                             pin_memory=torch.cuda.is_available(), drop_last=False, shuffle=False)

    #### Model ####
    print('Creating model')
    model = blip_retrieval(pretrained=config['pretrained'], image_size=config['image_size'], vit=config['vit'],
                           med_config=config['med_config'], embed_dim=config['embed_dim'],
                           queue_size=config['queue_size'])
    training.require_trained_weights(model, config)
    model = model.to(device)

    score_v2t, score_t2v = evaluation(model, test_loader, device, config)

    if utils.is_main_process():
        test_result = itm_eval(score_v2t, score_t2v, test_dataset.txt2video, test_dataset.video2txt)
        print('test:', test_result)
        logs.log_json(args.output_dir, test_result, filename='test_result.txt')


def run(argv=None):
    args, config = cli.parse_args_and_config(
        'BLIP zero-shot text-video retrieval (MSRVTT)', './configs/retrieval_msrvtt.yaml',
        'output/Retrieval_msrvtt', defaults=TASK_DEFAULTS, required=REQUIRED_KEYS, known=(), argv=argv,
        doc=__doc__)
    preflight.check_paths(config, args.config, dirs=['video_root'], files=['pretrained'])
    training.launch(main, args, config)


if __name__ == '__main__':
    cli.main(run)
