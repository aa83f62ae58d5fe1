"""Put a locally built Prism binary where Beam's Python SDK looks for a download.

Without ``--prism_location``, Beam resolves Prism to the GitHub release asset
``apache_beam-v<version>-prism-<os>-<arch>.zip`` and first checks for that zip
in ``~/.apache_beam/cache/prism/bin``. This machine cannot reach GitHub, so
``make prism`` builds Prism from the Go module proxy and this script wraps it
in a zip of that name there. Usage: seed_prism_cache.py PRISM_BINARY BEAM_VERSION
(standard library only: it runs before the virtualenv exists).
"""
import os
import platform
import sys
import zipfile

ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def main(binary: str, version: str) -> None:
    system = platform.system().lower()
    arch = ARCH.get(platform.machine().lower(), platform.machine().lower())
    name = f"apache_beam-v{version}-prism-{system}-{arch}"
    cache = os.path.expanduser("~/.apache_beam/cache/prism/bin")
    os.makedirs(cache, exist_ok=True)
    target = os.path.join(cache, name + ".zip")
    tmp = target + ".tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        z.write(binary, arcname=name)
    os.replace(tmp, target)
    # A stale unzipped copy from an older seed would be preferred over the zip.
    unzipped = os.path.join(cache, name)
    if os.path.exists(unzipped):
        os.remove(unzipped)
    print(f"seeded Beam's Prism cache: {target}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
