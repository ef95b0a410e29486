"""Bad input gets one clear line before any time is spent, and nothing a user has is replaced or lost.

Each test is the behaviour a user relies on: a named case or key and what is wrong with it, the exit code the
README promises, and the user's files (predictions, exports, datasets, runs, registered models) left as they were.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import yaml
from mlflow.tracking import MlflowClient

from medseg_lightning.cli import main
from medseg_lightning.config import ConfigError, load_config

from .test_phi import tiny_model, write_series  # noqa: F401 (a fixture, used by name)


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, text


# --- 1 and 7: data check with a 4D case and a broken affine; data problems exit 1 -------------------------------


def _rewrite(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, affine), str(path))


@pytest.fixture
def odd_cohort(tmp_path: Path, cohort: Path) -> Path:
    """The cohort with a 2-channel 4D image (the first case), a non-invertible affine and a NaN voxel."""
    root = tmp_path / "odd"
    shutil.copytree(cohort, root)
    images = root / "imagesTr"
    first = nib.load(str(images / "synth_000.nii.gz"))
    array = np.asarray(first.dataobj, dtype=np.float32)
    _rewrite(images / "synth_000.nii.gz", np.stack([array, array * 0.5 + 3], axis=-1), first.affine)
    flat = nib.load(str(images / "synth_003.nii.gz"))
    singular = flat.affine.copy()
    singular[2, :3] = 0  # every voxel on one plane: the affine has no inverse
    image = nib.Nifti1Image(np.asarray(flat.dataobj), flat.affine)
    image.set_qform(None, code=0)
    image.set_sform(singular, code=1)
    nib.save(image, str(images / "synth_003.nii.gz"))
    nan = nib.load(str(images / "synth_005.nii.gz"))
    values = np.asarray(nan.dataobj, dtype=np.float32).copy()
    values[1, 1, 1] = np.nan
    _rewrite(images / "synth_005.nii.gz", values, nan.affine)
    return root


def test_a_4d_case_and_a_broken_affine_are_reported_with_every_other_problem(
    odd_cohort: Path, make_experiment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    experiment = make_experiment(odd_cohort)
    assert main(["data", "check", str(experiment)]) == 1
    captured = capsys.readouterr()
    _no_traceback(captured.err)
    assert not _errors(captured.err), captured.err
    problems = [line for line in captured.out.splitlines() if line.startswith("ERROR")]
    assert len(problems) == 3, captured.out
    four_d = [line for line in problems if "channel" in line]
    assert len(four_d) == 1 and "case synth_000" in four_d[0] and "2 channel(s)" in four_d[0], problems
    affine = [line for line in problems if "case synth_003" in line]
    assert len(affine) == 1 and "affine" in affine[0] and "synth_003.nii.gz" in affine[0], problems
    assert any("case synth_005" in line and "1 NaN/Inf voxel" in line for line in problems), problems
    assert "; 3 problem(s)" in captured.out

    # train finds the same problems before building anything, and exits 1 as the README says
    assert main(["train", str(experiment), "--set", "model.encoder=test_resnet"]) == 1
    captured = capsys.readouterr()
    _no_traceback(captured.err)
    assert "3 data problem(s) found" in captured.err and "case synth_003" in captured.err
    # a config problem is still 2
    assert main(["train", str(experiment), "--set", "data.slicng.axis=1"]) == 2


# --- 2: malformed YAML in --set ----------------------------------------------------------------------------------


def test_a_malformed_set_value_is_one_config_error_naming_the_key(
    make_experiment, cohort: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experiment = make_experiment(cohort)
    assert main(["config", "show", str(experiment), "--set", "model.encoder=[1,2"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error: --set"), error
    assert "model.encoder" in error and "not valid YAML" in error, error
    with pytest.raises(ConfigError, match=r"model\.encoder"):
        load_config(experiment, ["model.encoder=[1,2"])


# --- 3, 4, 5, 6: predict -----------------------------------------------------------------------------------------


def _volume(path: Path, seed: int = 0, nan: int = 0, inf: int = 0) -> Path:
    values = np.random.default_rng(seed).random((24, 24, 4)).astype(np.float32) * 100
    values.flat[:nan] = np.nan
    values.flat[nan:nan + inf] = np.inf
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(values, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    return path


def test_predict_out_that_is_a_file_is_one_error(tiny_model: Path, tmp_path: Path,  # noqa: F811
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    source = _volume(tmp_path / "case.nii.gz")
    out = tmp_path / "results.txt"
    out.write_text("my notes")
    assert main(["predict", "--model", str(tiny_model), str(source), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"--out {out}" in error and "not a folder" in error, error
    assert out.read_text() == "my notes"


def test_nan_or_inf_voxels_are_refused_naming_the_file_and_count(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    bad = _volume(tmp_path / "in" / "bad.nii.gz", nan=1)
    worse = _volume(tmp_path / "in" / "worse.nii.gz", nan=2, inf=1)
    good = _volume(tmp_path / "in" / "good.nii.gz")
    out = tmp_path / "out"
    assert main(["predict", "--model", str(tiny_model), str(bad), str(good), str(worse), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    errors = _errors(captured.err)
    assert len(errors) == 2, captured.err
    assert str(bad) in errors[0] and "1 NaN/Inf voxel(s)" in errors[0], errors
    assert str(worse) in errors[1] and "3 NaN/Inf voxel(s)" in errors[1], errors
    assert sorted(path.name for path in out.iterdir()) == ["good.nii.gz"]
    assert "1 of 3 case(s) segmented" in captured.out


def test_inputs_with_the_same_name_get_distinct_outputs(tiny_model: Path, tmp_path: Path,  # noqa: F811
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    first = _volume(tmp_path / "site_a" / "case.nii.gz", seed=1)
    second = _volume(tmp_path / "site_b" / "case.nii.gz", seed=2)
    series_1 = write_series(tmp_path / "p1" / "series", slices=3)
    series_2 = write_series(tmp_path / "p2" / "series", slices=4, seed=3)
    alone = _volume(tmp_path / "other" / "solo.nii.gz")
    slice_folders = []
    for site in ("s1", "s2"):  # slice folders (the LGG layout) of the same patient name at two sites
        folder = tmp_path / site / "TCGA_AA_0001"
        folder.mkdir(parents=True)
        for number in (1, 2):
            tifffile.imwrite(folder / f"TCGA_AA_0001_{number}.tif", np.full((16, 16), 40 * number, np.uint8))
        slice_folders.append(folder)
    out = tmp_path / "out"
    code = main(["predict", "--model", str(tiny_model), str(first), str(second), str(series_1), str(series_2),
                 str(alone), *map(str, slice_folders), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sorted(path.name for path in out.iterdir()) == [
        "p1_series.nii.gz", "p2_series.nii.gz", "s1_TCGA_AA_0001_1_pred.png", "s1_TCGA_AA_0001_2_pred.png",
        "s2_TCGA_AA_0001_1_pred.png", "s2_TCGA_AA_0001_2_pred.png", "site_a_case.nii.gz", "site_b_case.nii.gz",
        "solo.nii.gz"]
    assert nib.load(str(out / "p2_series.nii.gz")).shape[2] == 4  # each output is its own input's
    assert nib.load(str(out / "p1_series.nii.gz")).shape[2] == 3
    assert "7 of 7 case(s) segmented" in captured.out


def test_predict_never_replaces_a_users_file_without_force(tiny_model: Path, tmp_path: Path,  # noqa: F811
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    source = _volume(tmp_path / "in" / "case.nii.gz")
    other = _volume(tmp_path / "in" / "other.nii.gz", seed=5)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "case.nii.gz").write_bytes(b"an earlier mask I edited by hand")
    command = ["predict", "--model", str(tiny_model), str(source), str(other), "--out", str(out)]
    assert main(command) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(out / "case.nii.gz") in error and "--force" in error, error
    assert (out / "case.nii.gz").read_bytes() == b"an earlier mask I edited by hand"
    assert sorted(path.name for path in out.iterdir()) == ["case.nii.gz", "notes.txt"]  # nothing written at all
    assert main([*command, "--force"]) == 0
    assert nib.load(str(out / "case.nii.gz")).shape == (24, 24, 4)
    assert (out / "notes.txt").read_text() == "mine" and (out / "other.nii.gz").is_file()


def test_export_never_replaces_a_file_without_force(tiny_model: Path, tmp_path: Path,  # noqa: F811
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"the export I shipped")
    assert main(["export", "--model", str(tiny_model), "--out", str(target)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(target) in error and "--force" in error, error
    assert target.read_bytes() == b"the export I shipped"


def test_synth_never_replaces_a_dataset_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cohort"
    command = ["data", "synth", "--out", str(out), "--cases", "2", "--shape", "8", "8", "2"]
    assert main(command) == 0
    manifest = out / "manifest.csv"
    edited = manifest.read_text().replace("\n", ",my column\n", 1)  # an attribute column the user added
    manifest.write_text(edited)
    image = (out / "imagesTr" / "synth_000.nii.gz").read_bytes()
    capsys.readouterr()
    assert main([*command, "--seed", "3"]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(out) in error and "--force" in error, error
    assert manifest.read_text() == edited and (out / "imagesTr" / "synth_000.nii.gz").read_bytes() == image
    assert main([*command, "--seed", "3", "--force"]) == 0
    assert manifest.read_text() != edited
    assert main(["data", "synth", "--out", str(tmp_path / "fresh"), "--cases", "1", "--shape", "8", "8", "2",
                 "--instances"]) == 0
    assert main(["data", "synth", "--out", str(tmp_path / "fresh"), "--cases", "1", "--shape", "8", "8", "2",
                 "--instances"]) == 1


# --- 8: sweep overrides against resources ------------------------------------------------------------------------


def test_a_sweep_that_sets_trainer_devices_is_refused_naming_resources_devices(
    tmp_path: Path, cohort: Path, make_experiment, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from medseg_lightning.sweep.config import load_sweep

    monkeypatch.chdir(tmp_path)
    experiment = make_experiment(cohort)
    sweep = tmp_path / "study.yaml"
    sweep.write_text(yaml.safe_dump({"experiment": str(experiment), "n_trials": 2,
                                     "space": {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}}))
    load_sweep(sweep)  # the plain sweep is fine
    for overrides in (["overrides={trainer.devices: 2}"], ["overrides={trainer: {devices: 2}}"]):
        with pytest.raises(ConfigError, match=r"resources\.devices") as info:
            load_sweep(sweep, overrides)
        assert "trainer.devices" in str(info.value) and str(sweep) in str(info.value)
    assert main(["sweep", "status", str(sweep), "--set", "overrides={trainer.devices: 2}"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "resources.devices" in error, error
    sweep, _ = load_sweep(sweep, ["resources={devices: 2}"])  # the right way still works
    assert sweep.resources.devices == 2


# --- 9 and 10: runs in an MLflow store ---------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    """The project store of ``tmp_path`` (the working directory)."""
    (tmp_path / "mlruns").mkdir()
    monkeypatch.chdir(tmp_path)
    from medseg_lightning import tracking

    return MlflowClient(tracking.resolve_store_from_env(tmp_path)[0])


def test_promote_without_any_gate_needs_force(store: MlflowClient, tiny_model: Path,  # noqa: F811
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from medseg_lightning import tracking

    run = store.create_run(store.create_experiment("nogates"))
    store.log_metric(run.info.run_id, "test/dice", 0.0)
    example = np.zeros((1, 1, 32, 32), np.float32)
    tracking.log_model_to_run(store.tracking_uri, run.info.run_id, tiny_model, example,
                              np.zeros((1, 32, 32), np.uint8))
    store.set_terminated(run.info.run_id, "FINISHED")
    assert main(["promote", "--run", run.info.run_id, "--name", "dice0"]) == 1
    captured = capsys.readouterr()
    assert "no gate" in captured.err and "--force REASON" in captured.err, captured.err
    assert not store.search_registered_models("name = 'dice0'")
    assert main(["promote", "--run", run.info.run_id, "--name", "dice0", "--force", "a smoke test"]) == 0
    version = store.get_model_version("dice0", "1")
    assert version.tags["promotion.forced_reason"] == "a smoke test"
    assert "FORCED" in capsys.readouterr().out


def test_resume_of_a_finished_run_needs_force(store: MlflowClient, odd_cohort: Path, make_experiment,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    experiment = make_experiment(odd_cohort)
    finished = store.create_run(store.create_experiment("test"))
    store.set_terminated(finished.info.run_id, "FINISHED")
    failed = store.create_run(store.get_experiment_by_name("test").experiment_id)
    store.set_terminated(failed.info.run_id, "FAILED")
    base = ["train", str(experiment), "--set", "model.encoder=test_resnet"]
    assert main([*base, "--resume", finished.info.run_id]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "FINISHED" in error and "--force" in error, error
    assert store.get_run(finished.info.run_id).info.status == "FINISHED"
    # a failed run resumes as before (here it goes on to the data check, which finds the planted problems),
    # and so does a finished one with --force
    assert main([*base, "--resume", failed.info.run_id]) == 1
    assert main([*base, "--resume", finished.info.run_id, "--force"]) == 1
    assert "data problem(s) found" in capsys.readouterr().err

