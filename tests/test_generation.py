"""models/generation.py: the key/value cache, image keys/values projected once, 4.15's logits
processing and nucleus sampling. (Token-for-token parity with the original:
test_generation_parity.py and test_model_parity.py.)"""
import numpy as np
import pytest
import torch

from model_builders import fixture_config, fixture_dir, load_fixture
from models import generation
from models.blip import BLIP_Decoder
from models.generation import KVCache, filter_logits, process_logits
from models.med import BertSelfAttention

SEP, PAD = 102, 0


@pytest.fixture(scope="module")
def early_decoder():
    """The generation fixture's captioning model with the [SEP] bias of variant b7, so that rows
    finish at different lengths (greedy and beam) and padding and finishing are exercised."""
    config = fixture_config("generation")["caption"]
    tiny = config["tiny_vit"]
    model = BLIP_Decoder(med_config=fixture_config("generation")["med_config"], image_size=48,
                         vit={"width": tiny["embed_dim"], "depth": tiny["depth"], "heads": tiny["num_heads"],
                              "patch_size": tiny["patch_size"]})
    state = torch.load(fixture_dir("generation") / config["model_file"], weights_only=True)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[SEP] = config["variants"]["b7"]["sep_bias_value"]
    return model.eval(), load_fixture("generation", "inputs.pt")["images"]


def _prompt(model, n):
    prompt = model.tokenizer([model.prompt] * n, return_tensors="pt").input_ids[:, :-1]
    prompt[:, 0] = model.tokenizer.bos_token_id
    return prompt


def _count_cross_projections(monkeypatch):
    calls = []
    original = BertSelfAttention.project_kv

    def counting(self, states):
        if self.is_cross_attention:
            calls.append(states.shape[0])
        return original(self, states)

    monkeypatch.setattr(BertSelfAttention, "project_kv", counting)
    return calls


MODES = {
    "greedy": dict(num_beams=1),
    "beam": dict(num_beams=3),
    "sample": dict(do_sample=True, top_p=0.9, top_k=50, repetition_penalty=1.1),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_image_keys_values_projected_once_and_cache_changes_nothing(early_decoder, monkeypatch, mode):
    model, images = early_decoder
    with torch.no_grad():
        image_embeds = model.visual_encoder(images)
    prompt = _prompt(model, len(images))
    kwargs = dict(max_length=20, min_length=5, eos_token_id=SEP, pad_token_id=PAD, **MODES[mode])
    calls = _count_cross_projections(monkeypatch)
    torch.manual_seed(3)
    cached = model.text_decoder.generate(prompt, encoder_hidden_states=image_embeds, **kwargs)
    # once per layer per image for the whole generation, shared by the image's beams
    assert calls == [len(images)] * model.text_decoder.config.num_hidden_layers

    torch.manual_seed(3)
    uncached = model.text_decoder.generate(prompt, encoder_hidden_states=image_embeds, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    if mode != "sample":  # rows must end at different lengths for this case to test padding
        ended = (cached == SEP).any(dim=1)
        assert ended.any() and cached.shape[1] > 6
    # transformers 4.x callers repeated the image per beam themselves: accepted, same result
    if mode == "beam":
        repeated = model.text_decoder.generate(prompt, encoder_hidden_states=image_embeds.repeat_interleave(3, 0),
                                               **kwargs)
        assert torch.equal(cached, repeated)


def test_blip_decoder_generate_is_the_decoded_inner_generate(early_decoder):
    model, images = early_decoder
    with torch.no_grad():
        image_embeds = model.visual_encoder(images)
    ids = model.text_decoder.generate(_prompt(model, len(images)), encoder_hidden_states=image_embeds,
                                      max_length=20, min_length=5, num_beams=3, eos_token_id=SEP, pad_token_id=PAD)
    decoded = [model.tokenizer.decode(row, skip_special_tokens=True)[len(model.prompt):] for row in ids]
    assert model.generate(images, num_beams=3, max_length=20, min_length=5) == decoded


def test_greedy_pads_finished_rows_and_stops_when_all_are_done(early_decoder):
    model, images = early_decoder
    with torch.no_grad():
        image_embeds = model.visual_encoder(images)
    ids = model.text_decoder.generate(_prompt(model, len(images)), encoder_hidden_states=image_embeds,
                                      max_length=40, min_length=5, eos_token_id=SEP, pad_token_id=PAD)
    ended = [(row == SEP).nonzero()[0, 0].item() if (row == SEP).any() else None for row in ids]
    assert all(end is not None and end >= 4 for end in ended)  # min_length 5: [SEP] at index >= 4
    assert ids.shape[1] == max(ended) + 1 < 40  # stopped when the last row finished
    for row, end in zip(ids, ended):
        assert (row[end + 1:] == PAD).all()


def test_beam_search_returns_several_sequences_best_first(early_decoder):
    model, images = early_decoder
    with torch.no_grad():
        image_embeds = model.visual_encoder(images[:2])
    out = model.text_decoder.generate(_prompt(model, 2), encoder_hidden_states=image_embeds, max_length=12,
                                      min_length=3, num_beams=3, num_return_sequences=2, eos_token_id=SEP,
                                      pad_token_id=PAD, return_dict_in_generate=True)
    assert out.sequences.shape[0] == 4 and out.sequences_scores.shape == (4,)
    assert (out.sequences_scores[0::2] >= out.sequences_scores[1::2]).all()  # best first per image
    single = model.text_decoder.generate(_prompt(model, 2), encoder_hidden_states=image_embeds, max_length=12,
                                         min_length=3, num_beams=3, eos_token_id=SEP, pad_token_id=PAD)
    assert [_unpadded(row) for row in out.sequences[0::2]] == [_unpadded(row) for row in single]


def _unpadded(row):
    ids = row.tolist()
    while ids and ids[-1] == PAD:
        ids.pop()
    return ids


def test_bad_generation_arguments_are_refused(early_decoder):
    model, images = early_decoder
    with torch.no_grad():
        image_embeds = model.visual_encoder(images)
    prompt = _prompt(model, 2)
    with pytest.raises(ValueError, match="rows"):
        model.text_decoder.generate(prompt, encoder_hidden_states=image_embeds, max_length=8)
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.text_decoder.generate(prompt, encoder_hidden_states=image_embeds[:2], num_beams=2,
                                    num_return_sequences=3, max_length=8)
    with pytest.raises(ValueError, match="beam sampling"):
        model.text_decoder.generate(prompt, encoder_hidden_states=image_embeds[:2], num_beams=2, do_sample=True,
                                    max_length=8)


# ----------------------------------------------------------------------------- sampling semantics

def _reference_sampling_distribution(logits, seen_ids, length, repetition_penalty, min_length, top_k, top_p):
    """transformers 4.15's sample() processing of one row, written as plain loops over numpy:
    RepetitionPenaltyLogitsProcessor, MinLengthLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper,
    softmax."""
    scores = logits.astype(np.float64).copy()
    for token in set(seen_ids):
        scores[token] = scores[token] * repetition_penalty if scores[token] < 0 else scores[token] / repetition_penalty
    if length < min_length:
        scores[SEP] = -np.inf
    kth = np.sort(scores)[::-1][top_k - 1]
    scores[scores < kth] = -np.inf  # ties with the k-th best are kept
    order = np.argsort(-scores, kind="stable")
    probs = np.exp(scores[order] - scores[order][0])
    probs /= probs.sum()
    cumulative = 0.0
    for rank, token in enumerate(order):
        if rank > 0 and cumulative > top_p:  # keep up to and including the token that crosses top_p
            scores[token] = -np.inf
        cumulative += probs[rank]
    out = np.exp(scores - scores.max())
    return out / out.sum()


def test_sampling_distribution_is_4_15s_processing(early_decoder, monkeypatch):
    """Every step of BLIP_Decoder.generate(sample=True) samples from the distribution 4.15's
    processors give (repetition penalty 1.1, top-k 50, top-p, min_length) for that step's logits."""
    model, images = early_decoder
    steps = []
    next_logits = generation._Stepper.next_logits
    multinomial = torch.multinomial

    def record_logits(self, input_ids):
        logits = next_logits(self, input_ids)
        steps.append({"logits": logits.clone(), "ids": input_ids.clone()})
        return logits

    def record_probs(probs, num_samples):
        steps[-1]["probs"] = probs.clone()
        return multinomial(probs, num_samples)

    monkeypatch.setattr(generation._Stepper, "next_logits", record_logits)
    monkeypatch.setattr(generation.torch, "multinomial", record_probs)
    torch.manual_seed(0)
    model.generate(images[:2], sample=True, top_p=0.5, max_length=12, min_length=6)
    assert len(steps) >= 3
    for step in steps:
        ids = step["ids"]
        for row in range(ids.shape[0]):
            expected = _reference_sampling_distribution(step["logits"][row].double().numpy(), ids[row].tolist(),
                                                        ids.shape[1], 1.1, 6, 50, 0.5)
            got = step["probs"][row].double().numpy()
            assert ((got > 0) == (expected > 0)).all(), "support of the filtered distribution"
            np.testing.assert_allclose(got, expected, atol=1e-6)


def test_filter_logits_cases():
    scores = torch.tensor([[1.0, 5.0, 3.0, 3.0, 0.0]])
    kept = filter_logits(scores, top_k=2) > -float("inf")
    assert kept.tolist() == [[False, True, True, True, False]]  # ties with the 2nd best stay
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_logits(probs.log(), top_k=0, top_p=0.7) > -float("inf")
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, then 0.3 crosses it: kept
    kept = filter_logits(probs.log(), top_k=0, top_p=0.1) > -float("inf")
    assert kept.tolist() == [[True, False, False, False]]  # the best token always stays
    kept = filter_logits(probs.log(), top_k=0, top_p=0.1, min_tokens_to_keep=3) > -float("inf")
    assert kept.tolist() == [[True, True, True, False]]
    assert torch.equal(filter_logits(scores, top_k=0, top_p=1.0), scores)  # both off


def test_process_logits_cases():
    scores = torch.tensor([[2.0, -1.0, 0.5, 4.0]])
    seen = torch.tensor([[0, 1, 1]])
    out = process_logits(scores, seen, repetition_penalty=2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 4.0]]  # positive divided, negative multiplied, once
    assert scores.tolist() == [[2.0, -1.0, 0.5, 4.0]]  # input untouched
    out = process_logits(scores, seen, min_length=4, eos_token_id=3)
    assert out[0, 3] == -float("inf")  # 3 tokens so far < min_length 4
    out = process_logits(scores, seen, min_length=3, eos_token_id=3)
    assert out[0, 3] == 4.0


def test_seeded_sampling_is_reproducible_and_seeds_differ(early_decoder):
    model, images = early_decoder
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(model.generate(images, sample=True, max_length=15, min_length=5))
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert all(isinstance(caption, str) and caption for caption in runs[0])


def test_several_samples_per_image_are_grouped_by_image(early_decoder):
    model, images = early_decoder
    with torch.no_grad():
        image_embeds = model.visual_encoder(images[:2])
    torch.manual_seed(1)
    ids = model.text_decoder.generate(_prompt(model, 2), encoder_hidden_states=image_embeds, do_sample=True,
                                      top_p=0.9, num_return_sequences=3, max_length=10, eos_token_id=SEP)
    assert ids.shape[0] == 6
    # the same rows from images given one by one, each repeated three times
    torch.manual_seed(1)
    repeated = model.text_decoder.generate(_prompt(model, 6), encoder_hidden_states=image_embeds.repeat_interleave(3, 0),
                                           do_sample=True, top_p=0.9, max_length=10, eos_token_id=SEP)
    assert torch.equal(ids, repeated)


# ----------------------------------------------------------------------------- the cache itself

def test_kv_cache_appends_grows_and_reorders():
    cache = KVCache(capacity=3)
    steps = [torch.randn(2, 1, n, 4) for n in (2, 1, 2)]  # a prompt of 2, then 1, then 2 tokens
    for i, chunk in enumerate(steps):
        keys, values = cache.update(0, chunk, -chunk)
        expected = torch.cat(steps[:i + 1], dim=2)
        assert torch.equal(keys, expected) and torch.equal(values, -expected)
    assert cache.get_seq_length() == 5 and cache.layers[0][0].shape[2] >= 5  # grew past capacity
    cache.reorder(torch.tensor([1, 1]))
    keys, _ = cache.update(0, torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4))
    assert torch.equal(keys[0, :, :5], expected[1]) and torch.equal(keys[1, :, :5], expected[1])

