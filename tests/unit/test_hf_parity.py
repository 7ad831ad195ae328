"""Parity with HuggingFace transformers: the same weights give the same logits both ways."""

import pytest
import torch
import transformers

from roberta_pl.hf import config_to_hf, load_hf, save_hf
from roberta_pl.model import IGNORE_INDEX, RobertaConfig, RobertaForMaskedLM


def _random_config(seed: int) -> RobertaConfig:
    g = torch.Generator().manual_seed(seed)
    heads = int(torch.randint(1, 4, (1,), generator=g))
    return RobertaConfig(
        vocab_size=int(torch.randint(50, 300, (1,), generator=g)),
        hidden_size=heads * 16,
        num_layers=int(torch.randint(1, 4, (1,), generator=g)),
        num_heads=heads,
        intermediate_size=int(torch.randint(32, 128, (1,), generator=g)),
        max_seq_len=40,
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


def _hf_model(config: RobertaConfig) -> transformers.RobertaForMaskedLM:
    hf_config = transformers.RobertaConfig(**{k: v for k, v in config_to_hf(config).items() if k != "architectures"})
    return transformers.RobertaForMaskedLM(hf_config).eval()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hf_to_ours_logits_match(tmp_path, seed):
    config = _random_config(seed)
    torch.manual_seed(seed)
    hf = _hf_model(config)
    with torch.no_grad():  # non-zero biases and LayerNorm affine, so a swapped key cannot hide
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    ids, mask = _padded_batch(config, seed)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, mask).logits
    real = mask.bool()  # padded positions are don't-care in both implementations
    assert (got[real] - expected[real]).abs().max() <= 1e-4


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("pad_vocab_multiple", [1, 64])
def test_ours_to_hf_logits_match_with_no_missing_keys(tmp_path, seed, pad_vocab_multiple):
    config = _random_config(seed)
    config.pad_vocab_multiple = pad_vocab_multiple
    torch.manual_seed(seed)
    ours = RobertaForMaskedLM(config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_hf(ours, tmp_path)
    hf, info = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
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


def test_sparse_head_loss_equals_dense_loss():
    config = _random_config(5)
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
    hf.load_state_dict({k: v for k, v in model.state_dict().items()}, strict=False)
    with torch.no_grad():
        hf_loss = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(sparse.loss, hf_loss, rtol=1e-5, atol=1e-5)


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
