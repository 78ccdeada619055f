"""Checkpoint loading (local file, bare state dict, http URL with cache, unsafe pickles, position
embedding resize, shape-mismatch drop, NLVR2 branch mapping) and the offline tokenizer."""
import argparse
import functools
import http.server
import os
import threading

import pytest
import torch
from torch import nn

from engine import fileio
from model_builders import constructor_kwargs, fixture_dir
from models import blip
from models.blip import (
    BLIP_Decoder,
    blip_decoder,
    blip_feature_extractor,
    init_tokenizer,
    load_checkpoint,
    require_weights,
)
from models.vit import VisionTransformer, interpolate_pos_embed

TINY_VIT = {"width": 32, "depth": 2, "heads": 2, "patch_size": 16}


@pytest.fixture(scope="module")
def caption_state():
    return torch.load(fixture_dir("caption") / "model.pth", weights_only=True)


def tiny_decoder(image_size=32):
    return BLIP_Decoder(**constructor_kwargs("caption", image_size=image_size))


def assert_loaded(model, state_dict):
    ours = model.state_dict()
    for key, value in state_dict.items():
        assert torch.equal(ours[key], value.float()), key


def test_local_file_with_model_key(tmp_path, caption_state):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": caption_state, "epoch": 3}, path)
    model, msg = load_checkpoint(tiny_decoder(), str(path))
    assert msg.missing_keys == [] and msg.unexpected_keys == [] and msg.dropped_keys == []
    assert_loaded(model, caption_state)


def test_bare_state_dict_and_factory(tmp_path, caption_state):
    path = tmp_path / "bare.pth"
    torch.save(caption_state, path)
    model = blip_decoder(pretrained=str(path), **constructor_kwargs("caption"))
    assert_loaded(model, caption_state)


def test_build_for_inference_takes_the_checkpoint_tensors_themselves(tmp_path, caption_state):
    """Built on the meta device, the weights are the checkpoint's (mapped) tensors: the same
    values as load_checkpoint gives, the decoder's LM head still tied to its word embeddings, the
    same captions; a checkpoint that does not fit exactly is loaded the usual way."""
    path = tmp_path / "ckpt.pth"
    torch.save({"model": caption_state, "optimizer": {"state": {}}}, path)
    kwargs = constructor_kwargs("caption")
    model, msg = blip.build_for_inference(BLIP_Decoder, kwargs, str(path))
    reference, _ = load_checkpoint(BLIP_Decoder(**kwargs), str(path))
    assert msg.missing_keys == [] and msg.dropped_keys == []
    assert_loaded(model, caption_state)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    head = model.text_decoder.cls.predictions.decoder.weight
    assert head is model.text_decoder.bert.embeddings.word_embeddings.weight
    images = torch.randn(2, 3, kwargs["image_size"], kwargs["image_size"])
    with torch.no_grad():
        assert model.eval().generate(images) == reference.eval().generate(images)

    # float16 tensors, or a missing one: loaded into a normally built model (float32, reported)
    half = {k: v.half() if v.is_floating_point() else v for k, v in caption_state.items()}
    torch.save(half, tmp_path / "half.pth")
    model, _ = blip.build_for_inference(BLIP_Decoder, kwargs, str(tmp_path / "half.pth"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    partial = {k: v for k, v in caption_state.items() if not k.startswith("text_decoder.cls")}
    torch.save(partial, tmp_path / "partial.pth")
    model, msg = blip.build_for_inference(BLIP_Decoder, kwargs, str(tmp_path / "partial.pth"))
    assert msg.missing_keys and all(key.startswith("text_decoder.cls") for key in msg.missing_keys)
    assert not any(p.is_meta for p in model.parameters())


def test_factory_refuses_checkpoint_missing_weights(tmp_path, caption_state):
    # the original asserts that decoder / feature-extractor checkpoints are complete; here every
    # factory loads non-strictly and the caller that needs every weight asks (require_weights)
    partial = {k: v for k, v in caption_state.items() if not k.startswith("text_decoder.cls.predictions.transform")}
    path = tmp_path / "partial.pth"
    torch.save({"model": partial}, path)
    with pytest.raises(RuntimeError, match="lacks"):
        require_weights(blip_decoder(pretrained=str(path), **constructor_kwargs("caption")), str(path))


def test_invalid_path():
    with pytest.raises(RuntimeError, match="invalid"):
        load_checkpoint(tiny_decoder(), "/no/such/checkpoint.pth")


def test_position_embedding_resized_and_mismatch_dropped(tmp_path, caption_state, capsys):
    state = dict(caption_state)
    bad_key = "text_decoder.cls.predictions.transform.dense.weight"
    state[bad_key] = torch.zeros(7, 7)  # wrong shape: dropped, the model keeps its own value
    state["not_a_model_key"] = torch.zeros(1)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": state}, path)

    model = tiny_decoder(image_size=48)  # 3x3 patch grid instead of the checkpoint's 2x2
    before = model.state_dict()[bad_key].clone()
    model, msg = load_checkpoint(model, str(path))
    assert msg.dropped_keys == [bad_key]
    assert msg.missing_keys == [bad_key]
    assert msg.unexpected_keys == ["not_a_model_key"]
    assert torch.equal(model.state_dict()[bad_key], before)
    expected = interpolate_pos_embed(caption_state["visual_encoder.pos_embed"].float(), model.visual_encoder)
    assert model.visual_encoder.pos_embed.shape == (1, 10, 32)
    assert torch.allclose(model.visual_encoder.pos_embed, expected)
    printed = capsys.readouterr().out
    assert "load checkpoint from" in printed and bad_key in printed  # the report is printed too


class TwoEncoders(nn.Module):
    """Stands for the momentum models (retrieval, pretraining): a ViT and its momentum copy."""

    def __init__(self, image_size):
        super().__init__()
        self.visual_encoder, _ = blip.create_vit(TINY_VIT, image_size)
        self.visual_encoder_m, _ = blip.create_vit(TINY_VIT, image_size)


def test_momentum_position_embedding_resized(tmp_path):
    source = TwoEncoders(32)
    path = tmp_path / "momentum.pth"
    torch.save({"model": source.state_dict()}, path)
    target, msg = load_checkpoint(TwoEncoders(64), str(path))
    assert not msg.missing_keys and not msg.dropped_keys
    for name in ("visual_encoder", "visual_encoder_m"):
        expected = interpolate_pos_embed(getattr(source, name).pos_embed.detach(), getattr(target, name))
        assert torch.allclose(getattr(target, name).pos_embed, expected), name


def test_unsafe_pickle_needs_opt_in(tmp_path, caption_state, monkeypatch):
    path = tmp_path / "pickled.pth"
    torch.save({"model": caption_state, "args": argparse.Namespace(lr=1e-5)}, path)
    monkeypatch.delenv("BLIP_UNSAFE_LOAD", raising=False)
    with pytest.raises(RuntimeError, match="BLIP_UNSAFE_LOAD=1") as error:
        load_checkpoint(tiny_decoder(), str(path))
    assert str(path) in str(error.value) and "argparse.Namespace" in str(error.value)

    model, msg = load_checkpoint(tiny_decoder(), str(path), allow_unsafe=True)
    assert not msg.missing_keys
    monkeypatch.setenv("BLIP_UNSAFE_LOAD", "1")
    model, msg = load_checkpoint(tiny_decoder(), str(path))
    assert_loaded(model, caption_state)


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests = []

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    _CountingHandler.requests = []
    handler = functools.partial(_CountingHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_url_downloaded_once_into_cache(http_root, tmp_path, caption_state, monkeypatch):
    root, base_url = http_root
    torch.save({"model": caption_state}, root / "model_base_caption.pth")
    cache = tmp_path / "cache"
    monkeypatch.setenv("BLIP_CACHE", str(cache))
    url = f"{base_url}/model_base_caption.pth"

    model, msg = load_checkpoint(tiny_decoder(), url)
    assert not msg.missing_keys and not msg.unexpected_keys
    assert_loaded(model, caption_state)
    assert os.path.isfile(fileio.cached_checkpoint_path(url)) and os.path.dirname(fileio.cached_checkpoint_path(url)) == str(cache)
    assert _CountingHandler.requests == ["/model_base_caption.pth"]

    model = blip_decoder(pretrained=url, **constructor_kwargs("caption"))  # second time: from the cache
    assert_loaded(model, caption_state)
    assert len(_CountingHandler.requests) == 1


def test_two_urls_with_one_file_name_never_share_a_cached_file(http_root, tmp_path, caption_state, monkeypatch):
    root, base_url = http_root
    other = {k: v + 1 if v.is_floating_point() else v for k, v in caption_state.items()}
    for run, state in (("run1", caption_state), ("run2", other)):
        (root / run).mkdir()
        torch.save({"model": state}, root / run / "checkpoint_best.pth")
    monkeypatch.setenv("BLIP_CACHE", str(tmp_path / "cache"))
    first = load_checkpoint(tiny_decoder(), f"{base_url}/run1/checkpoint_best.pth")[0]
    second = load_checkpoint(tiny_decoder(), f"{base_url}/run2/checkpoint_best.pth")[0]
    assert_loaded(first, caption_state)
    assert_loaded(second, other)
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_a_url_serving_an_html_page_is_refused_and_not_cached(http_root, tmp_path, monkeypatch):
    root, base_url = http_root
    (root / "model_base.pth").write_text("<!DOCTYPE html><html><body>Access denied</body></html>")
    monkeypatch.setenv("BLIP_CACHE", str(tmp_path / "cache"))
    url = f"{base_url}/model_base.pth"
    with pytest.raises(blip.CheckpointError, match=r"model_base\.pth \(downloaded\) is not a PyTorch checkpoint: "
                                                   r"it is an HTML/XML page"):
        load_checkpoint(tiny_decoder(), url)
    assert not os.path.exists(fileio.cached_checkpoint_path(url))
    assert not list((tmp_path / "cache").iterdir())  # no partial file left either


@pytest.mark.parametrize("content,message", [
    (b"", "is not a PyTorch checkpoint: it is an empty file"),
    (b"epoch 3 loss 0.52\n", "is not a PyTorch checkpoint: it is a file starting with b'epoch 3"),
    (b"<html><body>404</body></html>", "is not a PyTorch checkpoint: it is an HTML/XML page"),
    ("truncated", "is truncated or corrupt"),
])
def test_files_that_are_not_whole_checkpoints_get_clear_errors(tmp_path, caption_state, content, message):
    path = tmp_path / "model.pth"
    if content == "truncated":
        torch.save({"model": caption_state}, path)
        path.write_bytes(path.read_bytes()[:5000])  # an interrupted copy
    else:
        path.write_bytes(content)
    with pytest.raises(blip.CheckpointError) as error:
        load_checkpoint(tiny_decoder(), str(path))
    assert str(path) in str(error.value) and message in str(error.value)


def test_nlvr_loader_maps_cross_attention_to_both_branches(tmp_path):
    from models.blip_nlvr import BLIP_NLVR, blip_nlvr
    from models.med import BertModel

    # a pretrained-style checkpoint: one ViT and a text encoder with a single cross-attention
    config = constructor_kwargs("nlvr_merge")["med_config"]
    source = nn.Module()
    source.visual_encoder, width = blip.create_vit(TINY_VIT, 32)
    source.text_encoder = BertModel(blip.load_med_config(config, width), add_pooling_layer=False)
    path = tmp_path / "pretrained.pth"  # a local file: the original loader crashed here (no `import os`)
    torch.save({"model": source.state_dict()}, path)

    resized = blip_nlvr(pretrained=str(path), **constructor_kwargs("nlvr_merge", image_size=48))
    assert resized.visual_encoder.pos_embed.shape == (1, 10, 32)

    model, msg = load_checkpoint(BLIP_NLVR(**constructor_kwargs("nlvr_merge")), str(path))
    layers = model.text_encoder.encoder.layer
    for i, layer in enumerate(layers):
        src = source.text_encoder.encoder.layer[i].crossattention
        for branch in (layer.crossattention.self0, layer.crossattention.self1):
            assert torch.equal(branch.key.weight, src.self.key.weight)
            assert torch.equal(branch.query.bias, src.self.query.bias)
        assert torch.equal(layer.crossattention.output.dense0.weight, src.output.dense.weight)
        assert torch.equal(layer.crossattention.output.dense1.bias, src.output.dense.bias)
    # never in a pretrained checkpoint: the classifier and the merge layers (layers 6 and 7)
    assert set(msg.missing_keys) == {"cls_head.0.weight", "cls_head.0.bias", "cls_head.2.weight", "cls_head.2.bias",
                                     *(f"text_encoder.encoder.layer.{i}.crossattention.output.merge_layer.{p}"
                                       for i in (6, 7) for p in ("weight", "bias"))}
    assert "text_encoder.encoder.layer.0.crossattention.self.key.weight" in msg.unexpected_keys
    assert "text_encoder.encoder.layer.0.crossattention.output.dense.weight" in msg.unexpected_keys


def test_feature_extractor_factory(tmp_path):
    state = torch.load(fixture_dir("feature_extractor") / "model.pth", weights_only=True)
    path = tmp_path / "fe.pth"
    torch.save({"model": state}, path)
    model = blip_feature_extractor(pretrained=str(path), **constructor_kwargs("feature_extractor"))
    assert_loaded(model, state)


# ----------------------------------------------------------------------------- tokenizer

def _check_tokenizer(tokenizer):
    assert len(tokenizer) == 30524
    assert tokenizer.bos_token_id == 30522 and tokenizer.convert_tokens_to_ids("[DEC]") == 30522
    assert tokenizer.enc_token_id == 30523 and tokenizer.convert_tokens_to_ids("[ENC]") == 30523
    assert (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id) == (0, 101, 102)
    assert tokenizer("a picture of a dog").input_ids == [101, 1037, 3861, 1997, 1037, 3899, 102]
    ids = [30522, 1037, 3899, 1005, 1055, 5725, 1012, 102, 0]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a dog's tail."


def test_init_tokenizer_offline():
    _check_tokenizer(init_tokenizer())


def test_init_tokenizer_ignores_placeholder_hub_tokenizer(monkeypatch):
    # transformers 5 offline: from_pretrained('bert-base-uncased') returns a 5-token tokenizer
    placeholder = blip.BertTokenizer()
    assert len(placeholder) == 5
    monkeypatch.setattr(blip.BertTokenizer, "from_pretrained", classmethod(lambda cls, *a, **k: placeholder))
    _check_tokenizer(init_tokenizer())


def test_init_tokenizer_when_hub_lookup_fails(monkeypatch):
    def unreachable(cls, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(blip.BertTokenizer, "from_pretrained", classmethod(unreachable))
    _check_tokenizer(init_tokenizer())


def test_create_vit_variants():
    with torch.device("meta"):
        base, width = blip.create_vit("base", 224)
        assert width == 768 and len(base.blocks) == 12
        large, width = blip.create_vit("large", 384, drop_path_rate=0)
        assert width == 1024 and len(large.blocks) == 24 and large.pos_embed.shape == (1, 577, 1024)
        assert large.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)  # the original's ViT-L rule
        tiny, width = blip.create_vit(TINY_VIT, 32)
        assert width == 32 and isinstance(tiny, VisionTransformer) and tiny.pos_embed.shape == (1, 5, 32)
    with pytest.raises(ValueError, match="vit"):
        blip.create_vit("huge", 224)
    with pytest.raises(ValueError, match="heads"):
        blip.create_vit({"width": 32, "depth": 2}, 224)
