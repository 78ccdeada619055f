"""Our models against the original BLIP's outputs (tests/parity/public, see its README):
fixture weights loaded strictly, float32, tolerance 1e-5; token ids and strings exactly."""
import pytest
import torch

from model_builders import assert_close, build_model, load_fixture, zero_dropout
from models.blip import BLIP_Base, BLIP_Decoder
from models.vit import VisionTransformer, interpolate_pos_embed

# ----------------------------------------------------------------------------- feature extractor

@pytest.fixture(scope="module")
def feature_extractor():
    return (build_model(BLIP_Base, "feature_extractor"), load_fixture("feature_extractor", "inputs.pt"),
            load_fixture("feature_extractor", "outputs.pt"))


@pytest.mark.parametrize("mode", ["image", "text", "multimodal"])
def test_feature_extractor(feature_extractor, mode):
    model, inputs, outputs = feature_extractor
    for i, caption in enumerate(inputs["captions"]):
        with torch.no_grad():
            features = model(inputs["images"][i:i + 1], caption, mode=mode)
        assert_close(features, outputs[f"{mode}_{i}"], what=f"{mode}_{i}")


def test_feature_extractor_tokens(feature_extractor):
    model, inputs, outputs = feature_extractor
    for i, caption in enumerate(inputs["captions"]):
        assert torch.equal(model.tokenizer(caption, return_tensors="pt").input_ids, outputs[f"input_ids_{i}"])


# ----------------------------------------------------------------------------- captioning

@pytest.fixture(scope="module")
def caption():
    return (build_model(BLIP_Decoder, "caption"), load_fixture("caption", "inputs.pt"),
            load_fixture("caption", "outputs.pt"))


def test_caption_loss_train_and_eval(caption):
    model, inputs, outputs = caption
    assert model.prompt_length == outputs["prompt_length"]
    zero_dropout(model).train()
    try:
        loss = model(inputs["images"], inputs["captions"])
    finally:
        model.eval()
    assert_close(loss, outputs["loss"], what="train-mode loss")
    with torch.no_grad():
        assert_close(model(inputs["images"], inputs["captions"]), outputs["loss_evalmode"], what="eval loss")


def test_caption_decoder_direct(caption):
    model, inputs, outputs = caption
    with torch.no_grad():
        image_embeds = model.visual_encoder(inputs["images"])
        assert_close(image_embeds, outputs["image_embeds"], what="image_embeds")
        text = model.tokenizer(inputs["captions"], padding="longest", truncation=True, max_length=40,
                               return_tensors="pt")
        ids = outputs["decoder_input_ids"]
        assert torch.equal(text.input_ids[:, 1:], ids[:, 1:]) and (ids[:, 0] == 30522).all()
        assert torch.equal(text.attention_mask, outputs["decoder_attention_mask"])
        out = model.text_decoder(ids, attention_mask=outputs["decoder_attention_mask"],
                                 encoder_hidden_states=image_embeds,
                                 encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long),
                                 labels=outputs["decoder_targets"], return_dict=True)
    logits = out.logits
    assert_close(out.loss, outputs["decoder_loss_direct"], what="decoder loss")
    assert_close(logits[:, :, :256], outputs["decoder_logits_first256"], what="logits[:256]")
    assert_close(logits[:, :, 30520:], outputs["decoder_logits_specials"], what="logits[30520:]")
    assert_close(logits.logsumexp(-1), outputs["decoder_logits_logsumexp"], what="logsumexp")
    top5 = logits.topk(5, dim=-1)
    assert_close(top5.values, outputs["decoder_logits_top5_values"], what="top5 values")
    assert torch.equal(top5.indices, outputs["decoder_logits_top5_indices"])
    at_next = logits[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert_close(at_next, outputs["decoder_logits_at_next_input"], what="logits at next input")


@pytest.mark.parametrize("kind", ["beam3", "greedy"])
def test_caption_generate(caption, kind, monkeypatch):
    model, inputs, outputs = caption
    recorded = []
    inner = model.text_decoder.generate

    def spy(*args, **kwargs):  # the token ids of the inner generate call, as the fixture recorded
        result = inner(*args, **kwargs)
        recorded.append(result)
        return result

    monkeypatch.setattr(model.text_decoder, "generate", spy)
    kwargs = inputs["generate_kwargs_beam" if kind == "beam3" else "generate_kwargs_greedy"]
    captions = model.generate(inputs["images"], **kwargs)
    assert recorded[0].tolist() == outputs[f"{kind}_token_ids_list"]
    assert torch.equal(recorded[0], outputs[f"{kind}_token_ids"])
    assert captions == outputs[f"{kind}_captions"]


# ----------------------------------------------------------------------------- position embeddings

def test_interpolate_pos_embed():
    inputs = load_fixture("interpolate_pos_embed", "inputs.pt")
    outputs = load_fixture("interpolate_pos_embed", "outputs.pt")
    for size in (384, 224):
        with torch.device("meta"):  # only the patch grid of the target matters
            target = VisionTransformer(img_size=size, patch_size=16, embed_dim=32, depth=1, num_heads=2)
        resized = interpolate_pos_embed(inputs["pos_embed_224"], target)
        assert_close(resized, outputs[f"pos_embed_224_to_{size}"], what=f"224 -> {size}")


# ----------------------------------------------------------------------------- NLVR2

@pytest.mark.parametrize("task", ["nlvr", "nlvr_merge"])
def test_nlvr(task):
    from models.blip_nlvr import BLIP_NLVR

    model = build_model(BLIP_NLVR, task)
    inputs, outputs = load_fixture(task, "inputs.pt"), load_fixture(task, "outputs.pt")
    if task == "nlvr_merge":  # layers >= 6 merge the two image branches through merge_layer
        assert hasattr(model.text_encoder.encoder.layer[6].crossattention.output, "merge_layer")
    images, texts, targets = inputs["images"], inputs["texts"], inputs["targets"]
    with torch.no_grad():
        assert_close(model.visual_encoder(images), outputs["image_embeds"], what="image_embeds")
        text = model.tokenizer(texts, padding="longest", return_tensors="pt")
        assert torch.equal(text.input_ids[:, 1:], outputs["text_input_ids"][:, 1:])
        assert torch.equal(text.attention_mask, outputs["text_attention_mask"])
        assert_close(model(images, texts, targets=targets, train=False), outputs["logits"], what="logits")
        assert_close(model(images, texts, targets=targets, train=True), outputs["loss_evalmode"], what="eval loss")
    zero_dropout(model).train()
    loss = model(images, texts, targets=targets, train=True)
    assert_close(loss, outputs["loss"], what="train-mode loss")
    loss.backward()  # the twin branches and the head all receive gradients
    assert model.text_encoder.encoder.layer[0].crossattention.self1.key.weight.grad is not None
    assert model.cls_head[0].weight.grad is not None


# ----------------------------------------------------------------------------- ITM

def test_itm():
    from models.blip_itm import BLIP_ITM

    model = build_model(BLIP_ITM, "itm")
    inputs, outputs = load_fixture("itm", "inputs.pt"), load_fixture("itm", "outputs.pt")
    images, captions = inputs["images"], inputs["captions"]
    text = model.tokenizer(captions, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert torch.equal(text.input_ids, outputs["text_input_ids"])  # [CLS] kept first, as the original
    assert torch.equal(text.attention_mask, outputs["text_attention_mask"])
    with torch.no_grad():
        itm_logits = model(images, captions, match_head="itm")
        assert_close(itm_logits, outputs["itm_logits"], what="itm logits")
        assert_close(itm_logits.softmax(dim=1)[:, 1], outputs["itm_score"], what="itm score")
        assert_close(model(images, captions, match_head="itc"), outputs["itc_sim"], what="itc sims")
