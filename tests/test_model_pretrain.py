"""BLIP_Pretrain against the original's outputs (tests/parity/public/pretrain): ITC/ITM/LM losses
with the original's hard negatives injected and the queues after the step; the encoder/decoder
weight sharing, vocabulary resize and the optional BERT / ViT initialisation sources."""
import json
from pathlib import Path

import numpy
import pytest
import torch

from model_builders import assert_close, build_model, constructor_kwargs, fixture_dir, load_fixture, zero_dropout
from models.blip import create_vit, load_med_config
from models.blip_pretrain import BLIP_Pretrain, blip_pretrain, load_vit_weights
from models.med import BertModel

TASK = "pretrain"


@pytest.fixture(scope="module")
def fixture():
    return load_fixture(TASK, "inputs.pt"), load_fixture(TASK, "outputs.pt")


@pytest.fixture(scope="module")
def state_dict():
    return torch.load(fixture_dir(TASK) / "model.pth", weights_only=True)


@pytest.fixture(scope="module")
def model():
    return build_model(BLIP_Pretrain, TASK)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_losses_and_queues_with_recorded_negatives(model, state_dict, fixture, mode):
    inputs, outputs = fixture
    model.load_state_dict(state_dict, strict=True)
    assert_close(model.image_queue, outputs["image_queue_before"], what="image_queue before")
    zero_dropout(model).train(mode == "train")

    text = model.tokenizer(inputs["captions"], padding="max_length", truncation=True, max_length=30,
                           return_tensors="pt")
    assert torch.equal(text.input_ids, outputs["text_input_ids"])
    assert torch.equal(text.attention_mask, outputs["text_attention_mask"])

    indices, calls = outputs["negative_indices"], []
    batch = indices.numel() // 2

    def select(weights_t2i, weights_i2t):
        calls.append((weights_t2i, weights_i2t))
        return indices[:batch].clone(), indices[batch:].clone()

    model.select_negatives = select
    try:
        loss_ita, loss_itm, loss_lm = model(inputs["images"], inputs["captions"], alpha=inputs["alpha"])
    finally:
        del model.select_negatives
    suffix = "" if mode == "train" else "_evalmode"
    assert_close(loss_ita, outputs["loss_ita" + suffix], what="loss_ita")
    assert_close(loss_itm, outputs["loss_itm" + suffix], what="loss_itm")
    assert_close(loss_lm, outputs["loss_lm" + suffix], what="loss_lm")
    assert_close(model.image_queue, outputs["image_queue_after"], what="image_queue")
    assert_close(model.text_queue, outputs["text_queue_after"], what="text_queue")
    assert torch.equal(model.queue_ptr, outputs["queue_ptr_after"])

    (weights_t2i, weights_i2t), = calls
    for weights in (weights_t2i, weights_i2t):
        assert weights.shape == (batch, batch)
        assert (weights.diagonal() == 0).all()
        off_diagonal = weights[~torch.eye(batch, dtype=torch.bool)]
        assert (off_diagonal >= 1e-4).all()  # softmax + 1e-4


def test_training_step_default_sampler_and_gradients(model, state_dict, fixture):
    inputs, _ = fixture
    model.load_state_dict(state_dict, strict=True)
    zero_dropout(model).train()
    torch.manual_seed(0)
    losses = model(inputs["images"][:1], inputs["captions"][:1], alpha=0.4)  # batch 1: no other pair
    sum(losses).backward()
    assert all(torch.isfinite(loss) for loss in losses)
    # the decoder's shared weights are the encoder's tensors: one gradient, both losses in it
    assert model.text_decoder.bert.encoder.layer[0].crossattention.self.query.weight.grad is not None
    assert all(p.grad is None for p in model.text_encoder_m.parameters())
    model.zero_grad(set_to_none=True)


def test_weight_sharing_and_vocabulary(model):
    tokenizer_size = len(model.tokenizer)
    assert tokenizer_size == 30524
    encoder, decoder = model.text_encoder, model.text_decoder
    for bert in (encoder, model.text_encoder_m, decoder.bert):
        assert bert.embeddings.word_embeddings.weight.shape[0] == tokenizer_size
        assert bert.config.vocab_size == tokenizer_size
    assert decoder.config.vocab_size == tokenizer_size

    assert decoder.bert.embeddings.word_embeddings.weight is encoder.embeddings.word_embeddings.weight
    assert decoder.cls.predictions.decoder.weight is encoder.embeddings.word_embeddings.weight
    assert decoder.cls.predictions.decoder.bias is decoder.cls.predictions.bias
    assert decoder.cls.predictions.bias.shape == (tokenizer_size,)
    for enc_layer, dec_layer in zip(encoder.encoder.layer, decoder.bert.encoder.layer):
        # self-attention is the decoder's own; everything else is shared
        assert dec_layer.attention.self.query.weight is not enc_layer.attention.self.query.weight
        assert dec_layer.attention.output.dense.weight is not enc_layer.attention.output.dense.weight
        assert dec_layer.crossattention.self.key.weight is enc_layer.crossattention.self.key.weight
        assert dec_layer.crossattention.output.LayerNorm.bias is enc_layer.crossattention.output.LayerNorm.bias
        assert dec_layer.intermediate.dense.weight is enc_layer.intermediate.dense.weight
        assert dec_layer.output.dense.bias is enc_layer.output.dense.bias
    # the momentum encoder is separate
    assert model.text_encoder_m.embeddings.word_embeddings.weight is not encoder.embeddings.word_embeddings.weight


def write_bert_checkpoint(folder, bert, config_path):
    """`bert` saved as the hub's bert-base-uncased folder is laid out: pytorch_model.bin with
    'bert.' prefixes, LayerNorm gamma/beta names, token-type embeddings and pre-training heads."""
    folder.mkdir()
    state = {}
    for key, value in bert.state_dict().items():
        key = "bert." + key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        state[key] = value.clone()
    hidden = bert.config.hidden_size
    state["bert.embeddings.token_type_embeddings.weight"] = torch.randn(2, hidden)
    state["cls.predictions.bias"] = torch.randn(30522)
    state["cls.predictions.transform.dense.weight"] = torch.randn(hidden, hidden)
    state["cls.seq_relationship.weight"] = torch.randn(2, hidden)
    torch.save(state, folder / "pytorch_model.bin")
    config = json.loads(config_path.read_text()) if isinstance(config_path, Path) else dict(config_path)
    config = {k: v for k, v in config.items() if k not in ("encoder_width", "add_cross_attention")}
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    return state


def test_bert_and_vit_initialisation_sources(tmp_path, state_dict):
    """bert_checkpoint: a BERT folder in the hub's layout; vit_checkpoint: a local file."""
    kwargs = constructor_kwargs(TASK)
    torch.manual_seed(1)
    bert = BertModel(load_med_config(kwargs["med_config"], 32), add_pooling_layer=False)
    bert_state = write_bert_checkpoint(tmp_path / "bert", bert, kwargs["med_config"])
    vit_state = {k[len("visual_encoder."):]: v for k, v in state_dict.items() if k.startswith("visual_encoder.")}
    torch.save({"model": vit_state}, tmp_path / "vit.pth")

    model = blip_pretrain(**kwargs, bert_checkpoint=str(tmp_path / "bert"), vit_checkpoint=str(tmp_path / "vit.pth"))
    encoder, decoder = model.text_encoder, model.text_decoder
    assert encoder.embeddings.word_embeddings.weight.shape[0] == 30524
    torch.testing.assert_close(encoder.embeddings.word_embeddings.weight[:30522], bert.embeddings.word_embeddings.weight)
    torch.testing.assert_close(encoder.embeddings.LayerNorm.weight, bert.embeddings.LayerNorm.weight)
    torch.testing.assert_close(encoder.encoder.layer[1].output.LayerNorm.bias, bert.encoder.layer[1].output.LayerNorm.bias)
    # the decoder loads BERT too (its own self-attention included) and the MLM head
    torch.testing.assert_close(decoder.bert.encoder.layer[1].attention.self.query.weight,
                               bert.encoder.layer[1].attention.self.query.weight)
    torch.testing.assert_close(decoder.cls.predictions.transform.dense.weight,
                               bert_state["cls.predictions.transform.dense.weight"])
    torch.testing.assert_close(decoder.cls.predictions.bias[:30522], bert_state["cls.predictions.bias"])
    assert not decoder.cls.predictions.bias[30522:].any()  # new tokens start with bias 0

    for key, value in vit_state.items():
        torch.testing.assert_close(model.visual_encoder.state_dict()[key], value.float(), msg=key)
    torch.testing.assert_close(model.visual_encoder_m.pos_embed, model.visual_encoder.pos_embed)  # copies


def test_bert_weights_from_safetensors_and_the_lm_model_and_bad_shapes(tmp_path):
    """load_bert_weights: a model.safetensors folder, a bare BertModel state into the LM model
    (prefix added), and a checkpoint of another size refused with the key named."""
    from safetensors.torch import save_file

    from models.med import BertLMHeadModel, load_bert_weights

    config = load_med_config(constructor_kwargs(TASK)["med_config"], 32)
    torch.manual_seed(2)
    source = BertModel(config, add_pooling_layer=False)
    folder = tmp_path / "bert"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, folder / "model.safetensors")
    target = BertLMHeadModel(config)
    load_bert_weights(target, folder)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.bert.state_dict()[key], value, msg=key)

    wider = load_med_config({**config.to_dict(), "hidden_size": 64, "intermediate_size": 128}, 32)
    with pytest.raises(ValueError, match=r"embeddings\.\S+ has shape \(\S+\), the model \(\S*64"):
        load_bert_weights(BertModel(wider, add_pooling_layer=False), folder)
    with pytest.raises(FileNotFoundError, match="holds none of"):
        load_bert_weights(source, tmp_path)


def test_bert_hub_name_from_the_cache_offline_and_a_clear_error_when_missing(tmp_path, repo_root):
    """A hub name ('bert-base-uncased') resolves from huggingface_hub's cache without the network;
    a name that is not cached fails at once with a message that names it and the way out."""
    import os
    import subprocess
    import sys

    snapshot = tmp_path / "hub" / "models--tiny-bert" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "models--tiny-bert" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny-bert" / "refs" / "main").write_text("0" * 40)
    config = load_med_config(constructor_kwargs(TASK)["med_config"], 32)
    torch.manual_seed(4)
    source = BertModel(config, add_pooling_layer=False)
    torch.save({"bert." + k: v for k, v in source.state_dict().items()}, snapshot / "pytorch_model.bin")
    torch.save(source.state_dict(), tmp_path / "expected.pt")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    script = f"""
import torch
from models.med import BertConfig, BertModel, load_bert_weights
model = BertModel(BertConfig.from_json_file({str(tmp_path / "config.json")!r}), add_pooling_layer=False)
load_bert_weights(model, 'tiny-bert')
expected = torch.load({str(tmp_path / "expected.pt")!r})
assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
try:
    load_bert_weights(model, 'no-such-bert')
except FileNotFoundError as error:
    print('ERROR:', error)
"""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=repo_root, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "loaded" in result.stdout
    error = result.stdout.split("ERROR:", 1)[1]
    assert "'no-such-bert'" in error and "bert_checkpoint to null" in error


def test_default_is_offline_and_vit_checkpoint_can_be_skipped():
    kwargs = constructor_kwargs(TASK)
    # a custom ViT mapping has no ImageNet default: nothing is downloaded
    model = BLIP_Pretrain(**kwargs)
    assert model.visual_encoder.pos_embed.shape[1] == 5
    with pytest.raises(RuntimeError, match="invalid"):
        BLIP_Pretrain(**kwargs, vit_checkpoint="no/such/file.pth")


def write_jax_vit(path, vit):
    """`vit`'s weights in the JAX .npz layout of Google's ViT checkpoints (what timm reads)."""
    heads = vit.blocks[0].attn.num_heads
    width = vit.pos_embed.shape[-1]
    arrays = {
        "embedding/kernel": vit.patch_embed.proj.weight.permute(2, 3, 1, 0),
        "embedding/bias": vit.patch_embed.proj.bias,
        "cls": vit.cls_token,
        "Transformer/posembed_input/pos_embedding": vit.pos_embed,
        "Transformer/encoder_norm/scale": vit.norm.weight,
        "Transformer/encoder_norm/bias": vit.norm.bias,
    }
    for i, block in enumerate(vit.blocks):
        prefix = f"Transformer/encoderblock_{i}/"
        mha = prefix + "MultiHeadDotProductAttention_1/"
        for name, weight, bias in zip(("query", "key", "value"), block.attn.qkv.weight.chunk(3),
                                      block.attn.qkv.bias.chunk(3)):
            arrays[f"{mha}{name}/kernel"] = weight.t().reshape(width, heads, -1)
            arrays[f"{mha}{name}/bias"] = bias.reshape(heads, -1)
        arrays[f"{mha}out/kernel"] = block.attn.proj.weight.reshape(width, heads, -1).permute(1, 2, 0)
        arrays[f"{mha}out/bias"] = block.attn.proj.bias
        for norm, module in (("LayerNorm_0", block.norm1), ("LayerNorm_2", block.norm2)):
            arrays[f"{prefix}{norm}/scale"] = module.weight
            arrays[f"{prefix}{norm}/bias"] = module.bias
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            arrays[f"{prefix}MlpBlock_3/Dense_{r}/kernel"] = fc.weight.t()
            arrays[f"{prefix}MlpBlock_3/Dense_{r}/bias"] = fc.bias
    numpy.savez(path, **{key: value.detach().numpy() for key, value in arrays.items()})


def test_vit_from_jax_npz(tmp_path):
    """The vit='large' default is timm's in21k .npz; the same path works for any JAX ViT file."""
    vit_spec = constructor_kwargs(TASK)["vit"]
    torch.manual_seed(2)
    source, _ = create_vit(vit_spec, 32)
    write_jax_vit(tmp_path / "vit.npz", source)
    target, _ = create_vit(vit_spec, 32)
    load_vit_weights(target, str(tmp_path / "vit.npz"))
    expected = source.state_dict()
    for key, value in target.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
