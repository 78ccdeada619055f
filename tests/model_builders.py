"""Build our models as the parity fixtures describe them (config.json of a task folder) and load
the fixture weights. Shared by the model test files."""
import json

import torch

from conftest import PARITY

PUBLIC = PARITY / "public"
ATOL = 1e-5


def fixture_dir(task):
    return PUBLIC / task


def fixture_config(task):
    return json.loads((fixture_dir(task) / "config.json").read_text())


def constructor_kwargs(task, **overrides):
    """The fixture's constructor arguments with the tiny ViT as a `vit` mapping and the tiny med
    config inlined (the path in config.json pointed to a temporary copy)."""
    config = fixture_config(task)
    kwargs = dict(config["constructor_kwargs"])
    tiny = config["tiny_vit"]
    kwargs["vit"] = {"width": tiny["embed_dim"], "depth": tiny["depth"], "heads": tiny["num_heads"],
                     "patch_size": tiny["patch_size"]}
    kwargs["med_config"] = config["med_config"]
    kwargs.update(overrides)
    return kwargs


def load_fixture(task, name):
    return torch.load(fixture_dir(task) / name, weights_only=False)


def build_model(cls, task, **overrides):
    """cls(**fixture kwargs) with model.pth loaded strictly, in eval mode."""
    model = cls(**constructor_kwargs(task, **overrides))
    model.load_state_dict(torch.load(fixture_dir(task) / "model.pth", weights_only=True), strict=True)
    return model.eval()


def zero_dropout(model):
    """Dropout and drop-path probabilities to 0, as the fixtures' training-mode losses."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    return model


def assert_close(actual, expected, atol=ATOL, what=""):
    actual = torch.as_tensor(actual, dtype=torch.float32)
    expected = torch.as_tensor(expected, dtype=torch.float32)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert diff <= atol, f"{what}: max abs difference {diff:.3g} > {atol}"
