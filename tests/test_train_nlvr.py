"""train_nlvr.py: exact accuracy under any split of the work, the toy run (fine-tuned from the
toy VQA model: the loss falls, dev and test accuracy far above chance and above image-blind
rules), one vs two processes, bad input."""
import json
import random

import pytest
import torch
from torch.utils.data import Dataset

import train_nlvr
import utils
from conftest import REPO, VQA_TOY_EPOCHS
from engine.config import load_config
from script_runner import image_blind_guesses, one_thread, read_json_lines, run_script, script_config

pytestmark = pytest.mark.slow  # trains toy models or runs whole scripts (make test-fast skips it)

TOY_CONFIG = REPO / 'configs' / 'shapes' / 'nlvr.yaml'


class SwappingPairs(Dataset):
    """(image0, image1, sentence, label) items that, like nlvr_dataset, swap the images at random."""

    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        left, right = torch.full((1,), float(index)), torch.full((1,), -1.0)
        if random.random() < 0.5:
            left, right = right, left
        return left, right, f'sentence {index}', self.labels[index]


def test_eval_share_covers_every_sample_once_with_a_fixed_swap():
    dataset = SwappingPairs([0, 1] * 5)
    seen = {}
    for world_size in (1, 2, 3):
        indices = []
        for rank in range(world_size):
            share = train_nlvr.EvalShare(dataset, seed=7, rank=rank, world_size=world_size)
            for i in range(len(share)):
                random.seed(1000 * world_size + rank + i)  # the caller's stream: must not matter
                state = random.getstate()
                left, right, sentence, label = share[i]
                assert random.getstate() == state  # and must be left as it was
                index = int(sentence.split()[1])
                indices.append(index)
                # the same (seed, index) draws the same order under every split
                assert seen.setdefault(index, (left.item(), right.item())) == (left.item(), right.item())
        assert sorted(indices) == list(range(10))
    orders = [seen[i] for i in range(10)]
    assert 0 < sum(left == -1.0 for left, _ in orders) < 10  # both orders occur


class ParityModel(torch.nn.Module):
    """Predicts class 1 for even sample numbers (read from the left or right image)."""

    def forward(self, images, text, targets, train=False):
        numbers = images.view(2, -1).max(dim=0).values
        even = (numbers % 2 == 0).float()
        return torch.stack([1 - even, even], dim=1)


def test_accuracy_sums_correct_answers_and_counts_over_ranks(monkeypatch):
    # 5 samples: ranks hold 3 and 2 of them, so the mean of the two rank accuracies differs
    # from the overall accuracy
    labels = [0, 0, 0, 0, 0]           # ParityModel predicts 1, 0, 1, 0, 1: correct for 1 and 3
    dataset = SwappingPairs(labels)
    monkeypatch.setattr(utils, 'get_world_size', lambda: 2)
    local = {}
    for rank in (0, 1):
        monkeypatch.setattr(utils, 'get_rank', lambda rank=rank: rank)
        monkeypatch.setattr(utils, 'all_reduce_sum', lambda t, rank=rank: local.setdefault(rank, t.clone()))
        train_nlvr.evaluate(ParityModel(), train_nlvr.eval_loader(dataset, 2, 0, seed=0),
                            torch.device('cpu'), {})
    assert local[0].tolist() == [0.0, 3.0] and local[1].tolist() == [2.0, 2.0]
    # what each rank reports once the (here simulated) all-reduce has summed both
    monkeypatch.setattr(utils, 'all_reduce_sum', lambda t: local[0] + local[1])
    stats = train_nlvr.evaluate(ParityModel(), train_nlvr.eval_loader(dataset, 2, 0, seed=0),
                                torch.device('cpu'), {})
    assert stats == {'acc': '0.4000'}  # 2 of 5; the mean of rank means would be 0.5


# --------------------------------------------------------------------------- the script on toy data

def toy_argv(output_dir, *overrides):
    return ['--config', str(TOY_CONFIG), '--output_dir', str(output_dir), '--device', 'cpu', *overrides]


@pytest.fixture(scope='module')
def toy_run(tmp_path_factory, vqa_toy_run):
    """The toy fine-tuning, from the toy VQA model's weights (as the toy config says)."""
    vqa_out, _ = vqa_toy_run
    out = tmp_path_factory.mktemp('nlvr_toy')
    with one_thread():
        train_nlvr.run(toy_argv(out, f'pretrained={vqa_out / f"checkpoint_{VQA_TOY_EPOCHS - 1:02d}.pth"}'))
    return out


def image_blind_accuracy(split_file):
    """Accuracy on split_file of the best rule that ignores the images, learnt from the training
    statements (script_runner.image_blind_guesses: the label most common for each sentence)."""
    def read(name):
        return json.loads((REPO / 'datasets/shapes/annotation' / name).read_text())
    split = read(split_file)
    guesses = image_blind_guesses([(ann['sentence'], ann['label']) for ann in read('nlvr_train.json')],
                                  [ann['sentence'] for ann in split])
    return sum(guess == ann['label'] for guess, ann in zip(guesses, split)) / len(split)


def test_toy_run_learns_to_judge_the_images_and_keeps_the_best_epoch(toy_run):
    config = load_config(TOY_CONFIG)
    lines = read_json_lines(toy_run / 'log.txt')
    assert [line['epoch'] for line in lines] == list(range(config['max_epoch']))
    assert list(lines[0]) == ['train_lr', 'train_loss', 'val_acc', 'test_acc', 'epoch', 'best_epoch']
    assert all(len(line['val_acc'].split('.')[1]) == 4 for line in lines)  # the original's '{:.4f}'
    # the loss falls from its chance value (ln 2) ...
    assert float(lines[0]['train_loss']) > 0.68 and float(lines[-1]['train_loss']) < 0.64
    # ... and the epoch kept as best judges the 240 unseen image pairs of dev and test far above
    # chance (half the labels are true: 0.6 is ~3 standard errors above) and above any
    # image-blind rule learnt from the training sentences
    best = lines[-1]['best_epoch']
    accuracy = (float(lines[best]['val_acc']) + float(lines[best]['test_acc'])) / 2  # equal sizes
    blind = (image_blind_accuracy('nlvr_dev.json') + image_blind_accuracy('nlvr_test.json')) / 2
    assert accuracy > 0.6 and accuracy > blind + 0.1, (accuracy, blind)

    # checkpoint_best.pth is the epoch with the best dev accuracy (first one on ties), as the original
    val = [float(line['val_acc']) for line in lines]
    assert best == val.index(max(val))
    checkpoint = torch.load(toy_run / 'checkpoint_best.pth', weights_only=True)
    assert set(checkpoint) == {'model', 'optimizer', 'config', 'epoch'} and checkpoint['epoch'] == best


def test_two_processes_evaluate_as_one(toy_run, tmp_path):
    checkpoint = toy_run / 'checkpoint_last.pth'
    # one process, --evaluate: the original writes the accuracies to log.txt
    with one_thread():
        train_nlvr.run(toy_argv(tmp_path / 'one', '--evaluate', f'pretrained={checkpoint}'))
    (single,) = read_json_lines(tmp_path / 'one' / 'log.txt')
    assert list(single) == ['val_acc', 'test_acc']

    # two processes: one DDP training epoch at learning rate 0 (the weights stay as they are),
    # then the evaluation, each rank scoring its share of the samples
    run_script('train_nlvr.py', *toy_argv(tmp_path / 'two', f'pretrained={checkpoint}', 'max_epoch=1',
                                          'init_lr=0', 'min_lr=0'), nproc=2)
    (double,) = read_json_lines(tmp_path / 'two' / 'log.txt')
    assert (double['val_acc'], double['test_acc']) == (single['val_acc'], single['test_acc'])
    trained = torch.load(tmp_path / 'two' / 'checkpoint_last.pth', weights_only=True)
    assert len(trained['rng_states']) == 2 and trained['global_step'] > 0


def test_bad_input_fails_before_training(tmp_path, capsys):
    out = tmp_path / 'out'
    with pytest.raises(FileNotFoundError, match='image_root.*no_such_folder'):
        train_nlvr.run(toy_argv(out, f'image_root={tmp_path / "no_such_folder"}'))
    with pytest.raises(FileNotFoundError, match='pretrained.*missing.pth'):
        train_nlvr.run(toy_argv(out, f'pretrained={tmp_path / "missing.pth"}'))
    with pytest.raises(SystemExit):
        train_nlvr.run(toy_argv(out, 'batch_size=8'))
    assert "unknown config key 'batch_size'" in capsys.readouterr().err
    assert not out.exists()


def test_official_config_passes_the_key_checks():
    _, config = script_config(train_nlvr, 'configs/nlvr.yaml')
    assert config['med_config'] == 'configs/med_config.json' and config['image_size'] == 384
