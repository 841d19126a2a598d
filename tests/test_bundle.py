"""The offline bundle in wheels/: current, flat, installable the way the Kaggle kernel installs it.

* the committed files match MANIFEST.json and the kernel_lib wheel holds today's kernel_lib/;
* byu_bootstrap.py finds the bundle in both Kaggle mount layouts, is a no-op off Kaggle, and
  handles a GPU that the image's torch cannot run (simulated capability);
* end to end: a fresh virtual environment that sees the already-installed torch (as Kaggle's
  image does) but neither kernel_lib nor timm runs the notebook's bootstrap cell, which installs
  with ``pip install --no-index --find-links ... --no-deps``, then runs one tiny inference.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

import kernel_lib

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "wheels"
MANIFEST = WHEELS / "MANIFEST.json"
NOTEBOOK = REPO / "notebooks" / "04_submission.ipynb"
REBUILD = "wheels/ is stale: run `make wheels` and commit wheels/"
METADATA_FILES = {"MANIFEST.json", "dataset-metadata.json"}



def documented_cell() -> str:
    """The notebook cell that byu_bootstrap.py's docstring documents (used until the notebook
    exists, and by the off-Kaggle check)."""
    doc = (WHEELS / "byu_bootstrap.py").read_text().split('"""')[1]
    block = doc.split("Notebook cell (no ``def`` needed)::\n\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return textwrap.dedent("\n".join(lines)).strip() + "\n"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_manifest() -> dict:
    assert MANIFEST.is_file(), f"{MANIFEST} is missing: {REBUILD}"
    return json.loads(MANIFEST.read_text())


def kernel_lib_wheel(manifest: dict) -> Path:
    names = [f["name"] for f in manifest["files"] if f.get("package") == "kernel_lib"]
    assert len(names) == 1, f"manifest lists {len(names)} kernel_lib wheels: {REBUILD}"
    return WHEELS / names[0]


@pytest.fixture()
def boot(monkeypatch) -> ModuleType:
    """wheels/byu_bootstrap.py as a module (no __pycache__ written into wheels/)."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    spec = importlib.util.spec_from_file_location("byu_bootstrap_under_test",
                                                  WHEELS / "byu_bootstrap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the committed bundle is current ----------------------------------------------------------

def test_wheels_folder_matches_manifest():
    manifest = load_manifest()
    assert manifest["bundle"] == "byu-motor-wheels"
    listed = {f["name"]: f for f in manifest["files"]}
    present = {p.name for p in WHEELS.iterdir() if p.name != "__pycache__"}
    assert present - METADATA_FILES == set(listed), (
        f"files in wheels/ {sorted(present)} differ from MANIFEST.json {sorted(listed)}: {REBUILD}")
    assert METADATA_FILES <= present, f"wheels/ lacks {METADATA_FILES - present}: {REBUILD}"
    for name, entry in listed.items():
        path = WHEELS / name
        assert path.is_file(), f"{path} is not a plain file: the dataset must stay flat"
        assert path.stat().st_size == entry["size"], f"{name} size changed: {REBUILD}"
        assert sha256(path) == entry["sha256"], f"{name} sha256 differs from MANIFEST: {REBUILD}"
    assert "byu_bootstrap.py" in listed


def test_manifest_install_list_matches_wheels_and_pins():
    manifest = load_manifest()
    wheels = {f["package"]: f for f in manifest["files"] if f["name"].endswith(".whl")}
    assert manifest["install"] == [f"{p}=={w['version']}" for p, w in wheels.items()]
    assert {"kernel_lib", "timm"} <= set(wheels), f"kernel_lib and timm must be bundled: {REBUILD}"
    assert not {"torch", "torchvision", "torchaudio"} & set(wheels), "never bundle torch"
    pins = {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in
            re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "requirements.txt").read_text(), re.M)}
    for package, wheel in wheels.items():
        want = kernel_lib.__version__ if package == "kernel_lib" else pins.get(
            re.sub(r"[-_.]+", "-", package).lower())
        assert wheel["version"] == want, (
            f"wheels/ holds {package} {wheel['version']}, the pin (requirements.txt or "
            f"kernel_lib.__version__) is {want}: {REBUILD}")
        assert wheel["name"].endswith(("-py3-none-any.whl", "x86_64.whl")), wheel["name"]
    assert manifest["target"]["python_version"] == "3.12"


def test_kernel_lib_wheel_is_built_from_this_code():
    wheel = kernel_lib_wheel(load_manifest())
    with zipfile.ZipFile(wheel) as archive:
        packed = {name: hashlib.sha256(archive.read(name)).hexdigest()
                  for name in archive.namelist()
                  if name.startswith("kernel_lib/") and name.endswith(".py")}
    here = {path.relative_to(REPO).as_posix(): sha256(path)
            for path in (REPO / "kernel_lib").rglob("*.py") if "__pycache__" not in path.parts}
    missing, extra = sorted(set(here) - set(packed)), sorted(set(packed) - set(here))
    changed = sorted(n for n in set(here) & set(packed) if here[n] != packed[n])
    assert not (missing or extra or changed), (
        f"{wheel.name} is not built from the code in kernel_lib/ (not in the wheel: {missing}; "
        f"only in the wheel: {extra}; changed: {changed}): {REBUILD}")


def test_dataset_metadata_names_the_wheels_dataset():
    meta = json.loads((WHEELS / "dataset-metadata.json").read_text())
    kernel = json.loads((REPO / "kernel-metadata.json").read_text())
    assert meta["id"].endswith("/byu-motor-wheels")
    assert meta["id"] in kernel["dataset_sources"], (
        "wheels/dataset-metadata.json and kernel-metadata.json name different owners: run "
        "`make kernel-metadata OWNER=you`")
    assert 6 <= len(meta["title"]) <= 50 and meta["licenses"]


def test_build_script_rebuilds_offline(tmp_path):
    """`make wheels` works without the internet (timm reused) and packs today's kernel_lib."""
    out = tmp_path / "wheels"
    shutil.copytree(WHEELS, out, ignore=shutil.ignore_patterns("__pycache__"))
    (out / "stale-0.1-py3-none-any.whl").write_bytes(b"old")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "build_wheels.py"),
                             "--out", str(out)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PIP_NO_INDEX": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    fresh, committed = json.loads((out / "MANIFEST.json").read_text()), load_manifest()
    assert fresh["install"] == committed["install"]
    assert not (out / "stale-0.1-py3-none-any.whl").exists()
    same = {f["name"]: f["sha256"] for f in fresh["files"] if f.get("package") != "kernel_lib"}
    assert same == {f["name"]: f["sha256"] for f in committed["files"]
                    if f.get("package") != "kernel_lib"}
    with zipfile.ZipFile(out / kernel_lib_wheel(fresh).name) as archive:
        dates = {info.date_time[:3] for info in archive.infolist()}
        packed = {n for n in archive.namelist() if n.endswith(".py")}
    assert dates == {(1980, 1, 1)}, "SOURCE_DATE_EPOCH is not applied: builds are not repeatable"
    assert packed == {p.relative_to(REPO).as_posix() for p in (REPO / "kernel_lib").glob("*.py")}


# ---- the bootstrap, without pip -----------------------------------------------------------------

def fake_input(root: Path, layout: str) -> Path:
    """A /kaggle/input-like folder with the competition and the wheels dataset."""
    (root / "competitions" / "byu-locating-bacterial-flagellar-motors-2025" / "test").mkdir(
        parents=True)
    (root / "unrelated-dataset").mkdir()
    target = root / ("byu-motor-wheels" if layout == "flat" else
                     "datasets/someone/byu-motor-wheels")
    shutil.copytree(WHEELS, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


class FakeRunner:
    """Records commands; answers like a successful pip."""

    def __init__(self):
        self.commands: list[list[str]] = []

    def __call__(self, cmd):
        self.commands.append(list(cmd))
        return SimpleNamespace(returncode=0, stdout="Successfully installed", stderr="")


@pytest.mark.parametrize("layout", ["flat", "datasets"])
def test_bootstrap_finds_and_installs_bundle(boot, tmp_path, monkeypatch, layout):
    wheels_dir = fake_input(tmp_path, layout)
    runner, lines = FakeRunner(), []
    versions = {"kernel_lib": kernel_lib.__version__, "timm": "1.0.31"}
    monkeypatch.setattr(boot, "installed_version", versions.get)
    report = boot.bootstrap(tmp_path, gpu_check=False, runner=runner, log=lines.append)
    assert report["status"] == "installed" and Path(report["wheels_dir"]) == wheels_dir
    assert report["installed"] == versions
    (cmd,) = runner.commands
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"]
    for flag in ("--no-index", "--no-deps"):
        assert flag in cmd
    assert cmd[cmd.index("--find-links") + 1] == str(wheels_dir)
    assert cmd[-2:] == load_manifest()["install"]
    assert any("installed: kernel_lib" in line for line in lines), lines


def test_bootstrap_is_a_reported_noop_off_kaggle(boot, tmp_path):
    runner, lines = FakeRunner(), []
    report = boot.bootstrap(tmp_path / "no-kaggle-input", runner=runner, log=lines.append)
    assert report["status"] == "off-kaggle" and not runner.commands
    assert "not on Kaggle" in lines[0]


def test_bootstrap_says_what_it_could_not_find(boot, tmp_path):
    (tmp_path / "some-other-dataset").mkdir()
    with pytest.raises(boot.BootstrapError, match="no byu-motor-wheels dataset.*"
                                                  "some-other-dataset"):
        boot.bootstrap(tmp_path, runner=FakeRunner(), log=lambda _: None)


def test_bootstrap_reports_version_mismatch(boot, tmp_path, monkeypatch):
    fake_input(tmp_path, "flat")
    monkeypatch.setattr(boot, "installed_version", lambda name: "0.0.1")
    with pytest.raises(boot.BootstrapError, match="Python sees kernel_lib 0.0.1"):
        boot.bootstrap(tmp_path, gpu_check=False, runner=FakeRunner(), log=lambda _: None)


def test_bootstrap_surfaces_pip_failure(boot, tmp_path):
    fake_input(tmp_path, "flat")

    def failing(cmd):
        return SimpleNamespace(returncode=1, stdout="", stderr="ERROR: No matching distribution")

    with pytest.raises(boot.BootstrapError, match="No matching distribution"):
        boot.bootstrap(tmp_path, gpu_check=False, runner=failing, log=lambda _: None)


P100 = {"torch": "2.10.0+cu128", "cuda": "12.8", "available": True, "name": "Tesla P100-PCIE-16GB",
        "capability": [6, 0], "arch_list": ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100",
                                            "sm_120"]}
P100_FIXED = {**P100, "torch": "2.10.0+cu126",
              "arch_list": ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]}
T4 = {**P100, "name": "Tesla T4", "capability": [7, 5]}


def test_gpu_check_accepts_t4(boot, tmp_path):
    lines = []
    assert boot.check_torch_gpu(tmp_path, probe=lambda: T4, runner=FakeRunner(),
                                log=lines.append) == "cuda"
    assert "sm_75" in lines[0] and "supported" in lines[0]


def test_gpu_check_p100_without_torch_dataset_falls_back_to_cpu(boot, tmp_path):
    runner, lines = FakeRunner(), []
    assert boot.check_torch_gpu(tmp_path, probe=lambda: P100, runner=runner,
                                log=lines.append) == "cpu"
    assert not runner.commands
    text = "\n".join(lines)
    assert "sm_60" in text and "NOT supported" in text and "fall back to CPU" in text


@pytest.mark.parametrize("layout", ["torch-for-p100", "datasets/someone/torch-for-p100"])
def test_gpu_check_p100_installs_attached_torch(boot, tmp_path, layout):
    torch_dir = tmp_path / layout
    torch_dir.mkdir(parents=True)
    for name in ("torch-2.10.0+cu126-cp312-cp312-manylinux_2_28_x86_64.whl",
                 "torchvision-0.25.0+cu126-cp312-cp312-manylinux_2_28_x86_64.whl"):
        (torch_dir / name).write_bytes(b"")
    probes = iter([P100, P100_FIXED])
    runner, lines = FakeRunner(), []
    assert boot.check_torch_gpu(tmp_path, probe=lambda: next(probes), runner=runner,
                                log=lines.append) == "cuda"
    (cmd,) = runner.commands
    assert cmd[cmd.index("--find-links") + 1] == str(torch_dir) and "--no-index" in cmd
    assert [Path(a).name.split("-")[0] for a in cmd if a.endswith(".whl")] == ["torch",
                                                                              "torchvision"]
    assert "supports sm_60" in lines[-1]


def test_gpu_check_p100_with_useless_torch_wheel_falls_back(boot, tmp_path):
    (tmp_path / "wrong-torch").mkdir()
    (tmp_path / "wrong-torch" / "torch-2.10.0-cp312-cp312-manylinux_2_28_x86_64.whl").touch()
    lines = []
    assert boot.check_torch_gpu(tmp_path, probe=lambda: P100, runner=FakeRunner(),
                                log=lines.append) == "cpu"
    assert "still cannot run on sm_60" in lines[-1]


def test_gpu_check_without_gpu(boot, tmp_path):
    lines = []
    assert boot.check_torch_gpu(tmp_path, probe=lambda: None, log=lines.append) == "cpu"
    assert "no NVIDIA GPU" in lines[0]


# ---- end to end: install into a fresh environment like Kaggle's image -------------------------

HIDDEN = re.compile(r"^(kernel_lib|timm)([-.].*)?$|^__editable__|\.pth$", re.I)


def fresh_env_with_image_packages(tmp_path: Path) -> Path:
    """A venv that sees this environment's packages (torch, numpy, pip...) except kernel_lib and
    timm, the way Kaggle's image has torch installed but not our bundle. Returns its python."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    image = tmp_path / "image-site-packages"  # symlinks: a filtered view of our site-packages
    image.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not HIDDEN.search(entry.name):
            (image / entry.name).symlink_to(entry)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True)
    Path(site.stdout.strip(), "image.pth").write_text(f"{image}\n")
    return python


def run_in(python: Path, code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    clean.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PYTHONDONTWRITEBYTECODE="1", **env)
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=clean, timeout=180)


def bootstrap_cell() -> str:
    """The notebook's bootstrap cell, or the documented one while the notebook is missing."""
    if not NOTEBOOK.is_file():
        return documented_cell()
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    sources = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
               for c in cells]
    first_import = next((i for i, s in enumerate(sources) if "kernel_lib" in s), len(sources))
    boot_cells = [i for i, s in enumerate(sources) if "byu_bootstrap.py" in s]
    assert boot_cells and boot_cells[0] < first_import, (
        f"{NOTEBOOK}: a cell that runs byu_bootstrap.py must come before the first use of "
        f"kernel_lib (see wheels/byu_bootstrap.py for the cell)")
    return sources[boot_cells[0]]


INFERENCE = """
import json, torch, kernel_lib, timm
from kernel_lib.config import PipelineConfig
from kernel_lib.model import build_model
cfg = PipelineConfig()  # the default encoder, from the bundled timm
torch.manual_seed(0)
model = build_model(cfg).eval()
with torch.inference_mode():
    logits = model(torch.rand(1, cfg.in_chans, 64, 64))
print("RESULT " + json.dumps({"kernel_lib": kernel_lib.__file__, "timm": timm.__file__,
      "torch": torch.__file__, "shape": list(logits.shape), "stride": cfg.output_stride,
      "finite": bool(torch.isfinite(logits).all())}))
"""


@pytest.mark.slow
def test_bundle_installs_offline_into_fresh_env_and_infers(tmp_path):
    if importlib.util.find_spec("kernel_lib.model") is None:
        pytest.skip("kernel_lib.model is not written yet (contract: build_model(cfg))")
    python = fresh_env_with_image_packages(tmp_path)
    probe = run_in(python, "import importlib.util as u; print([u.find_spec(n) is None for n in "
                   "('kernel_lib', 'timm', 'torch')])", tmp_path)
    assert probe.stdout.strip() == "[True, True, False]", (
        f"the fresh env must see torch but not kernel_lib/timm before the install: "
        f"{probe.stdout}{probe.stderr}")
    root = tmp_path / "input"
    fake_input(root, "datasets")
    result = run_in(python, bootstrap_cell() + INFERENCE, tmp_path, BYU_KAGGLE_INPUT=str(root))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "installed: kernel_lib " + kernel_lib.__version__ in result.stdout, result.stdout
    report = json.loads(result.stdout.split("RESULT ", 1)[1])
    venv = tmp_path / "venv"
    for name in ("kernel_lib", "timm"):
        assert Path(report[name]).is_relative_to(venv), f"{name} imported from {report[name]}"
    assert not Path(report["torch"]).is_relative_to(venv), "torch must be the image's"
    side = 64 // report["stride"]
    assert report["shape"] == [1, 1, side, side] and report["finite"]


@pytest.mark.parametrize("cell", ["documented", "notebook"])
def test_bootstrap_cell_is_a_noop_off_kaggle(tmp_path, cell):
    if cell == "notebook" and not NOTEBOOK.is_file():
        pytest.skip(f"{NOTEBOOK} is not written yet")
    code = documented_cell() if cell == "documented" else bootstrap_cell()
    assert "runpy.run_path" in code and "byu_bootstrap.py" in code
    result = run_in(Path(sys.executable), code, tmp_path,
                    BYU_KAGGLE_INPUT=str(tmp_path / "absent"))
    assert result.returncode == 0, result.stderr
    assert "not on Kaggle" in result.stdout
