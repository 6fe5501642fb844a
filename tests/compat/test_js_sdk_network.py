"""The stock npm `e2b` SDK (pinned in conftest.py) against the stack: network options (issue 12 items 1-3).

The script runs with the host's node and the same E2B_* variables a user would set.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.stack

SCRIPT = r"""
import { Sandbox } from 'e2b'

const out = {}
const sbx = await Sandbox.create({ timeoutMs: 120_000, network: { allowPublicTraffic: false, denyOut: ['198.51.100.0/24'] } })
try {
  out.token = Boolean(sbx.trafficAccessToken)
  out.echo = (await sbx.commands.run('echo hi')).stdout
  const info = await sbx.getInfo()
  out.network = info.network
  await sbx.updateNetwork({ allowOut: ['allowed.test'], denyOut: ['0.0.0.0/0'] })
  out.updated = (await sbx.getInfo()).network
  try {
    await sbx.updateNetwork({ allowOut: ['not a host!'] })
    out.badUpdate = 'accepted'
  } catch (e) {
    out.badUpdate = String(e.message)
  }
  try {
    await Sandbox.create({ timeoutMs: 30_000, network: { egressProxy: { address: 'proxy.example.test:1080' } } })
    out.badCreate = 'accepted'
  } catch (e) {
    out.badCreate = String(e.message)
  }
} finally {
  await sbx.kill()
}
console.log(JSON.stringify(out))
"""


def test_js_sdk_network_options(sdk_env: dict[str, str], npm_e2b: Path) -> None:
    script = npm_e2b / f"network-{os.getpid()}.mjs"  # beside node_modules so `import 'e2b'` resolves
    script.write_text(SCRIPT)
    try:
        proc = subprocess.run(
            ["node", str(script)], env={**os.environ, **sdk_env}, capture_output=True, text=True, timeout=180
        )
    finally:
        script.unlink()
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["token"] is True
    assert out["echo"] == "hi\n"  # envd keeps working without the traffic token
    assert out["network"]["allowPublicTraffic"] is False
    assert out["network"]["denyOut"] == ["198.51.100.0/24"]
    assert out["updated"]["allowOut"] == ["allowed.test"]
    assert out["updated"]["denyOut"] == ["0.0.0.0/0"]
    assert "not an IPv4 address, CIDR range or domain name" in out["badUpdate"]
    assert "network.egressProxy is not supported by this server" in out["badCreate"]
