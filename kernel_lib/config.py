"""One typed config for preprocessing, model, targets and decoding.

It is saved as ``config.json`` beside every checkpoint and loaded back with it, so inference
preprocesses exactly as training did.

Example:
    >>> from kernel_lib.config import PipelineConfig
    >>> cfg = PipelineConfig(encoder="resnet18", target_spacing=16.0)
    >>> cfg.in_chans
    3
    >>> PipelineConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

CONFIG_VERSION = 1
CONFIG_NAME = "config.json"
Z_SAMPLINGS = ("area", "box", "nearest")  # how z shrinks to the target spacing (see PipelineConfig)


class ConfigError(ValueError):
    """A config file or value that the pipeline cannot use; the message says what to do."""


@dataclass
class ThresholdRule:
    """How a tomogram's top peak score becomes "motor" or "no motor".

    Attributes:
        kind: ``"fixed"`` keeps a peak whose score is at least ``value``; ``"quantile"`` ranks
            the tomograms of one run by their top score and calls the highest ``value`` fraction
            positive (the winners' trick: the test-set positive rate is stable, scores are not).
        value: the score threshold (fixed) or the fraction called positive (quantile), in [0, 1].
    """

    kind: str = "fixed"
    value: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "quantile"):
            raise ConfigError(f"threshold kind {self.kind!r} is unknown: use 'fixed' or 'quantile'")
        if not 0.0 <= float(self.value) <= 1.0:
            raise ConfigError(f"threshold value {self.value!r} is outside [0, 1]")
        self.value = float(self.value)

    @classmethod
    def parse(cls, text: str) -> "ThresholdRule":
        """Parse ``"fixed:0.4"`` or ``"quantile:0.45"`` (a command-line override)."""
        kind, sep, value = text.partition(":")
        if not sep:
            raise ConfigError(f"threshold {text!r} must look like 'fixed:0.4' or 'quantile:0.45'")
        try:
            return cls(kind.strip(), float(value))
        except ValueError as exc:
            raise ConfigError(f"threshold {text!r}: {exc}") from None

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}"


@dataclass
class PipelineConfig:
    """Every setting that training and inference must agree on.

    Attributes:
        target_spacing: angstroms per model voxel; volumes are resampled to it isotropically.
            32 A by default: the 1000 A scoring radius is 30 model voxels there, the top two
            entries worked at about 20-35 A (fixed-shape resizes), and it is 4-8x cheaper than
            16 A (bench/RESULTS.md).
        assumed_test_spacing: angstroms per original voxel assumed for tomograms whose spacing is
            unknown (all test tomograms). Training sets it to the median spacing of all the
            labelled tomograms when it is None (not only its training folds', so runs of other
            folds and seeds agree and can be ensembled).
        percentile_low: lower clip percentile of the intensity normalisation.
        percentile_high: upper clip percentile of the intensity normalisation.
        normalize_per: ``"volume"`` or ``"slice"`` percentile statistics.
        z_sampling: how z shrinks to the target spacing: ``"area"`` (default) averages every
            source slice; ``"box"`` averages the ``round(s)`` source slices nearest each model
            slice's centre (``s`` source slices per model slice: 2 at 15.6 -> 32 A, where area
            blends about 3), so inference decodes half the JPEGs instead of three quarters;
            ``"nearest"`` takes the nearest source slice for each model slice (a quarter).
            Either way inference decodes only the sources of the model slices its stacks read.
            Area meets the CPU data-path target (0.5x a plain decode) without a margin
            (0.40-0.50x since session 9), box with one (0.36x, session 7), but box and nearest
            ranked tomograms less well with resnet18 (box by 0.022 AUC and 0.04 F2 on average
            over four training seeds on 90 test tomograms, nearest by much more;
            bench/RESULTS.md, sessions 3 and 7).
        stack_half: n, so a 2.5D stack has ``2n + 1`` channels.
        stack_step_angstrom: distance between neighbouring channels of a stack, in angstroms.
            The default, 5 slices 64 A apart (+-128 A, most of a motor's depth), against 3
            slices 32 A apart, paired over three training seeds on 90 test tomograms: ranking
            AUC 0.844 vs 0.823, F2 0.756 vs 0.739, better in two seeds of three; a likely
            gain inside the run-to-run noise, for two more input channels and no measurable
            speed cost (bench/RESULTS.md, session 5).
        encoder: any timm CNN name that supports ``features_only``. ``resnet18`` by default.
            ``resnet10t`` (one block per stage, a three-conv stem: 35 % fewer multiply-adds,
            a 20-30 % shorter CPU forward) ranked alike on the synthetic benchmark, three paired
            seeds on 90 test tomograms (AUC -0.006, F2 +0.013); it is an option, not the
            default, because on a GPU the forward is not what limits inference and real
            tomograms may need resnet18's depth, which synthetic data cannot show.
            ``mobilenetv4_conv_small``, ``mobilenetv3_large_100`` and ``regnetx_004`` are
            cheaper still on a CPU but ranked tomograms less well (bench/RESULTS.md, sessions
            3 and 11).
        decoder_channels: width of the decoder stages, deepest first.
        output_stride: heatmap pixels are this many model voxels wide (in y and x).
        sigma_angstrom: Gaussian sigma of the target heatmap.
        nms_radius_angstrom: peaks closer than this are merged by max-pool NMS.
        z_stride: run the model on every k-th model slice (validation and inference). 6 (one
            heatmap slice every 192 A at 32 A, so a motor's centre is at most 96 A from a
            stack's centre slice, inside its +-128 A; the stacks still read only every other
            slice, so the data path is unchanged) runs a third fewer stacks than 4 and half
            those of 2. Against 4 on 90 synthetic test tomograms: eight checkpoints inferred
            both ways ranked alike or better (AUC +0.025 for session 8's four, +0.001 for
            session 10's), and four pairs of benchmark runs trained with each ranked a little
            better on average (AUC +0.010, F2 +0.022, two seeds better, one level, one worse);
            the standard 30 scored a little lower (F2 -0.03 on average over the four pairs,
            one seed carrying most of it; bench/RESULTS.md, sessions 9 and 10). Checkpoints
            keep the stride saved in their config.json.
        tta: flip test-time augmentation in validation and inference: each stack and its x- and
            y-mirrors go through the model and the heatmaps are averaged (3x the forward
            passes). It is part of the config because the threshold rule is chosen on the
            scores validation gives, so training and inference must predict alike; off by
            default for speed (its accuracy effect: bench/RESULTS.md).
        threshold: the rule chosen on validation (saved with the weights).
        version: schema version of this file; loading another version fails clearly.
    """

    target_spacing: float = 32.0
    assumed_test_spacing: float | None = None
    percentile_low: float = 2.0
    percentile_high: float = 98.0
    normalize_per: str = "volume"
    z_sampling: str = "area"
    stack_half: int = 2
    stack_step_angstrom: float = 64.0
    encoder: str = "resnet18"
    decoder_channels: tuple[int, ...] = (128, 64, 32)
    output_stride: int = 4
    sigma_angstrom: float = 200.0
    nms_radius_angstrom: float = 600.0
    z_stride: int = 6
    tta: bool = False
    threshold: ThresholdRule = field(default_factory=ThresholdRule)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.threshold, dict):
            self.threshold = ThresholdRule(**self.threshold)
        self.decoder_channels = tuple(int(c) for c in self.decoder_channels)
        checks = [
            (self.target_spacing > 0, f"target_spacing must be > 0 (got {self.target_spacing})"),
            (self.assumed_test_spacing is None or self.assumed_test_spacing > 0,
             f"assumed_test_spacing must be > 0 or None (got {self.assumed_test_spacing})"),
            (0 <= self.percentile_low < self.percentile_high <= 100,
             f"need 0 <= percentile_low < percentile_high <= 100 "
             f"(got {self.percentile_low}, {self.percentile_high})"),
            (self.normalize_per in ("volume", "slice"),
             f"normalize_per must be 'volume' or 'slice' (got {self.normalize_per!r})"),
            (self.z_sampling in Z_SAMPLINGS,
             f"z_sampling must be one of {Z_SAMPLINGS} (got {self.z_sampling!r})"),
            (self.stack_half >= 0, f"stack_half must be >= 0 (got {self.stack_half})"),
            (self.stack_step_angstrom > 0,
             f"stack_step_angstrom must be > 0 (got {self.stack_step_angstrom})"),
            (self.output_stride in (1, 2, 4, 8, 16),
             f"output_stride must be one of 1, 2, 4, 8, 16 (got {self.output_stride})"),
            (len(self.decoder_channels) > 0 and min(self.decoder_channels) > 0,
             f"decoder_channels must be positive (got {self.decoder_channels})"),
            (self.sigma_angstrom > 0, f"sigma_angstrom must be > 0 (got {self.sigma_angstrom})"),
            (self.nms_radius_angstrom > 0,
             f"nms_radius_angstrom must be > 0 (got {self.nms_radius_angstrom})"),
            (self.z_stride >= 1, f"z_stride must be >= 1 (got {self.z_stride})"),
            (isinstance(self.tta, bool), f"tta must be true or false (got {self.tta!r})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def in_chans(self) -> int:
        """Number of slices in one 2.5D stack, the encoder's input channels."""
        return 2 * self.stack_half + 1

    @property
    def stack_step_slices(self) -> int:
        """Channel spacing in model slices (at least 1)."""
        return max(1, round(self.stack_step_angstrom / self.target_spacing))

    @property
    def stack_offsets(self) -> np.ndarray:
        """Offsets in model slices of a 2.5D stack's channels from its centre slice."""
        from .stacks import stack_offsets

        return stack_offsets(self.stack_half, self.stack_step_slices)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["decoder_channels"] = list(self.decoder_channels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "PipelineConfig":
        version = data.get("version")
        if version != CONFIG_VERSION:
            raise ConfigError(
                f"{source} has config version {version!r}, this kernel_lib reads version "
                f"{CONFIG_VERSION}: retrain, or install the kernel_lib that wrote it")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source} has unknown keys {unknown}: was it written by a newer "
                              f"kernel_lib?")
        return cls(**data)

    def replace(self, **changes: Any) -> "PipelineConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` into ``directory`` atomically; returns its path."""
        path = Path(directory) / CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PipelineConfig":
        """Load from a ``config.json`` file or a directory that holds one."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise ConfigError(f"no {CONFIG_NAME} at {path}: point at a run directory written by "
                              f"`python -m kernel_lib.train`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}): rewrite or retrain") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(data, source=str(path))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to a temporary file beside ``path`` and rename it into place."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; honour the umask instead
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
