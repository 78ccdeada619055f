"""Annotation download when missing, against a local HTTP server; the offline error."""
import os
import shutil
import socket

import pytest

import data
from data.utils import ANNOTATION_URLS, DataError, download_if_missing
from data_fixtures import data_config, http_server, synthetic  # noqa: F401

ORIGINAL = "https://storage.googleapis.com/sfr-vision-language-research/datasets/"


def test_url_table_keeps_the_original_urls():
    expected = ["coco_karpathy_train.json", "coco_karpathy_val.json", "coco_karpathy_test.json",
                "coco_karpathy_val_gt.json", "coco_karpathy_test_gt.json",
                "flickr30k_train.json", "flickr30k_val.json", "flickr30k_test.json",
                "vqa_train.json", "vqa_val.json", "vg_qa.json", "vqa_test.json",
                "answer_list.json", "nlvr_train.json", "nlvr_dev.json", "nlvr_test.json",
                "nocaps_val.json", "nocaps_test.json", "msrvtt_test.jsonl"]
    assert sorted(ANNOTATION_URLS) == sorted(expected)
    for name, url in ANNOTATION_URLS.items():
        assert url == ORIGINAL + name


def _serve(monkeypatch, folder, base_url, source_dir, names):
    for name in names:
        shutil.copy(os.path.join(source_dir, name), folder / name)
        monkeypatch.setitem(ANNOTATION_URLS, name, f"{base_url}/{name}")


def test_missing_annotations_are_downloaded(synthetic, http_server, monkeypatch, tmp_path, capsys):
    folder, base_url, requests = http_server
    names = ["coco_karpathy_train.json", "coco_karpathy_val.json", "coco_karpathy_test.json"]
    _serve(monkeypatch, folder, base_url, synthetic["ann_root"], names)
    ann_root = tmp_path / "annotation"  # does not exist yet

    config = data_config(synthetic, ann_root=str(ann_root))
    train, val, test = data.create_dataset("retrieval_coco", config)
    assert sorted(os.listdir(ann_root)) == sorted(names)  # no temporary files left
    for name in names:
        assert (ann_root / name).read_bytes() == (folder / name).read_bytes()
    assert len(train) > 0 and len(val.text) == 5 * len(val) and len(test) > 0
    assert "Downloading" in capsys.readouterr().err

    # present files are used as they are: no second request
    served = len(requests)
    data.create_dataset("retrieval_coco", config)
    assert len(requests) == served == 3


def test_download_if_missing_returns_existing_path_without_network(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[]")
    assert download_if_missing("http://127.0.0.1:9/never", str(path)) == str(path)


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_error_names_file_folder_and_url(monkeypatch, tmp_path, synthetic):
    url = f"http://127.0.0.1:{_closed_port()}/nlvr_dev.json"
    monkeypatch.setitem(ANNOTATION_URLS, "nlvr_dev.json", url)
    ann_root = tmp_path / "annotation"
    ann_root.mkdir()
    # nlvr_train.json is there, nlvr_dev.json is not and cannot be fetched
    shutil.copy(os.path.join(synthetic["ann_root"], "nlvr_train.json"), ann_root)
    with pytest.raises(DataError) as info:
        data.create_dataset("nlvr", data_config(synthetic, ann_root=str(ann_root)))
    message = str(info.value)
    assert "nlvr_dev.json" in message and str(ann_root) in message and url in message
    assert os.listdir(ann_root) == ["nlvr_train.json"]  # no partial file


def test_http_error_names_the_url(http_server, monkeypatch, tmp_path):
    _, base_url, _ = http_server
    url = f"{base_url}/vqa_test.json"  # the server does not have it: 404
    monkeypatch.setitem(ANNOTATION_URLS, "vqa_test.json", url)
    ann_root = tmp_path / "annotation"
    with pytest.raises(DataError, match="404") as info:
        data.vqa_dataset(None, str(ann_root), "", "", split="test")
    assert url in str(info.value) and "vqa_test.json" in str(info.value)
    assert os.listdir(ann_root) == []


def test_file_without_url_is_reported_missing(tmp_path):
    with pytest.raises(DataError, match="my_extra_qa.json"):
        data.vqa_dataset(None, str(tmp_path), "", "", train_files=["my_extra_qa"])
