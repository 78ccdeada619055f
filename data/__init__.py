"""Datasets, transforms, samplers and loaders of BLIP's tasks.

`create_dataset(name, config, min_scale=0.5)` builds the splits of a task, as the
original returns them:

    name               returns             config keys read (all also read image_size)
    'pretrain'         pretrain_dataset    train_file, laion_path (optional, default '')
    'caption_coco'     (train, val, test)  image_root, ann_root, prompt
    'nocaps'           (val, test)         image_root, ann_root
    'retrieval_coco'   (train, val, test)  image_root, ann_root
    'retrieval_flickr' (train, val, test)  image_root, ann_root
    'vqa'              (train, test)       ann_root, vqa_root, vg_root, train_files
    'nlvr'             (train, val, test)  image_root, ann_root
    'retrieval_msrvtt' VideoDataset        video_root, ann_root, num_frm_test (+ optional
                       (test split only)   frm_sampling_strategy 'uniform', video_fmt '.mp4')
    'retrieval_custom' (train, val, test)  your own pairs (data/custom_dataset.py): train_file,
    'caption_custom'   (train, val, test)  val_file, test_file or data_file (+ split keys),
                                           image_root, bad_rows; caption_custom also prompt

Training splits use `train_transform(image_size, min_scale)`, the others
`eval_transform(image_size)`. The video set is what the original eval_retrieval_video.py
builds by hand: VideoDataset(video_root, ann_root, num_frm=num_frm_test,
max_img_size=image_size, frm_sampling_strategy='uniform').
"""
import torch
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from data import custom_dataset
from data.coco_karpathy_dataset import coco_karpathy_caption_eval, coco_karpathy_retrieval_eval, coco_karpathy_train
from data.flickr30k_dataset import flickr30k_retrieval_eval, flickr30k_train
from data.nlvr_dataset import nlvr_dataset
from data.nocaps_dataset import nocaps_eval
from data.pretrain_dataset import pretrain_dataset
from data.randaugment import BLIP_AUGS, RandomAugment
from data.utils import DataError
from data.video_dataset import VideoDataset
from data.vqa_dataset import vqa_collate_fn, vqa_dataset
from engine.config import ConfigError, require_keys
from utils import is_dist_avail_and_initialized

# CLIP's normalisation, used by every BLIP transform.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def eval_transform(image_size):
    """Resize to (S, S) bicubic, ToTensor, normalise (the original's transform_test)."""
    return transforms.Compose([
        transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def train_transform(image_size, min_scale=0.5):
    """The original's transform_train: random resized crop (scale min_scale..1, bicubic),
    horizontal flip, RandomAugment(2, 5) over BLIP's operation list, normalise."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(min_scale, 1.0),
                                     interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        RandomAugment(2, 5, isPIL=True, augs=BLIP_AUGS),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


DATASET_KEYS = {
    "pretrain": ("train_file", "image_size"),
    "caption_coco": ("image_root", "ann_root", "prompt", "image_size"),
    "nocaps": ("image_root", "ann_root", "image_size"),
    "retrieval_coco": ("image_root", "ann_root", "image_size"),
    "retrieval_flickr": ("image_root", "ann_root", "image_size"),
    "vqa": ("ann_root", "vqa_root", "vg_root", "train_files", "image_size"),
    "nlvr": ("image_root", "ann_root", "image_size"),
    "retrieval_msrvtt": ("video_root", "ann_root", "num_frm_test", "image_size"),
    "retrieval_custom": ("image_size",),
    "caption_custom": ("prompt", "image_size"),
}
CUSTOM = ("retrieval_custom", "caption_custom")


def check_dataset_config(dataset, config, path):
    """ConfigError naming the file and key unless `config` holds what create_dataset(dataset)
    reads (and, for your own data, names sources that exist); before any work."""
    if dataset not in DATASET_KEYS:
        raise ConfigError(f"config file {path}: unknown dataset {dataset!r}")
    require_keys(config, DATASET_KEYS[dataset], path)
    if dataset in CUSTOM:
        custom_dataset.check_config(config, path)


def create_dataset(dataset, config, min_scale=0.5):
    """The splits of task `dataset` (see the module docstring for names and keys)."""
    if dataset not in DATASET_KEYS:
        raise ValueError(f"create_dataset: unknown dataset {dataset!r}; "
                         f"known: {sorted(DATASET_KEYS)}")
    missing = [key for key in DATASET_KEYS[dataset] if key not in config]
    if missing:
        raise ValueError(f"create_dataset({dataset!r}): the config has no key(s) {missing}")

    size = config["image_size"]
    if dataset == "retrieval_msrvtt":
        return VideoDataset(config["video_root"], config["ann_root"],
                            num_frm=config["num_frm_test"], max_img_size=size,
                            frm_sampling_strategy=config.get("frm_sampling_strategy", "uniform"),
                            video_fmt=config.get("video_fmt", ".mp4"))

    train_tf = train_transform(size, min_scale)
    test_tf = eval_transform(size)

    if dataset in CUSTOM:
        splits = custom_dataset.load_splits(config)
        prompt = config["prompt"] if dataset == "caption_custom" else ""
        return (custom_dataset.custom_train(train_tf, *splits["train"], prompt=prompt),
                custom_dataset.custom_eval(test_tf, *splits["val"]),
                custom_dataset.custom_eval(test_tf, *splits["test"]))

    if dataset == "pretrain":
        return pretrain_dataset(config["train_file"], config.get("laion_path", ""), train_tf)

    if dataset == "caption_coco":
        image_root, ann_root = config["image_root"], config["ann_root"]
        return (coco_karpathy_train(train_tf, image_root, ann_root, prompt=config["prompt"]),
                coco_karpathy_caption_eval(test_tf, image_root, ann_root, "val"),
                coco_karpathy_caption_eval(test_tf, image_root, ann_root, "test"))

    if dataset == "nocaps":
        image_root, ann_root = config["image_root"], config["ann_root"]
        return (nocaps_eval(test_tf, image_root, ann_root, "val"),
                nocaps_eval(test_tf, image_root, ann_root, "test"))

    if dataset == "retrieval_coco":
        image_root, ann_root = config["image_root"], config["ann_root"]
        return (coco_karpathy_train(train_tf, image_root, ann_root),
                coco_karpathy_retrieval_eval(test_tf, image_root, ann_root, "val"),
                coco_karpathy_retrieval_eval(test_tf, image_root, ann_root, "test"))

    if dataset == "retrieval_flickr":
        image_root, ann_root = config["image_root"], config["ann_root"]
        return (flickr30k_train(train_tf, image_root, ann_root),
                flickr30k_retrieval_eval(test_tf, image_root, ann_root, "val"),
                flickr30k_retrieval_eval(test_tf, image_root, ann_root, "test"))

    if dataset == "vqa":
        roots = (config["ann_root"], config["vqa_root"], config["vg_root"])
        return (vqa_dataset(train_tf, *roots, train_files=config["train_files"], split="train"),
                vqa_dataset(test_tf, *roots, split="test"))

    # nlvr
    image_root, ann_root = config["image_root"], config["ann_root"]
    return (nlvr_dataset(train_tf, image_root, ann_root, "train"),
            nlvr_dataset(test_tf, image_root, ann_root, "val"),
            nlvr_dataset(test_tf, image_root, ann_root, "test"))


def create_sampler(datasets, shuffles, num_tasks, global_rank):
    """One DistributedSampler per dataset when running distributed, else None each.

    The original calls this only under torch.distributed (and passes [None, ...]
    otherwise); here the check is inside: with one task and no process group every
    sampler is None, so create_loader shuffles training data itself each epoch.
    """
    if num_tasks <= 1 and not is_dist_avail_and_initialized():
        return [None for _ in datasets]
    return [torch.utils.data.DistributedSampler(dataset, num_replicas=num_tasks,
                                                rank=global_rank, shuffle=shuffle)
            for dataset, shuffle in zip(datasets, shuffles)]


def create_loader(datasets, samplers, batch_size, num_workers, is_trains, collate_fns):
    """DataLoaders as the original: training loaders shuffle (when no sampler does) and
    drop the last incomplete batch; evaluation loaders keep order and every sample.

    Evaluation loaders draw their workers' seed from a generator of their own, not from the
    process's stream, so evaluating between epochs leaves the training streams where they were
    (a process playing several ranks evaluates once for all of them: engine/emulate.py)."""
    loaders = []
    for dataset, sampler, bs, n_worker, is_train, collate_fn in zip(
            datasets, samplers, batch_size, num_workers, is_trains, collate_fns):
        loaders.append(DataLoader(
            dataset,
            batch_size=bs,
            num_workers=n_worker,
            pin_memory=torch.cuda.is_available(),
            sampler=sampler,
            shuffle=(sampler is None) if is_train else False,
            collate_fn=collate_fn,
            drop_last=bool(is_train),
            generator=None if is_train else torch.Generator(),
        ))
    return loaders


__all__ = [
    "create_dataset", "check_dataset_config", "create_sampler", "create_loader", "eval_transform", "train_transform",
    "RandomAugment", "vqa_collate_fn", "DataError", "MEAN", "STD",
    "coco_karpathy_train", "coco_karpathy_caption_eval", "coco_karpathy_retrieval_eval",
    "flickr30k_train", "flickr30k_retrieval_eval", "vqa_dataset", "nlvr_dataset",
    "nocaps_eval", "pretrain_dataset", "VideoDataset",
]
