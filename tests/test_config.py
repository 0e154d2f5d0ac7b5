"""ray_config.yaml: typed, validated, overridable; every mistake names its key and what is valid."""
import pytest
import yaml

from pipelines.config import Config, ConfigError, load_config
from tests.conftest import CONFIG


def test_the_shipped_config_is_valid_and_complete():
    cfg = load_config(CONFIG)
    raw = yaml.safe_load(CONFIG.read_text())
    # Every key the schema has is written out in the shipped file, so users see every knob.
    for section, fields in Config.model_fields.items():
        assert set(raw[section]) == set(fields.annotation.model_fields), section
    assert cfg.model.name == "cifar_resnet20"
    assert cfg.checkpoint.storage_path.startswith("/")  # ~ expanded: jobs run in other directories


def test_gpu_settings_resolve_from_the_workers_devices():
    import torch
    from pipelines.recipe import numerics
    cpu, gpu = load_config(CONFIG), load_config(CONFIG, ["scaling.gpus_per_worker=1"])
    assert not cpu.decode_on_device and gpu.decode_on_device  # data.decode: auto
    assert load_config(CONFIG, ["data.decode=gpu"]).decode_on_device
    assert not load_config(CONFIG, ["scaling.gpus_per_worker=1", "data.decode=cpu"]).decode_on_device
    on_cpu = numerics(cpu, torch.device("cpu"))
    assert on_cpu.amp is None and not on_cpu.channels_last and on_cpu.compile is None
    on_gpu = numerics(gpu, torch.device("cuda"))
    assert on_gpu.amp == torch.bfloat16 and on_gpu.channels_last and on_gpu.compile == "default"
    # earlier configs wrote compile: true / false
    assert load_config(CONFIG, ["scaling.compile=true"]).scaling.compile == "on"
    assert numerics(load_config(CONFIG, ["scaling.compile=false"]), torch.device("cuda")).compile is None
    assert numerics(load_config(CONFIG, ["scaling.compile=reduce-overhead"]), torch.device("cpu")).compile \
        == "reduce-overhead"


# Each input a skeptical user tried that was once accepted, crashed or blamed another key.
@pytest.mark.parametrize("overrides, message", [
    (["optim.lr=inf"], "optim.lr=inf: Input should be a finite number"),
    (["optim.lr=.inf"], "optim.lr=inf: Input should be a finite number"),
    (["optim.lr=1.0e+300"], "optim.lr=1e+300: Input should be less than or equal to 100"),
    (["optim.weight_decay=inf"], "optim.weight_decay=inf: Input should be a finite number"),
    (["schedule.warmup_epochs=inf"], "schedule.warmup_epochs=inf: Input should be a finite number"),
    (["schedule.warmup_epochs=20"], "schedule.warmup_epochs=20: at most schedule.epochs=10"),
    (["scaling.cpus_per_worker=inf"], "scaling.cpus_per_worker=inf: Input should be a finite number"),
    (["data.mean=[nan, 0.456, 0.406]"], "data.mean.0=nan: Input should be a finite number"),
    (["data.std=[inf, 0.224, 0.225]"], "data.std.0=inf: Input should be a finite number"),
    (["model.shortcut_scale=nan"], "model.shortcut_scale=nan: Input should be a finite number"),
    (["model.gate_bias=inf"], "model.gate_bias=inf: Input should be a finite number"),
    (["model.residual_scale=-5"], "model.residual_scale=-5: Input should be greater than 0"),
    (["schedule.epochs=1.0e+30"], "schedule.epochs=1e+30: Unable to parse input string as an integer"),
    (["schedule.epochs=200000"], "schedule.epochs=200000: Input should be less than or equal to 100000"),
    (["run.seed=-1"], "run.seed=-1: Input should be greater than or equal to 0"),
    ([f"run.seed={2**70}"], f"run.seed={2**70}: Input should be less than or equal to 4294967295"),
    (["run.name=../../../../tmp/escape"], "run.name=../../../../tmp/escape: one folder name"),
    (["run.name=a/b"], "run.name=a/b: one folder name"),
    (["tune.name=.hidden"], "tune.name=.hidden: one folder name"),
    (["checkpoint.storage_path="], "checkpoint.storage_path=: a local path or an s3:// / gs:// URI"),
    (["data.batch_size=1"], "data.batch_size=1: the global batch gives every worker at least one image; at least "
                            "scaling.num_workers (2)"),
    (["scaling.num_workers=[3, 1]"], "scaling.num_workers=[3, 1]: at least 1 worker, and min <= max, e.g. [2, 8]"),
    (["scaling.num_workers=[0, 2]"], "scaling.num_workers=[0, 2]: at least 1 worker"),
    (["scaling.num_workers=0"], "scaling.num_workers=0: at least 1 worker"),
    (["scaling.num_workers=[1, 2, 3]"], "scaling.num_workers=[1, 2, 3]: a number of workers, or [min, max]"),
    (["scaling.num_workers=two"], "scaling.num_workers=two: a number of workers, or [min, max], e.g. 4 or [2, 8]"),
    (["scaling.num_workers=[1, 3]", "scaling.placement_strategy=STRICT_SPREAD"],
     "scaling.placement_strategy=STRICT_SPREAD: with num_workers=[1, 3] use PACK or SPREAD"),
    (["scaling.num_workers=[1, 3]", "data.shuffle_buffer=200"],
     "data.shuffle_buffer=200: at least twice a worker's batch (128)"),
    (["data.batch_size=true"], "data.batch_size=True: a number, not true"),
    (["data.batch_size=2**70"], "data.batch_size=2**70: Input should be a valid integer"),
    (["mlflow.register_model=../x"], "mlflow.register_model=../x: one folder name"),
    (["mlflow.model_alias=champion"], "mlflow.model_alias=champion: set mlflow.register_model too"),
    (["mlflow.register_model=m", "mlflow.model_alias=a.b"], "mlflow.model_alias=a.b: letters, digits, _ and - only"),
    (["mlflow.register_model=m", "mlflow.model_alias=v2"], "mlflow.model_alias=v2: MLflow reserves 'latest' and v<number>"),
])
def test_a_value_the_config_cannot_mean_is_refused_in_one_line_naming_it(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_key_given_twice_on_the_command_line_is_refused(capsys):
    from pipelines.config import parse_cli
    with pytest.raises(SystemExit) as done:
        parse_cli(["--config", str(CONFIG), "run.name=a", "model.depth=32", "run.name=b", "--print-config"], "test")
    assert done.value.code == 2
    assert capsys.readouterr().err == ("error: run.name is given twice on the command line ('run.name=a' "
                                       "and 'run.name=b'); give each key once\n")
    # an entry point's preset and the command line may set one key: the command line wins
    assert load_config(CONFIG, ["run.name=a", "run.name=b"]).run.name == "b"


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    (b"# only a comment\n", "the file is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a text file (byte 0 is not UTF-8)"),
    (b"run:\n  name: [a\n", "line 3, column 1: not valid YAML"),
    (b"run:\n  name: a\n  seed: 1\n  name: b\n", "line 4: name is given twice in one section (first on line 2)"),
    (b"run:\n  seed: 1\nrun:\n  seed: 2\n", "line 3: run is given twice in one section (first on line 1)"),
])
def test_a_config_file_that_cannot_be_read_as_one_is_refused_in_one_line(tmp_path, capsys, content, message):
    from pipelines.config import parse_cli
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as done:
        parse_cli(["--config", str(path), "--print-config"], "test")
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: {message}") and err.count("\n") == 1 and err.count(str(path)) == 1


def test_dotted_overrides_are_typed():
    cfg = load_config(CONFIG, ["model.depth=56", "optim.lr=0.05", "model.residual=false",
                               "schedule.milestones=[3, 6]", "tune.space.model.depth=[20, 44]",
                               "mlflow.tracking_uri=http://127.0.0.1:5000"])
    assert cfg.model.depth == 56 and cfg.optim.lr == 0.05 and cfg.model.residual is False
    assert cfg.model.name == "cifar_plain56"
    assert cfg.schedule.milestones == [3, 6]
    assert cfg.tune.space["model.depth"] == [20, 44]
    assert cfg.mlflow.resolved_uri() == "http://127.0.0.1:5000"


@pytest.mark.parametrize("overrides, message", [
    (["model.family=imagenet", "model.depth=19"],
     "model.depth=19: ImageNet ResNets have depth 18, 34, 50, 101 or 152"),
    (["model.depth=21"], "model.depth=21: CIFAR ResNets have depth 6n+2"),
    (["model.dpeth=56"], "model.dpeth: unknown key; did you mean depth? model accepts family, depth"),
    (["optimm.lr=0.1"], "optimm: unknown key; did you mean optim?"),
    (["optim.lr=0"], "optim.lr=0: Input should be greater than 0"),
    (["optim.lr=fast"], "optim.lr=fast: Input should be a valid number"),
    (["model.shortcut=D"], "model.shortcut=D: Input should be 'A', 'B' or 'C'"),
    (["schedule.kind=linear"], "schedule.kind=linear: Input should be 'step' or 'cosine'"),
    (["schedule.milestones=[8, 5]"], "schedule.milestones=[8, 5]: strictly increasing"),
    (["schedule.epochs=4"], "schedule.milestones=[5, 8]: epoch milestones must be below schedule.epochs=4"),
    (["tune.space.model.depth=[20, 19]"],
     "tune.space: the trial model.depth=19, optim.lr=0.05, schedule.epochs=6, schedule.milestones=[3] is "
     "invalid: model.depth=19: CIFAR ResNets"),
    (["tune.space.model.shortcut=[C]", "tune.space.model.shortcut_variant=[identity, exclusive_gating]"],
     "model.shortcut=C, model.shortcut_variant=exclusive_gating is invalid"),
    (["tune.space.optim.lrr=[0.1]"], "optim.lrr: unknown key; did you mean lr?"),
    (["tune.space.tune.name=[x]"], "tune.space.tune.name: a sweep cannot vary the tune section"),
    (["tune.space.optim.lr={loguniform: [0.01, 0.5]}"],
     "tune.space.optim.lr: a range (loguniform) needs search=random or optuna"),
    (["tune.search=random", "tune.space.optim.lr={loguniform: [0, 0.5]}"], "needs low < high and low > 0"),
    (["tune.search=random", "tune.space.optim.momentum={uniform: [0.5, 1.0]}"],  # a range's ends are trials
     "optim.momentum=1.0: Input should be less than 1"),
    (["data.shuffle_buffer=100"], "data.shuffle_buffer=100: at least twice a worker's batch (64), i.e. 128 or more"),
    (["data.decode=nvjpeg"], "data.decode=nvjpeg: Input should be 'auto', 'cpu' or 'gpu'"),
    (["scaling.compile=fast"], "scaling.compile=fast: Input should be 'auto', 'on', 'off', 'reduce-overhead'"),
    (["scaling.compile=reduce-overhead", "scaling.max_worker_batch=32"],
     "scaling.compile=reduce-overhead runs the model as CUDA graphs, which lose all but the last micro-batch's "
     "gradients: a worker's batch of 64 is split by scaling.max_worker_batch=32. Use scaling.compile=on, or a "
     "max_worker_batch of 64 or more"),
    (["model"], "override 'model': write overrides as key=value"),
    (["model=resnet50"], "model is a section; override one of its keys"),
])
def test_mistakes_name_the_key_the_value_and_what_is_accepted(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, overrides)
    assert message in str(err.value)


def test_unknown_keys_in_the_file_are_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.read_text().replace("  momentum: 0.9", "  momentun: 0.9"))
    with pytest.raises(ConfigError, match="optim.momentun: unknown key; did you mean momentum?"):
        load_config(bad)
    bad.write_text("model: [1, 2]\n")
    with pytest.raises(ConfigError, match="model=\\[1, 2\\]"):
        load_config(bad)
    bad.write_text("model:\n  depth: 20\n   family: cifar\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read the config"):
        load_config(tmp_path / "missing.yaml")


def test_cli_reports_mistakes_without_a_traceback(run_cli):
    p = run_cli("pipelines.train", "--config", str(CONFIG), "model.family=imagenet", "model.depth=19")
    assert p.returncode == 2
    assert p.stderr.strip() == ("error: on the command line, model.depth=19: ImageNet ResNets have depth "
                                "18, 34, 50, 101 or 152")
    assert "Traceback" not in p.stderr


def test_a_mistake_is_said_where_it_was_made_the_command_line_or_the_file(tmp_path, capsys):
    from pipelines.config import parse_cli

    def err(*argv):
        with pytest.raises(SystemExit) as done:
            parse_cli([*argv, "--print-config"], "test")
        assert done.value.code == 2
        return capsys.readouterr().err

    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.read_text().replace("  momentum: 0.9", "  momentun: 0.9"))
    assert err("--config", str(CONFIG), "model.dpeth=56").startswith(
        "error: on the command line, model.dpeth: unknown key; did you mean depth?")
    assert err("--config", str(CONFIG), "optim=0.1").startswith("error: on the command line, optim is a section")
    assert err("--config", str(CONFIG), "model.depth").startswith("error: on the command line, override 'model.depth'")
    # a value that does not go with the file's: the command line made it wrong
    assert err("--config", str(CONFIG), "model.family=imagenet").startswith(
        "error: on the command line, model.depth=20: ImageNet ResNets have depth")
    # one line for each mistake, each with its own source
    assert err("--config", str(bad), "optim.lr=fast").split("\n")[:2] == [
        "error: on the command line, optim.lr=fast: Input should be a valid number, unable to parse string as a number",
        f"error: {bad}: optim.momentun: unknown key; did you mean momentum? optim accepts lr, lr_batch, momentum, "
        "nesterov, weight_decay, no_decay_bn_bias, label_smoothing"]


def test_print_config_prints_the_resolved_config(run_cli, tmp_path):
    p = run_cli("pipelines.train", "--config", str(CONFIG), "--print-config", "model.depth=44")
    assert p.returncode == 0, p.stderr
    printed = Config.model_validate(yaml.safe_load(p.stdout))
    # storage_path: null resolves under that process's RAY_RESNET_HOME
    assert printed.checkpoint.storage_path == str(tmp_path / "home" / "runs")
    expected = load_config(CONFIG, ["model.depth=44", f"checkpoint.storage_path={tmp_path}/home/runs"])
    assert printed == expected


def test_sweeps_are_checked_as_combinations_and_overrides_keep_the_rest_of_the_space():
    cfg = load_config(CONFIG, ["tune.space.model.depth=[18, 34]", "tune.space.model.family=[imagenet]"])
    assert cfg.tune.space == {"model.depth": [18, 34], "optim.lr": [0.05, 0.1], "schedule.epochs": [6],
                              "schedule.milestones": [[3]], "model.family": ["imagenet"]}
    assert load_config(None, ["tune.space.model.depth=[44]"]).tune.space == {
        "model.depth": [44], "optim.lr": [0.05, 0.1]}


def test_string_values_stay_strings_and_empty_sections_take_defaults(tmp_path):
    assert load_config(CONFIG, ["run.name=2024"]).run.name == "2024"
    assert load_config(CONFIG, ["run.name=yes"]).run.name == "yes"
    f = tmp_path / "c.yaml"
    f.write_text("model:\nrun:\n  name: x\n")
    cfg = load_config(f, ["model.depth=32"])
    assert cfg.model.depth == 32 and cfg.run.name == "x"


def test_a_random_search_draws_a_log_uniform_learning_rate_within_its_range():
    from ray.tune.search.sample import Float
    from pipelines.tune import search_space, varying
    cfg = load_config(CONFIG, ["tune.search=random", "tune.space.optim.lr={loguniform: [0.01, 0.5]}"])
    assert cfg.tune.space["optim.lr"] == {"loguniform": (0.01, 0.5)} and "optim.lr" in varying(cfg)
    lr = search_space(cfg)["optim.lr"]
    assert isinstance(lr, Float) and lr.lower == 0.01 and lr.upper == 0.5
    drawn = lr.sample(size=200)
    assert min(drawn) >= 0.01 and max(drawn) <= 0.5
    assert 0.3 < sum(d < 0.0707 for d in drawn) / 200 < 0.7  # log-uniform: half below sqrt(0.01 * 0.5)
