"""The built wheel works outside the checkout, and the core needs no engine (issue 15, items 1 and 4).

Both run in fresh virtualenvs that see the project's dependencies through a
``.pth`` file instead of installing them again (a few seconds instead of
minutes): the wheel's venv sees all of them, the core's venv all but Apache
Beam (and PyFlink), so an import of the engine there fails as it would on a
machine that never installed it.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import redis

from onboardflow.runners.sim.generator import GeneratorConfig, JourneyGenerator

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])
ENGINES = ("apache_beam", "pyflink")
#: The engine-free core: every module under these folders must import without an engine.
CORE_FOLDERS = ("transforms", "models", "schemas", "runners/sim")
CORE_MODULES = ("runners/paths.py",)


def _venv(path: Path, *pth_lines: str) -> Path:
    """A fresh virtualenv at ``path`` whose site-packages also lists ``pth_lines``; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "onboardflow-test-deps.pth").write_text("".join(f"{line}\n" for line in pth_lines))
    return python


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    had_build_dir = (ROOT / "build").exists()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True, timeout=600, cwd=ROOT)
    if not had_build_dir:  # setuptools builds in the source tree; leave it as it was
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    (built,) = out.glob("onboardflow-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (no checkout on its path); returns the venv."""
    venv = tmp_path_factory.mktemp("wheel-venv")
    python = _venv(venv, str(SITE_PACKAGES))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                    str(wheel)], check=True, timeout=300)
    return venv


def test_the_wheel_holds_the_package_data_and_no_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("onboardflow/schemas/onboarding_event.v1.avsc", "onboardflow/pipelines/segment_rules.yaml",
                     "onboardflow/pipelines/onboarding_tracks.yaml", "onboardflow/runners/cli/__main__.py",
                     # Read by the pipeline on either engine (profiles' experiments) and by the API.
                     "onboardflow/pipelines/experiments.yaml",
                     # The personalization API: its steps catalogue, operator page and typed client.
                     "onboardflow/pipelines/onboarding_steps.yaml", "onboardflow/runners/api/static/operator.html",
                     "onboardflow/runners/api/static/operator.js", "onboardflow/client.py"):
        assert expected in names
    assert any(n.startswith("onboardflow/schemas/warehouse/") and n.endswith(".sql") for n in names)
    assert not [n for n in names if n.startswith(("onboardflow/tests/", "tests/"))]


def test_the_installed_wheel_imports_from_its_venv_and_prints_the_run_options(installed, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OBF_CACHE_DIR", "OBF_RUN_DIR")}
    where = subprocess.run([str(installed / "bin" / "python"), "-c",
                            "import onboardflow.runners.paths as p; print(p.__file__); print(p.checkout_root())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=True)
    module_file, checkout = where.stdout.split()
    assert module_file.startswith(str(installed)), module_file
    assert checkout == "None"
    helped = subprocess.run([str(installed / "bin" / "onboardflow"), "run", "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "--kafka_bootstrap_servers" in helped.stdout or "--kafka-bootstrap-servers" in helped.stdout


def test_a_bounded_pipeline_run_from_the_installed_wheel(installed, tmp_path, kafka_bootstrap, kafka_topic,
                                                         redis_url, redis_key_prefix, pg_dsn, warehouse_schema,
                                                         unique_name):
    from onboardflow.runners.cli.produce import produce

    topic = kafka_topic(partitions=2)
    messages = list(JourneyGenerator(GeneratorConfig(users=20, seed=5)).messages())
    stats = produce(messages, kafka_bootstrap, topic, progress=False)
    assert stats.ok
    # Prism comes from the checkout's cache (OBF_CACHE_DIR, the one setting); run files go to a temp dir.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OBF_CACHE_DIR=str(ROOT / ".cache"), OBF_RUN_DIR=str(tmp_path / "run"))
    result = subprocess.run(
        [str(installed / "bin" / "onboardflow"), "run", "--demo_mode",
         f"--kafka_bootstrap_servers={kafka_bootstrap}", f"--kafka_topics={topic}", "--kafka_bounded",
         "--kafka_start_position=earliest", f"--kafka_consumer_group={unique_name}",
         f"--redis_url={redis_url}", f"--redis_key_prefix={redis_key_prefix}",
         f"--warehouse_dsn={pg_dsn}", f"--warehouse_schema={warehouse_schema}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    client = redis.Redis.from_url(redis_url)
    try:
        profiles = list(client.scan_iter(match=f"{redis_key_prefix}:profile:*", count=1000))
    finally:
        client.close()
    assert len(profiles) >= 20
    installed_files = {p.name for p in (installed / "lib").rglob("*")}
    assert ".run" not in installed_files and "demo" not in installed_files


def _core_modules() -> list[str]:
    paths = [p for folder in CORE_FOLDERS for p in (ROOT / folder).rglob("*.py")]
    paths += [ROOT / m for m in CORE_MODULES]
    return sorted("onboardflow." + ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in paths)


def test_the_core_imports_and_runs_in_a_virtualenv_without_beam(tmp_path):
    # The dependencies without the engines, and the checkout as the onboardflow package.
    deps = tmp_path / "deps"
    deps.mkdir()
    for entry in SITE_PACKAGES.iterdir():
        if entry.name.startswith(ENGINES) or entry.name.startswith(("__editable__", "onboardflow")):
            continue
        (deps / entry.name).symlink_to(entry)
    package_root = tmp_path / "package"
    package_root.mkdir()
    (package_root / "onboardflow").symlink_to(ROOT)
    python = _venv(tmp_path / "venv", str(package_root), str(deps))
    modules = _core_modules()
    assert len(modules) > 30
    script = textwrap.dedent(f"""
        import importlib, sys
        for engine in {ENGINES!r}:
            try:
                importlib.import_module(engine)
            except ModuleNotFoundError:
                pass
            else:
                raise SystemExit(engine + " is importable: the test environment is wrong")
        for name in {modules!r}:
            importlib.import_module(name)
        assert not [m for m in sys.modules if m.split(".")[0] in {ENGINES!r}]
        print(len({modules!r}))
    """)
    result = subprocess.run([str(python), "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == str(len(modules))
