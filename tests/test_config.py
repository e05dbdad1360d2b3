"""Config loading and overrides: wrong keys and types fail clearly."""

from pathlib import Path

import pytest

from jaxrepro import config as configlib
from jaxrepro.train import cli as train_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["convnet", "minixception"])
def test_experiment_configs_load(name):
    c = configlib.resolve(ROOT / "experiments" / f"{name}.py")
    assert c.model == name
    assert c.data.image_size == 180
    assert (c.data.num_train, c.data.num_val) == (2000, 1000)
    assert c.optimizer.to_dict() == dict(name="rmsprop", learning_rate=1e-3, rho=0.9, epsilon=1e-7)
    assert (c.augment.flip, c.augment.rotation, c.augment.zoom) == (True, 0.1, 0.2)
    assert c.dropout_rate == 0.5


def test_paper_protocol_reachable_by_overrides():
    c = configlib.resolve(ROOT / "experiments" / "convnet.py", ["num_epochs=90"])
    assert c.num_epochs == 90
    c = configlib.resolve(ROOT / "experiments" / "minixception.py", ["num_epochs=100"])
    assert c.num_epochs == 100


def test_overrides_are_typed():
    c = configlib.resolve(
        ROOT / "experiments" / "convnet.py",
        ["optimizer.learning_rate=0.01", "augment.flip=false", "seed=7", "data.source=folder"],
    )
    assert c.optimizer.learning_rate == 0.01 and isinstance(c.optimizer.learning_rate, float)
    assert c.augment.flip is False
    assert c.seed == 7 and c.data.source == "folder"


def test_unknown_key_names_valid_keys():
    with pytest.raises(configlib.ConfigError) as e:
        configlib.resolve(ROOT / "experiments" / "convnet.py", ["optimizer.lr=0.1"])
    msg = str(e.value)
    assert "optimizer.lr" in msg and "optimizer.learning_rate" in msg and "num_epochs" in msg


@pytest.mark.parametrize("override", ["num_epochs=ten", "augment.flip=maybe", "seed=1.5"])
def test_wrong_type_is_an_error(override):
    with pytest.raises(configlib.ConfigError, match="expected"):
        configlib.resolve(ROOT / "experiments" / "convnet.py", [override])


def test_missing_file_and_missing_get_config(tmp_path):
    with pytest.raises(configlib.ConfigError, match="not found"):
        configlib.load_file(tmp_path / "nope.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(configlib.ConfigError, match="get_config"):
        configlib.load_file(tmp_path / "empty.py")


def test_hash_changes_with_any_value():
    a = configlib.resolve(ROOT / "experiments" / "convnet.py")
    b = configlib.resolve(ROOT / "experiments" / "convnet.py", ["rng.dropout=3"])
    assert configlib.config_hash(a) == configlib.config_hash(
        configlib.resolve(ROOT / "experiments" / "convnet.py")
    )
    assert configlib.config_hash(a) != configlib.config_hash(b)
    assert configlib.diff_keys(a.to_dict(), b.to_dict()) == ["rng.dropout: -1 -> 3"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["experiments/convnet.py", "--config.nope=1"], "unknown config key 'nope'"),
        (["experiments/convnet.py", "--config.batch_size=big"], "expected a value of type int"),
        (["experiments/missing.py"], "config file not found"),
        (["experiments/convnet.py:huge"], "unknown config variant 'huge'; valid: tiny"),
        (["experiments/convnet.py", "--config.optimizer.name=adam"], "unknown optimizer 'adam'"),
    ],
)
def test_cli_errors_exit_2(args, message, capsys, tmp_path):
    assert train_cli.main([*args, "--workdir", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name, size", [("convnet", 80), ("minixception", 32)])
def test_tiny_variant_is_the_defaults_with_small_settings(name, size):
    tiny = configlib.resolve(f"{ROOT / 'experiments' / name}.py:tiny")
    full = configlib.resolve(ROOT / "experiments" / f"{name}.py")
    changed = {k.split(":")[0] for k in configlib.diff_keys(full.to_dict(), tiny.to_dict())}
    assert (
        {"data.image_size", "data.num_train", "batch_size"}
        <= changed
        <= {
            "batch_size",
            "checkpoint_every_steps",
            "data.image_size",
            "data.num_train",
            "data.num_val",
            "diff_probe_examples",
            "eval_batch_size",
            "num_epochs",
        }
    )
    assert tiny.data.image_size == size and tiny.num_epochs == 2
