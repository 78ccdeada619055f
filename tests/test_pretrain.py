"""pretrain.py: the alpha ramp, the toy run (all three losses fall, ITC below its collapsed
value; warm-up and step schedules, the original's checkpoints), resuming with --checkpoint
under two processes (queue, gathers, hard negatives, the next LAION shard), bad input."""
import json
import math

import pytest
import torch

import pretrain
import utils
from conftest import REPO
from engine.config import load_config
from script_runner import one_thread, read_json_lines, run_script, script_config

pytestmark = pytest.mark.slow  # trains toy models or runs whole scripts (make test-fast skips it)

TOY_CONFIG = REPO / 'configs' / 'shapes' / 'pretrain.yaml'
LOSSES = ['loss_ita', 'loss_itm', 'loss_lm']
ITC_DROP = 0.3
EPOCHS = load_config(TOY_CONFIG)['max_epoch']  # of the toy run the tests read


def toy_argv(output_dir, *overrides):
    return ['--config', str(TOY_CONFIG), '--output_dir', str(output_dir), '--device', 'cpu', *overrides]


def test_alpha_ramps_up_over_two_epochs():
    seen = []

    def model(image, caption, alpha):
        seen.append(alpha)
        return torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)

    batch = (torch.zeros(2, 3, 4, 4), ['a', 'b'])
    for epoch, i in [(0, 0), (0, 5), (1, 0), (1, 5), (2, 0), (5, 9)]:
        inputs = pretrain.train_inputs(batch, epoch, i, 10, {'alpha': 0.4}, torch.device('cpu'))
        losses = dict(zip(pretrain.LOSS_NAMES, model(**inputs)))
    assert list(losses) == LOSSES
    assert seen == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])


@pytest.fixture(scope='module')
def toy_run(tmp_path_factory):
    """The toy config from scratch; returns the output folder and the learning-rate schedule
    calls made on the way."""
    out = tmp_path_factory.mktemp('pretrain_toy')
    calls = {'warmup': [], 'step': []}
    real_warmup, real_step = utils.warmup_lr_schedule, utils.step_lr_schedule

    def warmup(optimizer, step, max_step, init_lr, max_lr):
        calls['warmup'].append((step, real_warmup(optimizer, step, max_step, init_lr, max_lr)))

    def step_schedule(optimizer, epoch, init_lr, min_lr, decay_rate):
        calls['step'].append((epoch, real_step(optimizer, epoch, init_lr, min_lr, decay_rate)))

    with pytest.MonkeyPatch.context() as patch, one_thread():
        patch.setattr(utils, 'warmup_lr_schedule', warmup)
        patch.setattr(utils, 'step_lr_schedule', step_schedule)
        pretrain.run(toy_argv(out))
    return out, calls


def test_toy_run_learns_and_writes_the_original_checkpoints(toy_run):
    out, _ = toy_run
    lines = read_json_lines(out / 'log.txt')
    assert [line['epoch'] for line in lines] == list(range(EPOCHS))
    assert list(lines[0]) == ['train_lr'] + [f'train_{k}' for k in LOSSES] + ['epoch']
    # every loss falls: the last epoch's average below the first's
    for key in LOSSES:
        first, last = float(lines[0][f'train_{key}']), float(lines[-1][f'train_{key}'])
        assert last < first, (key, [line[f'train_{key}'] for line in lines])
    assert float(lines[-1]['train_loss_lm']) < 0.8 * float(lines[0]['train_loss_lm'])
    # ITC leaves its collapsed value, ln(number of candidates: the batch and the queue): the
    # image and text features have become distinct enough to pick out their pairs
    config = load_config(TOY_CONFIG)
    collapsed = math.log(config['batch_size'] + config['queue_size'])
    itc = [float(line['train_loss_ita']) for line in lines]
    assert itc[-1] < collapsed - ITC_DROP and itc[-1] < itc[0] - ITC_DROP, (collapsed, itc)

    assert {p.name for p in out.iterdir()} == {f'checkpoint_{e:02d}.pth' for e in range(EPOCHS)} | {
        'checkpoint_last.pth', 'checkpoint_last_previous.pth', 'config.yaml', 'log.txt'}
    checkpoint = torch.load(out / 'checkpoint_01.pth', weights_only=True)
    assert set(checkpoint) == {'model', 'optimizer', 'config', 'epoch'} and checkpoint['epoch'] == 1
    assert {'image_queue', 'text_queue', 'queue_ptr'} <= set(checkpoint['model'])


def test_lr_warms_up_in_the_first_epoch_then_decays_per_epoch(toy_run):
    out, calls = toy_run
    config = load_config(TOY_CONFIG)
    init_lr, min_lr, rate = config['init_lr'], config['min_lr'], config['lr_decay_rate']
    # the step schedule once per epoch, before training
    assert calls['step'] == [(epoch, pytest.approx(max(min_lr, init_lr * rate ** epoch))) for epoch in range(EPOCHS)]
    # then, in epoch 0 only, a linear warm-up at every step from warmup_lr to init_lr
    steps_per_epoch = torch.load(out / 'checkpoint_last.pth', weights_only=True)['global_step'] // EPOCHS
    assert [step for step, _ in calls['warmup']] == list(range(steps_per_epoch))
    warm, length = config['warmup_lr'], config['warmup_steps']
    for step, lr in calls['warmup']:
        assert lr == pytest.approx(min(init_lr, warm + (init_lr - warm) * step / length))
    assert steps_per_epoch > length  # the warm-up ends inside the first epoch


def test_two_processes_resume_an_epoch_checkpoint(toy_run, tmp_path):
    """The original's --checkpoint (an epoch file, no RNG states) continues at the next epoch;
    under DDP the queue takes both ranks' features at every step and ITM draws its hard
    negatives; the epoch reads the next LAION shard."""
    toy, _ = toy_run
    out = tmp_path / 'ddp'
    config = load_config(TOY_CONFIG)
    result = run_script('pretrain.py', *toy_argv(out, '--checkpoint', toy / 'checkpoint_00.pth',
                                                 'max_epoch=2'), nproc=2)
    assert 'distributed init (rank 0, world 2, backend gloo)' in result.stdout
    assert 'continuing at epoch 1' in result.stdout
    assert 'laion_synth_001.json' in result.stdout  # epoch 1's shard (1 % 2 shards)
    (line,) = read_json_lines(out / 'log.txt')
    assert line['epoch'] == 1 and all(float(line[f'train_{k}']) > 0 for k in LOSSES)
    assert line['train_lr'] == f"{config['init_lr'] * config['lr_decay_rate']:.3f}"  # no warm-up after epoch 0
    assert {p.name for p in out.iterdir()} == {'checkpoint_01.pth', 'checkpoint_last.pth', 'config.yaml',
                                               'log.txt'}

    start = torch.load(toy / 'checkpoint_00.pth', weights_only=True)
    last = torch.load(out / 'checkpoint_last.pth', weights_only=True)
    assert len(last['rng_states']) == 2
    # the queue pointer advanced by the global batch (both ranks' features) at every step
    shard = sorted((REPO / config['laion_path']).glob('*.json'))[1]
    samples = len(json.loads((REPO / config['train_file'][0]).read_text())) + len(json.loads(shard.read_text()))
    global_batch = 2 * config['batch_size']
    steps = samples // global_batch  # per-rank shares, last incomplete batch dropped
    assert last['global_step'] == steps
    assert int(last['model']['queue_ptr']) == (int(start['model']['queue_ptr']) + steps * global_batch) % \
        config['queue_size']
    assert not torch.equal(last['model']['image_queue'], start['model']['image_queue'])


def test_bad_input_fails_before_training(tmp_path, capsys):
    out = tmp_path / 'out'
    with pytest.raises(FileNotFoundError, match='train_file.*missing.json'):
        pretrain.run(toy_argv(out, f'train_file=[{tmp_path / "missing.json"}]'))
    with pytest.raises(FileNotFoundError, match='laion_path.*no_such_folder'):
        pretrain.run(toy_argv(out, f'laion_path={tmp_path / "no_such_folder"}'))
    with pytest.raises(FileNotFoundError, match='vit_checkpoint.*deit.pth'):
        pretrain.run(toy_argv(out, f'vit_checkpoint={tmp_path / "deit.pth"}'))
    with pytest.raises(FileNotFoundError, match='missing_resume.pth'):
        pretrain.run(toy_argv(out, '--checkpoint', str(tmp_path / 'missing_resume.pth')))
    with pytest.raises(SystemExit):
        pretrain.run(toy_argv(out, 'warmup_step=5'))
    assert "unknown config key 'warmup_step'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain.run(toy_argv(out, 'loss_weights.itc=1'))
    assert "unknown config key 'loss_weights.itc'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"loss_weights: unknown loss 'itc'"):
        pretrain.run(toy_argv(out, 'loss_weights={itc: 1}'))
    with pytest.raises(ValueError, match='loss_weights must map ita, itm, lm to numbers, got 0.5'):
        pretrain.run(toy_argv(out, 'loss_weights=0.5'))
    with pytest.raises(ValueError, match='loss_weights.lm must be a number >= 0, got -1'):
        pretrain.run(toy_argv(out, 'loss_weights.lm=-1'))
    with pytest.raises(SystemExit, match='no evaluation'):
        pretrain.run(toy_argv(out, '--evaluate'))
    assert not out.exists()


def test_official_config_passes_the_key_checks():
    _, config = script_config(pretrain, 'configs/pretrain.yaml')
    assert config['vit_checkpoint'] == 'default' and config['bert_checkpoint'] == 'bert-base-uncased'
    assert config['laion_path'] == '' and config['med_config'] == 'configs/bert_config.json'
