"""coco_caption_eval on synthetic ground truth (BLEU, METEOR, ROUGE-L, CIDEr; SPICE skipped
with a warning when unavailable) and save_result's per-rank merge."""
import functools
import http.server
import json
import os
import shutil
import socket
import threading
import warnings

import pytest
import torch.multiprocessing as mp

import data.utils as data_utils
import metrics
from data.utils import DataError, save_result
from data_fixtures import synthetic  # noqa: F401
from metrics import caption_eval, coco_caption_eval

METRICS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
WRONG = "a brown dog sleeping on a sofa"


def _gt(synthetic, split="val"):
    path = os.path.join(synthetic["coco_gt_root"], f"coco_karpathy_{split}_gt.json")
    with open(path) as f:
        return path, json.load(f)


@pytest.fixture(scope="module")
def evaluated(synthetic, tmp_path_factory):
    """One coco_caption_eval run (java is slow to start): the gt file is downloaded from a
    local server into an empty coco_gt_root; half the images get their first reference
    caption as prediction, the other half a wrong caption."""
    _, gt = _gt(synthetic)
    first = {}
    for ann in gt["annotations"]:
        first.setdefault(ann["image_id"], ann["caption"])
    ids = sorted(first)
    perfect, wrong = ids[::2], ids[1::2]
    results = ([{"image_id": i, "caption": first[i]} for i in perfect]
               + [{"image_id": i, "caption": WRONG} for i in wrong])
    tmp = tmp_path_factory.mktemp("caption_eval")
    results_file = tmp / "results.json"
    results_file.write_text(json.dumps(results))

    served = tmp / "served"
    served.mkdir()
    shutil.copy(_gt(synthetic)[0], served)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    gt_root = tmp / "coco_gt"
    try:
        with pytest.MonkeyPatch.context() as mp_:
            mp_.setitem(data_utils.ANNOTATION_URLS, "coco_karpathy_val_gt.json",
                        f"http://127.0.0.1:{server.server_address[1]}/coco_karpathy_val_gt.json")
            mp_.setattr(metrics, "spice_available", lambda: False)

            def no_evaluate(self):
                raise AssertionError("COCOEvalCap.evaluate() builds SPICE; must not be called")
            from pycocoevalcap.eval import COCOEvalCap
            mp_.setattr(COCOEvalCap, "evaluate", no_evaluate)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                coco_eval = coco_caption_eval(str(gt_root), str(results_file), "val")
    finally:
        server.shutdown()
        server.server_close()
    return coco_eval, caught, perfect, wrong, gt_root


def test_metrics_are_computed_without_spice(evaluated):
    coco_eval, caught, *_ = evaluated
    assert list(coco_eval.eval) == METRICS
    assert all(0 <= coco_eval.eval[m] <= 1 for m in METRICS if m != "CIDEr")
    assert any("SPICE" in str(w.message) for w in caught)


def test_gt_file_was_downloaded(evaluated, synthetic):
    gt_root = evaluated[4]
    assert os.listdir(gt_root) == ["coco_karpathy_val_gt.json"]
    assert (gt_root / "coco_karpathy_val_gt.json").read_text() == open(_gt(synthetic)[0]).read()


def test_perfect_predictions_score_high_and_wrong_ones_low(evaluated):
    coco_eval, _, perfect, wrong, _ = evaluated
    per_image = coco_eval.imgToEval
    assert sorted(per_image) == sorted(perfect + wrong)
    for i in perfect:
        assert per_image[i]["Bleu_4"] > 0.99
        assert per_image[i]["METEOR"] > 0.9 and per_image[i]["ROUGE_L"] > 0.99
        assert per_image[i]["CIDEr"] > 1.0
    for i in wrong:
        assert per_image[i]["METEOR"] < 0.3 and per_image[i]["CIDEr"] < 0.3
    assert 0.3 < coco_eval.eval["Bleu_1"] < 0.9


def test_result_errors_are_reported_before_scoring(synthetic, tmp_path):
    gt_file, gt = _gt(synthetic)
    image_id = gt["images"][0]["id"]
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": image_id, "caption": "a"},
                                   {"image_id": image_id, "caption": "b"}]))
    with pytest.raises(DataError, match="remove_duplicate='image_id'"):
        caption_eval(gt_file, str(results))
    results.write_text(json.dumps([{"image_id": 987654321, "caption": "a"}]))
    with pytest.raises(DataError, match="987654321"):
        caption_eval(gt_file, str(results))
    results.write_text(json.dumps([{"image_id": image_id}]))
    with pytest.raises(DataError, match=r"entry 0 .*'caption'"):
        caption_eval(gt_file, str(results))
    with pytest.raises(ValueError, match="split"):
        coco_caption_eval(str(tmp_path), str(results), "train")


# ------------------------------------------------------------------------- save_result

def test_save_result_without_process_group(tmp_path):
    result = [{"image_id": 1, "caption": "a"}, {"image_id": 2, "caption": "b"},
              {"image_id": 1, "caption": "c"}]
    path = save_result(result, str(tmp_path), "val_epoch0", remove_duplicate="image_id")
    assert path == os.path.join(str(tmp_path), "val_epoch0.json")
    assert json.loads(open(path).read()) == result[:2]  # first occurrence kept, in order
    assert json.loads((tmp_path / "val_epoch0_rank0.json").read_text()) == result
    path = save_result(result, str(tmp_path), "all")
    assert json.loads(open(path).read()) == result
    assert sorted(os.listdir(tmp_path)) == ["all.json", "all_rank0.json", "val_epoch0.json",
                                            "val_epoch0_rank0.json"]  # no temporary files


def test_save_result_merges_ranks_in_order(tmp_path, monkeypatch):
    # rank 1 then rank 0 of a simulated 2-process run (barrier is a no-op without a group)
    monkeypatch.setattr(data_utils, "get_world_size", lambda: 2)
    monkeypatch.setattr(data_utils, "get_rank", lambda: 1)
    save_result([{"question_id": 3, "answer": "x"}, {"question_id": 1, "answer": "dup"}],
                str(tmp_path), "vqa_result", remove_duplicate="question_id")
    assert not (tmp_path / "vqa_result.json").exists()  # only rank 0 merges
    monkeypatch.setattr(data_utils, "get_rank", lambda: 0)
    path = save_result([{"question_id": 1, "answer": "y"}, {"question_id": 2, "answer": "z"}],
                       str(tmp_path), "vqa_result", remove_duplicate="question_id")
    assert [r["question_id"] for r in json.loads(open(path).read())] == [1, 2, 3]
    with pytest.raises(DataError, match="rank 1"):
        save_result([], str(tmp_path), "rank1_never_wrote")
    monkeypatch.setattr(data_utils, "get_world_size", lambda: 1)
    with pytest.raises(DataError, match="no key 'image_id'"):
        save_result([{"question_id": 1}], str(tmp_path), "bad", remove_duplicate="image_id")


def _save_result_worker(rank, world_size, port, folder):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        # DistributedSampler-style padding: rank 1 repeats image 0
        mine = {0: [{"image_id": 0, "caption": "r0"}, {"image_id": 2, "caption": "r0"}],
                1: [{"image_id": 1, "caption": "r1"}, {"image_id": 0, "caption": "pad"}]}[rank]
        path = save_result(mine, folder, "test_epoch1", remove_duplicate="image_id")
        # every rank can read the merged file on return
        merged = json.loads(open(path).read())
        assert [(r["image_id"], r["caption"]) for r in merged] == [(0, "r0"), (2, "r0"),
                                                                  (1, "r1")]
    finally:
        dist.destroy_process_group()


def test_save_result_with_two_gloo_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_save_result_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    assert sorted(os.listdir(tmp_path)) == ["test_epoch1.json", "test_epoch1_rank0.json",
                                            "test_epoch1_rank1.json"]


def test_meteor_process_is_reused_across_calls():
    first = metrics._meteor()
    assert metrics._meteor() is first               # one java process per Python process
    metrics._close_meteor(first)
    second = metrics._meteor()                      # a dead process is replaced
    assert second is not first and second.meteor_p.poll() is None
