"""MSRVTT-style text-video retrieval evaluation, decoded with PyAV.

Annotation (in ann_root, downloaded from the original's URL when missing):
msrvtt_test.jsonl, one {"clip_name": "video7020", "caption": str} per line; the video
is video_root/<clip_name><video_fmt>. Text i belongs to video i (txt2video = video2txt =
identity), as in the original 1k-test file.

Frames as the original VideoDataset (decord): resized to max_img_size x max_img_size,
`num_frm` frames chosen by `frm_sampling_strategy` ('uniform': numpy's
arange(0, n, n / num_frm, dtype=int), whose integer step is int(n / num_frm); 'rand';
'headtail'), scaled to [0, 1] and normalised with the CLIP mean/std of the image eval
transform. PyAV replaces decord (unmaintained); frames are scaled bicubically like
FFmpeg's scale filter that decord uses.
"""
import os
import random

import numpy as np
import torch
from torch.utils.data import Dataset

from data.utils import DataError, fetch_annotation, load_jsonl, pre_caption

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SAMPLING_STRATEGIES = ("uniform", "rand", "headtail")


def sample_frame_indices(num_frames, num_frm, strategy):
    """Indices of the frames to keep out of `num_frames`, as the original chooses them."""
    if strategy == "uniform":
        return [int(i) for i in np.arange(0, num_frames, num_frames / num_frm, dtype=int)]
    if strategy == "rand":
        return sorted(random.sample(range(num_frames), num_frm))
    if strategy == "headtail":
        half = num_frames // 2
        head = sorted(random.sample(range(half), num_frm // 2))
        tail = sorted(random.sample(range(half, num_frames), num_frm // 2))
        return head + tail
    raise ValueError(f"invalid frame sampling strategy {strategy!r} "
                     f"(use 'uniform', 'rand' or 'headtail')")


def _decode_frames(path, wanted, size):
    """{position: HxWx3 uint8 array} for the frame positions in `wanted`.

    Decodes in order and stops after the last wanted frame.
    """
    import av

    targets = set(wanted)
    last = max(targets) if targets else -1
    frames = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for position, frame in enumerate(container.decode(stream)):
            if position in targets:
                kwargs = {"format": "rgb24"}
                if size:
                    kwargs.update(width=size, height=size, interpolation="BICUBIC")
                frames[position] = frame.to_ndarray(**kwargs)
            if position >= last:
                break
    return frames


def _frame_count(path, use_header=True):
    """Frames in the video: the container's count, or (when absent) decoded and counted."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        if use_header and stream.frames > 0:
            return stream.frames
        return sum(1 for _ in container.decode(stream))


def load_video_frames(path, num_frm, strategy="uniform", size=None):
    """(num_frm, 3, H, W) uint8 tensor of sampled frames, resized to size x size if given."""
    num_frames = _frame_count(path)
    if num_frames <= 0:
        raise ValueError("the video has no frames")
    indices = sample_frame_indices(num_frames, num_frm, strategy)
    frames = _decode_frames(path, indices, size)
    if len(frames) < len(set(indices)):
        # The container's frame count overstated the decodable frames: sample again
        # from what is really there.
        indices = sample_frame_indices(_frame_count(path, use_header=False), num_frm, strategy)
        frames = _decode_frames(path, indices, size)
    array = np.stack([frames[i] for i in indices])
    return torch.from_numpy(array).permute(0, 3, 1, 2)


class VideoDataset(Dataset):
    """Items (video, index): video is a (num_frm, 3, max_img_size, max_img_size) float
    tensor normalised like the image eval transform. Attributes .text (pre_caption(., 40)),
    .txt2video, .video2txt, .annotation."""

    def __init__(self, video_root, ann_root, num_frm=4, frm_sampling_strategy="rand",
                 max_img_size=384, video_fmt=".mp4"):
        if frm_sampling_strategy not in SAMPLING_STRATEGIES:
            raise ValueError(f"VideoDataset: frm_sampling_strategy must be one of "
                             f"{SAMPLING_STRATEGIES}, got {frm_sampling_strategy!r}")
        self.ann_file = fetch_annotation(ann_root, "msrvtt_test.jsonl")
        self.annotation = load_jsonl(self.ann_file, {"clip_name": str, "caption": str})
        self.num_frm = num_frm
        self.frm_sampling_strategy = frm_sampling_strategy
        self.max_img_size = max_img_size
        self.video_root = video_root
        self.video_fmt = video_fmt
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(STD).view(1, 3, 1, 1)

        self.text = [pre_caption(ann["caption"], 40) for ann in self.annotation]
        self.txt2video = list(range(len(self.annotation)))
        self.video2txt = self.txt2video

    def __len__(self):
        return len(self.annotation)

    def __getitem__(self, index):
        ann = self.annotation[index]
        path = os.path.join(self.video_root, ann["clip_name"] + self.video_fmt)
        if not os.path.isfile(path):
            raise DataError(f"Video not found: {path} (entry {index} of {self.ann_file})")
        try:
            frames = load_video_frames(path, self.num_frm, self.frm_sampling_strategy,
                                       self.max_img_size)
        except Exception as error:  # PyAV raises its own error types for bad files
            raise DataError(f"Cannot read video {path} (entry {index} of {self.ann_file}): "
                            f"{error}") from error
        video = (frames.float() / 255.0 - self.mean) / self.std
        return video, index
