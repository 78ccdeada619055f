"""Bad input: each error names the file (and the entry index); nothing is skipped."""
import json
import shutil

import pytest

import data
from data.utils import DataError
from data_fixtures import data_config, synthetic  # noqa: F401


@pytest.fixture
def ann_root(tmp_path, synthetic):
    """A writable copy of the synthetic annotation folder."""
    root = tmp_path / "annotation"
    shutil.copytree(synthetic["ann_root"], root)
    return root


def _load(root, name):
    return json.loads((root / name).read_text())


def _save(root, name, entries):
    (root / name).write_text(json.dumps(entries))


def _config(synthetic, ann_root, **extra):
    return data_config(synthetic, ann_root=str(ann_root), **extra)


# ------------------------------------------------------------------- missing fields

# (task, annotation file, field to drop, index to damage)
MISSING_FIELD_CASES = [
    ("caption_coco", "coco_karpathy_train.json", "caption", 7),
    ("caption_coco", "coco_karpathy_val.json", "image", 2),
    ("retrieval_coco", "coco_karpathy_test.json", "caption", 3),
    ("retrieval_flickr", "flickr30k_train.json", "image_id", 4),
    ("retrieval_flickr", "flickr30k_val.json", "caption", 1),
    ("vqa", "vqa_train.json", "question", 5),
    ("vqa", "vqa_val.json", "answer", 2),
    ("vqa", "vg_qa.json", "dataset", 6),
    ("vqa", "vqa_test.json", "question_id", 3),
    ("nlvr", "nlvr_dev.json", "label", 2),
    ("nlvr", "nlvr_train.json", "images", 0),
    ("nocaps", "nocaps_test.json", "img_id", 1),
]


@pytest.mark.parametrize("task, name, field, index", MISSING_FIELD_CASES,
                         ids=[f"{c[1]}-{c[2]}" for c in MISSING_FIELD_CASES])
def test_entry_without_required_field(synthetic, ann_root, task, name, field, index):
    entries = _load(ann_root, name)
    del entries[index][field]
    _save(ann_root, name, entries)
    with pytest.raises(DataError) as info:
        data.create_dataset(task, _config(synthetic, ann_root))
    message = str(info.value)
    assert name in message and f"entry {index}" in message and f"'{field}'" in message


def test_pretrain_entry_without_caption(synthetic, tmp_path):
    entries = json.loads(open(synthetic["train_file"][0]).read())
    del entries[3]["caption"]
    path = tmp_path / "pretrain.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"pretrain\.json: entry 3 .*'caption'"):
        data.create_dataset("pretrain", data_config(synthetic, train_file=[str(path)]))


def test_video_entry_without_clip_name(synthetic, ann_root):
    lines = (ann_root / "msrvtt_test.jsonl").read_text().splitlines()
    entry = json.loads(lines[2])
    del entry["clip_name"]
    lines[2] = json.dumps(entry)
    (ann_root / "msrvtt_test.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"msrvtt_test\.jsonl: entry 2 .*'clip_name'"):
        data.create_dataset("retrieval_msrvtt", _config(synthetic, ann_root))


@pytest.mark.parametrize("name, field, value, task", [
    ("coco_karpathy_val.json", "caption", "one caption, not a list", "retrieval_coco"),
    ("coco_karpathy_train.json", "caption", ["a", "list"], "caption_coco"),
    ("vqa_train.json", "answer", "yes", "vqa"),
    ("vg_qa.json", "answer", ["yes"], "vqa"),
    ("vqa_train.json", "dataset", "gqa", "vqa"),
    ("nlvr_test.json", "images", ["only_one.jpg"], "nlvr"),
    ("nocaps_val.json", "img_id", "abc", "nocaps"),
    ("coco_karpathy_test.json", "image", "synth/no_numeric_id.jpg", "caption_coco"),
])
def test_entry_with_wrong_value(synthetic, ann_root, name, field, value, task):
    entries = _load(ann_root, name)
    entries[4][field] = value
    _save(ann_root, name, entries)
    with pytest.raises(DataError, match=rf"{name}: entry 4 .*") as info:
        data.create_dataset(task, _config(synthetic, ann_root))
    assert field in str(info.value) or "id" in str(info.value)


# ------------------------------------------------------------------- malformed files

@pytest.mark.parametrize("task, name", [
    ("retrieval_coco", "coco_karpathy_train.json"),
    ("vqa", "answer_list.json"),
    ("nlvr", "nlvr_train.json"),
])
def test_malformed_json_file(synthetic, ann_root, task, name):
    text = (ann_root / name).read_text()
    (ann_root / name).write_text(text[: len(text) // 2])  # truncated
    with pytest.raises(DataError, match=r"Malformed annotation file .*" + name.replace(".", r"\.")
                       + r".* line 1"):
        data.create_dataset(task, _config(synthetic, ann_root))


def test_annotation_that_is_not_a_list(synthetic, ann_root):
    (ann_root / "flickr30k_test.json").write_text('{"image": "a.jpg"}')
    with pytest.raises(DataError, match=r"flickr30k_test\.json: expected a JSON list"):
        data.create_dataset("retrieval_flickr", _config(synthetic, ann_root))
    _save(ann_root, "flickr30k_test.json", [{"image": "a.jpg", "caption": ["x"]}, "not an object"])
    with pytest.raises(DataError, match=r"flickr30k_test\.json: entry 1 should be a JSON object"):
        data.create_dataset("retrieval_flickr", _config(synthetic, ann_root))


def test_malformed_jsonl_line(synthetic, ann_root):
    path = ann_root / "msrvtt_test.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:-3]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"msrvtt_test\.jsonl: line 2"):
        data.create_dataset("retrieval_msrvtt", _config(synthetic, ann_root))


def test_malformed_laion_shard(synthetic, tmp_path):
    laion = tmp_path / "laion"
    shutil.copytree(synthetic["laion_path"], laion)
    (laion / "laion_synth_001.json").write_text("[{")
    dataset = data.create_dataset("pretrain", data_config(synthetic, laion_path=str(laion)))
    with pytest.raises(DataError, match="laion_synth_001.json"):
        dataset.reload_laion(1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no \\*.json shard"):
        data.create_dataset("pretrain", data_config(synthetic, laion_path=str(empty)))


# ------------------------------------------------------------------- images and videos

@pytest.fixture
def image_root(tmp_path, synthetic):
    """A writable copy of the synthetic image folder."""
    root = tmp_path / "images"
    shutil.copytree(synthetic["image_root"], root)
    return root


def _check_image_error(error, image_path, ann_name, index):
    message = str(error)
    assert str(image_path) in message and ann_name in message and f"entry {index}" in message


@pytest.mark.parametrize("problem", ["missing", "unreadable"])
def test_bad_image_in_every_image_dataset(synthetic, image_root, problem):
    config = data_config(synthetic, image_root=str(image_root), vqa_root=str(image_root),
                         vg_root=str(image_root))
    train, val, _ = data.create_dataset("caption_coco", config)
    vqa_train, _ = data.create_dataset("vqa", config)
    nlvr_train = data.create_dataset("nlvr", config)[0]
    nocaps_val = data.create_dataset("nocaps", config)[0]
    cases = [(train, 6, "coco_karpathy_train.json", train.annotation[6]["image"]),
             (val, 3, "coco_karpathy_val.json", val.annotation[3]["image"]),
             (nocaps_val, 2, "nocaps_val.json", nocaps_val.annotation[2]["image"]),
             (nlvr_train, 5, "nlvr_train.json", nlvr_train.annotation[5]["images"][1])]
    # the first vg entry of the concatenated VQA training set: named by its own file
    vg_index = next(i for i, a in enumerate(vqa_train.annotation) if a["dataset"] == "vg")
    vg_offset = vqa_train.ann_offsets[2]
    cases.append((vqa_train, vg_index, "vg_qa.json", vqa_train.annotation[vg_index]["image"]))

    for dataset, index, ann_name, relative in cases:
        path = image_root / relative
        backup = path.read_bytes()
        if problem == "missing":
            path.unlink()
        else:
            path.write_bytes(b"this is not a JPEG file")
        expected = "not found" if problem == "missing" else "Cannot read"
        with pytest.raises(DataError, match=expected) as info:
            dataset[index]
        expected_index = index - vg_offset if ann_name == "vg_qa.json" else index
        _check_image_error(info.value, path, ann_name, expected_index)
        path.write_bytes(backup)
        dataset[index]  # fine again


def test_missing_pretrain_image(synthetic, tmp_path):
    entries = json.loads(open(synthetic["train_file"][0]).read())
    entries[2]["image"] = str(tmp_path / "gone.jpg")
    path = tmp_path / "pretrain.json"
    path.write_text(json.dumps(entries))
    dataset = data.create_dataset("pretrain", data_config(synthetic, train_file=[str(path)],
                                                          laion_path=""))
    with pytest.raises(DataError) as info:
        dataset[2]
    _check_image_error(info.value, tmp_path / "gone.jpg", "pretrain.json", 2)


@pytest.mark.parametrize("problem", ["missing", "unreadable"])
def test_bad_video(synthetic, tmp_path, problem):
    video_root = tmp_path / "videos"
    shutil.copytree(synthetic["video_root"], video_root)
    path = video_root / "video1.mp4"
    if problem == "missing":
        path.unlink()
    else:
        path.write_bytes(b"\x00" * 100)
    dataset = data.create_dataset("retrieval_msrvtt",
                                  data_config(synthetic, video_root=str(video_root)))
    with pytest.raises(DataError) as info:
        dataset[1]
    message = str(info.value)
    assert str(path) in message and "msrvtt_test.jsonl" in message and "entry 1" in message
    assert dataset[0][0].shape[0] == 4


def test_truncated_jpeg_refused_by_task_data_loaded_with_a_warning_for_web_data(tmp_path, capsys):
    import io
    import json

    import numpy as np
    from PIL import Image, ImageFile

    from data.pretrain_dataset import pretrain_dataset
    from data.utils import DataError, load_image

    pixels = (np.random.RandomState(0).rand(96, 96, 3) * 255).astype('uint8')
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, 'JPEG')
    path = tmp_path / 'cut.jpg'
    path.write_bytes(buffer.getvalue()[:int(len(buffer.getvalue()) * 0.7)])
    # importing the data package leaves PIL's process-wide settings alone
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False and Image.MAX_IMAGE_PIXELS is not None
    with pytest.raises(DataError, match=r'cut.jpg \(entry 4 of ann.json\).*truncated'):
        load_image(str(path), 'ann.json', 4)

    ann = tmp_path / 'web.json'
    ann.write_text(json.dumps([{'image': str(path), 'caption': 'a noisy web image'}]))
    image, caption = pretrain_dataset([str(ann)], '', lambda image: image)[0]
    assert image.size == (96, 96) and caption == 'a noisy web image'
    assert 'cut.jpg (entry 0 of' in capsys.readouterr().out
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # only for that load


@pytest.mark.parametrize('caption', ['', '   ', ['a dog', '']])
def test_an_empty_caption_is_an_error_naming_file_entry_and_field(tmp_path, caption):
    import json

    from data.utils import DataError, load_json_list
    path = tmp_path / 'ann.json'
    path.write_text(json.dumps([{'image': 'a.jpg', 'caption': 'a cat'}, {'image': 'b.jpg', 'caption': caption}]))
    with pytest.raises(DataError, match=r"ann.json: entry 1 field 'caption' is empty"):
        load_json_list(str(path), {'image': str, 'caption': (str, list)})
