"""A checkpoint is data: the tokenizer path its hyper-parameters name may point anywhere. Exports copy only the
tokenizer files they know by name, from the tokenizer the model was trained with (its hash), never through a
symlink and never changing a mode outside the export; the readers (fill-mask, embed, fine-tuning) ask the same
check."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import transformers
from test_finetune import finetune
from test_pretrain import TINY, compose_cfg

from roberta_pl.checkpoints import export, load_pretrained
from roberta_pl.cli.embed import main as embed_main
from roberta_pl.cli.export import main as export_main
from roberta_pl.cli.fill_mask import main as fill_mask_main
from roberta_pl.hf import _umask
from roberta_pl.pretraining.app import run

TOKENIZER_FILES = ("spm.model", "tokenizer_meta.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shard_dir, tokenizer_dir) -> Path:
    """A real pretraining checkpoint (one step of a tiny model), recording ``tokenizer_dir`` and its hash."""
    out = tmp_path_factory.mktemp("ckpt")
    overrides = [*TINY, f"data.train_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}", "trainer.max_steps=1",
                 "checkpoint.every_n_steps=1", "trainer.val_every_n_steps=1000", "export_hf=false"]
    run(compose_cfg(overrides), out, overrides=overrides)
    return out / "checkpoints" / "last.ckpt"


def forged(checkpoint: Path, tmp_path: Path, tokenizer: Path, name: str = "forged.ckpt") -> Path:
    """``checkpoint`` with its recorded tokenizer path replaced by ``tokenizer`` (the hash left as it was)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["hyper_parameters"]["tokenizer"] = str(tokenizer)
    path = tmp_path / name
    torch.save(state, path)
    return path


def secret(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def foreign_dir(tmp_path: Path, like: Path | None = None) -> tuple[Path, Path]:
    """A directory holding a 0600 ``id_rsa`` and ``tokenizer.json`` linked to a 0600 file outside it; with ``like``,
    also that tokenizer's other files (so its hash is the real one). Returns (directory, the outside file)."""
    d = tmp_path / "foreign"
    d.mkdir()
    if like is not None:
        for name in TOKENIZER_FILES:
            if name != "tokenizer.json":
                shutil.copy(like / name, d / name)
    secret(d / "id_rsa", "-----BEGIN OPENSSH PRIVATE KEY-----\n")
    outside = secret(tmp_path / "passwd", "root:x:0:0:root:/root:/bin/bash\n")
    (d / "tokenizer.json").symlink_to(outside)
    return d, outside


def modes(*paths: Path) -> list[int]:
    return [stat.S_IMODE(os.lstat(p).st_mode) for p in paths]


def exits_with_one_line(main, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    message = str(exc.value)
    assert message.startswith("roberta-pl-") and "\n" not in message, message
    return message


def test_export_of_a_checkpoint_naming_a_foreign_directory_copies_nothing(tmp_path, checkpoint, reliability):
    d, outside = foreign_dir(tmp_path)
    ckpt = forged(checkpoint, tmp_path, d)
    out = tmp_path / "export"
    message = exits_with_one_line(export_main, [str(ckpt), str(out)])
    assert "--tokenizer" in message and str(d) in message, message
    assert not out.exists()  # nothing half-done: not even the weights
    assert modes(d / "id_rsa", outside) == [0o600, 0o600]
    reliability("export_foreign_tokenizer_dir",
                happened=f"`roberta-pl-export` refused it before writing anything: `{message}`",
                kept="no export directory; the foreign files' modes (0600) untouched")


def test_a_tokenizer_file_linked_out_of_the_directory_is_refused_and_id_rsa_never_copied(
        tmp_path, checkpoint, tokenizer_dir, reliability):
    # The directory holds the real tokenizer (its hash matches), so only the file names and the link decide.
    d, outside = foreign_dir(tmp_path, like=tokenizer_dir)
    ckpt = forged(checkpoint, tmp_path, d)
    out = tmp_path / "export"
    message = exits_with_one_line(export_main, [str(ckpt), str(out)])
    assert "tokenizer.json" in message and "symbolic link out of its directory" in message, message
    assert not out.exists() or not any(out.iterdir())
    # An explicitly passed tokenizer directory is the user's choice, but still read without following links.
    message = exits_with_one_line(export_main, [str(checkpoint), str(out), "--tokenizer", str(d)])
    assert "tokenizer.json" in message and "symbolic link out of its directory" in message, message
    assert not out.exists() or not any(out.iterdir())
    assert modes(d / "id_rsa", outside) == [0o600, 0o600]
    # Without the link the export goes through, holding the tokenizer files and nothing else of the directory.
    (d / "tokenizer.json").unlink()
    shutil.copy(tokenizer_dir / "tokenizer.json", d / "tokenizer.json")
    export(ckpt, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "model.safetensors", *TOKENIZER_FILES])
    assert modes(d / "id_rsa", outside) == [0o600, 0o600]
    reliability("export_tokenizer_symlink",
                happened=f"`roberta-pl-export` refused the link (recorded or `--tokenizer` directory): `{message}`; "
                         f"with the link gone it exported the known tokenizer files only",
                kept="`id_rsa` and the link's target never copied, their modes (0600) untouched")


def test_export_writes_ordinary_modes_replaces_planted_links_and_round_trips(tmp_path, checkpoint, tokenizer_dir,
                                                                             reliability):
    src = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, src)
    (src / "tokenizer_config.json").chmod(0o600)  # the export's copy gets the umask's mode, not the source's
    out = tmp_path / "export"
    out.mkdir()
    target = secret(tmp_path / "elsewhere", "do not touch\n")
    # Planted links: the export replaces one with its own file, never writes through it, and leaves the other (a
    # name it does not write) alone instead of changing its target's mode.
    (out / "config.json").symlink_to(target)
    (out / "notes.txt").symlink_to(target)
    export(checkpoint, out, tokenizer=src)
    assert target.read_text() == "do not touch\n" and modes(target, src / "tokenizer_config.json") == [0o600, 0o600]
    assert not (out / "config.json").is_symlink() and (out / "notes.txt").is_symlink()
    (out / "notes.txt").unlink()
    assert set(modes(*out.iterdir())) == {0o666 & ~_umask()}
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "model.safetensors", *TOKENIZER_FILES])
    ours, _ = load_pretrained(checkpoint)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is <mask>.", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == 0 and ids[0, -1] == 2 and 4 in ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
    reliability("export_dir_planted_link",
                happened="the export replaced the link named like its own file and left the other link alone; "
                         "its files got the umask's mode, not the source's",
                kept="the links' target, unwritten and still 0600; the source tokenizer's modes")


def test_readers_check_the_recorded_tokenizer_too(tmp_path, checkpoint, tokenizer_dir, corpus_file, capsys):
    from data_pipelines.tokenizer import train_tokenizer

    other = tmp_path / "other"
    train_tokenizer(corpus_file, other, vocab_size=600, input_sentence_size=5000)
    ckpt = forged(checkpoint, tmp_path, other)
    message = exits_with_one_line(fill_mask_main, [str(ckpt), "a <mask> b"])
    assert "--tokenizer" in message and str(other) in message, message
    texts = tmp_path / "texts.txt"
    texts.write_text("one text\nanother text\n")
    message = exits_with_one_line(embed_main, [str(ckpt), str(texts)])
    assert "--tokenizer" in message and str(other) in message and not texts.with_suffix(".npy").exists(), message
    # Fine-tuning names its own way to choose a tokenizer, and stops before any training.
    with pytest.raises(SystemExit) as exc:
        finetune(tmp_path / "run", [f"pretrained={ckpt}", f"task.train_file={texts}", f"task.valid_file={texts}"])
    assert "tokenizer=DIR" in str(exc.value) and "\n" not in str(exc.value) and str(other) in str(exc.value)
    assert not (tmp_path / "run" / "checkpoints").exists()
    missing = forged(checkpoint, tmp_path, tmp_path / "gone", "missing.ckpt")
    assert "--tokenizer" in exits_with_one_line(fill_mask_main, [str(missing), "a <mask> b"])
    # The user's own choice is taken as it is: a smaller tokenizer is only offered its own ids (the model's rows
    # beyond them are no token), a larger one is refused in one line.
    capsys.readouterr()
    for chosen in (tokenizer_dir, other):
        fill_mask_main([str(ckpt), "a <mask> b", "--tokenizer", str(chosen)])
        assert "<mask> #1" in capsys.readouterr().out
    small = forged(checkpoint, tmp_path, other, "small.ckpt")
    state = torch.load(small, weights_only=True)
    rows = state["state_dict"]["model.roberta.embeddings.word_embeddings.weight"].shape[0]  # padded vocab
    state["hyper_parameters"]["model"] |= {"vocab_size": 600, "pad_vocab_multiple": 1}
    state["state_dict"] = {k: v[:600] if v.shape[:1] == (rows,) else v for k, v in state["state_dict"].items()}
    torch.save(state, small)
    message = exits_with_one_line(fill_mask_main, [str(small), "a <mask> b", "--tokenizer", str(tokenizer_dir)])
    assert "has 800 tokens but the model 600" in message, message
    assert load_pretrained(checkpoint)[1] == tokenizer_dir


def test_links_inside_a_hub_snapshot_are_followed_and_copied_as_files(tmp_path, checkpoint, tokenizer_dir):
    # The HuggingFace hub cache holds each file of a revision as snapshots/REV/NAME -> ../../blobs/SHA: a model
    # fine-tuned from it exports its tokenizer from there. A link leaving the repository is still refused.
    repo = tmp_path / "models--someone--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for i, name in enumerate(TOKENIZER_FILES):
        shutil.copy(tokenizer_dir / name, repo / "blobs" / f"sha{i}")
        (snapshot / name).symlink_to(Path("..", "..", "blobs", f"sha{i}"))
    out = tmp_path / "export"
    export(checkpoint, out, tokenizer=snapshot)
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "model.safetensors", *TOKENIZER_FILES])
    assert not any(p.is_symlink() for p in out.iterdir())
    assert (out / "spm.model").read_bytes() == (tokenizer_dir / "spm.model").read_bytes()
    outside = secret(tmp_path / "passwd", "root:x:0:0\n")
    (snapshot / "tokenizer.json").unlink()
    (snapshot / "tokenizer.json").symlink_to(outside)
    message = exits_with_one_line(export_main, [str(checkpoint), str(tmp_path / "again"), "--tokenizer", str(snapshot)])
    assert "symbolic link out of its directory" in message and not (tmp_path / "again").exists()
