"""ITM re-ranking in retrieval evaluation: the original's two loops vs ranking.py's.

Baseline (the original ranking.evaluation, written here with our modules): for each
image, its embeddings are repeated k_test times and the text encoder runs over its top-k texts
(padded to 35 tokens); then for each text, its top-k images' embeddings are gathered and the
encoder runs again. Every forward projects the image tokens to cross-attention keys/values once
per text, and a pair found in both directions is scored twice.

Ours (ranking.rank / ranking.evaluation): each distinct (image, text) pair is scored
once, several images per forward; the image's keys/values are projected once (compute_cross_kv) and shared by
its texts, and padding columns no text in the batch uses are cut.

Both use the same model (ViT-B at a reduced image size, BERT-base MED, random weights), the same
features, and the same attention kernel, so the ratio is the algorithm's. Timed: the
re-ranking stage alone (ranking.rank); with --whole also the whole evaluation()
(features included, identical in both). Both entry points are checked against the baseline.

    .venv/bin/python benchmarks/bench_retrieval_rerank.py [--size base|small] [--whole]
"""
import contextlib
import io

import torch

import ranking
from _common import make_captions, parse_args, print_header, print_markdown, report, setup, time_alternating
from models.blip_retrieval import blip_retrieval
from original_retrieval import original_evaluation, original_features, original_rerank

SIZES = {
    'base': dict(images=16, texts=80, k_test=4, image_size=224),
    'small': dict(images=4, texts=20, k_test=2, image_size=96),
}
REPEATS = {'base': 3, 'small': 2}


# ----------------------------------------------------------------------------- ours

class _EvalDataset(torch.utils.data.Dataset):
    """What evaluation() reads: (image, index) items and a `.text` list."""

    def __init__(self, images, texts):
        self.images, self.text = images, texts

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], index


def quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):  # MetricLogger progress lines
        return fn(*args, **kwargs)


def count_pairs(sims, k_test):
    num_images, num_texts = sims.shape
    i2t = sims.topk(k_test, dim=1).indices
    t2i = sims.t().topk(k_test, dim=1).indices
    keys = torch.cat([(torch.arange(num_images)[:, None] * num_texts + i2t).flatten(),
                      (t2i * num_texts + torch.arange(num_texts)[:, None]).flatten()])
    return len(keys), len(torch.unique(keys))


def main():
    args = parse_args(__doc__.splitlines()[0], warmup=0, extra=lambda p: p.add_argument(
        '--whole', action='store_true', help='also time the whole evaluation() (features + re-ranking)'))
    setup(args)
    size = SIZES[args.size]
    repeats = args.repeats or REPEATS[args.size]
    device = torch.device('cpu')
    print_header('ITM re-ranking (retrieval evaluation)', args,
                 {**size, 'vit': 'base', 'text': 'BERT-base (configs/med_config.json)', 'weights': 'random',
                  'dtype': 'float32'})

    model = blip_retrieval(image_size=size['image_size'], vit='base', queue_size=64).to(device).eval()
    images = torch.randn(size['images'], 3, size['image_size'], size['image_size'])
    texts = make_captions(size['texts'])
    k_test = size['k_test']
    config = {'k_test': k_test, 'amp': 'none'}
    loader = torch.utils.data.DataLoader(_EvalDataset(images, texts), batch_size=size['images'])

    # shared features for the re-ranking stage alone
    text_ids, text_atts, text_embeds, image_feats, image_embeds = original_features(model, images, texts, device)
    sims = image_embeds @ text_embeds.t()
    scored, distinct = count_pairs(sims, k_test)
    print(f'pairs scored: original {scored} (with repeats), ours {distinct} distinct')

    # same results first
    base_i2t, base_t2i = original_rerank(model, sims, image_feats, text_ids, text_atts, k_test, device)
    rows = []

    def ours_rerank():
        i2t_idx, i2t_score, t2i_idx, t2i_score = quiet(ranking.rank, model, image_embeds, image_feats, text_embeds,
                                                       text_ids, text_atts, device, config)
        return ranking.dense(i2t_idx, i2t_score, len(texts)), ranking.dense(t2i_idx, t2i_score, len(images))

    ours_i2t, ours_t2i = ours_rerank()
    torch.testing.assert_close(ours_i2t, base_i2t, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_t2i, base_t2i, rtol=1e-4, atol=1e-4)
    print('re-ranking: score matrices match (atol 1e-4)')
    full_base = original_evaluation(model, images, texts, k_test, device)
    full_ours = quiet(ranking.evaluation, model, loader, device, config)
    for ours_m, base_m in zip(full_ours, full_base):
        torch.testing.assert_close(torch.from_numpy(ours_m), torch.from_numpy(base_m), rtol=1e-4, atol=1e-4)
    print('evaluation(): score matrices match (atol 1e-4)')

    times = time_alternating({
        'original loops': lambda: original_rerank(model, sims, image_feats, text_ids, text_atts, k_test, device),
        'ranking.rank()': ours_rerank,
    }, repeats, args.warmup)
    rows.append(report(f"re-ranking stage, {size['images']} images x {size['texts']} texts, "
                       f"k_test={k_test}, image {size['image_size']}px", times, 'original loops', 'ranking.rank()'))
    if not args.whole and rows:
        print_markdown(rows, args)
        return
    times = time_alternating({
        'original evaluation': lambda: original_evaluation(model, images, texts, k_test, device),
        'evaluation()': lambda: quiet(ranking.evaluation, model, loader, device, config),
    }, repeats, args.warmup)
    rows.append(report("whole evaluation() (features + re-ranking), same sizes", times,
                       'original evaluation', 'evaluation()'))
    print_markdown(rows, args)


if __name__ == '__main__':
    main()
