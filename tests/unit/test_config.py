"""Every config group and experiment composes against the schema; typos and impossible batches fail early."""


import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from roberta_pl.batch_plan import BatchPlanError, plan_batch, plan_ramp, plan_schedule
from roberta_pl.config import CONF_DIR
from roberta_pl.errors import ConfigError
from roberta_pl.optim import lr_lambda
from roberta_pl.pretraining.checks import preflight
from roberta_pl.pretraining.config import register_configs
from roberta_pl.trainer import build_strategy, deepspeed_config

register_configs()
GROUPS = {g: sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml")) for g in
          ("model", "batch", "optim", "trainer", "logger", "data", "experiment")}


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="pretrain", overrides=list(overrides))


def test_groups_are_the_documented_ones():
    assert GROUPS["model"] == ["base", "large", "modernbert_base", "modernbert_large", "modernbert_tiny", "small", "tiny"]
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
    with pytest.raises(BatchPlanError, match="switch to global_batch_size=16 at step 3 comes after 3 micro-batches"):
        plan_ramp([(3, 8)], plan_batch(16, 8, 1, 16))


def test_a_ramp_size_that_does_not_split_over_the_ranks_is_rounded_up_and_said(caplog):
    # A preset's ramp (budget_cpu: 16 sequences for 300 steps, micro-batch 16) on 2 ranks: 16 does not make a
    # micro-batch on each rank. The ramp adapts, with a notice; the user's final global batch is never rounded.
    final = plan_batch(64, 8, 1, 16)
    with caplog.at_level("INFO", logger="roberta_pl"):
        assert plan_ramp([(8, 12)], final) == [(0, 0, 2), (8, 16, 8)]
    assert "global_batch_size=12 until step 8 does not split into micro-batches of 8 on 1 rank; it trains at 16" \
        in caplog.text
    two_ranks = plan_schedule(32, 16, 2, 128, [(300, 16)])
    assert two_ranks.phases == ((0, 0, 1),)  # rounded to 32, the final batch: no ramp left
    assert plan_schedule(64, 16, 2, 128, [(300, 16)]).phases == ((0, 0, 1), (300, 300, 2))
    with pytest.raises(BatchPlanError, match="global_batch_size=48 is not divisible"):
        plan_schedule(48, 16, 2, 128, [(300, 16)])


def test_lr_schedule_shape():
    kw = dict(warmup_steps=10, total_steps=110)
    assert lr_lambda(0, **kw) == pytest.approx(0.1)
    assert lr_lambda(9, **kw) == pytest.approx(1.0)
    assert lr_lambda(60, **kw) == pytest.approx(0.5)
    assert lr_lambda(110, **kw) == pytest.approx(0.0)
    assert lr_lambda(60, decay="polynomial", power=2.0, **kw) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="optim.decay"):
        lr_lambda(50, decay="sawtooth", **kw)


def test_wsd_holds_the_peak_then_decays_over_the_last_steps_of_whatever_horizon_is_set():
    kw = dict(warmup_steps=10, total_steps=110, decay="wsd")
    assert lr_lambda(5, **kw) == pytest.approx(0.6)  # the warm-up is the same
    assert lr_lambda(10, **kw) == lr_lambda(89, **kw) == 1.0 and lr_lambda(90, **kw) == pytest.approx(1.0)  # stable: 80%
    assert lr_lambda(100, **kw) == pytest.approx(0.5) and lr_lambda(110, **kw) == pytest.approx(0.0)
    assert lr_lambda(100, decay_steps=40, **kw) == pytest.approx(0.25)  # decay_steps wins over the fraction
    assert lr_lambda(60, decay_steps=40, **kw) == 1.0 and lr_lambda(80, decay_steps=40, **kw) == pytest.approx(0.75)
    # The schedule reads the run's horizon at every step: a budget that fixes it later moves the decay with it.
    import torch

    from roberta_pl.batch_plan import StepHorizon
    from roberta_pl.optim import lr_scheduler

    horizon = StepHorizon(1_000_000, fixed=False)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = lr_scheduler(optimizer, {"decay": "wsd", "decay_steps": 10}, 2, lambda: horizon.max_steps)["scheduler"]
    lrs = []
    for step in range(30):
        if step == 3:
            horizon.set(30)  # the budget's figure, inside the warm-up's measuring window
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[2:20] == [1.0] * 18 and lrs[25] == pytest.approx(0.5) and lrs[29] == pytest.approx(0.1)
    with pytest.raises(ConfigError, match=r"^optim.decay_fraction=0.0: "):
        from roberta_pl.checks import check_model_and_optim
        check_model_and_optim(_compose(["optim.decay=wsd", "optim.decay_fraction=0"]))


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


@pytest.mark.slow
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


def test_the_help_lists_the_presets_of_the_one_table():
    from roberta_pl.config import help_with_presets

    text = (CONF_DIR / "pretrain.yaml").read_text()
    assert help_with_presets(text) == text, "run `python -m roberta_pl.config`"
    assert help_with_presets(text.replace("model: tiny, small, base, large", "model: tiny")) == text


@pytest.mark.parametrize("override, allowed", [
    ("optim.decay=cosin", "[linear, polynomial, cosine, constant, wsd]"),
    ("trainer.strategy=deepspeedd", "[auto, ddp, deepspeed]"),
    ("trainer.nonfinite_loss=skipp", "[stop, skip]"),
    ("logger.kind=wandbb", "[csv, wandb, tensorboard, none]"),
    ("data.packing=full_sentence", "[full_sentences, doc, packed_docs]"),
    ("data.on_error=ignore", "[raise, skip]"),
])
def test_a_misspelt_choice_fails_when_the_config_is_composed_naming_the_allowed_values(override, allowed):
    with pytest.raises(ConfigCompositionException) as err:
        _compose([override])
    assert allowed in str(err.value.__cause__)


def test_the_lr_schedule_choices_are_the_schedule_registry():
    from roberta_pl.config import OptimConf
    from roberta_pl.optim import DECAYS, Decay

    assert [d.value for d in Decay] == list(DECAYS)  # a new schedule in DECAYS is a new choice, nothing else
    assert OptimConf().decay == "linear" and f"{OptimConf().decay}" == "linear"
    # Resolved for loggers and checkpoints, the choices are plain strings (a checkpoint loads with weights_only).
    from omegaconf import OmegaConf
    resolved = OmegaConf.to_container(_compose(["optim.decay=cosine"]), resolve=True, enum_to_str=True)
    assert type(resolved["optim"]["decay"]) is str and resolved["optim"]["decay"] == "cosine"


def test_the_precision_is_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"^trainer.precision=bf17: choose one of 32-true, .*bf16-mixed"):
        preflight(_compose(["trainer.precision=bf17"]), tmp_path / "run")


def test_a_bad_mask_rate_is_refused_in_preflight_before_data(tmp_path):
    with pytest.raises(ConfigError, match=r"^data: mask_prob must be in \(0, 1\), got 1.5"):
        preflight(_compose(["data.mask_prob=1.5"]), tmp_path / "run")


@pytest.mark.slow
def test_cli_misspelt_key_gets_did_you_mean_and_a_refused_config_leaves_no_run_dir(tmp_path):
    import subprocess
    import sys

    def train(*args):
        return subprocess.run([sys.executable, "-m", "roberta_pl.pretraining.app", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    done = train("optim.lrr=1e-3")  # without `+`: Hydra alone would advise adding the key with `+optim.lrr`
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == "roberta-pl-train: error: unknown config key optim.lrr; did you mean optim.lr?"
    assert not (tmp_path / "runs").exists()
    done = train("trainer.precision=bf17")  # refused after Hydra made runs/default: it is removed again
    assert done.returncode != 0 and "error: trainer.precision=bf17" in done.stderr
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "default" / "checkpoints").mkdir(parents=True)  # a run's own files keep its directory
    done = train("trainer.precision=bf17")
    assert done.returncode != 0 and (tmp_path / "runs" / "default" / "checkpoints").is_dir()
    chosen = tmp_path / "mine"  # a run_dir of the user's choice may have existed before: it is never removed
    chosen.mkdir()
    done = train("trainer.precision=bf17", f"run_dir={chosen}")
    assert done.returncode != 0 and chosen.is_dir()


def test_the_step_horizon_is_read_and_followed():
    from roberta_pl.batch_plan import StepHorizon

    plan = plan_schedule(32, 8, 1, 16, [(10, 16)])  # accumulation 2 until step 10, then 4
    seen = []
    budget = StepHorizon(1_000_000, plan, fixed=False)  # a time budget: only a cap until fixed
    budget.follow(seen.append)
    assert seen == [] and budget.max_steps == 1_000_000
    budget.set(50)
    assert seen == [50] and budget.max_steps == 50 and budget.micro_batches_before(50) == 20 + 40 * 4
    fixed = StepHorizon(30, plan)
    fixed.follow(seen.append)
    assert seen == [50, 30]


def test_fine_tuning_follows_optim_decay_like_pretraining():
    import torch

    from roberta_pl.finetune.module import FinetuneModule
    from roberta_pl.model import RobertaConfig

    model = {**RobertaConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                             max_seq_len=16).__dict__}
    optim = {"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.0, "layer_decay": 1.0,
             "decay": "cosine", "power": 1.0, "end_lr_ratio": 0.1}
    module = FinetuneModule(model=model, kind="sequence_classification", labels=["a", "b"], regression=False,
                            optim=optim, total_steps=20, warmup_steps=4)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1e-3 * lr_lambda(s, warmup_steps=4, total_steps=20, decay="cosine", end_ratio=0.1) for s in range(20)]
    assert lrs == pytest.approx(expected)
    assert lrs[12] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # cosine, half-way through the decay: not linear's
    del torch


def test_pinned_batches_only_for_cuda():
    from types import SimpleNamespace

    from roberta_pl.checks import uses_cuda

    assert not uses_cuda(_compose([]))
    assert uses_cuda(_compose(["trainer=gpu"]))
    assert uses_cuda(SimpleNamespace(trainer=SimpleNamespace(accelerator="cuda")))
