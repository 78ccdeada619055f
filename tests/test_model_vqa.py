"""BLIP_VQA against the original's outputs (tests/parity/public/vqa): training loss, question
states, ranked answer ids, generated answers token for token; answer ranking with shared
cross-attention keys/values against the original's repeat-the-states computation."""
import pytest
import torch
import torch.nn.functional as F

from model_builders import assert_close, build_model, constructor_kwargs, fixture_dir, load_fixture, zero_dropout
from models.blip_vqa import BLIP_VQA, blip_vqa
from models.med import smoothed_sequence_loss

TASK = "vqa"


@pytest.fixture(scope="module")
def fixture():
    return load_fixture(TASK, "inputs.pt"), load_fixture(TASK, "outputs.pt")


@pytest.fixture(scope="module")
def model():
    return build_model(BLIP_VQA, TASK)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_train_loss(model, fixture, mode):
    inputs, outputs = fixture
    zero_dropout(model).train(mode == "train")
    loss = model(inputs["images"], inputs["questions"], inputs["answers"], n=inputs["n"],
                 weights=inputs["weights"], train=True)
    model.eval()
    assert_close(loss, outputs["train_loss" if mode == "train" else "train_loss_evalmode"], what="train_loss")
    if mode == "train":
        loss.backward()
        assert model.visual_encoder.cls_token.grad is not None
        assert model.text_decoder.cls.predictions.bias.grad is not None
        model.zero_grad(set_to_none=True)


@torch.no_grad()
def test_question_states(model, fixture):
    inputs, outputs = fixture
    image_embeds = model.visual_encoder(inputs["images"])
    assert_close(image_embeds, outputs["image_embeds"], what="image_embeds")
    question = model.tokenizer(inputs["questions"], padding="longest", truncation=True, max_length=35,
                               return_tensors="pt")
    question.input_ids[:, 0] = model.tokenizer.enc_token_id
    assert torch.equal(question.input_ids, outputs["question_input_ids"])
    assert torch.equal(question.attention_mask, outputs["question_attention_mask"])
    states = model.text_encoder(question.input_ids, attention_mask=question.attention_mask,
                                encoder_hidden_states=image_embeds,
                                encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
                                return_dict=True).last_hidden_state
    assert_close(states, outputs["question_states"], what="question_states")

    answer = model.tokenizer(inputs["answers"], padding="longest", return_tensors="pt")
    answer.input_ids[:, 0] = model.tokenizer.bos_token_id
    assert torch.equal(answer.input_ids, outputs["answer_input_ids"])
    assert torch.equal(answer.attention_mask, outputs["answer_attention_mask"])


@torch.no_grad()
def test_rank(model, fixture):
    inputs, outputs = fixture
    candidates = model.tokenize_candidates(inputs["answer_list"])
    assert torch.equal(candidates.input_ids, outputs["rank_candidate_input_ids"])
    assert torch.equal(candidates.attention_mask, outputs["rank_candidate_attention_mask"])
    ids = model(inputs["images"], inputs["questions"], candidates, train=False, inference="rank",
                k_test=inputs["k_test"])
    assert ids.dtype == torch.long and torch.equal(ids, outputs["rank_answer_ids"])
    assert [inputs["answer_list"][i] for i in ids] == outputs["rank_answers"]
    # plain strings are accepted too
    ids_from_strings = model(inputs["images"], inputs["questions"], inputs["answer_list"], train=False,
                             inference="rank", k_test=inputs["k_test"])
    assert torch.equal(ids_from_strings, ids)


def reference_scores(model, question_states, question_atts, answer_ids, answer_atts, k):
    """The original's rank_answer: question states repeated k times, loss through
    CrossEntropyLoss(reduction='none', label_smoothing=0.1) as torch 1.10 computed it."""
    num_ques = question_states.size(0)
    start = model.text_decoder(answer_ids[0, 0].repeat(num_ques, 1), encoder_hidden_states=question_states,
                               encoder_attention_mask=question_atts, return_dict=True)
    probs = F.softmax(start.logits[:, 0, :], dim=1).index_select(1, answer_ids[:, 1])
    _, topk_ids = probs.topk(k, dim=1)
    input_ids = torch.cat([answer_ids.index_select(0, row) for row in topk_ids])
    input_atts = torch.cat([answer_atts.index_select(0, row) for row in topk_ids])
    targets = input_ids.masked_fill(input_ids == model.tokenizer.pad_token_id, -100)
    logits = model.text_decoder(input_ids, attention_mask=input_atts,
                                encoder_hidden_states=question_states.repeat_interleave(k, 0),
                                encoder_attention_mask=question_atts.repeat_interleave(k, 0),
                                return_dict=True).logits
    shifted, labels = logits[:, :-1, :].reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1)
    log_probs = shifted.log_softmax(-1)
    nll = F.nll_loss(log_probs, labels, reduction="none")  # 0 where ignored
    smooth = -log_probs.sum(-1)  # torch 1.10: not zeroed where ignored
    loss = (0.9 * nll + 0.1 / log_probs.shape[-1] * smooth).view(len(input_ids), -1).sum(1)
    return topk_ids, -loss.view(num_ques, k)


@torch.no_grad()
def test_rank_matches_repeated_states_reference(model, fixture):
    """Shared cross-attention keys/values and the memory-light loss give the original's scores,
    here with more candidates and a k that keeps several of them."""
    inputs, _ = fixture
    answer_list = inputs["answer_list"] + ["a red car", "two people", "green", "it is raining outside today"]
    candidates = model.tokenize_candidates(answer_list)
    image_embeds = model.visual_encoder(inputs["images"])
    question = model.tokenizer(inputs["questions"], padding="longest", return_tensors="pt")
    question.input_ids[:, 0] = model.tokenizer.enc_token_id
    states = model.text_encoder(question.input_ids, attention_mask=question.attention_mask,
                                encoder_hidden_states=image_embeds, return_dict=True).last_hidden_state
    k = 5
    topk_ids, scores = reference_scores(model, states, question.attention_mask, candidates.input_ids,
                                        candidates.attention_mask, k)
    expected = topk_ids.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)
    got = model.rank_answer(states, question.attention_mask, candidates.input_ids, candidates.attention_mask, k)
    assert torch.equal(got, expected)

    # the per-sequence loss itself
    logits = torch.randn(3, 5, 11)
    targets = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 7, 8], [9, 10, -100, -100, -100]])
    log_probs = logits[:, :-1].log_softmax(-1)
    labels = targets[:, 1:]
    nll = F.nll_loss(log_probs.reshape(-1, 11), labels.reshape(-1), reduction="none").view(3, 4)
    expected = (0.9 * nll - 0.1 / 11 * log_probs.sum(-1)).sum(1)
    torch.testing.assert_close(smoothed_sequence_loss(logits, targets), expected, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_generate(model, fixture, monkeypatch):
    inputs, outputs = fixture
    generate, recorded = model.text_decoder.generate, []

    def spy(*args, **kwargs):
        recorded.append(generate(*args, **kwargs))
        return recorded[-1]

    monkeypatch.setattr(model.text_decoder, "generate", spy)
    answers = model(inputs["images"], inputs["questions"], train=False, inference="generate")
    assert recorded[0].tolist() == outputs["generate_token_ids_list"]
    assert answers == outputs["generate_answers"]


def test_unknown_inference_mode(model, fixture):
    inputs, _ = fixture
    with pytest.raises(ValueError, match="inference"):
        model(inputs["images"][:1], inputs["questions"][:1], train=False, inference="beam")


def test_factory_loads_checkpoint(tmp_path):
    state = torch.load(fixture_dir(TASK) / "model.pth", weights_only=True)
    torch.save({"model": state}, tmp_path / "vqa.pth")
    model = blip_vqa(pretrained=str(tmp_path / "vqa.pth"), **constructor_kwargs(TASK))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value.to(loaded[key].dtype)) for key, value in state.items())
