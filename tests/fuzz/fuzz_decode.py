"""Coverage-guided fuzzing (atheris, libFuzzer) of decode -> normalize -> anonymize -> dead letter.

Every input is one Kafka record (key, value, CreateTime; ``harness.record_from_bytes``)
checked by ``harness.check_record``: the properties are listed there, and any
violation or escaping exception is a crash. Mutations are structure-aware
(``mutate``): besides libFuzzer's byte mutations of the whole input, framed
v1/v2 values are decoded, one to three fields changed (boundary timestamps,
empty, over-long and amplified strings, a raw identifier copied into another field, IP, e-mail,
locale, user agent and referrer shapes, consent flips, properties added or
removed), re-encoded under schema id 1 or 2 (sometimes another id), and the
key and timestamp changed. Seeds: ``seeds.seed_records()`` plus the
regression corpus tests/fuzz/corpus/.

    make fuzz                                   # FUZZ_RUNS=100000 by default
    python tests/fuzz/fuzz_decode.py --runs 20000 [--workdir .run/fuzz] [-- libFuzzer flags]
    python tests/fuzz/fuzz_decode.py --minimize DIR   # the smallest corpus with the same coverage

Prints libFuzzer's progress, then one summary line (executions, seconds,
coverage, features, corpus size, outcomes, crashes); exits non-zero when a
crash was found (the input is in <workdir>/crashes/). Coverage is that of the
Python code (onboardflow, ipaddress, urllib.parse); fastavro's Cython reader
is not instrumented. docs/security.md "Fuzzing".
"""
from __future__ import annotations

import argparse
import collections
import io
import os
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
SUMMARY_EVERY = 50_000

try:
    import atheris
except ImportError:  # pragma: no cover - depends on the install
    atheris = None


# --------------------------------------------------------------------------- structure-aware mutation

T0 = 1_717_000_000_000
INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)
TIMESTAMPS = (0, -1, 1, 946_684_799_999, 946_684_800_000, 4_102_444_799_999, 4_102_444_800_000, T0,
              253_402_300_799_999, 253_402_300_800_000, 2**53, INT64_MAX, INT64_MIN, 9_223_372_036_854_775)
STRINGS = (
    "", " ", "\t", "\x00", "x" * 128, "x" * 129, "İ", "ß", "\u2028", "\ufeff", "é" * 70, "🙂",
    "unknown", "other", "und", "none", "null", "True", "1234",
    "a@b.co", "jane@localhost", "Jane.Doe@Example.COM", " jane@example.com ", "@", "a@", "@b.c", "a@@b.c",
    "a@b@c.example",
    "ann@bücher.example", "ann@xn--bcher-kva.example", "ann@-bad-.example", "mailto:ann@example.org",
    "203.0.113.77", "203.0.113.77:8080", " 203.0.113.77 ", "203.0.113.77, 10.0.0.1", "10.0.0.1,203.0.113.77",
    "001.002.003.004", "1.2.3", "256.1.1.1", "2001:db8::1", "[2001:db8::1]:443", "fe80::1%eth0",
    "::ffff:203.0.113.77", "::ffff:cb00:714d", "2002:cb00:714d::1", "::203.0.113.77", "::", "::1",
    "2001:0db8:0000:0000:0000:0000:0000:0001", "2002:CB00:714D:0:0:0:0:1", "64:ff9b::203.0.113.77",
    "en_US", "en-us", "zh-Hant-TW", "es-419", "de_DE.UTF-8@euro", "-", "_", "en-", "EN",
    "Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X)", "Mozilla/5.0 (Linux; Android 14)", "curl/8.0",
    "Googlebot/2.1", "cubot note", "Mozilla/5.0 (Windows NT 10.0; Win64; x64)",
    "https://user:pass@partner.example/path?email=a@b.co", "//[::1", "http://[::1", "http://[v1.x]/",
    "http://a:b@/", "https://xn--.example", "http://exa mple.com", "http:///x", "ftp://ünï.example/",
    "Reports ", "FEATURE", "iPhone OS", "Mac OS X 14", "Windows", "CrOS x86_64",
)
PROPERTY_KEYS = ("feature", "page", "plan", "email", "userEmail", "user_id", "ip", "clientIp", "note",
                 "origin", "first_name", "feature_name", "Name", "step", " Feature ", "", "UA", "geo")
V1_SYMBOLS = frozenset({"signup", "login", "page_view", "click", "form_submit", "tutorial_step",
                        "feature_used", "support_message", "purchase", "logout"})
V2_SYMBOLS = sorted(V1_SYMBOLS | {"invite_sent", "unknown"})
CONTEXT_FIELDS = ("device", "os", "app_version", "locale", "ip", "user_agent", "email")
TOP_STRINGS = ("event_id", "user_id", "anonymous_id", "session_id", "referrer")


class Mutator:
    """libFuzzer's custom mutator: see the module docstring."""

    def __init__(self, harness, schemas):
        self.harness = harness
        self.schemas = schemas  # schema id (1, 2) -> parsed onboarding_event schema (epoch millis)

    def __call__(self, data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        roll = rng.random()
        try:
            if roll < 0.5:
                out = self.structured(data, rng)
            elif roll < 0.6:
                out = self.envelope(data, rng)
            else:
                out = None
        except Exception:  # noqa: BLE001 - an unmutatable input falls back to byte mutation
            out = None
        if out is None or len(out) > max_size:
            out = atheris.Mutate(data, max_size)
        return out

    def envelope(self, data: bytes, rng: random.Random) -> bytes:
        record = self.harness.record_from_bytes(data)
        key, value, ts = record.key, record.value, record.timestamp_ms
        if rng.random() < 0.5:
            key = rng.choice((None, b"", b"\x00", (key or b"") + b"x", rng.randbytes(rng.randint(1, 40)),
                              atheris.Mutate(key or b"", 64)))
        else:
            ts = rng.choice(TIMESTAMPS + (rng.randint(INT64_MIN, INT64_MAX),))
        return self.harness.record_to_bytes(key, value, ts)

    def structured(self, data: bytes, rng: random.Random) -> bytes | None:
        from fastavro import schemaless_reader, schemaless_writer

        record = self.harness.record_from_bytes(data)
        value = record.value
        if not value or len(value) < 5 or value[0] != 0:
            return None
        schema_id = int.from_bytes(value[1:5], "big")
        if schema_id not in self.schemas:
            return None
        event = schemaless_reader(io.BytesIO(value[5:]), self.schemas[schema_id], None)
        event.setdefault("referrer", None)
        for _ in range(rng.randint(1, 3)):
            self.mutate_event(event, rng)
        out_id = 2 if event.get("referrer") is not None or event["event_type"] not in V1_SYMBOLS else rng.choice((1, 2))
        if out_id == 1:
            event.pop("referrer", None)
        buffer = io.BytesIO()
        schemaless_writer(buffer, self.schemas[out_id], event)
        payload = buffer.getvalue()
        frame_id = out_id if rng.random() < 0.95 else rng.choice((1, 2, 3, 4, 5, 6, 7, 8, 2**32 - 1))
        value = b"\x00" + frame_id.to_bytes(4, "big") + payload
        if rng.random() < 0.05:
            value = value[: rng.randint(5, len(value))] if rng.random() < 0.5 else value + rng.randbytes(1)
        return self.harness.record_to_bytes(record.key, value, record.timestamp_ms)

    def pii(self, event: dict) -> list[str]:
        context = event.get("context") or {}
        values = [event.get("user_id"), event.get("anonymous_id"), context.get("email"), context.get("ip")]
        return [v for v in values if v]

    def string(self, event: dict, current, rng: random.Random) -> str | None:
        roll = rng.random()
        if roll < 0.1:
            return None
        if roll < 0.4:
            text = rng.choice(STRINGS)
        elif roll < 0.65 and self.pii(event):
            # A raw identifier copied into another field, maybe with a prefix, suffix or changed case.
            text = rng.choice(self.pii(event))
            text = rng.choice((text, text.upper(), f" {text} ", f"see {text}!", f"{text}/x", text[1:]))
        elif roll < 0.8:
            text = current or ""
        else:
            raw = (current or "").encode("utf-8")
            text = atheris.Mutate(raw, max(8, 2 * len(raw))).decode("utf-8", "ignore")
        if text and rng.random() < 0.2:
            # Amplified: a run of one character at one or two places, up to tens of kilobytes
            # (slow regular expressions, quadratic scans).
            for _ in range(rng.randint(1, 2)):
                at = rng.randrange(len(text))
                text = text[:at] + text[at] * rng.choice((16, 256, 4096, 30_000, 60_000)) + text[at:]
        return text

    def mutate_event(self, event: dict, rng: random.Random) -> None:
        target = rng.choice(("top", "top", "context", "context", "properties", "time", "consent", "type"))
        if target == "top":
            field = rng.choice(TOP_STRINGS)
            value = self.string(event, event.get(field), rng)
            event[field] = value if value is not None or field != "event_id" else ""
        elif target == "context":
            field = rng.choice(CONTEXT_FIELDS)
            event["context"][field] = self.string(event, event["context"].get(field), rng)
        elif target == "properties":
            props = event["properties"]
            if props and rng.random() < 0.3:
                del props[rng.choice(sorted(props))]
            else:
                key = rng.choice(PROPERTY_KEYS) if rng.random() < 0.5 else (self.string(event, None, rng) or "k")
                props[key] = self.string(event, props.get(key), rng) or ""
        elif target == "time":
            field = rng.choice(("occurred_at", "received_at"))
            if rng.random() < 0.5:
                event[field] = rng.choice(TIMESTAMPS)
            else:
                other = event["received_at" if field == "occurred_at" else "occurred_at"]
                event[field] = max(INT64_MIN, min(INT64_MAX, other + rng.choice((-1, 1)) * rng.choice(
                    (0, 1, 86_400_000, 86_400_001, rng.randint(0, 2**40)))))
        elif target == "consent":
            field = rng.choice(("analytics", "personalization", "marketing"))
            event["consent"][field] = not event["consent"][field]
        else:
            event["event_type"] = rng.choice(V2_SYMBOLS)


# --------------------------------------------------------------------------- the fuzz target


def child(args: argparse.Namespace, libfuzzer_args: list[str]) -> None:
    """The libFuzzer process: instrument, seed, fuzz (never returns)."""
    if atheris is None:
        sys.exit("atheris is not installed: `make fuzz` installs it (pip install -e '.[fuzz]')")
    with atheris.instrument_imports(include=["onboardflow"]):
        from onboardflow.tests.fuzz import harness
    import ipaddress
    import urllib.parse

    for module in (ipaddress, urllib.parse):  # imported before atheris could hook them
        for name, obj in list(vars(module).items()):
            if callable(obj) and getattr(obj, "__module__", None) == module.__name__:
                _instrument(module, name, obj)

    instrumented = [m for name, m in sys.modules.items() if name.startswith("onboardflow.")]
    for where in _miscompiled_comparisons(instrumented + [ipaddress, urllib.parse]):
        print(f"WARNING: {where}: a comparison atheris instruments wrongly; rewrite it "
              "(tests/fuzz/fuzz_decode.py _miscompiled_comparisons)", file=sys.stderr)

    from onboardflow.schemas import load_schema
    from onboardflow.schemas.wire import epoch_millis_schema
    from onboardflow.tests.fuzz.seeds import seed_records

    workdir = Path(args.workdir)
    seeds, corpus, crashes = workdir / "seeds", workdir / "corpus", workdir / "crashes"
    for d in (seeds, corpus, crashes):
        d.mkdir(parents=True, exist_ok=True)
    for name, data in seed_records():
        (seeds / name).write_bytes(data)

    path = harness.FuzzedPath()
    outcomes: collections.Counter = collections.Counter()
    schemas = {v: epoch_millis_schema(load_schema("onboarding_event", v)) for v in (1, 2)}
    mutator = Mutator(harness, schemas)

    def test_one_input(data: bytes) -> None:
        outcomes[harness.check_record(path, harness.record_from_bytes(data))] += 1
        n = sum(outcomes.values())
        if n % SUMMARY_EVERY == 0 or n == args.runs:
            print(f"fuzz-outcomes {n} " + " ".join(f"{k}={v}" for k, v in sorted(outcomes.items())),
                  file=sys.stderr, flush=True)

    common = [f"-max_len={args.max_len}", f"-artifact_prefix={crashes}/", "-timeout=5", "-rss_limit_mb=3072"]
    if args.raw:  # a merge's inner process: libFuzzer's own command line
        argv = [sys.argv[0], *libfuzzer_args]
    elif args.minimize:
        # libFuzzer's merge: the smallest set of inputs with the same coverage, into an empty directory.
        # It reruns argv[0] for the inputs, so argv[0] is this script's inner command.
        Path(args.minimize).mkdir(parents=True, exist_ok=True)
        inner = shlex.join([sys.executable, __file__, "--child", "--raw", f"--workdir={args.workdir}", "--"])
        argv = [inner, "-merge=1", *common, args.minimize, str(CORPUS), str(corpus), str(seeds)]
    else:
        argv = [sys.argv[0], str(corpus), str(seeds), str(CORPUS), f"-runs={args.runs}", *common,
                "-print_final_stats=1", f"-seed={args.seed}", *libfuzzer_args]
    atheris.Setup(argv, test_one_input, custom_mutator=mutator)
    atheris.Fuzz()


def _miscompiled_comparisons(modules) -> list[str]:
    """Comparisons atheris 2.3.0 instruments wrongly on Python 3.11: a conditional expression
    as a right-hand operand (``a != (b if c else d)`` then evaluates to ``b``)."""
    import ast
    import inspect

    found = []
    for module in modules:
        try:
            tree = ast.parse(inspect.getsource(module))
        except (OSError, TypeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(
                    isinstance(n, ast.IfExp) for operand in node.comparators for n in ast.walk(operand)):
                found.append(f"{module.__name__}:{node.lineno}")
    return found


def _instrument(module, name, obj) -> None:
    if isinstance(obj, type):
        for attr, member in list(vars(obj).items()):
            if callable(member) and hasattr(member, "__code__"):
                setattr(obj, attr, atheris.instrument_func(member))
    elif hasattr(obj, "__code__"):
        setattr(module, name, atheris.instrument_func(obj))


_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)")
_EXECUTED = re.compile(r"^stat::number_of_executed_units: (\d+)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    libfuzzer_args: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, libfuzzer_args = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get("FUZZ_RUNS", "100000")))
    parser.add_argument("--workdir", default=os.environ.get("FUZZ_WORKDIR", ".run/fuzz"))
    parser.add_argument("--max-len", type=int, default=65536)
    parser.add_argument("--seed", type=int, default=int(os.environ.get("FUZZ_SEED", "1")))
    parser.add_argument("--minimize", metavar="DIR",
                        help="write the minimized corpus (regression corpus, work corpus, seeds) to DIR instead")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args, libfuzzer_args)
        return 0
    crashes = Path(args.workdir) / "crashes"
    before = set(crashes.glob("*")) if crashes.exists() else set()
    started = time.monotonic()
    cmd = [sys.executable, __file__, "--child", f"--runs={args.runs}", f"--workdir={args.workdir}",
           f"--max-len={args.max_len}", f"--seed={args.seed}",
           *([f"--minimize={args.minimize}"] if args.minimize else []), "--", *libfuzzer_args]
    last = {}
    outcomes = ""
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace") as proc:
        for line in proc.stderr:
            sys.stderr.write(line)
            status = _STATUS.search(line)
            if status:
                last.update(zip(("execs", "cov", "ft", "corpus"), status.groups()))
            executed = _EXECUTED.search(line)
            if executed:
                last["execs"] = executed.group(1)
            if line.startswith("fuzz-outcomes"):
                outcomes = line.split(" ", 2)[2].strip()
    seconds = time.monotonic() - started
    if args.minimize:
        print(f"fuzz: minimized corpus of {len(list(Path(args.minimize).iterdir()))} files in {args.minimize}")
        return proc.returncode
    found = sorted(set(crashes.glob("*")) - before) if crashes.exists() else []
    print(f"fuzz: {last.get('execs', '?')} executions in {seconds:.0f} s; coverage {last.get('cov', '?')} "
          f"edges, {last.get('ft', '?')} features, corpus {last.get('corpus', '?')}; crashes {len(found)}"
          + "".join(f"\n  crash: {p}" for p in found) + (f"\noutcomes: {outcomes}" if outcomes else ""))
    return proc.returncode or (1 if found else 0)


if __name__ == "__main__":
    sys.exit(main())
