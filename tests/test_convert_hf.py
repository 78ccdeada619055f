"""tools/convert_hf.py: our checkpoints to transformers' BLIP classes and back, on the tiny parity
models (no hub). transformers' own classes load the converted folders and compute what ours do
(given the same [ENC] / [DEC] inputs); the round trip is bit-exact; .safetensors checkpoints load
wherever .pth ones do."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from engine.fileio import CheckpointError, save_safetensors
from model_builders import build_model, constructor_kwargs
from models.blip import BLIP_Decoder, read_checkpoint
from models.blip_retrieval import BLIP_Retrieval
from models.blip_vqa import BLIP_VQA
from tools import convert_hf

pytestmark = pytest.mark.slow  # trains toy models or runs whole scripts (make test-fast skips it)

transformers = pytest.importorskip('transformers')
TASKS = {'caption': (BLIP_Decoder, 'caption', transformers.BlipForConditionalGeneration),
         'vqa': (BLIP_VQA, 'vqa', transformers.BlipForQuestionAnswering),
         'retrieval': (BLIP_Retrieval, 'retrieval', transformers.BlipForImageTextRetrieval)}


def spread(model, seed=0):
    """Larger random weights than the fixtures' (so a wrong mapping shows) and no dropout."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope='module')
def tiny_config(tmp_path_factory):
    """A task config with the tiny models' keys (their head counts are not official)."""
    folder = tmp_path_factory.mktemp('convert_config')
    kwargs = constructor_kwargs('caption')
    med = folder / 'med_config.json'
    med.write_text(json.dumps(kwargs['med_config']))
    config = folder / 'tiny.yaml'
    config.write_text(json.dumps({'vit': kwargs['vit'], 'image_size': 32, 'med_config': str(med)}))
    return config


@pytest.fixture(scope='module')
def converted(tmp_path_factory, tiny_config):
    """task -> (our model, its checkpoint, the transformers folder, the transformers model)."""
    root = tmp_path_factory.mktemp('convert')
    result = {}
    for task, (cls, fixture, hf_class) in TASKS.items():
        model = spread(build_model(cls, fixture))
        checkpoint = root / f'{task}.pth'
        torch.save({'model': model.state_dict()}, checkpoint)
        out = convert_hf.to_hf(checkpoint, root / f'{task}_hf', task, tiny_config)
        hf_model = hf_class.from_pretrained(out).eval()
        result[task] = (model, checkpoint, out, hf_model)
    return result


def images(n=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def test_transformers_loads_every_weight(converted, capsys):
    for task, (model, _, out, hf_model) in converted.items():
        names = {p.name for p in out.iterdir()}
        assert {'config.json', 'model.safetensors', 'processor_config.json', 'tokenizer_config.json'} <= names
        config = json.loads((out / 'config.json').read_text())
        assert config['vision_config']['layer_norm_eps'] == 1e-6 and config['label_smoothing'] == 0.1
        assert config['text_config']['bos_token_id'] == 30522 and config['text_config']['sep_token_id'] == 102
        # every tensor of the transformers model came from the checkpoint (none left at its init)
        ours = model.state_dict()
        for key, value in hf_model.state_dict().items():
            source = convert_hf.rename_key(key, to_hf=False)
            assert torch.equal(value, ours[source]), (task, key)
    processor = transformers.BlipProcessor.from_pretrained(converted['caption'][2])
    assert processor.tokenizer.convert_tokens_to_ids(['[DEC]', '[ENC]']) == [30522, 30523]
    assert processor.image_processor.size == {'height': 32, 'width': 32}


@torch.no_grad()
def test_vision_states_and_retrieval_heads_equal_ours(converted):
    model, _, _, hf_model = converted['retrieval']
    pixels = images()
    ours = model.visual_encoder(pixels)
    theirs = hf_model.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)

    text = model.tokenizer(['a red circle', 'two blue squares on green'], padding='longest', return_tensors='pt')
    # ITC: normalised projections of the [CLS] features
    our_text = model.text_encoder(text.input_ids, attention_mask=text.attention_mask, mode='text')
    our_itc = torch.nn.functional.normalize(model.text_proj(our_text.last_hidden_state[:, 0]), dim=-1)
    hf_itc = hf_model(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixels,
                      use_itm_head=False).itm_score  # cosine similarities
    our_image = torch.nn.functional.normalize(model.vision_proj(ours[:, 0]), dim=-1)
    torch.testing.assert_close(hf_itc, our_image @ our_itc.t(), atol=1e-5, rtol=0)
    # ITM with [ENC] first, as the original scores pairs
    ids = text.input_ids.clone()
    ids[:, 0] = model.tokenizer.enc_token_id
    our_itm = model.itm_head(model.text_encoder(ids, attention_mask=text.attention_mask, encoder_hidden_states=ours,
                                                return_dict=True).last_hidden_state[:, 0])
    hf_itm = hf_model(input_ids=ids, attention_mask=text.attention_mask, pixel_values=pixels).itm_score
    torch.testing.assert_close(hf_itm, our_itm, atol=1e-5, rtol=0)


@torch.no_grad()
def test_decoder_logits_and_greedy_captions_equal_ours(converted):
    model, _, _, hf_model = converted['caption']
    pixels = images()
    text = model.tokenizer(['a picture of a red circle', 'a picture of two'], padding='longest', return_tensors='pt')
    ids = text.input_ids.clone()
    ids[:, 0] = model.tokenizer.bos_token_id  # [DEC] first
    image_embeds = model.visual_encoder(pixels)
    ours = model.text_decoder(ids, attention_mask=text.attention_mask, encoder_hidden_states=image_embeds,
                              return_dict=True).logits
    theirs = hf_model(pixel_values=pixels, input_ids=ids, attention_mask=text.attention_mask).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)

    our_captions = model.generate(pixels, sample=False, num_beams=1, max_length=12, min_length=3)
    # transformers' BLIP puts [DEC] first and drops the trailing [SEP] itself
    prompt = model.tokenizer([model.prompt] * 2, return_tensors='pt').input_ids
    generated = hf_model.generate(pixel_values=pixels, input_ids=prompt, max_length=12, min_length=3,
                                  num_beams=1, do_sample=False)
    hf_captions = [c[len(model.prompt):] for c in model.tokenizer.batch_decode(generated, skip_special_tokens=True)]
    assert hf_captions == our_captions


@torch.no_grad()
def test_vqa_question_encoding_equals_ours(converted):
    model, _, _, hf_model = converted['vqa']
    pixels = images()
    question = model.tokenizer(['what colour is it?', 'how many?'], padding='longest', return_tensors='pt')
    ids = question.input_ids.clone()
    ids[:, 0] = model.tokenizer.enc_token_id
    image_embeds = model.visual_encoder(pixels)
    ours = model.text_encoder(ids, attention_mask=question.attention_mask, encoder_hidden_states=image_embeds,
                              return_dict=True).last_hidden_state
    theirs = hf_model.text_encoder(input_ids=ids, attention_mask=question.attention_mask,
                                   encoder_hidden_states=hf_model.vision_model(pixel_values=pixels)[0]).last_hidden_state
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_round_trip_is_bit_exact(converted, tmp_path):
    for task, (model, checkpoint, out, _) in converted.items():
        back = convert_hf.from_hf(out, tmp_path / f'{task}.pth', task)
        original = read_checkpoint(str(checkpoint))
        returned = read_checkpoint(str(back))
        carried = {key for key in original if not key.endswith(('_queue', 'temp')) and '_m.' not in key}
        for key in carried:
            assert torch.equal(returned[key], original[key]), (task, key)
        # what transformers has no place for is rebuilt: momentum copies, fresh queues
        assert set(returned) == set(original), (task, set(original) ^ set(returned))
        if task == 'retrieval':
            assert torch.equal(returned['visual_encoder_m.cls_token'], original['visual_encoder.cls_token'])
            assert returned['image_queue'].shape == (16, convert_hf.QUEUE_SIZE)
        # every factory loads it with nothing missing
        cls, fixture, _ = TASKS[task]
        kwargs = constructor_kwargs(fixture)
        if task == 'retrieval':
            kwargs['queue_size'] = convert_hf.QUEUE_SIZE
        rebuilt = cls(**kwargs)
        _, msg = __import__('models.blip', fromlist=['load_checkpoint']).load_checkpoint(rebuilt, str(back))
        assert not msg.missing_keys and not msg.unexpected_keys and not msg.dropped_keys


def test_safetensors_checkpoints_give_the_pth_outputs(converted, tmp_path):
    from models.blip import load_checkpoint
    model, checkpoint, _, _ = converted['caption']
    path = tmp_path / 'caption.safetensors'
    save_safetensors(model.state_dict(), path)
    rebuilt = BLIP_Decoder(**constructor_kwargs('caption')).eval()
    _, msg = load_checkpoint(rebuilt, str(path))
    assert not msg.missing_keys
    pixels = images()
    with torch.no_grad():
        assert rebuilt.generate(pixels, sample=False, num_beams=2, max_length=10) == \
            model.generate(pixels, sample=False, num_beams=2, max_length=10)

    data = path.read_bytes()
    (tmp_path / 'cut.safetensors').write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='cut.safetensors is a truncated .safetensors'):
        read_checkpoint(str(tmp_path / 'cut.safetensors'))
    # a wrong key set: the zoo's loader refuses a model whose weights are missing
    save_safetensors({'visual_encoder.cls_token': torch.zeros(1, 1, 32)}, tmp_path / 'wrong.safetensors')
    rebuilt = BLIP_Decoder(**constructor_kwargs('caption'))
    _, msg = load_checkpoint(rebuilt, str(tmp_path / 'wrong.safetensors'))
    assert 'text_decoder.bert.embeddings.word_embeddings.weight' in msg.missing_keys


def test_refusals_name_the_reason(converted, tmp_path, tiny_config):
    _, caption_checkpoint, _, _ = converted['caption']
    with pytest.raises(convert_hf.ConversionError, match='no text_encoder: not a vqa checkpoint'):
        convert_hf.to_hf(caption_checkpoint, tmp_path / 'x', 'vqa', tiny_config)
    with pytest.raises(convert_hf.ConversionError, match='NLVR2'):
        convert_hf.to_hf(caption_checkpoint, tmp_path / 'x', 'nlvr', tiny_config)
    with pytest.raises(convert_hf.ConversionError, match='not an official size'):
        convert_hf.to_hf(caption_checkpoint, tmp_path / 'x', 'caption')
    # ViT wider than the text model: transformers' VQA answer decoder cannot take it
    wide = BLIP_VQA(**constructor_kwargs('vqa', vit={'width': 48, 'depth': 1, 'heads': 2, 'patch_size': 16}))
    torch.save({'model': wide.state_dict()}, tmp_path / 'wide.pth')
    with pytest.raises(convert_hf.ConversionError, match='wider than its text model'):
        convert_hf.to_hf(tmp_path / 'wide.pth', tmp_path / 'x', 'vqa', tiny_config)


def test_command_line_contract(converted, tmp_path, tiny_config):
    _, checkpoint, _, _ = converted['retrieval']
    out = tmp_path / 'hf'
    result = subprocess.run([sys.executable, 'tools/convert_hf.py', 'to-hf', str(checkpoint), str(out),
                             '--task', 'retrieval', '--config', str(tiny_config)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'not carried' in result.stderr and 'visual_encoder_m' in result.stderr
    result = subprocess.run([sys.executable, 'tools/convert_hf.py', 'from-hf', str(out), str(tmp_path / 'back.pth'),
                             '--task', 'retrieval'], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / 'back.pth').is_file()
    result = subprocess.run([sys.executable, 'tools/convert_hf.py', 'to-hf', str(tmp_path / 'none.pth'),
                             str(tmp_path / 'x'), '--task', 'caption'], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and 'none.pth' in result.stderr
