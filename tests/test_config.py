"""Config loading, overrides and validation: every bad value is a one-line error naming the key."""
import pytest

from megads.config import ConfigError, TrainConfig, load_config, lr_at, schedule_value


def test_yaml_and_overrides():
    cfg = load_config("configs/tiny.yaml", ["train.steps=50", "parallel.tp=2", "model.rope_factor=4"])
    assert cfg.train.steps == 50 and cfg.parallel.tp == 2 and cfg.model.rope_factor == 4.0
    assert cfg.name == "tiny" and cfg.run_dir == "runs/tiny"


@pytest.mark.parametrize("override, words", [
    (["model.hiden_size=3"], ["model.hiden_size", "model.hidden_size"]),
    (["trian.steps=3"], ["trian", "train"]),
    (["model.n_routed_experts=6"], ["model.n_routed_experts=6", "model.n_group=4"]),
    (["model.topk_group=5"], ["model.topk_group=5"]),
    (["model.num_experts_per_tok=9"], ["model.num_experts_per_tok=9"]),
    (["train.global_batch=10"], ["train.global_batch=10", "train.micro_batch=8"]),
    (["train.steps=abc"], ["train.steps", "int"]),
    (["model.qk_rope_head_dim=15"], ["model.qk_rope_head_dim=15"]),
    (["parallel.pipeline_schedule=gpipe"], ["parallel.pipeline_schedule"]),
    (["data.source=indexed", "data.train_path=/nonexistent/train", "data.valid_path=/nonexistent/valid"],
     ["data.train_path", "/nonexistent/train.bin"]),
    (["model.num_heads=4", "parallel.tp=3"], ["model.num_heads=4", "parallel.tp=3"]),
    ([], ["world size 1", "= 2", "--nproc-per-node 2", "parallel.tp=1"]),       # tiny.yaml's TP=2 on one process
])
def test_bad_values_name_the_setting(override, words):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", override).validate(world_size=1)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_layout_checks_name_both_numbers():
    cfg = load_config("configs/tiny.yaml", ["parallel.tp=2", "parallel.pp=2"])
    with pytest.raises(ConfigError, match="world size 6 is not divisible by .* = 4"):
        cfg.validate(world_size=6)
    cfg.validate(world_size=8)


@pytest.mark.parametrize("overrides, world_size, words", [
    (["parallel.tp=1", "parallel.ep=3", "model.n_routed_experts=12", "model.n_group=3", "train.micro_batch=4"], 4,
     ["parallel.ep=3", "dp * tp = 4 * 1 = 4"]),
    (["parallel.tp=1", "parallel.ep=8", "model.n_routed_experts=12", "train.micro_batch=2"], 8,
     ["model.n_routed_experts=12", "parallel.ep=8"]),
], ids=["ep-does-not-divide-dp-tp", "experts-not-divisible-by-ep"])
def test_expert_layout_checks_name_both_numbers(overrides, world_size, words):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", overrides).validate(world_size=world_size)
    for word in words:
        assert word in str(err.value)


def test_expert_groups_must_fit_the_ep_ranks():
    cfg = load_config("configs/tiny.yaml", ["model.n_routed_experts=12", "model.n_group=4", "parallel.ep=3",
                                            "parallel.tp=1"])
    with pytest.raises(ConfigError, match="model.n_group=4 does not fit parallel.ep=3"):
        cfg.validate(world_size=3)


def test_published_configs_validate():
    load_config("configs/v3-671b.yaml").validate(world_size=2048)
    load_config("configs/v3-16b.yaml").validate(world_size=8)


def test_lr_schedule_v3_shape():
    t = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10, decay_start=40, decay_steps=40,
                    lr_after=[[85, 0.05], [95, 0.01]])
    assert lr_at(t, 0) == pytest.approx(0.1) and lr_at(t, 9) == pytest.approx(1.0)
    assert lr_at(t, 20) == 1.0 and lr_at(t, 40) == 1.0                     # constant stage
    assert lr_at(t, 60) == pytest.approx(0.55)                             # half-way down the cosine
    assert lr_at(t, 80) == pytest.approx(0.1) and lr_at(t, 84) == pytest.approx(0.1)
    assert lr_at(t, 85) == 0.05 and lr_at(t, 99) == 0.01


def test_piecewise_schedules():
    assert schedule_value(0.3, 10**9) == 0.3
    assert [schedule_value([[0, 0.3], [5, 0.1]], s) for s in (0, 4, 5, 9)] == [0.3, 0.3, 0.1, 0.1]
    with pytest.raises(ConfigError, match="train.mtp_loss_weight"):
        load_config("configs/tiny.yaml", ["train.mtp_loss_weight=[[3, 0.1]]"]).validate()


def test_generation_layouts_refuse_what_sft_and_grpo_cannot_run():
    base = load_config("configs/tiny.yaml", ["parallel.tp=1"])
    base.validate(2).validate_generation_layout(2, 8)                          # DP=2: fine
    for overrides, words in ((["parallel.pp=2", "parallel.pipeline_schedule=1f1b"], "parallel.pp=1"),
                             (["fp8.enabled=true"], "fp8.enabled=false")):
        cfg = load_config("configs/tiny.yaml", ["parallel.tp=1", *overrides]).validate(2)
        with pytest.raises(ConfigError, match=words):
            cfg.validate_generation_layout(2, 8)


@pytest.mark.parametrize("override, words", [
    ("train.decay_steps=0", ["train.decay_steps must be positive"]),
    ("train.seed=-1", ["train.seed", "-1"]),
    ("train.lr_after=[[0, abc]]", ["train.lr_after", "'abc'"]),
    ("train.eps=-1", ["train.eps must be positive"]),
    ("train.beta1=1.5", ["train.beta1 must be in [0, 1)"]),
    ("train.beta2=-0.1", ["train.beta2 must be in [0, 1)"]),
    ("train.lr=-1", ["train.lr must be a positive learning rate"]),
    ("train.lr=.nan", ["'train.lr' must be a finite number"]),
    ("train.lr=.inf", ["'train.lr' must be a finite number"]),
    ("train.mtp_loss_weight=[[0, .inf]]", ["train.mtp_loss_weight"]),
    ("grpo.temperature=.inf", ["'grpo.temperature' must be a finite number"]),
])
def test_values_that_used_to_crash_late_are_refused(override, words):
    """Each of these passed validation and failed with a traceback after process groups existed."""
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", ["parallel.tp=1", override]).validate(world_size=1)
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_paths_that_used_to_crash_late_are_refused(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a directory")
    with pytest.raises(ConfigError, match=rf"train.run_dir='{a_file}' is an existing file"):
        load_config("configs/tiny.yaml", ["parallel.tp=1", f"train.run_dir={a_file}"]).validate(world_size=1)
    broken = tmp_path / "ds.json"
    broken.write_text('{"zero_optimization": ')
    with pytest.raises(ConfigError, match=rf"parallel.deepspeed_config: {broken} is not valid JSON"):
        load_config("configs/tiny.yaml", ["parallel.tp=1", f"parallel.deepspeed_config={broken}"]).validate(world_size=1)


def test_settings_this_machine_cannot_run(monkeypatch):
    """Checked by the entry points before any work; `validate` itself stays machine-independent."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    cfg = load_config("configs/tiny.yaml", ["parallel.tp=1", "fp8.enabled=true", "fp8.backend=torch"]).validate(1)
    with pytest.raises(ConfigError, match="fp8.backend=torch runs on a Hopper GPU, but PyTorch sees no GPU here"):
        cfg.check_machine()
    cfg = load_config("configs/tiny.yaml", ["parallel.tp=1", "train.device=cuda"]).validate(1)
    with pytest.raises(ConfigError, match="train.device=cuda but PyTorch sees no GPU here"):
        cfg.check_machine()
