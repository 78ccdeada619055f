"""ranking.py and train_retrieval's top-k evaluation: the dense matrices and the top-k lists agree,
re-ranking batches several images per forward, k_test 0 is ITC alone, a killed re-ranking
continues, image tokens can live in a memory-mapped file, and memory does not grow with
images x texts."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import ranking
import train_retrieval
from conftest import REPO
from model_builders import build_model

CPU = torch.device('cpu')
COLOURS = ['red', 'green', 'blue', 'yellow', 'purple', 'orange']
SHAPES = ['circle', 'square', 'triangle', 'star']


class Gallery(Dataset):
    """What the retrieval eval sets expose: (image, index) items, .text, .txt2img, .img2txt."""

    def __init__(self, num_images, texts_per_image, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(num_images, 3, 32, 32, generator=generator)
        self.text, self.txt2img, self.img2txt = [], {}, {}
        for image in range(num_images):
            self.img2txt[image] = []
            for _ in range(texts_per_image):
                words = torch.randint(0, 4, (3,), generator=generator).tolist()
                self.txt2img[len(self.text)] = image
                self.img2txt[image].append(len(self.text))
                self.text.append(f'{words[0] + 1} {COLOURS[words[1]]} {SHAPES[words[2]]}s on {COLOURS[image % 6]}')

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], index


@pytest.fixture(scope='module')
def model():
    from models.blip_retrieval import BLIP_Retrieval
    model = build_model(BLIP_Retrieval, 'retrieval')
    with torch.no_grad():  # spread-out weights, so scores have few ties
        torch.manual_seed(0)
        for param in model.parameters():
            if param.dim() > 1:
                param.add_(0.2 * torch.randn_like(param))
    return model


@pytest.fixture(scope='module')
def loader():
    return DataLoader(Gallery(14, 3), batch_size=4, shuffle=False)


@pytest.mark.parametrize('k_test', [10, 14])
def test_topk_lists_are_the_dense_matrices_and_give_the_same_recalls(model, loader, k_test):
    config = {'k_test': k_test}
    i2t_idx, i2t_score, t2i_idx, t2i_score = train_retrieval.evaluation_topk(model, loader, CPU, config)
    num_images, num_texts = len(loader.dataset), len(loader.dataset.text)
    assert i2t_idx.dtype == t2i_idx.dtype == torch.long
    assert i2t_score.dtype == t2i_score.dtype == torch.float32
    assert i2t_idx.shape == (num_images, k_test) and t2i_idx.shape == (num_texts, min(k_test, num_images))
    for scores in (i2t_score, t2i_score):
        assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    for indices in (i2t_idx, t2i_idx):  # candidates are distinct
        assert all(len(set(row)) == len(row) for row in indices.tolist())

    score_i2t, score_t2i = train_retrieval.evaluation(model, loader, CPU, config)
    np.testing.assert_array_equal(score_i2t, ranking.dense(i2t_idx, i2t_score, num_texts).numpy())
    np.testing.assert_array_equal(score_t2i, ranking.dense(t2i_idx, t2i_score, num_images).numpy())
    assert ((score_i2t != -100).sum(axis=1) == k_test).all()

    dense = train_retrieval.itm_eval(score_i2t, score_t2i, loader.dataset.txt2img, loader.dataset.img2txt)
    topk = train_retrieval.itm_eval_topk(i2t_idx, t2i_idx, loader.dataset.txt2img, loader.dataset.img2txt)
    assert topk == dense
    assert 0 < dense['txt_r10'] < 100 or 0 < dense['img_r5'] < 100  # not a trivial ranking


def test_itm_eval_topk_equals_itm_eval_with_tied_scores():
    generator = torch.Generator().manual_seed(3)
    num_images, per_image = 12, 3
    num_texts = num_images * per_image
    img2txt = {i: list(range(i * per_image, (i + 1) * per_image)) for i in range(num_images)}
    txt2img = {t: t // per_image for t in range(num_texts)}
    scores = {'i2t': torch.randint(0, 4, (num_images, num_texts), generator=generator).float(),
              't2i': torch.randint(0, 4, (num_texts, num_images), generator=generator).float()}
    lists, dense = {}, {}
    for key, matrix in scores.items():
        columns = torch.arange(matrix.shape[1]).expand_as(matrix)
        ordered, order = ranking._descending(matrix, columns)
        lists[key] = order[:, :10]
        dense[key] = ranking.dense(order[:, :10], ordered[:, :10], matrix.shape[1]).numpy()
    expected = train_retrieval.itm_eval(dense['i2t'], dense['t2i'], txt2img, img2txt)
    assert train_retrieval.itm_eval_topk(lists['i2t'], lists['t2i'], txt2img, img2txt) == expected
    # with every tie broken the same way, the full matrices rank alike too
    assert train_retrieval.itm_eval(scores['i2t'].numpy(), scores['t2i'].numpy(), txt2img, img2txt) == expected


def test_batched_reranking_gives_the_one_image_per_forward_scores(model, loader):
    results = {size: train_retrieval.evaluation_topk(model, loader, CPU, {'k_test': 5, 'rerank_batch_size': size})
               for size in (1, 7, 256)}
    num_images, num_texts = len(loader.dataset), len(loader.dataset.text)
    for size in (7, 256):
        # compared as matrices: candidates whose scores differ by rounding may swap places
        for (indices, scores, columns), (ref_indices, ref_scores, _) in zip(
                [(results[size][0], results[size][1], num_texts), (results[size][2], results[size][3], num_images)],
                [(results[1][0], results[1][1], num_texts), (results[1][2], results[1][3], num_images)]):
            torch.testing.assert_close(ranking.dense(indices, scores, columns),
                                       ranking.dense(ref_indices, ref_scores, columns), atol=1e-5, rtol=0)


def test_forward_plan_packs_similar_images_and_covers_every_pair():
    pair_images = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 2, 3])
    pair_texts = torch.tensor([5, 1, 2, 0, 3, 4, 6, 7, 8, 9])
    lengths = torch.tensor([4, 9, 3, 5, 6, 2, 8, 7, 1, 5])
    plan = ranking._forward_plan(pair_images, pair_texts, lengths, batch_pairs=4)
    positions = torch.cat([p for forward in plan for _, p in forward])
    assert sorted(positions.tolist()) == list(range(10))
    for forward in plan:
        width = len(forward[0][1])
        assert len(forward) * width <= 4 and all(len(p) <= width for _, p in forward)
        for image, p in forward:
            assert (pair_images[p] == image).all()
            assert (lengths[pair_texts[p]][:-1] <= lengths[pair_texts[p]][1:]).all()  # shortest first


def test_k_test_0_ranks_by_itc_alone(model, loader, monkeypatch):
    monkeypatch.setattr(ranking, '_score_forward', lambda *a, **k: pytest.fail('ITM ran with k_test 0'))
    i2t_idx, i2t_score, t2i_idx, t2i_score = train_retrieval.evaluation_topk(model, loader, CPU, {'k_test': 0})
    _, _, text_embeds = ranking.text_features(model, loader.dataset.text, CPU, {})
    _, image_embeds = ranking.image_features(model, loader, CPU, {})
    sims = image_embeds @ text_embeds.t()
    assert i2t_idx.shape == (len(sims), ranking.ITC_ONLY_K)
    torch.testing.assert_close(i2t_score, sims.topk(ranking.ITC_ONLY_K, dim=1).values)
    torch.testing.assert_close(i2t_score, sims.gather(1, i2t_idx))
    torch.testing.assert_close(t2i_score, sims.t().gather(1, t2i_idx))


def test_shortlist_in_blocks_equals_one_block(monkeypatch):
    generator = torch.Generator().manual_seed(1)
    query = torch.nn.functional.normalize(torch.randn(50, 8, generator=generator), dim=-1)
    gallery = torch.nn.functional.normalize(torch.randn(30, 8, generator=generator), dim=-1)
    whole = ranking.shortlist(query, gallery, 6, 5, 45)
    monkeypatch.setattr(ranking, 'SIM_BLOCK_ELEMENTS', 7 * 30)  # blocks of 7 rows
    blocks = ranking.shortlist(query, gallery, 6, 5, 45)
    # the same candidates; a matmul of 7 rows may round the last bit unlike one of 40 (the CPU
    # kernel depends on the shape), so the similarities agree to float32 precision
    torch.testing.assert_close(blocks[1], whole[1], rtol=0, atol=0)
    torch.testing.assert_close(blocks[0], whole[0], rtol=0, atol=1e-6)
    assert whole[1].shape == (40, 6)


def test_a_killed_reranking_continues_where_it_stopped(model, loader, tmp_path, monkeypatch):
    config = {'k_test': 5, 'rerank_batch_size': 4, 'eval_progress_dir': str(tmp_path / 'progress')}
    reference = train_retrieval.evaluation_topk(model, loader, CPU, {'k_test': 5, 'rerank_batch_size': 4})

    real_forward, calls = ranking._score_forward, []

    def forward_then_die(*args, **kwargs):
        if len(calls) == 6:
            raise KeyboardInterrupt  # killed in the middle
        calls.append(1)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(ranking, 'SAVE_EVERY_S', 0.0)  # progress saved after every forward
    monkeypatch.setattr(ranking, '_score_forward', forward_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_retrieval.evaluation_topk(model, loader, CPU, config)
    (folder,) = (tmp_path / 'progress').iterdir()
    assert len(list(folder.glob('part-*.pt'))) == 6

    calls.clear()
    monkeypatch.setattr(ranking, '_score_forward', lambda *a, **k: calls.append(1) or real_forward(*a, **k))
    resumed = train_retrieval.evaluation_topk(model, loader, CPU, config)
    total = len(calls)
    for got, expected in zip(resumed, reference):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not (tmp_path / 'progress').exists()  # done: the progress is removed

    # progress of other weights is never used: a changed model scores everything afresh
    calls.clear()
    monkeypatch.setattr(ranking, '_score_forward', forward_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_retrieval.evaluation_topk(model, loader, CPU, config)
    calls.clear()
    monkeypatch.setattr(ranking, '_score_forward', lambda *a, **k: calls.append(1) or real_forward(*a, **k))
    with torch.no_grad():
        model.itm_head.bias.add_(1.0)
    try:
        train_retrieval.evaluation_topk(model, loader, CPU, config)
    finally:
        with torch.no_grad():
            model.itm_head.bias.sub_(1.0)
    assert len(calls) == total + 6


def test_image_tokens_in_a_memory_mapped_file(model, loader, tmp_path):
    in_memory = train_retrieval.evaluation_topk(model, loader, CPU, {'k_test': 6})
    on_disk = train_retrieval.evaluation_topk(model, loader, CPU, {'k_test': 6, 'eval_tokens': 'disk',
                                                                   'eval_work_dir': str(tmp_path)})
    torch.testing.assert_close(on_disk[0], in_memory[0], rtol=0, atol=0)
    torch.testing.assert_close(on_disk[1], in_memory[1], rtol=0, atol=1e-2)  # float16 tokens
    assert list(tmp_path.iterdir()) == []  # the file is removed afterwards
    with pytest.raises(ValueError, match="eval_tokens.*'gpu'"):
        train_retrieval.evaluation_topk(model, loader, CPU, {'k_test': 6, 'eval_tokens': 'gpu'})


def test_eval_mode_chooses_by_gallery_size():
    assert not ranking.use_topk({'eval_mode': 'auto'}, 5000, 25000)  # COCO 5k stays dense
    assert ranking.use_topk({'eval_mode': 'auto'}, 100_000, 500_000)
    assert ranking.use_topk({'eval_mode': 'topk'}, 2, 2)
    assert not ranking.use_topk({'eval_mode': 'dense'}, 100_000, 500_000)
    with pytest.raises(ValueError, match="eval_mode.*'sparse'"):
        ranking.use_topk({'eval_mode': 'sparse'}, 2, 2)


MEMORY_CHECK = r'''
import json, resource, sys
import torch
from torch.utils.data import DataLoader, Dataset
sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']
torch.set_num_threads(2)
from model_builders import build_model
from models.blip_retrieval import BLIP_Retrieval
import ranking
import train_retrieval

ranking.SIM_BLOCK_ELEMENTS = 2 ** 22  # 16 MB similarity blocks: the growth left is the top-k lists
NUM_IMAGES, NUM_TEXTS = 40_000, 8_000

class Patterns(Dataset):  # images made on the fly: the gallery itself takes no memory
    text = [f'{i % 7} red squares and {i % 11} blue circles' for i in range(NUM_TEXTS)]
    txt2img = {t: t * 5 for t in range(NUM_TEXTS)}
    img2txt = {i: ([i // 5] if i % 5 == 0 else []) for i in range(NUM_IMAGES)}
    def __len__(self):
        return NUM_IMAGES
    def __getitem__(self, index):
        return torch.full((3, 32, 32), (index % 101) / 101.0) + torch.linspace(0, index % 13, 32), index

model = build_model(BLIP_Retrieval, 'retrieval')
loader = DataLoader(Patterns(), batch_size=500)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
i2t_idx, i2t_score, t2i_idx, t2i_score = train_retrieval.evaluation_topk(model, loader, torch.device('cpu'),
                                                                        {'k_test': 2, 'rerank_batch_size': 512})
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
json.dump({'growth': after - before, 'shapes': [list(i2t_idx.shape), list(t2i_idx.shape)],
           'finite': bool(torch.isfinite(i2t_score).all() and torch.isfinite(t2i_score).all())},
          open(sys.argv[2], 'w'))
'''


def test_topk_memory_does_not_grow_with_images_times_texts(tmp_path):
    """40k images x 8k texts: the dense path would hold 2 x 1.28 GB of scores (and as much of
    similarities); the top-k path's peak grows by far less."""
    script, result_file = tmp_path / 'memory_check.py', tmp_path / 'result.json'
    script.write_text(MEMORY_CHECK)
    result = subprocess.run([sys.executable, str(script), str(REPO), str(result_file)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    measured = json.loads(result_file.read_text())
    assert measured['shapes'] == [[40_000, 2], [8_000, 2]] and measured['finite']
    dense_bytes = 2 * 40_000 * 8_000 * 4
    assert measured['growth'] < 0.1 * dense_bytes, measured  # measured: 0.055 (dense path: 1.04)


def test_bf16_scores_within_tolerance_and_recalls_unchanged(model, loader):
    """amp: bf16 (CPU autocast here, as on a GPU): scores within 0.05 of float32 (measured 0.037
    on scores up to 2.6, bf16's 8-bit mantissa) and the same recalls on this gallery."""
    dense = {amp: train_retrieval.evaluation(model, loader, CPU, {'k_test': 42, 'amp': amp}) for amp in ('none', 'bf16')}
    for full, half in zip(dense['none'], dense['bf16']):
        assert np.abs(full - half).max() < 0.05
        assert np.abs(full - half).max() > 0  # bf16 really ran
    dataset = loader.dataset
    assert (train_retrieval.itm_eval(*dense['bf16'], dataset.txt2img, dataset.img2txt)
            == train_retrieval.itm_eval(*dense['none'], dataset.txt2img, dataset.img2txt))
