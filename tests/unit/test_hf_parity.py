"""Parity with HuggingFace transformers: the same weights give the same logits both ways, for the post-LN
model (``RobertaForMaskedLM``) and the pre-LN one (``RobertaPreLayerNormForMaskedLM``)."""

import contextlib
import io
import logging
import re

import pytest
import torch
import transformers

from roberta_pl.hf import (
    config_to_hf,
    load_hf,
    load_hf_encoder,
    save_hf,
    save_hf_classifier,
    to_hf_state_dict,
)
from roberta_pl.model import (
    IGNORE_INDEX,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
)


def _random_config(seed: int, pre_layernorm: bool = False) -> RobertaConfig:
    g = torch.Generator().manual_seed(seed)
    heads = int(torch.randint(1, 4, (1,), generator=g))
    return RobertaConfig(
        vocab_size=int(torch.randint(50, 300, (1,), generator=g)),
        hidden_size=heads * 16,
        num_layers=int(torch.randint(1, 4, (1,), generator=g)),
        num_heads=heads,
        intermediate_size=int(torch.randint(32, 128, (1,), generator=g)),
        max_seq_len=40,
        pre_layernorm=pre_layernorm,
    )


def _padded_batch(config: RobertaConfig, seed: int = 0):
    """Random ids with right padding of varying length: every row keeps at least 3 real tokens."""
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 24
    ids = torch.randint(5, config.vocab_size, (B, T), generator=g)
    ids[:, 0] = config.bos_token_id
    lengths = torch.tensor([T, T - 5, 7, 3])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    ids[~mask] = config.pad_token_id
    return ids, mask.long()


HF_CLASS = {False: "RobertaForMaskedLM", True: "RobertaPreLayerNormForMaskedLM"}


@contextlib.contextmanager
def transformers_log():
    """What ``transformers`` logs meanwhile (its load reports list MISSING/UNEXPECTED weights as warnings)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        yield out
    finally:
        root.removeHandler(handler)


def _hf_model(config: RobertaConfig) -> transformers.PreTrainedModel:
    """HF's masked LM for ``config``, built from the ``config.json`` we would write (model type included)."""
    fields = {k: v for k, v in config_to_hf(config).items() if k != "architectures"}
    hf_config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    hf = transformers.AutoModelForMaskedLM.from_config(hf_config)
    assert type(hf).__name__ == HF_CLASS[config.pre_layernorm]
    return hf.eval()


@pytest.mark.parametrize("seed,pre_layernorm", [(0, False), (1, False), (2, False), (0, True), (1, True)])
def test_hf_to_ours_logits_match(tmp_path, seed, pre_layernorm):
    config = _random_config(seed, pre_layernorm)
    torch.manual_seed(seed)
    hf = _hf_model(config)
    with torch.no_grad():  # non-zero biases and LayerNorm affine, so a swapped key cannot hide
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    assert ours.config.pre_layernorm is pre_layernorm
    ids, mask = _padded_batch(config, seed)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, mask).logits
    real = mask.bool()  # padded positions are don't-care in both implementations
    assert (got[real] - expected[real]).abs().max() <= 1e-4


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("pad_vocab_multiple", [1, 64])
@pytest.mark.parametrize("pre_layernorm", [False, True])
def test_ours_to_hf_logits_match_with_no_missing_keys(tmp_path, seed, pad_vocab_multiple, pre_layernorm):
    config = _random_config(seed, pre_layernorm)
    config.pad_vocab_multiple = pad_vocab_multiple
    torch.manual_seed(seed)
    ours = RobertaForMaskedLM(config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_hf(ours, tmp_path)
    hf, info = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(hf).__name__ == HF_CLASS[pre_layernorm]
    assert info["missing_keys"] == set() or not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    ids, mask = _padded_batch(config, seed)
    with torch.no_grad():
        expected = ours(ids, mask).logits
        got = hf.eval()(input_ids=ids, attention_mask=mask).logits
    assert got.shape[-1] == config.vocab_size
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() <= 1e-4
    # And back again: our loader reproduces the model exactly.
    again = load_hf(tmp_path, pad_vocab_multiple=pad_vocab_multiple)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, mask).logits, expected, rtol=0, atol=0)
    # The bare encoder (what fine-tuning and embeddings start from) loads from it too, with the same states.
    encoder = load_hf_encoder(tmp_path, pad_vocab_multiple=pad_vocab_multiple)
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids, mask), ours.roberta(ids, mask), rtol=0, atol=0)


@pytest.mark.parametrize("pre_layernorm", [False, True])
def test_sparse_head_loss_equals_dense_loss(pre_layernorm):
    config = _random_config(5, pre_layernorm)
    torch.manual_seed(0)
    model = RobertaForMaskedLM(config).eval()
    ids, mask = _padded_batch(config, 5)
    labels = torch.full_like(ids, IGNORE_INDEX)
    pick = (torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.3) & mask.bool()
    labels[pick] = ids[pick]
    with torch.no_grad():
        sparse = model(ids, mask, labels)
        dense_logits = model(ids, mask).logits
    dense_loss = torch.nn.functional.cross_entropy(dense_logits.reshape(-1, config.vocab_size), labels.reshape(-1))
    assert sparse.logits.shape == (int(pick.sum()), config.vocab_size)
    torch.testing.assert_close(sparse.loss, dense_loss, rtol=1e-5, atol=1e-6)
    # Also equal to HF's dense loss on the same weights and labels.
    hf = _hf_model(config)
    result = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    # The decoder's weight and bias are HF's tied views of the word embeddings and lm_head.bias.
    assert sorted(result.missing_keys) == ["lm_head.decoder.bias", "lm_head.decoder.weight"], result
    assert not result.unexpected_keys, result
    with torch.no_grad():
        hf_loss = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(sparse.loss, hf_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type,prefix", [("xlm-roberta", "XLMRoberta"), ("camembert", "Camembert")])
def test_other_roberta_family_types_load_and_go_back_out_as_themselves(tmp_path, model_type, prefix):
    """XLM-R and CamemBERT are RoBERTa's architecture under other names: they load with the same logits, and an
    export (masked LM or classifier) keeps the model type and class names it came with."""
    config = _random_config(9)
    fields = {k: v for k, v in config_to_hf(config).items() if k not in ("architectures", "model_type")}
    torch.manual_seed(9)
    hf = transformers.AutoModelForMaskedLM.from_config(transformers.AutoConfig.for_model(model_type, **fields)).eval()
    assert type(hf).__name__ == f"{prefix}ForMaskedLM"
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "in")
    ours = load_hf(tmp_path / "in")
    assert ours.config.hf_model_type == model_type
    ids, mask = _padded_batch(config, 9)
    real = mask.bool()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        assert (ours(ids, mask).logits[real] - expected[real]).abs().max() <= 1e-4
    save_hf(ours, tmp_path / "out")
    again, info = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(again).__name__ == f"{prefix}ForMaskedLM" and again.config.model_type == model_type
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        assert (again.eval()(input_ids=ids, attention_mask=mask).logits[real] - expected[real]).abs().max() <= 1e-4
    classifier = RobertaForSequenceClassification(ours.config, num_labels=2)
    save_hf_classifier(classifier, tmp_path / "cls", labels=["a", "b"])
    assert type(transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls")).__name__ == \
        f"{prefix}ForSequenceClassification"


def test_a_model_type_must_fit_the_layernorm_placement():
    with pytest.raises(ValueError, match="hf_model_type='xlm-roberta' with pre_layernorm=True"):
        RobertaConfig(pre_layernorm=True, hf_model_type="xlm-roberta")
    with pytest.raises(ValueError, match="hf_model_type='bert'"):
        RobertaConfig(hf_model_type="bert")


def test_load_hf_rejects_wrong_architecture(tmp_path):
    config = _random_config(6)
    model = RobertaForMaskedLM(config)
    save_hf(model, tmp_path)
    import json
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KeyError, match="missing="):
        load_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path / "nowhere")


@pytest.mark.parametrize("pre_layernorm", [False, True])
def test_an_untied_decoder_is_refused_and_a_stored_copy_of_the_embeddings_loads(tmp_path, pre_layernorm):
    # transformers (5.x) uses a decoder.weight stored in the file, tie_word_embeddings or not: ours ties the decoder
    # to the embeddings, so a different matrix would be dropped without a word (max |diff| of the logits ~6).
    config = _random_config(7, pre_layernorm)
    fields = {k: v for k, v in config_to_hf(config).items() if k != "architectures"} | {"tie_word_embeddings": False}
    hf_config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(7)
    hf = transformers.AutoModelForMaskedLM.from_config(hf_config)
    hf.save_pretrained(tmp_path / "untied")
    with pytest.raises(ValueError, match=r"untied.*lm_head\.decoder\.weight is not the token embeddings") as e:
        load_hf(tmp_path / "untied")
    assert "\n" not in str(e.value)
    with torch.no_grad():  # the same matrix stored twice is the tied model: it loads, with transformers' logits
        hf.lm_head.decoder.weight.copy_(hf.base_model.embeddings.word_embeddings.weight)
    hf.save_pretrained(tmp_path / "copy")
    ours = load_hf(tmp_path / "copy")
    ids, mask = _padded_batch(config, 7)
    with torch.no_grad():
        expected, got = hf.eval()(input_ids=ids, attention_mask=mask).logits, ours(ids, mask).logits
    assert (got[mask.bool()] - expected[mask.bool()]).abs().max() <= 1e-4


@pytest.mark.parametrize("pre_layernorm", [False, True])
def test_export_fills_masks_in_transformers_pipeline_and_gives_automodel_its_encoder(tmp_path, tokenizer_dir,
                                                                                       pre_layernorm):
    """The export with its tokenizer, as a user meets it: ``pipeline("fill-mask")`` ranks tokens by our model's
    probabilities, and ``AutoModel`` (the bare encoder, for hidden states) loads every weight it has."""
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = RobertaConfig.from_name("tiny", vocab_size=len(tok), num_layers=2, max_seq_len=40,
                                     pre_layernorm=pre_layernorm)
    torch.manual_seed(7)
    ours = RobertaForMaskedLM(config).eval()
    with torch.no_grad():  # peaked distributions, so the top-5 order is decided by clear margins
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    save_hf(ours, tmp_path, tokenizer=tokenizer_dir)
    text = "Return the <mask> of the list."
    with transformers_log() as log:
        filled = transformers.pipeline("fill-mask", model=str(tmp_path), top_k=5)(text)
        masked_lm = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert type(masked_lm).__name__ == HF_CLASS[pre_layernorm]
    assert "LOAD REPORT" not in log.getvalue() and "MISSING" not in log.getvalue(), log.getvalue()  # every weight used
    enc = tok(text, return_tensors="pt")
    where = enc["input_ids"][0].tolist().index(tok.mask_token_id)
    with torch.no_grad():
        probs = ours(enc["input_ids"]).logits[0, where].softmax(-1)
    top = probs.topk(5)
    assert [r["token"] for r in filled] == top.indices.tolist()
    torch.testing.assert_close(torch.tensor([r["score"] for r in filled]), top.values, rtol=1e-4, atol=1e-6)
    # Hidden states, as the README says: the masked LM's encoder (`.base_model`) loads silently (checked above).
    # AutoModel loads them too, with transformers' report of the two things a bare encoder and a masked LM do not
    # share: the MLM head (UNEXPECTED, as for roberta-base's files) and the pooler, BERT's next-sentence leftover
    # (MISSING, drawn at random). Writing a pooler would only move the report onto AutoModelForMaskedLM, the
    # fill-mask pipeline and every fine-tuning start, which would then call it UNEXPECTED.
    head = {k for k in to_hf_state_dict(ours) if k.startswith("lm_head.")}
    with transformers_log() as log:
        auto, info = transformers.AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["unexpected_keys"] == head and info["missing_keys"] == {"pooler.dense.weight", "pooler.dense.bias"}
    assert not info["mismatched_keys"], info
    assert "lm_head" in log.getvalue() and "pooler.dense.weight" in log.getvalue()  # what the README describes
    with torch.no_grad():
        # The README's parity bound (1e-4): two fp32 kernels sum in different orders (1.4e-5 seen on one element).
        expected = ours.roberta(enc["input_ids"])
        for encoder in (masked_lm.base_model, auto):
            torch.testing.assert_close(encoder.eval()(**enc).last_hidden_state, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pre_layernorm", [False, True])
@pytest.mark.parametrize("token", [False, True])
def test_classifier_export_matches_transformers_auto_class(tmp_path, pre_layernorm, token):
    """A fine-tuned model's export (sequence or token head, post- or pre-LN) loads in the matching
    ``transformers`` class with every key used and gives our logits."""
    config = _random_config(8, pre_layernorm)
    torch.manual_seed(8)
    cls = RobertaForTokenClassification if token else RobertaForSequenceClassification
    ours = cls(config, num_labels=3).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_hf_classifier(ours, tmp_path, labels=["a", "b", "c"])
    auto = transformers.AutoModelForTokenClassification if token else transformers.AutoModelForSequenceClassification
    with transformers_log() as log:
        hf, info = auto.from_pretrained(tmp_path, output_loading_info=True)
    kind = "TokenClassification" if token else "SequenceClassification"
    assert type(hf).__name__ == f"Roberta{'PreLayerNorm' if pre_layernorm else ''}For{kind}"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert "LOAD REPORT" not in log.getvalue(), log.getvalue()
    ids, mask = _padded_batch(config, 8)
    with torch.no_grad():
        expected, got = ours(ids, mask), hf.eval()(input_ids=ids, attention_mask=mask).logits
    real = mask.bool() if token else slice(None)
    assert (got[real] - expected[real]).abs().max() <= 1e-4


def test_fill_mask_shows_what_byte_and_whitespace_pieces_stand_for(tmp_path, tokenizer_dir, tok, capsys):
    """``roberta-pl-fill-mask`` prints a predicted newline as '\\n', not its byte piece ``<0x0A>``; whitespace
    pieces as their spaces; a lone non-ASCII byte as its piece. ``transformers``' pipeline decodes the newline too."""
    from roberta_pl.cli import fill_mask

    config = RobertaConfig.from_name("tiny", vocab_size=tok.vocab_size, num_layers=1, max_seq_len=40)
    torch.manual_seed(9)
    ours = RobertaForMaskedLM(config).eval()
    ranked = ["<0x0A>", "\u2581\u2581\u2581\u2581", "<0x09>", "<0xE2>", "\u2581the"]
    ids = [tok.piece_to_id(p) for p in ranked]
    assert tok.unk_id not in ids
    with torch.no_grad():  # biases far above the logits' spread fix the top 5 in this order
        for rank, i in enumerate(ids):
            ours.lm_head.bias[i] = 50.0 - 2 * rank
    save_hf(ours, tmp_path, tokenizer=tokenizer_dir)
    fill_mask.main([str(tmp_path), "Return the <mask> of the list."])
    out = capsys.readouterr().out
    assert re.sub(r" [01]\.\d{3}", "", out.splitlines()[1]) == "  <mask> #1: '\\n', '    ', '\\t', '<0xE2>', 'the'", out
    assert "<0x0A>" not in out and "\u2581" not in out, out
    filled = transformers.pipeline("fill-mask", model=str(tmp_path), top_k=5)("Return the <mask> of the list.")
    assert [r["token"] for r in filled] == ids
    assert filled[0]["token_str"] == "\n" and filled[2]["token_str"] == "\t"
