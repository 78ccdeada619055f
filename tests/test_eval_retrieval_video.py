"""eval_retrieval_video.py: video features, score matrices against the original's loop,
metrics on hand-made scores, the script on the synthetic clips (one and two processes)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import eval_retrieval_video
from conftest import PARITY, REPO
from engine import cli
from engine.config import load_config
from models.blip_retrieval import blip_retrieval
from script_runner import one_thread, read_json_lines, run_script

TOY_CONFIG = REPO / 'configs' / 'shapes' / 'retrieval_msrvtt.yaml'
TINY_VIT = {'width': 32, 'depth': 2, 'heads': 2, 'patch_size': 16}
RESULT_KEYS = ['txt_r1', 'txt_r5', 'txt_r10', 'txt_r_mean', 'vid_r1', 'vid_r5', 'vid_r10', 'vid_r_mean',
               'vid_mdR', 'r_mean']


class RandomVideos(Dataset):
    """What VideoDataset exposes: (video, index) items, .text, .txt2video, .video2txt."""

    def __init__(self, num_videos=5, num_frames=3, size=32):
        generator = torch.Generator().manual_seed(0)
        self.videos = torch.randn(num_videos, num_frames, 3, size, size, generator=generator)
        colours, shapes = ['red', 'green', 'blue', 'yellow', 'grey'], ['circle', 'square', 'triangle']
        self.text = [f'a {colours[i % 5]} {shapes[i % 3]} moves to the left' for i in range(num_videos)]
        self.txt2video = list(range(num_videos))
        self.video2txt = list(range(num_videos))

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, index):
        return self.videos[index], index


@pytest.fixture(scope='module')
def tiny_model():
    torch.manual_seed(0)
    model = blip_retrieval(image_size=32, vit=TINY_VIT, embed_dim=16, queue_size=16,
                           med_config=str(PARITY / 'public' / 'med_config_tiny.json'))
    # larger random weights than the init's, so scores differ clearly between pairs
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(('text_encoder.', 'visual_encoder.', 'itm_head', 'text_proj', 'vision_proj')) \
                    and param.dim() > 1:
                param.normal_(0, 0.2)
    return model.eval()


@torch.no_grad()
def original_scores(model, dataset, k_test):
    """The original eval_retrieval_video.evaluation, one row at a time, with explicit masks."""
    text = model.tokenizer(dataset.text, padding='max_length', truncation=True, max_length=35,
                           return_tensors='pt')
    text_output = model.text_encoder(text.input_ids, attention_mask=text.attention_mask, mode='text')
    text_embeds = F.normalize(model.text_proj(text_output.last_hidden_state[:, 0, :]))
    text_ids = text.input_ids.clone()
    text_ids[:, 0] = model.tokenizer.enc_token_id
    video = dataset.videos
    B, N, C, H, W = video.shape
    video_feat = model.visual_encoder(video.view(-1, C, H, W))
    video_embed = F.normalize(model.vision_proj(video_feat[:, 0, :]).view(B, N, -1).mean(dim=1), dim=-1)
    video_feat = video_feat.view(B, -1, video_feat.shape[-1])
    sims = video_embed @ text_embeds.t()

    def itm(ids, atts, feats):
        out = model.text_encoder(ids, attention_mask=atts, encoder_hidden_states=feats,
                                 encoder_attention_mask=torch.ones(feats.shape[:-1], dtype=torch.long),
                                 return_dict=True)
        return model.itm_head(out.last_hidden_state[:, 0, :])[:, 1]

    v2t = torch.full((B, len(dataset.text)), -100.0)
    for i, row in enumerate(sims):
        top_sim, top_idx = row.topk(k_test)
        v2t[i, top_idx] = itm(text_ids[top_idx], text.attention_mask[top_idx],
                              video_feat[i].repeat(k_test, 1, 1)) + top_sim
    t2v = torch.full((len(dataset.text), B), -100.0)
    for i, row in enumerate(sims.t()):
        top_sim, top_idx = row.topk(k_test)
        t2v[i, top_idx] = itm(text_ids[i].repeat(k_test, 1), text.attention_mask[i].repeat(k_test, 1),
                              video_feat[top_idx]) + top_sim
    return v2t.numpy(), t2v.numpy(), video_feat, video_embed


@pytest.mark.parametrize('k_test', [2, 5])
def test_scores_equal_the_original_per_row_loop(tiny_model, k_test):
    dataset = RandomVideos()
    loader = DataLoader(dataset, batch_size=2)  # several batches
    expected_v2t, expected_t2v, expected_feats, expected_embeds = original_scores(tiny_model, dataset, k_test)

    feats, embeds = eval_retrieval_video.video_features(tiny_model, loader, torch.device('cpu'), {})
    frame_tokens = tiny_model.visual_encoder.patch_embed.num_patches + 1
    assert feats.shape == (5, 3 * frame_tokens, 32)  # the frames' tokens, concatenated
    torch.testing.assert_close(feats, expected_feats, atol=1e-5, rtol=0)
    torch.testing.assert_close(embeds, expected_embeds, atol=1e-6, rtol=0)

    v2t, t2v = eval_retrieval_video.evaluation(tiny_model, loader, torch.device('cpu'), {'k_test': k_test})
    np.testing.assert_allclose(v2t, expected_v2t, atol=1e-5, rtol=0)
    np.testing.assert_allclose(t2v, expected_t2v, atol=1e-5, rtol=0)
    assert ((v2t != -100).sum(axis=1) == k_test).all() and ((t2v != -100).sum(axis=1) == k_test).all()


def test_itm_eval_on_hand_made_scores():
    # 4 videos, 4 texts (text i describes video i)
    identity = [0, 1, 2, 3]
    scores_v2t = np.array([[0.9, 0.1, 0.2, 0.3],    # own text 1st
                           [0.8, 0.7, 0.1, 0.0],    # 2nd
                           [0.5, 0.6, 0.4, 0.9],    # 4th
                           [0.1, 0.2, 0.3, 0.4]])   # 1st
    scores_t2v = np.array([[0.2, 0.1, 0.0, 0.3],    # own video 2nd
                           [0.1, 0.9, 0.3, 0.2],    # 1st
                           [0.9, 0.8, 0.1, 0.7],    # 4th
                           [0.1, 0.5, 0.2, 0.0]])   # 4th
    result = eval_retrieval_video.itm_eval(scores_v2t, scores_t2v, identity, identity)
    assert list(result) == RESULT_KEYS
    # video -> text ranks 1, 2, 4, 1; text -> video ranks 2, 1, 4, 4
    assert result['txt_r1'] == 50.0 and result['txt_r5'] == 100.0 and result['txt_r10'] == 100.0
    assert result['vid_r1'] == 25.0 and result['vid_r5'] == 100.0 and result['vid_r10'] == 100.0
    assert result['vid_mdR'] == 3.0  # median of 1, 2, 4, 4
    assert result['txt_r_mean'] == pytest.approx(250 / 3) and result['vid_r_mean'] == pytest.approx(225 / 3)
    assert result['r_mean'] == pytest.approx((250 / 3 + 225 / 3) / 2)

    # the definitions, on random scores: recall@K = share of ranks below K, mdR = median rank
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(40, 40))
    result = eval_retrieval_video.itm_eval(scores.T.copy(), scores, list(range(40)), list(range(40)))
    ranks = 1 + np.array([(row > row[i]).sum() for i, row in enumerate(scores)])
    for k in (1, 5, 10):
        assert result[f'vid_r{k}'] == pytest.approx(100 * np.mean(ranks <= k))
    assert result['vid_mdR'] == np.median(ranks)


# --------------------------------------------------------------------------- the script on the clips

@pytest.fixture(scope='module')
def toy_checkpoint(tmp_path_factory):
    """A model of the toy config's shape with fixed random weights (every rank loads the same)."""
    config = load_config(TOY_CONFIG)
    torch.manual_seed(0)
    model = blip_retrieval(image_size=config['image_size'], vit=config['vit'], med_config=config['med_config'],
                           embed_dim=config['embed_dim'], queue_size=config['queue_size'])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(('text_encoder.', 'itm_head', 'text_proj')) and param.dim() > 1:
                param.normal_(0, 0.2)
    path = tmp_path_factory.mktemp('video_ckpt') / 'model.pth'
    torch.save({'model': model.state_dict()}, path)
    return path


def test_script_one_and_two_processes_agree(toy_checkpoint, tmp_path):
    common = ['--config', TOY_CONFIG, '--device', 'cpu', f'pretrained={toy_checkpoint}']
    with one_thread():
        eval_retrieval_video.run([str(a) for a in common] + ['--output_dir', str(tmp_path / 'one')])
    (single,) = read_json_lines(tmp_path / 'one' / 'test_result.txt')
    assert list(single) == RESULT_KEYS
    assert {p.name for p in (tmp_path / 'one').iterdir()} == {'config.yaml', 'test_result.txt'}

    result = run_script('eval_retrieval_video.py', *common, '--output_dir', tmp_path / 'two', nproc=2)
    assert 'Re-ranking' in result.stdout
    (double,) = read_json_lines(tmp_path / 'two' / 'test_result.txt')
    assert double == pytest.approx(single, abs=1e-9)


def test_script_bad_input_fails_before_evaluation(tmp_path, capsys):
    base = ['--config', str(TOY_CONFIG), '--output_dir', str(tmp_path / 'out'), '--device', 'cpu']
    with pytest.raises(FileNotFoundError, match='video_root.*no_such_folder'):
        eval_retrieval_video.run(base + [f'video_root={tmp_path / "no_such_folder"}'])
    with pytest.raises(FileNotFoundError, match='pretrained.*missing.pth'):
        eval_retrieval_video.run(base + [f'pretrained={tmp_path / "missing.pth"}'])
    with pytest.raises(SystemExit):
        eval_retrieval_video.run(base + ['num_frm=4'])
    assert "unknown config key 'num_frm'" in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_official_config_passes_the_key_checks():
    args, config = cli.parse_args_and_config(
        't', str(REPO / 'configs' / 'retrieval_msrvtt.yaml'), 'out', defaults=eval_retrieval_video.TASK_DEFAULTS,
        required=eval_retrieval_video.REQUIRED_KEYS, known=(), argv=[])
    assert config['num_frm_test'] == 8 and config['k_test'] == 128 and config['frm_sampling_strategy'] == 'uniform'
