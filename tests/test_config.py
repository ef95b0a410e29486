"""Experiment files: inheritance, overrides, validation errors that name the file, key and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medseg_lightning.cli import main
from medseg_lightning.config import ConfigError, config_to_yaml, load_config

from .conftest import REPO

EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_file_loads(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSEG_DATA_ROOT", "/data-root")
    config = load_config(path)
    assert config.name == path.stem
    assert config.data.num_classes >= 2
    assert config.data.source.is_absolute()


def test_experiments_folder_is_not_empty() -> None:
    assert {p.name for p in EXPERIMENTS} >= {"quickstart.yaml", "hippocampus_unet.yaml"}


def test_base_inheritance_and_overrides(tmp_path: Path) -> None:
    _write(tmp_path / "base.yaml", {"name": "base", "data": {"source": "data", "loader": {"batch_size": 4}}})
    child = _write(tmp_path / "child.yaml", {"base": "base.yaml", "name": "child", "data": {"split": {"fold": 1}}})
    config = load_config(child, ["data.loader.num_workers=3", "data.preprocessing.target_size=[48, 40]"])
    assert config.name == "child"
    assert config.data.loader.batch_size == 4  # inherited
    assert config.data.split.fold == 1  # from the child
    assert config.data.loader.num_workers == 3  # typed from the command line
    assert config.data.preprocessing.target_size == (48, 40)
    assert config.data.source == tmp_path / "data"  # relative to the file that set it


def test_unknown_key_names_file_path_and_valid_keys(tmp_path: Path) -> None:
    path = _write(tmp_path / "exp.yaml", {"name": "x", "data": {"source": "d", "slicng": {"axis": 1}}})
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message
    assert "data.slicng" in message
    assert "slicing" in message and "preprocessing" in message  # the valid keys are listed


def test_unknown_key_from_override_names_set(tmp_path: Path) -> None:
    path = _write(tmp_path / "exp.yaml", {"name": "x", "data": {"source": "d"}})
    with pytest.raises(ConfigError, match=r"--set: unknown key 'data\.loader\.batchsize'.*batch_size"):
        load_config(path, ["data.loader.batchsize=2"])


def test_wrong_type_names_origin_key_and_expected_type(tmp_path: Path) -> None:
    base = _write(tmp_path / "base.yaml", {"name": "x", "data": {"source": "d"}})
    child = _write(tmp_path / "child.yaml", {"base": "base.yaml", "data": {"loader": {"batch_size": "many"}}})
    with pytest.raises(ConfigError) as error:
        load_config(child)
    message = str(error.value)
    assert f"{child}: data.loader.batch_size" in message
    assert "integer" in message and "'many'" in message
    assert str(base) not in message


def test_invalid_choice_lists_valid_values(tmp_path: Path) -> None:
    path = _write(tmp_path / "exp.yaml", {"name": "x", "data": {"source": "d"}})
    with pytest.raises(ConfigError, match=r"data\.preprocessing\.intensity\.method.*'zscore'.*'ct_window'"):
        load_config(path, ["data.preprocessing.intensity.method=zscor"])


def test_cross_field_rules(tmp_path: Path) -> None:
    path = _write(tmp_path / "exp.yaml", {"name": "x", "data": {"source": "d"}})
    with pytest.raises(ConfigError, match="fold 5 must be below n_folds 5"):
        load_config(path, ["data.split.fold=5"])
    with pytest.raises(ConfigError, match=r"ct_window.*window"):
        load_config(path, ["data.preprocessing.intensity.method=ct_window"])
    with pytest.raises(ConfigError, match="labels must be numbered"):
        load_config(path, ["data.labels={0: bg, 2: x}"])


def test_missing_required_field(tmp_path: Path) -> None:
    path = _write(tmp_path / "exp.yaml", {"name": "x", "data": {}})
    with pytest.raises(ConfigError, match=r"data\.source: required field is missing"):
        load_config(path)


def test_only_one_level_of_base(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", {"name": "a", "data": {"source": "d"}})
    _write(tmp_path / "b.yaml", {"base": "a.yaml"})
    child = _write(tmp_path / "c.yaml", {"base": "b.yaml"})
    with pytest.raises(ConfigError, match="one level"):
        load_config(child)


def test_environment_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "exp.yaml", {"name": "x", "data": {"source": "${MY_DATA}/hippo"}})
    monkeypatch.delenv("MY_DATA", raising=False)
    with pytest.raises(ConfigError, match=r"data\.source: environment variable MY_DATA is not set"):
        load_config(path)
    monkeypatch.setenv("MY_DATA", "/mnt/data")
    assert load_config(path).data.source == Path("/mnt/data/hippo")


def test_a_relative_environment_path_starts_at_the_working_directory(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`MEDSEG_DATA_ROOT=../shared/data medseg train experiments/x.yaml` means ../shared/data from the shell."""
    (tmp_path / "experiments").mkdir()
    path = _write(tmp_path / "experiments" / "exp.yaml",
                  {"name": "x", "data": {"source": "${MY_DATA}/hippo", "attributes": {"table": "${MY_DATA}/t.csv"},
                                         "split": {"file": "splits.csv"}}})
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MY_DATA", "../shared")
    config = load_config(path)
    assert config.data.source.resolve() == (tmp_path / "shared" / "hippo").resolve()
    assert config.data.attributes.table.resolve() == (tmp_path / "shared" / "t.csv").resolve()
    assert config.data.split.file == tmp_path / "experiments" / "splits.csv"  # no variable: the file's folder


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(_write(tmp_path / "ok.yaml", {"name": "x", "data": {"source": "d"}}), ["data.seed"])


def test_resolved_config_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path / "exp.yaml", {"name": "x", "data": {"source": "d", "labels": {0: "bg", 1: "fg"}}})
    config = load_config(path, ["data.slicing.context=2"])
    again = _write(tmp_path / "resolved.yaml", yaml.safe_load(config_to_yaml(config)))
    assert load_config(again) == config
    assert main(["config", "show", str(path), "--set", "data.slicing.context=2"]) == 0
    assert "context: 2" in capsys.readouterr().out


def test_cli_reports_config_errors_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path / "exp.yaml", {"name": "x", "data": {"source": "d", "typo": 1}})
    assert main(["config", "show", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.typo" in err[0]
