"""Networks: every registered architecture on tiny timm encoders, input handling, errors, SegNet pool indices.

timm's ``test_*`` models are tiny architectures made for tests: ``test_resnet`` has 5 stages (strides 2..32,
non-monotonic channels 32, 32, 48, 192, 96), ``test_convnext`` 4 stages (strides 4..32) with a flattened stem,
``test_efficientnet`` is an EfficientNet feature net that cannot be walked stage by stage. Weights are random
(``pretrained=False``), nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
import torch.nn.functional as F
from huggingface_hub.errors import LocalEntryNotFoundError

from medseg_lightning.models import ARCHITECTURES, SegmentationModel, TimmEncoder, create_model
from medseg_lightning.models.segnet import PoolCode

ENCODERS = ["test_resnet", "test_convnext"]


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("arch", ARCHITECTURES.names())
def test_every_architecture_gives_full_size_logits_and_gradients(arch: str, encoder: str) -> None:
    model = create_model(arch, encoder, in_channels=2, num_classes=3)
    image = torch.randn(2, 2, 64, 64)
    logits = model(image)
    assert logits.shape == (2, 3, 64, 64)
    logits.square().mean().backward()
    for part in (model.encoder, model.decoder, model.head):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), f"{type(part).__name__} gets no gradient"
        assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("in_channels", [1, 3, 5])
def test_input_channels(in_channels: int) -> None:
    model = create_model("unet", "test_resnet", in_channels, num_classes=2).eval()
    assert model.encoder.channels == [32, 32, 48, 192, 96]
    with torch.no_grad():
        assert model(torch.randn(1, in_channels, 32, 32)).shape == (1, 2, 32, 32)


@pytest.mark.parametrize("arch", ARCHITECTURES.names())
def test_size_mismatch_pad_crops_back_and_error_names_valid_sizes(arch: str) -> None:
    padded = create_model(arch, "test_resnet", 1, 2).eval()
    with torch.no_grad():
        assert padded(torch.randn(1, 1, 50, 50)).shape == (1, 2, 50, 50)
        assert padded(torch.randn(1, 1, 50, 70)).shape == (1, 2, 50, 70)
    strict = create_model(arch, "test_resnet", 1, 2, size_mismatch="error")
    with pytest.raises(ValueError, match=r"H=50, W=50.*stride 32.*\(32, 32\) or \(64, 64\)"):
        strict(torch.randn(1, 1, 50, 50))


def test_padding_is_zero_padding_then_cropping() -> None:
    model = create_model("unet", "test_resnet", 1, 2).eval()
    image = torch.randn(1, 1, 50, 50)
    with torch.no_grad():
        expected = model(F.pad(image, (0, 14, 0, 14)))[..., :50, :50]
        assert torch.allclose(model(image), expected)


def test_reflect_padding() -> None:
    model = create_model("fcn", "test_resnet", 1, 2, pad_mode="reflect").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 40, 40)).shape == (1, 2, 40, 40)


def test_unknown_architecture_lists_valid_names() -> None:
    with pytest.raises(KeyError, match=r"unknown architecture 'unett'.*'unet'.*Valid: fcn, segnet, unet"):
        create_model("unett", "test_resnet", 1, 2)


def test_unknown_encoder_names_closest_timm_models() -> None:
    with pytest.raises(ValueError, match=r"unknown timm encoder 'resnet181'.*resnet18.*list_models\('\*resnet\*'\)"):
        create_model("unet", "resnet181", 1, 2)


def test_decoders_follow_the_encoder_channels() -> None:
    resnet = create_model("unet", "test_resnet", 1, 2)
    convnext = create_model("unet", "test_convnext", 1, 2)
    assert resnet.encoder.channels != convnext.encoder.channels
    assert convnext.encoder.reductions == [4, 8, 16, 32]
    first_resnet = resnet.decoder.blocks[0][0][0]
    first_convnext = convnext.decoder.blocks[0][0][0]
    assert first_resnet.in_channels == 96 + 192  # deepest + skip of test_resnet
    assert first_convnext.in_channels == 64 + 48  # deepest + skip of test_convnext


def test_decoder_channels_are_configurable_and_checked() -> None:
    model = create_model("unet", "test_convnext", 1, 2, decoder_channels=[24, 16, 12, 8])
    assert model.decoder.out_channels == 8 and model.head.in_channels == 8
    with pytest.raises(ValueError, match="needs 4 positive decoder_channels"):
        create_model("unet", "test_convnext", 1, 2, decoder_channels=[24, 16])
    assert create_model("fcn", "test_convnext", 1, 2, decoder_channels=[12]).head.in_channels == 12


def test_encoder_depth_makes_a_shallower_encoder() -> None:
    model = create_model("segnet", "test_resnet", 1, 2, encoder_depth=3).eval()
    assert model.encoder.reductions == [2, 4, 8] and model.output_stride == 8
    with torch.no_grad():
        assert model(torch.randn(1, 1, 24, 24)).shape == (1, 2, 24, 24)
    with pytest.raises(ValueError, match="has 4 feature stages"):
        create_model("unet", "test_convnext", 1, 2, encoder_depth=5)


def test_encoder_reports_feature_info() -> None:
    encoder = TimmEncoder("test_convnext", in_channels=1)
    features = encoder(torch.randn(1, 1, 64, 64))
    assert [f.shape[1] for f in features] == encoder.channels
    assert [64 // f.shape[-1] for f in features] == encoder.reductions
    assert encoder.output_stride == 32 and encoder.first_conv == ["stem.0"]


@pytest.mark.parametrize("encoder", ["test_resnet", "test_convnext", "test_efficientnet"])
def test_stage_by_stage_forward_matches_timm(encoder: str) -> None:
    model = TimmEncoder(encoder).eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        streamed = model(image, transform=lambda _, feature: feature.clone())
        plain = model(image)
    assert all(torch.equal(a, b) for a, b in zip(streamed, plain, strict=True))
    assert model.streams_stages == (encoder != "test_efficientnet")


def test_pool_code_reproduces_max_pool_indices_and_unpooling() -> None:
    feature = torch.randn(2, 3, 8, 10)
    pooled, indices = F.max_pool2d(feature, 2, return_indices=True)
    code = PoolCode.from_feature(feature, 2)
    assert code.code.dtype == torch.uint8 and code.code.shape == (2, 3, 4, 5)
    assert torch.equal(code.indices(), indices)
    assert torch.equal(code.unpool(pooled), F.max_unpool2d(pooled, indices, 2, output_size=(8, 10)))
    odd = PoolCode.from_feature(torch.randn(1, 1, 7, 7), 2)  # ceil mode: matches a stride-2 conv's 4x4 output
    assert odd.code.shape[-2:] == (4, 4) and odd.unpool(torch.ones(1, 1, 4, 4)).shape[-2:] == (7, 7)


def test_segnet_keeps_only_indices_and_the_deepest_map() -> None:
    model = create_model("segnet", "test_resnet", 1, 2)
    kept = model.encoder(torch.randn(1, 1, 64, 64), model.decoder.encode_feature)
    assert all(isinstance(k, PoolCode) and k.code.dtype == torch.uint8 for k in kept[:-1])
    assert isinstance(kept[-1], torch.Tensor) and kept[-1].shape == (1, 96, 2, 2)
    assert [k.size for k in kept[:-1]] == [(32, 32), (16, 16), (8, 8), (4, 4)]


def test_segnet_decoder_accepts_plain_feature_maps() -> None:
    model = create_model("segnet", "test_convnext", 1, 2).eval()
    image = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        from_codes = model(image)
        from_maps = model.head(model.decoder(model.encoder(image)))
    assert torch.allclose(from_codes, from_maps)


def test_non_hierarchical_encoder_works() -> None:
    model = create_model("segnet", "test_vit", 1, 2).eval()  # three stages, all at stride 16
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 2, 64, 64)


def test_model_is_a_plain_module() -> None:
    model = create_model("fcn", "test_resnet", 1, 4)
    assert isinstance(model, SegmentationModel) and model.num_classes == 4
    assert {name for name, _ in model.named_children()} == {"encoder", "decoder", "dropout", "head"}
    assert isinstance(model.dropout, torch.nn.Identity)  # no head_dropout: nothing between decoder and head


def test_pretrained_offline_raises_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    with pytest.raises(RuntimeError, match=r"offline.*Hugging Face cache.*model.pretrained: none") as info:
        create_model("unet", "test_resnet", 1, 2, pretrained=True)
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)


def test_pretrained_with_offline_hub_and_empty_cache_fails_fast(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE/HF_HOME at import, so set the resolved constants it consults per call.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="offline"):
        TimmEncoder("test_resnet", pretrained=True)


@pytest.mark.parametrize("encoder", [*ENCODERS, "test_efficientnet"])
@pytest.mark.parametrize("arch", ARCHITECTURES.names())
def test_the_inference_copy_computes_the_same_logits(arch: str, encoder: str) -> None:
    """Folded BatchNorm and channels-last memory are speed only: same logits, original network untouched."""
    from medseg_lightning.inference.folding import prepare_for_inference

    model = create_model(arch, encoder, in_channels=2, num_classes=3)
    with torch.no_grad():  # BatchNorm statistics far from the identity, as after training
        for _ in range(3):
            model(torch.randn(4, 2, 64, 64) * 3 + 1)
    model.eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    fast = prepare_for_inference(model)
    image = torch.randn(3, 2, 64, 64) * 3 + 1
    with torch.inference_mode():
        torch.testing.assert_close(fast(image), model(image), atol=1e-4, rtol=1e-4)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    if encoder == "test_resnet":  # residual blocks (convN/bnN) and decoder conv-BN-ReLU blocks are folded
        remaining = sum(type(m) is torch.nn.BatchNorm2d for m in fast.modules())
        assert remaining < sum(type(m) is torch.nn.BatchNorm2d for m in model.modules()) // 4
