"""Generation against the original BLIP where beams finish early (tests/parity/public/generation,
see its README): captioning and VQA models whose [SEP] output bias is raised in steps, so rows
end at different lengths; beam 3 and 5, greedy, two prompts, lengths 20 and 30, repetition
penalty; VQA generate and rank. Built through the factories from a checkpoint file, as a user
loads one; token ids, captions and answers must match exactly."""
import pytest
import torch

from model_builders import fixture_config, fixture_dir, load_fixture
from models.blip import blip_decoder
from models.blip_vqa import blip_vqa

TASK = "generation"
CONFIG = fixture_config(TASK)
INPUTS = load_fixture(TASK, "inputs.pt")
OUTPUTS = load_fixture(TASK, "outputs.pt")


def _checkpoint(part, variant, folder):
    """The base state dict with the variant's [SEP] bias, saved as an official {'model': ...}."""
    spec = CONFIG[part]
    state = torch.load(fixture_dir(TASK) / spec["model_file"], weights_only=True)
    value = spec["variants"][variant]["sep_bias_value"]
    for key in spec["sep_bias_keys"]:
        state[key] = state[key].clone()
        state[key][102] = value
    path = folder / f"{part}_{variant}.pth"
    torch.save({"model": state}, path)
    return str(path)


def _kwargs(part, **overrides):
    spec = CONFIG[part]
    tiny = spec["tiny_vit"]
    kwargs = dict(spec["constructor_kwargs"], med_config=CONFIG["med_config"],
                  vit={"width": tiny["embed_dim"], "depth": tiny["depth"], "heads": tiny["num_heads"],
                       "patch_size": tiny["patch_size"]})
    kwargs.update(overrides)
    return kwargs


def _recording(model):
    """Record what the inner text_decoder.generate returns (as the fixture did)."""
    recorded = []
    inner = model.text_decoder.generate

    def spy(*args, **kwargs):
        result = inner(*args, **kwargs)
        recorded.append(result)
        return result

    model.text_decoder.generate = spy
    return recorded


@pytest.mark.parametrize("variant", list(CONFIG["caption"]["variants"]))
def test_captions_match_the_original_when_beams_finish_early(variant, tmp_path):
    checkpoint = _checkpoint("caption", variant, tmp_path)
    for p, prompt in enumerate(INPUTS["prompts"]):
        model = blip_decoder(pretrained=checkpoint, **_kwargs("caption", prompt=prompt)).eval()
        recorded = _recording(model)
        for case, kwargs in INPUTS["caption_cases"].items():
            expected = OUTPUTS["caption"][variant][f"p{p}.{case}"]
            recorded.clear()
            captions = model.generate(INPUTS["images"], **kwargs)
            assert recorded[0].tolist() == expected["token_ids_list"], f"{variant} p{p}.{case}"
            assert captions == expected["captions"], f"{variant} p{p}.{case}"


def test_the_fixture_exercises_early_finishes():
    """A fixture where no beam ends early would not test the finishing rules."""
    early = [row for cases in OUTPUTS["caption"].values() for case in cases.values()
             for row in case["ended_before_max_length"]]
    assert sum(early) > 50
    assert any(any(v["generate_ended_before_max_length"]) for v in OUTPUTS["vqa"].values())


@pytest.mark.parametrize("variant", list(CONFIG["vqa"]["variants"]))
def test_vqa_generate_and_rank_match_the_original(variant, tmp_path):
    model = blip_vqa(pretrained=_checkpoint("vqa", variant, tmp_path), **_kwargs("vqa")).eval()
    expected = OUTPUTS["vqa"][variant]
    images = INPUTS["images"][:INPUTS["vqa_batch"]]
    recorded = _recording(model)
    with torch.no_grad():
        answers = model(images, INPUTS["questions"], train=False, inference="generate")
        assert recorded[0].tolist() == expected["generate_token_ids_list"]
        assert answers == expected["generate_answers"]

        candidates = model.tokenize_candidates(INPUTS["answer_list"])
        assert torch.equal(candidates.input_ids, INPUTS["rank_candidate_input_ids"])
        ids = model(images, INPUTS["questions"], candidates, train=False, inference="rank",
                    k_test=INPUTS["k_test"])
    assert torch.equal(ids, expected["rank_answer_ids"])
    assert [INPUTS["answer_list"][i] for i in ids] == expected["rank_answers"]
