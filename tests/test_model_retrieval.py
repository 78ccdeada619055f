"""BLIP_Retrieval against the original's outputs (tests/parity/public/retrieval): features, ITM
logits, the training losses with the original's hard negatives injected, queue states after a
step; plus the negative sampler, the fused momentum update and the factory."""
import pytest
import torch
import torch.nn.functional as F

from model_builders import assert_close, build_model, constructor_kwargs, fixture_dir, load_fixture, zero_dropout
from models.blip_retrieval import BLIP_Retrieval, blip_retrieval, sample_negatives

TASK = "retrieval"


@pytest.fixture(scope="module")
def fixture():
    return load_fixture(TASK, "inputs.pt"), load_fixture(TASK, "outputs.pt")


@pytest.fixture(scope="module")
def model():
    return build_model(BLIP_Retrieval, TASK)


@pytest.fixture(scope="module")
def state_dict():
    return torch.load(fixture_dir(TASK) / "model.pth", weights_only=True)


def reloaded(model, state_dict):
    """The module model, back to the fixture weights and queues (a training step changes them)."""
    model.load_state_dict(state_dict, strict=True)
    return model


def inject_negatives(model, indices, calls=None):
    """Replace select_negatives by the original's recorded draws (first B: an image per text,
    next B: a text per image)."""
    batch = indices.numel() // 2

    def select(weights_t2i, weights_i2t, offset=0):
        if calls is not None:
            calls.append((weights_t2i.clone(), weights_i2t.clone()))
        return indices[:batch].clone(), indices[batch:].clone()

    model.select_negatives = select


@torch.no_grad()
def test_features_and_itm_logits(model, fixture):
    inputs, outputs = fixture
    model.eval()
    image_embeds = model.visual_encoder(inputs["images"])
    assert_close(image_embeds, outputs["image_embeds"], what="image_embeds")
    image_feat = F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)
    assert_close(image_feat, outputs["image_feat"], what="image_feat")

    text = model.tokenizer(inputs["texts"], padding="max_length", truncation=True, max_length=35,
                           return_tensors="pt")
    assert torch.equal(text.input_ids, outputs["text_input_ids"])
    assert torch.equal(text.attention_mask, outputs["text_attention_mask"])
    hidden = model.text_encoder(text.input_ids, attention_mask=text.attention_mask, return_dict=True,
                                mode="text").last_hidden_state
    assert_close(hidden, outputs["text_last_hidden_state"], what="text_last_hidden_state")
    text_feat = F.normalize(model.text_proj(hidden[:, 0, :]), dim=-1)
    assert_close(text_feat, outputs["text_feat"], what="text_feat")
    assert_close(image_feat @ text_feat.t(), outputs["sims"], what="sims")

    itm_ids = text.input_ids.clone()
    itm_ids[:, 0] = model.tokenizer.enc_token_id
    assert torch.equal(itm_ids, outputs["itm_input_ids"])
    num_texts = itm_ids.shape[0]
    logits = []
    for i in range(image_embeds.shape[0]):
        states = image_embeds[i:i + 1].repeat(num_texts, 1, 1)
        out = model.text_encoder(itm_ids, attention_mask=text.attention_mask, encoder_hidden_states=states,
                                 encoder_attention_mask=torch.ones(states.shape[:-1], dtype=torch.long),
                                 return_dict=True)
        logits.append(model.itm_head(out.last_hidden_state[:, 0, :]))
    logits = torch.stack(logits)
    assert_close(logits, outputs["itm_logits"], what="itm_logits")
    assert_close(logits[..., 1], outputs["itm_logit_col1"], what="itm_logit_col1")

    # One image's cross-attention keys/values shared by all texts (what re-ranking uses) gives
    # the same logits.
    for i in range(image_embeds.shape[0]):
        cross_kv = model.text_encoder.compute_cross_kv(image_embeds[i:i + 1])
        out = model.text_encoder(itm_ids, attention_mask=text.attention_mask, cross_kv=cross_kv, return_dict=True)
        assert_close(model.itm_head(out.last_hidden_state[:, 0, :]), outputs["itm_logits"][i],
                     what=f"itm_logits with shared cross_kv, image {i}")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_training_step_with_recorded_negatives(model, state_dict, fixture, mode):
    inputs, outputs = fixture
    model = zero_dropout(reloaded(model, state_dict))
    model.train(mode == "train")
    calls = []
    inject_negatives(model, outputs["train_negative_indices"], calls)
    try:
        loss_ita, loss_itm = model(inputs["train_images"], inputs["train_captions"], alpha=inputs["alpha"],
                                   idx=inputs["train_idx"])
    finally:
        del model.select_negatives
    assert_close(loss_ita, outputs["train_loss_ita"], what="loss_ita")
    assert_close(loss_itm, outputs["train_loss_itm"], what="loss_itm")
    assert_close(model.image_queue, outputs["train_image_queue_after"], what="image_queue")
    assert_close(model.text_queue, outputs["train_text_queue_after"], what="text_queue")
    assert torch.equal(model.idx_queue, outputs["train_idx_queue_after"])
    assert torch.equal(model.ptr_queue, outputs["train_ptr_queue_after"])

    # The sampler saw softmax weights with every same-image pair masked out.
    (weights_t2i, weights_i2t), = calls
    idx = inputs["train_idx"]
    same = idx[:, None] == idx[None, :]
    for weights in (weights_t2i, weights_i2t):
        assert weights.shape == (idx.numel(), idx.numel())
        assert (weights[same] == 0).all() and (weights[~same] > 0).all()


def test_negative_all_rank_single_process_equals_local(state_dict, fixture):
    """At world size 1 gathering across ranks changes nothing."""
    inputs, outputs = fixture
    model = zero_dropout(build_model(BLIP_Retrieval, TASK, negative_all_rank=True)).train()
    inject_negatives(model, outputs["train_negative_indices"])
    loss_ita, loss_itm = model(inputs["train_images"], inputs["train_captions"], alpha=inputs["alpha"],
                               idx=inputs["train_idx"])
    assert_close(loss_ita, outputs["train_loss_ita"], what="loss_ita")
    assert_close(loss_itm, outputs["train_loss_itm"], what="loss_itm")

    # gradients reach the online encoders, never the momentum ones
    (loss_ita + loss_itm).backward()
    assert model.visual_encoder.patch_embed.proj.weight.grad is not None
    assert model.text_encoder.embeddings.word_embeddings.weight.grad is not None
    assert model.temp.grad is not None
    for encoder in (model.visual_encoder_m, model.vision_proj_m, model.text_encoder_m, model.text_proj_m):
        assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())


def test_batch_of_one_image_samples_without_crashing(model, state_dict, fixture):
    """All captions of one image: every ITM weight is masked to zero, which made the original's
    torch.multinomial fail ("invalid multinomial distribution")."""
    inputs, _ = fixture
    model = zero_dropout(reloaded(model, state_dict)).train()
    idx = torch.zeros(4, dtype=torch.long)
    torch.manual_seed(0)
    loss_ita, loss_itm = model(inputs["train_images"], inputs["train_captions"], alpha=inputs["alpha"], idx=idx)
    assert torch.isfinite(loss_ita) and torch.isfinite(loss_itm)


def test_sample_negatives():
    torch.manual_seed(0)
    weights = torch.rand(6, 6)
    weights.fill_diagonal_(0)
    weights[:, 5] = 0  # never drawn
    draws = torch.stack([sample_negatives(weights) for _ in range(200)])
    assert draws.dtype == torch.long and draws.shape == (200, 6)
    assert not (draws == torch.arange(6)).any() and not (draws == 5).any()

    # degenerate rows (all zero, NaN, negative) fall back to a uniform choice among the others
    weights[1] = 0
    weights[2, 0] = float("nan")
    weights[3, 1] = -1.0
    draws = torch.stack([sample_negatives(weights) for _ in range(300)])
    for row in (1, 2, 3):
        assert not (draws[:, row] == row).any()
        assert set(draws[:, row].tolist()) == set(range(6)) - {row}

    # with an offset (negative_all_rank: own pair at rank * B + b) and a single candidate
    draws = torch.stack([sample_negatives(torch.zeros(2, 4), offset=2) for _ in range(100)])
    assert not (draws[:, 0] == 2).any() and not (draws[:, 1] == 3).any()
    assert sample_negatives(torch.zeros(1, 1)).tolist() == [0]

    # multinomial drawn in proportion to the weights
    draws = torch.stack([sample_negatives(torch.tensor([[0.0, 0.9, 0.1]])) for _ in range(2000)])
    assert 0.85 < (draws == 1).float().mean().item() < 0.95


def test_momentum_update_and_copy_params():
    torch.manual_seed(0)
    kwargs = constructor_kwargs(TASK)
    model = BLIP_Retrieval(**kwargs)
    for param, param_m in zip(model.text_encoder.parameters(), model.text_encoder_m.parameters()):
        assert torch.equal(param, param_m) and not param_m.requires_grad
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    pairs = [(p, pm) for online, momentum in model.model_pairs
             for p, pm in zip(online.parameters(), momentum.parameters())]
    expected = [pm * model.momentum + p * (1.0 - model.momentum) for p, pm in pairs]
    model._momentum_update()
    for (_, param_m), value in zip(pairs, expected):
        torch.testing.assert_close(param_m, value, rtol=1e-6, atol=1e-7)
    model.copy_params()
    for param, param_m in pairs:
        assert torch.equal(param, param_m)


def test_queue_size_must_divide_the_batch(fixture):
    inputs, _ = fixture
    model = BLIP_Retrieval(**constructor_kwargs(TASK, queue_size=6))
    with pytest.raises(ValueError, match="queue_size"):
        model(inputs["train_images"], inputs["train_captions"], alpha=0.4, idx=inputs["train_idx"])


def test_factory_loads_checkpoint(tmp_path, state_dict):
    path = tmp_path / "retrieval.pth"
    torch.save({"model": state_dict}, path)
    model = blip_retrieval(pretrained=str(path), **constructor_kwargs(TASK))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value.to(loaded[key].dtype)) for key, value in state_dict.items())
