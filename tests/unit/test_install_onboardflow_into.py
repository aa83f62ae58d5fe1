"""``install_onboardflow_into`` (runners/services/env.sh): onboardflow into another virtualenv, only when needed.

Used by runners/flink/flink.sh (the Flink virtualenv) and
tests/benchmarks/quix_venv.sh (the benchmark's Quix virtualenv). The
virtualenv's python is a stub here that records how it was called.
"""
import hashlib
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _venv(tmp_path: Path) -> tuple[Path, Path]:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "calls"
    python = venv / "bin" / "python"
    python.write_text(f'#!/usr/bin/env bash\necho "$*" >>"{calls}"\n')
    python.chmod(0o755)
    return venv, calls


def _install(venv: Path, constraints: Path) -> subprocess.CompletedProcess:
    script = (f'source "{ROOT}/runners/services/env.sh"; '
              f'install_onboardflow_into "{venv}" "{constraints}" onboardflow.pipelines.flink.store')
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={
        "PATH": "/usr/bin:/bin", "OBF_ROOT": str(ROOT)})


def test_it_installs_editable_under_the_constraints_then_checks_the_import(tmp_path):
    venv, calls = _venv(tmp_path)
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("numpy<2.2\n")
    done = _install(venv, constraints)
    assert done.returncode == 0, done.stderr
    assert calls.read_text().splitlines() == [
        f"-m pip install -q -c {constraints} -e {ROOT}",
        "-c import onboardflow.pipelines.flink.store",
    ]


def test_the_stamp_is_the_one_flink_sh_always_wrote_so_existing_virtualenvs_are_kept(tmp_path):
    venv, _ = _venv(tmp_path)
    constraints = ROOT / "runners/flink/constraints.txt"
    assert _install(venv, constraints).returncode == 0
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + constraints.read_bytes()
                            + f"{ROOT}\n".encode()).hexdigest()[:16]
    assert (venv / ".installed-onboardflow").read_text().strip() == digest


def test_nothing_is_redone_until_the_constraints_change(tmp_path):
    venv, calls = _venv(tmp_path)
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("numpy<2.2\n")
    _install(venv, constraints)
    calls.unlink()
    assert _install(venv, constraints).returncode == 0
    assert not calls.exists()
    constraints.write_text("numpy<2.3\n")
    assert _install(venv, constraints).returncode == 0
    assert calls.read_text().splitlines()[0] == f"-m pip install -q -c {constraints} -e {ROOT}"


def test_a_module_that_does_not_import_fails_and_leaves_no_stamp(tmp_path):
    venv, _ = _venv(tmp_path)
    (venv / "bin" / "python").write_text('#!/usr/bin/env bash\n[ "$1" != "-c" ]\n')
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("")
    done = _install(venv, constraints)
    assert done.returncode != 0
    assert "does not import" in done.stderr
    assert not (venv / ".installed-onboardflow").exists()
