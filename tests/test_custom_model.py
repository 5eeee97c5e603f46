"""Your own model and dataset by factory path: they train in a simulation, and a factory
that returns the wrong thing is one line that says what it must return."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from p2pfl.config import ModelConfig
from p2pfl.learning import clear_dataset_cache, load_dataset
from p2pfl.plugins import DATASET_CONTRACT, MODEL_CONTRACT, FactoryError
from sim.runner import build_simulation, run_simulation
from sim.scenario import ScenarioError, scenario_from_dict

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom"

USER_MODULE = """
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, input_shape, num_classes, width=16):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.Tanh())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def with_buffers(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64), nn.Linear(64, num_classes))


def wrong_output(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


def not_a_module(input_shape, num_classes):
    return "a model"


def no_arrays(seed, data_dir):
    return {"x_train": [[1.0]]}


NOT_CALLABLE = 3
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module of the user's own (``h5_user_models``)."""
    (tmp_path / "h5_user_models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("h5_user_models", None)
    return "h5_user_models"


def scenario(**tables: Any) -> Any:
    base: dict[str, Any] = {
        "seed": 3,
        "rounds": 8,
        "data": {"dataset": "digits", "batch_size": 16},
        "topology": {"kind": "ring", "n": 4},
        "protocol": {"name": "dpsgd", "local_steps": 5},
        "sim": {"eval_every": 8},
    }
    base.update(tables)
    return scenario_from_dict(base)


def test_a_user_model_by_import_path_trains_in_a_simulation(user_module: str) -> None:
    config = scenario(model={"name": f"{user_module}:TinyNet", "params": {"width": 24}, "lr": 0.2})
    simulation = build_simulation(config)
    net = simulation.trainer._net
    assert type(net).__name__ == "TinyNet" and isinstance(net.head, nn.Linear)
    assert net.head.in_features == 24
    rows = run_simulation(simulation, show_progress=False)
    assert rows[0]["acc_mean"] < 0.3 and rows[-1]["acc_mean"] >= 0.7, rows[-1]["acc_mean"]


def test_the_example_cnn_and_npz_dataset_train(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(EXAMPLE / "make_npz.py"), str(tmp_path)], check=True)
    clear_dataset_cache()
    config = scenario(
        data={"dataset": f"{EXAMPLE}/data.py:load", "data_dir": str(tmp_path)},
        model={"name": f"{EXAMPLE}/model.py:small_cnn", "params": {"channels": 4}},
    )
    simulation = build_simulation(config)
    assert simulation.dataset.name == "my-digits" and simulation.dataset.input_shape == (1, 8, 8)
    net = simulation.trainer._net
    assert isinstance(net, nn.Sequential) and isinstance(net[0], nn.Conv2d)
    rows = run_simulation(simulation, show_progress=False)
    assert rows[-1]["acc_mean"] >= rows[0]["acc_mean"] + 0.1, rows  # it learns


@pytest.mark.parametrize(
    ("factory", "problem"),
    [
        ("with_buffers", "has buffers"),
        ("wrong_output", "output for a batch of 2 is (2, 3), not (2, 10)"),
        ("not_a_module", "it returned a str"),
    ],
)
def test_a_model_factory_returning_the_wrong_thing_says_what_it_must_return(
    user_module: str, factory: str, problem: str
) -> None:
    with pytest.raises(FactoryError) as caught:
        build_simulation(scenario(model={"name": f"{user_module}:{factory}"}))
    message = str(caught.value)
    assert problem in message and MODEL_CONTRACT in message and "\n" not in message
    assert message.startswith(f"model.name='{user_module}:{factory}'")


def test_a_dataset_factory_returning_the_wrong_thing_says_what_it_must_return(
    user_module: str,
) -> None:
    with pytest.raises(FactoryError) as caught:
        load_dataset(f"{user_module}:no_arrays")
    message = str(caught.value)
    assert "returned no y_train, x_test, y_test" in message and DATASET_CONTRACT in message


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        ("no_such_module_h5:f", "importing no_such_module_h5 failed"),
        ("h5_user_models:missing", "has no attribute 'missing'"),
        ("h5_user_models:NOT_CALLABLE", "NOT_CALLABLE is not callable"),
        ("nowhere/model.py:f", "no such file nowhere/model.py"),
        ("resnet", "expected one of 'logreg', 'mlp', 'cnn', or a factory as module:factory"),
    ],
)
def test_the_config_checks_the_factory_path(user_module: str, model: str, problem: str) -> None:
    with pytest.raises(ScenarioError, match=problem) as caught:
        scenario(model={"name": model})
    assert str(caught.value).startswith("model.name:") and "\n" not in str(caught.value)


def test_params_belong_to_a_factory() -> None:
    with pytest.raises(ValueError, match="params apply to a model factory"):
        ModelConfig(name="mlp", params={"width": 3})


def test_the_cli_says_what_a_model_factory_must_return(tmp_path: Path) -> None:
    """The module is found in the working directory (as ``python -m`` would find it); its
    factory's model has buffers: one line with the contract, exit status 2."""
    (tmp_path / "h5_cli_models.py").write_text(USER_MODULE)
    path = tmp_path / "bad.toml"
    path.write_text('rounds = 1\n[model]\nname = "h5_cli_models:with_buffers"\n[topology]\nn = 4\n')
    done = subprocess.run(
        [sys.executable, "-c", "from p2pfl.cli import app; app()", "sim", str(path), "--quiet"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "has buffers" in done.stderr and MODEL_CONTRACT in done.stderr.replace("\n", " ")
    assert "Traceback" not in done.stderr
