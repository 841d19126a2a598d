"""kernel_lib.kaggle_env: finding inputs in both Kaggle layouts, the GPU check (simulated
capabilities), the weights-dataset metadata command, and kernel-metadata.json's fields."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernel_lib import kaggle_env
from kernel_lib.kaggle_env import (COMPETITION_SLUG, WEIGHTS_DATASET, arch_supported, check_gpu,
                                   find_competition_root, find_dataset_dir, is_kaggle,
                                   working_dir, write_weights_metadata)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def off_kaggle(monkeypatch, tmp_path):
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.delenv(kaggle_env.INPUT_ROOT_ENV, raising=False)
    monkeypatch.setattr(kaggle_env, "KAGGLE_INPUT", tmp_path / "no-kaggle" / "input")
    monkeypatch.setattr(kaggle_env, "KAGGLE_WORKING", tmp_path / "no-kaggle" / "working")


# ---- environment and paths ----------------------------------------------------------------------

def test_is_kaggle(off_kaggle, monkeypatch):
    assert not is_kaggle()
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert is_kaggle()


@pytest.mark.parametrize("layout", ["{slug}", "competitions/{slug}"])
@pytest.mark.parametrize("marker", ["test", "sample_submission.csv"])
def test_find_competition_root_both_layouts(tmp_path, layout, marker):
    root = tmp_path / layout.format(slug=COMPETITION_SLUG)
    (root / "train").mkdir(parents=True)
    assert find_competition_root(input_root=tmp_path) is None  # no test/ nor sample_submission
    if marker == "test":
        (root / "test").mkdir()
    else:
        (root / marker).write_text("tomo_id,Motor axis 0,Motor axis 1,Motor axis 2\n")
    assert find_competition_root(input_root=tmp_path) == root


def test_find_competition_root_reads_env_root(tmp_path, monkeypatch):
    (tmp_path / COMPETITION_SLUG / "test").mkdir(parents=True)
    monkeypatch.setenv(kaggle_env.INPUT_ROOT_ENV, str(tmp_path))
    assert find_competition_root() == tmp_path / COMPETITION_SLUG
    assert find_competition_root(input_root=tmp_path / "elsewhere") is None


@pytest.mark.parametrize("layout", ["{slug}", "datasets/alice/{slug}"])
def test_find_dataset_dir_both_layouts(tmp_path, layout):
    folder = tmp_path / layout.format(slug=WEIGHTS_DATASET)
    folder.mkdir(parents=True)
    assert find_dataset_dir(WEIGHTS_DATASET, input_root=tmp_path) == folder
    assert find_dataset_dir("byu-motor-w*", input_root=tmp_path) == folder
    assert find_dataset_dir(f"alice/{WEIGHTS_DATASET}", input_root=tmp_path) == folder
    assert find_dataset_dir("missing-dataset", input_root=tmp_path) is None
    assert find_dataset_dir(WEIGHTS_DATASET, input_root=tmp_path, contains="model.pt") is None
    (folder / "model.pt").write_bytes(b"")
    assert find_dataset_dir("*", input_root=tmp_path, contains="model.pt") == folder


def test_find_dataset_dir_owner_must_match_in_datasets_layout(tmp_path):
    (tmp_path / "datasets" / "bob" / WEIGHTS_DATASET).mkdir(parents=True)
    assert find_dataset_dir(f"alice/{WEIGHTS_DATASET}", input_root=tmp_path) is None


def test_finders_return_none_off_kaggle(off_kaggle):
    assert find_competition_root() is None
    assert find_dataset_dir(WEIGHTS_DATASET) is None


def test_working_dir(off_kaggle, tmp_path, monkeypatch):
    assert working_dir(tmp_path / "out") == tmp_path / "out" and (tmp_path / "out").is_dir()
    kaggle_working = tmp_path / "kaggle" / "working"
    kaggle_working.mkdir(parents=True)
    monkeypatch.setattr(kaggle_env, "KAGGLE_WORKING", kaggle_working)
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert working_dir(tmp_path / "out") == kaggle_working


# ---- GPU check ----------------------------------------------------------------------------------

KAGGLE_2026_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
ARCH_CASES = [
    ((6, 0), KAGGLE_2026_ARCHS, False),  # P100 vs Kaggle's torch 2.10+cu128
    ((7, 5), KAGGLE_2026_ARCHS, True),  # T4
    ((6, 0), ["sm_50", "sm_60", "sm_70", "sm_75"], True),  # a cu126 build
    ((6, 1), ["sm_60"], True),  # same major, higher minor runs sm_60 cubins
    ((8, 9), ["sm_80", "sm_86", "sm_90"], True),
    ((8, 0), ["sm_86"], False),  # a lower minor cannot run sm_86 cubins
    ((12, 0), ["sm_90", "sm_100", "sm_120"], True),
    ((10, 0), ["sm_90", "compute_90"], True),  # PTX JIT
    ((7, 0), ["sm_90a", "compute_90"], False),
    ((7, 5), [], False),
]


@pytest.mark.parametrize("capability, archs, expected", ARCH_CASES)
def test_arch_supported(capability, archs, expected):
    assert arch_supported(capability, archs) is expected


def test_bootstrap_uses_the_same_arch_rule(monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    spec = importlib.util.spec_from_file_location("byu_bootstrap_rule",
                                                  REPO / "wheels" / "byu_bootstrap.py")
    boot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(boot)
    for capability, archs, expected in ARCH_CASES:
        assert boot.arch_supported(capability, archs) is expected, (capability, archs)


def simulate_gpu(monkeypatch, capability, archs, name="Tesla P100-PCIE-16GB", runs=None):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(archs))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(kaggle_env, "_cuda_runs", lambda: runs)


def test_check_gpu_p100_falls_back_to_cpu_with_one_message(monkeypatch):
    simulate_gpu(monkeypatch, (6, 0), KAGGLE_2026_ARCHS)
    lines = []
    assert check_gpu(log=lines.append) == torch.device("cpu")
    (line,) = lines
    for words in ("Tesla P100", "sm_60", "no kernel image", "Falling back to CPU", "sm_75"):
        assert words in line


def test_check_gpu_t4_uses_cuda(monkeypatch):
    simulate_gpu(monkeypatch, (7, 5), KAGGLE_2026_ARCHS, name="Tesla T4")
    lines = []
    assert check_gpu(log=lines.append) == torch.device("cuda")
    assert "Tesla T4" in lines[0]


def test_check_gpu_failed_test_op_falls_back(monkeypatch):
    simulate_gpu(monkeypatch, (7, 5), KAGGLE_2026_ARCHS, runs="CUDA error: out of memory")
    lines = []
    assert check_gpu(log=lines.append) == torch.device("cpu")
    assert "out of memory" in lines[0]


def test_check_gpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lines = []
    assert check_gpu(log=lines.append) == torch.device("cpu")
    assert "no CUDA GPU" in lines[0]


# ---- weights dataset metadata ------------------------------------------------------------------

def make_run(tmp_path: Path, files=("config.json", "model.pt")) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    for name in files:
        (run / name).write_bytes(b"{}")
    return run


def test_weights_metadata_writes_dataset_metadata(tmp_path, capsys):
    run = make_run(tmp_path)
    assert kaggle_env.main(["weights-metadata", str(run), "--owner", "alice"]) == 0
    meta = json.loads((run / "dataset-metadata.json").read_text())
    assert meta["id"] == f"alice/{WEIGHTS_DATASET}"
    assert 6 <= len(meta["title"]) <= 50 and meta["licenses"] == [{"name": "CC0-1.0"}]
    assert "kaggle datasets version -p" in capsys.readouterr().out


def test_weights_metadata_custom_slug(tmp_path):
    path = write_weights_metadata(make_run(tmp_path), "alice", slug="my-weights-v2",
                                  title="My weights v2")
    assert json.loads(path.read_text())["id"] == "alice/my-weights-v2"


@pytest.mark.parametrize("case, expected", [
    ("missing-dir", "does not exist"),
    ("no-checkpoint", "no model.pt"),
    ("no-config", "no config.json"),
    ("no-owner", "no owner"),
    ("placeholder-owner", "placeholder"),
    ("bad-slug", "slug 'Bad_Slug'"),
])
def test_weights_metadata_bad_input_exits_2(tmp_path, capsys, monkeypatch, case, expected):
    monkeypatch.delenv(kaggle_env.OWNER_ENV, raising=False)
    run = {"no-checkpoint": lambda: make_run(tmp_path, ["config.json"]),
           "no-config": lambda: make_run(tmp_path, ["model.pt"]),
           "missing-dir": lambda: tmp_path / "nope"}.get(case, lambda: make_run(tmp_path))()
    argv = ["weights-metadata", str(run)]
    argv += {"no-owner": [], "placeholder-owner": ["--owner", kaggle_env.OWNER_PLACEHOLDER],
             "bad-slug": ["--owner", "alice", "--slug", "Bad_Slug"]}.get(case, ["--owner", "a"])
    assert kaggle_env.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1
    if case in ("missing-dir", "no-checkpoint", "no-config"):
        assert str(run) in err
    assert not (tmp_path / "run" / "dataset-metadata.json").exists()


def test_weights_metadata_module_cli_reads_owner_env(tmp_path):
    run = make_run(tmp_path)
    result = subprocess.run([sys.executable, "-m", "kernel_lib.kaggle_env", "weights-metadata",
                             str(run)], capture_output=True, text=True, timeout=60,
                            env={"KAGGLE_USERNAME": "carol", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "dataset-metadata.json").read_text())["id"].startswith("carol/")
    bad = subprocess.run([sys.executable, "-m", "kernel_lib.kaggle_env", "weights-metadata",
                          str(tmp_path / "absent"), "--owner", "carol"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and str(tmp_path / "absent") in bad.stderr


def test_checkpoint_name_matches_the_engine():
    if importlib.util.find_spec("kernel_lib.model") is None:
        pytest.skip("kernel_lib.model is not written yet")
    from kernel_lib import model

    assert kaggle_env.CHECKPOINT_NAME == model.CHECKPOINT_NAME


# ---- kernel-metadata.json ------------------------------------------------------------------------

def test_kernel_metadata_fields():
    meta = json.loads((REPO / "kernel-metadata.json").read_text())
    owner = meta["id"].split("/")[0]
    assert meta["id"] == f"{owner}/{kaggle_env.KERNEL_SLUG}"
    assert meta["code_file"] == "notebooks/04_submission.ipynb"
    assert (meta["kernel_type"], meta["language"]) == ("notebook", "python")
    assert meta["enable_gpu"] is True and meta["enable_internet"] is False
    assert meta["machine_shape"] == "NvidiaTeslaT4" and meta["is_private"] is True
    assert meta.get("enable_tpu") is False
    assert meta["competition_sources"] == [COMPETITION_SLUG]
    assert meta["dataset_sources"] == [f"{owner}/{kaggle_env.WHEELS_DATASET}",
                                       f"{owner}/{WEIGHTS_DATASET}"]
    # the title must slugify to the id, or Kaggle creates a differently named kernel
    assert meta["title"].lower().replace(" ", "-") == kaggle_env.KERNEL_SLUG


def test_kernel_metadata_is_what_the_command_writes(tmp_path):
    """kernel-metadata.json comes from scripts/kaggle_metadata.py (owner from one place)."""
    committed = json.loads((REPO / "kernel-metadata.json").read_text())
    owner = committed["id"].split("/")[0]
    (tmp_path / "wheels").mkdir()
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "kaggle_metadata.py"),
                             "--out-dir", str(tmp_path), "--wheels-dir", str(tmp_path / "wheels")],
                            capture_output=True, text=True, timeout=60,
                            env={"KAGGLE_USERNAME": owner, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "kernel-metadata.json").read_text()) == committed
    wheels_meta = json.loads((tmp_path / "wheels" / "dataset-metadata.json").read_text())
    assert wheels_meta == json.loads((REPO / "wheels" / "dataset-metadata.json").read_text())
    no_owner = subprocess.run([sys.executable, str(REPO / "scripts" / "kaggle_metadata.py"),
                               "--out-dir", str(tmp_path)], capture_output=True, text=True,
                              timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert no_owner.returncode == 2 and "KAGGLE_USERNAME" in no_owner.stderr


def test_kernel_metadata_for_a_p100_with_a_torch_dataset(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "kaggle_metadata.py"),
                             "--owner", "alice", "--out-dir", str(tmp_path), "--wheels-dir",
                             str(tmp_path), "--machine-shape", "NvidiaTeslaP100",
                             "--extra-dataset", "alice/torch-p100"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "kernel-metadata.json").read_text())
    assert meta["machine_shape"] == "NvidiaTeslaP100" and meta["enable_internet"] is False
    assert meta["dataset_sources"][-1] == "alice/torch-p100"
