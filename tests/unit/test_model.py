"""Shapes, masks, dropout and presets of the plain-PyTorch model, post-LN and pre-LN."""

import dataclasses

import pytest
import torch

from roberta_pl.model import (
    IGNORE_INDEX,
    RobertaConfig,
    RobertaForMaskedLM,
    mlm_flops_per_token,
)


@pytest.fixture(params=[False, True], ids=["post_ln", "pre_ln"])
def tiny(request):
    torch.manual_seed(0)
    return RobertaForMaskedLM(RobertaConfig.from_name("tiny", vocab_size=500, pre_layernorm=request.param))


def test_shapes_with_and_without_labels(tiny):
    ids = torch.randint(5, 500, (3, 16))
    out = tiny(ids)
    assert out.loss is None and out.logits.shape == (3, 16, 500)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 3] = labels[2, 7] = 42
    out = tiny(ids, labels=labels)
    assert out.logits.shape == (2, 500) and out.loss.ndim == 0


def test_padding_does_not_change_real_token_outputs(tiny):
    tiny.eval()
    ids = torch.randint(5, 500, (1, 10))
    padded = torch.cat([ids, torch.full((1, 6), 1)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], dim=1).long()
    with torch.no_grad():
        a = tiny(ids).logits
        b = tiny(padded, mask).logits[:, :10]
        c = tiny(padded).logits[:, :10]  # without the key mask, padding leaks into attention
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - c).abs().max() > 1e-3


def test_dropout_active_in_train_only(tiny):
    ids = torch.randint(5, 500, (2, 16))
    tiny.train()
    assert not torch.equal(tiny(ids).logits, tiny(ids).logits)
    tiny.eval()
    torch.testing.assert_close(tiny(ids).logits, tiny(ids).logits, rtol=0, atol=0)


def test_positions_start_after_padding_offset(tiny):
    # The last usable position is max_seq_len + 1: a full-length sequence must run, a longer one must not.
    cfg = tiny.config
    assert tiny.roberta.embeddings.position_embeddings.num_embeddings == cfg.max_seq_len + 2
    tiny(torch.randint(5, 500, (1, cfg.max_seq_len)))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        tiny(torch.randint(5, 500, (1, cfg.max_seq_len + 1)))


def test_decoder_is_tied_and_gets_gradients(tiny):
    assert tiny.lm_head.decoder.weight is tiny.roberta.embeddings.word_embeddings.weight
    # The shared table's <pad> row stays zero at init, as in HF (the decoder's init must not redraw it).
    pad = tiny.config.pad_token_id
    assert tiny.roberta.embeddings.word_embeddings.weight[pad].abs().sum() == 0
    assert tiny.roberta.embeddings.word_embeddings.weight[pad + 1].abs().sum() > 0
    ids = torch.randint(5, 500, (2, 16))
    labels = ids.clone()
    tiny(ids, labels=labels).loss.backward()
    for name, p in tiny.named_parameters():
        if name.endswith("token_type_embeddings.weight"):
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_presets_forward_backward(name):
    model = RobertaForMaskedLM(RobertaConfig.from_name(name))
    ids = torch.randint(5, model.config.vocab_size, (2, 8))
    model(ids, labels=ids).loss.backward()


@pytest.mark.parametrize("name,expected_millions", [("base", 124.7), ("large", 355.4)])
def test_large_presets_parameter_count_on_meta(name, expected_millions):
    with torch.device("meta"):
        model = RobertaForMaskedLM(RobertaConfig.from_name(name))
        ids = torch.randint(5, 50265, (2, 8))
        logits = model(ids).logits  # shapes flow through on meta without allocating memory
        logits.float().sum().backward()
    assert logits.shape == (2, 8, 50265)
    assert model.roberta.encoder.layer[-1].output.dense.weight.grad.shape == (model.config.hidden_size,) * 1 + (
        model.config.intermediate_size,)
    assert model.num_parameters() / 1e6 == pytest.approx(expected_millions, abs=0.5)


@pytest.mark.parametrize("pre_layernorm", [False, True])
def test_activation_checkpointing_gives_same_gradients(pre_layernorm):
    torch.manual_seed(0)
    a = RobertaForMaskedLM(RobertaConfig.from_name("tiny", vocab_size=300, dropout=0.0, attention_dropout=0.0,
                                                   pre_layernorm=pre_layernorm))
    b = RobertaForMaskedLM(RobertaConfig.from_name("tiny", vocab_size=300, dropout=0.0, attention_dropout=0.0,
                                                   pre_layernorm=pre_layernorm, activation_checkpointing=True))
    b.load_state_dict(a.state_dict())
    ids = torch.randint(5, 300, (2, 12))
    a(ids, labels=ids).loss.backward()
    b(ids, labels=ids).loss.backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_pre_layernorm_normalises_branch_inputs_and_the_encoder_output_only():
    cfg = RobertaConfig.from_name("tiny", vocab_size=300, pre_layernorm=True)
    torch.manual_seed(0)
    model = RobertaForMaskedLM(cfg).eval()
    names = {n for n, _ in model.named_parameters()}
    # HF RobertaPreLayerNorm's places: attention.LayerNorm and intermediate.LayerNorm in front of the two branches,
    # one LayerNorm after the encoder, the embeddings' kept; none after a residual sum.
    for name in ("roberta.embeddings.LayerNorm", "roberta.encoder.layer.1.attention.LayerNorm",
                 "roberta.encoder.layer.1.intermediate.LayerNorm", "roberta.LayerNorm"):
        assert f"{name}.weight" in names, name
    assert not any("output.LayerNorm" in n for n in names)
    post = RobertaForMaskedLM(dataclasses.replace(cfg, pre_layernorm=False))
    assert model.num_parameters() == post.num_parameters() + 2 * cfg.hidden_size  # the final LayerNorm
    # Zero each branch's output projection and every block is the identity on the residual stream, so the
    # encoder returns the final LayerNorm of the embeddings (a post-LN block would renormalise instead).
    with torch.no_grad():
        for layer in model.roberta.encoder.layer:
            for proj in (layer.attention.output.dense, layer.output.dense):
                proj.weight.zero_()
                proj.bias.zero_()
        model.roberta.LayerNorm.weight.uniform_(0.5, 1.5)
        model.roberta.LayerNorm.bias.normal_()
        ids = torch.randint(5, 300, (2, 12))
        embedded = model.roberta.embeddings(ids)
        torch.testing.assert_close(model.roberta(ids), model.roberta.LayerNorm(embedded))
        assert (model.roberta(ids) - embedded).abs().max() > 0.1  # the final LayerNorm did something


def test_flops_formula_matches_roberta_base_figures():
    cfg = RobertaConfig.from_name("base")
    assert mlm_flops_per_token(cfg, 512, sparse=True) / 1e9 == pytest.approx(0.60, abs=0.01)
    assert mlm_flops_per_token(cfg, 512, sparse=False) / 1e9 == pytest.approx(0.80, abs=0.01)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="num_heads"):
        RobertaConfig(hidden_size=100, num_heads=12)
    with pytest.raises(ValueError, match="unknown model preset"):
        RobertaConfig.from_name("huge")
