"""Every config group and experiment composes against the schema; typos and impossible batches fail early."""


import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from roberta_pl.config import CONF_DIR
from roberta_pl.pretraining.config import register_configs
from roberta_pl.pretraining.checks import preflight
from roberta_pl.errors import ConfigError
from roberta_pl.trainer import build_strategy, deepspeed_config
from roberta_pl.optim import BatchPlanError, lr_lambda, plan_batch, plan_ramp

register_configs()
GROUPS = {g: sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml")) for g in
          ("model", "batch", "optim", "trainer", "logger", "data", "experiment")}


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="pretrain", overrides=list(overrides))


def test_groups_are_the_documented_ones():
    assert GROUPS["model"] == ["base", "large", "small", "tiny"]
    assert set(GROUPS["trainer"]) == {"cpu", "gpu", "ddp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"}
    assert set(GROUPS["logger"]) == {"wandb", "csv", "tensorboard", "none"}
    assert set(GROUPS["experiment"]) >= {"quickstart", "roberta_base", "roberta_large"}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "shards":
        overrides += ["data.train_shards=x.tar", "data.tokenizer=tok"]
    cfg = _compose(overrides)
    assert cfg.model.hidden_size % cfg.model.num_heads == 0
    if group == "experiment":  # experiments pin a combination and name their run directory
        assert cfg.run_name == option


def test_paper_recipes():
    base = _compose(["experiment=roberta_base"])
    assert (base.batch.global_batch_size, base.batch.seq_len, base.trainer.max_steps) == (8192, 512, 500_000)
    assert (base.optim.lr, base.optim.warmup_steps, list(base.optim.betas), base.optim.eps) == (6e-4, 24_000, [0.9, 0.98], 1e-6)
    large = _compose(["experiment=roberta_large"])
    assert (large.optim.lr, large.optim.warmup_steps, large.model.num_layers) == (4e-4, 30_000, 24)
    # 8192 sequences = micro 32 x accumulation 4 x 64 GPUs.
    assert plan_batch(8192, 32, 64, 512).accumulation == 4
    assert plan_batch(8192, 32, 64, 512).tokens_per_step == 4_194_304


def test_model_settings_are_the_model_config_without_the_runs_settings():
    from omegaconf import OmegaConf

    from roberta_pl.config import model_settings
    from roberta_pl.model import RobertaConfig

    model = OmegaConf.to_container(_compose(["model=small", "model.compile=true"]).model, resolve=True)
    settings = model_settings(model, 1000)
    assert "name" not in settings and "compile" not in settings and settings["vocab_size"] == 1000
    assert RobertaConfig(**settings).hidden_size == model["hidden_size"]  # every field a RobertaConfig takes, no more


def test_typo_fails_at_compose_time():
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)):
        _compose(["model.hiden_size=64"])
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _compose(["batch.global_batch_size=lots"])
    with pytest.raises(ConfigCompositionException):
        _compose(["model=enormous"])


def test_batch_plan_errors_name_the_numbers():
    with pytest.raises(BatchPlanError, match=r"global_batch_size=100 is not divisible by micro_batch_size=16 x world_size=2"):
        plan_batch(100, 16, 2, 128)
    assert plan_batch(64, 8, 1, 128).accumulation == 8


def test_batch_ramp_plan_is_step_aligned():
    final = plan_batch(64, 8, 1, 16)
    phases = plan_ramp([(10, 16), (25, 32)], final)
    assert phases == [(0, 0, 2), (10, 20, 4), (25, 80, 8)]
    with pytest.raises(BatchPlanError, match="must increase"):
        plan_ramp([(10, 16), (5, 32)], final)
    with pytest.raises(BatchPlanError, match="not divisible"):
        plan_ramp([(10, 12)], final)
    with pytest.raises(BatchPlanError, match="switch to global_batch_size=16 at step 3 comes after 3 micro-batches"):
        plan_ramp([(3, 8)], plan_batch(16, 8, 1, 16))


def test_lr_schedule_shape():
    kw = dict(warmup_steps=10, total_steps=110)
    assert lr_lambda(0, **kw) == pytest.approx(0.1)
    assert lr_lambda(9, **kw) == pytest.approx(1.0)
    assert lr_lambda(60, **kw) == pytest.approx(0.5)
    assert lr_lambda(110, **kw) == pytest.approx(0.0)
    assert lr_lambda(60, decay="polynomial", power=2.0, **kw) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="optim.decay"):
        lr_lambda(50, decay="sawtooth", **kw)


@pytest.mark.parametrize("overrides,message", [
    (["batch.global_batch_size=33"], "not divisible"),
    (["batch.seq_len=256"], "exceeds model.max_seq_len=128"),
    (["trainer=deepspeed_zero2"], "no CUDA GPU is visible; .* trainer.accelerator=cpu"),
    (["trainer=deepspeed_zero3", "trainer.accelerator=cpu", "trainer.precision=16-mixed"], "trainer.precision=16-mixed"),
    (["trainer=gpu"], "no CUDA GPU"),
    (["data.train_shards=/nonexistent/train.tar", "data.tokenizer=/nonexistent/tok"], "data.tokenizer=/nonexistent/tok"),
])
def test_preflight_refuses_bad_configs(tmp_path, overrides, message):
    cfg = _compose(overrides)
    with pytest.raises((ConfigError, BatchPlanError), match=message):
        preflight(cfg, tmp_path / "run")


def test_preflight_refuses_missing_shards_and_unwritable_dir(tmp_path):
    (tmp_path / "tok").mkdir()
    cfg = _compose([f"data.train_shards={tmp_path}/missing.tar", f"data.tokenizer={tmp_path}/tok"])
    with pytest.raises(ConfigError, match="missing.tar: no such file"):
        preflight(cfg, tmp_path / "run")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="is not writable"):
        preflight(_compose(), blocker / "run")


def test_deepspeed_configs_build(tmp_path):
    for name, stage in [("deepspeed_zero2", 2), ("deepspeed_zero3", 3), ("deepspeed_zero3_offload", 3)]:
        cfg = _compose([f"trainer={name}", "batch.micro_batch_size=8", "batch.global_batch_size=32"])
        ds = deepspeed_config(cfg, plan_batch(32, 8, 1, 128))
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["train_micro_batch_size_per_gpu"] == 8  # iterable loaders: DeepSpeed cannot infer it
        assert ("offload_param" in ds["zero_optimization"]) == name.endswith("offload")
        # The strategy the trainer gets: Lightning's DeepSpeedStrategy, able to run on CPU ranks too.
        from lightning.pytorch.strategies import DeepSpeedStrategy
        strategy = build_strategy(cfg, plan_batch(32, 8, 1, 128))
        assert isinstance(strategy, DeepSpeedStrategy) and strategy.config["zero_optimization"]["stage"] == stage


def test_pretraining_help_lists_every_option_of_its_groups_and_no_finetuning_group():
    import re
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "roberta_pl.pretraining.app", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    listed = dict(re.findall(r"^([a-z_/]+): (.+)$", done.stdout.split("== Config")[0], re.M))
    for group in ("model", "batch", "optim", "data", "trainer", "logger", "experiment", "hparams_search"):
        options = {o.strip() for o in listed[group].split(",")}
        assert options == {p.stem for p in (CONF_DIR / group).glob("*.yaml")}, group
    assert "task" not in listed  # fine-tuning's group


@pytest.mark.parametrize("name", GROUPS["model"])
def test_model_yaml_is_generated_from_the_one_preset_table(name):
    from roberta_pl.config import preset_yaml

    assert (CONF_DIR / "model" / f"{name}.yaml").read_text() == preset_yaml(name), \
        "conf/model/ differs from roberta_pl/model.py PRESETS: run `python -m roberta_pl.config`"
