"""The ModernBERT architecture (roberta_pl/modernbert.py): logit parity with ``transformers``' ModernBERT both ways
(eager and SDPA attention, padding, sequences longer than the local window), packed documents, the classifiers'
export, the FLOP count and the config checks."""

import pytest
import torch
import transformers
from packed_docs import (
    assert_no_token_attends_across_documents,
    assert_packed_equals_each_document_alone,
    packed_batch,
)

from roberta_pl.hf import load_hf, load_hf_encoder, save_hf, save_hf_classifier
from roberta_pl.model import RobertaConfig, mlm_flops_per_token
from roberta_pl.models import masked_lm, sequence_classifier, token_classifier
from roberta_pl.modernbert import ModernBertForMaskedLM


def _config(**overrides) -> RobertaConfig:
    # 4 layers: global, local, local, global; a window of 16 with sequences of 48, so local layers see a band only.
    fields = dict(vocab_size=300, max_seq_len=64, local_attention=16, num_layers=4) | overrides
    return RobertaConfig.from_name("modernbert_tiny", **fields)


def _nudged(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights with no norm at one and no bias at zero: a key that loads wrong changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _padded_batch(config: RobertaConfig, T: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, T - 7, 20, 3])
    ids = torch.randint(5, config.vocab_size, (len(lengths), T), generator=g)
    ids[:, 0] = config.bos_token_id
    mask = torch.arange(T)[None, :] < lengths[:, None]
    ids[~mask] = config.pad_token_id
    return ids, mask.long()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("pad_vocab_multiple,window", [(1, 16), (64, 16), (1, 15)])  # odd: 7 tokens each side, as HF
def test_ours_to_hf_logits_match(tmp_path, attn, pad_vocab_multiple, window):
    config = _config(pad_vocab_multiple=pad_vocab_multiple, local_attention=window)
    ours = _nudged(masked_lm(config))
    save_hf(ours, tmp_path)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, attn_implementation=attn).eval()
    assert type(hf).__name__ == "ModernBertForMaskedLM"
    assert hf.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    ids, mask = _padded_batch(config)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        mine = ours(ids, mask).logits
    real = mask.bool()  # padded positions are never read; their values differ by backend
    torch.testing.assert_close(mine[real], theirs[real], atol=1e-4, rtol=0)
    # The band matters: the same weights with every layer global give other logits.
    with torch.no_grad():
        wide = masked_lm(_config(pad_vocab_multiple=pad_vocab_multiple, local_attention=128))
        wide.load_state_dict(ours.state_dict())
        assert (wide.eval()(ids, mask).logits[real] - mine[real]).abs().max() > 1e-3


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_to_ours_logits_match(tmp_path, attn):
    hf_config = transformers.ModernBertConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=64, local_attention=16, global_attn_every_n_layers=2, global_rope_theta=5000.0,
        local_rope_theta=500.0, pad_token_id=1, bos_token_id=0, eos_token_id=2, cls_token_id=0, sep_token_id=2)
    torch.manual_seed(0)
    hf = _nudged(transformers.ModernBertForMaskedLM(hf_config), seed=1)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path, pad_vocab_multiple=64)
    assert (ours.config.global_attn_every_n_layers, ours.config.global_rope_theta) == (2, 5000.0)
    ids, mask = _padded_batch(ours.config, seed=1)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, attn_implementation=attn).eval()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        mine = ours(ids, mask).logits
        hidden = load_hf_encoder(tmp_path)(ids, mask)
        hf_hidden = hf.model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(mine[real], theirs[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(hidden[real], hf_hidden[real], atol=1e-4, rtol=0)


def _hf_dir(path, **fields):
    config = transformers.ModernBertConfig(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=64, local_attention=16, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        cls_token_id=0, sep_token_id=2, **fields)
    torch.manual_seed(0)
    _nudged(transformers.ModernBertForMaskedLM(config)).save_pretrained(path)
    return path


def test_an_untied_decoder_is_refused_in_one_line(tmp_path):
    # transformers uses the stored decoder.weight; ours is the embeddings, so loading it would change every logit.
    with pytest.raises(ValueError, match=r"decoder\.weight is not the token embeddings .*untied") as e:
        load_hf(_hf_dir(tmp_path, tie_word_embeddings=False))
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("edit,refusal", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, r"rope_scaling=.*linear.*plain RoPE only"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"rope_scaling=.*dynamic"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}, r"rope_parameters=.*per attention kind"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, r"layer_types has 2 entries but num_hidden_layers=3"),
    ({"layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]},
     r"layer_types has 4 entries"),
])
def test_a_config_json_our_model_would_read_otherwise_than_transformers_is_refused(tmp_path, edit, refusal):
    import json

    path = _hf_dir(tmp_path)
    config = json.loads((path / "config.json").read_text()) | edit
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=refusal) as e:
        load_hf(path)
    assert "\n" not in str(e.value)


def test_plain_rope_scaling_loads(tmp_path):
    import json

    path = _hf_dir(tmp_path)
    config = json.loads((path / "config.json").read_text()) | {"rope_scaling": {"rope_type": "default"}}
    (path / "config.json").write_text(json.dumps(config))
    assert load_hf(path).config.num_layers == 3


@pytest.mark.parametrize("token", [False, True])
def test_classifier_export_matches_transformers_auto_class(tmp_path, token):
    config = _config()
    build = token_classifier if token else sequence_classifier
    ours = _nudged(build(config, 3))
    save_hf_classifier(ours, tmp_path, labels=["a", "b", "c"])
    auto = transformers.AutoModelForTokenClassification if token else transformers.AutoModelForSequenceClassification
    hf = auto.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == f"ModernBertFor{'Token' if token else 'Sequence'}Classification"
    ids, mask = _padded_batch(config)
    with torch.no_grad():
        theirs, mine = hf(input_ids=ids, attention_mask=mask).logits, ours(ids, mask)
    if token:
        theirs, mine = theirs[mask.bool()], mine[mask.bool()]
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)


def test_packed_documents_give_each_documents_logits_alone_and_never_see_each_other():
    # Real packed_docs rows of 64 tokens: documents of 3-40 tokens, some longer than the 16-token window, some cut.
    model = _nudged(masked_lm(_config(max_seq_len=64)))
    ids, doc_ids = packed_batch(3, 64, 300, lengths=(3, 40))
    assert assert_packed_equals_each_document_alone(model, ids, doc_ids) > 6
    assert_no_token_attends_across_documents(model, ids, doc_ids, 300)


def test_packed_positions_restart_at_each_document():
    """RoPE positions restart per document: a document placed later in a packed row gives the logits it gives first."""
    model = _nudged(masked_lm(_config()))
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(5, 300, (20,), generator=g), torch.randint(5, 300, (20,), generator=g)
    doc_ids = torch.tensor([[0] * 20 + [1] * 20])
    with torch.no_grad():
        first = model(torch.cat([a, b])[None], document_ids=doc_ids).logits[0, :20]
        second = model(torch.cat([b, a])[None], document_ids=doc_ids).logits[0, 20:]
    torch.testing.assert_close(first, second, atol=1e-5, rtol=0)


def test_sparse_head_loss_equals_dense_loss():
    config = _config(pad_vocab_multiple=64)
    model = _nudged(masked_lm(config))
    ids, mask = _padded_batch(config)
    labels = torch.full_like(ids, -100)
    labels[:, 1:40:3] = ids[:, 1:40:3]
    labels[~mask.bool()] = -100
    with torch.no_grad():
        out = model(ids, mask, labels)
        dense = model(ids, mask).logits
    expected = torch.nn.functional.cross_entropy(dense.reshape(-1, config.vocab_size), labels.reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    assert out.logits.shape == (int((labels != -100).sum()), config.vocab_size)


def test_parameter_count_is_modernbert_base():
    with torch.device("meta"):
        n = ModernBertForMaskedLM(RobertaConfig.from_name("modernbert_base", pad_vocab_multiple=1)).num_parameters()
    assert 149e6 < n < 150e6  # answerdotai/ModernBERT-base: 149,014,272 with its 50368-id vocabulary (+ decoder bias)


def test_flops_count_local_attention_over_the_window():
    config = RobertaConfig.from_name("modernbert_base")
    every_layer_global = RobertaConfig.from_name("modernbert_base", global_attn_every_n_layers=1)
    short, long = mlm_flops_per_token(config, 128), mlm_flops_per_token(config, 8192)
    # Below the window, local layers see every token: the same count as all-global.
    assert short == mlm_flops_per_token(every_layer_global, 128)
    # At 8192, the 14 local layers attend over 129 keys: 3 * 4 * H * (8192 - 129) FLOPs each fewer.
    saved = 14 * 3 * 4 * 768 * (8192 - 129)
    assert mlm_flops_per_token(every_layer_global, 8192) - long == pytest.approx(saved)


@pytest.mark.parametrize("field,value", [("architecture", "bert"), ("local_attention", 1),
                                         ("global_attn_every_n_layers", 0), ("global_rope_theta", 0.0)])
def test_config_refuses_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        RobertaConfig.from_name("modernbert_tiny", **{field: value})


def test_layer_wise_lr_decay_knows_modernbert_layers():
    from roberta_pl.optim import layer_decay_groups

    config = RobertaConfig.from_name("modernbert_tiny", vocab_size=300)
    model = sequence_classifier(config, 2)
    n = config.num_layers
    groups = layer_decay_groups(model, lr=1.0, weight_decay=0.1, layer_decay=0.5, num_layers=n)
    lr_of = {name: g["lr"] for name, p in model.named_parameters() for g in groups if any(p is q for q in g["params"])}
    assert len(lr_of) == len(dict(model.named_parameters()))
    assert lr_of["model.embeddings.tok_embeddings.weight"] == 0.5 ** (n + 1)
    assert lr_of[f"model.layers.{n - 1}.mlp.Wo.weight"] == 0.5
    assert lr_of["model.layers.0.mlp.Wo.weight"] == 0.5 ** n
    assert {lr for name, lr in lr_of.items() if not name.startswith("model.")} == {1.0}


@pytest.mark.parametrize("field,value", [("local_attention", 64), ("global_attn_every_n_layers", 2),
                                         ("global_rope_theta", 320000.0), ("local_rope_theta", 20000.0)])
def test_a_resume_refuses_changed_attention_settings_naming_the_field(tmp_path, field, value):
    # They change what the weights compute; a RoBERTa's copy of them means nothing and is left alone.
    from roberta_pl.errors import ConfigError
    from roberta_pl.pretraining.checks import check_resume_checkpoint

    for name, refused in (("modernbert_tiny", True), ("tiny", False)):
        saved = RobertaConfig.from_name(name, vocab_size=300).to_dict()
        model = saved | {field: value}
        check_resume_checkpoint(tmp_path / "last.ckpt", {"hyper_parameters": {"model": saved}}, saved, "h")
        if not refused:
            check_resume_checkpoint(tmp_path / "last.ckpt", {"hyper_parameters": {"model": saved}}, model, "h")
            continue
        with pytest.raises(ConfigError, match=f"model.{field}={saved[field]} in the checkpoint but {value} here"):
            check_resume_checkpoint(tmp_path / "last.ckpt", {"hyper_parameters": {"model": saved}}, model, "h")
