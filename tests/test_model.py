from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

from kernel_lib.config import PipelineConfig
from kernel_lib.model import (HeatmapModel, ModelError, aligned_multiple, build_model,
                              load_checkpoint, pad_to_multiple, save_checkpoint)


@pytest.mark.parametrize("encoder,stride", [("resnet18", 4), ("efficientnet_b0", 8),
                                            ("convnext_atto", 4)])
def test_forward_backward_64(encoder, stride):
    cfg = PipelineConfig(encoder=encoder, output_stride=stride, stack_half=2,
                         decoder_channels=(32, 16))
    model = build_model(cfg)
    x = torch.randn(2, cfg.in_chans, 64, 64, requires_grad=True)
    y = model(x)
    assert y.shape == (2, 1, 64 // stride, 64 // stride)
    y.mean().backward()
    assert x.grad is not None and model.head.weight.grad is not None
    assert torch.isfinite(x.grad).all()


def test_bad_input_shape_names_the_fix():
    model = build_model(PipelineConfig())
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.zeros(1, 5, 62, 64))
    with pytest.raises(ValueError, match="multiples of 32"):
        build_model(PipelineConfig(encoder="convnext_atto"))(torch.zeros(1, 5, 60, 64))
    padded, size = pad_to_multiple(torch.zeros(1, 3, 60, 70), 32)
    assert padded.shape[-2:] == (64, 96) and size == (60, 70)


@pytest.mark.parametrize("encoder,stride,multiple", [
    ("resnet18", 4, 4), ("resnet18", 8, 8), ("resnet10t", 4, 4), ("efficientnet_b0", 4, 4),
    ("mobilenetv4_conv_small", 4, 4), ("convnext_atto", 4, 32)])
def test_input_multiple_is_the_output_stride_when_the_encoder_rounds_up(encoder, stride,
                                                                         multiple):
    model = build_model(PipelineConfig(encoder=encoder, output_stride=stride,
                                       decoder_channels=(16, 8)))
    assert model.input_multiple == multiple
    # 9 and 11 times the multiple: sizes that padding to 32 would change, unless the
    # multiple is 32 itself
    size = (multiple * 9, multiple * 11)
    assert model(torch.zeros(1, 5, *size)).shape[-2:] == (size[0] // stride, size[1] // stride)


def test_the_probe_leaves_the_encoder_as_it_was():
    model = build_model(PipelineConfig(decoder_channels=(16, 8)))
    model.train()
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    assert aligned_multiple(model.encoder, 5, [4, 8, 16, 32]) == 4
    assert model.encoder.training and all(m.training for m in model.encoder.modules())
    after = model.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats untouched

    class Refuses(nn.Module):  # an encoder that cannot take the small probe keeps 32
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            raise RuntimeError("input too small")

    assert aligned_multiple(Refuses(), 5, [4, 8, 16, 32]) == 32


@pytest.mark.parametrize("encoder,aligned", [("resnet18", True), ("convnext_atto", False)])
def test_unpadded_input_gives_the_padded_heatmap_away_from_the_padding(encoder, aligned):
    """The point of the smaller multiple: a 164 x 196 input needs no padding to 192 x 224,
    and the heatmap is the same where the padding does not reach. That only holds when the
    deep levels stay aligned; ConvNeXt, forced to take the unpadded size, shows the shift."""
    torch.manual_seed(0)
    model = HeatmapModel(encoder, 5, 4, decoder_channels=(16, 8)).eval()
    nn.init.normal_(model.head.weight, std=0.05)
    assert model.input_multiple == (4 if aligned else 32)
    model.input_multiple = 4
    x = torch.randn(1, 5, 164, 196)
    padded, _ = pad_to_multiple(x, 32)
    with torch.inference_mode():
        plain = model(x)[0, 0]
        reference = model(padded)[0, 0, :41, :49]
    change = ((plain - reference).abs() / reference.std())[:16, :16].max().item()
    if aligned:
        assert change < 1e-4
    else:
        assert change > 1e-2


def test_unknown_encoder_and_bad_stride():
    with pytest.raises(ModelError, match="unknown timm model"):
        build_model(PipelineConfig(encoder="resnet_does_not_exist"))
    with pytest.raises(ModelError, match="not a feature reduction"):
        build_model(PipelineConfig(encoder="convnext_atto", output_stride=2))


@pytest.mark.parametrize("encoder,stem,inner", [
    ("resnet18", "conv1", "layer1.0.conv1"),
    ("resnet10t", "conv1.0", "conv1.3"),  # three-conv stem: only its first conv sees the slices
    ("mobilenetv4_conv_small", "conv_stem", "blocks.1.0.conv")])
def test_encoder_loads_local_timm_weights(tmp_path, encoder, stem, inner):
    """A timm RGB checkpoint on disk is adapted to 2n+1 input slices; no download."""
    reference = timm.create_model(encoder, pretrained=False)
    path = tmp_path / f"{encoder}.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(PipelineConfig(encoder=encoder, stack_half=2), encoder_weights=path)
    loaded = model.encoder.get_submodule(inner).weight
    assert torch.equal(loaded, reference.get_submodule(inner).weight)
    assert model.encoder.get_submodule(stem).weight.shape[1] == 5
    with pytest.raises(ModelError, match="does not exist"):
        build_model(PipelineConfig(encoder=encoder), encoder_weights=tmp_path / "missing.pth")


def test_checkpoint_round_trip(tmp_path):
    cfg = PipelineConfig(decoder_channels=(16, 8))
    model = build_model(cfg)
    torch.manual_seed(0)
    for p in model.parameters():  # move every weight off its initial value
        p.data.add_(0.05 * torch.randn_like(p))
    save_checkpoint(model, cfg, tmp_path)
    loaded, loaded_cfg = load_checkpoint(tmp_path)
    assert loaded_cfg == cfg
    x = torch.randn(1, cfg.in_chans, 64, 64)
    model.eval()
    expected = model(x)
    assert torch.isfinite(expected).all() and expected.std() > 0
    assert torch.allclose(loaded(x), expected)
    assert not torch.allclose(build_model(cfg).eval()(x), expected)  # not just the init


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    PipelineConfig().save(tmp_path)
    with pytest.raises(ModelError, match="no model.pt"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"truncated")
    with pytest.raises(ModelError, match="cannot read"):
        load_checkpoint(tmp_path)
