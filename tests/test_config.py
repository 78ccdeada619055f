"""Config loading: typed and nested overrides, errors that name the key and the file, the
official YAMLs in configs/, the saved copy, and the scripts' command line."""
import json
import re
import textwrap

import pytest
from ruamel.yaml import YAML

import utils
from conftest import REPO
from engine.cli import parse_command_line
from engine.config import ENGINE_DEFAULTS, ConfigError, check_config, load_config, require_keys, save_config

CONFIGS = REPO / "configs"

# Every key the original scripts (and data/__init__.py) read from each official YAML; the
# official files hold exactly these keys.
OFFICIAL_KEYS = {
    "retrieval_coco": ["image_root", "ann_root", "dataset", "pretrained", "vit",
                       "batch_size_train", "batch_size_test", "vit_grad_ckpt", "vit_ckpt_layer",
                       "init_lr", "image_size", "queue_size", "alpha", "k_test",
                       "negative_all_rank", "weight_decay", "min_lr", "max_epoch"],
    "caption_coco": ["image_root", "ann_root", "coco_gt_root", "pretrained", "vit",
                     "vit_grad_ckpt", "vit_ckpt_layer", "batch_size", "init_lr", "image_size",
                     "max_length", "min_length", "num_beams", "prompt", "weight_decay",
                     "min_lr", "max_epoch"],
    "nocaps": ["image_root", "ann_root", "pretrained", "vit", "batch_size", "image_size",
               "max_length", "min_length", "num_beams", "prompt"],
    "vqa": ["vqa_root", "vg_root", "train_files", "ann_root", "pretrained", "vit",
            "batch_size_train", "batch_size_test", "vit_grad_ckpt", "vit_ckpt_layer", "init_lr",
            "image_size", "k_test", "inference", "weight_decay", "min_lr", "max_epoch"],
    "nlvr": ["image_root", "ann_root", "pretrained", "vit", "batch_size_train",
             "batch_size_test", "vit_grad_ckpt", "vit_ckpt_layer", "max_epoch", "image_size",
             "weight_decay", "init_lr", "min_lr"],
    "pretrain": ["train_file", "laion_path", "vit", "vit_grad_ckpt", "vit_ckpt_layer",
                 "image_size", "batch_size", "queue_size", "alpha", "weight_decay", "init_lr",
                 "min_lr", "warmup_lr", "lr_decay_rate", "max_epoch", "warmup_steps"],
    "retrieval_msrvtt": ["video_root", "ann_root", "pretrained", "vit", "batch_size", "k_test",
                         "image_size", "num_frm_test"],
}
OFFICIAL_KEYS["retrieval_flickr"] = OFFICIAL_KEYS["retrieval_coco"]

PATH_KEYS = {"image_root", "ann_root", "coco_gt_root", "video_root", "vqa_root", "vg_root",
             "train_file", "laion_path"}
NUMBER_KEYS = {"init_lr", "min_lr", "weight_decay", "alpha", "warmup_lr", "lr_decay_rate"}

SAMPLE = textwrap.dedent("""\
    # a config for the tests
    image_root: 'datasets/coco/images/'
    init_lr: 1e-5
    batch_size: 32
    vit_grad_ckpt: True
    train_files: ['vqa_train', 'vqa_val']
    prompt: 'a picture of '
    vit:
      width: 32
      depth: 2
    """)


@pytest.fixture
def sample_config(tmp_path):
    path = tmp_path / "sample.yaml"
    path.write_text(SAMPLE)
    return path


# ---------------------------------------------------------------------------------------
# load_config and overrides
# ---------------------------------------------------------------------------------------

def test_load_without_overrides_types_values(sample_config):
    config = load_config(sample_config)
    assert config["init_lr"] == 1e-5 and isinstance(config["init_lr"], float)
    assert config["vit_grad_ckpt"] is True
    assert config["vit"] == {"width": 32, "depth": 2}
    assert config["prompt"] == "a picture of "


def test_overrides_are_typed(sample_config):
    config = load_config(sample_config, [
        "init_lr=2e-6", "batch_size=8", "vit_grad_ckpt=false", "train_files=[vg_qa]",
        "prompt='a photo of '", "image_root=/data/coco/", "batch_size=16"])
    assert config["init_lr"] == 2e-6 and isinstance(config["init_lr"], float)
    assert config["batch_size"] == 16  # the last override of a key wins
    assert config["vit_grad_ckpt"] is False
    assert config["train_files"] == ["vg_qa"]
    assert config["prompt"] == "a photo of "
    assert config["image_root"] == "/data/coco/"


def test_override_values_edge_cases(sample_config):
    config = load_config(sample_config, ["prompt=", "image_root=a=b", "batch_size=~"])
    assert config["prompt"] == ""          # empty text is an empty string, not None
    assert config["image_root"] == "a=b"   # only the first '=' separates key and value
    assert config["batch_size"] is None


def test_nested_override(sample_config):
    config = load_config(sample_config, ["vit.depth=12", "vit.width=768"])
    assert config["vit"] == {"width": 768, "depth": 12}
    replaced = load_config(sample_config, ["vit={width: 16, depth: 1, heads: 2}"])
    assert replaced["vit"] == {"width": 16, "depth": 1, "heads": 2}


def test_unknown_key_lists_valid_keys(sample_config):
    with pytest.raises(ValueError) as err:
        load_config(sample_config, ["init_lrr=1e-5"])
    message = str(err.value)
    assert "init_lrr" in message and str(sample_config) in message
    for key in ("batch_size", "image_root", "init_lr", "prompt", "vit"):
        assert key in message


def test_unknown_nested_key_lists_nested_keys(sample_config):
    with pytest.raises(ConfigError, match=r"vit\.heads.*valid keys: depth, width"):
        load_config(sample_config, ["vit.heads=4"])


def test_override_through_a_non_mapping_is_an_error(sample_config):
    with pytest.raises(ConfigError, match="'batch_size'.*not a mapping"):
        load_config(sample_config, ["batch_size.x=1"])


def test_override_without_equals_is_an_error(sample_config):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(sample_config, ["batch_size"])


def test_defaults_are_merged_under_the_file(sample_config):
    defaults = {"batch_size": 1, "amp": False, "vit": {"heads": 2}}
    config = load_config(sample_config, ["amp=true", "vit.heads=4"], defaults=defaults)
    assert config["batch_size"] == 32        # the file wins over defaults
    assert config["amp"] is True             # keys only in defaults can be overridden
    assert config["vit"] == {"width": 32, "depth": 2, "heads": 4}
    assert defaults == {"batch_size": 1, "amp": False, "vit": {"heads": 2}}  # not mutated


# ---------------------------------------------------------------------------------------
# Errors naming the file and the key
# ---------------------------------------------------------------------------------------

def test_missing_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing)


def test_malformed_yaml_names_the_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("image_root: 'datasets/\nbatch_size: [1, 2\n")
    with pytest.raises(ConfigError, match=r"malformed YAML in config file .*broken\.yaml"):
        load_config(bad)


def test_non_mapping_yaml_names_the_file(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"list\.yaml must hold a mapping"):
        load_config(bad)


def test_require_keys_names_key_and_file(sample_config):
    config = load_config(sample_config)
    require_keys(config, ["image_root", "vit.depth"], sample_config)  # all present
    with pytest.raises(ConfigError) as err:
        require_keys(config, ["image_root", "k_test"], sample_config)
    assert "'k_test'" in str(err.value) and str(sample_config) in str(err.value)
    with pytest.raises(ConfigError, match="'vit.heads'"):
        require_keys(config, ["vit.heads"], sample_config)


# ---------------------------------------------------------------------------------------
# The official configs
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(OFFICIAL_KEYS))
def test_official_yaml_loads_with_the_original_keys(name):
    path = CONFIGS / f"{name}.yaml"
    assert path.read_text().startswith("#"), f"{path} should open with a comment"
    config = load_config(path)
    require_keys(config, OFFICIAL_KEYS[name], path)
    assert set(config) == set(OFFICIAL_KEYS[name])
    for key in PATH_KEYS & set(config):
        paths = config[key] if isinstance(config[key], list) else [config[key]]
        for p in paths:
            assert not p.startswith("/"), f"{name}.yaml: {key} should be a relative folder"
    for key in NUMBER_KEYS & set(config):
        assert isinstance(config[key], (int, float)), f"{name}.yaml: {key} is not a number"
    if "pretrained" in config:
        assert config["pretrained"].startswith(
            "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_")


def test_official_values_spot_check():
    coco = load_config(CONFIGS / "retrieval_coco.yaml")
    assert (coco["k_test"], coco["init_lr"], coco["queue_size"], coco["max_epoch"]) == \
        (256, 1e-5, 57600, 6)
    assert coco["negative_all_rank"] is True and coco["dataset"] == "coco"
    flickr = load_config(CONFIGS / "retrieval_flickr.yaml")
    assert (flickr["k_test"], flickr["negative_all_rank"], flickr["dataset"]) == \
        (128, False, "flickr")
    vqa = load_config(CONFIGS / "vqa.yaml")
    assert (vqa["image_size"], vqa["inference"], vqa["train_files"]) == \
        (480, "rank", ["vqa_train", "vqa_val", "vg_qa"])
    pretrain = load_config(CONFIGS / "pretrain.yaml")
    assert (pretrain["init_lr"], pretrain["warmup_steps"], pretrain["lr_decay_rate"]) == \
        (3e-4, 3000, 0.9)
    caption = load_config(CONFIGS / "caption_coco.yaml")
    assert caption["prompt"] == "a picture of " and caption["num_beams"] == 3


def test_bert_and_med_configs():
    med = json.loads((CONFIGS / "med_config.json").read_text())
    bert = json.loads((CONFIGS / "bert_config.json").read_text())
    assert med["vocab_size"] == 30524 and bert["vocab_size"] == 30522  # + [DEC], [ENC]
    for cfg in (med, bert):
        assert cfg["hidden_size"] == 768 and cfg["num_hidden_layers"] == 12
        assert cfg["encoder_width"] == 768 and cfg["add_cross_attention"] is True
        assert cfg["layer_norm_eps"] == 1e-12


# ---------------------------------------------------------------------------------------
# The saved copy
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["retrieval_coco", "pretrain", "vqa"])
def test_save_config_round_trips(tmp_path, name):
    config = load_config(CONFIGS / f"{name}.yaml", ["init_lr=3e-6"])
    saved = save_config(config, tmp_path / "out")
    assert saved == str(tmp_path / "out" / "config.yaml")
    assert load_config(saved) == config
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.yaml"]


def test_save_config_writes_plain_yaml(tmp_path):
    config = {"sizes": (1, 2), "nested": {"lr": 1e-5, "on": True}, "name": "x"}
    save_config(config, tmp_path)
    reloaded = YAML(typ="safe").load((tmp_path / "config.yaml").read_text())
    assert reloaded == {"sizes": [1, 2], "nested": {"lr": 1e-5, "on": True}, "name": "x"}


# ---------------------------------------------------------------------------------------
# The scripts' command line
# ---------------------------------------------------------------------------------------

def test_command_line_defaults(sample_config):
    args, config = parse_command_line("test", str(sample_config), argv=[])
    assert args.config == str(sample_config)
    assert args.output_dir == "output"
    assert args.evaluate is False
    assert args.device == utils.default_device()
    assert args.seed == 42 and args.world_size == 1 and args.dist_url == "env://"
    assert args.distributed is True and args.resume == ""
    assert args.overrides == []
    assert config == load_config(sample_config)


def test_command_line_flags_and_overrides(sample_config, tmp_path):
    argv = ["--evaluate", "--device", "cpu", "--seed", "7", "--distributed", "false",
            "--output_dir", str(tmp_path), "--resume", "ckpt.pth",
            "batch_size=4", "--opts", "vit.depth=3", "init_lr=1e-4"]
    args, config = parse_command_line("test", str(sample_config), argv=argv)
    assert args.evaluate is True and args.device == "cpu" and args.seed == 7
    assert args.distributed is False
    assert args.output_dir == str(tmp_path) and args.resume == "ckpt.pth"
    assert config["batch_size"] == 4 and config["vit"]["depth"] == 3
    assert config["init_lr"] == 1e-4


def test_command_line_positional_overrides_between_flags(sample_config):
    argv = ["batch_size=4", "--evaluate", "vit.width=8", "--checkpoint", "c.pth"]
    args, config = parse_command_line("test", str(sample_config), argv=argv)
    assert args.evaluate is True and args.resume == "c.pth"  # --checkpoint as pretrain.py
    assert (config["batch_size"], config["vit"]["width"]) == (4, 8)


def test_command_line_defaults_and_extra_args(sample_config):
    def add_args(parser):
        parser.add_argument("--text_encoder", default="bert")

    args, config = parse_command_line(
        "test", str(sample_config), defaults={"amp": False}, argv=["amp=true"],
        add_args=add_args)
    assert args.text_encoder == "bert" and config["amp"] is True


@pytest.mark.parametrize("argv,message", [
    (["bogus_key=1"], "unknown config key 'bogus_key'"),
    (["--distributed", "maybe"], "expected true or false"),
])
def test_command_line_errors_exit_with_a_message(sample_config, capsys, argv, message):
    with pytest.raises(SystemExit) as err:
        parse_command_line("test", str(sample_config), argv=argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_command_line_missing_config_names_the_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_command_line("test", str(tmp_path / "absent.yaml"), argv=[])
    assert "absent.yaml" in capsys.readouterr().err


@pytest.mark.parametrize('override, message', [
    ('max_epoch=-1', "max_epoch must be an integer >= 1; got -1"),
    ('max_epoch=1.5', "max_epoch must be an integer >= 1; got 1.5"),
    ('init_lr=abc', "init_lr must be a number >= 0; got 'abc'"),
    ('init_lr=-1e-4', "init_lr must be a number >= 0; got -0.0001"),
    ('k_test=-1', "k_test must be an integer >= 0; got -1"),
    ('batch_size_train=abc', "batch_size_train must be an integer >= 1; got 'abc'"),
    ('batch_size_test=true', "batch_size_test must be an integer >= 1; got True"),
    ('alpha=1.5', "alpha must be a number >= 0 and <= 1; got 1.5"),
    ('weight_decay=.nan', "weight_decay must be a number >= 0; got nan"),
])
def test_numeric_values_are_checked_naming_key_value_and_file(override, message):
    import train_retrieval
    config_file = REPO / 'configs' / 'shapes' / 'retrieval_coco.yaml'
    with pytest.raises(ConfigError) as error:
        train_retrieval.run(['--config', str(config_file), '--device', 'cpu', override])
    assert message in str(error.value) and str(config_file) in str(error.value)


def test_every_official_and_toy_config_passes_the_value_checks():
    configs = sorted((REPO / 'configs').glob('*.yaml')) + sorted((REPO / 'configs' / 'shapes').glob('*.yaml'))
    assert len(configs) > 15
    for path in configs:
        check_config(load_config(str(path), defaults=ENGINE_DEFAULTS), path)


@pytest.mark.parametrize('script', ['train_retrieval', 'train_caption', 'train_vqa', 'train_nlvr', 'pretrain',
                                    'eval_nocaps', 'eval_retrieval_video', 'capfilt'])
def test_help_ends_with_the_scripts_examples(script, capsys):
    import importlib
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info:
        module.run(['--help'])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert 'examples:' in out and f'{script}.py --config configs/' in out.split('examples:')[1]
    # the defaults: of the options, and of the config keys the file need not set
    flat = ' '.join(out.split())
    assert '--seed SEED base seed; each rank adds its rank (default: 42)' in flat
    assert '(default: 10)' in flat.split('--dist_timeout MINUTES')[-1].split('--resume')[0]
    keys = flat.split('config keys with defaults')[1]
    assert 'amp="none"' in keys and 'accum_steps=1' in keys and 'num_workers=4' in keys
    defaults = {**importlib.import_module('engine.config').ENGINE_DEFAULTS, **getattr(module, 'TASK_DEFAULTS', {})}
    for key in getattr(module, 'REQUIRED_KEYS', ()):
        assert key in flat.split('config keys the file must set:')[1].split('config keys with defaults')[0]
        assert f' {key}=' not in keys and key not in defaults


@pytest.mark.parametrize('command, shown', [(['demo.py'], ['examples:', '(default: 42)']),
                                            (['reproduce.py'], ['examples:', '(default: paper)']),
                                            (['predict.py', 'caption'], ['(default: 1)']),
                                            (['tools/convert_hf.py'], ['python tools/convert_hf.py to-hf'])])
def test_the_other_entry_points_show_examples_or_defaults(command, shown):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, *command, '--help'], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    out = ' '.join(result.stdout.split())
    assert 'usage:' in out and all(text in out for text in shown), out


@pytest.mark.parametrize('overrides, message', [
    ({'min_length': 30, 'max_length': 10}, 'min_length=30 is larger than max_length=10'),
    ({'image_size': 100}, 'image_size=100 is not a multiple of the ViT patch size 16'),
    ({'vit': {'width': 64, 'depth': 2, 'heads': 4, 'patch_size': 64}, 'image_size': 96},
     'image_size=96 is not a multiple of the ViT patch size 64'),
    ({'vit': 'huge'}, "vit must be 'base', 'large' or a mapping"),
    ({'vit': {'width': 64, 'depth': 2}}, 'the vit mapping lacks heads'),
])
def test_relations_between_keys_are_checked_with_the_names_and_values(overrides, message):
    from engine.config import check_relations
    config = {'vit': 'base', 'image_size': 384, 'min_length': 5, 'max_length': 20, **overrides}
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        check_relations(config, 'c.yaml')
    assert 'c.yaml' in str(error.value)
    check_relations({'vit': 'base', 'image_size': 384, 'min_length': 5, 'max_length': 20}, 'c.yaml')
    check_relations({'vit': {'width': 64, 'depth': 2, 'heads': 4, 'patch_size': 64}, 'image_size': 64}, 'c.yaml')
