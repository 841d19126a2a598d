"""Rebuild ``wheels/``: the offline bundle that the submission kernel installs from.

The kernel runs with the internet off, so whatever it imports beyond Kaggle's image arrives as
wheels in an attached dataset (see the README section "Submitting" for why that is kernel_lib and timm only).
This script

* builds ``kernel_lib``'s own wheel (pure Python, ``py3-none-any``) from a clean copy of the
  source with ``pip wheel --no-deps``, with ``SOURCE_DATE_EPOCH`` fixed so unchanged code gives
  identical bytes;
* downloads each bundled package at the version pinned in ``requirements.txt`` for Kaggle's
  Python 3.12 / manylinux x86_64 with ``--only-binary=:all: --no-deps`` (reusing the wheel already
  in ``wheels/`` when its version and sha256 still match, so a rebuild works offline);
* writes ``MANIFEST.json`` (name, version, size, sha256 of every file; the ``install`` list that
  ``byu_bootstrap.py`` installs) and, if missing, ``dataset-metadata.json``.

Never torch: the kernel uses the image's torch.

Usage:
    python scripts/build_wheels.py            # or: make wheels
    python scripts/build_wheels.py --out /tmp/wheels
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
BUNDLE = "byu-motor-wheels"
BUNDLED = ("timm",)  # beyond kernel_lib: what the kernel imports that the image may lack
NEVER_BUNDLE = ("torch", "torchvision", "torchaudio", "triton")  # the image's own GPU stack
TARGET = {"python_version": "3.12", "platform": "manylinux2014_x86_64", "implementation": "cp"}
KEEP = ("byu_bootstrap.py", "dataset-metadata.json", "MANIFEST.json")  # non-wheel files
SOURCE_DATE_EPOCH = "315532800"  # 1980-01-01, the earliest a zip can store
_SOURCE_FILES = ("pyproject.toml", "setup.cfg", "setup.py", "LICEN[CS]E*")
# The wheel's long description is fixed text, so README edits do not change the wheel.
_README_STUB = "BYU flagellar-motor pipeline: see the project's README.\n"


class BuildError(RuntimeError):
    """The bundle could not be built; the message says what to fix."""


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def normalize(name: str) -> str:
    """PEP 503 name: ``Kernel_Lib`` -> ``kernel-lib``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(requirements: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements file, keyed by normalized name."""
    pins = {}
    for line in requirements.read_text().splitlines():
        match = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", line)
        if match:
            pins[normalize(match.group(1))] = match.group(2)
    return pins


def wheel_name_version(path: Path) -> tuple[str, str]:
    """(distribution, version) from a wheel file name."""
    parts = path.name[:-len(".whl")].split("-")
    if len(parts) < 5:
        raise BuildError(f"{path.name} is not a wheel file name (name-version-py-abi-platform)")
    return parts[0], parts[1]


def _pip(args: Sequence[str], env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "-q"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise BuildError(f"`{' '.join(cmd)}` failed:\n{result.stdout}{result.stderr}")


def build_kernel_lib(dest: Path) -> Path:
    """Build kernel_lib's wheel from a clean copy of the source (no stale build/ leftovers).

    Only ``kernel_lib/``, ``pyproject.toml`` (and setup/licence files if any) are copied.
    """
    with tempfile.TemporaryDirectory(prefix="kernel_lib_src_") as tmp:
        src = Path(tmp)
        for pattern in _SOURCE_FILES:
            for path in REPO.glob(pattern):
                shutil.copy2(path, src / path.name)
        shutil.copytree(REPO / "kernel_lib", src / "kernel_lib",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (src / "README.md").write_text(_README_STUB)  # pyproject's `readme`
        env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH}
        before = set(dest.glob("*.whl"))
        try:
            _pip(["wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(dest)], env)
        except BuildError:  # no setuptools in this environment: let pip fetch the backend
            _pip(["wheel", str(src), "--no-deps", "-w", str(dest)], env)
    built = sorted(set(dest.glob("kernel_lib-*.whl")) - before)
    if len(built) != 1 or not built[0].name.endswith("-py3-none-any.whl"):
        raise BuildError(f"expected one kernel_lib-*-py3-none-any.whl, got {built}: is the "
                         f"package still pure Python?")
    return built[0]


def fetch(name: str, version: str, dest: Path, out: Path, old_manifest: dict) -> Path:
    """The wheel of ``name==version`` for the Kaggle target, reused from ``out`` if unchanged."""
    for entry in old_manifest.get("files", []):
        cached = out / entry["name"]
        if (normalize(entry.get("package", "")) == normalize(name)
                and entry.get("version") == version and cached.is_file()
                and sha256(cached) == entry["sha256"]):
            shutil.copy2(cached, dest / cached.name)
            return dest / cached.name
    before = set(dest.glob("*.whl"))
    _pip(["download", f"{name}=={version}", "--no-deps", "--only-binary=:all:",
          "--python-version", TARGET["python_version"], "--platform", TARGET["platform"],
          "--implementation", TARGET["implementation"], "-d", str(dest)])
    got = sorted(set(dest.glob("*.whl")) - before)
    if len(got) != 1:
        raise BuildError(f"pip download {name}=={version} gave {got}, expected one wheel")
    return got[0]


def check_wheel(path: Path) -> None:
    """Refuse torch and wheels that cannot install on CPython 3.12 manylinux x86_64."""
    name, _ = wheel_name_version(path)
    if normalize(name) in NEVER_BUNDLE:
        raise BuildError(f"{path.name} must not be bundled: the kernel uses the image's torch")
    python_tag, abi_tag, platform_tag = path.name[:-len(".whl")].split("-")[-3:]
    ok_python = any(t in ("py3", "cp312") for t in python_tag.split("."))
    ok_platform = platform_tag == "any" or ("x86_64" in platform_tag
                                            and "linux" in platform_tag)
    if not (ok_python and ok_platform and abi_tag in ("none", "abi3", "cp312")):
        raise BuildError(f"{path.name} does not install on CPython 3.12 manylinux x86_64")


def manifest_for(out: Path, wheels: Sequence[Path]) -> dict:
    """The ``MANIFEST.json`` content for the files now in ``out``."""
    files = []
    for path in sorted(out.iterdir()):
        if path.name in ("MANIFEST.json", "dataset-metadata.json") or not path.is_file():
            continue
        entry: dict = {"name": path.name, "size": path.stat().st_size, "sha256": sha256(path)}
        if path.suffix == ".whl":
            entry["package"], entry["version"] = wheel_name_version(path)
        files.append(entry)
    install = [f"{wheel_name_version(w)[0]}=={wheel_name_version(w)[1]}" for w in wheels]
    return {
        "bundle": BUNDLE,
        "built_by": "make wheels (scripts/build_wheels.py)",
        "target": TARGET,
        "install": install,
        "install_command": "pip install --no-index --find-links DIR --no-deps " + " ".join(install),
        "files": files,
    }


def write_dataset_metadata(out: Path) -> Path:
    """Write ``dataset-metadata.json`` for the wheels dataset if it is missing."""
    path = out / "dataset-metadata.json"
    if not path.exists():
        from kernel_lib.kaggle_env import OWNER_ENV, OWNER_PLACEHOLDER, dataset_metadata
        owner = os.environ.get(OWNER_ENV) or OWNER_PLACEHOLDER
        meta = dataset_metadata(owner, BUNDLE, "BYU motor wheels")
        path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def build(out: Path, requirements: Path) -> dict:
    """Rebuild ``out`` and return its manifest."""
    if not (out / "byu_bootstrap.py").is_file():
        raise BuildError(f"{out / 'byu_bootstrap.py'} is missing: it is the kernel's installer "
                         f"and lives in the repository's wheels/ folder; copy it from there")
    pins = read_pins(requirements)
    missing = [name for name in BUNDLED if normalize(name) not in pins]
    if missing:
        raise BuildError(f"{requirements} pins no version for {missing}: add `name==X.Y.Z`")
    manifest_path = out / "MANIFEST.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="wheels_") as tmp:
        staging = Path(tmp)
        wheels = [build_kernel_lib(staging)]
        wheels += [fetch(name, pins[normalize(name)], staging, out, old) for name in BUNDLED]
        for wheel in wheels:
            check_wheel(wheel)
        for stale in out.iterdir():
            if stale.is_file() and stale.name not in KEEP:
                stale.unlink()
            elif stale.name == "__pycache__":
                shutil.rmtree(stale)
            elif stale.is_dir():
                raise BuildError(f"{stale} is a folder: the wheels dataset must stay flat "
                                 f"(Kaggle uploads skip sub-folders); move it out")
        final = [Path(shutil.copy2(w, out / w.name)) for w in wheels]
    manifest = manifest_for(out, final)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    write_dataset_metadata(out)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; exit status 2 on a build error."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "wheels", help="bundle folder")
    parser.add_argument("--requirements", type=Path, default=REPO / "requirements.txt",
                        help="pinned versions of the bundled packages")
    args = parser.parse_args(argv)
    try:
        manifest = build(args.out, args.requirements)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = sum(f["size"] for f in manifest["files"])
    for entry in manifest["files"]:
        print(f"{entry['size'] / 1e6:8.2f} MB  {entry['name']}")
    print(f"{total / 1e6:8.2f} MB  in {args.out} (install: {' '.join(manifest['install'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
