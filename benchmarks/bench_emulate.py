"""The cost of emulate_world_size: one optimizer step of BLIP retrieval fine-tuning (ViT-B/16,
BERT-base MED, ITM negatives from every rank as COCO's config) played three ways, each through
engine.loop.train_one_epoch on random images and COCO-like captions:

  one micro-batch   one step of `--batch` samples (what one of N GPUs computes);
  accum_steps=N     N micro-batches of `--batch`, one optimizer step (the baseline);
  emulate N         emulate_world_size=N: N emulated ranks of `--batch` each, one step.

Times are medians of alternating runs (after a warm-up step of each, which also allocates
AdamW's state). Peak memory is the most the allocator held above its level before the step:
torch.cuda's peak on a GPU, the profiler's on the CPU (a separate, untimed step). Also printed:
the emulated global batch's cached encoder outputs (image tokens and text features), the
memory emulation adds by design.

    .venv/bin/python benchmarks/bench_emulate.py                       # CPU: small images
    python benchmarks/bench_emulate.py --device cuda --image_size 384 --batch 32 --amp bf16
"""
import contextlib
import io

import torch

from _common import REPO, code_version, fmt_seconds, machine_line, make_captions, median, peak_memory, time_alternating
from engine import emulate, loop
from engine.rng import RankStreams
from models.blip_retrieval import blip_retrieval


class RandomPairs(torch.utils.data.Dataset):
    """(image, caption, image id) of random pixels, two captions per image."""

    def __init__(self, count, image_size):
        self.count, self.image_size = count, image_size
        self.captions = make_captions(count)

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        return torch.randn(3, self.image_size, self.image_size, generator=generator), self.captions[index], index // 2


def parse_args():
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--world', type=int, default=8, help='N: emulated ranks, accumulated micro-batches')
    parser.add_argument('--batch', type=int, default=2, help='samples per rank / micro-batch')
    parser.add_argument('--image_size', type=int, default=96)
    parser.add_argument('--amp', default='none', choices=('none', 'bf16', 'fp16'))
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--vit_grad_ckpt', action='store_true')
    return parser.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    n, batch = args.world, args.batch
    model = blip_retrieval(med_config=str(REPO / 'configs' / 'med_config.json'), image_size=args.image_size,
                           vit='base', vit_grad_ckpt=args.vit_grad_ckpt,
                           queue_size=n * batch * 4, negative_all_rank=True).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')

    def inputs(batch_, epoch, i, num_iters):
        image, caption, idx = batch_
        return {'image': image.to(device), 'caption': caption, 'alpha': 0.4, 'idx': idx.to(device)}

    loss_fn = emulate.ForwardLosses(inputs, ('loss_ita', 'loss_itm'))

    def one_step(samples, accum_steps=1, world=1):
        loader = torch.utils.data.DataLoader(RandomPairs(samples, args.image_size), batch_size=batch, shuffle=True,
                                             drop_last=True)
        config = {'accum_steps': accum_steps, 'amp': args.amp, 'clip_grad_norm': None, 'max_epoch': 1}
        streams = RankStreams(0, range(world)) if world > 1 else None

        def run():
            model.ptr_queue.zero_()  # the variants enqueue batches of different sizes
            with contextlib.redirect_stdout(io.StringIO()):
                loop.train_one_epoch(model, loader, optimizer, 0, device, config, loss_fn, scaler=scaler,
                                     streams=streams, print_freq=10 ** 6)
            if device.type == 'cuda':
                torch.cuda.synchronize()
        return run

    variants = {'one micro-batch': one_step(batch), f'accum_steps={n}': one_step(n * batch, accum_steps=n),
                f'emulate {n}': one_step(n * batch, world=n)}

    tokens = (args.image_size // 16) ** 2 + 1
    cached = n * batch * (tokens * 768 + 256 * 3) * 4  # image tokens (fp32) and three ITC features per sample
    print(f'# emulate_world_size: one optimizer step, ViT-B/16 + BERT-base retrieval ({code_version()})')
    print(f'machine: {machine_line(args)}; device {device}'
          + (f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''))
    print(f'N={n}, batch {batch} per rank, image {args.image_size} px ({tokens} tokens), amp {args.amp}, '
          f'vit_grad_ckpt {args.vit_grad_ckpt}; cached features of the global batch: {cached / 2**20:.1f} MiB')

    times = time_alternating(variants, args.repeats, warmup=1)
    peaks = {name: measure_peak(fn, device) for name, fn in variants.items()}
    base_t = median(times[f'accum_steps={n}'])
    one_peak = peaks['one micro-batch']
    print('\n| variant | time per optimizer step | vs accum_steps | peak memory above the model | '
          'vs one micro-batch + cached features |')
    print('|---|---|---|---|---|')
    for name in variants:
        t = median(times[name])
        print(f'| {name} | {fmt_seconds(t)} | {t / base_t:.2f}x | {peaks[name] / 2**20:.0f} MiB | '
              f'{peaks[name] / (one_peak + cached):.2f}x |')
    emulated_t, emulated_peak = median(times[f'emulate {n}']), peaks[f'emulate {n}']
    print(f'\ntargets: time <= 1.4x accum_steps: {emulated_t / base_t:.2f}x '
          f'({"met" if emulated_t <= 1.4 * base_t else "NOT met"}); peak <= 1.5x (one micro-batch + cached): '
          f'{emulated_peak / (one_peak + cached):.2f}x ({"met" if emulated_peak <= 1.5 * (one_peak + cached) else "NOT met"})')


def measure_peak(fn, device):
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated() - before
    return peak_memory(fn)


if __name__ == '__main__':
    main()
