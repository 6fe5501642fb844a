"""Template layers through S3 (E2B_TEMPLATE_STORE, issue 15 item 4) vs a local copy.

Runs moto's standalone S3 server on loopback (the tests' server; MinIO would be faster and real
S3 slower, so the ratio is this machine's, not a network's). For `base`'s layers (envd, os) of the
shared templates dir: upload (tar | multipart PUT), download (GET | tar -x into a temp dir, renamed),
and the baseline `cp -a` of the same layer dir in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import httpx

from pmoves_e2b.config import SHARED_TEMPLATES_DIR
from pmoves_e2b.sandbox.templates.s3store import S3TemplateStore


def _moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            httpx.get(url, timeout=2)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("moto_server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--templates-dir", type=Path, default=SHARED_TEMPLATES_DIR)
    args = parser.parse_args()
    layers = json.loads((args.templates_dir / "base.json").read_text())["layers"]
    proc, url = _moto()
    scratch = Path(tempfile.mkdtemp(prefix="pmoves-bench-store-"))
    try:
        keys = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench-secret"}
        boto3.client("s3", endpoint_url=url, region_name="us-east-1", **keys).create_bucket(Bucket="bench")
        store = S3TemplateStore(
            "s3://bench/layers",
            endpoint_url=url,
            access_key_id=keys["aws_access_key_id"],
            secret_access_key=keys["aws_secret_access_key"],
        )
        source = scratch / "source"
        (source / "layers").mkdir(parents=True)
        for layer in layers:
            (source / "layers" / layer).symlink_to(args.templates_dir / "layers" / layer)
        print(f"{'layer':<24} {'MB':>6} {'upload s':>9} {'download s':>11} {'cp -a s':>8} {'download/cp':>12}")
        for layer in layers:
            size = int(
                subprocess.run(
                    ["du", "-sb", f"{source / 'layers' / layer}/."], capture_output=True, text=True, check=True
                ).stdout.split()[0]
            )
            up, down, copy = [], [], []
            for run in range(args.runs):
                store._client.delete_object(Bucket="bench", Key=f"layers/layers/{layer}.tar")
                started = time.perf_counter()
                store.push_layer(source, layer)
                up.append(time.perf_counter() - started)
                target = scratch / f"pull-{run}"
                started = time.perf_counter()
                store.pull_layer(target, layer)
                down.append(time.perf_counter() - started)
                started = time.perf_counter()
                subprocess.run(["cp", "-a", f"{source / 'layers' / layer}/.", str(scratch / f"cp-{run}")], check=True)
                copy.append(time.perf_counter() - started)
                shutil.rmtree(target)
                shutil.rmtree(scratch / f"cp-{run}")
            u, d, c = (statistics.median(x) for x in (up, down, copy))
            print(f"{layer:<24} {size / 1e6:>6.1f} {u:>9.2f} {d:>11.2f} {c:>8.2f} {d / c:>12.2f}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
