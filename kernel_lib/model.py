"""Heatmap model: a timm CNN encoder, a small U-Net decoder sized from ``feature_info``, and a
one-channel heatmap head at a configurable output stride.

The encoder is ``timm.create_model(name, features_only=True, in_chans=2n+1)``; timm adapts a
pretrained RGB stem to ``2n+1`` slices itself. Weights only ever come from local files: a timm
pretrained file for the encoder (``encoder_weights``) or our own checkpoint
(:func:`load_checkpoint`). Nothing is downloaded.

Example:
    >>> import torch
    >>> from kernel_lib.config import PipelineConfig
    >>> model = build_model(PipelineConfig(encoder="resnet18", output_stride=4))
    >>> model(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 1, 16, 16])
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError, PipelineConfig

CHECKPOINT_NAME = "model.pt"
HEAD_PRIOR = 0.01  # initial heatmap probability, keeps early BCE stable


class ModelError(ValueError):
    """A model that cannot be built or loaded; the message says what to do."""


class ConvBlock(nn.Sequential):
    """Two 3x3 conv + BatchNorm + ReLU layers."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNetDecoder(nn.Module):
    """Upsamples the deepest feature map, merging skips, down to the output stride.

    Args:
        encoder_channels: channels of the encoder features used, shallow to deep.
        decoder_channels: widths of the decoder stages, deepest first; the last one is reused if
            there are more stages than widths.
    """

    def __init__(self, encoder_channels: list[int], decoder_channels: tuple[int, ...]) -> None:
        super().__init__()
        skips = encoder_channels[:-1][::-1]  # deep to shallow
        widths = [decoder_channels[min(i, len(decoder_channels) - 1)] for i in range(len(skips))]
        self.bottleneck = nn.Conv2d(encoder_channels[-1], widths[0] if widths else
                                    decoder_channels[0], 1)
        blocks, in_ch = [], widths[0] if widths else decoder_channels[0]
        for skip_ch, width in zip(skips, widths):
            blocks.append(ConvBlock(in_ch + skip_ch, width))
            in_ch = width
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = in_ch

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.bottleneck(features[-1])
        for block, skip in zip(self.blocks, features[:-1][::-1]):
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
        return x


class HeatmapModel(nn.Module):
    """``encoder -> decoder -> head``: 2.5D stacks in, heatmap logits out.

    Inputs must be a multiple of ``input_multiple`` high and wide: the output stride when the
    encoder's feature maps are ``ceil(size / reduction)`` (as for resnets, EfficientNets and
    MobileNetV4, whose downsampling convolutions are padded; checked per encoder by
    :func:`aligned_multiple`), else the largest reduction (32).

    Args:
        encoder: timm model name (any CNN supporting ``features_only``).
        in_chans: slices per 2.5D stack.
        output_stride: model pixels per heatmap pixel (must be an encoder reduction, e.g. 4).
        decoder_channels: decoder widths, deepest first.
        encoder_weights: optional local file with timm weights for the encoder.
    """

    def __init__(self, encoder: str = "resnet18", in_chans: int = 3, output_stride: int = 4,
                 decoder_channels: tuple[int, ...] = (128, 64, 32),
                 encoder_weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.encoder = create_encoder(encoder, in_chans, encoder_weights)
        reductions = self.encoder.feature_info.reduction()
        channels = self.encoder.feature_info.channels()
        if output_stride not in reductions:
            raise ModelError(f"output_stride {output_stride} is not a feature reduction of "
                             f"{encoder} ({reductions}): choose one of them")
        self.first_level = reductions.index(output_stride)
        self.input_multiple = aligned_multiple(self.encoder, in_chans,
                                               reductions[self.first_level:])
        self.output_stride = output_stride
        self.decoder = UNetDecoder(channels[self.first_level:], decoder_channels)
        self.head = nn.Conv2d(self.decoder.out_channels, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, math.log(HEAD_PRIOR / (1 - HEAD_PRIOR)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 2n+1, H, W) -> (B, 1, H / stride, W / stride) logits
        if x.shape[-1] % self.input_multiple or x.shape[-2] % self.input_multiple:
            raise ValueError(f"input height and width must be multiples of "
                             f"{self.input_multiple}: pad {tuple(x.shape)} with pad_to_multiple")
        features = self.encoder(x)[self.first_level:]
        return self.head(self.decoder(features))

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Heatmap probabilities for a batch, in eval mode."""
        self.eval()
        return torch.sigmoid(self(x))


def aligned_multiple(encoder: nn.Module, in_chans: int, reductions: list[int]) -> int:
    """The input multiple that keeps the feature levels ``reductions`` (shallow to deep, the
    first being the output stride) aligned with each other, so inputs need no more padding.

    The decoder upsamples each level to the size of the one above it with nearest
    interpolation, which maps feature row ``j`` to row ``j // 2`` when each level is the
    ceiling of half the one above (``2m -> m`` and ``2m - 1 -> m``). An encoder that sizes
    its features that way is exact on any input that is a multiple of the output stride;
    one that floors them (a 2x2 stride-2 downsampling, as in ConvNeXt) drops a row on odd
    sizes and shifts the deep levels, so it keeps inputs at a multiple of its largest
    reduction. One probe forward of a small input tells the two apart.

    Padding to 32 makes a 452 x 468 model slice 480 x 480, 9 % more pixels to compute for
    nothing (9.3 % on average over the real training shapes at 32 A; 0.1 % at a multiple
    of 4).
    """
    smallest, largest = reductions[0], max(reductions)
    # 36 for (4, .., 32): no multiple of 8, 16 or 32, so ceiling and floor differ there
    size = largest + smallest
    was_training = encoder.training
    try:
        encoder.eval()  # batch norms must neither see nor learn from the probe
        with torch.no_grad():
            probe = next(encoder.parameters()).new_zeros(1, in_chans, size, size)
            features = encoder(probe)[-len(reductions):]
        sizes = [tuple(f.shape[-2:]) for f in features]
    except Exception:  # noqa: BLE001 - an encoder that refuses small inputs keeps the safe rule
        return largest
    finally:
        encoder.train(was_training)
    ceiling = [(math.ceil(size / r),) * 2 for r in reductions]
    return smallest if sizes == ceiling else largest


def check_encoder_name(name: str) -> None:
    """Raise :class:`ModelError` naming the fix when timm has no model called ``name``."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5] if name else []
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ModelError(f"unknown timm model {name!r}{hint}: pick one from timm.list_models(), "
                         f"e.g. 'resnet18' or 'efficientnet_b0'")


def create_encoder(name: str, in_chans: int,
                   weights: str | os.PathLike | None = None) -> nn.Module:
    """A timm ``features_only`` encoder, random init or from a local weights file."""
    check_encoder_name(name)
    kwargs: dict = {"features_only": True, "in_chans": in_chans}
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise ModelError(f"encoder weights file {path} does not exist: attach it or drop "
                             f"--encoder-weights to train from random init")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as exc:
        if "features_only" in str(exc):
            raise ModelError(f"timm model {name!r} has no features_only mode: use a CNN such as "
                             f"'resnet18' or 'efficientnet_b0'") from None
        raise


def build_model(cfg: PipelineConfig,
                encoder_weights: str | os.PathLike | None = None) -> HeatmapModel:
    """The model a config describes (random init unless ``encoder_weights`` is given)."""
    return HeatmapModel(cfg.encoder, cfg.in_chans, cfg.output_stride, cfg.decoder_channels,
                        encoder_weights)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the last two dims at the bottom/right (edge values) to a multiple; returns the
    padded tensor and the original ``(H, W)`` so outputs can be cropped back."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h or pad_w:
        mode = "replicate" if min(h, w) > 1 else "constant"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    return x, (h, w)


def save_checkpoint(model: nn.Module, cfg: PipelineConfig, run_dir: str | os.PathLike,
                    extra: dict | None = None, name: str = CHECKPOINT_NAME) -> Path:
    """Save weights (``model.pt``) and ``config.json`` into ``run_dir`` atomically."""
    from .config import atomic_write_bytes
    import io

    run_dir = Path(run_dir)
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "config": cfg.to_dict(), **(extra or {})},
               buffer)
    path = run_dir / name
    atomic_write_bytes(path, buffer.getvalue())
    cfg.save(run_dir)
    return path


def load_checkpoint(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu",
                    name: str = CHECKPOINT_NAME) -> tuple[HeatmapModel, PipelineConfig]:
    """Load a model and its config from a run directory (``config.json`` + ``model.pt``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ModelError(f"weights directory {run_dir} does not exist: pass a run directory "
                         f"written by `python -m kernel_lib.train`")
    cfg = PipelineConfig.load(run_dir)
    path = run_dir / name
    if not path.is_file():
        raise ModelError(f"{run_dir} has config.json but no {name}: training did not save a "
                         f"checkpoint yet; train longer or point at another run")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ModelError(f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}): "
                         f"retrain or copy the file again") from None
    model = build_model(cfg)
    try:
        model.load_state_dict(state["state_dict"])
    except (KeyError, RuntimeError) as exc:
        raise ModelError(f"checkpoint {path} does not match its config ({exc.__class__.__name__})"
                         f": it was written by another model; retrain") from None
    model.eval()
    return model, cfg


__all__ = ["HeatmapModel", "ModelError", "aligned_multiple", "build_model", "check_encoder_name",
           "create_encoder", "load_checkpoint", "pad_to_multiple", "save_checkpoint", "ConfigError"]
