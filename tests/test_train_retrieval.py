"""train_retrieval.evaluation / itm_eval against the original's outputs (parity fixture 'retrieval')."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import train_retrieval
import utils
from conftest import PARITY, REPO
from engine import training
from engine.fileio import CheckpointError
from script_runner import script_config

FIXTURE = PARITY / 'public' / 'retrieval'
TINY_VIT = {'width': 32, 'depth': 2, 'heads': 2, 'patch_size': 16}


class FixtureRetrievalSet(Dataset):
    """What the original's retrieval eval sets expose: (image, index) items, .text, .image,
    .txt2img, .img2txt."""

    def __init__(self, images, texts, txt2img, img2txt):
        self.images = images
        self.text = list(texts)
        self.image = [f'image_{i}.jpg' for i in range(len(images))]
        self.txt2img = dict(enumerate(txt2img))
        self.img2txt = dict(enumerate(img2txt))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], index


@pytest.fixture(scope='module')
def fixture_model():
    from models.blip_retrieval import BLIP_Retrieval
    kwargs = json.loads((FIXTURE / 'config.json').read_text())['constructor_kwargs']
    kwargs.update(vit=TINY_VIT, med_config=str(PARITY / 'public' / 'med_config_tiny.json'))
    model = BLIP_Retrieval(**kwargs)
    model.load_state_dict(torch.load(FIXTURE / 'model.pth', map_location='cpu', weights_only=True), strict=True)
    return model.eval()


@pytest.fixture(scope='module')
def fixture_io():
    inputs = torch.load(FIXTURE / 'inputs.pt', weights_only=False)
    outputs = torch.load(FIXTURE / 'outputs.pt', weights_only=False)
    dataset = FixtureRetrievalSet(inputs['images'], inputs['texts'], inputs['txt2img'], inputs['img2txt'])
    loader = DataLoader(dataset, batch_size=inputs['eval_loader_batch_size'], shuffle=False)
    return inputs, outputs, loader


def test_evaluation_matches_the_original_score_matrices(fixture_model, fixture_io):
    inputs, outputs, loader = fixture_io
    score_i2t, score_t2i = train_retrieval.evaluation(fixture_model, loader, torch.device('cpu'),
                                                      {'k_test': inputs['k_test']})
    assert isinstance(score_i2t, np.ndarray) and isinstance(score_t2i, np.ndarray)
    expected_i2t = np.asarray(outputs['score_matrix_i2t'])
    expected_t2i = np.asarray(outputs['score_matrix_t2i'])
    assert score_i2t.shape == expected_i2t.shape and score_t2i.shape == expected_t2i.shape
    np.testing.assert_allclose(score_i2t, expected_i2t, atol=1e-5, rtol=0)
    np.testing.assert_allclose(score_t2i, expected_t2i, atol=1e-5, rtol=0)
    # exactly k_test re-scored candidates per row, -100 elsewhere
    assert ((score_i2t != -100).sum(axis=1) == inputs['k_test']).all()
    assert ((score_t2i != -100).sum(axis=1) == inputs['k_test']).all()

    result = train_retrieval.itm_eval(score_i2t, score_t2i, loader.dataset.txt2img, loader.dataset.img2txt)
    assert list(result) == list(outputs['itm_eval'])
    for key in ('txt_r1', 'img_r1'):  # r5/r10 depend on numpy's order of tied -100 fillers
        assert result[key] == pytest.approx(outputs['itm_eval'][key])


@pytest.mark.parametrize('world_size', [2, 3])
def test_work_split_by_rank_sums_to_the_one_process_lists(fixture_model, fixture_io, monkeypatch, world_size):
    inputs, outputs, loader = fixture_io
    config = {'k_test': 3}
    single = train_retrieval.evaluation_topk(fixture_model, loader, torch.device('cpu'), config)

    reduced = [torch.zeros_like(part) for part in single]
    monkeypatch.setattr(utils, 'get_world_size', lambda: world_size)
    monkeypatch.setattr(utils, 'barrier', lambda: None)
    monkeypatch.setattr(utils, 'all_reduce_sum', lambda tensor: tensor)  # summed below instead
    for rank in range(world_size):
        monkeypatch.setattr(utils, 'get_rank', lambda rank=rank: rank)
        for total, part in zip(reduced, train_retrieval.evaluation_topk(fixture_model, loader, torch.device('cpu'),
                                                                        config)):
            total += part
    for total, expected in zip(reduced, single):
        torch.testing.assert_close(total, expected, atol=1e-6, rtol=0)


def test_k_test_larger_than_the_candidates(fixture_model, fixture_io):
    inputs, outputs, loader = fixture_io
    score_i2t, score_t2i = train_retrieval.evaluation(fixture_model, loader, torch.device('cpu'), {'k_test': 100})
    assert (score_i2t != -100).all() and (score_t2i != -100).all()
    sims = np.asarray(outputs['sims'])
    np.testing.assert_allclose(score_i2t - sims, np.asarray(outputs['itm_logit_col1']), atol=1e-5)
    np.testing.assert_allclose(score_t2i - sims.T, np.asarray(outputs['itm_logit_col1']).T, atol=1e-5)


def test_itm_eval_on_a_hand_made_example():
    # 2 images, 4 texts (texts 0, 1 of image 0; texts 2, 3 of image 1)
    img2txt = {0: [0, 1], 1: [2, 3]}
    txt2img = {0: 0, 1: 0, 2: 1, 3: 1}
    scores_i2t = np.array([[0.1, 0.9, 0.3, 0.2],     # best caption ranked 1st
                           [0.8, 0.1, 0.7, 0.0]])    # best own caption (2) ranked 2nd
    scores_t2i = np.array([[0.9, 0.1], [0.2, 0.3], [0.1, 0.5], [0.6, 0.4]])  # texts 1 and 3 wrong
    result = train_retrieval.itm_eval(scores_i2t, scores_t2i, txt2img, img2txt)
    assert result['txt_r1'] == 50.0 and result['txt_r5'] == 100.0 and result['txt_r10'] == 100.0
    assert result['img_r1'] == 50.0 and result['img_r5'] == 100.0
    assert result['txt_r_mean'] == pytest.approx(250 / 3) and result['img_r_mean'] == pytest.approx(250 / 3)
    assert result['r_mean'] == pytest.approx(250 / 3)


# --------------------------------------------------------------------------- the script on toy data

@pytest.fixture(scope='module')
def toy_config(tmp_path_factory):
    from data.synthetic import make_synthetic
    root = tmp_path_factory.mktemp('retrieval_toy')
    paths = make_synthetic(root / 'data', num_images=16, num_videos=1, image_size=32)
    config = {
        'image_root': paths['image_root'], 'ann_root': paths['ann_root'], 'dataset': 'coco',
        'pretrained': '', 'vit': TINY_VIT, 'batch_size_train': 8, 'batch_size_test': 8,
        'vit_grad_ckpt': False, 'vit_ckpt_layer': 0, 'init_lr': 1e-4, 'image_size': 32,
        'queue_size': 16, 'alpha': 0.4, 'k_test': 4, 'negative_all_rank': False,
        'weight_decay': 0.05, 'min_lr': 0, 'max_epoch': 1,
        'med_config': str(PARITY / 'public' / 'med_config_tiny.json'), 'embed_dim': 16,
        'num_workers': 0,
    }
    path = root / 'retrieval_toy.yaml'
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


RECALL_KEYS = ['txt_r1', 'txt_r5', 'txt_r10', 'txt_r_mean', 'img_r1', 'img_r5', 'img_r10',
               'img_r_mean', 'r_mean']


def test_script_trains_resumes_and_evaluates(toy_config, tmp_path):
    out = tmp_path / 'out'
    # one epoch from the command line, as a user runs it
    result = subprocess.run([sys.executable, 'train_retrieval.py', '--config', str(toy_config),
                             '--output_dir', str(out), '--device', 'cpu'],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'Re-ranking' in result.stdout and 'eta' in result.stdout
    assert {p.name for p in out.iterdir()} == {'checkpoint_best.pth', 'checkpoint_last.pth',
                                               'checkpoint_last_evaluated.pth', 'config.yaml', 'log.txt'}
    (line,) = [json.loads(x) for x in (out / 'log.txt').read_text().splitlines()]
    assert list(line) == (['train_lr', 'train_loss_itm', 'train_loss_ita']
                          + [f'val_{k}' for k in RECALL_KEYS] + [f'test_{k}' for k in RECALL_KEYS]
                          + ['epoch', 'best_epoch'])
    assert line['epoch'] == 0 and line['best_epoch'] == 0
    best = torch.load(out / 'checkpoint_best.pth', weights_only=True)
    assert set(best) == {'model', 'optimizer', 'config', 'epoch'} and best['epoch'] == 0
    last = torch.load(out / 'checkpoint_last.pth', weights_only=True)
    assert 'text_queue' in last['model'] and 'idx_queue' in last['model']
    steps_per_epoch = last['global_step']
    assert steps_per_epoch > 0

    # a longer run in the same folder continues after epoch 0
    train_retrieval.run(['--config', str(toy_config), '--output_dir', str(out), '--device', 'cpu',
                         'max_epoch=2'])
    lines = [json.loads(x) for x in (out / 'log.txt').read_text().splitlines()]
    assert [x['epoch'] for x in lines] == [0, 1]
    last = torch.load(out / 'checkpoint_last.pth', weights_only=True)
    assert last['epoch'] == 1 and last['global_step'] == 2 * steps_per_epoch

    # --evaluate from the best checkpoint writes evaluate.txt
    train_retrieval.run(['--config', str(toy_config), '--output_dir', str(tmp_path / 'eval'), '--device', 'cpu',
                         '--evaluate', f'pretrained={out / "checkpoint_best.pth"}'])
    assert {p.name for p in (tmp_path / 'eval').iterdir()} == {'config.yaml', 'evaluate.txt'}
    (line,) = [json.loads(x) for x in (tmp_path / 'eval' / 'evaluate.txt').read_text().splitlines()]
    assert list(line) == [f'val_{k}' for k in RECALL_KEYS] + [f'test_{k}' for k in RECALL_KEYS]


def test_script_bad_input_fails_before_training(toy_config, tmp_path, capsys):
    base = ['--config', str(toy_config), '--output_dir', str(tmp_path / 'out'), '--device', 'cpu']
    with pytest.raises(FileNotFoundError, match='image_root.*no_such_folder'):
        train_retrieval.run(base + [f'image_root={tmp_path / "no_such_folder"}'])
    with pytest.raises(FileNotFoundError, match='pretrained.*missing.pth'):
        train_retrieval.run(base + [f'pretrained={tmp_path / "missing.pth"}'])
    with pytest.raises(SystemExit):
        train_retrieval.run(base + ['k_tset=4'])
    assert "unknown config key 'k_tset'" in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_evaluating_a_checkpoint_of_another_task_is_refused(toy_config, tmp_path):
    """A captioning checkpoint lacks the ITM head and the text encoder: --evaluate must not
    score a model whose weights are still random."""
    from models.blip import BLIP_Decoder

    config = json.loads(toy_config.read_text())
    captioner = BLIP_Decoder(med_config=config['med_config'], image_size=32, vit=TINY_VIT)
    checkpoint = tmp_path / 'caption_best.pth'
    torch.save({'model': captioner.state_dict()}, checkpoint)
    with pytest.raises(CheckpointError) as error:
        train_retrieval.run(['--config', str(toy_config), '--output_dir', str(tmp_path / 'eval'), '--device', 'cpu',
                             '--evaluate', f'pretrained={checkpoint}'])
    message = str(error.value)
    assert str(checkpoint) in message and 'BLIP_Retrieval' in message and 'itm_head' in message
    assert not (tmp_path / 'eval' / 'evaluate.txt').exists()


def test_text_grad_checkpointing_keeps_the_gradients(fixture_model, monkeypatch):
    import copy

    import models.med

    calls = []
    real_checkpoint = models.med.checkpoint
    monkeypatch.setattr(models.med, 'checkpoint', lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    plain, checkpointed = copy.deepcopy(fixture_model), copy.deepcopy(fixture_model)
    assert training.set_text_grad_checkpointing(checkpointed) == 2  # text_encoder and text_encoder_m
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    captions = ['a red circle', 'two blue squares', 'a green triangle', 'three yellow circles']
    grads = []
    for model in (plain, checkpointed):
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        torch.manual_seed(1)
        loss_ita, loss_itm = model(images, captions, alpha=0.4, idx=torch.arange(4))
        (loss_ita + loss_itm).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert calls  # the text layers really were checkpointed
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize('name', ['retrieval_coco', 'retrieval_flickr'])
def test_official_configs_pass_the_key_checks(name):
    _, config = script_config(train_retrieval, f'configs/{name}.yaml')
    assert config['amp'] == 'none' and config['accum_steps'] == 1 and config['embed_dim'] == 256
    assert config['k_test'] == (256 if name == 'retrieval_coco' else 128)


def test_best_weights_as_safetensors_evaluate_like_the_pth(toy_config, tmp_path):
    out = tmp_path / 'train'
    train_retrieval.run(['--config', str(toy_config), '--output_dir', str(out), '--device', 'cpu',
                         'save_safetensors=true'])
    assert (out / 'checkpoint_best.safetensors').is_file()
    results = {}
    for name in ('checkpoint_best.pth', 'checkpoint_best.safetensors'):
        evaluation_dir = tmp_path / name
        train_retrieval.run(['--config', str(toy_config), '--output_dir', str(evaluation_dir), '--device', 'cpu',
                             '--evaluate', f'pretrained={out / name}'])
        results[name] = (evaluation_dir / 'evaluate.txt').read_text()
    assert results['checkpoint_best.safetensors'] == results['checkpoint_best.pth']


def test_a_missing_val_image_stops_the_run_before_training(toy_config, tmp_path):
    from data.synthetic import make_synthetic
    from data.utils import DataError
    paths = make_synthetic(tmp_path / 'data', num_images=16, num_videos=1, image_size=32)
    val = json.loads((tmp_path / 'data' / 'annotation' / 'coco_karpathy_val.json').read_text())
    missing = tmp_path / 'data' / 'images' / val[1]['image']
    missing.unlink()
    test = json.loads((tmp_path / 'data' / 'annotation' / 'coco_karpathy_test.json').read_text())
    broken = tmp_path / 'data' / 'images' / test[0]['image']
    broken.write_bytes(b'not an image')
    out = tmp_path / 'out'
    args = ['--config', str(toy_config), '--output_dir', str(out), '--device', 'cpu',
            f"image_root={paths['image_root']}", f"ann_root={paths['ann_root']}"]
    with pytest.raises(DataError) as error:
        train_retrieval.run(args)
    message = str(error.value)
    assert '2 of' in message and str(missing) in message and str(broken) in message
    assert 'entry 1 of' in message and 'coco_karpathy_val.json' in message and 'coco_karpathy_test.json' in message
    assert not (out / 'log.txt').exists() and not (out / 'checkpoint_last.pth').exists()


def test_evaluation_needs_only_the_val_and_test_images(toy_config, tmp_path):
    # (reproduce.py evaluates COCO from val2014 alone; train2014 need not be there)
    from data.synthetic import make_synthetic
    from data.utils import DataError
    paths = make_synthetic(tmp_path / 'data', num_images=16, num_videos=1, image_size=32)
    train = json.loads((tmp_path / 'data' / 'annotation' / 'coco_karpathy_train.json').read_text())
    missing = tmp_path / 'data' / 'images' / train[0]['image']
    missing.unlink()
    args = ['--config', str(toy_config), '--device', 'cpu', f"image_root={paths['image_root']}",
            f"ann_root={paths['ann_root']}"]
    train_retrieval.run(args + ['--output_dir', str(tmp_path / 'eval'), '--evaluate'])
    assert (tmp_path / 'eval' / 'evaluate.txt').exists()
    with pytest.raises(DataError, match=f'(?s)1 of .*{re.escape(str(missing))}'):
        train_retrieval.run(args + ['--output_dir', str(tmp_path / 'train')])
