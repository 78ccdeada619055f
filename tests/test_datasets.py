"""Every dataset of create_dataset reading the synthetic files: item structure and types as
the original, loaders, samplers, collate, video frames, and the synthetic data itself."""
import json
import os
import random

import pytest
import torch
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler

import data
from data import create_dataset, create_loader, create_sampler, vqa_collate_fn
from data.coco_karpathy_dataset import coco_image_id
from data.synthetic import (
    ANSWER_LIST,
    COLOURS,
    NLVR_KINDS,
    POSITIONS,
    SHAPES,
    _nlvr_entries,
    corrupt_captions,
    make_scenes,
    make_synthetic,
)
from data.video_dataset import sample_frame_indices
from data_fixtures import IMAGE_SIZE, SYNTHETIC_KW, data_config, synthetic  # noqa: F401

S = IMAGE_SIZE


def _is_image(x, size=S):
    return isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (3, size, size)


def _read(paths, name):
    with open(os.path.join(paths["ann_root"], name)) as f:
        return json.load(f)


def test_create_dataset_names_and_errors(synthetic):
    config = data_config(synthetic)
    with pytest.raises(ValueError, match="retrieval_coco"):
        create_dataset("coco", config)
    del config["vg_root"]
    with pytest.raises(ValueError, match="vg_root"):
        create_dataset("vqa", config)


@pytest.mark.parametrize("prompt", ["a picture of ", ""])
def test_caption_coco(synthetic, prompt):
    train, val, test = create_dataset("caption_coco", data_config(synthetic, prompt=prompt))
    assert isinstance(train, data.coco_karpathy_train)
    assert len(train) == len(_read(synthetic, "coco_karpathy_train.json"))
    image, caption, img_idx = train[0]
    assert _is_image(image) and isinstance(caption, str) and isinstance(img_idx, int)
    assert caption.startswith(prompt) and caption == caption.lower() and "." not in caption
    assert sorted(set(train.img_ids.values())) == list(range(len(train.img_ids)))

    for split, dataset in (("val", val), ("test", test)):
        assert isinstance(dataset, data.coco_karpathy_caption_eval)
        gt_file = os.path.join(synthetic["coco_gt_root"], f"coco_karpathy_{split}_gt.json")
        with open(gt_file) as f:
            gt_ids = {img["id"] for img in json.load(f)["images"]}
        ids = [dataset[i][1] for i in range(len(dataset))]
        assert all(type(i) is int for i in ids)
        assert set(ids) == gt_ids  # ids survive the original's file-name parsing
        assert _is_image(dataset[0][0])


def test_coco_image_id_parsing_as_original():
    assert coco_image_id("val2014/COCO_val2014_000000391895.jpg") == 391895
    assert coco_image_id("synth/COCO_synth_000000000123.jpg") == 123


@pytest.mark.parametrize("name, classes", [
    ("retrieval_coco", (data.coco_karpathy_train, data.coco_karpathy_retrieval_eval)),
    ("retrieval_flickr", (data.flickr30k_train, data.flickr30k_retrieval_eval)),
])
def test_retrieval(synthetic, name, classes):
    train, val, test = create_dataset(name, data_config(synthetic))
    assert isinstance(train, classes[0])
    image, caption, img_idx = train[3]
    assert _is_image(image) and isinstance(caption, str) and isinstance(img_idx, int)
    # five captions per image, consecutive in the train file: the same img_idx
    assert train[0][2] == train[4][2] and train[5][2] != train[0][2]

    for dataset in (val, test):
        assert isinstance(dataset, classes[1])
        image, index = dataset[2]
        assert _is_image(image) and index == 2
        assert len(dataset.image) == len(dataset) == len(dataset.annotation)
        assert len(dataset.text) == 5 * len(dataset)
        assert all(isinstance(t, str) and t == t.lower() for t in dataset.text)
        for img_id, txt_ids in dataset.img2txt.items():
            assert len(txt_ids) == 5
            assert all(dataset.txt2img[t] == img_id for t in txt_ids)
        assert sorted(dataset.txt2img) == list(range(len(dataset.text)))


def test_vqa(synthetic):
    train, test = create_dataset("vqa", data_config(synthetic))
    assert isinstance(train, data.vqa_dataset) and train.split == "train"
    n_files = sum(len(_read(synthetic, f"{f}.json")) for f in synthetic["train_files"])
    assert len(train) == n_files

    kinds = {}
    for index in range(len(train)):
        kinds.setdefault(train.annotation[index]["dataset"], index)
    assert set(kinds) == {"vqa", "vg"}

    image, question, answers, weights = train[kinds["vqa"]]
    assert _is_image(image) and isinstance(question, str)
    assert question == question.lower() and question.endswith("?")  # pre_question keeps '?'
    assert isinstance(answers, list) and all(isinstance(a, str) for a in answers)
    assert len(weights) == len(answers) and sum(weights) == pytest.approx(1.0)
    # a count question: 9 x digit + 1 x word -> weights 0.9 / 0.1 in first-seen order
    count_index = next(i for i in range(len(train))
                       if train.annotation[i]["dataset"] == "vqa"
                       and train.annotation[i]["question"].startswith("How many"))
    _, _, answers, weights = train[count_index]
    assert len(answers) == 2 and answers[0].isdigit()
    assert weights == pytest.approx([0.9, 0.1])

    _, _, answers, weights = train[kinds["vg"]]
    assert len(answers) == 1 and weights == [0.2]

    assert isinstance(test, data.vqa_dataset) and test.split == "test"
    image, question, question_id = test[0]
    assert _is_image(image) and isinstance(question, str) and isinstance(question_id, int)
    assert test.answer_list == ANSWER_LIST
    # the synthetic test questions carry their answers (extra field): all rankable
    assert {ann["answer"][0] for ann in test.annotation} <= set(test.answer_list)


def test_vqa_collate_fn(synthetic):
    train, _ = create_dataset("vqa", data_config(synthetic))
    batch = [train[i] for i in range(6)]
    images, questions, answers, weights, n = vqa_collate_fn(batch)
    assert images.shape == (6, 3, S, S)
    assert questions == [b[1] for b in batch]
    assert answers == [a for b in batch for a in b[2]]
    assert isinstance(weights, torch.Tensor) and weights.dtype == torch.float32
    assert weights.tolist() == pytest.approx([w for b in batch for w in b[3]])
    assert n == [len(b[2]) for b in batch]


def test_nlvr(synthetic):
    train, val, test = create_dataset("nlvr", data_config(synthetic))
    for dataset, name in ((train, "nlvr_train.json"), (val, "nlvr_dev.json"),
                          (test, "nlvr_test.json")):
        assert isinstance(dataset, data.nlvr_dataset)
        assert len(dataset) == len(_read(synthetic, name))
    labels = {val[i][3] for i in range(len(val))} | {train[i][3] for i in range(len(train))}
    assert labels == {0, 1}
    image0, image1, sentence, label = test[0]
    assert _is_image(image0) and _is_image(image1) and isinstance(sentence, str)


def test_synthetic_nlvr_statements_hold_as_labelled_half_of_the_time():
    scenes, split = make_scenes(60, random.Random(0))
    by_image = {scene["image"]: scene for scene in scenes}
    entries = _nlvr_entries(split["train"], random.Random(1), 4)
    assert len(entries) == 4 * len(split["train"])
    assert sum(entry["label"] == "True" for entry in entries) == len(entries) // 2
    train_images = {scene["image"] for scene in split["train"]}
    kinds_seen = set()
    for entry in entries:
        assert set(entry["images"]) <= train_images and entry["images"][0] != entry["images"][1]
        left, right = (by_image[image] for image in entry["images"])
        # the label is what the scenes say of the sentence
        truths = {kind: statement(left, right, word) for kind, (statement, words) in NLVR_KINDS.items()
                  for word in words if statement(left, right, word)[0] == entry["sentence"]}
        assert [truth for _, truth in truths.values()] == [entry["label"] == "True"], entry
        kinds_seen |= set(truths)
    assert kinds_seen == set(NLVR_KINDS)


def test_nlvr_random_swap_keeps_statement_true(synthetic):
    dataset = create_dataset("nlvr", data_config(synthetic))[2]
    dataset.annotation = [{"images": dataset.annotation[0]["images"],
                           "sentence": "The LEFT image has more shapes than the right image.",
                           "label": "True"}]
    plain = dataset.transform(data.utils.load_image(
        os.path.join(dataset.image_root, dataset.annotation[0]["images"][0]), "", 0))
    seen = set()
    random.seed(0)
    for _ in range(20):
        image0, image1, sentence, label = dataset[0]
        assert label == 1
        if torch.equal(image0, plain):
            assert sentence == "the left image has more shapes than the right image"
        else:
            assert torch.equal(image1, plain)
            assert sentence == "the right image has more shapes than the left image"
        seen.add(sentence)
    assert len(seen) == 2


def test_nocaps(synthetic):
    val, test = create_dataset("nocaps", data_config(synthetic))
    for dataset, split in ((val, "val"), (test, "test")):
        assert isinstance(dataset, data.nocaps_eval)
        image, img_id = dataset[1]
        assert _is_image(image) and type(img_id) is int
        gt = _read(synthetic, f"nocaps_{split}_gt.json")
        assert {dataset[i][1] for i in range(len(dataset))} == {im["id"] for im in gt["images"]}


def test_pretrain_and_laion_reload(synthetic):
    without = create_dataset("pretrain", data_config(synthetic, laion_path=""))
    assert isinstance(without, data.pretrain_dataset)
    n_pretrain = len(_read(synthetic, "pretrain_synth.json"))
    assert len(without) == n_pretrain
    image, caption = without[0]
    assert _is_image(image) and isinstance(caption, str) and caption == caption.lower()

    dataset = create_dataset("pretrain", data_config(synthetic), min_scale=0.2)
    assert dataset.transform.transforms[0].scale == (0.2, 1.0)
    shards = sorted(os.listdir(synthetic["laion_path"]))
    assert [os.path.basename(f) for f in dataset.laion_files] == shards
    sizes = []
    for epoch in range(3):
        dataset.reload_laion(epoch)
        assert os.path.basename(dataset.laion_file) == shards[epoch % len(shards)]
        with open(dataset.laion_file) as f:
            sizes.append(len(json.load(f)))
        assert len(dataset) == n_pretrain + sizes[-1]
        assert isinstance(dataset[len(dataset) - 1][1], str)  # a LAION entry loads
    assert sizes[0] == sizes[2]


def test_video_retrieval(synthetic):
    dataset = create_dataset("retrieval_msrvtt", data_config(synthetic, num_frm_test=4))
    assert isinstance(dataset, data.VideoDataset)
    assert dataset.frm_sampling_strategy == "uniform" and dataset.max_img_size == S
    assert len(dataset) == SYNTHETIC_KW["num_videos"] == len(dataset.text)
    assert dataset.txt2video == list(range(len(dataset))) == dataset.video2txt
    video, index = dataset[1]
    assert index == 1
    assert video.shape == (4, 3, S, S) and video.dtype == torch.float32
    mean, std = torch.tensor(data.MEAN).view(1, 3, 1, 1), torch.tensor(data.STD).view(1, 3, 1, 1)
    pixels = video * std + mean
    assert pixels.min() >= -0.02 and pixels.max() <= 1.02
    # the background is the synthetic grey (232) in the corner of every frame
    assert pixels[:, :, 0, 0].mean().item() == pytest.approx(232 / 255, abs=0.05)


def _shape_centre(frame):
    """Centre of the pixels that differ from the grey background (3, H, W) in [0, 1]."""
    mask = (frame - 232 / 255).abs().sum(0) > 0.3
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return xs.float().mean().item(), ys.float().mean().item()


def test_video_frames_follow_the_motion(synthetic):
    dataset = create_dataset("retrieval_msrvtt", data_config(synthetic, num_frm_test=5))
    mean, std = torch.tensor(data.MEAN).view(1, 3, 1, 1), torch.tensor(data.STD).view(1, 3, 1, 1)
    for index, caption in enumerate(dataset.text):
        video = dataset[index][0] * std + mean
        (x0, y0), (x1, y1) = _shape_centre(video[0]), _shape_centre(video[-1])
        start = caption.split(" from the ")[1].split(" ")[0]
        moved = {"left": x1 - x0, "right": x0 - x1, "top": y1 - y0, "bottom": y0 - y1}[start]
        assert moved > S / 4, (caption, (x0, y0), (x1, y1))


def test_uniform_frame_sampling_as_original():
    assert sample_frame_indices(16, 4, "uniform") == [0, 4, 8, 12]
    # numpy's integer arange keeps the truncated step: 10 frames / 4 -> step 2
    assert sample_frame_indices(10, 4, "uniform") == [0, 2, 4, 6]
    assert sample_frame_indices(10, 8, "uniform") == list(range(8))
    random.seed(0)
    rand = sample_frame_indices(30, 4, "rand")
    assert len(rand) == 4 and rand == sorted(rand) and len(set(rand)) == 4
    headtail = sample_frame_indices(30, 4, "headtail")
    assert all(i < 15 for i in headtail[:2]) and all(i >= 15 for i in headtail[2:])
    with pytest.raises(ValueError, match="middle"):
        sample_frame_indices(30, 4, "middle")


# ------------------------------------------------------------------ samplers and loaders

def test_create_sampler_single_process_and_distributed(synthetic):
    train, val, test = create_dataset("retrieval_coco", data_config(synthetic))
    assert create_sampler([train, val], [True, False], 1, 0) == [None, None]
    samplers = create_sampler([train, val, test], [True, False, False], 2, 1)
    assert all(isinstance(s, DistributedSampler) for s in samplers)
    assert samplers[0].shuffle and not samplers[1].shuffle
    assert samplers[0].num_replicas == 2 and samplers[0].rank == 1
    assert len(samplers[1]) == (len(val) + 1) // 2


def test_create_loader(synthetic):
    train, val, test = create_dataset("caption_coco", data_config(synthetic))
    samplers = create_sampler([train, val, test], [True, False, False], 1, 0)
    train_loader, val_loader, test_loader = create_loader(
        [train, val, test], samplers, batch_size=[8, 7, 7], num_workers=[0, 0, 0],
        is_trains=[True, False, False], collate_fns=[None, None, None])
    assert train_loader.drop_last and isinstance(train_loader.sampler, RandomSampler)
    assert len(train_loader) == len(train) // 8
    assert not val_loader.drop_last and isinstance(val_loader.sampler, SequentialSampler)
    assert len(val_loader) == -(-len(val) // 7)

    images, captions, img_idx = next(iter(train_loader))
    assert images.shape == (8, 3, S, S) and len(captions) == 8
    assert all(c.startswith("a picture of ") for c in captions)
    assert img_idx.dtype == torch.int64
    ids = torch.cat([batch[1] for batch in val_loader]).tolist()
    assert ids == [val[i][1] for i in range(len(val))]  # evaluation keeps every sample, in order


def test_create_loader_with_vqa_collate_and_workers(synthetic):
    train, test = create_dataset("vqa", data_config(synthetic))
    train_loader, test_loader = create_loader(
        [train, test], [None, None], batch_size=[4, 5], num_workers=[2, 0],
        is_trains=[True, False], collate_fns=[vqa_collate_fn, None])
    images, questions, answers, weights, n = next(iter(train_loader))
    assert images.shape == (4, 3, S, S) and len(questions) == 4
    assert len(answers) == len(weights) == sum(n)
    images, questions, question_ids = next(iter(test_loader))
    assert images.shape == (5, 3, S, S) and question_ids.tolist() == [
        test.annotation[i]["question_id"] for i in range(5)]


# ------------------------------------------------------------------ the synthetic data

def test_synthetic_is_deterministic_and_seeded(tmp_path):
    kwargs = dict(num_images=12, image_size=32, num_videos=1, video_frames=4)
    a = make_synthetic(tmp_path / "a", seed=3, **kwargs)
    b = make_synthetic(tmp_path / "b", seed=3, **kwargs)
    c = make_synthetic(tmp_path / "c", seed=4, **kwargs)
    names = sorted(n for n in os.listdir(a["ann_root"]) if n.endswith(".json"))
    assert "coco_karpathy_train.json" in names and "nlvr_dev.json" in names
    for name in names:
        if name != "pretrain_synth.json":  # holds absolute paths
            assert _read(a, name) == _read(b, name), name
    images = sorted(os.listdir(os.path.join(a["image_root"], "synth")))
    for name in images:
        with open(os.path.join(a["image_root"], "synth", name), "rb") as fa, \
                open(os.path.join(b["image_root"], "synth", name), "rb") as fb:
            assert fa.read() == fb.read()
    assert _read(a, "coco_karpathy_train.json") != _read(c, "coco_karpathy_train.json")


def test_synthetic_captions_and_answers_describe_the_image(synthetic):
    numbers = {"one": 1, "two": 2, "three": 3}
    train_captions = _read(synthetic, "coco_karpathy_train.json")
    eval_entries = _read(synthetic, "coco_karpathy_val.json")
    eval_entries += _read(synthetic, "coco_karpathy_test.json")
    for entry in eval_entries:
        assert len(entry["caption"]) == 5
        for caption in entry["caption"]:
            words = data.utils.pre_caption(caption).split(" ")
            assert len([w for w in words if w in COLOURS]) == 1
            assert len([w for w in words if w.rstrip("s") in SHAPES]) == 1
            assert len([w for w in words if w in POSITIONS]) == 1
            assert len([w for w in words if w in numbers]) == 1
    # the questions of one image agree with its first caption
    vqa = _read(synthetic, "vqa_test.json")
    captions = {e["image"]: data.utils.pre_caption(e["caption"][0])
                for e in _read(synthetic, "coco_karpathy_test.json")}
    for entry in vqa:
        answer = entry["answer"][0]
        assert answer in ANSWER_LIST
        if answer not in ("yes", "no"):
            words = captions[entry["image"]].replace("s ", " ").split(" ")
            number = {str(v): k for k, v in numbers.items()}.get(answer, answer)
            assert number in words, (entry["question"], answer, captions[entry["image"]])
    assert len({e["image_id"] for e in train_captions}) == len(train_captions) // 5


def test_corrupt_captions_swaps_a_fraction_for_other_images_captions(synthetic):
    entries = _read(synthetic, "pretrain_synth.json")
    noisy, corrupted = corrupt_captions(entries, 0.3, seed=0)
    assert sum(corrupted) == round(0.3 * len(entries)) and len(noisy) == len(entries)
    captions_of = {}
    for e in entries:
        captions_of.setdefault(e["image"], set()).add(e["caption"])
    for before, after, bad in zip(entries, noisy, corrupted):
        assert after["image"] == before["image"]
        if bad:  # another image's caption, none of this image's
            assert after["caption"] not in captions_of[before["image"]]
            assert any(after["caption"] in c for image, c in captions_of.items() if image != before["image"])
        else:
            assert after == before
    assert corrupt_captions(entries, 0.3, seed=0) == (noisy, corrupted)
    assert corrupt_captions(entries, 0.3, seed=1)[1] != corrupted
    with pytest.raises(ValueError, match="fraction must be in"):
        corrupt_captions(entries, 1.5)
