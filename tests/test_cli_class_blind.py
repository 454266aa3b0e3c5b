"""Class-blind Split maps in the command-line tools: collected during the run, reported once.

The tiny model of ``tests/benchmark_files.py`` is class-blind at layer ``1`` for alpha 0 (its
shift part is about 15 times its gradient part there) and not at alpha 0.4.
"""

import warnings

import pytest

import core
from quantus_adapters import class_blind
from quantus_adapters import cli as commands
from tests.benchmark_files import TINY_MODEL_PY, write_masked_folder

SUMMARY = "class-blind Split maps (SplitClassBlindWarning) at 1 alpha/layer pair(s)"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    (root / "tiny.py").write_text(TINY_MODEL_PY)
    write_masked_folder(root / "data", 6)
    return root, ["--model", f"{root / 'tiny.py'}:build", "--data", f"folder:{root / 'data'}",
                  "--no-progress", "--threads", "1"]


def test_collect_keeps_only_the_class_blind_warning():
    with warnings.catch_warnings(record=True) as outside:
        warnings.simplefilter("always")
        with class_blind.collect(0.3) as found:
            warnings.warn(core.SplitClassBlindWarning("blind", "conv", 12.5))
            warnings.warn("another note", UserWarning)
            warnings.warn(core.SplitClassBlindWarning("blind", "fc", 30.0))
    assert [str(w.message) for w in outside] == ["another note"]  # shown, not swallowed
    assert found == [class_blind.ClassBlind("conv", "0.3", 12.5),
                     class_blind.ClassBlind("fc", "0.3", 30.0)]
    text = class_blind.summary(found + [class_blind.ClassBlind("conv", "0.2", 40.0)])
    assert "3 alpha/layer pair(s): alpha 0.3 at 'conv', 'fc'; alpha 0.2 at 'conv'" in text
    assert "12.5 to 40 times" in text and "alpha='auto'" in text
    assert class_blind.summary([]) == ""


def _run(argv, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = commands.main(argv)
    printed = capsys.readouterr()
    escaped = [w for w in caught if issubclass(w.category, core.SplitClassBlindWarning)]
    return rc, printed, escaped


def test_benchmark_reports_class_blind_maps_once_at_the_end(tiny, capsys):
    root, common = tiny
    out = root / "bench"
    rc, printed, escaped = _run(["benchmark", *common, "--methods", "SplitCAM", "--layers", "1",
                                 "--alpha", "0", "--alphas", "0", "--metrics", "PF@20",
                                 "--no-figures", "--out", str(out)], capsys)
    assert rc == 0, printed.err
    assert not escaped  # no warning between the progress bars
    assert printed.err.count("warning: class-blind") == 1
    assert f"splitxai benchmark: warning: {SUMMARY}: alpha 0.0 at '1'" in printed.err
    report = (out / "report.md").read_text()
    assert "## Class-blind Split maps" in report and f"{SUMMARY}: alpha 0.0 at '1'" in report


def test_explain_reports_class_blind_maps_once_at_the_end(tiny, capsys):
    root, common = tiny
    rc, printed, escaped = _run(["explain", *common, "--methods", "SplitCAM", "--layers", "1",
                                 "--alpha", "0", "--batch-size", "2", "--out",
                                 str(root / "maps")], capsys)
    assert rc == 0, printed.err
    assert not escaped
    assert printed.err.count("warning: class-blind") == 1
    assert f"splitxai explain: warning: {SUMMARY}: alpha 0.0 at '1'" in printed.err


def test_max_sensitivity_of_two_picks_differing_in_abs_is_computed_once(tiny, tmp_path):
    """Two table-1 rows of one configuration (abs and not) share the Max Sensitivity cell
    (it always takes abs: same key, same numbers); it is computed by one job only."""
    import runpy

    from quantus_adapters.benchmark.data import load_folder
    from quantus_adapters.benchmark.protocol import MethodSpec, ProtocolSettings, configs_for
    from quantus_adapters.benchmark.runner import Benchmark, Row, map_in_order
    from quantus_adapters.benchmark.store import ResultStore

    root, _ = tiny
    model = runpy.run_path(str(root / "tiny.py"))["build"]()
    wanted = []

    def counting(fn, jobs):
        wanted.extend(metric for job in jobs for _, _, metric in job.cells)
        return map_in_order(fn, jobs)

    spec = MethodSpec("Occlusion", "Occlusion", {"window": 4, "stride": 2})
    settings = ProtocolSettings(max_sens_samples=2, max_sens_images=2,
                                metrics=("PF@5", "MaxSens"))
    bench = Benchmark(model, load_folder(root / "data"), [spec], [],
                      ResultStore(tmp_path / "store"), settings, progress=False,
                      log=lambda line: None, map_jobs=counting)
    config = configs_for(spec, [])[0]
    rows = [Row(config, False, "localisation"), Row(config, True, "pixel flipping")]
    bench.test(rows)
    assert sorted(wanted) == ["MaxSens", "PF@5", "PF@5"]
    assert rows[0].records["MaxSens"] == rows[1].records["MaxSens"]
    assert rows[0].records["PF@5"]["scores"] != rows[1].records["PF@5"]["scores"]
