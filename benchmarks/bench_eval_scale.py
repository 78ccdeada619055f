"""Retrieval evaluation as the gallery grows: the dense path (the original's images x texts
matrices) against the top-k path (ranking.evaluation_topk), time and peak memory.

A tiny random model (the parity fixture's sizes: 32-px images, a 2-layer ViT and BERT of width
32) keeps the encoders cheap, so what grows is the ranking itself. Galleries of 1k, 10k and
100k images with 5 texts each; k_test 16 (at least 10, so both paths give the same recalls). Each case runs in its own process so its peak RSS
(growth over the process before the evaluation) is its own. The dense path is skipped where
its matrices would not fit this machine's memory (two float32 matrices plus the similarities).
The baseline of the ratio is the dense path (the original algorithm, ours otherwise).

    .venv/bin/python benchmarks/bench_eval_scale.py [--sizes 1000 10000 100000] [--k_test 16]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from _common import REPO, code_version, load_average, machine_line

TEXTS_PER_IMAGE = 5


class PatternGallery(torch.utils.data.Dataset):
    """Images made on the fly from their index; 5 captions per image."""

    def __init__(self, num_images):
        self.num_images = num_images
        self.text = [f'{i % 7} red squares and {i % 11} blue circles on {i % 13} stripes'
                     for i in range(num_images * TEXTS_PER_IMAGE)]
        self.txt2img = {t: t // TEXTS_PER_IMAGE for t in range(len(self.text))}
        self.img2txt = {i: list(range(i * TEXTS_PER_IMAGE, (i + 1) * TEXTS_PER_IMAGE)) for i in range(num_images)}

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        return torch.full((3, 32, 32), (index % 101) / 101.0) + torch.linspace(0, index % 13, 32), index


def child(mode, num_images, k_test, threads):
    """One evaluation in this process; prints a JSON line with seconds and RSS growth."""
    sys.path[:0] = [str(REPO), str(REPO / 'tests')]
    torch.set_num_threads(threads)
    import contextlib
    import io

    import metrics
    import ranking
    from model_builders import build_model
    from models.blip_retrieval import BLIP_Retrieval

    model = build_model(BLIP_Retrieval, 'retrieval')
    dataset = PatternGallery(num_images)
    loader = torch.utils.data.DataLoader(dataset, batch_size=500)
    config = {'k_test': k_test, 'rerank_batch_size': 512}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        if mode == 'dense':
            i2t, t2i = ranking.evaluation(model, loader, torch.device('cpu'), config)
            metrics = metrics.itm_eval(i2t, t2i, dataset.txt2img, dataset.img2txt)
        else:
            i2t_idx, _, t2i_idx, _ = ranking.evaluation_topk(model, loader, torch.device('cpu'), config)
            metrics = metrics.itm_eval_topk(i2t_idx, t2i_idx, dataset.txt2img, dataset.img2txt)
    seconds = time.perf_counter() - start
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({'seconds': seconds, 'growth': growth, 'r_mean': metrics['r_mean']}))


def fits(num_images, k_test):
    """Whether the dense path's matrices fit in half of this machine's memory."""
    total = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    return 3 * num_images * num_images * TEXTS_PER_IMAGE * 4 < total / 2


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes', type=int, nargs='+', default=[1000, 10_000, 100_000])
    parser.add_argument('--k_test', type=int, default=16)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.k_test, args.threads)
        return

    print(f'# Retrieval evaluation vs gallery size ({time.strftime("%Y-%m-%d %H:%M")})')
    print(f'machine: {machine_line(args)}')
    print(f'code: {code_version()}')
    print(f'load average at start (1/5/15 min): {load_average()}')
    rows = []
    for num_images in args.sizes:
        results = {}
        for mode in ('dense', 'topk'):
            if mode == 'dense' and not fits(num_images, args.k_test):
                results[mode] = None
                continue
            out = subprocess.run([sys.executable, __file__, '--child', mode, str(num_images),
                                  '--k_test', str(args.k_test), '--threads', str(args.threads)],
                                 capture_output=True, text=True, check=True).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
            print(f'{num_images} images, {mode}: {results[mode]}', flush=True)
        dense, topk = results['dense'], results['topk']
        if dense is not None and abs(dense['r_mean'] - topk['r_mean']) > 1e-9:
            raise SystemExit(f'r_mean differs at {num_images} images: dense {dense} vs top-k {topk}')
        gb = lambda r: f"{r['growth'] / 2 ** 30:.2f} GB"
        rows.append(f"| {num_images:,} x {num_images * TEXTS_PER_IMAGE:,} | "
                    + (f"{dense['seconds']:.1f} s, {gb(dense)}" if dense else 'skipped (would not fit)')
                    + f" | {topk['seconds']:.1f} s, {gb(topk)} | "
                    + (f"{dense['seconds'] / topk['seconds']:.2f}x, {dense['growth'] / max(topk['growth'], 1):.1f}x"
                       if dense else '-') + ' |')
    print(f'\nk_test {args.k_test}; memory: peak RSS growth during the evaluation')
    print('| images x texts | dense (original matrices): time, peak memory | top-k: time, peak memory '
          '| ratio time, memory |')
    print('|---|---|---|---|')
    print('\n'.join(rows))
    print(f'load average at end (1/5/15 min): {load_average()}')


if __name__ == '__main__':
    main()
