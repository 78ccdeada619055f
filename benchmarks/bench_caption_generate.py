"""Caption generation: image keys/values projected once per image (ours) vs for every beam at
every step (the original).

The original decoder (transformers 4.15 BERT) repeats the image tokens for every beam and caches
only self-attention keys/values: at every generation step each cross-attention layer projects
all image tokens of every beam again. Ours (models/generation.py) projects each image's keys and
values once (`compute_cross_kv`) and shares them with all of its beams, without copies. The
baseline here is our own decoding loop with that sharing switched off (each step cross-attends
to the image tokens repeated per beam), so everything else, beam search included, is the same
code and the captions must be identical.

Timed: BLIP_Decoder.generate (ViT-B, BERT-base decoder, random weights) for a batch of images,
beam search (num_beams=3, max_length=20, min_length=5) and greedy, both end to end and
decoding only (the ViT replaced by its precomputed output, which both variants share).

    .venv/bin/python benchmarks/bench_caption_generate.py [--size base|small]
"""
import contextlib

import torch
from torch import nn

from _common import parse_args, print_header, print_markdown, report, setup, time_alternating
from models import generation
from models.blip import blip_decoder

SIZES = {
    'base': dict(images=4, image_size=224),
    'small': dict(images=2, image_size=96),
}
REPEATS = {'base': 5, 'small': 2}
GENERATION = dict(max_length=20, min_length=5)


class ReprojectingStepper(generation._Stepper):
    """The original's decoding step: the image tokens repeated for every row (beam) and
    projected to keys/values again at every step."""

    def __init__(self, decoder, image_embeds, image_atts, capacity, use_cache):
        super().__init__(decoder, image_embeds, image_atts, capacity, use_cache)
        self.cross_kv = None
        self.image_embeds = image_embeds

    def next_logits(self, input_ids):
        rows = input_ids.shape[0] // self.image_embeds.shape[0]
        new_ids = input_ids if self.cache is None else input_ids[:, self.cache.get_seq_length():]
        hidden = self.decoder.bert(new_ids, encoder_hidden_states=self.image_embeds.repeat_interleave(rows, 0),
                                   encoder_attention_mask=self.image_atts.repeat_interleave(rows, 0),
                                   kv_cache=self.cache, is_decoder=True, mode='multimodal').last_hidden_state
        return self.decoder.cls(hidden[:, -1:])[:, -1].float()


@contextlib.contextmanager
def reproject_every_step():
    """The original's behaviour, for the duration of the block."""
    ours = generation._Stepper
    generation._Stepper = ReprojectingStepper
    try:
        yield
    finally:
        generation._Stepper = ours


class PrecomputedImage(nn.Module):
    """Stands in for the ViT: returns fixed image tokens (decoding-only timings)."""

    def __init__(self, image_embeds):
        super().__init__()
        self.image_embeds = image_embeds

    def forward(self, image):
        return self.image_embeds


def main():
    args = parse_args(__doc__.splitlines()[0])
    setup(args)
    size = SIZES[args.size]
    repeats = args.repeats or REPEATS[args.size]
    print_header('Caption generation (cross-attention key/value cache)', args,
                 {**size, **GENERATION, 'vit': 'base', 'text': 'BERT-base decoder (configs/med_config.json)',
                  'weights': 'random', 'dtype': 'float32'})

    model = blip_decoder(image_size=size['image_size'], vit='base').eval()
    images = torch.randn(size['images'], 3, size['image_size'], size['image_size'])
    with torch.no_grad():
        image_embeds = model.visual_encoder(images)
    vit = model.visual_encoder

    def ours(**kw):
        return model.generate(images, **kw, **GENERATION)

    def original(**kw):
        with reproject_every_step():
            return model.generate(images, **kw, **GENERATION)

    rows = []
    for name, kw in [('beam search (num_beams=3)', dict(num_beams=3)), ('greedy', dict(num_beams=1))]:
        for scope in ('end to end (ViT + decoding)', 'decoding only'):
            model.visual_encoder = vit if scope.startswith('end') else PrecomputedImage(image_embeds)
            captions_ours, captions_base = ours(**kw), original(**kw)
            if captions_ours != captions_base:
                raise AssertionError(f'{name}: captions differ\n ours: {captions_ours}\n base: {captions_base}')
            print(f'{name}, {scope}: captions identical, e.g. {captions_ours[0]!r}')
            times = time_alternating({'re-project each step': lambda: original(**kw),
                                      'cached K/V': lambda: ours(**kw)}, repeats, args.warmup)
            rows.append(report(f"{name}, {scope}, {size['images']} images {size['image_size']}px",
                               times, 're-project each step', 'cached K/V'))
    model.visual_encoder = vit
    print_markdown(rows, args)


if __name__ == '__main__':
    main()
