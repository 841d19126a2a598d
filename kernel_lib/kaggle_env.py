"""Where things are inside a Kaggle kernel, and whether its GPU can run the installed torch.

Kaggle has mounted inputs in two layouts, so everything here finds folders by glob instead of one
hard-coded path:

* competition data at ``<input>/<slug>/`` or ``<input>/competitions/<slug>/``;
* datasets at ``<input>/<slug>/`` or ``<input>/datasets/<owner>/<slug>/``.

``<input>`` is ``/kaggle/input`` unless ``BYU_KAGGLE_INPUT`` names another folder (tests and
local dry runs use a fake one). Off Kaggle every finder returns ``None`` instead of failing.

The slugs of the submission kernel and its two datasets live here, so the kernel metadata, the
wheels dataset and the weights dataset agree on them.

Example:
    >>> from kernel_lib.kaggle_env import find_competition_root, working_dir
    >>> find_competition_root(input_root="/nonexistent") is None
    True

Command line (writes the metadata that ``kaggle datasets version -p RUN_DIR`` needs)::

    python -m kernel_lib.kaggle_env weights-metadata runs/exp1 --owner alice
    python -m kernel_lib.kaggle_env check-gpu
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .config import CONFIG_NAME, atomic_write_text

if TYPE_CHECKING:  # torch is imported lazily: the metadata command must not pay for it
    import torch

COMPETITION_SLUG = "byu-locating-bacterial-flagellar-motors-2025"
KERNEL_SLUG = "byu-motor-submission"
WHEELS_DATASET = "byu-motor-wheels"
WEIGHTS_DATASET = "byu-motor-weights"
CHECKPOINT_NAME = "model.pt"  # the engine writes it beside config.json
DATASET_METADATA_NAME = "dataset-metadata.json"

KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")
INPUT_ROOT_ENV = "BYU_KAGGLE_INPUT"
OWNER_ENV = "KAGGLE_USERNAME"
OWNER_PLACEHOLDER = "your-kaggle-username"

_SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,48}[a-z0-9]$")
_OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class KaggleSetupError(ValueError):
    """Bad input for a Kaggle upload or lookup; the message says what to fix."""


def is_kaggle() -> bool:
    """True inside a Kaggle kernel (Kaggle sets ``KAGGLE_KERNEL_RUN_TYPE``)."""
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE")) or KAGGLE_INPUT.is_dir()


def resolve_input_root(input_root: str | os.PathLike | None = None) -> Path:
    """The folder that holds the attached inputs.

    Args:
        input_root: explicit folder; otherwise ``$BYU_KAGGLE_INPUT``, otherwise ``/kaggle/input``.
    """
    if input_root is not None:
        return Path(input_root)
    return Path(os.environ.get(INPUT_ROOT_ENV) or KAGGLE_INPUT)


def _glob_dirs(root: Path, patterns: Sequence[str]) -> list[Path]:
    found: list[Path] = []
    for pattern in patterns:
        found.extend(p for p in sorted(root.glob(pattern)) if p.is_dir() and p not in found)
    return found


def find_competition_root(slug: str = COMPETITION_SLUG,
                          input_root: str | os.PathLike | None = None) -> Path | None:
    """Find the competition's data folder, or None when it is not attached.

    Looks at ``<input>/<slug>/`` and ``<input>/competitions/<slug>/`` and accepts a folder that
    contains ``test/`` or ``sample_submission.csv``.

    Args:
        slug: competition slug (a glob pattern is allowed).
        input_root: see :func:`resolve_input_root`.
    """
    root = resolve_input_root(input_root)
    for folder in _glob_dirs(root, (slug, f"competitions/{slug}")):
        if (folder / "test").is_dir() or (folder / "sample_submission.csv").is_file():
            return folder
    return None


def find_dataset_dir(name_or_glob: str, input_root: str | os.PathLike | None = None,
                     contains: str | None = None) -> Path | None:
    """Find an attached dataset's folder, or None when it is not attached.

    Args:
        name_or_glob: ``slug`` or ``owner/slug``, glob patterns allowed (``"byu-motor-*"``).
            In the ``<input>/<slug>/`` layout the owner is not part of the path, so not checked.
        input_root: see :func:`resolve_input_root`.
        contains: only accept a folder holding this file name or glob (``"model.pt"``).

    Returns:
        The first match in sorted order of ``<input>/<slug>/`` then
        ``<input>/datasets/<owner>/<slug>/``.
    """
    owner, _, slug = name_or_glob.rpartition("/")
    patterns = (slug, f"datasets/{owner or '*'}/{slug}")
    for folder in _glob_dirs(resolve_input_root(input_root), patterns):
        if contains is None or any(folder.glob(contains)):
            return folder
    return None


def working_dir(local_dir: str | os.PathLike) -> Path:
    """``/kaggle/working`` inside a Kaggle kernel, else ``local_dir`` (created if missing)."""
    path = KAGGLE_WORKING if is_kaggle() and KAGGLE_WORKING.is_dir() else Path(local_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def arch_supported(capability: tuple[int, int], arch_list: Sequence[str]) -> bool:
    """Whether a torch build with ``arch_list`` has kernels for a GPU of ``capability``.

    An ``sm_XY`` cubin runs on the same major version at an equal or higher minor one; a
    ``compute_XY`` (PTX) entry is JIT-compiled for any GPU of capability >= XY.

    Example:
        >>> arch_supported((6, 0), ["sm_75", "sm_80", "sm_90"])  # P100 vs Kaggle's 2026 torch
        False
        >>> arch_supported((8, 9), ["sm_80", "sm_86", "sm_90"])
        True
    """
    major, minor = capability
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        number = digits.rstrip("abcdefghijklmnopqrstuvwxyz")  # sm_90a, sm_100f
        if not number.isdigit():
            continue
        arch_major, arch_minor = divmod(int(number), 10)  # sm_75 -> (7, 5), sm_120 -> (12, 0)
        if kind == "sm" and arch_major == major and arch_minor <= minor:
            return True
        if kind == "compute" and (arch_major, arch_minor) <= (major, minor):
            return True
    return False


def _cuda_runs() -> str | None:
    """Run one tiny CUDA op; return the error text, or None when it worked."""
    import torch

    try:
        (torch.ones(2, device="cuda") * 2).sum().item()
    except RuntimeError as exc:
        return str(exc).splitlines()[0]
    return None


def check_gpu(log: Callable[[str], None] = print) -> "torch.device":
    """Pick the device for inference: the GPU if this torch can run on it, else the CPU.

    A Tesla P100 (sm_60) is the case this exists for: Kaggle's 2026 torch is built for sm_75 and
    newer, so the first CUDA call would fail with "no kernel image is available". Then this says
    so once and returns the CPU; the wheels bootstrap (``byu_bootstrap.py``) has already swapped
    in a compatible torch if a torch-wheel dataset was attached (see the README).

    Args:
        log: where the one-line verdict goes.
    """
    import torch

    if not torch.cuda.is_available():
        log("check_gpu: no CUDA GPU visible: running on CPU")
        return torch.device("cpu")
    capability = tuple(torch.cuda.get_device_capability(0))
    arch_list = list(torch.cuda.get_arch_list())
    name = torch.cuda.get_device_name(0)
    sm = f"sm_{capability[0]}{capability[1]}"
    if not arch_supported(capability, arch_list):
        log(f"check_gpu: the GPU {name} ({sm}) is not supported by torch {torch.__version__}, "
            f"built for {' '.join(arch_list) or 'no GPU architectures'}: CUDA calls would fail "
            f"with 'no kernel image is available'. Falling back to CPU (much slower). To use this "
            f"GPU attach a torch-wheel dataset built for {sm} (README: 'A GPU that the image's "
            f"torch cannot run'), or choose the T4 accelerator.")
        return torch.device("cpu")
    error = _cuda_runs()
    if error is not None:
        log(f"check_gpu: a test op on {name} ({sm}) failed ({error}): falling back to CPU")
        return torch.device("cpu")
    log(f"check_gpu: using {name} ({sm}, torch {torch.__version__})")
    return torch.device("cuda")


def dataset_metadata(owner: str, slug: str, title: str | None = None,
                     license_name: str = "CC0-1.0") -> dict[str, object]:
    """The ``dataset-metadata.json`` content that ``kaggle datasets create/version`` reads.

    Raises:
        KaggleSetupError: owner or slug is not a valid Kaggle name.
    """
    if not _OWNER_RE.match(owner or ""):
        raise KaggleSetupError(f"owner {owner!r} is not a Kaggle user name: pass --owner NAME "
                               f"or set {OWNER_ENV}")
    if not _SLUG_RE.match(slug or ""):
        raise KaggleSetupError(f"dataset slug {slug!r} must be 3-50 lowercase letters, digits "
                               f"or '-', starting and ending with a letter or digit")
    title = title or slug.replace("-", " ")
    if not 6 <= len(title) <= 50:
        raise KaggleSetupError(f"dataset title {title!r} must be 6-50 characters: pass --title")
    return {"title": title, "id": f"{owner}/{slug}", "licenses": [{"name": license_name}]}


def write_weights_metadata(run_dir: str | os.PathLike, owner: str, slug: str = WEIGHTS_DATASET,
                           title: str | None = None) -> Path:
    """Write ``dataset-metadata.json`` into a training run so it uploads as the weights dataset.

    Afterwards ``kaggle datasets create -p RUN_DIR`` (first time) or
    ``kaggle datasets version -p RUN_DIR -m NOTE`` uploads the run's files (not its sub-folders).

    Args:
        run_dir: a run directory holding ``config.json`` and ``model.pt``.
        owner: Kaggle user name that owns the dataset.
        slug: dataset slug; the kernel metadata expects :data:`WEIGHTS_DATASET`.
        title: dataset title (default: the slug with spaces).

    Returns:
        The path written.

    Raises:
        KaggleSetupError: the run directory or a file in it is missing, or a name is invalid.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise KaggleSetupError(f"run directory {run} does not exist: pass the folder that "
                               f"training wrote (it holds {CONFIG_NAME} and {CHECKPOINT_NAME})")
    missing = [name for name in (CONFIG_NAME, CHECKPOINT_NAME) if not (run / name).is_file()]
    if missing:
        raise KaggleSetupError(f"{run} has no {' or '.join(missing)}: is it a finished training "
                               f"run? Train first, or point at another run directory")
    if owner == OWNER_PLACEHOLDER:
        raise KaggleSetupError(f"owner is the placeholder {owner!r}: pass --owner with your "
                               f"Kaggle user name or set {OWNER_ENV}")
    meta = dataset_metadata(owner, slug, title)
    path = run / DATASET_METADATA_NAME
    atomic_write_text(path, json.dumps(meta, indent=2) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``weights-metadata`` and ``check-gpu`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m kernel_lib.kaggle_env",
                                     description="Kaggle helpers for the BYU motor pipeline.")
    sub = parser.add_subparsers(dest="command", required=True)
    weights = sub.add_parser("weights-metadata",
                             help="write dataset-metadata.json into a run directory")
    weights.add_argument("run_dir", help="run directory with config.json and model.pt")
    weights.add_argument("--owner", default=os.environ.get(OWNER_ENV),
                         help=f"Kaggle user name (default: ${OWNER_ENV})")
    weights.add_argument("--slug", default=WEIGHTS_DATASET,
                         help=f"dataset slug (default: {WEIGHTS_DATASET})")
    weights.add_argument("--title", default=None, help="dataset title (default: from the slug)")
    sub.add_parser("check-gpu", help="say which device inference would use")
    args = parser.parse_args(argv)
    if args.command == "check-gpu":
        print(check_gpu(log=print))
        return 0
    if not args.owner:
        print(f"error: no owner: pass --owner NAME or set {OWNER_ENV}", file=sys.stderr)
        return 2
    try:
        path = write_weights_metadata(args.run_dir, args.owner, args.slug, args.title)
    except KaggleSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = json.loads(path.read_text())
    print(f"wrote {path} (dataset {meta['id']}): upload with "
          f"`kaggle datasets create -p {args.run_dir}` the first time, then "
          f"`kaggle datasets version -p {args.run_dir} -m NOTE`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
