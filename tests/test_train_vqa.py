"""train_vqa.py on the toy shapes data (configs/shapes/vqa.yaml) and the VQA accuracy metric.

One DDP training run (two gloo processes, the toy config's epochs: conftest.vqa_toy_run, which
the NLVR2 toy also fine-tunes from) is shared: it shows the model learns from the images (the
loss falls; accuracy beats the best any image-blind model could do on the test questions, and
colour questions are answered far above chance), that training runs under DDP, and its
checkpoint is then evaluated by one process, which must give the same answers and accuracy.
"""
import collections
import json

import pytest
import torch

import train_vqa
from conftest import REPO, VQA_TOY_CONFIG, VQA_TOY_EPOCHS
from metrics import answer_accuracy, normalize_answer, vqa_accuracy
from script_runner import image_blind_guesses, read_json_lines, run_script, script_config, toy_setup

pytestmark = pytest.mark.slow  # trains toy models or runs whole scripts (make test-fast skips it)

CONFIG = VQA_TOY_CONFIG
EPOCHS = VQA_TOY_EPOCHS


def load_test_annotation():
    return json.loads((REPO / 'datasets/shapes/annotation/vqa_test.json').read_text())


def read_results(path):
    return sorted(json.loads(path.read_text()), key=lambda r: r['question_id'])


def majority_answer_accuracy(annotation):
    """Accuracy of always giving the one most common answer (the data's chance level)."""
    counts = collections.Counter(a for ann in annotation for a in ann['answer'])
    return max(vqa_accuracy([{'question_id': ann['question_id'], 'answer': answer} for ann in annotation],
                            annotation)
               for answer, _ in counts.most_common(5))


def image_blind_accuracy(annotation):
    """Accuracy of the best model that never looks at the image, as it could learn from the
    training files (script_runner.image_blind_guesses, each human answer a training pair)."""
    pairs = []
    for name in ('vqa_train', 'vqa_val', 'vg_qa'):
        for ann in json.loads((REPO / f'datasets/shapes/annotation/{name}.json').read_text()):
            given = ann['answer'] if isinstance(ann['answer'], list) else [ann['answer']]
            pairs += [(ann['question'], answer) for answer in given]
    guesses = image_blind_guesses(pairs, [ann['question'] for ann in annotation])
    return vqa_accuracy([{'question_id': ann['question_id'], 'answer': guess}
                         for ann, guess in zip(annotation, guesses)], annotation)


@pytest.fixture(scope='module')
def untrained_accuracy():
    """VQA accuracy of the toy model before training (same config, rank inference)."""
    from data import create_dataset, create_loader
    from models.blip_vqa import blip_vqa

    with toy_setup(train_vqa, CONFIG) as (_, config):
        model = blip_vqa(image_size=config['image_size'], vit=config['vit'], med_config=config['med_config'])
        _, test_set = create_dataset('vqa', config)
        (loader,) = create_loader([test_set], [None], [config['batch_size_test']], [0], [False], [None])
        results = train_vqa.evaluation(model, loader, torch.device('cpu'), config)
    return vqa_accuracy(results, test_set.annotation)


def test_training_under_ddp_learns_to_answer(vqa_toy_run, untrained_accuracy):
    out, result = vqa_toy_run
    assert 'distributed init (rank 0, world 2' in result.stdout
    assert 'Generate VQA test result' in result.stdout and 'eta' in result.stdout
    lines = read_json_lines(out / 'log.txt')
    assert [list(line) for line in lines] == [['train_lr', 'train_loss', 'epoch']] * EPOCHS
    assert [line['epoch'] for line in lines] == list(range(EPOCHS))
    losses = [float(line['train_loss']) for line in lines]
    assert losses[-1] < 0.6 * losses[0]

    # the original's per-epoch checkpoints, plus the one to resume from and the one before it
    names = {p.name for p in out.iterdir()}
    assert {f'checkpoint_{epoch:02d}.pth' for epoch in range(EPOCHS)} | {
        'checkpoint_last.pth', 'checkpoint_last_previous.pth', 'config.yaml', 'log.txt', 'evaluate.txt', 'result'} == names
    checkpoint = torch.load(out / f'checkpoint_{EPOCHS - 1:02d}.pth', weights_only=True)
    assert set(checkpoint) == {'model', 'optimizer', 'config', 'epoch'} and checkpoint['epoch'] == EPOCHS - 1

    # the server's format: one {question_id, answer} per test question, answers from the list
    annotation = load_test_annotation()
    results = read_results(out / 'result' / 'vqa_result.json')
    assert [r['question_id'] for r in results] == sorted(ann['question_id'] for ann in annotation)
    answer_list = json.loads((REPO / 'datasets/shapes/annotation/answer_list.json').read_text())
    assert all(set(r) == {'question_id', 'answer'} and r['answer'] in answer_list for r in results)

    # learned: far above always giving the most common answer, and above the untrained model
    (line,) = read_json_lines(out / 'evaluate.txt')
    assert line == {'test_vqa_acc': pytest.approx(vqa_accuracy(results, annotation)),
                    'num_questions': len(annotation), 'inference': 'rank'}
    chance = majority_answer_accuracy(annotation)
    assert line['test_vqa_acc'] > chance + 10
    assert line['test_vqa_acc'] > untrained_accuracy + 10
    # ... and it reads the image: no image-blind answering comes close
    blind = image_blind_accuracy(annotation)
    print(f"test VQA accuracy {line['test_vqa_acc']:.1f}; image-blind {blind:.1f}; "
          f"majority answer {chance:.1f}; untrained {untrained_accuracy:.1f}")
    assert line['test_vqa_acc'] > blind + 10
    answers = {r['question_id']: r['answer'] for r in results}
    colour = [answers[ann['question_id']] == ann['answer'][0] for ann in annotation
              if ann['question'].startswith('What color')]
    assert sum(colour) / len(colour) > 0.6  # 4 colours: chance 0.25


def test_one_process_evaluation_matches_the_two_process_run(vqa_toy_run, tmp_path):
    out, _ = vqa_toy_run
    evaluated = tmp_path / 'eval'
    run_script('train_vqa.py', '--config', CONFIG, '--output_dir', evaluated, '--device', 'cpu', '--evaluate',
               f'pretrained={out / f"checkpoint_{EPOCHS - 1:02d}.pth"}')
    assert {p.name for p in evaluated.iterdir()} == {'config.yaml', 'evaluate.txt', 'result'}
    assert read_results(evaluated / 'result' / 'vqa_result.json') == read_results(out / 'result' / 'vqa_result.json')
    assert read_json_lines(evaluated / 'evaluate.txt') == read_json_lines(out / 'evaluate.txt')


def test_generate_inference(vqa_toy_run, tmp_path, monkeypatch):
    out, _ = vqa_toy_run
    monkeypatch.chdir(REPO)
    train_vqa.run(['--config', CONFIG, '--output_dir', str(tmp_path / 'gen'), '--device', 'cpu', '--evaluate',
                   'inference=generate', f'pretrained={out / f"checkpoint_{EPOCHS - 1:02d}.pth"}'])
    annotation = load_test_annotation()
    results = read_results(tmp_path / 'gen' / 'result' / 'vqa_result.json')
    assert [r['question_id'] for r in results] == sorted(ann['question_id'] for ann in annotation)
    assert all(isinstance(r['answer'], str) for r in results)
    (line,) = read_json_lines(tmp_path / 'gen' / 'evaluate.txt')
    assert line['inference'] == 'generate'
    assert line['test_vqa_acc'] == pytest.approx(vqa_accuracy(results, annotation))
    assert line['test_vqa_acc'] > majority_answer_accuracy(annotation)


def test_bad_input_fails_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    base = ['--config', CONFIG, '--output_dir', str(tmp_path / 'out'), '--device', 'cpu']
    with pytest.raises(ValueError, match="inference must be one of rank, generate; got 'ranking'"):
        train_vqa.run(base + ['inference=ranking'])
    with pytest.raises(FileNotFoundError, match='vqa_root.*no_such_folder'):
        train_vqa.run(base + [f'vqa_root={tmp_path / "no_such_folder"}'])
    with pytest.raises(FileNotFoundError, match='pretrained.*missing.pth'):
        train_vqa.run(base + [f'pretrained={tmp_path / "missing.pth"}'])
    with pytest.raises(SystemExit):
        train_vqa.run(base + ['k_tset=8'])
    assert "unknown config key 'k_tset'" in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_official_config_passes_the_key_checks():
    _, config = script_config(train_vqa, 'configs/vqa.yaml')
    assert config['inference'] == 'rank' and config['k_test'] == 128 and config['amp'] == 'none'


# --------------------------------------------------------------------------- the metric

def test_answer_normalisation():
    assert normalize_answer(' Yes.\n') == 'yes'
    assert normalize_answer('Two') == '2'
    assert normalize_answer('the red one') == 'red 1'
    assert normalize_answer('a dog') == 'dog'
    assert normalize_answer('dont') == "don't"
    assert normalize_answer('couldnt\'ve') == "couldn't've"
    assert normalize_answer('3.5') == '3.5'          # a period before a digit stays
    assert normalize_answer('1,000') == '1000'       # digits joined by a comma: marks dropped
    assert normalize_answer('black/white') == 'black white'  # inside a word: a space
    assert normalize_answer('yes !') == 'yes'        # next to a space: dropped


def test_accuracy_over_the_ten_sets_of_nine_humans():
    others = ['blue'] * 10
    for matches, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        humans = ['red'] * matches + others[matches:]
        # leaving out a 'red' annotator leaves matches-1, any other leaves matches
        by_hand = (matches * min(1, (matches - 1) / 3) + (10 - matches) * min(1, matches / 3)) / 10
        assert answer_accuracy('red', humans) == pytest.approx(by_hand)
        assert answer_accuracy('red', humans) == pytest.approx(expected)


def test_accuracy_follows_the_standard_evaluation_quirks():
    # the prediction is normalised; the humans' answers only when they disagree
    assert answer_accuracy('Two', ['2'] * 9 + ['two']) == pytest.approx(1.0)
    assert answer_accuracy('the red', ['red'] * 10) == pytest.approx(1.0)
    assert answer_accuracy('red', ['the red'] * 10) == 0.0  # unanimous humans are taken as written
    assert answer_accuracy('black white', ['black/white'] * 3 + ['black'] * 7) == pytest.approx(0.9)
    assert answer_accuracy('black/white', ['black/white'] * 3 + ['black'] * 7) == pytest.approx(0.9)
    assert answer_accuracy('black/white', ['black/white'] * 10) == 0.0


def test_vqa_accuracy_of_a_result_file():
    annotation = [{'question_id': 1, 'answer': ['red'] * 10}, {'question_id': 2, 'answer': ['2'] * 9 + ['two']},
                  {'question_id': 3, 'question': 'no answers here'}]
    results = [{'question_id': 1, 'answer': 'red'}, {'question_id': 2, 'answer': 'three'}]
    assert vqa_accuracy(results, annotation) == pytest.approx(50.0)
    with pytest.raises(ValueError, match='no answer for question_id 2'):
        vqa_accuracy(results[:1], annotation)
