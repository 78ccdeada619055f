"""Captioning every image of a data loader with beam search, as the evaluations of
train_caption.py and eval_nocaps.py do (their metrics: metrics.caption_eval)."""
import torch

import utils
from engine.precision import autocast


@torch.no_grad()
def generate_captions(model, data_loader, device, config, repetition_penalty=1.0, header='Caption generation:'):
    """Caption every image of the loader: [{'image_id': int, 'caption': str}] of this rank.

    Beam search over the batch in one call (the decoder reuses each image's cross-attention
    keys/values at every step); the prompt is already stripped by model.generate.
    """
    model.eval()
    metric_logger = utils.MetricLogger(delimiter='  ')
    result = []
    for image, image_id in metric_logger.log_every(data_loader, 10, header):
        image = image.to(device, non_blocking=True)
        with autocast(config, device):
            captions = model.generate(image, sample=False, num_beams=config['num_beams'],
                                      max_length=config['max_length'], min_length=config['min_length'],
                                      repetition_penalty=repetition_penalty)
        for caption, img_id in zip(captions, image_id):
            result.append({'image_id': int(img_id), 'caption': caption})
    return result
