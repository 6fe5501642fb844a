"""noVNC's browser library (``core/`` + ``vendor/``), served by e2b-desktop without any CDN.

``python -m pmoves_e2b.desktop.assets`` (``make novnc``) fetches the pinned ``@novnc/novnc``
from the npm registry with the host's npm (its registry configuration applies), checks the
tarball against the pinned integrity and unpacks it into the package (``static/novnc``).
``E2B_NOVNC_DIR`` may point at another copy with the same layout, e.g. Debian's ``/usr/share/novnc``.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

NOVNC_PACKAGE = "@novnc/novnc"
NOVNC_VERSION = "1.7.0"
NOVNC_INTEGRITY = "sha512-ucEJOx4T2avIRCleodk7YobZj5O2Ga2AeLfQ69A/yjG9HHba2+PDgwSkN3FttrmG+70ZGx21sElNFouK13RzyA=="
STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_NOVNC_DIR = STATIC_DIR / "novnc"
KEEP = ("core", "vendor", "LICENSE.txt", "AUTHORS", "docs")


def novnc_ready(directory: Path) -> bool:
    return (directory / "core" / "rfb.js").is_file()


def fetch_novnc(dest: Path = DEFAULT_NOVNC_DIR) -> Path:
    if novnc_ready(dest) and (dest / ".version").read_text().strip() == NOVNC_VERSION:
        return dest
    with tempfile.TemporaryDirectory(prefix="novnc-") as tmp:
        subprocess.run(
            ["npm", "pack", f"{NOVNC_PACKAGE}@{NOVNC_VERSION}", "--silent"],
            cwd=tmp,
            check=True,
            capture_output=True,
            timeout=300,
        )
        tarball = next(Path(tmp).glob("*.tgz"))
        digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
        if digest != NOVNC_INTEGRITY:
            raise RuntimeError(f"{tarball.name}: integrity {digest} is not the pinned {NOVNC_INTEGRITY}")
        unpacked = Path(tmp) / "out"
        with tarfile.open(tarball) as archive:
            archive.extractall(unpacked, filter="data")
        staging = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name in KEEP:
            source = unpacked / "package" / name
            if source.is_dir():
                shutil.copytree(source, staging / name)
            elif source.exists():
                shutil.copy2(source, staging / name)
        (staging / ".version").write_text(NOVNC_VERSION + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    return dest


if __name__ == "__main__":
    path = fetch_novnc()
    print(f"noVNC {NOVNC_VERSION} in {path}")
    sys.exit(0)
