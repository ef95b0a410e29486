"""Encoder weights from local files: timm checkpoints, whole models, Lightning checkpoints, channel adaptation.

Every file is written by the test itself from randomly initialised timm models; nothing is downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import adapt_input_conv

from medseg_lightning.models import SegmentationModel, create_model, load_encoder_weights


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def rest_of_model(model: SegmentationModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    different = [k for k in actual if not torch.equal(actual[k], expected[k])]
    assert not different, f"tensors differ: {different[:5]}"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("encoder", ["test_resnet", "test_convnext"])
def test_plain_timm_state_dict(tmp_path: Path, encoder: str, suffix: str) -> None:
    timm_model = timm.create_model(encoder, pretrained=False)
    path = save(timm_model.state_dict(), tmp_path / f"{encoder}{suffix}")
    model = create_model("unet", encoder, 3, 2)
    decoder_before = rest_of_model(model)

    report = load_encoder_weights(model, path)

    encoder_state = model.encoder.model.state_dict()
    source = timm_model.state_dict()
    # FeatureListNet flattens top-level Sequentials (convnext's stem.0 -> stem_0); map back to compare.
    for key, tensor in encoder_state.items():
        source_key = key if key in source else key.replace("stem_", "stem.").replace("stages_", "stages.")
        assert torch.equal(tensor, source[source_key]), key
    assert_same(rest_of_model(model), decoder_before)
    assert report.prefix == "" and not report.missing and not report.adapted
    assert len(report.loaded) == len(encoder_state)
    assert report.unexpected and all(k.startswith(("fc.", "head.")) for k in report.unexpected)
    assert f"0 missing; {len(report.unexpected)} unexpected" in report.summary()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_whole_segmentation_model_state_dict(tmp_path: Path, suffix: str) -> None:
    trained = create_model("segnet", "test_resnet", 4, 3)
    path = save(trained.state_dict(), tmp_path / f"model{suffix}")
    model = create_model("unet", "test_resnet", 4, 2)  # another decoder: only the encoder is taken
    decoder_before = rest_of_model(model)

    report = load_encoder_weights(model, path)

    assert_same(model.encoder.state_dict(), trained.encoder.state_dict())
    assert_same(rest_of_model(model), decoder_before)
    assert report.prefix == "encoder.model." and not report.missing and not report.unexpected
    assert report.ignored == len(rest_of_model(trained))


@pytest.mark.parametrize("prefix", ["network.", "model.", "net."])
def test_lightning_checkpoint(tmp_path: Path, prefix: str) -> None:
    trained = create_model("fcn", "test_convnext", 1, 2)
    checkpoint = {
        "epoch": 3,
        "global_step": 120,
        "state_dict": {prefix + k: v for k, v in trained.state_dict().items()},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3}]}],
        "hyper_parameters": {"lr": 1e-3, "arch": "fcn"},
    }
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)
    model = create_model("unet", "test_convnext", 1, 2)

    report = load_encoder_weights(model, path)

    assert_same(model.encoder.state_dict(), trained.encoder.state_dict())
    assert report.prefix == f"{prefix}encoder.model." and not report.missing


def test_encoder_only_state_dict(tmp_path: Path) -> None:
    trained = create_model("unet", "test_resnet", 1, 2)
    path = save(trained.encoder.state_dict(), tmp_path / "encoder.safetensors")
    model = create_model("unet", "test_resnet", 1, 2)
    report = load_encoder_weights(model, path)
    assert_same(model.encoder.state_dict(), trained.encoder.state_dict())
    assert report.prefix == "model." and not report.missing and not report.unexpected


@pytest.mark.parametrize("in_channels", [1, 5])
@pytest.mark.parametrize("encoder", ["test_resnet", "test_convnext"])
def test_first_conv_is_adapted_like_timm(tmp_path: Path, encoder: str, in_channels: int) -> None:
    source = timm.create_model(encoder, pretrained=False).state_dict()
    path = save(source, tmp_path / "rgb.safetensors")
    model = create_model("unet", encoder, in_channels, 2)

    report = load_encoder_weights(model, path)

    first_conv = {"test_resnet": "conv1.0.weight", "test_convnext": "stem.0.weight"}[encoder]
    adapted_key = first_conv.replace("stem.0", "stem_0")
    assert report.adapted == [adapted_key]
    weight = model.encoder.model.state_dict()[adapted_key]
    assert weight.shape[1] == in_channels
    assert torch.equal(weight, adapt_input_conv(in_channels, source[first_conv]))


def test_wrong_architecture_names_the_file(tmp_path: Path) -> None:
    path = save(timm.create_model("test_convnext", pretrained=False).state_dict(), tmp_path / "convnext.pth")
    model = create_model("unet", "test_resnet", 3, 2)
    with pytest.raises(ValueError, match=r"convnext\.pth: no tensor matches encoder 'test_resnet'"):
        load_encoder_weights(model, path)


def test_shape_mismatch_names_key_and_shapes(tmp_path: Path) -> None:
    state = timm.create_model("test_resnet", pretrained=False).state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(7, 32, 3, 3)
    path = save(state, tmp_path / "odd.pth")
    model = create_model("unet", "test_resnet", 3, 2)
    expected = tuple(model.encoder.model.layer1[0].conv1.weight.shape)
    message = f"layer1.0.conv1.weight: file (7, 32, 3, 3) vs model {expected}"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_encoder_weights(model, path)


def test_partial_file_reports_missing_keys(tmp_path: Path) -> None:
    state = {k: v for k, v in timm.create_model("test_resnet").state_dict().items() if not k.startswith("layer4.")}
    path = save(state, tmp_path / "partial.safetensors")
    model = create_model("unet", "test_resnet", 3, 2)
    before = model.encoder.model.layer4.state_dict()
    report = load_encoder_weights(model, path)
    assert report.missing and all(k.startswith("layer4.") for k in report.missing)
    assert_same(model.encoder.model.layer4.state_dict(), before)
    assert f"{len(report.missing)} missing (layer4." in report.summary()


def test_unreadable_files(tmp_path: Path) -> None:
    model = create_model("fcn", "test_resnet", 1, 2)
    with pytest.raises(FileNotFoundError, match=r"nothing\.pth"):
        load_encoder_weights(model, tmp_path / "nothing.pth")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown weights format"):
        load_encoder_weights(model, tmp_path / "weights.npz")
    torch.save({"epoch": 1}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="holds no state dict"):
        load_encoder_weights(model, tmp_path / "empty.pt")


def test_getter_wrapped_encoder_takes_plain_timm_names(tmp_path: Path) -> None:
    source = timm.create_model("test_vit", pretrained=False).state_dict()  # FeatureGetterNet nests it under model.
    path = save(source, tmp_path / "vit.safetensors")
    model = create_model("fcn", "test_vit", 3, 2)
    report = load_encoder_weights(model, path)
    assert not report.missing and "head.weight" in report.unexpected
    for key, tensor in model.encoder.model.state_dict().items():
        assert torch.equal(tensor, source[key.removeprefix("model.")]), key
