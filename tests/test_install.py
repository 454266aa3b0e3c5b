"""The installation checks: a foreign top-level ``core``, missing extras, the version, metadata.

Every check runs in a fresh interpreter (``subprocess``), because they are about what an import
does. Extras are "uninstalled" by a ``sys.meta_path`` finder that makes their modules fail to
import, exactly as a missing distribution does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: the optional modules each extra installs (with the libraries' own dependencies)
EXTRA_MODULES = {
    "captum": ["captum", "matplotlib"],
    "zennit": ["zennit", "torchvision"],
    "quantus": ["quantus", "matplotlib", "skimage", "sklearn", "scipy"],
}
ALL_OPTIONAL = sorted({m for mods in EXTRA_MODULES.values() for m in mods})

BLOCKER = """
import sys
for _name in {blocked!r}:
    sys.modules[_name] = None  # import raises ModuleNotFoundError, find_spec returns None
"""


def run(code: str, blocked: list[str] = (), pythonpath: list[Path] = (),
        cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with ``blocked`` modules made unimportable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in [*pythonpath, ROOT])
    env["PYTHONWARNINGS"] = "ignore"
    source = BLOCKER.format(blocked=sorted(blocked)) + code
    return subprocess.run([sys.executable, "-c", source], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


#: imports each package and runs the command line, printing {what: error line or "ok"}
PROBE = """
import contextlib, io, json
result = {}
for package in ("captum_split", "zennit_split", "quantus_adapters"):
    try:
        __import__(package)
        result[package] = "ok"
    except ImportError as exc:
        result[package] = f"{type(exc).__name__}: {exc}"
from splitxai.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    status = main(["benchmark", "--quick"] if RUN_BENCHMARK else ["--version"])
result["cli"] = [status, err.getvalue()]
print(json.dumps(result))
"""


def probe(blocked: list[str] = (), pythonpath: list[Path] = (), cwd: Path = ROOT,
          run_benchmark: bool = True, extra_code: str = "") -> dict:
    proc = run(f"RUN_BENCHMARK = {run_benchmark}\n" + PROBE + extra_code, blocked, pythonpath,
               cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_foreign_core_is_refused_naming_both_locations(tmp_path: Path):
    foreign = tmp_path / "other"
    (foreign / "core").mkdir(parents=True)
    (foreign / "core" / "__init__.py").write_text("VERSION = 'another distribution'\n")
    result = probe(pythonpath=[foreign], cwd=tmp_path)
    for package in ("captum_split", "zennit_split", "quantus_adapters"):
        line = result[package]
        assert line.startswith("ForeignCoreError: splitxai needs its own top-level package"), line
        assert str(foreign / "core" / "__init__.py") in line
        assert str(ROOT / "core") in line
        assert "virtual environment" in line
    status, stderr = result["cli"]
    assert status == 2
    assert stderr.startswith("splitxai: error: splitxai needs its own top-level package")
    assert str(foreign / "core" / "__init__.py") in stderr and len(stderr.splitlines()) == 1


def test_without_extras_the_core_works_and_each_adapter_names_its_pip_line():
    result = probe(
        blocked=ALL_OPTIONAL,
        extra_code="import torch, core\n"
                   "from core.zoo import resnet20\n"
                   "m = resnet20().eval(); x = torch.rand(1, 3, 32, 32)\n"
                   "g, h = core.split(m)(x)\n"
                   "assert torch.allclose(g - h, m(x), atol=1e-4)\n",
    )
    assert result["quantus_adapters"] == "ok"
    for package, extra in (("captum_split", "captum"), ("zennit_split", "zennit")):
        assert result[package].startswith("MissingExtraError: "), result[package]
        assert f'pip install "splitxai[{extra}]"' in result[package]
    status, stderr = result["cli"]
    assert status == 2
    assert stderr.startswith("splitxai: error: splitxai benchmark needs the optional")
    assert 'pip install "splitxai[benchmark]"' in stderr


@pytest.mark.parametrize("extra", ["captum", "zennit", "quantus"])
def test_a_single_extra(extra: str):
    """Only one extra's modules are importable: its package works, the others name theirs."""
    blocked = [m for m in ALL_OPTIONAL if m not in EXTRA_MODULES[extra]]
    checks = {
        "captum": "import torch\nfrom core.zoo import resnet20\n"
                  "from captum_split import SplitCAM\nm = resnet20().eval()\n"
                  "a = SplitCAM(m, m.layer3).attribute(torch.rand(1, 3, 32, 32), target=0)\n"
                  "assert a.shape == (1, 1, 8, 8)\n",
        "zennit": "import zennit.composites, zennit_split\n"
                  "assert zennit.composites.COMPOSITES['split_lrp'] is zennit_split.SplitLRP\n",
        "quantus": "import quantus\n",
    }
    result = probe(blocked=blocked, run_benchmark=True, extra_code=checks[extra])
    own = {"captum": "captum_split", "zennit": "zennit_split", "quantus": "quantus_adapters"}
    for package, name in (("captum_split", "captum"), ("zennit_split", "zennit")):
        if own[extra] == package:
            assert result[package] == "ok"
        else:
            assert f'pip install "splitxai[{name}]"' in result[package]
    assert result["quantus_adapters"] == "ok"
    assert 'pip install "splitxai[benchmark]"' in result["cli"][1]


def test_version_command_and_attribute():
    proc = run("from splitxai.cli import main; sys.exit(main(['--version']))")
    import splitxai

    assert proc.returncode == 0
    assert proc.stdout.strip() == f"splitxai {splitxai.__version__}"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_package_metadata_is_filled_in():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "BSD-3-Clause"
    assert {"Homepage", "Documentation", "Source", "Issues"} <= set(project["urls"])
    assert len(project["keywords"]) >= 5
    assert any(c.startswith("License") or c.startswith("Topic") for c in project["classifiers"])
    assert project["scripts"]["splitxai"] == "splitxai.cli:main"
    for extra in ("zennit", "captum", "quantus", "benchmark", "all", "test"):
        assert extra in project["optional-dependencies"]


def _has_build_backend() -> bool:
    """Whether this environment has setuptools >= 77 (pyproject's build requirement)."""
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.mark.parametrize("extras", ["", "[zennit]", "[captum]", "[quantus]", "[benchmark]"])
def test_pip_resolves_each_extra(extras: str):
    """``pip install --dry-run``: the distribution and each single extra resolve."""
    # the build backend from this environment when it has one (no download), else pip's own
    isolation = ["--no-build-isolation"] if _has_build_backend() else []
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", *isolation,
         "--report", "-", f".{extras}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    ours = [i for i in report["install"] if i["metadata"]["name"] == "splitxai"]
    assert len(ours) == 1
    requires = ours[0]["metadata"].get("requires_dist", [])
    name = extras.strip("[]")
    if name:
        assert any(f'extra == "{name}"' in r for r in requires), requires


def test_train_dc_out_has_a_default_like_benchmark(capsys):
    from quantus_adapters.cli import main

    with pytest.raises(SystemExit) as done:
        main(["train-dc", "--help"])
    assert done.value.code == 0
    assert "--out OUT output folder (default ./splitxai-train-dc)" in " ".join(
        capsys.readouterr().out.split())
