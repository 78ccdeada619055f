"""predict.py against transformers' BLIP classes doing the same work, from the same weights.

A random ViT-B/16 + BERT-base retrieval checkpoint (with its momentum encoders and queues, as
the official ones) is converted with tools/convert_hf.py; then, each a fresh process:

  match 1 x 40   one image against 40 texts: ITM p(match) and ITC cosine of each pair
  match 8 x 5    eight images, five texts each
  classify       eight images, 20 labels: ITM of every label (ours: `--k 20`, ITC then ITM of all
                 20; transformers: the ITM of each (image, label) pair, as its API offers)
  features       ITC image embeddings of eight images: peak RSS (the model's loading included)

Ours is `predict.py` itself (as users run it). transformers is the documented use of
BlipForImageTextRetrieval and BlipProcessor: a batch of (image, text) pairs, `use_itm_head=True`
then `False` (the cosine of each pair is the diagonal). Both run in fresh processes on
`--threads` threads; time per pair is the difference between the workload and a one-pair run of
the same kind (process start and model loading cancel out), median of the repeats.

    .venv/bin/python benchmarks/bench_predict.py [--image_size 224] [--repeats 3] [--threads 1]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, code_version, machine_line, make_captions, median

WORKER = 'hf-worker'


def run_timed(command, threads):
    """(seconds, peak RSS in MiB) of `command` in a fresh process."""
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads), 'TOKENIZERS_PARALLELISM': 'false'}
    wrapper = [sys.executable, __file__, 'rss', '--', *map(str, command)]
    start = time.perf_counter()
    result = subprocess.run(wrapper, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f'{" ".join(map(str, command))} failed:\n{result.stderr[-3000:]}')
    return seconds, float(result.stdout.strip().splitlines()[-1])


def hf_worker(argv):
    """The transformers side: `bench_predict.py hf-worker TASK HF_DIR PAIRS.jsonl [LABELS]`."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    task, hf_dir, listing = argv[:3]
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
    model = BlipForImageTextRetrieval.from_pretrained(hf_dir).eval()
    processor = BlipProcessor.from_pretrained(hf_dir)
    records = [json.loads(line) for line in Path(listing).read_text().splitlines()]
    with torch.no_grad():
        if task == 'features':
            images = [Image.open(r['image']).convert('RGB') for r in records]
            pixels = processor(images=images, return_tensors='pt').pixel_values
            embeds = F.normalize(model.vision_proj(model.vision_model(pixels)[0][:, 0]), dim=-1)
            print(embeds.shape)
            return
        if task == 'classify':
            labels = argv[3].split(',')
            records = [{'image': r['image'], 'text': label} for r in records for label in labels]
        for start in range(0, len(records), 8):
            batch = records[start:start + 8]
            inputs = processor(images=[Image.open(r['image']).convert('RGB') for r in batch],
                               text=[r['text'] for r in batch], padding='max_length', max_length=35,
                               truncation=True, return_tensors='pt')
            itm = model(**inputs, use_itm_head=True).itm_score.softmax(dim=-1)[:, 1]
            if task == 'match':
                itc = model(**inputs, use_itm_head=False).itm_score.diagonal()
                print(json.dumps({'itm': itm.tolist(), 'itc': itc.tolist()}))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == 'rss':  # run the command after '--', print its peak RSS
        subprocess.run(sys.argv[3:], check=True, stdout=subprocess.DEVNULL)
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
        return
    if len(sys.argv) > 1 and sys.argv[1] == WORKER:
        hf_worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--image_size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args()

    import torch
    from PIL import Image

    from models.blip_retrieval import BLIP_Retrieval

    work = Path(tempfile.mkdtemp(prefix='bench_predict_'))
    torch.manual_seed(0)
    model = BLIP_Retrieval(med_config=str(REPO / 'configs' / 'med_config.json'), image_size=args.image_size)
    checkpoint = work / 'retrieval.pth'
    torch.save({'model': model.state_dict()}, checkpoint)
    del model
    config = work / 'config.yaml'
    config.write_text(f"vit: 'base'\nimage_size: {args.image_size}\nmed_config: '{REPO / 'configs' / 'med_config.json'}'\n"
                      f"embed_dim: 256\n")
    hf_dir = work / 'hf'
    subprocess.run([sys.executable, str(REPO / 'tools' / 'convert_hf.py'), 'to-hf', str(checkpoint), str(hf_dir),
                    '--task', 'retrieval', '--config', str(config)], check=True, capture_output=True)
    images = []
    for i in range(8):
        path = work / f'photo{i}.jpg'
        Image.new('RGB', (400 + 16 * i, 300), (30 * i, 200 - 20 * i, 90)).save(path)
        images.append(str(path))
    texts = make_captions(40, seed=1)
    labels = ','.join(f'label {i}' for i in range(20))

    def listing(name, records):
        path = work / f'{name}.jsonl'
        path.write_text(''.join(json.dumps(r) + '\n' for r in records))
        return path

    workloads = {  # name: (records, units of work: pairs for match, images for classify)
        'match 1 x 40': ([{'image': images[0], 'text': t} for t in texts], 40),
        'match 8 x 5': ([{'image': image, 'text': t} for image in images for t in texts[:5]], 40),
        'classify 8 x 20 labels': ([{'image': image} for image in images], 8),
    }
    ours_base = [sys.executable, 'predict.py']
    common = ['--model', checkpoint, '--config', config, '--device', 'cpu', '--quiet', '--batch_size', 8]

    def commands(name, records):
        path = listing(name.replace(' ', '_'), records)
        if name.startswith('match'):
            return ([*ours_base, 'match', *common, path], [sys.executable, __file__, WORKER, 'match', hf_dir, path])
        return ([*ours_base, 'classify', *common, '--labels', labels, '--k', 20, path],
                [sys.executable, __file__, WORKER, 'classify', hf_dir, path, labels])

    print(f'# predict.py vs transformers {code_version()}')
    print(f'machine: {machine_line(argparse.Namespace(threads=args.threads))}')
    print(f'ViT-B/16 at {args.image_size} px + BERT-base, random weights; {args.repeats} repeats, alternating\n')
    print('| workload | ours per pair | transformers per pair | ratio (transformers / ours) |')
    print('|---|---|---|---|')
    for name, (records, pairs) in workloads.items():
        full = commands(name, records)
        one = commands(name + ' one', records[:1])
        times = {'ours': [], 'hf': []}
        for _ in range(args.repeats):
            for side, index in (('ours', 0), ('hf', 1)):
                t_full, _ = run_timed(full[index], args.threads)
                t_one, _ = run_timed(one[index], args.threads)
                times[side].append((t_full - t_one) / (pairs - 1))
        ours, hf = median(times['ours']), median(times['hf'])
        unit = 'pair' if name.startswith('match') else 'image'
        print(f'| {name} | {ours:.3f} s / {unit} | {hf:.3f} s / {unit} | {hf / ours:.2f}x |', flush=True)

    feature_list = listing('features', [{'image': image} for image in images])
    rss = {'ours': [], 'hf': []}
    for _ in range(args.repeats):
        rss['ours'].append(run_timed([*ours_base, 'features', *common, '--out', work / 'f.safetensors', *images],
                                     args.threads)[1])
        rss['hf'].append(run_timed([sys.executable, __file__, WORKER, 'features', hf_dir, feature_list],
                                   args.threads)[1])
    ours, hf = median(rss['ours']), median(rss['hf'])
    print(f'\nfeatures of 8 images, peak RSS: ours {ours:.0f} MiB, transformers {hf:.0f} MiB, ours / transformers '
          f'{ours / hf:.2f}x (checkpoint {checkpoint.stat().st_size / 2**20:.0f} MiB with momentum encoders)')


if __name__ == '__main__':
    main()
