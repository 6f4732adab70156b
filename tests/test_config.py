"""traind.toml: the template documents every key, and bad values are named precisely."""

import dataclasses
import tomllib

import pytest

from engine.core import config
from engine.cli import main


def test_template_has_every_key_with_its_default_and_loads_back(tmp_path):
    text = config.render_template()
    parsed = tomllib.loads(text)
    defaults = config.Config().to_dict()
    for section, values in defaults.items():
        assert set(parsed[section]) == set(values), section
        for key in values:
            assert f"\n{key} = " in text
    path = tmp_path / "traind.toml"
    path.write_text(text)
    assert config.load(path) == config.Config()


@pytest.mark.parametrize("body, expected", [
    ("[training]\nlearning_rate = -1\n", "training.learning_rate = -1: expected a number > 0.0"),
    ("[training]\nbatch_size = \"8\"\n", "training.batch_size = '8': expected an integer >= 1"),
    ("[training]\nprecision = \"fp8\"\n", "training.precision = 'fp8': expected one of 'auto'"),
    ("[training]\nlearnin_rate = 1e-4\n", "unknown key 'training.learnin_rate'"),
    ("[trainer]\n", "unknown section or key 'trainer'"),
    ("[validation]\nmax_line_size = \"lots\"\n", "validation.max_line_size = 'lots': expected a size in bytes"),
    ("[jobs]\nwarm_worker = 1\n", "jobs.warm_worker = 1: expected true or false"),
    ("[training]\noptim = \"adamw_8bits\"\n", "training.optim = 'adamw_8bits': expected a transformers optimizer name"),
    ("[training]\noptim = \"\"\n", "training.optim = '' is empty: expected a transformers optimizer name"),
    ("[training]\nattn_implementation = \"flash\"\n", "training.attn_implementation = 'flash': expected one of "
                                                        "'auto', 'sdpa', 'eager', 'flash_attention_2'"),
    ("[training]\nmax_grad_norm = -1\n", "training.max_grad_norm = -1: expected a number >= 0.0"),
    ("[training]\ngradient_checkpointing = \"yes\"\n", "training.gradient_checkpointing = 'yes': expected true or false"),
    ("[training]\ntorch_compile = 1\n", "training.torch_compile = 1: expected true or false"),
])
def test_bad_values_name_the_file_key_value_and_expectation(tmp_path, body, expected):
    path = tmp_path / "traind.toml"
    path.write_text(body)
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_sizes_accept_units(tmp_path):
    path = tmp_path / "traind.toml"
    path.write_text('[validation]\nmax_line_size = "1 MiB"\nmax_file_size = 5000\n')
    loaded = config.load(path)
    assert loaded.validation.max_line_size == 2**20
    assert loaded.validation.max_file_size == 5000


def test_a_bad_config_stops_commands_with_exit_2(tmp_path, capsys):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "traind.toml").write_text("[checkpoint]\nkeep = 0\n")
    assert main(["daemon", "-w", str(ws)]) == 2
    assert "checkpoint.keep = 0: expected an integer >= 1" in capsys.readouterr().err


def test_every_field_is_documented():
    for section in dataclasses.fields(config.Config):
        for f in dataclasses.fields(section.default_factory):
            assert f.metadata["doc"], f.name


def test_a_time_of_day_is_checked(tmp_path):
    path = tmp_path / "traind.toml"
    path.write_text('[snapshots]\ndaily_at = "25:00"\n')
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert "snapshots.daily_at = '25:00': expected a time of day 'HH:MM' (24-hour) or 'off'" in str(err.value)
    path.write_text('[snapshots]\ndaily_at = "off"\n')
    assert config.load(path).snapshots.daily_at == "off"


def test_memory_and_speed_knobs_are_read_from_the_training_section(tmp_path):
    path = tmp_path / "traind.toml"
    path.write_text('[training]\ngradient_checkpointing = true\nattn_implementation = "sdpa"\n'
                    'optim = "paged_adamw_8bit"\nmax_grad_norm = 0\nuse_liger_kernel = true\ntorch_compile = true\n')
    t = config.load(path).training
    assert (t.gradient_checkpointing, t.attn_implementation, t.optim, t.max_grad_norm, t.use_liger_kernel,
            t.torch_compile) == (True, "sdpa", "paged_adamw_8bit", 0.0, True, True)
    d = config.TrainingConfig()
    assert (d.gradient_checkpointing, d.attn_implementation, d.optim, d.max_grad_norm, d.use_liger_kernel,
            d.torch_compile) == (False, "auto", "adamw_torch", 1.0, False, False)


def test_the_optimizer_names_are_the_installed_transformers_own():
    """The daemon checks training.optim without importing transformers: against a copy of its names, kept equal
    here, so a transformers upgrade that adds or drops one fails this test instead of a user's job."""
    from transformers.training_args import OptimizerNames

    assert config.OPTIMIZERS == tuple(o.value for o in OptimizerNames)


def test_the_report_to_names_are_the_installed_transformers_integrations():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    assert config.REPORT_TO == tuple(sorted(INTEGRATION_TO_CALLBACK))


def test_a_mistyped_tracker_or_listen_address_is_refused_naming_the_key():
    with pytest.raises(config.ConfigError, match=r"training.report_to = \['tensorbord'\]: unknown 'tensorbord': "
                                                 "did you mean 'tensorboard'"):
        config.from_dict({"training": {"report_to": ["tensorbord"]}})
    with pytest.raises(config.ConfigError, match=r"metrics.listen = 'localhost': expected 'HOST:PORT'"):
        config.from_dict({"metrics": {"listen": "localhost"}})
    c = config.from_dict({"metrics": {"listen": "[::1]:9464"}, "training": {"report_to": ["tensorboard", "wandb"]}})
    assert (c.metrics.listen, c.training.report_to) == ("[::1]:9464", ("tensorboard", "wandb"))
    assert config.Config().metrics.listen == "off" and config.Config().training.report_to == ()


def test_every_mistake_in_the_file_is_reported_at_once(tmp_path, capsys):
    ws = tmp_path / "ws"
    ws.mkdir()
    path = ws / "traind.toml"
    path.write_text('[training]\nbatch_size = 0\nlearnin_rate = 1e-4\nprecision = "fp8"\n'
                    '[checkpoint]\nkeep = 0\n[trainer]\nx = 1\n[distributed]\nnodes = 2\n')
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    expected = [f"{path}: training.batch_size = 0: expected an integer >= 1",
                f"{path}: unknown key 'training.learnin_rate': did you mean 'learning_rate'?",
                f"{path}: training.precision = 'fp8': expected one of 'auto'",
                f"{path}: checkpoint.keep = 0: expected an integer >= 1",
                f"{path}: unknown section or key 'trainer'",
                f"{path}: distributed.nodes = 2 needs distributed.rdzv_endpoint"]
    assert len(err.value.problems) == len(expected)
    for want in expected:
        assert sum(problem.startswith(want) for problem in err.value.problems) == 1, want
    assert main(["daemon", "-w", str(ws)]) == 2
    said = capsys.readouterr().err
    assert said.startswith("traind daemon: 6 problems:\n") and all(want in said for want in expected)
    with pytest.raises(config.ConfigError) as err:  # a command reading one section hears of all of its own
        config.load_section(path, "training")
    assert len(err.value.problems) == 3


def test_sharding_on_one_rank_without_cpu_offload_is_refused_naming_the_keys(tmp_path):
    path = tmp_path / "traind.toml"
    path.write_text('[distributed]\nsharding = "fsdp"\n')
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    [problem] = err.value.problems
    assert problem.startswith(f"{path}: distributed.sharding = 'fsdp' on one rank in all")
    assert all(key in problem for key in ("training.processes", "distributed.nodes", "distributed.cpu_offload"))

    path.write_text('[distributed]\nsharding = "fsdp"\ncpu_offload = true\n')  # the model's state on the host
    assert config.load(path).sharding_plan() == {"method": "fsdp", "reshard_after_forward": True,
                                                 "cpu_offload": True, "wrap_modules": []}
    path.write_text('[training]\nprocesses = 2\n[distributed]\nsharding = "fsdp"\nwrap_modules = ["LlamaDecoderLayer"]\n')
    assert config.load(path).sharding_plan()["wrap_modules"] == ["LlamaDecoderLayer"]
    path.write_text('[distributed]\nsharding = "zero3"\n')
    with pytest.raises(config.ConfigError, match="distributed.sharding = 'zero3': expected one of 'none', 'fsdp'"):
        config.load(path)
    assert config.Config().sharding_plan() is None
    path.write_text('[training]\nprocesses = 2\noptim = "paged_adamw_8bit"\n[distributed]\nsharding = "fsdp"\n')
    with pytest.raises(config.ConfigError, match="training.optim = 'paged_adamw_8bit' cannot step sharded parameters"):
        config.load(path)
    assert all(config.sharding_optimizer(name) for name in ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd"))
