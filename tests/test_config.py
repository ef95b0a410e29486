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


def test_a_model_section_carries_only_the_fields_of_its_kind(tmp_path: Path) -> None:
    """A U-Net config cannot carry detector fields (nor Mask R-CNN decoder ones); the error says whose they are."""
    quickstart, detector = REPO / "experiments/quickstart.yaml", REPO / "experiments/quickstart_mask_rcnn.yaml"
    with pytest.raises(ConfigError, match=r"--set: model: fpn_channels: only for arch mask_rcnn; this model's arch "
                                          r"is 'unet'"):
        load_config(quickstart, ["model.fpn_channels=64"])
    with pytest.raises(ConfigError, match=r"model: size_mismatch: only for decoder architectures"):
        load_config(detector, ["model.size_mismatch=error"])
    with pytest.raises(ConfigError, match=r"--set: model.size_mismatch: Input should be 'pad' or 'error'"):
        load_config(quickstart, ["model.size_mismatch=crop"])  # the key path has no union tag in it
    assert "fpn_channels" not in config_to_yaml(load_config(quickstart))
    assert load_config(detector, ["model.fpn_channels=32"]).model.fpn_channels == 32
    # A file that switches its base's arch to the other kind does not inherit the base's detector fields.
    base = REPO / "experiments/touching_mask_rcnn.yaml"  # fpn_channels: 64
    child = _write(tmp_path / "child.yaml", {"base": str(base), "name": "child", "task": "semantic",
                                              "model": {"arch": "fcn"}, "trainer": {"monitor": "val/dice"}})
    model = load_config(child).model
    assert (model.arch, model.encoder) == ("fcn", load_config(base).model.encoder)
    assert not hasattr(model, "fpn_channels")


def test_a_model_section_written_before_the_union_still_loads() -> None:
    """model.yaml files logged before the union hold every model field at its default: they load unchanged."""
    from medseg_lightning.config.schema import ExperimentConfig

    config = load_config(REPO / "experiments/quickstart.yaml")
    old = config.model_dump(mode="json")
    old["model"] |= {"anchor_sizes": None, "fpn_channels": 256, "detections_per_image": 100, "score_threshold": 0.5}
    assert ExperimentConfig.model_validate(old) == config
    old["model"]["fpn_channels"] = 64  # a value that meant something: refused, not dropped
    with pytest.raises(ValueError, match="fpn_channels: only for arch mask_rcnn"):
        ExperimentConfig.model_validate(old)


# Made with the single model section (before the union): studies, test-look counts and resumed sweeps find their
# runs by these hashes, so the union must not change them.
HASHES_BEFORE_THE_UNION = {
    "hippocampus_unet": "9d09a1fe90990f0f", "lgg_crosssite": "53da4046f108044d", "lgg_flair": "72915e1cdbf2c3f0",
    "quickstart": "bc7ec2aa4eca41fb", "quickstart_mask_rcnn": "52b32640f5585806",
    "synthetic_fairness": "a8b5d72cda6fe3ca", "touching_mask_rcnn": "0ea596c0695c3f11",
}
STUDY_HASHES_BEFORE_THE_UNION = {"quickstart": "4250b766397d7ee9", "quickstart_mask_rcnn": "14b89e50c4b7016f"}


@pytest.mark.parametrize("name", sorted(HASHES_BEFORE_THE_UNION))
def test_the_model_union_keeps_the_configuration_and_study_hashes(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg_lightning.config.protocol import configuration_hash
    from medseg_lightning.studies.children import config_hash

    monkeypatch.setenv("MEDSEG_DATA_ROOT", "/data-root")
    path = REPO / "experiments" / f"{name}.yaml"
    assert configuration_hash(load_config(path)) == HASHES_BEFORE_THE_UNION[name]
    if name in STUDY_HASHES_BEFORE_THE_UNION:  # the study hash includes the data's folder: pinned for one
        config = load_config(path, ["data.source=/fixed/data", "data.cache_dir=/fixed/cache"])
        assert config_hash(config) == STUDY_HASHES_BEFORE_THE_UNION[name]
