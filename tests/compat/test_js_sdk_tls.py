"""The stock npm SDKs over the documented TLS route (issue 12 item 14): E2B_DOMAIN=e2b.localhost:<port>.

Node resolves names with glibc, which knows nothing of `*.localhost` unless the host has nss-myhostname
(`make sysdeps` installs libnss-myhostname); Node trusts our CA through NODE_EXTRA_CA_CERTS.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from pmoves_e2b.cli import host_routing_hint

pytestmark = pytest.mark.stack

SCRIPT = r"""
import { Sandbox } from '@e2b/code-interpreter'

const out = {}
const sbx = await Sandbox.create({ timeoutMs: 120_000 })
try {
  out.host = sbx.getHost(49983)
  out.echo = (await sbx.commands.run('echo over-tls')).stdout
  await sbx.files.write('/tmp/t', 'tls-file')
  out.file = await sbx.files.read('/tmp/t')
  out.code = (await sbx.runCode('6 * 7')).text
} finally {
  await sbx.kill()
}
console.log(JSON.stringify(out))
"""


def test_glibc_resolves_localhost_subdomains() -> None:
    """What Node (and every glibc program) needs for host routing under `*.e2b.localhost`."""
    addresses = {info[4][0] for info in socket.getaddrinfo("49983-abc.e2b.localhost", 443, type=socket.SOCK_STREAM)}
    assert addresses <= {"127.0.0.1", "::1"} and addresses


def test_js_sdk_over_tls_host_routing(running_stack, npm_e2b: Path) -> None:  # type: ignore[no-untyped-def]
    script = npm_e2b / f"tls-{os.getpid()}.mjs"  # beside node_modules so the imports resolve
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
    env.update(
        E2B_API_KEY=running_stack.api_key,
        E2B_DOMAIN=f"e2b.localhost:{running_stack.tls_port}",
        NODE_EXTRA_CA_CERTS=str(running_stack.ca_bundle.with_name("ca.pem")),
    )
    try:
        proc = subprocess.run(["node", str(script)], env=env, capture_output=True, text=True, timeout=240)
    finally:
        script.unlink()
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["host"].startswith("49983-") and out["host"].endswith(f".e2b.localhost:{running_stack.tls_port}")
    assert out["echo"] == "over-tls\n"
    assert out["file"] == "tls-file"
    assert out["code"] == "42"


def test_up_names_the_missing_resolver_step() -> None:
    """`pmoves-e2b up` tells a user whose host cannot resolve the routing names what to install."""
    assert host_routing_hint("e2b.localhost") is None  # this host has nss-myhostname (make sysdeps)

    def unresolvable(*args: object, **kwargs: object) -> object:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    assert "libnss-myhostname" in (host_routing_hint("e2b.localhost", unresolvable) or "")
    assert "wildcard DNS" in (host_routing_hint("sandboxes.example.com", unresolvable) or "")
