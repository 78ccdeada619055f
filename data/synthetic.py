"""A small, real, learnable BLIP dataset of coloured shapes, in every original format.

    python -m data.synthetic ROOT [--seed 0] [--num-images 200] [--image-size 64]

Each image shows 1-3 identical shapes of one colour in a row in the top, middle or bottom
third of a light grey canvas; its captions state colour, shape, position and count ("two
red circles at the top"). The same images feed every task's annotation files, under the
file names the original loaders read. Everything is a function of the seed.

Classes: colours red, green, blue, yellow; shapes circle, square, triangle; positions
top, middle, bottom (horizontal bands, so the training transform's random left-right flip
keeps captions true); counts 1, 2, 3 (4 x 3 x 3 x 3 = 108 combinations, cycled in a seeded
order). Images are split 70/15/15 into train/val/test (same split for every task).
Videos: one shape of one colour moving left to right, right to left, top to bottom or
bottom to top.

Layout under ROOT and the config keys that point there:

    ROOT/images/synth/COCO_synth_000000000001.jpg ...
        image_root (caption_coco, retrieval_coco, retrieval_flickr, nlvr, nocaps),
        vqa_root and vg_root (vqa): entries hold 'synth/COCO_synth_<12-digit id>.jpg', so
        the original's caption-eval id parsing yields the id.
    ROOT/annotation/                                            ann_root (every task)
        coco_karpathy_train.json     one entry per caption: {image, caption, image_id}
        coco_karpathy_{val,test}.json   {image, caption: [5 captions]}
        flickr30k_{train,val,test}.json   same formats
        vqa_train.json, vqa_val.json    {question_id, question, answer: [10], image,
                                        dataset: 'vqa'} (train and val images; both are
                                        training files, as in BLIP)
        vg_qa.json                      {question_id, question, answer: str, image,
                                        dataset: 'vg'} (train images)
        vqa_test.json                   {question_id, question, image, dataset: 'vqa',
                                        answer: [10]} (test images; 'answer' is extra, for
                                        local VQA accuracy; the loader ignores it)
        answer_list.json                every answer of every question type
        nlvr_train.json, nlvr_dev.json, nlvr_test.json   {images: [a, b], sentence,
                                        label: 'True'|'False'}
        nocaps_{val,test}.json          {image, img_id}; nocaps_{val,test}_gt.json: COCO
                                        caption ground truth for CIDEr etc.
        pretrain_synth.json             {image: absolute path, caption} (train images)
        msrvtt_test.jsonl               {clip_name, caption} per line
    ROOT/annotation/coco_gt/coco_karpathy_{val,test}_gt.json    coco_gt_root
    ROOT/laion/laion_synth_000.json, laion_synth_001.json       laion_path (pretrain shards)
    ROOT/videos/video0.mp4 ...                                  video_root
    ROOT/synthetic.json     this mapping of config keys (plus the class lists and the data
                            version), written last: it marks a finished dataset

So a toy config sets: image_root, vqa_root, vg_root = ROOT/images; ann_root =
ROOT/annotation; coco_gt_root = ROOT/annotation/coco_gt; train_files = ['vqa_train',
'vqa_val', 'vg_qa']; train_file = [ROOT/annotation/pretrain_synth.json]; laion_path =
ROOT/laion (or '' for none); video_root = ROOT/videos. `make_synthetic` returns that dict.
NoCaps metrics: metrics.caption_eval(ROOT/annotation/nocaps_val_gt.json, results_file).
Clips have `video_frames` frames (16 by default): keep num_frm_test at or below that.
"""
import argparse
import itertools
import json
import os
import random
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (215, 45, 45), "green": (45, 160, 65), "blue": (45, 85, 215),
           "yellow": (230, 195, 30)}
SHAPES = ("circle", "square", "triangle")
# Horizontal bands only: the training transform flips images left-right at random, which
# would make 'left'/'right' captions wrong half the time.
POSITIONS = ("top", "middle", "bottom")
COUNTS = (1, 2, 3)
DIRECTIONS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
WHERE = {"top": "at the top", "middle": "in the middle", "bottom": "at the bottom"}
BACKGROUND = (232, 232, 232)
ANSWER_LIST = (list(COLOURS) + list(SHAPES) + [str(c) for c in COUNTS] + list(POSITIONS)
               + ["yes", "no"])
VQA_TRAIN_FILES = ["vqa_train", "vqa_val", "vg_qa"]
# Bumped whenever the generated data changes: a dataset written by another version is
# regenerated on its next use (preflight.prepare_synthetic_data reads it from synthetic.json).
DATA_VERSION = 2


# --------------------------------------------------------------------------------------
# Scenes, images and captions
# --------------------------------------------------------------------------------------

def _plural(shape, count):
    return shape if count == 1 else shape + "s"


def captions_for(scene):
    """Five captions, each stating count, colour, shape and position."""
    colour, count, where = scene["colour"], scene["count"], WHERE[scene["position"]]
    noun = _plural(scene["shape"], count)
    number = NUMBER_WORDS[count]
    verb = "is" if count == 1 else "are"
    return [
        f"{number.capitalize()} {colour} {noun} {where}.",
        f"there {verb} {number} {colour} {noun} {where} of the picture",
        f"{number} {colour} {noun} {where} on a grey background",
        f"a picture with {number} {colour} {noun} {where}",
        f"{where}: {number} {colour} {noun}",
    ]


def _region(position, size):
    """(x0, y0, x1, y1) of the band of the canvas that holds the shapes."""
    third = size / 3
    row = POSITIONS.index(position)
    return (0, row * third, size, (row + 1) * third)


def _draw_shape(draw, shape, cx, cy, r, fill):
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = 0.88 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.85 * r), (cx + r, cy + 0.85 * r)], fill=fill)


def draw_scene(scene, size, rng):
    """count shapes of one colour, spread along their band of the canvas."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = _region(scene["position"], size)
    count = scene["count"]
    vertical = (y1 - y0) > (x1 - x0)
    long_side = (y1 - y0) if vertical else (x1 - x0)
    short_side = (x1 - x0) if vertical else (y1 - y0)
    radius = 0.42 * min(short_side, long_side / count)
    fill = tuple(int(np.clip(c + rng.randint(-20, 20), 0, 255)) for c in COLOURS[scene["colour"]])
    for k in range(count):
        along = (k + 0.5) / count
        jitter = 0.12 * radius
        if vertical:
            cx, cy = (x0 + x1) / 2, y0 + along * long_side
        else:
            cx, cy = x0 + along * long_side, (y0 + y1) / 2
        cx += rng.uniform(-jitter, jitter)
        cy += rng.uniform(-jitter, jitter)
        _draw_shape(draw, scene["shape"], cx, cy, radius * rng.uniform(0.85, 1.0), fill)
    return image


def make_scenes(num_images, rng):
    combos = list(itertools.product(COLOURS, SHAPES, POSITIONS, COUNTS))
    rng.shuffle(combos)
    scenes = []
    for i in range(num_images):
        colour, shape, position, count = combos[i % len(combos)]
        image_id = i + 1
        scenes.append({"id": image_id, "colour": colour, "shape": shape,
                       "position": position, "count": count,
                       "image": f"synth/COCO_synth_{image_id:012d}.jpg"})
    order = list(range(num_images))
    rng.shuffle(order)
    n_eval = max(2, (num_images * 15) // 100)
    splits = {"val": sorted(order[:n_eval]), "test": sorted(order[n_eval:2 * n_eval]),
              "train": sorted(order[2 * n_eval:])}
    return scenes, {name: [scenes[i] for i in idx] for name, idx in splits.items()}


# --------------------------------------------------------------------------------------
# Annotation formats
# --------------------------------------------------------------------------------------

def _write_json(obj, path):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=None)


def _caption_gt(scenes):
    """COCO caption ground truth (the format of coco_karpathy_*_gt.json)."""
    annotations, ann_id = [], 0
    for scene in scenes:
        for caption in captions_for(scene):
            ann_id += 1
            annotations.append({"image_id": scene["id"], "caption": caption, "id": ann_id})
    return {"info": {"description": "synthetic shapes"}, "licenses": [], "type": "captions",
            "images": [{"id": s["id"], "file_name": s["image"]} for s in scenes],
            "annotations": annotations}


def _karpathy_train(scenes, id_prefix):
    return [{"image": s["image"], "caption": c, "image_id": f"{id_prefix}{s['id']}"}
            for s in scenes for c in captions_for(s)]


def _karpathy_eval(scenes):
    return [{"image": s["image"], "caption": captions_for(s)} for s in scenes]


def vqa_questions(scene, rng):
    """[(question, answer)] about colour, shape, count, position and presence."""
    count, shape = scene["count"], scene["shape"]
    noun = _plural(shape, count)
    other = rng.choice(list(COLOURS))
    return [
        (f"What color {'is the ' + shape if count == 1 else 'are the ' + noun}?",
         scene["colour"]),
        ("What shape is shown in the picture?", shape),
        ("How many shapes are there?", str(count)),
        (f"Where {'is the ' + shape if count == 1 else 'are the ' + noun}?", scene["position"]),
        (f"Is there a {other} shape?", "yes" if other == scene["colour"] else "no"),
    ]


def _vqa_answers(answer):
    # 10 human answers; a count is once given in words, so answer weights are not all 1.
    if answer.isdigit():
        return [answer] * 9 + [NUMBER_WORDS[int(answer)]]
    return [answer] * 10


def _vqa_entries(scenes, rng, next_id, with_answers=True):
    entries = []
    for scene in scenes:
        for question, answer in vqa_questions(scene, rng):
            entry = {"question_id": next(next_id), "question": question,
                     "image": scene["image"], "dataset": "vqa"}
            if with_answers:
                entry["answer"] = _vqa_answers(answer)
            entries.append(entry)
    return entries


def _vg_entries(scenes, rng, next_id):
    entries = []
    for scene in scenes:
        noun = _plural(scene["shape"], scene["count"])
        for question, answer in (("what is the color of the shapes?", scene["colour"]),
                                 (f"how many {noun} are in the image?", str(scene["count"])),
                                 ("which shape appears in the image?", scene["shape"])):
            entries.append({"question_id": next(next_id), "question": question,
                            "answer": answer, "image": scene["image"], "dataset": "vg"})
    return entries


# NLVR2 statement kinds, drawn uniformly; half are about colour, the attribute a tiny model
# learns to see first. Each maps (left scene, right scene, word) to the statement and its truth,
# and lists the words it can take. Statements naming 'left'/'right' stay true when both the
# images and those words are swapped (what nlvr_dataset does at random); the others are
# symmetric.
NLVR_KINDS = {
    "left_colour": (lambda a, b, c: (f"The left image contains {c} shapes.", a["colour"] == c), COLOURS),
    "right_colour": (lambda a, b, c: (f"The right image contains {c} shapes.", b["colour"] == c), COLOURS),
    "any_colour": (lambda a, b, c: (f"One of the images shows {c} shapes.", c in (a["colour"], b["colour"])),
                   COLOURS),
    "both_colour": (lambda a, b, c: (f"Both images show {c} shapes.", a["colour"] == b["colour"] == c), COLOURS),
    "right_shape": (lambda a, b, s: (f"The right image shows {s}s.", b["shape"] == s), SHAPES),
    "total": (lambda a, b, k: (f"There are {NUMBER_WORDS[k]} shapes in total.", a["count"] + b["count"] == k),
              range(2, 7)),
    "more": (lambda a, b, _: ("The left image has more shapes than the right image.", a["count"] > b["count"]),
             (None,)),
    "same_colour": (lambda a, b, _: ("Both images show shapes of the same color.", a["colour"] == b["colour"]),
                    (None,)),
}
# Statements per image of each split: enough for the toy model to learn them, and for dev/test
# accuracy to be measured to a few points.
NLVR_STATEMENTS_PER_IMAGE = {"train": 8, "val": 4, "test": 4}


def _nlvr_entries(scenes, rng, per_image):
    """per_image statements about each scene and another one of the split, true for exactly
    half of them: each draws a truth and a kind, then a pair (either order) and a word that
    give it (the next kind if none does, which happens only in tiny splits). Pairs come from
    one split only, so no dev/test image is seen in training."""
    entries = []
    for _ in range(per_image):
        for i, scene in enumerate(scenes):
            want = len(entries) % 2 == 0
            others = scenes[:i] + scenes[i + 1:]
            for kind in rng.sample(sorted(NLVR_KINDS), len(NLVR_KINDS)):
                statement, words = NLVR_KINDS[kind]
                candidates = [(left, right, word) for other in others
                              for left, right in ((scene, other), (other, scene)) for word in words
                              if statement(left, right, word)[1] == want]
                if candidates:
                    break
            left, right, word = rng.choice(candidates)
            entries.append({"images": [left["image"], right["image"]],
                            "sentence": statement(left, right, word)[0],
                            "label": "True" if want else "False"})
    return entries


# --------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------

def _video_codec():
    import av
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_clip(path, colour, shape, direction, size, num_frames, fps=8):
    """An mp4 of one shape crossing the frame in `direction` (start, end)."""
    import av

    start, end = direction
    points = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8)}
    (sx, sy), (ex, ey) = points[start], points[end]
    with av.open(path, "w") as container:
        stream = container.add_stream(_video_codec(), rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1  # deterministic bitstream
        for t in range(num_frames):
            alpha = t / max(1, num_frames - 1)
            image = Image.new("RGB", (size, size), BACKGROUND)
            cx, cy = (sx + alpha * (ex - sx)) * size, (sy + alpha * (ey - sy)) * size
            _draw_shape(ImageDraw.Draw(image), shape, cx, cy, 0.14 * size, COLOURS[colour])
            frame = av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------

def make_synthetic(root, seed=0, num_images=200, image_size=64, num_videos=12,
                   video_frames=16):
    """Write the dataset under root (see the module docstring); returns the config paths.

    Returns {'image_root', 'vqa_root', 'vg_root', 'ann_root', 'coco_gt_root',
    'train_files', 'train_file', 'laion_path', 'video_root'} (absolute paths).
    """
    if num_images < 8:
        raise ValueError(f"make_synthetic: num_images must be at least 8, got {num_images}")
    rng = random.Random(seed)
    root = os.path.abspath(root)
    image_dir = os.path.join(root, "images")
    ann_root = os.path.join(root, "annotation")
    gt_root = os.path.join(ann_root, "coco_gt")
    laion_dir = os.path.join(root, "laion")
    video_dir = os.path.join(root, "videos")
    for folder in (os.path.join(image_dir, "synth"), gt_root, laion_dir, video_dir):
        os.makedirs(folder, exist_ok=True)

    def ann(name):
        return os.path.join(ann_root, name)

    scenes, split = make_scenes(num_images, rng)
    for scene in scenes:
        draw_scene(scene, image_size, rng).save(os.path.join(image_dir, scene["image"]),
                                                quality=95)

    # COCO Karpathy and Flickr30k (caption / retrieval)
    _write_json(_karpathy_train(split["train"], "coco_"), ann("coco_karpathy_train.json"))
    _write_json(_karpathy_train(split["train"], ""), ann("flickr30k_train.json"))
    for name in ("val", "test"):
        _write_json(_karpathy_eval(split[name]), ann(f"coco_karpathy_{name}.json"))
        _write_json(_karpathy_eval(split[name]), ann(f"flickr30k_{name}.json"))
        _write_json(_caption_gt(split[name]),
                    os.path.join(gt_root, f"coco_karpathy_{name}_gt.json"))
        # NoCaps
        _write_json([{"image": s["image"], "img_id": s["id"]} for s in split[name]],
                    ann(f"nocaps_{name}.json"))
        _write_json(_caption_gt(split[name]), ann(f"nocaps_{name}_gt.json"))

    # VQA v2 + Visual Genome QA
    question_ids = itertools.count(1000)
    _write_json(_vqa_entries(split["train"], rng, question_ids), ann("vqa_train.json"))
    _write_json(_vqa_entries(split["val"], rng, question_ids), ann("vqa_val.json"))
    _write_json(_vg_entries(split["train"], rng, question_ids), ann("vg_qa.json"))
    _write_json(_vqa_entries(split["test"], rng, question_ids), ann("vqa_test.json"))
    _write_json(ANSWER_LIST, ann("answer_list.json"))

    # Pre-training lists: absolute image paths (the original opens them as written)
    def pretrain_pairs(scenes, pick):
        return [{"image": os.path.join(image_dir, s["image"]), "caption": captions_for(s)[k]}
                for s in scenes for k in pick]
    _write_json(pretrain_pairs(split["train"], (0, 1, 2)), ann("pretrain_synth.json"))
    half = len(split["train"]) // 2
    _write_json(pretrain_pairs(split["train"][:half], (3,)),
                os.path.join(laion_dir, "laion_synth_000.json"))
    _write_json(pretrain_pairs(split["train"][half:], (4,)),
                os.path.join(laion_dir, "laion_synth_001.json"))

    # MSRVTT-style video retrieval
    video_combos = list(itertools.product(COLOURS, SHAPES, DIRECTIONS))
    rng.shuffle(video_combos)
    with open(ann("msrvtt_test.jsonl"), "w", encoding="utf-8") as f:
        for k in range(num_videos):
            colour, shape, direction = video_combos[k % len(video_combos)]
            write_clip(os.path.join(video_dir, f"video{k}.mp4"), colour, shape, direction,
                       image_size, video_frames)
            caption = f"a {colour} {shape} moves from the {direction[0]} to the {direction[1]}"
            f.write(json.dumps({"clip_name": f"video{k}", "caption": caption}) + "\n")

    # NLVR2, drawn last so that changing the statements changes no other file
    for name, filename in (("train", "nlvr_train.json"), ("val", "nlvr_dev.json"),
                           ("test", "nlvr_test.json")):
        _write_json(_nlvr_entries(split[name], rng, NLVR_STATEMENTS_PER_IMAGE[name]), ann(filename))

    paths = {"image_root": image_dir, "vqa_root": image_dir, "vg_root": image_dir,
             "ann_root": ann_root, "coco_gt_root": gt_root, "train_files": VQA_TRAIN_FILES,
             "train_file": [ann("pretrain_synth.json")], "laion_path": laion_dir,
             "video_root": video_dir}
    info = {"version": DATA_VERSION, "config": paths, "seed": seed, "num_images": num_images,
            "image_size": image_size,
            "splits": {name: len(scenes) for name, scenes in split.items()},
            "num_videos": num_videos, "colours": list(COLOURS), "shapes": list(SHAPES),
            "positions": list(POSITIONS), "counts": list(COUNTS),
            "answer_list": ANSWER_LIST}
    _write_json(info, os.path.join(root, "synthetic.json"))
    return paths


def corrupt_captions(entries, fraction, seed=0):
    """A noisy copy of a pre-training list, as web data is: `fraction` of the entries (chosen
    at random) get the caption of another entry whose image has none of theirs (a wrong
    description, not a paraphrase). Returns (entries, corrupted), corrupted[i] True for each
    changed entry. Used to check that CapFilt's filter finds them."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    rng = random.Random(seed)
    captions_of = {}
    for e in entries:
        captions_of.setdefault(e["image"], set()).add(e["caption"])
    captions = [e["caption"] for e in entries]
    chosen = set(rng.sample(range(len(entries)), round(fraction * len(entries))))
    noisy, corrupted = [], []
    for i, e in enumerate(entries):
        if i in chosen:
            others = [c for c in captions if c not in captions_of[e["image"]]]
            e = {**e, "caption": rng.choice(others)}
        noisy.append(e)
        corrupted.append(i in chosen)
    return noisy, corrupted


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the synthetic shapes dataset.")
    parser.add_argument("root", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-videos", type=int, default=12)
    args = parser.parse_args(argv)
    start = time.time()
    paths = make_synthetic(args.root, seed=args.seed, num_images=args.num_images,
                           image_size=args.image_size, num_videos=args.num_videos)
    print(json.dumps(paths, indent=2))
    print(f"synthetic dataset written to {os.path.abspath(args.root)} in "
          f"{time.time() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
