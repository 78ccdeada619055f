"""Every model class's state_dict against the original's at full size (tests/parity/manifests):
the same keys in the same order, shapes, non-float32 dtypes, parameter counts and tied tensors.
Models are built on the meta device, so nothing is allocated."""
import importlib
import json

import pytest
import torch

from conftest import PARITY, REPO

MANIFESTS = PARITY / "manifests"

# The official configs/med_config.json and bert_config.json values, for a checkout whose
# configs/ folder is not there.
OFFICIAL_TEXT_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524,
    "encoder_width": 768, "add_cross_attention": True,
}
EXTRA_KWARGS = {"BLIP_Pretrain": {"vit_checkpoint": None}}  # no ImageNet ViT download


def _manifests():
    found = []
    for path in sorted(MANIFESTS.glob("*.json")):
        manifest = json.loads(path.read_text())
        module_file = REPO / (manifest["module"].replace(".", "/") + ".py")
        if module_file.exists():  # task models written elsewhere are checked once they exist
            found.append(pytest.param(path, id=path.stem))
    return found


def _med_config(name):
    path = REPO / name
    if path.exists():
        return str(path)
    config = dict(OFFICIAL_TEXT_CONFIG)
    if name.endswith("bert_config.json"):
        config.update(architectures=["BertForMaskedLM"], vocab_size=30522)
    return config


def build_on_meta(manifest):
    cls = getattr(importlib.import_module(manifest["module"]), manifest["class_name"])
    kwargs = dict(manifest["constructor_kwargs"])
    kwargs["med_config"] = _med_config(kwargs["med_config"])
    kwargs["vit"] = manifest["vit"]
    kwargs.update(EXTRA_KWARGS.get(manifest["class_name"], {}))
    with torch.device("meta"):
        return cls(**kwargs)


@pytest.mark.parametrize("path", _manifests())
def test_state_dict_matches_manifest(path):
    manifest = json.loads(path.read_text())
    model = build_on_meta(manifest)
    state = model.state_dict()

    ours = {key: list(value.shape) for key, value in state.items()}
    missing = [k for k in manifest["keys"] if k not in ours]
    extra = [k for k in ours if k not in manifest["keys"]]
    assert not missing and not extra, f"{path.name}: missing {missing[:5]}, extra {extra[:5]}"
    wrong = {k: (ours[k], shape) for k, shape in manifest["keys"].items() if ours[k] != shape}
    assert not wrong, f"{path.name}: shapes differ (ours, original): {dict(list(wrong.items())[:5])}"
    assert list(ours) == list(manifest["keys"]), f"{path.name}: same keys, different order"

    dtypes = {k: str(v.dtype).replace("torch.", "") for k, v in state.items() if v.dtype != torch.float32}
    assert dtypes == manifest["dtypes"]

    parameters = list(model.parameters())  # shared Parameters counted once
    assert sum(p.numel() for p in parameters) == manifest["total_parameters"]
    assert sum(p.numel() for p in parameters if p.requires_grad) == manifest["total_trainable_parameters"]
    assert sum(v.numel() for v in state.values()) == manifest["total_state_dict_elements"]

    # tied tensors: the same Parameter under several state-dict keys
    by_tensor = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    tied = {frozenset(names) for names in by_tensor.values() if len(names) > 1}
    assert tied == {frozenset(group) for group in manifest["tied_key_groups"]}
