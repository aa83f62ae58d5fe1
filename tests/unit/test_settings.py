"""One configuration surface (runners/settings.py): every command targets the same deployment."""
import dataclasses

import pytest

from onboardflow.runners.settings import SERVICES_ENV, Settings, deployment_names


def test_the_default_deployment_keeps_the_names_the_pipeline_always_used(tmp_path):
    s = Settings.load({"OBF_RUN_DIR": str(tmp_path)})
    assert (s.deployment, s.events_topic, s.dead_letter_topic, s.segment_changes_topic, s.model_events_topic,
            s.consumer_group, s.redis_key_prefix, s.warehouse_schema) == (
        "onboarding", "onboarding.events", "onboarding.events.dlq", "onboarding.segment-changes",
        "onboarding.model-events", "onboardflow", "obf", "warehouse")
    assert (s.kafka_bootstrap, s.redis_url) == ("127.0.0.1:9092", "redis://127.0.0.1:6379/0")
    assert s.key_file == tmp_path / "keys" / "onboarding.key"


def test_every_name_derives_from_one_deployment_name_and_each_can_be_overridden(tmp_path):
    s = Settings.load({"OBF_RUN_DIR": str(tmp_path), "OBF_DEPLOYMENT": "shop-eu",
                       "OBF_REDIS_KEY_PREFIX": "eu"})
    assert (s.events_topic, s.consumer_group, s.warehouse_schema, s.redis_key_prefix) == (
        "shop-eu.events", "onboardflow-shop-eu", "shop_eu", "eu")
    with pytest.raises(ValueError, match="deployment name"):
        deployment_names("Shop EU")


def test_the_endpoints_services_up_wrote_apply_unless_the_environment_says_otherwise(tmp_path):
    (tmp_path / SERVICES_ENV).write_text(
        "# written by services.sh up\nOBF_KAFKA_BOOTSTRAP=127.0.0.1:19092\nOBF_REDIS_URL=redis://127.0.0.1:16379/0\n")
    s = Settings.load({"OBF_RUN_DIR": str(tmp_path)})
    assert (s.kafka_bootstrap, s.redis_url) == ("127.0.0.1:19092", "redis://127.0.0.1:16379/0")
    told = Settings.load({"OBF_RUN_DIR": str(tmp_path), "OBF_KAFKA_BOOTSTRAP": "kafka:9092"})
    assert (told.kafka_bootstrap, told.redis_url) == ("kafka:9092", "redis://127.0.0.1:16379/0")


def test_every_field_documents_its_environment_variable():
    for field in dataclasses.fields(Settings):
        assert Settings.variable(field.name) == "OBF_" + field.name.upper()
    import inspect
    source = inspect.getsource(Settings)
    assert all(f"``{Settings.variable(f.name)}``" in source for f in dataclasses.fields(Settings))


def test_the_settings_become_the_pipelines_flags_and_later_flags_win(tmp_path):
    from onboardflow.runners.cli.run import pipeline_options

    s = Settings.load({"OBF_RUN_DIR": str(tmp_path), "OBF_DEPLOYMENT": "shop", "OBF_KAFKA_BOOTSTRAP": "k:1"})
    options = pipeline_options(["--redis_key_prefix=mine"], s).get_all_options()
    assert (options["kafka_bootstrap_servers"], options["kafka_topics"], options["kafka_consumer_group"]) == (
        "k:1", "shop.events", "onboardflow-shop")
    assert (options["warehouse_schema"], options["dead_letter_topic"], options["redis_key_prefix"]) == (
        "shop", "shop.events.dlq", "mine")
    assert options["secret_file"] is None  # no key file for this deployment yet
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "shop.key").write_text("x" * 32)
    assert pipeline_options([], s).get_all_options()["secret_file"] == str(tmp_path / "keys" / "shop.key")
