"""Install ffmpeg.wasm for the upload page from the npm registry, without Node.

The versions and their sha512 ``integrity`` come from the committed
``frontend/ffmpeg/package-lock.json``; each tarball is checked against it before a file is
unpacked. Only the browser builds are kept, under ``media_app/static/media_app/wasm/`` (ignored
by git: the core is 32 MB), one folder per package and version. A package whose folder already
holds a stamp with the same integrity is skipped, so ``make run`` and ``make test`` call this
every time at no cost. Standard library only: it runs before the virtualenv matters.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "frontend" / "ffmpeg" / "package-lock.json"
DEST = ROOT / "media_app" / "static" / "media_app" / "wasm"
REGISTRY = os.environ.get("NPM_REGISTRY", "https://registry.npmjs.org").rstrip("/")

# package -> (folder name, files kept: paths inside the tarball's ``package/``, prefix match)
WANTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "@ffmpeg/ffmpeg": ("ffmpeg", ("dist/esm/", "LICENSE", "package.json")),
    "@ffmpeg/util": ("util", ("dist/esm/", "LICENSE", "package.json")),
    "@ffmpeg/core": ("core", ("dist/esm/ffmpeg-core.js", "dist/esm/ffmpeg-core.wasm", "LICENSE", "package.json")),
}
STAMP = ".integrity"


def locked() -> dict[str, tuple[str, str]]:
    """Package -> (version, integrity) from the lock file."""
    packages = json.loads(LOCK.read_text())["packages"]
    found = {}
    for name in WANTED:
        entry = packages[f"node_modules/{name}"]
        found[name] = (entry["version"], entry["integrity"])
    return found


def check_integrity(data: bytes, integrity: str) -> None:
    algo, _, want = integrity.partition("-")
    got = base64.b64encode(hashlib.new(algo, data).digest()).decode()
    if got != want:
        raise SystemExit(f"fetch_wasm: integrity mismatch ({algo}): expected {want}, got {got}")


def install(name: str, version: str, integrity: str) -> Path:
    folder, keep = WANTED[name]
    target = DEST / f"{folder}-{version}"
    stamp = target / STAMP
    if stamp.is_file() and stamp.read_text().strip() == integrity:
        return target
    url = f"{REGISTRY}/{name}/-/{name.split('/')[-1]}-{version}.tgz"
    print(f"==> downloading {name} {version} ({url})", file=sys.stderr)
    with urllib.request.urlopen(url, timeout=120) as response:
        data = response.read()
    check_integrity(data, integrity)
    DEST.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}-", dir=DEST))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in tar.getmembers():
                inner = member.name.removeprefix("package/")
                if not member.isfile() or not inner.startswith(keep) or ".." in Path(inner).parts:
                    continue
                out = tmp / inner
                out.parent.mkdir(parents=True, exist_ok=True)
                extracted = tar.extractfile(member)
                assert extracted is not None
                out.write_bytes(extracted.read())
        (tmp / STAMP).write_text(integrity + "\n")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)  # atomic: a half-unpacked folder never carries a stamp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main() -> int:
    for name, (version, integrity) in locked().items():
        install(name, version, integrity)
    return 0


if __name__ == "__main__":
    sys.exit(main())
