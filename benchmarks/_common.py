"""Shared pieces of the benchmark scripts: setup, timing, machine description, result rows.

Every benchmark measures a baseline (the original BLIP's algorithm, written in the script with
this project's modules) and ours in the same process, checks that both give the same outputs,
then times them alternately (baseline, ours, baseline, ours, ...) so that a change of machine
load hits both alike. Reported: the median of the repeats and the ratio baseline / ours.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


_MEASURED = 'benchmark::measured'


def parse_args(description, sizes=('base', 'small'), extra=None, warmup=1):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--size', choices=sizes, default=sizes[0],
                        help='problem size: base (the recorded numbers) or small (a quick check)')
    parser.add_argument('--repeats', type=int, default=None, help='timed runs of each variant (median reported)')
    parser.add_argument('--warmup', type=int, default=warmup,
                        help='untimed runs of each variant before the timed ones (the output check runs '
                             'each variant once before, too)')
    parser.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def setup(args, seed=0):
    torch.set_num_threads(args.threads)
    torch.manual_seed(seed)


def cpu_model():
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith('Model name:'):
                return line.split(':', 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or 'unknown CPU'


def load_average():
    return '%.2f %.2f %.2f' % os.getloadavg()


def machine_line(args):
    import transformers
    return (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({args.threads} threads), transformers {transformers.__version__}, "
            f"Python {platform.python_version()}")


def code_version():
    """The commit the measured code is at, and which tracked files differ from it."""
    try:
        git = lambda *a: subprocess.run(['git', '-C', str(REPO), *a], capture_output=True, text=True,
                                        check=True).stdout.rstrip()
        commit = git('rev-parse', '--short', 'HEAD').strip()
        dirty = [line[3:] for line in git('status', '--porcelain', '--untracked-files=no').splitlines()]
    except (OSError, subprocess.CalledProcessError):
        return 'unknown (no git)'
    return commit + (f" (uncommitted changes in {', '.join(dirty)})" if dirty else '')


def print_header(name, args, sizes):
    print(f"# {name}  ({datetime.datetime.now().strftime('%Y-%m-%d %H:%M')})")
    print(f"machine: {machine_line(args)}")
    print(f"code: {code_version()}")
    print(f"load average at start (1/5/15 min): {load_average()}")
    print('sizes: ' + ', '.join(f'{k}={v}' for k, v in sizes.items()))
    sys.stdout.flush()


def time_alternating(variants, repeats, warmup=1):
    """Run each callable of `variants` (name -> fn) `warmup` times untimed, then `repeats`
    rounds of one timed call each, in turn. Returns name -> list of seconds."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(values):
    return statistics.median(values)


def fmt_seconds(seconds):
    if seconds >= 1.0:
        return f'{seconds:.2f} s'
    if seconds >= 1e-3:
        return f'{seconds * 1e3:.1f} ms'
    return f'{seconds * 1e6:.0f} us'


def report(case, times, baseline, ours):
    """Print both medians (with the spread) and the ratio baseline / ours; return a row."""
    base_t, ours_t = median(times[baseline]), median(times[ours])
    ratio = base_t / ours_t
    spread = lambda v: f'{fmt_seconds(min(v))} .. {fmt_seconds(max(v))}'
    print(f'{case}:')
    print(f'  baseline ({baseline}): median {fmt_seconds(base_t)}  [{spread(times[baseline])}], n={len(times[baseline])}')
    print(f'  ours     ({ours}): median {fmt_seconds(ours_t)}  [{spread(times[ours])}], n={len(times[ours])}')
    print(f'  speed-up baseline/ours: {ratio:.2f}x')
    sys.stdout.flush()
    return {'case': case, 'baseline': base_t, 'ours': ours_t, 'ratio': ratio}


def print_markdown(rows, args):
    """Rows ready to paste into benchmarks/RESULTS.md."""
    print()
    print('| case | baseline (median) | ours (median) | ratio |')
    print('|---|---|---|---|')
    for row in rows:
        print(f"| {row['case']} | {fmt_seconds(row['baseline'])} | {fmt_seconds(row['ours'])} | "
              f"{row['ratio']:.2f}x |")
    print(f"\nload average at end (1/5/15 min): {load_average()}")


def make_captions(count, seed=0, min_words=5, max_words=20):
    """Deterministic COCO-like captions of varied length (lengths matter: padding is trimmed)."""
    import random
    words = ('a man woman dog cat two people sitting standing on the in of with next to table '
             'street red blue green white black large small young old holding riding playing '
             'bike horse ball field grass water beach kitchen plate food pizza bus train car '
             'road sign building window tree snow skis board wave surf sky clouds room bed').split()
    rng = random.Random(seed)
    return [' '.join(rng.choice(words) for _ in range(rng.randint(min_words, max_words)))
            for _ in range(count)]


def peak_memory(fn, prepare=None):
    """Most bytes the CPU allocator held above its level at the start of fn(), per the profiler.

    The profiler cannot see the release of memory allocated before it started, so code that
    replaces existing tensors (the original momentum update) needs `prepare`: a call run inside
    the profiling session first that (re)allocates those tensors where it can follow them.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if prepare is not None:
            prepare()
        with record_function(_MEASURED):
            fn()
    handle, path = tempfile.mkstemp(suffix='.json')
    os.close(handle)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.remove(path)
    events = trace['traceEvents'] if isinstance(trace, dict) else trace
    span = next(e for e in events if e.get('name') == _MEASURED and 'dur' in e)
    begin, end = span['ts'], span['ts'] + span['dur']
    memory = sorted((e for e in events if e.get('name') == '[memory]' and begin <= e['ts'] <= end
                     and e['args'].get('Device Type', 0) == 0), key=lambda e: e['ts'])
    if not memory:
        return 0
    start = memory[0]['args']['Total Allocated'] - memory[0]['args']['Bytes']
    return max(0, max(e['args']['Total Allocated'] for e in memory) - start)
