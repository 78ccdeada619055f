"""reproduce.py: rows evaluated by the task scripts, checked against expected numbers, resumable.

The machinery on a small suite of its own (written by the test): one toy retrieval model
trained for one epoch by reproduce.py itself, two rows on it, one with a bound it meets, one
with an expected value no toy model reaches (the run must fail). The real `--suite toy` of
configs/expected.yaml end to end, with its models taken from the toy runs the learning tests
train anyway (the same recipes), so only its evaluations add time. The paper suite's dry run
needs no data at all.
"""
import json
import shutil
import subprocess
import sys

import pytest

import reproduce
from conftest import REPO
from engine.config import ConfigError, load_config

pytestmark = pytest.mark.slow  # trains toy models or runs whole scripts (make test-fast skips it)

SUITE = {
    'mini': {
        'models': {'retrieval': {'train': {'script': 'train_retrieval.py',
                                           'config': 'configs/shapes/retrieval_coco.yaml',
                                           'overrides': ['max_epoch=1']},
                                 'checkpoint': 'checkpoint_best.pth', 'seconds': {'cpu': 50}}},
        'rows': [
            {'task': 'toy_coco', 'script': 'train_retrieval.py', 'config': 'configs/shapes/retrieval_coco.yaml',
             'model': 'retrieval', 'result': 'evaluate.txt', 'source': 'a bound every model meets',
             'note': 'a note shown under the table', 'seconds': {'H100': 1, 'cpu': 70},
             'metrics': [{'key': 'test_r_mean', 'name': 'r_mean', 'expected': 0.0, 'at_least': True},
                         {'key': 'test_img_r10', 'name': 'IR@10', 'expected': 0.0, 'at_least': True}]},
            {'task': 'toy_flickr', 'script': 'train_retrieval.py', 'config': 'configs/shapes/retrieval_flickr.yaml',
             'model': 'retrieval', 'result': 'evaluate.txt', 'source': 'deliberately wrong',
             'metrics': [{'key': 'test_txt_r1', 'name': 'TR@1', 'expected': 99.0, 'tolerance': 0.5}]},
        ],
    },
}


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope='module')
def mini_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp('reproduce')
    expected = folder / 'expected.yaml'
    expected.write_text(json.dumps(SUITE))  # JSON is YAML
    out = folder / 'out'
    result = subprocess.run([sys.executable, 'reproduce.py', '--suite', 'mini', '--expected', str(expected),
                             '--output_dir', str(out), '--device', 'cpu'],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    return expected, out, result


def test_rows_are_measured_checked_and_tabled(mini_run):
    _, out, result = mini_run
    assert result.returncode == 1, result.stdout + result.stderr  # the wrong row fails the run
    lines = read_lines(out / 'reproduce.jsonl')
    assert [(line['task'], line['metric']) for line in lines] == [('toy_coco', 'r_mean'), ('toy_coco', 'IR@10'),
                                                                  ('toy_flickr', 'TR@1')]
    for line in lines:
        assert {'task', 'metric', 'expected', 'measured', 'ok'} <= set(line)
    coco_r_mean, coco_r10, flickr = lines
    assert coco_r_mean['ok'] is True and coco_r10['ok'] is True and flickr['ok'] is False
    # the numbers are the script's own: its evaluate.txt, scaled as written
    (evaluated,) = read_lines(out / 'rows' / 'toy_coco' / 'evaluate.txt')
    assert coco_r_mean['measured'] == pytest.approx(evaluated['test_r_mean'], abs=1e-4)
    assert flickr['difference'] == pytest.approx(flickr['measured'] - 99.0, abs=1e-3)
    # the model was trained once, by reproduce.py, and both rows evaluated it
    assert (out / 'models' / 'retrieval' / 'TRAINED').exists()
    assert coco_r_mean['checkpoint'] == flickr['checkpoint'] == str(out / 'models' / 'retrieval' / 'checkpoint_best.pth')
    table = (out / 'reproduce.md').read_text()
    assert '| toy_flickr | TR@1 | 99.0 |' in table and '| OFF |' in table and '| ok |' in table
    assert 'a note shown under the table' in table
    assert '1 result(s) not within tolerance' in result.stdout
    # the estimate before any work: the measured figures of this device (the second row has none)
    assert 'run time on cpu: about 2 min from measured figures, plus 1 step(s) never timed' in result.stdout


def test_a_rerun_skips_finished_rows_and_reruns_a_changed_one(mini_run, tmp_path):
    expected, out, _ = mini_run
    before = read_lines(out / 'reproduce.jsonl')
    (out / 'reproduce.jsonl').write_text((out / 'reproduce.jsonl').read_text() + '{"task": "cut')  # a cut write
    rerun = subprocess.run([sys.executable, 'reproduce.py', '--suite', 'mini', '--expected', str(expected),
                            '--output_dir', str(out), '--device', 'cpu', '--tasks', 'toy_coco'],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert 'toy_coco: done in an earlier run, skipped' in rerun.stdout and 'line 4 is cut off' in rerun.stdout
    assert read_lines_lenient(out / 'reproduce.jsonl') == before
    # a changed expected value makes the row run again (the model is not trained again)
    changed = json.loads(json.dumps(SUITE))
    changed['mini']['rows'][0]['metrics'][0]['expected'] = 1.0
    (tmp_path / 'changed.yaml').write_text(json.dumps(changed))
    again = subprocess.run([sys.executable, 'reproduce.py', '--suite', 'mini', '--expected', str(tmp_path / 'changed.yaml'),
                            '--output_dir', str(out), '--device', 'cpu', '--tasks', 'toy_coco'],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert 'training model' not in again.stdout and 'toy_coco: done' not in again.stdout
    latest = reproduce.read_results(str(out / 'reproduce.jsonl'))
    assert latest[('toy_coco', 'test_r_mean')]['expected'] == 1.0
    # the cut line was dropped before appending: every line reads
    assert read_lines(out / 'reproduce.jsonl')[:3] == before and len(read_lines(out / 'reproduce.jsonl')) == 5


def read_lines_lenient(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip() and not line.endswith('"cut')]


def test_the_dry_run_names_every_paper_row_and_what_is_missing(tmp_path, capsys):
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert reproduce.main(['--dry_run', '--data_root', str(empty)]) == 1
    printed = capsys.readouterr().out
    _, rows = reproduce.load_suite(reproduce.EXPECTED, 'paper')
    assert len(rows) == 8
    for row in rows:
        assert f"{row['task']}: MISSING DATA" in printed
        for images in row['images']:
            assert f"{empty / images}: missing" in printed
        for annotation in row['annotations']:
            assert f"{empty / annotation}: not there yet: downloaded on first use" in printed
    assert '8 of 8 rows cannot run' in printed
    assert 'run time: no measured figure for cpu' in printed
    assert not any(tmp_path.glob('**/reproduce.jsonl'))  # a dry run writes nothing
    # with a row's data in place it is ready
    (empty / 'msrvtt' / 'videos').mkdir(parents=True)
    assert reproduce.main(['--dry_run', '--data_root', str(empty), '--tasks', 'msrvtt_zeroshot']) == 0
    assert 'msrvtt_zeroshot: ready' in capsys.readouterr().out


def test_paper_rows_move_the_configs_data_paths_under_data_root():
    assert reproduce.data_overrides('configs/retrieval_coco.yaml', '/data') == [
        'image_root=/data/coco/images/', 'ann_root=/data/annotation/']
    assert 'video_root=/data/msrvtt/videos/' in reproduce.data_overrides('configs/retrieval_msrvtt.yaml', '/data')
    # every paper row's images and annotations lie under the folders its config points at
    _, rows = reproduce.load_suite(reproduce.EXPECTED, 'paper')
    for row in rows:
        folders = [o.split('=', 1)[1] for o in reproduce.data_overrides(row['config'], '/data')]
        for path in row['images'] + row['annotations']:
            assert any(f'/data/{path}/'.startswith(folder) for folder in folders), (row['task'], path)


def test_the_expected_files_suites_are_well_formed_and_mistakes_named(tmp_path):
    for suite in ('paper', 'toy'):
        models, rows = reproduce.load_suite(reproduce.EXPECTED, suite)
        for row in rows:
            assert (REPO / row['script']).is_file() and (REPO / row['config']).is_file()
            load_config(str(REPO / row['config']))
    bad = json.loads(json.dumps(SUITE))
    del bad['mini']['rows'][1]['metrics'][0]['tolerance']
    (tmp_path / 'bad.yaml').write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="row 'toy_flickr' metric 'test_txt_r1': give a tolerance"):
        reproduce.load_suite(str(tmp_path / 'bad.yaml'), 'mini')
    bad['mini']['models']['retrieval'] = {'zoo': 'no_such_model'}
    (tmp_path / 'bad.yaml').write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="model 'retrieval' needs zoo: NAME"):
        reproduce.load_suite(str(tmp_path / 'bad.yaml'), 'mini')
    with pytest.raises(ConfigError, match="no suite 'nope'"):
        reproduce.load_suite(reproduce.EXPECTED, 'nope')
    with pytest.raises(SystemExit):
        reproduce.main(['--dry_run', '--tasks', 'retrieval_cocoo'])


def test_the_toy_suite_end_to_end_on_the_toy_runs_of_the_other_tests(retrieval_toy_run, caption_toy_run,
                                                                      vqa_toy_run, tmp_path):
    # the toy suite's models are the toy runs the learning tests train, with the same recipes:
    # they are put where reproduce.py would have trained them, so only the evaluations run here
    from conftest import (
        CAPTION_TOY_CONFIG,
        CAPTION_TOY_EPOCHS,
        RETRIEVAL_TOY_CONFIG,
        RETRIEVAL_TOY_OVERRIDES,
        VQA_TOY_CONFIG,
        VQA_TOY_EPOCHS,
    )
    models, rows = reproduce.load_suite(reproduce.EXPECTED, 'toy')
    runs = {'retrieval': (retrieval_toy_run, RETRIEVAL_TOY_CONFIG, RETRIEVAL_TOY_OVERRIDES),
            'caption': (caption_toy_run[0], CAPTION_TOY_CONFIG, [f'max_epoch={CAPTION_TOY_EPOCHS}', 'min_lr=1e-3']),
            'vqa': (vqa_toy_run[0], VQA_TOY_CONFIG, [f'max_epoch={VQA_TOY_EPOCHS}'])}
    assert set(models) == set(runs)
    out = tmp_path / 'toy'
    for name, (folder, config, overrides) in runs.items():
        assert (models[name]['train']['config'], models[name]['train']['overrides']) == (config, overrides)
        (out / 'models' / name).mkdir(parents=True)
        shutil.copy(folder / models[name]['checkpoint'], out / 'models' / name / models[name]['checkpoint'])
        (out / 'models' / name / 'TRAINED').write_text('{}')
    result = subprocess.run([sys.executable, 'reproduce.py', '--suite', 'toy', '--output_dir', str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'training model' not in result.stdout
    lines = read_lines(out / 'reproduce.jsonl')
    assert [line['task'] for line in lines] == [row['task'] for row in rows]
    assert all(line['ok'] is True and line['measured'] >= line['expected'] for line in lines), lines
    table = (out / 'reproduce.md').read_text()
    assert table.count('| ok |') == len(lines)
