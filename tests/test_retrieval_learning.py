"""Retrieval learns on the synthetic shapes data: train_retrieval.py with the toy config.

A shorter `make demo`: the toy config (configs/shapes/retrieval_coco.yaml, a tiny BLIP from
scratch) trained for EPOCHS epochs at a constant learning rate. The epoch-averaged ITC and
ITM losses must fall, and the test recall must end clearly above the untrained model's and
above the chance level computed from the test split (demo.chance_recall). The tiny model
first sits on a plateau (the features of every image and caption nearly equal) for ~500
steps, so this is the slowest test of the retrieval set (~2-3 min on one CPU).
"""
import json

import pytest

import demo
import train_retrieval
from conftest import REPO, RETRIEVAL_TOY_CONFIG, RETRIEVAL_TOY_EPOCHS
from script_runner import one_thread

pytestmark = pytest.mark.slow  # trains toy models or runs whole scripts (make test-fast skips it)

CONFIG = str(REPO / RETRIEVAL_TOY_CONFIG)
FLICKR_CONFIG = str(REPO / 'configs' / 'shapes' / 'retrieval_flickr.yaml')
EPOCHS = RETRIEVAL_TOY_EPOCHS


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_chance_recall_on_hand_made_splits():
    # 2 images with 2 captions each: a random top 1 of the 4 texts holds one of the image's
    # two captions with probability 1/2, a top 5 always; a random image is right 1 time in 2
    chance = demo.chance_recall({0: 0, 1: 0, 2: 1, 3: 1}, {0: [0, 1], 1: [2, 3]})
    assert chance['txt_r1'] == pytest.approx(50.0) and chance['txt_r5'] == 100.0
    assert chance['img_r1'] == 50.0 and chance['img_r10'] == 100.0
    assert chance['txt_r_mean'] == pytest.approx(250 / 3) and chance['r_mean'] == pytest.approx(250 / 3)
    assert list(chance) == ['txt_r1', 'txt_r5', 'txt_r10', 'txt_r_mean', 'img_r1', 'img_r5',
                            'img_r10', 'img_r_mean', 'r_mean']
    # 30 images with 5 captions each (the toy test split): 1 - C(145, 5) / C(150, 5)
    many = demo.chance_recall({t: t // 5 for t in range(150)},
                              {i: list(range(5 * i, 5 * i + 5)) for i in range(30)})
    assert many['txt_r5'] == pytest.approx(100 * (1 - (145 * 144 * 143 * 142 * 141)
                                                  / (150 * 149 * 148 * 147 * 146)))
    assert many['img_r5'] == pytest.approx(100 * 5 / 30)


def test_retrieval_learns_on_toy_data(retrieval_toy_run, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the toy config's data paths are relative to the repository
    with one_thread():  # as demo.py: the tiny model gains little from a second thread
        base = ['--device', 'cpu', f'max_epoch={EPOCHS}']

        # the untrained model; the Flickr30k-format toy config reads the same split and agrees
        untrained = {}
        for name, config in (('coco', CONFIG), ('flickr', FLICKR_CONFIG)):
            out = tmp_path / f'untrained_{name}'
            train_retrieval.run(base + ['--config', config, '--output_dir', str(out), '--evaluate'])
            (untrained[name],) = read_lines(out / 'evaluate.txt')
        assert untrained['flickr'] == untrained['coco']

        # training at a constant learning rate (min_lr = init_lr flattens the cosine schedule)
        epochs = read_lines(retrieval_toy_run / 'log.txt')
        assert [line['epoch'] for line in epochs] == list(range(EPOCHS))
        first, last = epochs[0], epochs[-1]
        assert float(last['train_loss_ita']) < float(first['train_loss_ita']) - 0.2
        # (ITM falls less, its negatives being the in-batch texts most like the caption: 0.65 to 0.50)
        assert float(last['train_loss_itm']) < float(first['train_loss_itm'])

        chance = demo.test_split_chance(CONFIG)
        before, after = untrained['coco']['test_r_mean'], last['test_r_mean']
        print(f'test r_mean: chance {chance["r_mean"]:.1f}, untrained {before:.1f}, trained {after:.1f}')
        assert after > before + 10 and after > chance['r_mean'] + 10
        assert last['test_img_r5'] > 2 * chance['img_r5']
