"""predict.py on the synthetic PNG/JPEG images: each task gives what the models give when called
directly; inputs as files, folders, globs, lists and URLs; resume; unreadable images reported and
counted; a checkpoint of the wrong model refused. Toy models (configs/shapes) with seeded random
weights: these tests check the plumbing, not what a trained model knows."""
import functools
import http.server
import json
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import predict
from conftest import REPO
from data.user_inputs import read_image
from engine.config import load_config
from models import zoo
from models.blip import BLIP_Decoder
from models.blip_retrieval import BLIP_Retrieval
from models.blip_vqa import BLIP_VQA

CONFIGS = {'caption': 'configs/shapes/caption_coco.yaml', 'vqa': 'configs/shapes/vqa.yaml',
           'itm': 'configs/shapes/retrieval_coco.yaml'}


def _model_keys(kind):
    config = load_config(REPO / CONFIGS[kind])
    return {key: config[key] for key in ('vit', 'image_size', 'med_config', 'embed_dim', 'prompt') if key in config}


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """Seeded random toy checkpoints: a captioner, a VQA model, and a retrieval model (whose
    checkpoint serves matching, as the official retrieval checkpoints do)."""
    folder = tmp_path_factory.mktemp('predict_models')
    paths = {}
    for kind, cls in (('caption', BLIP_Decoder), ('vqa', BLIP_VQA), ('itm', BLIP_Retrieval)):
        keys = _model_keys(kind)
        kwargs = {k: v for k, v in keys.items() if k in ('vit', 'image_size', 'med_config')}
        if kind == 'caption':
            kwargs['prompt'] = keys['prompt']
        if kind == 'itm':
            kwargs.update(embed_dim=keys['embed_dim'], queue_size=32)
        torch.manual_seed(1)
        model = cls(**kwargs)
        if kind == 'caption':  # make [SEP] likely, so captions end at different lengths
            with torch.no_grad():
                model.text_decoder.cls.predictions.bias[102] += 3.0
        paths[kind] = folder / f'{kind}.pth'
        torch.save({'model': model.state_dict()}, paths[kind])
    return paths


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """Six small images in nested folders (PNG and JPEG), distinct colours."""
    root = tmp_path_factory.mktemp('photos')
    (root / 'sub').mkdir()
    paths = []
    for i in range(6):
        folder = root / 'sub' if i >= 4 else root
        path = folder / f'img{i}.{"png" if i % 2 else "jpg"}'
        Image.new('RGB', (40 + 4 * i, 48), (40 * i, 255 - 40 * i, 90)).save(path)
        paths.append(str(path))
    (root / 'notes.md').write_text('not an image')
    return root, paths


def run_predict(capsys, *argv):
    capsys.readouterr()  # what came before is not predict.py's
    code = predict.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def _loaded(kind, checkpoint):
    model, transform = zoo.load_model(str(checkpoint), kind, config=_model_keys(kind))
    return model, transform


def _batch(transform, paths):
    return torch.stack([transform(read_image(p)) for p in paths])


def test_caption_contract_as_a_subprocess(checkpoints, images):
    """The held-back check's command: one JSON line per image with image and caption, on stdout
    only, equal to BLIP_Decoder.generate with the config's settings."""
    _, paths = images
    result = subprocess.run([sys.executable, 'predict.py', 'caption', '--model', str(checkpoints['caption']),
                             '--config', CONFIGS['caption'], '--device', 'cpu', *paths[:3]],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    model, transform = _loaded('caption', checkpoints['caption'])
    config = load_config(REPO / CONFIGS['caption'])
    expected = model.generate(_batch(transform, paths[:3]), num_beams=config['num_beams'],
                              max_length=config['max_length'], min_length=config['min_length'])
    assert lines == [{'image': p, 'caption': c} for p, c in zip(paths[:3], expected)]
    assert len(set(expected)) > 1 or all(expected)  # real captions, not blanks


def test_caption_options_sampling_and_several_captions(checkpoints, images, capsys):
    _, paths = images
    code, lines, _ = run_predict(capsys, 'caption', '--model', checkpoints['caption'], '--config',
                                 CONFIGS['caption'], '--sample', '--seed', 5, '--num_captions', 3, '--top_p', 0.8,
                                 '--max_length', 12, '--batch_size', 8, '--quiet', *paths[:2])
    assert code == 0 and [line['image'] for line in lines] == paths[:2]
    model, transform = _loaded('caption', checkpoints['caption'])
    torch.manual_seed(5)
    expected = model.generate(_batch(transform, paths[:2]), sample=True, top_p=0.8, max_length=12,
                              min_length=5, num_captions=3)
    assert [line['captions'] for line in lines] == [expected[:3], expected[3:]]
    assert [line['caption'] for line in lines] == [expected[0], expected[3]]

    code, lines, err = run_predict(capsys, 'caption', '--model', checkpoints['caption'], '--config',
                                   CONFIGS['caption'], '--beams', 2, '--num_captions', 3, paths[0])
    assert code == 2 and 'num_return_sequences 3 > num_beams 2' in err


def test_vqa_generate_and_rank_and_question_lists(checkpoints, images, capsys, tmp_path):
    _, paths = images
    code, lines, _ = run_predict(capsys, 'vqa', '--model', checkpoints['vqa'], '--config', CONFIGS['vqa'],
                                 '--question', 'what color is the square?', *paths[:3])
    model, transform = _loaded('vqa', checkpoints['vqa'])
    with torch.no_grad():
        expected = model(_batch(transform, paths[:3]), ['what color is the square?'] * 3, train=False,
                         inference='generate')
    assert code == 0
    assert lines == [{'image': p, 'question': 'what color is the square?', 'answer': a}
                     for p, a in zip(paths[:3], expected)]

    answers = tmp_path / 'answers.json'
    answers.write_text(json.dumps(['red', 'green', 'blue', 'yellow', 'two']))
    questions = tmp_path / 'questions.jsonl'
    questions.write_text('\n'.join(json.dumps({'image': p, 'question': q})
                                   for p, q in zip(paths[:2], ['how many shapes?', 'what color?'])))
    code, lines, _ = run_predict(capsys, 'vqa', '--model', checkpoints['vqa'], '--config', CONFIGS['vqa'],
                                 '--answers', answers, '--k_test', 3, questions)
    with torch.no_grad():
        ids = model(_batch(transform, paths[:2]), ['how many shapes?', 'what color?'],
                    ['red', 'green', 'blue', 'yellow', 'two'], train=False, inference='rank', k_test=3)
    assert code == 0
    assert [line['answer'] for line in lines] == [['red', 'green', 'blue', 'yellow', 'two'][i] for i in ids]
    assert [line['question'] for line in lines] == ['how many shapes?', 'what color?']


def test_match_gives_itm_probability_and_itc_cosine(checkpoints, images, capsys):
    _, paths = images
    code, lines, _ = run_predict(capsys, 'match', '--model', checkpoints['itm'], '--config', CONFIGS['itm'],
                                 '--text', 'a red circle', *paths[:3])
    model, transform = _loaded('itm', checkpoints['itm'])
    batch = _batch(transform, paths[:3])
    with torch.no_grad():
        itm = F.softmax(model(batch, ['a red circle'] * 3, match_head='itm'), dim=1)[:, 1]
        itc = model(batch, ['a red circle'] * 3, match_head='itc').diagonal()
    assert code == 0 and [line['text'] for line in lines] == ['a red circle'] * 3
    assert [line['itm'] for line in lines] == pytest.approx(itm.tolist(), abs=1e-5)
    assert [line['itc'] for line in lines] == pytest.approx(itc.tolist(), abs=1e-5)
    assert all(0 <= line['itm'] <= 1 and -1 <= line['itc'] <= 1 for line in lines)


def vit_images_counted(monkeypatch):
    """A list that receives the number of images of every visual encoder forward of the
    models predict.py loads."""
    seen, load = [], zoo.load_model

    def counting_load(*args, **kwargs):
        model, transform = load(*args, **kwargs)
        model.visual_encoder.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
        return model, transform
    monkeypatch.setattr(predict.zoo, 'load_model', counting_load)
    return seen


def test_each_image_goes_through_the_vit_once_and_outputs_keep_their_order(checkpoints, images, capsys,
                                                                             tmp_path, monkeypatch):
    """match and vqa with many texts per image (records of one image together, two images
    interleaved within a slice): one ViT pass per distinct image for the whole run, and every
    line what the model gives for that record alone, in the input order."""
    _, paths = images
    texts = [f'a {colour} {shape}' for colour in ('red', 'green', 'blue', 'pale') for shape in ('circle', 'square')]
    records = ([{'image': paths[0], 'text': t} for t in texts]
               + [{'image': paths[1 + i % 2], 'text': t} for i, t in enumerate(texts[:6])])
    listing = tmp_path / 'pairs.jsonl'
    listing.write_text(''.join(json.dumps(r) + '\n' for r in records))
    seen = vit_images_counted(monkeypatch)
    code, lines, _ = run_predict(capsys, 'match', '--model', checkpoints['itm'], '--config', CONFIGS['itm'],
                                 '--batch_size', 3, '--quiet', listing)
    assert code == 0 and sum(seen) == 3  # was two per record (ITM and ITC), 28
    assert [(line['image'], line['text']) for line in lines] == [(r['image'], r['text']) for r in records]
    model, transform = _loaded('itm', checkpoints['itm'])
    with torch.no_grad():
        pixels = _batch(transform, [r['image'] for r in records])
        itm = F.softmax(model(pixels, [r['text'] for r in records], match_head='itm'), dim=1)[:, 1]
        itc = model(pixels, [r['text'] for r in records], match_head='itc').diagonal()
    assert [line['itm'] for line in lines] == pytest.approx(itm.tolist(), abs=1e-5)
    assert [line['itc'] for line in lines] == pytest.approx(itc.tolist(), abs=1e-5)
    assert len({line['itm'] for line in lines}) > 5  # the texts score differently: order is checked

    questions = ['what colour is it?', 'is it round?', 'how many shapes?']
    records = [{'image': p, 'question': q} for p in paths[:2] for q in questions]
    listing.write_text(''.join(json.dumps(r) + '\n' for r in records))
    seen.clear()
    code, lines, _ = run_predict(capsys, 'vqa', '--model', checkpoints['vqa'], '--config', CONFIGS['vqa'],
                                 '--batch_size', 4, '--quiet', listing)
    assert code == 0 and sum(seen) == 2
    model, transform = _loaded('vqa', checkpoints['vqa'])
    with torch.no_grad():  # the same slices of 4 records as predict.py forms
        expected = [answer for start in (0, 4) for answer in model(
            _batch(transform, [r['image'] for r in records[start:start + 4]]),
            [r['question'] for r in records[start:start + 4]], train=False, inference='generate')]
    assert [(line['image'], line['question'], line['answer']) for line in lines] == [
        (r['image'], r['question'], a) for r, a in zip(records, expected)]


def test_classify_shortlists_by_itc_and_reranks_by_itm(checkpoints, images, capsys, tmp_path):
    import ranking
    _, paths = images
    labels = ['red', 'green', 'blue', 'yellow', 'purple']
    code, lines, _ = run_predict(capsys, 'classify', '--model', checkpoints['itm'], '--config', CONFIGS['itm'],
                                 '--labels', ','.join(labels), '--template', 'a {} circle', '--k', 3, *paths[:4])
    assert code == 0 and len(lines) == 4
    model, transform = _loaded('itm', checkpoints['itm'])
    batch = _batch(transform, paths[:4])
    with torch.no_grad():  # the reference: ITC cosine to every label, ITM p(match) with [ENC] first
        prompts = [f'a {label} circle' for label in labels]
        ids, atts, text_embeds = ranking.text_features(model, prompts, torch.device('cpu'), {}, quiet=True)
        feats = model.visual_encoder(batch)
        sims = F.normalize(model.vision_proj(feats[:, 0]), dim=-1) @ text_embeds.t()
    for row, line in enumerate(lines):
        shortlist = sims[row].topk(3).indices.tolist()
        assert sorted(item['label'] for item in line['labels']) == sorted(labels[i] for i in shortlist)
        with torch.no_grad():
            logits = ranking.score_pairs(model, feats[row:row + 1], ids, atts, torch.zeros(3, dtype=torch.long),
                                         torch.tensor(shortlist), torch.device('cpu'), {}, quiet=True)
        p_match = dict(zip((labels[i] for i in shortlist), logits.softmax(-1)[:, 1].tolist()))
        ranked = [item['itm'] for item in line['labels']]
        assert ranked == sorted(ranked, reverse=True)  # re-ranked by ITM
        for item in line['labels']:
            assert item['itm'] == pytest.approx(p_match[item['label']], abs=1e-5)
            assert item['itc'] == pytest.approx(float(sims[row, labels.index(item['label'])]), abs=1e-5)
        assert sum(item['prob'] for item in line['labels']) == pytest.approx(1, abs=1e-4)
        assert line['label'] == line['labels'][0]['label']
    (tmp_path / 'labels.txt').write_text('dog\n\ncat\n')
    code, lines, _ = run_predict(capsys, 'classify', '--model', checkpoints['itm'], '--config', CONFIGS['itm'],
                                 '--labels', tmp_path / 'labels.txt', paths[0])
    assert code == 0 and {item['label'] for item in lines[0]['labels']} == {'dog', 'cat'}
    code, _, err = run_predict(capsys, 'classify', '--model', checkpoints['itm'], '--config', CONFIGS['itm'],
                               '--labels', 'dog', paths[0])
    assert code == 2 and 'at least 2 class names' in err


def test_features_index_and_search(checkpoints, images, capsys, tmp_path):
    import numpy as np
    from safetensors import safe_open

    import ranking
    root, paths = images
    model, transform = _loaded('itm', checkpoints['itm'])
    with torch.no_grad():
        feats = model.visual_encoder(_batch(transform, paths))
        expected = F.normalize(model.vision_proj(feats[:, 0]), dim=-1)

    out = tmp_path / 'features.safetensors'
    code, _, err = run_predict(capsys, 'features', '--model', checkpoints['itm'], '--config', CONFIGS['itm'],
                               '--texts', 'a red circle,two blue squares', '--out', out, *paths)
    assert code == 0 and '6 images, 2 texts' in err
    with safe_open(str(out), framework='pt') as f:
        rows = json.loads(f.metadata()['images'])
        torch.testing.assert_close(f.get_tensor('image_embeds')[[rows.index(p) for p in paths]], expected,
                                   atol=1e-5, rtol=0)
        assert f.get_tensor('text_embeds').shape == (2, expected.shape[1])
    code, _, _ = run_predict(capsys, 'features', '--model', checkpoints['itm'], '--config', CONFIGS['itm'],
                             '--out', tmp_path / 'features.npy', *paths[:2])
    assert code == 0 and np.load(tmp_path / 'features.npy').shape == (2, expected.shape[1])
    assert json.loads((tmp_path / 'features.rows.json').read_text()) == paths[:2]

    index = tmp_path / 'gallery.safetensors'
    code, _, _ = run_predict(capsys, 'index', '--model', checkpoints['itm'], '--config', CONFIGS['itm'],
                             '--out', index, root)
    assert code == 0
    code, lines, _ = run_predict(capsys, 'search', '--model', checkpoints['itm'], '--config', CONFIGS['itm'],
                                 '--index', index, '--query', 'a red circle', '--k', 3, '--k_test', 4)
    assert code == 0 and [line['rank'] for line in lines] == [1, 2, 3]
    scores = [line['score'] for line in lines]
    assert scores == sorted(scores, reverse=True)
    with torch.no_grad():  # the reference: ITC top 4, then ITM logit + similarity
        ids, atts, query = ranking.text_features(model, ['a red circle'], torch.device('cpu'), {}, quiet=True)
        sims = (expected @ query[0]).tolist()
        top4 = sorted(range(6), key=lambda i: -sims[i])[:4]
        for line in lines:
            i = paths.index(line['image'])
            assert i in top4 and line['itc'] == pytest.approx(sims[i], abs=1e-5)
            logits = ranking.score_pairs(model, feats[i:i + 1], ids, atts, torch.zeros(1, dtype=torch.long),
                                         torch.zeros(1, dtype=torch.long), torch.device('cpu'), {}, quiet=True)
            assert line['score'] == pytest.approx(float(logits[0, 1]) + sims[i], abs=1e-4)
    code, _, err = run_predict(capsys, 'search', '--model', checkpoints['itm'], '--config', CONFIGS['itm'],
                               '--index', tmp_path / 'features.npy', '--query', 'x')
    assert code == 2 and 'not an index' in err


def test_folders_globs_lists_and_urls(checkpoints, images, capsys, tmp_path):
    root, paths = images
    common = ['caption', '--model', checkpoints['caption'], '--config', CONFIGS['caption'], '--quiet']
    code, lines, _ = run_predict(capsys, *common, root)  # recursive, images only, sorted
    assert code == 0 and sorted(line['image'] for line in lines) == sorted(paths)
    code, lines, _ = run_predict(capsys, *common, str(root / '**' / '*.png'))
    assert code == 0 and sorted(line['image'] for line in lines) == sorted(p for p in paths if p.endswith('.png'))
    listing = tmp_path / 'list.txt'
    listing.write_text(f'# my photos\n{paths[0]}\n\n{paths[1]}\n{paths[0]}\n')
    code, lines, _ = run_predict(capsys, *common, listing)
    assert code == 0 and [line['image'] for line in lines] == paths[:2]  # duplicates once

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f'http://127.0.0.1:{server.server_address[1]}/img1.png'
        code, lines, _ = run_predict(capsys, *common, url, paths[1])
    finally:
        server.shutdown()
        server.server_close()
    assert code == 0 and [line['image'] for line in lines] == [url, paths[1]]
    assert lines[0]['caption'] == lines[1]['caption']  # the same image, fetched or read


def test_resume_skips_finished_inputs_and_repairs_a_cut_line(checkpoints, images, capsys, tmp_path):
    _, paths = images
    out = tmp_path / 'captions.jsonl'
    common = ['caption', '--model', checkpoints['caption'], '--config', CONFIGS['caption'], '--out', out, '--quiet']
    assert run_predict(capsys, *common, *paths[:3])[0] == 0
    first = out.read_text().splitlines()
    assert len(first) == 3
    with open(out, 'a') as f:  # a kill in the middle of writing a line
        f.write('{"image": "' + paths[3])
    code, _, err = run_predict(capsys, *common, *paths)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0 and '3 done' in err and '3 already in' in err
    assert out.read_text().splitlines()[:3] == first
    assert [line['image'] for line in lines] == paths[:3] + paths[3:]
    code, _, err = run_predict(capsys, *common, *paths)
    assert code == 0 and 'nothing to do' in err and len(out.read_text().splitlines()) == 6

    csv_out = tmp_path / 'captions.csv'
    for batch in (paths[:2], paths[:4]):
        assert run_predict(capsys, 'caption', '--model', checkpoints['caption'], '--config', CONFIGS['caption'],
                           '--out', csv_out, '--quiet', *batch)[0] == 0
    rows = csv_out.read_text().splitlines()
    assert rows[0] == 'image,caption' and len(rows) == 5


def test_unreadable_images_are_reported_counted_and_the_rest_written(checkpoints, images, capsys, tmp_path):
    _, paths = images
    broken = tmp_path / 'broken.jpg'
    broken.write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
    missing = tmp_path / 'missing.png'
    code, lines, err = run_predict(capsys, 'caption', '--model', checkpoints['caption'], '--config',
                                   CONFIGS['caption'], '--batch_size', 2, paths[0], broken, missing, paths[1])
    assert code == 1
    assert [line['image'] for line in lines] == [paths[0], paths[1]]
    assert f'cannot read image {broken}' in err and f'cannot read image {missing}: no such file' in err
    assert '2 done, 2 failed' in err


def test_sidecar_captions(checkpoints, images, capsys, tmp_path):
    _, paths = images
    image = tmp_path / 'photo.png'
    image.write_bytes(open(paths[1], 'rb').read())
    code, lines, _ = run_predict(capsys, 'caption', '--model', checkpoints['caption'], '--config',
                                 CONFIGS['caption'], '--sidecar', image)
    assert code == 0 and (tmp_path / 'photo.txt').read_text() == lines[0]['caption'] + '\n'


def test_wrong_model_and_bad_arguments_are_refused(checkpoints, images, capsys):
    _, paths = images
    code, lines, err = run_predict(capsys, 'vqa', '--model', checkpoints['caption'], '--config', CONFIGS['vqa'],
                                   '--question', 'what?', paths[0])
    assert code == 2 and not lines
    assert f"checkpoint {checkpoints['caption']} lacks" in err and 'BLIP_VQA' in err and 'not a vqa model' in err
    code, _, err = run_predict(capsys, 'match', '--model', checkpoints['itm'], '--config', CONFIGS['itm'], paths[0])
    assert code == 2 and 'match needs --text TEXT' in err and paths[0] in err
    code, _, err = run_predict(capsys, 'caption', '--model', checkpoints['caption'], paths[0])
    assert code == 2 and 'not a zoo name' in err and '--config' in err
    code, _, err = run_predict(capsys, 'caption', '--model', 'vqa_base', paths[0])
    assert code == 2 and "'vqa_base'" in err and 'caption_base' in err
    with pytest.raises(SystemExit):
        predict.parse_args(['caption', '--model', 'caption_base', '--batch_size', '0', paths[0]])
    assert '--batch_size must be >= 1' in capsys.readouterr().err


def test_label_files_with_a_bom_bad_templates_and_unwritable_outputs(checkpoints, images, capsys, tmp_path):
    _, paths = images
    labels = tmp_path / 'labels.txt'
    labels.write_bytes('red\r\ngreen\r\n'.encode('utf-8-sig'))  # as Windows editors save it
    code, lines, _ = run_predict(capsys, 'classify', '--model', checkpoints['itm'], '--config', CONFIGS['itm'],
                                 '--labels', labels, '--quiet', paths[0])
    assert code == 0 and {item['label'] for item in lines[0]['labels']} == {'red', 'green'}
    for template in ('a {colour}', 'a {} {1}', 'a {} and {}', 'a {'):
        with pytest.raises(SystemExit):
            predict.parse_args(['classify', '--model', 'itm_base', '--labels', 'a,b', '--template', template, paths[0]])
        assert '--template must hold {} once' in capsys.readouterr().err
    blocked = tmp_path / 'not_a_folder'
    blocked.write_text('a file where a folder should be')
    code, lines, err = run_predict(capsys, 'match', '--model', checkpoints['itm'], '--config', CONFIGS['itm'],
                                   '--text', 'a dog', '--quiet', '--out', blocked / 'out.jsonl', paths[0])
    assert code == 1 and not lines and 'Traceback' not in err
    assert 'cannot write the results' in err and 'out.jsonl' in err


def test_the_zoo_lists_every_official_checkpoint(capsys):
    assert predict.main(['models']) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in zoo.ZOO)
    readme = (REPO / 'README.md').read_text()
    files = {entry.file for entry in zoo.ZOO.values()}
    for name, entry in zoo.ZOO.items():
        assert f'`{entry.file}`' in readme, f'{name}: {entry.file} is not in the README table'
        assert entry.url.startswith('https://') and entry.url.endswith(entry.file)
    assert len(files) == 13
    checkpoint, kwargs = zoo.resolve('caption_base', 'caption')
    assert checkpoint.endswith('model_base_caption_capfilt_large.pth')
    assert kwargs == {'image_size': 384, 'vit': 'base', 'med_config': 'configs/med_config.json',
                      'prompt': 'a picture of '}
    assert zoo.resolve('vqa_base', 'vqa')[1]['image_size'] == 480
