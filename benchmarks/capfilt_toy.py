"""CapFilt's claim in miniature (BLIP paper, table 1): pre-training on web data bootstrapped by
CapFilt gives a better model than pre-training on the noisy web data itself.

On the toy shapes data (configs/shapes/), one CPU, each step a task script in its own process:
1. the toy captioner and filter (the recipes of the tests: tests/test_capfilt_toy.py, conftest.py);
2. a noisy web list: the toy pre-training list (pretrain_synth.json) with --corrupted of its
   captions swapped for another image's (data.synthetic.corrupt_captions);
3. capfilt.py on it: web_filtered.json and synthetic_filtered.json;
4. for each pre-training set, noisy (the list as it is) and bootstrapped (the two files), and
   for reference the list before corruption (clean) and none (retrieval from scratch):
   pretrain.py (configs/shapes/pretrain.yaml, no LAION shards), then retrieval fine-tuning from
   its checkpoint (configs/shapes/retrieval_coco.yaml), same seed and epochs for both;
5. prints the test recalls of both fine-tuned models and the ratio bootstrapped / noisy.

Not a test: the answer is whatever the run measures (recorded in RESULTS.md either way).
Each step's output is kept in --work_dir and a rerun skips the steps already done.

    .venv/bin/python benchmarks/capfilt_toy.py [--work_dir output/capfilt_toy] [--corrupted 0.3]
"""
import argparse
import json
import os
import subprocess
import sys
import time

from _common import REPO, code_version, cpu_model, load_average
from data.synthetic import corrupt_captions
from engine.config import load_config

# The toy captioner of tests/test_capfilt_toy.py (keep the two the same), and the toy filter: the
# toy suite's retrieval model of configs/expected.yaml, which tests/conftest.py trains too.
CAPTIONER = ('train_caption.py', 'configs/shapes/caption_coco.yaml',
             ['vit.patch_size=64', 'init_lr=3e-4', 'min_lr=3e-4', 'max_epoch=24'])
_RETRIEVAL_TOY = load_config(REPO / 'configs' / 'expected.yaml')['toy']['models']['retrieval']['train']
FILTER = (_RETRIEVAL_TOY['script'], _RETRIEVAL_TOY['config'], _RETRIEVAL_TOY['overrides'])
PRETRAIN_LIST = REPO / 'datasets/shapes/annotation/pretrain_synth.json'  # written by the first toy run


def step(name, work, script, *args, done):
    """Run script with args unless `done` (a path under work) exists; its output goes to work/name.log."""
    if (work / done).exists():
        print(f'{name}: done in an earlier run, skipped')
        return
    start = time.time()
    print(f'{name}: python {script} ...', flush=True)
    env = {**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '2')}
    with open(work / f'{name}.log', 'w') as log:
        result = subprocess.run([sys.executable, str(REPO / script), *map(str, args), '--device', 'cpu'],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode:
        raise SystemExit(f'{name} failed (exit {result.returncode}); see {work / f"{name}.log"}')
    print(f'{name}: {time.time() - start:.0f} s', flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--work_dir', default='output/capfilt_toy')
    parser.add_argument('--corrupted', type=float, default=0.3, help='fraction of web captions swapped')
    parser.add_argument('--pretrain_epochs', type=int, default=12, help="pretrain.yaml's max_epoch")
    parser.add_argument('--finetune_epochs', type=int, default=12, help='retrieval fine-tuning epochs')
    parser.add_argument('--seed', type=int, default=42,
                        help="the pre-training and fine-tuning runs' --seed (the scripts' default 42); "
                             'another seed writes folders of its own')
    parser.add_argument('--itm_threshold', type=float, default=0.3,
                        help='the toy filter is under-confident: see tests/test_capfilt_toy.py')
    args = parser.parse_args()
    work = (REPO / args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f'# capfilt_toy  machine: {cpu_model()}, {os.cpu_count()} cores; code: {code_version()}; '
          f'load average {load_average()}')

    for name, (script, config, overrides) in (('captioner', CAPTIONER), ('filter', FILTER)):
        step(name, work, script, '--config', config, '--output_dir', work / name, *overrides,
             done=f'{name}/checkpoint_last.pth')
    entries = json.loads(PRETRAIN_LIST.read_text())
    noisy, corrupted = corrupt_captions(entries, args.corrupted, seed=0)
    (work / 'noisy.json').write_text(json.dumps(noisy))
    step('capfilt', work, 'capfilt.py', '--config', 'configs/shapes/capfilt.yaml', '--output_dir', work / 'capfilt',
         f"train_file=[{work / 'noisy.json'}]", f"captioner_checkpoint={work / 'captioner' / 'checkpoint_best.pth'}",
         # the filter's last epoch: its ITM head still improves after the val recall has peaked
         f"filter_checkpoint={work / 'filter' / 'checkpoint_last.pth'}", f'itm_threshold={args.itm_threshold}',
         done='capfilt/summary.json')
    summary = json.loads((work / 'capfilt' / 'summary.json').read_text())
    lines = [json.loads(line) for line in (work / 'capfilt' / 'scores.jsonl').read_text().splitlines()]
    web = [line for line in lines if line['source'] == 'web']
    removed = sum(not line['kept'] for line, bad in zip(web, corrupted) if bad) / max(1, sum(corrupted))
    kept = sum(line['kept'] for line, bad in zip(web, corrupted) if not bad) / max(1, len(web) - sum(corrupted))
    print(f"filter: {removed:.3f} of the corrupted web captions removed, {kept:.3f} of the correct ones kept; "
          f"synthetic kept {summary['synthetic']['kept']} of {summary['synthetic']['texts']}")

    # the pre-training sets: none (retrieval from scratch), the list before corruption (an upper
    # bound), the noisy list, and CapFilt's two files
    sets = {'none': [], 'clean': [PRETRAIN_LIST],
            'noisy': [work / 'noisy.json'],
            'bootstrapped': [work / 'capfilt' / 'web_filtered.json', work / 'capfilt' / 'synthetic_filtered.json']}
    results = {}
    last = f'checkpoint_{args.pretrain_epochs - 1:02d}.pth'
    tag = '' if args.seed == 42 else f'_seed{args.seed}'
    seed = ['--seed', args.seed]
    for name, files in sets.items():
        pretrain_dir, retrieval_dir, pretrained = f'pretrain_{name}{tag}', f'retrieval_{name}{tag}', []
        if files:
            step(pretrain_dir, work, 'pretrain.py', '--config', 'configs/shapes/pretrain.yaml',
                 '--output_dir', work / pretrain_dir, f"train_file=[{','.join(map(str, files))}]",
                 "laion_path=''", f'max_epoch={args.pretrain_epochs}', *seed, done=f'{pretrain_dir}/{last}')
            pretrained = [f'pretrained={work / pretrain_dir / last}']
        step(retrieval_dir, work, 'train_retrieval.py', '--config', 'configs/shapes/retrieval_coco.yaml',
             '--output_dir', work / retrieval_dir, *pretrained, f'max_epoch={args.finetune_epochs}', *seed,
             done=f'{retrieval_dir}/checkpoint_last.pth')
        lines = [json.loads(line) for line in (work / retrieval_dir / 'log.txt').read_text().splitlines()]
        best = [line for line in lines if line['epoch'] == lines[-1]['best_epoch']][-1]  # chosen by val r_mean
        results[name] = (sum(len(json.loads(f.read_text())) for f in files), best)

    print()
    print('| pre-training set | pairs | test r_mean | TR@1 | IR@1 |')
    print('|---|---|---|---|---|')
    for name, (pairs, best) in results.items():
        print(f"| {name} | {pairs} | {best['test_r_mean']:.1f} | {best['test_txt_r1']:.1f} | {best['test_img_r1']:.1f} |")
    ratio = results['bootstrapped'][1]['test_r_mean'] / results['noisy'][1]['test_r_mean']
    print(f"\ntest r_mean bootstrapped / noisy: {ratio:.2f}x   (load average at end {load_average()})")


if __name__ == '__main__':
    main()
