"""Anonymization: pseudonyms, PII reduction, secret handling and consent routing."""
import copy
import hashlib
import hmac
import pickle

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

# Aliased so pytest does not try to collect Beam's class as a test class.
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.display import DisplayData

from onboardflow.pipelines.beam.anonymize import AnonymizeEvents, _AnonymizeFn
from onboardflow.runners.local import prism_location
from onboardflow.transforms.anonymize import (
    EventAnonymizer,
    Pseudonymizer,
    SecretError,
    SecretFile,
    SecretKey,
    country_from_locale,
    device_class,
    email_domain,
    generate_demo_secret,
    ip_prefix,
    is_pii_property_key,
    load_secret,
    referrer_host,
)

# Beam's local runner with the project's binary. No shared job server: a
# default-runner pipeline elsewhere in the process may have cached one that
# tries to download Prism.
PRISM = [
    "--runner=PrismRunner",
    f"--prism_location={prism_location()}",
    "--experiments=disable_prism_server_singleton",
]


def prism_pipeline():
    return BeamTestPipeline(options=PipelineOptions(PRISM))

SECRET = b"unit-test-secret-0123456789abcdef"
OTHER_SECRET = b"another-secret-fedcba9876543210"

CHROME_MAC = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)
IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)


def raw_event(**overrides):
    event = {
        "event_id": "5f0c7a4e-0d7c-4b1e-9a43-2f6f8f3b1c11",
        "event_type": "feature_used",
        "user_id": "acct-7731-jane.doe",
        "anonymous_id": "dev-3b9e1f-77aa",
        "session_id": "s-41",
        "occurred_at": 1_700_000_000_000,
        "received_at": 1_700_000_000_250,
        "properties": {
            "feature": "export",
            "plan_name": "pro",
            "email": "jane.doe@Example.COM",
            "userPhone": "+1 555 0100",
            "first_name": "Jane",
            "note": "contact me at jane.doe@example.com",
            "origin": "invited by acct-7731-jane.doe",
            "client_ip": "203.0.113.77",
        },
        "context": {
            "device": "MacBookPro18,3",
            "os": "macOS 14.4",
            "app_version": "3.2.1",
            "locale": "en-US",
            "ip": "203.0.113.77",
            "user_agent": CHROME_MAC,
            "email": "Jane.Doe@Example.COM",
        },
        "consent": {"analytics": True, "personalization": True, "marketing": False},
    }
    for key, value in overrides.items():
        event[key] = value
    return event


def all_strings(value):
    """Every string (keys and values) anywhere inside a nested structure."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from all_strings(key)
            yield from all_strings(item)
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            yield from all_strings(item)


def assert_no_raw_pii(anonymized, event):
    context = event["context"]
    needles = [event.get("user_id"), event.get("anonymous_id"), context["email"], context["ip"], context["user_agent"]]
    needles = [n.lower() for n in needles if n]
    needles.append("jane.doe@example.com")
    for text in all_strings(anonymized):
        for needle in needles:
            assert needle not in text.lower(), f"raw PII {needle!r} survived in {text!r}"


# --------------------------------------------------------------------------- pseudonyms


def test_user_key_is_hmac_sha256_of_user_id():
    expected = hmac.new(SECRET, b"acct-42", hashlib.sha256).hexdigest()
    assert Pseudonymizer(SECRET).user_key("acct-42", "dev-1") == expected


def test_anonymous_key_is_hmac_of_prefixed_anonymous_id():
    expected = hmac.new(SECRET, b"anon:dev-1", hashlib.sha256).hexdigest()
    assert Pseudonymizer(SECRET).user_key(None, "dev-1") == expected


def test_anonymous_and_identified_keys_differ_for_the_same_raw_id():
    pseudonymizer = Pseudonymizer(SECRET)
    assert pseudonymizer.user_key("same-id", None) != pseudonymizer.user_key(None, "same-id")


def test_keys_are_stable_across_instances_with_the_same_secret():
    assert Pseudonymizer(SECRET).user_key("acct-42") == Pseudonymizer(bytes(SECRET)).user_key("acct-42")
    assert Pseudonymizer(SecretKey(SECRET)).user_key(None, "d") == Pseudonymizer(SECRET).user_key(None, "d")


def test_keys_differ_with_another_secret():
    assert Pseudonymizer(SECRET).user_key("acct-42") != Pseudonymizer(OTHER_SECRET).user_key("acct-42")


def test_user_key_without_any_identity_is_an_error():
    with pytest.raises(ValueError):
        Pseudonymizer(SECRET).user_key(None, None)


def test_pseudonymizer_repr_hides_the_secret():
    assert SECRET.decode() not in repr(Pseudonymizer(SECRET))


# --------------------------------------------------------------------------- PII reduction


@pytest.mark.parametrize(
    "email, domain",
    [
        ("Jane.Doe@Example.COM", "example.com"),
        ("  bob+tag@mail.example.co.uk ", "mail.example.co.uk"),
        ("user@xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("user@bücher.example", "xn--bcher-kva.example"),
        ("user@example.com.", "example.com"),
        ("no-at-sign.example.com", None),
        ("@example.com", None),
        ("user@", None),
        ("user@localhost", None),
        ("user@exa mple.com", None),
        ("a@b@example.com", None),
        ("user@-bad-.com", None),
        ("jo hn@example.com", None),
        ("", None),
        (None, None),
        (42, None),
    ],
)
def test_email_is_reduced_to_its_lowercased_domain_or_none(email, domain):
    assert email_domain(email) == domain


@pytest.mark.parametrize(
    "ip, prefix",
    [
        ("203.0.113.77", "203.0.113.0/24"),
        ("10.1.2.255", "10.1.2.0/24"),
        ("203.0.113.77:51234", "203.0.113.0/24"),
        ("203.0.113.77, 198.51.100.1", "203.0.113.0/24"),
        ("2001:db8:abcd:12:1:2:3:4", "2001:db8:abcd::/48"),
        ("[2001:db8:abcd:12::1]:443", "2001:db8:abcd::/48"),
        ("fe80::1%eth0", "fe80::/48"),
        ("::ffff:203.0.113.77", "203.0.113.0/24"),
        ("2002:cb00:714d::1", "203.0.113.0/24"),
        ("999.1.1.1", None),
        ("203.0.113.256", None),
        ("203.0.113.07", None),  # leading zeros are ambiguous (octal?), refused like ipaddress does
        ("1.2.3", None),
        ("not-an-ip", None),
        ("", None),
        (None, None),
    ],
)
def test_ip_is_reduced_to_its_network(ip, prefix):
    assert ip_prefix(ip) == prefix


@pytest.mark.parametrize(
    "user_agent, expected",
    [
        (CHROME_MAC, "desktop"),
        ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/124.0 Safari/537.36", "desktop"),
        ("Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0", "desktop"),
        (IPHONE, "mobile"),
        ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Chrome/124.0 Mobile Safari/537.36", "mobile"),
        ("Mozilla/5.0 (Linux; Android 12; CUBOT X50) AppleWebKit/537.36 Chrome/120.0 Mobile Safari/537.36", "mobile"),
        ("Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148", "tablet"),
        ("Mozilla/5.0 (Linux; Android 13; SM-X710) AppleWebKit/537.36 Chrome/124.0 Safari/537.36", "tablet"),
        ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", "bot"),
        ("Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; bingbot/2.0)", "bot"),
        ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 HeadlessChrome/124.0 Safari/537.36", "bot"),
        ("curl/8.5.0", "bot"),
        ("python-requests/2.32.3", "bot"),
        ("SomeCustomClient", "unknown"),
        ("   ", "unknown"),
        ("", "unknown"),
        (None, "unknown"),
    ],
)
def test_user_agent_is_reduced_to_a_device_class(user_agent, expected):
    assert device_class(user_agent) == expected


@pytest.mark.parametrize(
    "locale, country",
    [("en-US", "US"), ("en_gb", "GB"), ("en_US.UTF-8", "US"), ("zh-Hant-TW", "TW"), ("es-419", None),
     ("fr", None), ("C", None), ("", None), (None, None)],
)
def test_locale_keeps_only_its_country(locale, country):
    assert country_from_locale(locale) == country


@pytest.mark.parametrize(
    "key",
    ["email", "userEmail", "e-mail", "E_MAIL", "phone", "phone_number", "mobilePhone", "first_name",
     "lastName", "full_name", "name", "username", "ip", "client_ip", "IPAddress", "address", "zip_code",
     "password", "user_id", "userId", "user_agent", "date_of_birth", "creditCard"],
)
def test_property_keys_that_suggest_pii_are_recognized(key):
    assert is_pii_property_key(key)


@pytest.mark.parametrize(
    "key", ["feature", "feature_name", "plan_name", "page", "step", "step_total", "amount", "plan", "button",
            "shipping_method"]
)
def test_ordinary_property_keys_are_kept(key):
    assert not is_pii_property_key(key)


def test_referrer_keeps_only_the_host():
    assert referrer_host("https://user:pw@News.Example.org/a/b?email=jane@example.com") == "news.example.org"
    assert referrer_host("example.com/path") == "example.com"
    assert referrer_host("") is None


# --------------------------------------------------------------------------- anonymized event


def test_no_raw_pii_survives_anywhere_in_the_anonymized_event():
    event = raw_event()
    anonymized, stripped = Pseudonymizer(SECRET).anonymize(event)
    assert_no_raw_pii(anonymized, event)
    # email, userPhone, first_name, client_ip by key; note (an email) and origin (the user id) by value
    assert stripped == 6
    assert anonymized["properties"] == {"feature": "export", "plan_name": "pro"}


def test_anonymized_event_keeps_non_pii_fields_and_reduced_context():
    event = raw_event(referrer="https://partner.example.net/landing?ref=jane.doe@example.com")
    anonymized, _ = Pseudonymizer(SECRET).anonymize(event)
    assert anonymized == {
        "event_id": event["event_id"],
        "event_type": "feature_used",
        "user_key": Pseudonymizer(SECRET).user_key("acct-7731-jane.doe"),
        "identified": True,
        "anonymous_key": Pseudonymizer(SECRET).user_key(None, event["anonymous_id"]),
        "email_key": Pseudonymizer(SECRET).email_key(event["context"]["email"]),
        "session_id": "s-41",
        "occurred_at": 1_700_000_000_000,
        "received_at": 1_700_000_000_250,
        "properties": {"feature": "export", "plan_name": "pro"},
        "device": "MacBookPro18,3",
        "os": "macOS 14.4",
        "app_version": "3.2.1",
        "country": "US",
        "email_domain": "example.com",
        "ip_prefix": "203.0.113.0/24",
        "device_class": "desktop",
        "consent": {"analytics": True, "personalization": True, "marketing": False},
        "referrer_host": "partner.example.net",
    }


def test_anonymizing_does_not_modify_the_input_event():
    event = raw_event()
    before = copy.deepcopy(event)
    Pseudonymizer(SECRET).anonymize(event)
    assert event == before


def test_anonymized_event_fits_the_warehouse_events_row():
    from onboardflow.transforms.warehouse.rows import event_row

    anonymized, _ = Pseudonymizer(SECRET).anonymize(raw_event(referrer="https://partner.example.net/x"))
    row = event_row(anonymized)
    for value in ("example.com", "203.0.113.0/24", "desktop", "US", "partner.example.net",
                  anonymized["user_key"], "macOS 14.4"):
        assert value in row
    assert_no_raw_pii({"row": [str(v) for v in row]}, raw_event())


def test_dead_letter_details_name_fields_never_values():
    bad = consented("d1", True, True, user_id=None, anonymous_id=None)
    route, letter, _ = EventAnonymizer(Pseudonymizer(SECRET)).anonymize(bad)
    assert route == "dead_letter"
    assert (letter["reason"], letter["detail"]) == ("missing_identity", "neither user_id nor anonymous_id is set")
    assert letter["payload"] is bad  # the raw event travels for replay, to the PII-grade dead-letter topic


def test_short_user_ids_only_strip_properties_equal_to_them():
    event = raw_event(user_id="42", properties={"amount": "42.00", "ref": "42"})
    anonymized, _ = Pseudonymizer(SECRET).anonymize(event)
    assert anonymized["properties"] == {"amount": "42.00"}


def test_property_keys_carrying_a_raw_identifier_or_an_address_are_stripped():
    # Found by the fuzzer (docs/security.md "Fuzzing"): keys were only checked for PII names.
    event = raw_event(properties={"acct-7731-jane.doe": "1", "203.0.113.77": "x", "ann@example.org": "y",
                                  "feature": "export"})
    anonymized, stripped = Pseudonymizer(SECRET).anonymize(event)
    assert anonymized["properties"] == {"feature": "export"} and stripped == 3


def test_a_megabyte_property_is_scanned_for_addresses_in_linear_time():
    # Found by the fuzzer: the address search backtracked quadratically over a long run
    # without "@" (60 kB: 7.5 s; this megabyte: hours).
    import time

    run = "x" * 500_000
    event = raw_event(properties={"blob": run, run: "k", "tail": run + "@" + run, "feature": "export"})
    started = time.process_time()
    anonymized, _ = Pseudonymizer(SECRET).anonymize(event)
    assert time.process_time() - started < 1.0
    assert anonymized["properties"] == {"blob": run, run: "k", "tail": run + "@" + run, "feature": "export"}
    assert Pseudonymizer(SECRET).anonymize(raw_event(properties={"n": run + " a@b.example"}))[0]["properties"] == {}


def test_caches_keyed_by_client_text_keep_no_long_value():
    # Found by the fuzzer: the caches are bounded in entries, not bytes, so unique long user
    # agents, locales, keys or IPs could pin up to thousands of megabyte-long strings.
    from onboardflow.transforms import anonymize

    cached = (anonymize.device_class, anonymize.country_from_locale, anonymize.is_pii_property_key,
              anonymize._address_needles)
    before = [f.cache_info().currsize for f in cached]
    for i in range(50):
        long = f"Mozilla/5.0 {i} " + "x" * 10_000
        assert device_class(long) == "unknown" and country_from_locale("en-US-" + long) == "US"
        assert not is_pii_property_key(long) and anonymize._address_needles(" " + long) == (long,)
    assert [f.cache_info().currsize for f in cached] == before
    assert device_class(IPHONE) == "mobile" and anonymize.device_class.cache_info().currsize >= 1


@pytest.mark.parametrize("raw_ip,bare", [
    (" 203.0.113.77 ", "203.0.113.77"),
    ("203.0.113.77:8443", "203.0.113.77"),
    ("203.0.113.77, 10.0.0.1", "203.0.113.77"),
    ("[2001:db8::7]:443", "2001:db8::7"),
    ("2001:0db8:0000:0000:0000:0000:0000:0007", "2001:db8::7"),
])
def test_the_bare_address_of_a_decorated_ip_is_stripped_from_properties(raw_ip, bare):
    # Found by the fuzzer: the IP was looked for only as sent (with its port, spaces, brackets).
    context = {**raw_event()["context"], "ip": raw_ip}
    event = raw_event(context=context, properties={"origin": bare, bare: "k", "feature": "export"})
    anonymized, _ = Pseudonymizer(SECRET).anonymize(event)
    assert anonymized["properties"] == {"feature": "export"}


def test_unknown_top_level_fields_are_not_passed_on():
    event = raw_event(shipping_address="1 Main St")
    anonymized, _ = Pseudonymizer(SECRET).anonymize(event)
    assert "shipping_address" not in anonymized


def test_session_id_that_embeds_a_raw_identifier_is_dropped():
    event = raw_event(session_id="acct-7731-jane.doe-2024-01-01")
    anonymized, _ = Pseudonymizer(SECRET).anonymize(event)
    assert anonymized["session_id"] is None


# --------------------------------------------------------------------------- secrets


def test_load_secret_reads_a_file_without_its_trailing_newline(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    assert load_secret(path=path) == SECRET


def test_load_secret_reads_the_environment_variable_named_by_the_caller(monkeypatch):
    monkeypatch.setenv("ONBOARDFLOW_TEST_SECRET", SECRET.decode())
    assert load_secret(env_var="ONBOARDFLOW_TEST_SECRET") == SECRET


def test_load_secret_prefers_the_file_over_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    monkeypatch.setenv("ONBOARDFLOW_TEST_SECRET", OTHER_SECRET.decode())
    assert load_secret(path=path, env_var="ONBOARDFLOW_TEST_SECRET") == SECRET


def test_load_secret_refuses_a_missing_file(tmp_path):
    with pytest.raises(SecretError, match="does not exist"):
        load_secret(path=tmp_path / "absent")


def test_load_secret_refuses_an_unset_variable(monkeypatch):
    monkeypatch.delenv("ONBOARDFLOW_TEST_SECRET", raising=False)
    with pytest.raises(SecretError, match=r"\$ONBOARDFLOW_TEST_SECRET is not set"):
        load_secret(env_var="ONBOARDFLOW_TEST_SECRET")


def test_load_secret_refuses_when_nothing_is_configured():
    with pytest.raises(SecretError, match="no pseudonymization secret configured"):
        load_secret()


def test_load_secret_refuses_short_secrets_without_revealing_them(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"tooshort-abc\n")
    with pytest.raises(SecretError, match="12 bytes; at least 16") as info:
        load_secret(path=path)
    assert "tooshort" not in str(info.value)


def test_demo_secrets_are_long_enough_and_random():
    first, second = generate_demo_secret(), generate_demo_secret()
    assert len(first) >= 16 and first != second
    assert Pseudonymizer(first).user_key("u") != Pseudonymizer(second).user_key("u")


def test_secret_key_repr_is_redacted_and_it_pickles():
    key = SecretKey(SECRET)
    assert SECRET.decode() not in repr(key) and SECRET.decode() not in str(key)
    assert "<redacted>" in repr(key)
    restored = pickle.loads(pickle.dumps(key))
    assert restored == key and restored.resolve() == SECRET


def test_secret_key_refuses_short_secrets():
    with pytest.raises(SecretError):
        SecretKey(b"short")


def test_secret_file_provider_does_not_carry_the_secret_in_the_pickled_dofn(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    dofn = _AnonymizeFn(SecretFile(path))
    payload = pickle.dumps(dofn)
    assert SECRET not in payload and str(path).encode() in payload
    dofn.setup()
    assert dofn._anonymizer.pseudonymizer.user_key("u") == Pseudonymizer(SECRET).user_key("u")


def test_secret_is_not_in_pipeline_display_data_or_transform_labels():
    pipeline = beam.Pipeline()
    _ = pipeline | beam.Create([raw_event()]) | AnonymizeEvents(SecretKey(SECRET))
    proto = pipeline.to_runner_api()
    payloads = []
    for transform in proto.components.transforms.values():
        assert SECRET.decode() not in transform.unique_name
        payloads.extend(item.payload for item in transform.display_data)
    # The scan is not vacuous: the anonymizing ParDo does publish display data.
    assert any(b"_AnonymizeFn" in payload for payload in payloads)
    assert not any(SECRET in payload for payload in payloads)

    shown = []

    def visit(applied):
        if applied.transform is not None:  # the root node has none
            shown.extend(str(item.value) for item in DisplayData.create_from(applied.transform).items)
        for part in applied.parts:
            visit(part)

    visit(pipeline.transforms_stack[0])
    assert any("_AnonymizeFn" in value for value in shown)
    assert not any(SECRET.decode() in value for value in shown)


# --------------------------------------------------------------------------- Beam transform


def consented(event_id, personalization, analytics, **overrides):
    return raw_event(
        event_id=event_id,
        consent={"analytics": analytics, "personalization": personalization, "marketing": False},
        **overrides,
    )


ROUTING_CASES = [
    consented("p1", True, True),
    consented("p2", True, False),
    consented("a1", False, True, user_id=None),
    consented("n1", False, False),
    consented("n2", False, False, user_id=None, anonymous_id=None),  # dropped before validation
    raw_event(event_id="n3", consent=None),  # no consent record: the contract default, nothing
    consented("d1", True, True, user_id=None, anonymous_id=None),
    consented("d2", True, True, occurred_at="yesterday"),
    raw_event(event_id="d3", consent={"analytics": "yes", "personalization": True}),
    "not an event",
]


def test_the_consent_gate_routes_each_event_and_keeps_nothing_of_non_consenting_users():
    anonymizer = EventAnonymizer(Pseudonymizer(SECRET))
    routed = [anonymizer.anonymize(e) for e in ROUTING_CASES]
    assert [(r.route, r.record["event_id"] if r.record else None) for r in routed] == [
        ("personalization", "p1"),
        ("personalization", "p2"),
        ("analytics_only", "a1"),
        ("consent_filtered", None),
        ("consent_filtered", None),
        ("consent_filtered", None),
        ("dead_letter", "d1"),
        ("dead_letter", "d2"),
        ("dead_letter", "d3"),
        ("dead_letter", None),
    ]
    assert [r.record["reason"] for r in routed if r.route == "dead_letter"] == [
        "missing_identity", "missing_occurred_at", "bad_consent", "not_a_mapping"]
    assert routed[0].record == Pseudonymizer(SECRET).anonymize(ROUTING_CASES[0])[0]
    assert routed[0].stripped == Pseudonymizer(SECRET).anonymize(ROUTING_CASES[0])[1]
    assert SECRET.decode() not in repr(anonymizer)


def test_events_are_routed_by_consent_and_dead_lettered_when_malformed():
    events = ROUTING_CASES
    pipeline = prism_pipeline()
    routed = pipeline | beam.Create(events) | AnonymizeEvents(SecretKey(SECRET))
    assert_that(
        routed.personalization | "PIds" >> beam.Map(lambda e: (e["event_id"], e["identified"])),
        equal_to([("p1", True), ("p2", True)]),
        label="personalization",
    )
    assert_that(
        routed.analytics_only
        | "AIds" >> beam.Map(lambda e: (e["event_id"], e["identified"], e["consent"]["personalization"])),
        equal_to([("a1", False, False)]),
        label="analytics_only",
    )
    assert_that(
        routed.dead_letter | "DReasons" >> beam.Map(lambda d: (d["stage"], d["event_id"], d["reason"])),
        equal_to([
            ("anonymize", "d1", "missing_identity"),
            ("anonymize", "d2", "missing_occurred_at"),
            ("anonymize", "d3", "bad_consent"),
            ("anonymize", None, "not_a_mapping"),
        ]),
        label="dead_letter",
    )
    result = pipeline.run()
    result.wait_until_finish()

    def counter(name):
        found = result.metrics().query(MetricsFilter().with_namespace("onboardflow").with_name(name))["counters"]
        return sum(c.committed for c in found)

    assert counter("consent_filtered") == 3
    assert counter("anonymized_personalization") == 2
    assert counter("anonymized_analytics_only") == 1
    assert counter("anonymize_dead_letter") == 4


def test_pipeline_output_carries_no_raw_pii_and_stable_keys(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    event = raw_event()
    expected_key = Pseudonymizer(SECRET).user_key(event["user_id"])

    def check(outputs):
        assert len(outputs) == 1
        assert_no_raw_pii(outputs[0], event)
        assert outputs[0]["user_key"] == expected_key

    with prism_pipeline() as pipeline:
        routed = pipeline | beam.Create([event]) | AnonymizeEvents(SecretFile(path))
        assert_that(routed.personalization, check)
