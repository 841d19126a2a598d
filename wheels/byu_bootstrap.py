"""Install the BYU motor pipeline's offline bundle inside a Kaggle kernel (internet off).

This file travels inside the wheels dataset, next to the wheels and ``MANIFEST.json``. It uses
only the standard library: it runs before ``kernel_lib`` is installed. It

1. finds the wheels dataset under ``/kaggle/input`` by glob (``<input>/<slug>/`` and
   ``<input>/datasets/<owner>/<slug>/``; ``$BYU_KAGGLE_INPUT`` overrides the root);
2. installs what ``MANIFEST.json`` lists with
   ``pip install --no-index --find-links DIR --no-deps NAME==VERSION ...`` and checks the versions
   that Python now sees;
3. checks that the image's torch has kernels for the GPU (a P100, sm_60, has none in Kaggle's
   2026 torch) and, if not, installs a torch wheel from another attached dataset that holds
   ``torch-*.whl``, or says that inference will fall back to CPU.

Off Kaggle (no input root) it reports that and does nothing.

Notebook cell (no ``def`` needed)::

    import glob, os, runpy
    INPUT_ROOT = os.environ.get("BYU_KAGGLE_INPUT", "/kaggle/input")
    found = sorted(glob.glob(f"{INPUT_ROOT}/*/byu_bootstrap.py")
                   + glob.glob(f"{INPUT_ROOT}/datasets/*/*/byu_bootstrap.py"))
    if found:
        runpy.run_path(found[0])["bootstrap"](INPUT_ROOT)
    elif os.path.isdir(INPUT_ROOT):
        raise FileNotFoundError(f"{INPUT_ROOT} has no byu_bootstrap.py: attach the wheels dataset")
    else:
        print(f"{INPUT_ROOT} does not exist: not on Kaggle, using the installed kernel_lib")

Shell: ``python byu_bootstrap.py [--input-root DIR] [--no-gpu-check]``.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

BUNDLE = "byu-motor-wheels"
MANIFEST_NAME = "MANIFEST.json"
INPUT_ROOT_ENV = "BYU_KAGGLE_INPUT"
DEFAULT_INPUT_ROOT = "/kaggle/input"
DATASET_GLOBS = ("*", "datasets/*/*")  # <input>/<slug>/ and <input>/datasets/<owner>/<slug>/
TORCH_WHEEL_GLOB = "torch-*.whl"
TAG = "[byu_bootstrap]"

# Runs in a child process so this process never imports torch before a swap.
_PROBE = """
import json, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda,
        "arch_list": torch.cuda.get_arch_list(), "available": torch.cuda.is_available()}
if info["available"]:
    info["name"] = torch.cuda.get_device_name(0)
    info["capability"] = list(torch.cuda.get_device_capability(0))
print(json.dumps(info))
"""

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]
Probe = Callable[[], Optional[dict]]


class BootstrapError(RuntimeError):
    """The bundle could not be installed; the message says what to attach or fix."""


def _log(message: str) -> None:
    print(f"{TAG} {message}", flush=True)


def _run(cmd: Sequence[str]) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False)


def dataset_dirs(input_root: Path) -> list[Path]:
    """Every attached dataset folder, in both mount layouts."""
    found: list[Path] = []
    for pattern in DATASET_GLOBS:
        found.extend(Path(p) for p in sorted(glob.glob(str(input_root / pattern)))
                     if os.path.isdir(p))
    return found


def read_manifest(folder: Path) -> dict[str, Any]:
    """Load and sanity-check ``MANIFEST.json`` of a wheels folder."""
    path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BootstrapError(f"{path} is unreadable ({exc}): rebuild with `make wheels` and "
                             f"upload the wheels dataset again") from None
    if manifest.get("bundle") != BUNDLE or not manifest.get("install"):
        raise BootstrapError(f"{path} is not a {BUNDLE} manifest (no 'install' list)")
    missing = [f["name"] for f in manifest.get("files", []) if not (folder / f["name"]).is_file()]
    if missing:
        raise BootstrapError(f"{folder} lacks {missing} that {MANIFEST_NAME} lists: upload the "
                             f"whole wheels/ folder again")
    return manifest


def find_wheels_dirs(input_root: Path) -> list[Path]:
    """Attached folders whose ``MANIFEST.json`` belongs to this bundle."""
    found = []
    for folder in dataset_dirs(input_root):
        path = folder / MANIFEST_NAME
        if path.is_file():
            try:
                if json.loads(path.read_text()).get("bundle") == BUNDLE:
                    found.append(folder)
            except (OSError, ValueError):
                continue
    return found


def find_torch_wheel_dirs(input_root: Path) -> list[Path]:
    """Attached folders holding a ``torch-*.whl`` (a GPU-compatible torch for old GPUs)."""
    return [d for d in dataset_dirs(input_root) if any(d.glob(TORCH_WHEEL_GLOB))]


def pip_install(find_links: Path, requirements: Sequence[str], runner: Runner = _run) -> str:
    """``pip install --no-index --find-links DIR --no-deps ...`` into this interpreter.

    Returns:
        pip's output.

    Raises:
        BootstrapError: pip failed; the message carries the end of its output.
    """
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(find_links),
           "--no-deps", "--disable-pip-version-check", "--no-input", *requirements]
    result = runner(cmd)
    output = (result.stdout or "") + (result.stderr or "")
    if result.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise BootstrapError(f"offline install from {find_links} failed (pip exit "
                             f"{result.returncode}):\n{tail}")
    importlib.invalidate_caches()
    return output


def installed_version(distribution: str) -> str | None:
    """Version of an installed distribution as this interpreter sees it, or None."""
    importlib.invalidate_caches()
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe_torch(runner: Runner = _run) -> dict | None:
    """torch's version, arch list and GPU in a child process; None when no NVIDIA GPU is visible."""
    if shutil.which("nvidia-smi") is None:
        return None
    result = runner([sys.executable, "-c", _PROBE])
    if result.returncode != 0:
        last = (result.stderr or "").strip().splitlines()[-1:] or ["no output"]
        return {"error": last[0]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def arch_supported(capability: Sequence[int], arch_list: Sequence[str]) -> bool:
    """Same rule as ``kernel_lib.kaggle_env.arch_supported`` (this file cannot import it)."""
    major, minor = capability
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        number = digits.rstrip("abcdefghijklmnopqrstuvwxyz")
        if not number.isdigit():
            continue
        arch_major, arch_minor = divmod(int(number), 10)
        if kind == "sm" and arch_major == major and arch_minor <= minor:
            return True
        if kind == "compute" and (arch_major, arch_minor) <= (major, minor):
            return True
    return False


def check_torch_gpu(input_root: Path, probe: Probe = probe_torch, runner: Runner = _run,
                    log: Callable[[str], None] = _log) -> str:
    """Make sure torch can run on the GPU, swapping in an attached torch wheel if needed.

    Returns:
        ``"cuda"`` when the GPU is usable, ``"cpu"`` otherwise (no GPU, or an unsupported one
        with no usable torch wheel attached; ``kernel_lib.kaggle_env.check_gpu`` then picks CPU).
    """
    info = probe()
    if info is None:
        log("GPU: no NVIDIA GPU visible: inference will run on CPU")
        return "cpu"
    if "error" in info:
        log(f"GPU: could not inspect torch ({info['error']}): inference will decide at runtime")
        return "cpu"
    if not info.get("available"):
        log(f"GPU: torch {info['torch']} sees no usable CUDA device: inference will run on CPU")
        return "cpu"
    cap = info["capability"]
    sm = f"sm_{cap[0]}{cap[1]}"
    if arch_supported(cap, info["arch_list"]):
        log(f"GPU: {info['name']} ({sm}) is supported by torch {info['torch']}")
        return "cuda"
    log(f"GPU: {info['name']} ({sm}) is NOT supported by the image's torch {info['torch']} "
        f"(built for {' '.join(info['arch_list'])}); CUDA calls would fail with 'no kernel image "
        f"is available'.")
    torch_dirs = find_torch_wheel_dirs(input_root)
    if not torch_dirs:
        log(f"GPU: no dataset with {TORCH_WHEEL_GLOB} is attached: inference will fall back to "
            f"CPU (slow). Attach a torch wheel built for {sm} (README: 'A GPU that the image's "
            f"torch cannot run') or pick the T4 accelerator.")
        return "cpu"
    wheels = sorted(str(p) for p in torch_dirs[0].glob("*.whl"))
    log(f"GPU: installing {', '.join(Path(w).name for w in wheels)} from {torch_dirs[0]}")
    pip_install(torch_dirs[0], wheels, runner=runner)
    after = probe() or {}
    if "error" not in after and after.get("available") and arch_supported(
            after.get("capability", cap), after.get("arch_list", [])):
        log(f"GPU: torch {after['torch']} supports {sm}: using the GPU")
        return "cuda"
    log(f"GPU: the attached torch ({after.get('torch', after.get('error', '?'))}) still cannot "
        f"run on {sm}: inference will fall back to CPU. Rebuild the torch dataset (README).")
    return "cpu"


def bootstrap(input_root: str | os.PathLike | None = None, *, gpu_check: bool = True,
              probe: Probe = probe_torch, runner: Runner = _run,
              log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Install the bundle offline and check the GPU; see the module docstring.

    Args:
        input_root: where datasets are mounted (default ``$BYU_KAGGLE_INPUT`` or /kaggle/input).
        gpu_check: also run :func:`check_torch_gpu`.
        probe: torch/GPU inspector (tests pass a fake).
        runner: runs a command and returns a CompletedProcess (tests pass a fake).
        log: where the report lines go.

    Returns:
        ``{"status": "installed" | "off-kaggle", "wheels_dir", "installed": {name: version},
        "device"}``.

    Raises:
        BootstrapError: on Kaggle but no wheels dataset is attached, or the install failed.
    """
    root = Path(input_root or os.environ.get(INPUT_ROOT_ENV) or DEFAULT_INPUT_ROOT)
    if not root.is_dir():
        log(f"{root} does not exist: not on Kaggle, nothing installed (use the local kernel_lib)")
        return {"status": "off-kaggle", "wheels_dir": None, "installed": {}, "device": None}
    found = find_wheels_dirs(root)
    if not found:
        attached = ", ".join(str(d.relative_to(root)) for d in dataset_dirs(root)) or "none"
        raise BootstrapError(
            f"no {BUNDLE} dataset (a folder with {MANIFEST_NAME}) under {root}/*/ or "
            f"{root}/datasets/*/*/; attached: {attached}. Add the wheels dataset to the "
            f"notebook (kernel-metadata.json dataset_sources) and run again.")
    wheels_dir = found[0]
    if len(found) > 1:
        log(f"several wheels datasets attached, using {wheels_dir} (others: "
            f"{', '.join(map(str, found[1:]))})")
    manifest = read_manifest(wheels_dir)
    requirements = list(manifest["install"])
    log(f"installing offline from {wheels_dir}: {' '.join(requirements)}")
    pip_install(wheels_dir, requirements, runner=runner)
    installed: dict[str, str] = {}
    for requirement in requirements:
        name, _, wanted = requirement.partition("==")
        have = installed_version(name)
        if have != wanted:
            raise BootstrapError(f"after installing {requirement} Python sees {name} {have}: "
                                 f"restart the kernel and run this cell first")
        installed[name] = have
    log("installed: " + ", ".join(f"{n} {v}" for n, v in installed.items()))
    device = check_torch_gpu(root, probe=probe, runner=runner, log=log) if gpu_check else None
    return {"status": "installed", "wheels_dir": str(wheels_dir), "installed": installed,
            "device": device}


def main(argv: Sequence[str] | None = None) -> int:
    """Shell entry point; exit status 0 on success or off Kaggle, 1 on an install failure."""
    parser = argparse.ArgumentParser(description="Install the BYU motor wheels bundle offline.")
    parser.add_argument("--input-root", default=None,
                        help=f"datasets root (default ${INPUT_ROOT_ENV} or {DEFAULT_INPUT_ROOT})")
    parser.add_argument("--no-gpu-check", action="store_true", help="skip the torch/GPU check")
    args = parser.parse_args(argv)
    try:
        bootstrap(args.input_root, gpu_check=not args.no_gpu_check)
    except BootstrapError as exc:
        _log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
