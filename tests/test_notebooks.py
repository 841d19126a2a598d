"""The numbered notebooks: committed form, parameter injection, and a headless end-to-end run.

The end-to-end run is ``python -m kernel_lib.main --quick`` in a temporary work folder: it
generates a tiny synthetic set and executes 01 -> 04 with small parameters, so one run checks the
main job and every notebook. The tests below then check what each notebook wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import polars as pl
import pytest

from kernel_lib import main as main_job
from kernel_lib import notebooks as nb
from kernel_lib import plots
from kernel_lib.kaggle_env import COMPETITION_SLUG
from kernel_lib.labels import read_sample_submission, read_submission
from kernel_lib.metric import load_solution, score

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = [ROOT / "notebooks" / name for name in nb.NOTEBOOKS]
MAIN_TIMEOUT_S = 600


# ---------------------------------------------------------------------------- committed form


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_is_clean_and_thin(path: Path) -> None:
    assert path.is_file(), f"{path} is missing"
    assert nb.notebook_problems(path) == []
    notebook = nbformat.read(path, as_version=4)
    assert "data_root" in nb.parameter_names(notebook)
    intro = notebook.cells[0].source.lower()
    for part in ("goal", "inputs", "outputs", "run time"):
        assert part in intro, f"{path.name}: the first cell does not say its {part}"


def test_submission_notebook_bootstraps_first_and_stays_short() -> None:
    notebook = nbformat.read(ROOT / "notebooks" / "04_submission.ipynb", as_version=4)
    assert len(notebook.cells) < 10
    first_code = next(c for c in notebook.cells if c.cell_type == "code")
    assert "byu_bootstrap.py" in first_code.source and "runpy" in first_code.source
    assert "import kernel_lib" not in first_code.source
    assert "from kernel_lib" not in first_code.source
    assert {"weights", "out"} <= set(nb.parameter_names(notebook))


def test_notebook_problems_reports_outputs_counts_and_defs(tmp_path: Path) -> None:
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("def f():\n    return 1", execution_count=3,
                                  outputs=[nbformat.v4.new_output("stream", text="x")])])
    path = tmp_path / "bad.ipynb"
    nbformat.write(notebook, path)
    problems = " | ".join(nb.notebook_problems(path))
    for expected in ("markdown", "parameters", "outputs", "execution count", "def f"):
        assert expected in problems
    assert nb.strip_notebook(path) is True
    assert not any("has outputs" in p or "execution count" in p for p in nb.notebook_problems(path))


# ---------------------------------------------------------------------------- parameters


def _parameterised() -> nbformat.NotebookNode:
    return nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# t"),
        nbformat.v4.new_code_cell("a = 1\nb: str = 'x'", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("print(a, b)"),
    ])


def test_inject_parameters_after_the_tagged_cell_and_replaces_old_injection() -> None:
    notebook = nb.inject_parameters(_parameterised(), {"a": Path("/d"), "b": (1,)})
    assert nb.parameter_names(notebook) == ["a", "b"]
    assert notebook.cells[2].metadata["tags"] == ["injected-parameters"]
    assert notebook.cells[2].source == "# Parameters\na = '/d'\nb = (1,)"
    notebook = nb.inject_parameters(notebook, {"a": [None, float("nan"), {"k": True}]})
    injected = [c for c in notebook.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    assert injected[0].source.endswith("a = [None, float('nan'), {'k': True}]")


def test_inject_parameters_refuses_unknown_names_and_untagged_notebooks() -> None:
    with pytest.raises(nb.NotebookError, match=r"unknown parameter.*\['c'\].*\['a', 'b'\]"):
        nb.inject_parameters(_parameterised(), {"c": 1})
    untagged = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("a = 1")])
    with pytest.raises(nb.NotebookError, match="no cell tagged 'parameters'"):
        nb.inject_parameters(untagged, {"a": 2})
    with pytest.raises(nb.NotebookError, match="Python literal"):
        nb.python_literal(object())


def test_execute_notebook_runs_parameters_and_names_the_failing_cell(tmp_path: Path) -> None:
    notebook = _parameterised()
    notebook.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)\n1 / a"))
    source = tmp_path / "t.ipynb"
    nbformat.write(notebook, source)
    done = nb.execute_notebook(source, tmp_path / "ok.ipynb", {"a": 2}, cwd=tmp_path)
    assert done.cells[3].outputs[0]["text"] == "2 x\n"
    assert sys.executable in done.cells[4].outputs[0]["text"]
    with pytest.raises(nb.NotebookError) as error:
        nb.execute_notebook(source, tmp_path / "failed.ipynb", {"a": 0}, cwd=tmp_path)
    message = str(error.value)
    assert "t.ipynb" in message and "cell 5/5" in message and "ZeroDivisionError" in message
    failed = nbformat.read(tmp_path / "failed.ipynb", as_version=4)
    assert failed.cells[4].outputs[-1]["output_type"] == "error"


# ---------------------------------------------------------------------------- paths and weights


def test_notebook_paths_given_missing_and_kaggle(tmp_path: Path, monkeypatch) -> None:
    paths = nb.notebook_paths(tmp_path, cache_dir=None, run_dir=tmp_path / "run")
    assert (paths.source, paths.run_dir) == ("given", tmp_path / "run")
    assert paths.cache_dir == tmp_path.parent / "cache"
    assert "submission" not in str(paths) and "cache_dir" in str(paths)
    with pytest.raises(nb.NotebookError, match="does not exist"):
        nb.notebook_paths(tmp_path / "missing")
    competition = tmp_path / "input" / "competitions" / COMPETITION_SLUG
    (competition / "test").mkdir(parents=True)
    monkeypatch.setenv("BYU_KAGGLE_INPUT", str(tmp_path / "input"))
    paths = nb.notebook_paths(None)
    assert (paths.data_root, paths.source) == (competition, "kaggle")


def test_synthetic_cache_is_keyed_by_the_data_set(tmp_path: Path) -> None:
    data = tmp_path / "synthetic"
    data.mkdir()
    (data / "synthetic.json").write_text('{"seed": 0}')
    first = nb.default_cache_dir(data, on_kaggle=False)
    (data / "synthetic.json").write_text('{"seed": 1}')
    assert first != nb.default_cache_dir(data, on_kaggle=False)
    assert first.parent == tmp_path / "cache"


def _fake_run(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.pt").write_bytes(b"")
    return folder


def test_find_weights_given_newest_local_and_attached(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BYU_KAGGLE_INPUT", str(tmp_path / "no-input"))
    old, new = _fake_run(tmp_path / "runs" / "a"), _fake_run(tmp_path / "runs" / "b" / "model")
    os.utime(old / "model.pt", (time.time() - 100, time.time() - 100))
    assert nb.find_weights(None, runs_root=tmp_path / "runs") == [new]
    assert nb.find_weights(str(old)) == [old]
    with pytest.raises(nb.NotebookError, match="not a run directory"):
        nb.find_weights([tmp_path])
    with pytest.raises(nb.NotebookError, match="no trained run"):
        nb.find_weights(None, runs_root=tmp_path / "empty")
    attached = _fake_run(tmp_path / "input" / "datasets" / "me" / "byu-motor-weights")
    other = _fake_run(tmp_path / "input" / "aaa-other-run")
    monkeypatch.setenv("BYU_KAGGLE_INPUT", str(tmp_path / "input"))
    assert nb.find_weights(None) == [attached, other]


def test_fold_index() -> None:
    assert nb.fold_index("all") == -1 and nb.fold_index(2) == 2 and nb.fold_index("1") == 1
    with pytest.raises(nb.NotebookError):
        nb.fold_index("first")


# ---------------------------------------------------------------------------- main job


@pytest.mark.parametrize("flags, message", [
    (["--n-train", "1"], "--n-train must be >= 2"),
    (["--quick", "--n-test", "0"], "--n-test must be >= 1"),
    (["--epochs", "0"], "--epochs and --steps-per-epoch"),
    (["--max-minutes", "-1"], "--max-minutes must be >= 0"),
    (["--seed", "-3"], "--seed must be >= 0"),
    (["--bogus"], "unrecognized arguments"),
])
def test_main_rejects_bad_flags_with_exit_2(flags, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main_job.main(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``python -m kernel_lib.main --quick`` in a temporary work folder (one run per module)."""
    workdir = tmp_path_factory.mktemp("main_quick")
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "kernel_lib.main", "--quick", "--quiet", "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=MAIN_TIMEOUT_S, cwd=ROOT)
    assert result.returncode == 0, f"main --quick failed:\n{result.stdout}\n{result.stderr}"
    runs = sorted((workdir / "runs").iterdir())
    assert len(runs) == 1
    summary = json.loads((runs[0] / "summary.json").read_text())
    return {"workdir": workdir, "run_root": runs[0], "stdout": result.stdout, "summary": summary,
            "data_root": Path(summary["data_root"]), "seconds": time.perf_counter() - started}


@pytest.mark.slow
def test_main_quick_prints_where_things_are_and_the_f2(quick_run: dict) -> None:
    out = quick_run["stdout"]
    assert f"executed notebooks: {quick_run['run_root'] / 'notebooks'}" in out
    assert "F2 against" in out
    assert 0.0 <= quick_run["summary"]["score"]["f2"] <= 1.0
    for name in nb.NOTEBOOKS:
        executed = nbformat.read(quick_run["run_root"] / "notebooks" / name, as_version=4)
        code = [c for c in executed.cells if c.cell_type == "code"]
        assert all(c.execution_count is not None for c in code), name
        assert not any(o["output_type"] == "error" for c in code for o in c.outputs), name
        assert any("injected-parameters" in c.metadata.get("tags", []) for c in code), name


@pytest.mark.slow
def test_eda_notebook_shows_figures(quick_run: dict) -> None:
    executed = nbformat.read(quick_run["run_root"] / "notebooks" / "01_eda.ipynb", as_version=4)
    images = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # label overview, slice montages, histograms, 2.5D stack


@pytest.mark.slow
def test_preprocess_notebook_wrote_the_cache_manifest(quick_run: dict) -> None:
    data_root = quick_run["data_root"]
    cache_root = nb.default_cache_dir(data_root, on_kaggle=False)
    manifests = list(cache_root.glob("prep_*/manifest.json"))
    assert len(manifests) == 1
    entries = json.loads(manifests[0].read_text())["entries"]
    train_ids = set(pl.read_csv(data_root / "train_labels.csv")["tomo_id"])
    assert train_ids <= {e["tomo_id"] for e in entries.values()}
    for entry in entries.values():
        assert (manifests[0].parent / entry["file"]).is_file()


@pytest.mark.slow
def test_train_notebook_wrote_checkpoint_and_config(quick_run: dict) -> None:
    run_dir = quick_run["run_root"] / "model"
    for name in ("model.pt", "config.json", "metrics.csv", "last.pt", "folds.csv"):
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["assumed_test_spacing"] > 0
    assert pl.read_csv(run_dir / "metrics.csv").height >= 1


@pytest.mark.slow
def test_submission_notebook_wrote_one_scoreable_row_per_test_tomogram(quick_run: dict) -> None:
    data_root = quick_run["data_root"]
    submission = read_submission(quick_run["run_root"] / "submission.csv")
    expected = read_sample_submission(data_root / "sample_submission.csv")
    assert sorted(submission["tomo_id"].to_list()) == sorted(expected)
    assert submission.height == len(expected)
    value = score(load_solution(data_root / "test_labels.csv", submission), submission)
    assert value == pytest.approx(quick_run["summary"]["score"]["f2"])


@pytest.mark.slow
def test_main_reuses_its_synthetic_set(quick_run: dict) -> None:
    args = main_job.build_parser().parse_args(["--quick", "--workdir", str(quick_run["workdir"])])
    budget = main_job.resolve_budget(args)
    folder = main_job.synthetic_dir(quick_run["workdir"], budget.n_train, budget.n_test, args.seed)
    assert folder == quick_run["data_root"]
    assert main_job.ensure_synthetic(folder, budget.n_train, budget.n_test, args.seed,
                                     progress=False) is True


# ---------------------------------------------------------------------------- tables and plots


def test_label_tables_on_the_real_labels(real_labels_path: Path) -> None:
    from kernel_lib.labels import read_labels

    labels = read_labels(real_labels_path)
    tables = nb.label_tables(labels)
    summary = dict(zip(tables["summary"]["statistic"], tables["summary"]["value"]))
    assert summary["tomograms"] == 648 and summary["under-reported (rows < motors)"] == 4
    per_spacing = tables["voxel_spacing"]
    assert per_spacing["tomograms"].sum() == 648
    assert per_spacing.filter(pl.col("voxel_spacing") == 16.1)["positive_rate"].item() == 0.0
    assert tables["motors_per_tomogram"]["tomograms"].sum() == 648
    fig = plots.plot_label_overview(labels)
    assert len(fig.axes) == 4 and len(plots.figure_png(fig)) > 1000


def _example(with_motor: bool = True) -> nb.Example:
    volume = np.random.default_rng(0).integers(0, 255, (20, 48, 40), dtype=np.uint8)
    motors = np.array([[10.0, 20.0, 20.0]]) if with_motor else np.zeros((0, 3))
    return nb.Example("tomo_x", volume, motors, 15.6)


def test_slice_viewer_static_montage_stack_and_histograms() -> None:
    from kernel_lib.config import PipelineConfig

    example = _example()
    fig = plots.slice_viewer(example, n_static=4, force_static=True)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert len(titles) == 4 and "z = 10, 1 motor" in titles
    stack, indices = nb.motor_stack(example, PipelineConfig(stack_half=1,
                                                            stack_step_angstrom=31.2))
    assert stack.shape == (3, 48, 40) and indices == [8, 10, 12]
    assert len(plots.plot_stack(stack, indices, example).axes) == 3
    assert len(plots.plot_intensity_histograms(example.volume, PipelineConfig(
        normalize_per="slice"), z=example.z).axes) == 4
    default = PipelineConfig()
    assert nb.motor_stack(_example(False), default)[1][default.stack_half] == 10  # middle slice


def test_slice_viewer_uses_a_slider_when_ipywidgets_is_there(monkeypatch) -> None:
    import types

    class Widget:
        def __init__(self, *children, **kwargs) -> None:
            self.children, self.kwargs, self.callbacks, self.shown = children, kwargs, [], 0

        def observe(self, callback, names) -> None:
            self.callbacks.append(callback)

        def clear_output(self, wait=False) -> None:
            self.shown += 1

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            return None

    fake = types.ModuleType("ipywidgets")
    fake.Output, fake.IntSlider, fake.VBox = Widget, Widget, lambda children: children
    monkeypatch.setitem(sys.modules, "ipywidgets", fake)
    slider, output = plots.slice_viewer(_example())
    assert slider.kwargs["value"] == 10 and slider.kwargs["max"] == 19
    slider.callbacks[0]({"new": 3})
    assert output.shown == 2  # the first slice, then slice 3


def test_run_plots_say_when_there_is_nothing_to_plot(tmp_path: Path) -> None:
    for figure in (plots.plot_training_curves(tmp_path), plots.plot_threshold_sweep(tmp_path),
                   plots.plot_validation_predictions(tmp_path, tmp_path),
                   plots.plot_verifier_effect(tmp_path, tmp_path)):
        assert figure.axes[0].texts, "expected a message instead of a chart"
    (tmp_path / "metrics.csv").write_text("epoch,step,train_loss\n1,10,0.5\n2,20,0.4\n")
    fig = plots.plot_training_curves(tmp_path)  # fold="all": a loss curve, no validation
    assert fig.axes[0].lines and "no validation" in fig.axes[1].texts[0].get_text()
