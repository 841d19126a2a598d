"""Write the Kaggle metadata of the submission kernel and the wheels dataset for one owner.

The owner (your Kaggle user name) comes from one place: ``--owner`` or, by default, the
``KAGGLE_USERNAME`` environment variable that the kaggle CLI reads too. This writes

* ``kernel-metadata.json`` (for ``kaggle kernels push -p .``): notebook
  ``notebooks/04_submission.ipynb``, private, GPU on (T4), internet off, the competition and the
  ``OWNER/byu-motor-wheels`` and ``OWNER/byu-motor-weights`` datasets attached;
* ``wheels/dataset-metadata.json`` (for ``kaggle datasets version -p wheels``).

The weights dataset's metadata goes into a run directory instead:
``python -m kernel_lib.kaggle_env weights-metadata RUN_DIR`` (same owner variable).

Usage:
    KAGGLE_USERNAME=alice python scripts/kaggle_metadata.py     # or: make kernel-metadata
    python scripts/kaggle_metadata.py --owner alice --out-dir /tmp/push
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from kernel_lib.kaggle_env import (COMPETITION_SLUG, KERNEL_SLUG, OWNER_ENV, OWNER_PLACEHOLDER,
                                   WEIGHTS_DATASET, WHEELS_DATASET, KaggleSetupError,
                                   dataset_metadata)

REPO = Path(__file__).resolve().parents[1]
CODE_FILE = "notebooks/04_submission.ipynb"
KERNEL_TITLE = "BYU motor submission"  # must slugify to KERNEL_SLUG
WHEELS_TITLE = "BYU motor wheels"
MACHINE_SHAPE = "NvidiaTeslaT4"  # T4 x2; the CLI's other choices: NvidiaTeslaP100, NvidiaL4...


def kernel_metadata(owner: str, machine_shape: str = MACHINE_SHAPE,
                    extra_datasets: Sequence[str] = ()) -> dict[str, object]:
    """The ``kernel-metadata.json`` content of the submission kernel for ``owner``.

    Args:
        owner: Kaggle user name.
        machine_shape: accelerator (``NvidiaTeslaT4`` unless you attach a torch for a P100).
        extra_datasets: more ``owner/slug`` datasets to attach (e.g. a torch-wheel dataset).
    """
    dataset_metadata(owner, WHEELS_DATASET, WHEELS_TITLE)  # validates the owner name
    for ref in extra_datasets:
        if ref.count("/") != 1:
            raise KaggleSetupError(f"extra dataset {ref!r} must look like owner/slug")
    return {
        "id": f"{owner}/{KERNEL_SLUG}",
        "title": KERNEL_TITLE,
        "code_file": CODE_FILE,
        "language": "python",
        "kernel_type": "notebook",
        "is_private": True,
        "enable_gpu": True,
        "enable_tpu": False,
        "enable_internet": False,  # explicit: the CLI's default is True
        "machine_shape": machine_shape,
        "dataset_sources": [f"{owner}/{WHEELS_DATASET}", f"{owner}/{WEIGHTS_DATASET}",
                            *extra_datasets],
        "competition_sources": [COMPETITION_SLUG],
        "kernel_sources": [],
        "model_sources": [],
    }


def write(owner: str, out_dir: Path, wheels_dir: Path, machine_shape: str = MACHINE_SHAPE,
          extra_datasets: Sequence[str] = ()) -> list[Path]:
    """Write both metadata files; returns their paths."""
    kernel = out_dir / "kernel-metadata.json"
    wheels = wheels_dir / "dataset-metadata.json"
    meta = kernel_metadata(owner, machine_shape, extra_datasets)
    kernel.write_text(json.dumps(meta, indent=2) + "\n")
    wheels.write_text(json.dumps(dataset_metadata(owner, WHEELS_DATASET, WHEELS_TITLE),
                                 indent=2) + "\n")
    return [kernel, wheels]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; exit status 2 on bad input."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--owner", default=os.environ.get(OWNER_ENV),
                        help=f"Kaggle user name (default: ${OWNER_ENV})")
    parser.add_argument("--out-dir", type=Path, default=REPO,
                        help="where kernel-metadata.json goes (default: the repository root)")
    parser.add_argument("--wheels-dir", type=Path, default=REPO / "wheels",
                        help="where the wheels dataset-metadata.json goes")
    parser.add_argument("--machine-shape", default=MACHINE_SHAPE,
                        help=f"accelerator (default {MACHINE_SHAPE}; NvidiaTeslaP100 needs a "
                             f"torch-wheel dataset, see the README section on P100 GPUs)")
    parser.add_argument("--extra-dataset", action="append", default=[], metavar="OWNER/SLUG",
                        help="attach another dataset too (repeatable), e.g. a torch-wheel one")
    args = parser.parse_args(argv)
    if not args.owner:
        print(f"error: no owner: pass --owner NAME or set {OWNER_ENV} to your Kaggle user name",
              file=sys.stderr)
        return 2
    for folder in (args.out_dir, args.wheels_dir):
        if not folder.is_dir():
            print(f"error: {folder} is not a folder", file=sys.stderr)
            return 2
    try:
        paths = write(args.owner, args.out_dir, args.wheels_dir, args.machine_shape,
                      args.extra_dataset)
    except KaggleSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("wrote " + " and ".join(map(str, paths)) + f" for owner {args.owner}")
    if args.owner == OWNER_PLACEHOLDER:
        print(f"note: {OWNER_PLACEHOLDER!r} is a placeholder: rerun with your Kaggle user name "
              f"before pushing", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
