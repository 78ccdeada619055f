"""Reproduce the paper's tables: every row evaluated with its official checkpoint and config,
then one table of expected, measured, difference and whether it is within tolerance.

    python reproduce.py --data_root datasets --output_dir output/reproduce
    python reproduce.py --data_root datasets --tasks retrieval_coco,caption_coco --amp bf16
    python reproduce.py --dry_run --data_root datasets
    python reproduce.py --suite toy --output_dir output/reproduce_toy

The rows, their expected numbers (with the table they come from) and tolerances live in
configs/expected.yaml. Each row runs the task script as a user would (`--evaluate`, the
official config, `pretrained=` the zoo checkpoint, the data paths under --data_root), in its
own folder OUTPUT_DIR/rows/<task>, and its numbers are appended to OUTPUT_DIR/reproduce.jsonl
(task, metric, expected, measured, difference, tolerance, ok), so a rerun skips finished rows.
OUTPUT_DIR/reproduce.md is the table. The exit status is 0 only when every selected row was
measured within tolerance (a server-only row, VQA test-dev, is reported, not checked).

Before any work the data each row needs is checked under --data_root (the configs'
`datasets/` folder); `--dry_run` prints only that and exits non-zero when something is
missing. `--suite toy` is the same machinery on the toy configs (configs/shapes/, the data
generated on first use): their models are first trained here, as the tests train them.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from engine.cli import HelpFormatter
from engine.config import ConfigError, load_config
from engine.fileio import atomic_write
from models.zoo import ZOO

REPO = os.path.dirname(os.path.abspath(__file__))
EXPECTED = os.path.join(REPO, 'configs', 'expected.yaml')
CONFIG_DATA_PREFIX = 'datasets/'  # the official configs' data folders start so
RESULTS, TABLE = 'reproduce.jsonl', 'reproduce.md'


def load_suite(path, suite):
    """(models, rows) of one suite of the expected-numbers file, checked enough to name a mistake."""
    expected = load_config(path)
    if suite not in expected:
        raise ConfigError(f"{path}: no suite {suite!r} (suites: {', '.join(expected)})")
    models, rows = expected[suite].get('models', {}), expected[suite].get('rows', [])
    for row in rows:
        for key in ('task', 'script', 'config', 'model', 'result', 'metrics'):
            if key not in row:
                raise ConfigError(f"{path}: suite {suite}: row {row.get('task', '?')!r} has no {key!r}")
        if row['model'] not in models:
            raise ConfigError(f"{path}: suite {suite}: row {row['task']!r}: unknown model {row['model']!r}")
        spec = models[row['model']]
        if not ({'zoo', 'file', 'train'} & set(spec)) or ('zoo' in spec and spec['zoo'] not in ZOO):
            raise ConfigError(f"{path}: suite {suite}: model {row['model']!r} needs zoo: NAME (one of "
                                    f"models/zoo.py), file: PATH or train: {{script, config, overrides}}")
        for metric in row['metrics']:
            if 'tolerance' not in metric and not metric.get('at_least'):
                raise ConfigError(f"{path}: row {row['task']!r} metric {metric['key']!r}: "
                                        f"give a tolerance or at_least: true")
    return models, rows


# --------------------------------------------------------------------------- what is missing

def data_status(row, data_root):
    """[(path, 'ok' | 'missing' | 'download')] of the images and annotations a row needs."""
    status = [(os.path.join(data_root, p), 'ok' if os.path.exists(os.path.join(data_root, p)) else 'missing')
              for p in row.get('images', [])]
    status += [(os.path.join(data_root, p), 'ok' if os.path.exists(os.path.join(data_root, p)) else 'download')
               for p in row.get('annotations', [])]
    status += [(os.path.join(data_root, p), 'ok' if os.path.exists(os.path.join(data_root, p)) else 'optional')
               for p in row.get('optional', {}).values()]
    return status


def report_data(rows, data_root):
    """Print what each row needs; returns the tasks that cannot run (images missing)."""
    blocked = []
    for row in rows:
        status = data_status(row, data_root)
        missing = [path for path, state in status if state == 'missing']
        print(f"{row['task']}: {'ready' if not missing else 'MISSING DATA'}  ({row.get('title', '')})")
        for path, state in status:
            if state != 'ok':
                what = {'missing': 'missing (see docs/reproducing.md for where to get it)',
                        'download': 'not there yet: downloaded on first use (offline: copy it there)',
                        'optional': 'not there: optional, the row is reported for the server without it'}[state]
                print(f"    {path}: {what}")
        if missing:
            blocked.append(row['task'])
    return blocked


def measured_seconds(spec, device):
    """A row's or model's measured run time on this kind of device (its `seconds` map: device
    name fragment -> seconds, e.g. {H100: 900, cpu: 60}), or None."""
    for fragment, seconds in (spec.get('seconds') or {}).items():
        if fragment.lower() in device.lower():
            return seconds
    return None


def report_estimate(rows, models, device, output_dir):
    """Print the run time expected on this device from measured figures, or say there are none."""
    to_train = {row['model'] for row in rows if 'train' in models[row['model']]
                and not os.path.exists(os.path.join(output_dir, 'models', row['model'], 'TRAINED'))}
    figures = [measured_seconds(row, device) for row in rows]
    figures += [measured_seconds(models[name], device) for name in sorted(to_train)]
    known = [f for f in figures if f is not None]
    if not known:
        print(f"run time: no measured figure for {device} in the expected-numbers file yet")
        return
    unknown = len(figures) - len(known)
    print(f"run time on {device}: about {sum(known) / 60:.0f} min from measured figures"
          + (f", plus {unknown} step(s) never timed on this device" if unknown else ''))


# --------------------------------------------------------------------------- running

def run_script(argv, log_path):
    """Run one task script in a fresh process (its output to log_path); raises on failure."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    print('  $ python ' + ' '.join(argv), flush=True)
    with open(log_path, 'a', encoding='utf-8') as log:
        code = subprocess.call([sys.executable, *argv], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        with open(log_path, encoding='utf-8', errors='replace') as log:
            tail = ''.join(log.readlines()[-15:])
        raise RuntimeError(f"{argv[0]} exited with status {code}; its log: {log_path}\n{tail}")


def data_overrides(config_path, data_root):
    """KEY=VALUE overrides that move the config's datasets/ paths under data_root."""
    config = load_config(os.path.join(REPO, config_path))
    overrides = []
    for key, value in config.items():
        if isinstance(value, str) and value.startswith(CONFIG_DATA_PREFIX):
            overrides.append(f"{key}={os.path.join(data_root, value[len(CONFIG_DATA_PREFIX):])}")
    return overrides


def checkpoint_of(name, spec, args):
    """The checkpoint (URL or file) of model `name`: a zoo entry, a file, or trained here once."""
    if 'zoo' in spec:
        return ZOO[spec['zoo']].url
    if 'file' in spec:
        return spec['file']
    folder = os.path.join(args.output_dir, 'models', name)
    done = os.path.join(folder, 'TRAINED')
    if not os.path.exists(done):  # an interrupted training resumes from its checkpoint_last.pth
        train = spec['train']
        print(f"training model {name} ({train['script']} {train['config']})", flush=True)
        start = time.time()
        run_script([train['script'], '--config', train['config'], '--output_dir', folder,
                    '--device', args.device, *train.get('overrides', [])],
                   os.path.join(args.output_dir, 'logs', f'model_{name}.log'))
        with open(done, 'w') as f:
            json.dump({'finished': time.strftime('%Y-%m-%d %H:%M:%S'), 'seconds': round(time.time() - start, 1),
                       'device': device_name(args.device)}, f)
    return os.path.join(folder, spec['checkpoint'])


def device_name(device):
    if str(device).startswith('cuda'):
        import torch
        return torch.cuda.get_device_name()
    return 'cpu'


def last_json_line(path):
    with open(path, encoding='utf-8') as f:
        lines = [line for line in f if line.strip()]
    if not lines:
        raise RuntimeError(f"{path} holds no result")
    return json.loads(lines[-1])


def evaluate_row(row, models, args):
    """Evaluate one row; returns its result lines (one per metric)."""
    folder = os.path.join(args.output_dir, 'rows', row['task'])
    if os.path.isdir(folder):  # a half-finished evaluation: start it again
        shutil.rmtree(folder)
    checkpoint = checkpoint_of(row['model'], models[row['model']], args)
    present = {key: os.path.join(args.data_root, path) for key, path in row.get('optional', {}).items()
               if os.path.exists(os.path.join(args.data_root, path))}
    argv = [row['script'], '--config', row['config'], '--output_dir', folder, '--evaluate', '--no_auto_resume',
            '--device', args.device, f'pretrained={checkpoint}',
            *(data_overrides(row['config'], args.data_root) if args.suite != 'toy' else []),
            *[f'{key}={path}' for key, path in present.items()],
            *row.get('overrides', []), *([f'amp={args.amp}'] if args.amp != 'none' else [])]
    start = time.time()
    print(f"{row['task']}: {row.get('title', '')}", flush=True)
    run_script(argv, os.path.join(args.output_dir, 'logs', f"{row['task']}.log"))
    seconds = round(time.time() - start, 1)

    server_only = [m for m in row['metrics'] if m.get('server') or
                   (m.get('server_without') and m['server_without'] not in present)]
    result = None if len(server_only) == len(row['metrics']) else last_json_line(os.path.join(folder, row['result']))
    lines = []
    for metric in row['metrics']:
        line = {'task': row['task'], 'metric': metric.get('name', metric['key']), 'key': metric['key'],
                'expected': metric['expected'], 'measured': None, 'difference': None,
                'tolerance': metric.get('tolerance'), 'at_least': bool(metric.get('at_least')), 'ok': None,
                'source': row.get('source'), 'checkpoint': checkpoint, 'amp': args.amp, 'seconds': seconds,
                'device': device_name(args.device)}
        if metric in server_only:
            line['submit'] = os.path.join(folder, row.get('submit', 'result'))
        else:
            if metric['key'] not in result:
                raise RuntimeError(f"{row['task']}: {row['result']} has no {metric['key']!r} (keys: {sorted(result)})")
            measured = round(float(result[metric['key']]) * metric.get('scale', 1), 4)
            line['measured'], line['difference'] = measured, round(measured - metric['expected'], 4)
            line['ok'] = (measured >= metric['expected'] if metric.get('at_least')
                          else abs(measured - metric['expected']) <= metric['tolerance'] + 1e-9)
        lines.append(line)
    return lines


# --------------------------------------------------------------------------- results

def read_results(path):
    """{(task, key): line}: the last line of each metric (a rerun appends)."""
    results = {}
    if os.path.exists(path):
        with open(path, encoding='utf-8') as f:
            for number, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    line = json.loads(text)
                except json.JSONDecodeError:
                    print(f"{path}: line {number} is cut off (an interrupted write); ignored", flush=True)
                    continue
                results[(line['task'], line['key'])] = line
    return results


def finished(row, results):
    """Every metric of the row has a result line for the same expected value and tolerance."""
    for metric in row['metrics']:
        line = results.get((row['task'], metric['key']))
        if (line is None or line.get('failed') or line['expected'] != metric['expected'] or line['tolerance'] != metric.get('tolerance')
                or line['at_least'] != bool(metric.get('at_least'))):
            return False
    return True


def append_lines(path, lines):
    """Append JSON lines, after cutting off a last line an interrupted write left unfinished."""
    if os.path.exists(path):
        with open(path, 'rb+') as f:
            data = f.read()
            if data and not data.endswith(b'\n'):
                f.truncate(data.rfind(b'\n') + 1)
    with open(path, 'a', encoding='utf-8') as f:
        for line in lines:
            f.write(json.dumps(line) + '\n')
        f.flush()
        os.fsync(f.fileno())


def verdict(line):
    if line.get('failed'):
        return 'FAILED: ' + line['failed'].splitlines()[0]
    if line['ok'] is None:
        return 'server: submit ' + line.get('submit', '')
    return 'ok' if line['ok'] else 'OFF'


def write_table(path, rows, results, blocked, args):
    bound = {True: '>= ', False: ''}
    out = [f"# BLIP reproduction: suite {args.suite}", '',
           f"{time.strftime('%Y-%m-%d %H:%M')}, device {args.device}, amp {args.amp}"
           + (' (not the original float32: tolerances assume float32)' if args.amp != 'none' else ''), '',
           '| task | metric | expected | measured | difference | tolerance | result | source |',
           '|---|---|---|---|---|---|---|---|']
    notes = []
    for row in rows:
        for metric in row['metrics']:
            line = results.get((row['task'], metric['key']))
            tolerance = '-' if metric.get('at_least') else f"± {metric.get('tolerance')}"
            if line is None:
                state = 'missing data' if row['task'] in blocked else 'not run'
                out.append(f"| {row['task']} | {metric.get('name', metric['key'])} | {metric['expected']} | | | "
                           f"{tolerance} | {state} | {row.get('source', '')} |")
                continue
            measured = '' if line['measured'] is None else line['measured']
            difference = '' if line['difference'] is None else f"{line['difference']:+.2f}"
            out.append(f"| {row['task']} | {line['metric']} | {bound[line['at_least']]}{line['expected']} | "
                       f"{measured} | {difference} | {tolerance} | {verdict(line)} | {row.get('source', '')} |")
        if row.get('note'):
            notes.append(f"- {row['task']}: {row['note']}")
    if notes:
        out += ['', 'Notes:', *notes]
    with atomic_write(path, 'w', encoding='utf-8') as f:
        f.write('\n'.join(out) + '\n')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=HelpFormatter,
                                     epilog='examples:\n' + '\n'.join(
                                         '  ' + line.strip() for line in __doc__.splitlines()
                                         if line.startswith('    python')))
    parser.add_argument('--suite', default='paper', help='paper or toy (the CPU toy configs)')
    parser.add_argument('--data_root', default='datasets', help="the folder the configs' datasets/ paths point into")
    parser.add_argument('--tasks', default='', help='comma-separated rows to run (default: all)')
    parser.add_argument('--output_dir', default='output/reproduce')
    parser.add_argument('--expected', default=EXPECTED, help='the expected-numbers file')
    parser.add_argument('--amp', default='none', choices=['none', 'bf16', 'fp16'])
    parser.add_argument('--device', default=None, help='default: cuda when available, else cpu')
    parser.add_argument('--dry_run', action='store_true', help='only list what each row needs and what is missing')
    args = parser.parse_args(argv)
    if args.device is None:
        import torch
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'

    models, rows = load_suite(args.expected, args.suite)
    if args.tasks:
        wanted = [task.strip() for task in args.tasks.split(',') if task.strip()]
        unknown = sorted(set(wanted) - {row['task'] for row in rows})
        if unknown:
            parser.error(f"unknown task(s) {', '.join(unknown)}; suite {args.suite} has "
                         f"{', '.join(row['task'] for row in rows)}")
        rows = [row for row in rows if row['task'] in wanted]

    print(f"suite {args.suite}: {len(rows)} rows; data under {os.path.abspath(args.data_root)}")
    blocked = report_data(rows, args.data_root)
    report_estimate([row for row in rows if row['task'] not in blocked], models, device_name(args.device),
                    args.output_dir)
    if args.dry_run:
        print(f"{len(blocked)} of {len(rows)} rows cannot run: their data is missing" if blocked
              else 'every row has its data')
        return 1 if blocked else 0

    os.makedirs(args.output_dir, exist_ok=True)
    results_path = os.path.join(args.output_dir, RESULTS)
    results = read_results(results_path)
    for row in rows:
        if row['task'] in blocked:
            continue
        if finished(row, results):
            print(f"{row['task']}: done in an earlier run, skipped ({results_path})")
            continue
        try:
            lines = evaluate_row(row, models, args)
        except (RuntimeError, OSError, ConfigError) as error:
            print(f"{row['task']}: FAILED: {error}", flush=True)
            lines = [{'task': row['task'], 'metric': m.get('name', m['key']), 'key': m['key'],
                      'expected': m['expected'], 'measured': None, 'difference': None,
                      'tolerance': m.get('tolerance'), 'at_least': bool(m.get('at_least')), 'ok': False,
                      'failed': str(error)} for m in row['metrics']]
        append_lines(results_path, lines)
        results.update({(line['task'], line['key']): line for line in lines})
        write_table(os.path.join(args.output_dir, TABLE), rows, results, blocked, args)

    write_table(os.path.join(args.output_dir, TABLE), rows, results, blocked, args)
    with open(os.path.join(args.output_dir, TABLE), encoding='utf-8') as f:
        print(f.read())
    checked = [results.get((row['task'], m['key'])) for row in rows for m in row['metrics']]
    bad = [line for line in checked if line is None or line['ok'] is False]
    if blocked:
        print(f"{len(blocked)} row(s) not run, their data is missing: {', '.join(blocked)}")
    if bad:
        print(f"{len(bad)} result(s) not within tolerance or not measured")
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
