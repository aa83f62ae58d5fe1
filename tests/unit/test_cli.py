"""The `onboardflow` dispatcher: commands and what they print around Beam."""
import os
import subprocess
import sys

from onboardflow.runners.cli import COMMANDS, main


def test_usage_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main(["no-such-command"]) == 2


def test_a_command_that_imports_beam_does_not_print_its_gcp_import_warning():
    # Beam logs "apitools not found, and bigquery client libraries are not
    # available" on the root logger when imported without GCP's clients; every
    # command printed it. The check that it is Beam's import that logs it keeps
    # this test honest if Beam stops doing so.
    bare = subprocess.run([sys.executable, "-c", "import apache_beam.io.gcp.bigquery"],
                          capture_output=True, text=True, timeout=120)
    command = subprocess.run([sys.executable, "-m", "onboardflow.runners.cli", "run", "--help"],
                             capture_output=True, text=True, timeout=120)
    assert "apitools not found" in bare.stderr
    assert command.returncode == 0
    assert "apitools" not in command.stderr


def test_an_unreachable_service_is_one_line_that_says_how_to_start_it(tmp_path):
    env = {**os.environ, "OBF_RUN_DIR": str(tmp_path), "OBF_PSEUDONYM_SECRET": "k" * 32,
           "OBF_REDIS_URL": "redis://127.0.0.1:1/0",
           "OBF_WAREHOUSE_DSN": "postgresql://nobody:secret@127.0.0.1:1/none"}
    for argv, service in ((["profile", "user-1"], "Redis at redis://127.0.0.1:1"),
                          (["models", "list", "--kind", "segmentation"], "PostgreSQL at postgresql://127.0.0.1:1/none")):
        done = subprocess.run([sys.executable, "-m", "onboardflow.runners.cli", *argv], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        assert done.stderr.strip().splitlines() == [
            f"onboardflow {argv[0]}: cannot reach {service}: is it running? `make services-up`"]
        assert "secret" not in done.stderr


def test_the_harness_harmless_finalize_traceback_is_dropped_and_everything_else_kept():
    import io

    from onboardflow.runners.cli import _QuietStderr

    out = io.StringIO()
    quiet = _QuietStderr(out)
    print("Traceback ...\nRuntimeError: Bundle is not in a finalizable state for inst-1", file=quiet)
    print("a real error", file=quiet)
    assert out.getvalue() == "a real error\n"


def test_run_help_lists_the_pipeline_kafka_metrics_and_flink_flags(capsys):
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--redis_url", "--kafka_bootstrap_servers", "--metrics_port", "--checkpointing_interval",
                 "--runner"):
        assert flag in out, flag


def test_a_service_command_keeps_the_kafka_clients_connection_errors_and_a_one_shot_command_does_not():
    import logging

    from onboardflow.runners.cli import configure_logging

    try:
        configure_logging(service=True)
        assert logging.getLogger("kafka").isEnabledFor(logging.ERROR)
        configure_logging(service=False)
        assert not logging.getLogger("kafka").isEnabledFor(logging.ERROR)
    finally:
        logging.getLogger("kafka").setLevel(logging.NOTSET)
