"""Run E2B's own upstream test suites, unmodified, against a fresh pmoves-e2b stack (issue 12).

Not part of `make test`: the suites live outside this repository. Get them as git dirs (any clone
of e2b-dev/E2B and e2b-dev/code-interpreter) and run, as root:

    .venv/bin/python tests/upstream/run_upstream.py --e2b GITDIR --code-interpreter GITDIR \
        [--work /var/tmp/pmoves-upstream] [--suite python-sdk ...] [--tls] \
        [--stack-env E2B_ISOLATION=gvisor ...] [-- extra pytest args]

Each suite's tests are exported (`git archive`) into the work dir, run with the pinned stock SDKs
(below) in a venv / node_modules there, and summed up as `<suite>: N passed, N failed, N skipped`
from a JUnit report. The stack is one `pmoves-e2b up` on free ports (tests/stack/harness.py),
stopped at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stack.harness import RunningStack, make_stack, stop_and_clean

PYTHON_PINS = (
    "e2b==2.63.0",
    "e2b-code-interpreter==2.11.5",
    "pytest>=9,<10",
    "pytest-asyncio>=1.3,<2",
    "pytest-timeout>=2.4,<3",
    "pytest-xdist>=3.3,<4",
    "python-dotenv>=1,<2",
)
NPM_SDK_PINS = {"e2b": "2.51.0", "@e2b/code-interpreter": "2.8.0"}
# What the tests need of the suite's devDependencies (the version it asks for, else this one).
NPM_TEST_TOOLS = {"vitest": "^4.1.0", "dotenv": "^16.4.5", "msw": "^2.12.10", "error-stack-parser-es": "^1.0.5"}

# suite -> (repo option, path in that repo, runner)
SUITES = {
    "python-sdk": ("e2b", "packages/python-sdk", "pytest"),
    "js-sdk": ("e2b", "packages/js-sdk", "vitest"),
    "code-interpreter-python": ("code_interpreter", "python", "pytest"),
    "code-interpreter-js": ("code_interpreter", "js", "vitest"),
}
# What each suite runs: its integration tests, not its offline unit tests of SDK internals.
PYTEST_TARGETS = {"python-sdk": ["tests/sync", "tests/async"], "code-interpreter-python": ["tests"]}
VITEST_CONFIG = """\
export default {
  test: {
    include: ['tests/**/*.test.ts'],
    exclude: ['tests/runtimes/**', 'tests/template/**', 'tests/bundle/**', '**/*.browser.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    environment: 'node',
    setupFiles: SETUP_FILES,
    reporters: ['default', 'junit'],
    outputFile: { junit: 'junit.xml' },
  },
}
"""


def export(git_dir: Path, path: str, dest: Path, runner: str) -> Path:
    """The suite at HEAD:path, written under dest. For pytest only its tests and pytest.ini: the
    SDK's own source beside them would shadow the pinned SDK from PyPI. The JS tests import
    their SDK from ../src, so the whole package comes along."""
    paths = [f"{path}/tests", f"{path}/pytest.ini"] if runner == "pytest" else [path]
    archive = subprocess.run(
        ["git", "--git-dir", str(git_dir), "archive", "HEAD", *paths], check=True, capture_output=True
    )
    shutil.rmtree(dest, ignore_errors=True)  # fresh each run
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest / path


def python_env(work: Path) -> Path:
    venv = work / "venv"
    if not (venv / "bin/python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin/pip"), "install", "-q", *PYTHON_PINS], check=True)
    return venv / "bin/python"


def node_env(work: Path, name: str, root: Path) -> Path:
    """node_modules with the suite package's own dependencies (its tests import its ../src) and
    the test tools; the stock npm SDK pinned where the package depends on it."""
    package = json.loads((root / "package.json").read_text())
    deps = {**package.get("dependencies", {}), **package.get("optionalDependencies", {})}
    deps.update({sdk: version for sdk, version in NPM_SDK_PINS.items() if sdk in deps})
    dev = package.get("devDependencies", {})
    deps.update({tool: dev.get(tool, version) for tool, version in NPM_TEST_TOOLS.items()})
    modules = work / f"node-{name}"
    modules.mkdir(exist_ok=True)
    manifest = json.dumps({"private": True, "dependencies": deps}, indent=1)
    if not (modules / "node_modules/vitest").exists() or (modules / "package.json").read_text() != manifest:
        (modules / "package.json").write_text(manifest)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=modules, check=True)
    return modules / "node_modules"


def counts(junit: Path) -> tuple[int, int, int]:
    if not junit.exists():
        return 0, 0, 0
    passed = failed = skipped = 0
    for case in ET.parse(junit).getroot().iter("testcase"):  # noqa: S314 - our own runner wrote it
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            failed += 1
        elif "skipped" in kinds:
            skipped += 1
        else:
            passed += 1
    return passed, failed, skipped


def run_suite(
    name: str, root: Path, stack: RunningStack, work: Path, extra: list[str], tls: bool
) -> tuple[int, int, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
    if tls:  # the production-style route: no deprecated URL options, https://{port}-{id}.{domain}
        env.update(E2B_API_KEY=stack.api_key, E2B_DOMAIN=f"e2b.localhost:{stack.tls_port}")
    else:
        env.update(stack.sdk_env)
    # get_host()/getHost() URLs are https://{port}-{id}.e2b.localhost:<tls port>: trust our CA (README).
    env.update(SSL_CERT_FILE=str(stack.ca_bundle), NODE_EXTRA_CA_CERTS=str(stack.ca_bundle.with_name("ca.pem")))
    junit = root / "junit.xml"
    junit.unlink(missing_ok=True)
    log = work / f"{name}.log"
    if SUITES[name][2] == "pytest":
        # the pytest script, not `python -m pytest`: that would put the cwd on sys.path
        cmd = [str(work / "venv/bin/pytest"), *PYTEST_TARGETS[name], "-p", "no:cacheprovider", f"--junitxml={junit}"]
        cmd += ["-o", "addopts=--import-mode=importlib", "-n", "2", "--timeout", "120", "-rfEs", *extra]
    else:
        modules = node_env(work, name, root)
        (root / "node_modules").unlink(missing_ok=True)
        (root / "node_modules").symlink_to(modules)
        setup = [f for f in ("tests/globalFetchFallback.setup.ts",) if (root / f).exists()]
        (root / "vitest.upstream.mjs").write_text(VITEST_CONFIG.replace("SETUP_FILES", json.dumps(setup)))
        # Files that mock E2B's API with msw never reach a server: run them as upstream's CI does,
        # without our URLs (which would send their requests past the mocks).
        mocked = sorted(str(f.relative_to(root)) for f in (root / "tests").rglob("*.test.ts") if "msw" in f.read_text())
        vitest = [str(modules / ".bin/vitest"), "run", "--config", "vitest.upstream.mjs"]
        mock_env = {k: v for k, v in env.items() if not k.startswith("E2B_")} | {"E2B_API_KEY": "e2b_" + "0" * 40}
        with log.open("w") as out:
            subprocess.run(
                [*vitest, *(f"--exclude={f}" for f in mocked), *extra], cwd=root, env=env, stdout=out, stderr=out
            )
            live = counts(junit)
            junit.unlink(missing_ok=True)
            if mocked:
                subprocess.run([*vitest, *mocked, *extra], cwd=root, env=mock_env, stdout=out, stderr=out)
        mock = counts(junit)
        return live[0] + mock[0], live[1] + mock[1], live[2] + mock[2]
    with log.open("w") as out:
        subprocess.run(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    return counts(junit)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--e2b", type=Path, help="git dir of e2b-dev/E2B")
    parser.add_argument(
        "--code-interpreter", dest="code_interpreter", type=Path, help="git dir of e2b-dev/code-interpreter"
    )
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/pmoves-upstream"))
    parser.add_argument("--suite", action="append", choices=sorted(SUITES), help="default: every suite with a repo")
    parser.add_argument("--tls", action="store_true", help="E2B_DOMAIN host routing over TLS, not E2B_*_URL")
    parser.add_argument(
        "--stack-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of the stack, e.g. E2B_ISOLATION=gvisor (repeatable)",
    )
    parser.add_argument("extra", nargs="*", help="passed on to pytest / vitest (after --)")
    args = parser.parse_args()
    stack_env = dict(item.partition("=")[::2] for item in args.stack_env)
    repos = {"e2b": args.e2b, "code_interpreter": args.code_interpreter}
    suites = args.suite or [name for name, (repo, _, _) in SUITES.items() if repos[repo]]
    args.work.mkdir(parents=True, exist_ok=True)
    # Clients first: a registry hiccup should not cost a stack start.
    runners = {SUITES[name][2] for name in suites}
    if "pytest" in runners:
        python_env(args.work)
    stack = make_stack(stack_env)
    results = {}
    try:
        stack.up()
        for name in suites:
            repo, path, runner = SUITES[name]
            if repos[repo] is None:
                parser.error(f"--{repo.replace('_', '-')} is needed for suite {name}")
            root = export(repos[repo], path, args.work / name, runner)
            results[name] = run_suite(name, root, stack, args.work, args.extra, args.tls)
            print(
                f"{name}: {results[name][0]} passed, {results[name][1]} failed, {results[name][2]} skipped", flush=True
            )
    finally:
        stop_and_clean(stack)
    total = [sum(r[i] for r in results.values()) for i in range(3)]
    print(f"upstream: {total[0]} passed, {total[1]} failed, {total[2]} skipped (logs in {args.work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
