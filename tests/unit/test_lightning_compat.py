"""Every Lightning internal the project reads (roberta_pl/lightning_compat.py), checked on a real Trainer.

If a Lightning upgrade moves one of them, this file fails and names it, instead of a run silently logging
on the wrong steps, checkpointing twice or requeueing mid-step."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.plugins.environments import SLURMEnvironment
from torch.utils.data import DataLoader, TensorDataset

from roberta_pl import lightning_compat as compat
from roberta_pl.callbacks import EpochProgressBar, StepProgressBar


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4)


class Probe(pl.Callback):
    def __init__(self) -> None:
        self.rows: list[tuple[int, int, bool, int | None]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append((compat.micro_batches_started(trainer), trainer.global_step, compat.is_logging_step(trainer),
                          compat.last_saved_step(trainer)))


def test_training_loop_internals(tmp_path):
    probe = Probe()
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, accumulate_grad_batches=2, log_every_n_steps=2,
                         callbacks=[probe, ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3)],
                         logger=pl.loggers.CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tiny())
    micro, steps, logging, saved = zip(*probe.rows)
    assert list(micro) == list(range(1, 13))  # counts the current micro-batch
    assert list(steps) == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    # Lightning flags every micro-batch of a logging step (steps 2, 4, 6 here): the project relies on that.
    assert [s for s, flag in zip(steps, logging) if flag] == [1, 2, 3, 4, 5, 6] and sum(logging) == 6
    # Checkpoint callbacks run after the others: the probe sees step 3's save from the next micro-batch on.
    assert list(saved) == [0] * 6 + [3] * 6 and compat.last_saved_step(trainer) == 6


def test_progress_bar_update(tmp_path):
    bar = StepProgressBar()
    trainer = pl.Trainer(accelerator="cpu", max_steps=5, callbacks=[bar], logger=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(Tiny())
    task = bar.progress.tasks[bar.train_progress_bar_id] if bar.progress else None
    assert task is None or task.completed == 5
    compat.set_progress(bar, bar.train_progress_bar_id, 3)  # raises if the private method moved


def test_rich_progress_bar_private_hooks_the_bars_use(tmp_path):
    """StepProgressBar re-creates the train task after a mid-epoch resume and redraws the metrics itself, and
    both bars label the train task through DescribedProgressBar: fail here, by name, if Lightning moves these."""
    import inspect

    assert list(inspect.signature(RichProgressBar._initialize_train_progress_bar_id).parameters) == ["self"]
    assert list(inspect.signature(RichProgressBar._update_metrics).parameters) == ["self", "trainer", "pl_module"]
    assert list(inspect.signature(RichProgressBar._get_train_description).parameters) == ["self", "current_epoch"]
    assert "self._get_train_description(" in inspect.getsource(RichProgressBar._initialize_train_progress_bar_id)

    class Counted(StepProgressBar):
        def get_metrics(self, trainer, pl_module):
            self.metric_reads += 1
            return super().get_metrics(trainer, pl_module)

    class Restart(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                before, reads = bar.train_progress_bar_id, bar.metric_reads
                compat.start_train_progress(bar)
                compat.refresh_progress_metrics(bar, trainer, pl_module)
                seen.update(new_task=bar.train_progress_bar_id != before, reads=bar.metric_reads - reads,
                            description=bar.progress.tasks[bar.train_progress_bar_id].description)

    bar, seen = Counted(), {}
    bar.metric_reads = 0
    trainer = pl.Trainer(accelerator="cpu", max_steps=5, callbacks=[bar, Restart()], logger=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(Tiny())
    assert seen["new_task"] and seen["reads"] == 1 and seen["description"].strip() == "Steps", seen


def test_completes_step_marks_the_last_micro_batch_of_each_accumulation_window(tmp_path):
    class Record(Tiny):
        def training_step(self, batch, batch_idx):
            flags.append(compat.completes_step(self.trainer))
            return super().training_step(batch, batch_idx)

    flags: list[bool] = []
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, accumulate_grad_batches=3, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=tmp_path)
    trainer.fit(Record())
    assert flags == [False, False, True] * 3


def test_resumed_batch_progress_moves_the_micro_batch_counters_and_the_loader_state(tmp_path):
    class Remembering(DataLoader):  # a stateful loader, so Lightning saves and restores its state
        def state_dict(self):
            return {"at": 0}

        def load_state_dict(self, state):
            loaded.append(state)

    class Streamed(Tiny):
        def train_dataloader(self):
            return Remembering(TensorDataset(torch.randn(64, 4)), batch_size=4)

    class First(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not first:
                first.append((compat.micro_batches_started(trainer), trainer.global_step))

    loaded: list[dict] = []
    first: list[tuple[int, int]] = []
    quiet = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                 default_root_dir=tmp_path)
    pl.Trainer(max_steps=2, callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="two")], **quiet).fit(Streamed())
    checkpoint = torch.load(tmp_path / "two.ckpt", weights_only=False)
    compat.set_resumed_batch_progress(checkpoint, total=10, in_epoch=3, loader_state={"at": 7})
    torch.save(checkpoint, tmp_path / "moved.ckpt")
    pl.Trainer(max_steps=4, callbacks=[First()], enable_checkpointing=False, **quiet).fit(
        Streamed(), ckpt_path=tmp_path / "moved.ckpt")
    assert first == [(11, 2)]  # 10 micro-batches done, this one is the 11th; optimizer steps are not moved
    assert loaded == [{"at": 7}]


def test_drop_wandb_init_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="compat")
    assert "anonymous" in logger._wandb_init  # what Lightning always passes to wandb.init
    compat.drop_wandb_init_setting(logger, "anonymous")
    compat.drop_wandb_init_setting(logger, "not-a-setting")  # absent keys are fine
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["project"] == "compat"
    assert logger.experiment.project == "compat"  # wandb.init still gets the rest
    logger.experiment.finish()


def test_slurm_environment_and_auto_requeue(monkeypatch):
    for k, v in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                 "SLURM_NODEID": "0", "SLURM_JOB_ID": "7", "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(k, v)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False)
    env = compat.slurm_environment(trainer)
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue  # what build_trainer turns off
    monkeypatch.delenv("SLURM_NTASKS")
    assert compat.slurm_environment(pl.Trainer(accelerator="cpu", devices=1, logger=False)) is None


def test_wandb_run_started(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="compat")
    assert not compat.wandb_run_started(logger)
    logger.experiment  # noqa: B018  (creates the run)
    assert compat.wandb_run_started(logger)
    logger.experiment.finish()


def test_val_check_batch_is_read_before_each_check(tmp_path):
    class WithVal(Tiny):
        def validation_step(self, batch, batch_idx):
            self.seen.append(self.trainer.global_step)

        def val_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=4)

    class Pick(pl.Callback):  # validate after micro-batches 2 and 5 only (0-based)
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            m = compat.micro_batches_started(trainer) - 1
            compat.set_val_check_batch(trainer, m + 1 if m in (2, 5) else m + 2)

    model = WithVal()
    model.seen = []
    trainer = pl.Trainer(accelerator="cpu", max_steps=8, val_check_interval=4, check_val_every_n_epoch=None,
                         num_sanity_val_steps=0, callbacks=[Pick()], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(model)
    assert model.seen == [3, 6]


def test_max_steps_changed_during_fit_ends_the_run_there(tmp_path):
    class Shorten(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                compat.set_max_steps(trainer, 5)

    trainer = pl.Trainer(accelerator="cpu", max_steps=100, callbacks=[Shorten()], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Tiny())
    assert trainer.global_step == 5 and trainer.max_steps == 5


def test_progress_bar_elapsed_counts_the_whole_fit_not_the_epoch(tmp_path):
    """Lightning's time column timed the train task from its restart at each epoch (a 5-minute run showed
    0:00:34). StepProgressBar times this process's fit: 300 s moved into the past at the second epoch's
    start still show at the end of the third, and the column it replaces is the one compat names."""

    class Shift(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                bar.train_started -= 300  # as if the first epoch had taken 5 minutes

        def on_train_end(self, trainer, pl_module):
            task = bar.progress.tasks[bar.train_progress_bar_id]
            (column,) = [c for c in bar.progress.columns if type(c).__name__ == "_RunTimeColumn"]
            shown.append((str(column.render(task)), task.completed))

    bar, shown = StepProgressBar(), []
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, max_epochs=3, limit_train_batches=2, callbacks=[bar, Shift()],
                         logger=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    assert any(compat.is_rich_time_column(c) for c in RichProgressBar().configure_columns(trainer))
    trainer.fit(Tiny())
    ((text, completed),) = shown
    elapsed, remaining = text.split(" • ")
    assert completed == 6 and elapsed.startswith("0:05:") and remaining == "0:00:00", text


def test_fine_tuning_bar_counts_epochs_from_one_and_shows_the_monitored_metric_without_v_num(tmp_path):
    """Lightning's bar read "Epoch 1/1" in the second of two epochs, with the logger's ``v_num``; the fine-tuning bar
    reads "Epoch 2/2" and shows the metric that picks the best checkpoint, though the module keeps it off the bar."""

    class Scored(Tiny):
        def validation_step(self, batch, batch_idx):
            self.log("val/mcc", 0.25)  # not prog_bar, as the fine-tuning module logs mcc

        def val_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=4)

    class Look(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):  # the last one's values stay
            seen.update(description=bar.progress.tasks[bar.train_progress_bar_id].description,
                        metrics=bar.get_metrics(trainer, pl_module),
                        lightning=(RichProgressBar._get_train_description(bar, trainer.current_epoch),
                                   RichProgressBar.get_metrics(bar, trainer, pl_module)))

    bar, seen = EpochProgressBar("val/mcc"), {}
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=2, callbacks=[bar, Look()],
                         logger=pl.loggers.CSVLogger(tmp_path), enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=tmp_path)
    trainer.fit(Scored())
    assert seen["lightning"][0].strip() == "Epoch 1/1" and "v_num" in seen["lightning"][1]  # what the issue saw
    assert seen["description"].strip() == "Epoch 2/2"  # our override of Lightning's private description is used
    assert seen["metrics"] == {"val/mcc": 0.25}, seen["metrics"]


@pytest.mark.slow  # ~5-15 s: the full suite runs it, make test-fast does not
def test_quiet_notices_drops_lightnings_start_up_lines_and_keeps_warnings():
    # Checked on Lightning's own wording (a changed message shows up here): the device inventory, "Seed set to"
    # and the limit_val_batches/val_check_interval notices are dropped; a real warning still gets through.
    import subprocess
    import sys

    script = ("import warnings, lightning.pytorch as pl\n"
              "from roberta_pl.loggers import quiet_notices\n"
              "{quiet}\n"
              "pl.seed_everything(3)\n"
              "pl.Trainer(accelerator='cpu', logger=False, enable_checkpointing=False, limit_val_batches=1.0,\n"
              "           val_check_interval=1.0, enable_progress_bar=False)\n"
              "warnings.warn('a real warning')\n")
    noise = ("GPU available: ", "TPU available: ", "Seed set to", "was configured so")
    loud = subprocess.run([sys.executable, "-c", script.format(quiet="")], capture_output=True, text=True, timeout=120)
    quiet = subprocess.run([sys.executable, "-c", script.format(quiet="quiet_notices()")], capture_output=True,
                           text=True, timeout=120)
    assert all(n in loud.stdout + loud.stderr for n in noise)  # the lines exist without it
    assert not [n for n in noise if n in quiet.stdout + quiet.stderr], quiet.stdout + quiet.stderr
    assert "a real warning" in quiet.stderr
