"""``commands.run("true")`` per isolation tier through the stock SDK, beside the floor inside.

Run as root: ``.venv/bin/python bench/bench_commands.py [--runs 40]`` (``E2B_TEMPLATES_DIR`` picks
the templates, default the shared ones). One stack; each tier's sandbox is picked by metadata. Rows:
- ``commands.run("true")`` and ``run_code("1+1")`` on ns (the baseline) and gvisor, and the ratio
  (issue 18's goal: gvisor within 2x ns);
- the floor, measured inside each tier's sandbox by a python (root) with no RPC: what envd's spawn
  does for that call (``bash -l -c true`` as ``user`` through envd's own ``spawn.spawn``, waited for),
  the same without the login profile, ``/bin/true`` alone, and the former path (``Popen`` of the
  static ``pmoves-spawn`` helper, which then execs bash). The SDK's time minus the first is what
  envd's request handling, the network and the proxy add.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from stack.harness import SHARED_TEMPLATES_DIR  # noqa: E402
from tier_sdk import TIMEOUT, command_true, row, run_code, tier_stack  # noqa: E402

TIERS = ("ns", "gvisor")

# Runs inside a sandbox as root: seconds per spawn-and-wait of each way, as JSON.
FLOOR = r"""
import json, os, subprocess, sys, time
sys.path.insert(0, "/opt/pmoves/site")
from pmoves_e2b.envd import spawn
from pmoves_e2b.envd.users import lookup_user

user = lookup_user("user")
env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": user.home,
       "USER": user.name, "LOGNAME": user.name}
runs = int(sys.argv[1])

def envd_spawn(argv):
    def once():
        read, write = os.pipe2(os.O_CLOEXEC)
        child = spawn.spawn(argv, user, None, fds=(None, write, write), cwd=user.home, env=env)
        os.close(write)
        os.read(read, 1)
        os.close(read)
        os.waitpid(child.pid, 0)
    return once

def helper(argv):
    ids = [f"--uid={user.uid}", f"--gid={user.gid}", "--groups=" + ",".join(map(str, user.groups()))]
    command = ["/opt/pmoves/bin/pmoves-spawn", *ids, "--", *argv]
    return lambda: subprocess.run(command, env=env, cwd=user.home, start_new_session=True, stdin=subprocess.DEVNULL)

ways = {"bash -l -c true (Popen + spawn helper, before)": helper(["/bin/bash", "-l", "-c", "true"])}
if hasattr(spawn, "spawn"):  # templates from before envd's own spawn have the helper's way only
    ways = {
        "bash -l -c true (envd's spawn)": envd_spawn(["/bin/bash", "-l", "-c", "true"]),
        "bash -c true (no login profile)": envd_spawn(["/bin/bash", "-c", "true"]),
        "/bin/true": envd_spawn(["/bin/true"]),
        **ways,
    }
samples = {name: [] for name in ways}
for name, way in ways.items():
    way()
for _ in range(runs):
    for name, way in ways.items():  # interleaved: load changes touch every way alike
        started = time.perf_counter()
        way()
        samples[name].append(time.perf_counter() - started)
print(json.dumps(samples))
"""


def floor(tier: str, runs: int) -> dict[str, list[float]]:
    from e2b import Sandbox

    sandbox = Sandbox.create(metadata={"e2b.isolation": tier}, request_timeout=TIMEOUT)
    try:
        sandbox.files.write("/tmp/floor.py", FLOOR)
        done = sandbox.commands.run(f"python3 /tmp/floor.py {runs}", user="root", timeout=TIMEOUT)
        result: dict[str, list[float]] = json.loads(done.stdout)
        return result
    finally:
        sandbox.kill()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=40)
    options = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f} (2 cores); templates {SHARED_TEMPLATES_DIR}", flush=True)
    with tier_stack():
        commands = {tier: command_true(tier, options.runs)[0] for tier in TIERS}
        codes = {tier: run_code(tier, options.runs) for tier in TIERS}
        floors = {tier: floor(tier, options.runs) for tier in TIERS}
    row('ns: commands.run("true") (baseline)', commands["ns"])
    row('gvisor: commands.run("true")', commands["gvisor"], "ns", commands["ns"])
    row('ns: run_code("1+1") (baseline)', codes["ns"])
    row('gvisor: run_code("1+1")', codes["gvisor"], "ns", codes["ns"])
    for tier in TIERS:
        floor_name = "bash -l -c true (envd's spawn)"
        base = floors[tier].get(floor_name)
        for name, values in floors[tier].items():
            row(f"{tier} inside: {name}", values, *(("envd's spawn", base) if base and name != floor_name else ()))
        if base:
            row(f'{tier}: commands.run("true") vs the floor inside', commands[tier], "floor", base)
    print(f"load average at end: {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
