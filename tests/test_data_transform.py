"""Eval transform against the original's output on real photos; training transform and
RandomAugment operations."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms
from torchvision.transforms import InterpolationMode

import data
from conftest import PARITY
from data import randaugment
from data.randaugment import BLIP_AUGS, OPERATIONS, RandomAugment

TRANSFORM_DIR = PARITY / "public" / "transform"
PHOTOS = ("astronaut", "coffee", "chelsea")
MEAN = torch.tensor(data.MEAN).view(3, 1, 1)
STD = torch.tensor(data.STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def reference():
    return torch.load(TRANSFORM_DIR / "outputs.pt")


@pytest.mark.parametrize("name", PHOTOS)
def test_eval_transform_matches_original(name, reference):
    image = Image.open(TRANSFORM_DIR / f"{name}.png").convert("RGB")
    out = data.eval_transform(384)(image)
    expected = reference[name].float()  # stored as float16
    assert out.shape == expected.shape == (3, 384, 384)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=0)  # float16 spacing near 2
    checksum = reference[f"{name}_float32_checksum"]
    out64 = out.double()
    assert out64.sum().item() == pytest.approx(checksum["sum"], rel=1e-5, abs=1e-2)
    assert out64.abs().sum().item() == pytest.approx(checksum["abs_sum"], rel=1e-6)
    assert out64.mean(dim=(1, 2)).tolist() == pytest.approx(checksum["mean_per_channel"],
                                                            abs=1e-6)


def test_eval_transform_any_size():
    image = Image.new("RGB", (50, 30), (255, 0, 0))
    out = data.eval_transform(48)(image)
    assert out.shape == (3, 48, 48)
    expected_red = (1 - data.MEAN[0]) / data.STD[0]
    assert out[0].mean().item() == pytest.approx(expected_red, abs=1e-4)


def test_train_transform_structure():
    steps = data.train_transform(64, min_scale=0.2).transforms
    crop, flip, augment, to_tensor, normalize = steps
    assert isinstance(crop, transforms.RandomResizedCrop)
    assert crop.size == (64, 64) and crop.scale == (0.2, 1.0)
    assert crop.interpolation == InterpolationMode.BICUBIC
    assert isinstance(flip, transforms.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(augment, RandomAugment)
    assert (augment.N, augment.M, augment.isPIL) == (2, 5, True)
    assert augment.augs == ["Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
                            "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"]
    assert isinstance(to_tensor, transforms.ToTensor)
    assert tuple(normalize.mean) == data.MEAN and tuple(normalize.std) == data.STD
    assert data.train_transform(32).transforms[0].scale == (0.5, 1.0)  # default min_scale


def test_train_transform_output_shape_range_and_randomness():
    rng = np.random.RandomState(0)
    image = Image.fromarray(rng.randint(0, 256, (60, 80, 3), dtype=np.uint8))
    tf = data.train_transform(32)
    torch.manual_seed(0)
    np.random.seed(0)
    outs = [tf(image) for _ in range(6)]
    low, high = (0 - MEAN) / STD, (1 - MEAN) / STD
    for out in outs:
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        assert (out >= low - 1e-5).all() and (out <= high + 1e-5).all()
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


# ---------------------------------------------------------------- RandomAugment operations

def _gradient_image(h=40, w=48):
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1) + 30
    return np.clip(img, 0, 200).astype(np.uint8)


def test_enhance_ops_are_identity_at_blip_magnitude():
    img = _gradient_image()
    for name in ("Brightness", "Sharpness", "Color", "Contrast"):
        func, to_args = OPERATIONS[name]
        assert to_args(5) == (1.0,)
        if name in ("Brightness", "Sharpness"):
            assert np.array_equal(func(img, *to_args(5)), img), name


def test_autocontrast_and_equalize_match_pil():
    img = _gradient_image()
    pil = Image.fromarray(img)
    assert np.array_equal(randaugment.autocontrast_func(img), np.array(ImageOps.autocontrast(pil)))
    assert np.array_equal(randaugment.equalize_func(img), np.array(ImageOps.equalize(pil)))
    out = randaugment.autocontrast_func(img)
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255
    flat = np.full((8, 8, 3), 77, np.uint8)  # constant channels are left alone
    assert np.array_equal(randaugment.autocontrast_func(flat), flat)
    assert np.array_equal(randaugment.equalize_func(flat), flat)


def test_brightness_and_sharpness_change_the_image_at_high_magnitude():
    img = _gradient_image()
    brighter = randaugment.brightness_func(img, 1.9)
    assert (brighter.astype(int) >= img).all() and (brighter > img).any()
    smooth = randaugment.sharpness_func(img, 0.0)
    sharp = randaugment.sharpness_func(img, 1.9)
    assert not np.array_equal(smooth, img) and sharp.shape == img.shape


def _dot_image(x, y, size=41):
    img = np.zeros((size, size, 3), np.uint8)
    img[y, x] = 255
    return img


def _bright_spot(img):
    ys, xs = np.nonzero(img[..., 0] > 60)
    weights = img[ys, xs, 0].astype(float)
    return (xs * weights).sum() / weights.sum(), (ys * weights).sum() / weights.sum()


def test_geometric_ops_move_content_like_the_original():
    # The original's cv2 warps: TranslateX(offset) moves content left by offset pixels,
    # ShearX(f) moves (x, y) to (x + f*y, y), Rotate(d) turns counter-clockwise.
    x, y = _bright_spot(randaugment.translate_x_func(_dot_image(20, 10), 5, (0, 0, 0)))
    assert (x, y) == pytest.approx((15, 10), abs=0.6)
    x, y = _bright_spot(randaugment.translate_y_func(_dot_image(20, 10), -5, (0, 0, 0)))
    assert (x, y) == pytest.approx((20, 15), abs=0.6)
    x, y = _bright_spot(randaugment.shear_x_func(_dot_image(10, 20), 0.15, (0, 0, 0)))
    assert (x, y) == pytest.approx((13, 20), abs=0.6)
    x, y = _bright_spot(randaugment.shear_y_func(_dot_image(20, 10), 0.15, (0, 0, 0)))
    assert (x, y) == pytest.approx((20, 13), abs=0.6)
    x, y = _bright_spot(randaugment.rotate_func(_dot_image(35, 20), 15, (0, 0, 0)))
    # centre (20.5, 20.5) under PIL's pixel-centre convention; radius 15 -> up and left
    assert y < 20 - 3 and 33 < x < 35.5


def test_geometric_ops_fill_with_grey():
    img = np.full((20, 20, 3), 255, np.uint8)
    func, to_args = OPERATIONS["TranslateX"]
    offset, fill = to_args(5)
    assert abs(offset) == 5.0 and fill == (128, 128, 128)
    out = func(img, offset, fill)
    grey_columns = out[:, :4] if offset < 0 else out[:, -4:]
    assert (grey_columns == 128).all()


def test_level_to_args_magnitudes():
    np.random.seed(0)
    assert {abs(OPERATIONS["ShearX"][1](5)[0]) for _ in range(10)} == {0.15}
    assert {abs(OPERATIONS["Rotate"][1](5)[0]) for _ in range(10)} == {15.0}
    signs = {np.sign(OPERATIONS["TranslateY"][1](5)[0]) for _ in range(40)}
    assert signs == {-1.0, 1.0}
    assert OPERATIONS["Solarize"][1](5) == (128,) and OPERATIONS["Posterize"][1](5) == (2,)


def test_random_augment_applies_sampled_ops_with_probability_half():
    img = Image.fromarray(_gradient_image())
    augment = RandomAugment(2, 5, isPIL=True, augs=["TranslateX"])
    np.random.seed(0)
    outs = [augment(img) for _ in range(200)]
    assert all(isinstance(o, np.ndarray) and o.dtype == np.uint8 and o.shape == (40, 48, 3)
               and o.flags.writeable for o in outs)
    unchanged = sum(np.array_equal(o, np.array(img)) for o in outs)
    # both draws skipped with probability 0.25
    assert 25 <= unchanged <= 75


def test_random_augment_every_op_runs():
    img = _gradient_image()
    augment = RandomAugment(N=3, M=9)  # default: every operation
    assert sorted(augment.augs) == sorted(OPERATIONS)
    np.random.seed(1)
    for _ in range(60):
        out = augment(img)
        assert out.shape == img.shape and out.dtype == np.uint8
    with pytest.raises(ValueError, match="Blur"):
        RandomAugment(augs=["Blur"])
    assert set(BLIP_AUGS) <= set(OPERATIONS)
