"""GPU figures at the paper's shapes, random weights (ViT-B/16 at 384 px, BERT-base), bf16:

  eval   ranking.evaluation_topk at the COCO-5k shape (5,000 images x 25,000 texts,
         k_test 256): time per stage and peak GPU memory;
  ratio  the original's evaluation loops against ours on a subset (--ratio_images images, 5
         texts each, k_test 256), same model, same inputs, scores compared;
  train  retrieval training steps at batch 32 @ 384 with vit_grad_ckpt: samples/s, peak memory;
  caption  beam-search captioning (3 beams, max 20 tokens), captions/s, peak memory.

    python benchmarks/bench_gpu.py [--parts eval ratio train caption] [--smoke]

--smoke runs every part at toy sizes (also on the CPU), to check the script itself.
benchmarks/gpu.sh runs it within the device time a session has.
"""
import argparse
import contextlib
import io
import json
import time

import torch

import metrics
import ranking
from _common import code_version, make_captions
from models.blip import blip_decoder
from models.blip_retrieval import blip_retrieval


class RandomImages(torch.utils.data.Dataset):
    """(image, index) items of random pixels, made on the fly; `.text` etc. as the eval sets."""

    def __init__(self, num_images, image_size, texts_per_image=5):
        self.num_images, self.image_size = num_images, image_size
        self.text = make_captions(num_images * texts_per_image)
        self.txt2img = {t: t // texts_per_image for t in range(len(self.text))}
        self.img2txt = {i: list(range(i * texts_per_image, (i + 1) * texts_per_image)) for i in range(num_images)}

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        return torch.randn(3, self.image_size, self.image_size, generator=generator), index


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def peak_gb(device):
    return torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == 'cuda' else float('nan')


def reset_peak(device):
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def part_eval(device, sizes, results):
    model = blip_retrieval(image_size=sizes['image_size'], vit=sizes['vit'], queue_size=sizes['queue']).to(device)
    loader = torch.utils.data.DataLoader(RandomImages(sizes['eval_images'], sizes['image_size']), batch_size=128,
                                         num_workers=8 if device.type == 'cuda' else 0)
    config = {'k_test': sizes['k_test'], 'amp': sizes['amp'], 'rerank_batch_size': 1024}
    reset_peak(device)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as log:
        ranking.evaluation_topk(model, loader, device, config)
    sync(device)
    results['eval'] = {'images': sizes['eval_images'], 'texts': 5 * sizes['eval_images'], 'k_test': sizes['k_test'],
                       'seconds': time.perf_counter() - start, 'peak_gb': peak_gb(device),
                       'stages': [line for line in log.getvalue().splitlines() if 'Total time' in line]}


def part_ratio(device, sizes, results):
    from original_retrieval import original_evaluation
    model = blip_retrieval(image_size=sizes['image_size'], vit=sizes['vit'], queue_size=sizes['queue']).to(device)
    model.eval()
    dataset = RandomImages(sizes['ratio_images'], sizes['image_size'])
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    config = {'k_test': sizes['k_test'], 'amp': sizes['amp'], 'eval_mode': 'dense'}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=sizes['amp'] == 'bf16')
    times, outputs = {}, {}
    for name in ('original', 'ours'):
        reset_peak(device)
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), autocast:
            if name == 'original':
                outputs[name] = original_evaluation(model, images, dataset.text, sizes['k_test'], device)
            else:
                outputs[name] = ranking.evaluation(model, loader, device, config)
        sync(device)
        times[name] = (time.perf_counter() - start, peak_gb(device))
    recalls = {name: metrics.itm_eval(*outputs[name], dataset.txt2img, dataset.img2txt) for name in outputs}
    results['ratio'] = {'images': sizes['ratio_images'], 'k_test': sizes['k_test'],
                        'original_s': times['original'][0], 'ours_s': times['ours'][0],
                        'ratio': times['original'][0] / times['ours'][0],
                        'original_peak_gb': times['original'][1], 'ours_peak_gb': times['ours'][1],
                        'max_abs_score_diff': float(abs(outputs['original'][0] - outputs['ours'][0]).max()),
                        'r_mean': {name: m['r_mean'] for name, m in recalls.items()}}


def part_train(device, sizes, results):
    batch = sizes['train_batch']
    model = blip_retrieval(image_size=sizes['image_size'], vit=sizes['vit'], vit_grad_ckpt=True, vit_ckpt_layer=0,
                           queue_size=sizes['queue']).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    dataset = RandomImages(batch, sizes['image_size'])
    images = torch.stack([dataset[i][0] for i in range(batch)]).to(device)
    captions, idx = dataset.text[::5][:batch], torch.arange(batch, device=device)
    reset_peak(device)
    for step in range(sizes['train_steps'] + 2):
        if step == 2:  # two warm-up steps
            sync(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=sizes['amp'] == 'bf16'):
            loss_ita, loss_itm = model(images, captions, alpha=0.4, idx=idx)
        optimizer.zero_grad(set_to_none=True)
        (loss_ita + loss_itm).backward()
        optimizer.step()
    sync(device)
    seconds = time.perf_counter() - start
    results['train'] = {'batch': batch, 'steps': sizes['train_steps'],
                        'samples_per_s': batch * sizes['train_steps'] / seconds, 'peak_gb': peak_gb(device),
                        'loss': float((loss_ita + loss_itm).detach())}


def part_caption(device, sizes, results):
    model = blip_decoder(image_size=sizes['image_size'], vit=sizes['vit']).to(device).eval()
    dataset = RandomImages(sizes['caption_images'], sizes['image_size'])
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).to(device)
    reset_peak(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=sizes['amp'] == 'bf16'):
        model.generate(images[:2], num_beams=3, max_length=20, min_length=5)  # warm-up
        sync(device)
        start = time.perf_counter()
        captions = model.generate(images, num_beams=3, max_length=20, min_length=5)
        sync(device)
    seconds = time.perf_counter() - start
    results['caption'] = {'images': len(images), 'captions_per_s': len(captions) / seconds,
                          'peak_gb': peak_gb(device)}


PARTS = {'eval': part_eval, 'ratio': part_ratio, 'train': part_train, 'caption': part_caption}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--parts', nargs='+', choices=list(PARTS), default=list(PARTS))
    parser.add_argument('--smoke', action='store_true', help='toy sizes, to check the script (CPU is fine)')
    parser.add_argument('--out', help='also write the results as JSON here')
    args = parser.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    sizes = dict(vit='base', image_size=384, eval_images=5000, ratio_images=500, k_test=256, train_batch=32,
                 train_steps=10, caption_images=256, queue=57600, amp='bf16')
    if args.smoke:
        sizes.update(image_size=32, eval_images=12, ratio_images=6, k_test=4, train_batch=4, train_steps=1,
                     caption_images=2, queue=32)
    name = torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'
    print(f'# GPU benchmark on {name}, torch {torch.__version__}, code {code_version()}, sizes {sizes}', flush=True)
    results = {}
    for part in args.parts:
        start = time.perf_counter()
        try:
            PARTS[part](device, sizes, results)
        except torch.cuda.OutOfMemoryError as error:
            results[part] = {'error': f'out of memory: {error}'}
        print(f'{part} ({time.perf_counter() - start:.0f} s): {json.dumps(results[part])}', flush=True)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump({'device': name, 'sizes': sizes, 'results': results}, f, indent=1)


if __name__ == '__main__':
    main()
