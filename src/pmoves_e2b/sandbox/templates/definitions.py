"""The built-in templates and the layers they are made of.

    base                 = envd + os
    code-interpreter-v1  = interpreter + kernels + envd + os      (topmost first)
    desktop              = desktop + envd + os

``os`` is Debian bookworm from the host's apt mirror; ``envd`` holds only the in-sandbox
daemon and its dependencies, so a change to envd rebuilds that small layer alone;
``kernels`` (Jupyter kernels and the data stack, built on ``os``) does not depend on envd
or on the interpreter server, which has a small layer of its own.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pmoves_e2b
from pmoves_e2b.desktop_boot import (
    DISPLAY,
    SESSION_READY,
    WARM_RESOLUTION,
    WARM_TEMPLATE,
    X_READY,
    X_START_S,
    until,
    xvfb,
)
from pmoves_e2b.envd import SPAWN_HELPER, SPAWN_LIBRARY
from pmoves_e2b.sandbox import native

from .errors import MissingHostTool
from .model import BuildContext, LayerSpec, Step, TemplateSpec, tree_digest
from .rootfs import PRIVATE_NAMESPACES, remove_tree

PACKAGE_DIR = Path(pmoves_e2b.__file__).resolve().parent
SUITE = "bookworm"
# python-is-python3: `python` on PATH, as in E2B's base template
OS_PACKAGES = "python3 python-is-python3 ca-certificates git curl sudo procps iproute2 less nodejs"
NPM_VERSION = "10.9.9"  # the newest npm that still runs on Debian's Node 18
SANDBOX_USER, SANDBOX_UID = "user", 1000
# The sandbox backend sets this hostname; /etc/hosts must resolve it or every sudo complains.
HOSTNAME = "e2b"
# Docs, man pages and translations are a fifth of the rootfs and nobody reads them in a sandbox.
DPKG_SLIM = b"""\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""

ENVD_SITE = "/opt/pmoves/site"
ENVD_BIN = "/opt/pmoves/bin/envd"
SUDO_SHIM = "/usr/local/bin/sudo"  # before /usr/bin in every PATH the sandbox sets
SUDO_SOCKET = "/run/pmoves/sudo.sock"  # the shim's default too (envd/sudo_shim.py)
ENVD_STATE_FILE = "/dev/shm/pmoves-envd/state.json"  # noqa: S108 - the sandbox's own tmpfs (envd/state.py)
# envd runs on the rootfs's /usr/bin/python3 (3.11): its wheels are fetched for that interpreter.
# httptools and uvloop: envd's uvicorn picks them up when present (faster HTTP parsing and loop).
# connectrpc is pinned to the version that generated envd/gen (its MethodInfo changed in 0.13).
ENVD_REQUIREMENTS = (
    "connectrpc==0.12.1",
    "protobuf-py>=0.6,<0.7",
    "uvicorn>=0.30,<1",
    "httptools>=0.6,<1",
    "uvloop>=0.19,<1",
)
TARGET_PYTHON = "3.11"
# pip does not widen --platform: name every manylinux tag bookworm's glibc 2.36 accepts.
TARGET_PLATFORMS = ("manylinux2014_x86_64", *(f"manylinux_2_{minor}_x86_64" for minor in range(17, 37)))

VENV = "/opt/venv"
VENV_SITE = f"{VENV}/lib/python3.11/site-packages"
KERNEL_PACKAGES = "ipykernel jupyter_client e2b-charts bash_kernel nbformat"
SERVER_PACKAGES = "fastapi 'uvicorn[standard]' httpx orjson"
# The versions E2B's code-interpreter template pins (its template/requirements.txt) for the packages
# both have: user code and E2B's own tests depend on them (matplotlib 3.11 dropped boxplot's `labels=`).
DATA_PACKAGES = (
    "numpy==2.3.5 pandas==2.2.3 matplotlib==3.10.9 seaborn==0.13.2 scipy==1.17.1 scikit-learn==1.6.1 "
    "requests==2.33.0 beautifulsoup4==4.15.0 openpyxl==3.1.5 pillow==12.3.0 sympy==1.14.0 plotly==6.0.1 "
    "orjson==3.11.9"
)
DENO_VERSION = "2.9.6"
# Java: JJava (the maintained IJava fork; PyPI wheel with its jars) on Debian's JDK 17 (jshell).
JAVA_APT = "openjdk-17-jdk-headless"
JJAVA_VERSION = "1.0a8"
INTERPRETER_PORT = 49999
NETWORK_RETRIES = 2  # registry hiccups should not cost a whole rebuild


# ---- layer os -----------------------------------------------------------------------------


def _debootstrap(ctx: BuildContext) -> None:
    if not shutil.which("debootstrap"):
        raise MissingHostTool("debootstrap is not installed: run `make sysdeps` (apt-get install debootstrap)")
    for leftover in ctx.target.iterdir():  # a retry starts from an empty target
        if leftover.is_dir() and not leftover.is_symlink():
            remove_tree(leftover)
        else:
            leftover.unlink()
    # Own mount namespace: debootstrap mounts /proc and /sys inside the target.
    ctx.run([*PRIVATE_NAMESPACES, "debootstrap", "--variant=minbase", SUITE, str(ctx.target), ctx.host.mirror])


def _apt_config(ctx: BuildContext) -> None:
    if ctx.host.apt_files:
        (ctx.target / "etc/apt/sources.list").unlink(missing_ok=True)
    for path, content in ctx.host.apt_files.items():
        _write(ctx.target, path, content)
    _write(ctx.target, "/etc/dpkg/dpkg.cfg.d/pmoves-slim", DPKG_SLIM)
    # No services start inside a build or a sandbox.
    _write(ctx.target, "/usr/sbin/policy-rc.d", b"#!/bin/sh\nexit 101\n", mode=0o755)


def _apt_install(ctx: BuildContext) -> None:
    ctx.chroot(f"apt-get update -q && apt-get install -y -q --no-install-recommends {OS_PACKAGES}")


def _trust_host_cas(ctx: BuildContext) -> None:
    for name, pem in ctx.host.ca_certs.items():
        _write(ctx.target, f"/usr/local/share/ca-certificates/{name}", pem)
    ctx.chroot("update-ca-certificates")


def _npm(ctx: BuildContext) -> None:
    # Debian's npm package pulls 363 packages (gcc included); the registry's npm is pure JS.
    if not shutil.which("npm"):
        raise MissingHostTool("npm is needed on the host to put npm into the rootfs: apt-get install npm")
    ctx.run(
        [
            "npm",
            "install",
            "-g",
            "--no-audit",
            "--no-fund",
            "--prefix",
            str(ctx.target / "usr/local"),
            f"npm@{NPM_VERSION}",
        ]
    )
    # npm's global prefix follows node (/usr/bin/node): global installs and its config live under /usr.
    _write(ctx.target, "/usr/etc/npmrc", ctx.host.npmrc.encode())


def _user(ctx: BuildContext) -> None:
    ctx.chroot(f"useradd -m -u {SANDBOX_UID} -U -s /bin/bash {SANDBOX_USER}")
    _write(
        ctx.target,
        f"/etc/sudoers.d/{SANDBOX_USER}",
        f"{SANDBOX_USER} ALL=(ALL:ALL) NOPASSWD: ALL\n".encode(),
        mode=0o440,
    )
    _write(ctx.target, "/etc/hostname", f"{HOSTNAME}\n".encode())
    _write(
        ctx.target,
        "/etc/hosts",
        (
            f"127.0.0.1\tlocalhost {HOSTNAME} {HOSTNAME}.local\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            "ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
        ).encode(),
    )
    _write(ctx.target, "/etc/resolv.conf", ctx.host.resolv_conf)


# Every SDK command is `bash -l -c ...`, so the login profile runs before each one. Debian's starts two
# programs there: `$(id -u)` in /etc/profile and root's `mesg n`. Each is a fork and an exec, which
# under gVisor's ptrace platform costs ~8 ms (a third of a command), on ns ~0.6 ms. bash knows its
# uid ($EUID; dash still asks id) and mesg only matters on a terminal, so the same profile starts none.
LOGIN_PROFILE_EDITS = {
    "/etc/profile": ('"$(id -u)"', '"${EUID:-$(id -u)}"'),
    "/root/.profile": ("\nmesg n 2> /dev/null || true", "\nif [ -t 0 ]; then mesg n 2> /dev/null || true; fi"),
}


def _login_profile(ctx: BuildContext) -> None:
    for path, (old, new) in LOGIN_PROFILE_EDITS.items():
        file = ctx.target / path.lstrip("/")
        text = file.read_text()
        if old not in text:
            raise RuntimeError(f"{path} of the os layer no longer has {old!r}: review LOGIN_PROFILE_EDITS")
        file.write_text(text.replace(old, new))


def _clean_os(ctx: BuildContext) -> None:
    ctx.chroot(
        "apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt/* "
        "/var/log/dpkg.log /var/cache/debconf/*-old /root/.npm /usr/share/man/* /usr/share/info/* "
        "/usr/share/groff/* /usr/share/lintian/* "
        "&& find /usr/share/doc -type f ! -name copyright -delete "
        "&& find /usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +"
    )
    # debootstrap leaves its log and the package list it used.
    shutil.rmtree(ctx.target / "debootstrap", ignore_errors=True)


OS_LAYER = LayerSpec(
    name="os",
    steps=(
        Step("debootstrap Debian bookworm (minbase)", _debootstrap, f"{SUITE} minbase", retries=NETWORK_RETRIES),
        Step("apt sources and options from the host", _apt_config, "policy-rc.d 101" + DPKG_SLIM.decode()),
        Step("apt install base packages", _apt_install, OS_PACKAGES, retries=NETWORK_RETRIES),
        Step("trust the host's CA certificates", _trust_host_cas, "update-ca-certificates"),
        Step("npm from the npm registry", _npm, NPM_VERSION + " /usr/etc/npmrc", retries=NETWORK_RETRIES),
        Step("user 'user' (uid 1000, sudo), hostname, hosts", _user, f"{SANDBOX_USER} {SANDBOX_UID} {HOSTNAME} v1"),
        Step("login shells start no programs", _login_profile, repr(sorted(LOGIN_PROFILE_EDITS.items()))),
        Step("clean apt caches, docs, translations", _clean_os, "v2"),
    ),
    # A new proxy CA must reach the rootfs trust store; the mirror itself does not matter.
    inputs=lambda host: host.ca_fingerprint().encode() + host.npmrc.encode(),
)


# ---- layer envd ---------------------------------------------------------------------------


def _envd_deps(ctx: BuildContext) -> None:
    ctx.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--upgrade",
            "--target",
            str(ctx.target / ENVD_SITE.lstrip("/")),
            "--only-binary=:all:",
            "--python-version",
            TARGET_PYTHON,
            "--implementation",
            "cp",
            *(arg for platform in TARGET_PLATFORMS for arg in ("--platform", platform)),
            *ENVD_REQUIREMENTS,
        ]
    )


def _envd_sources(ctx: BuildContext) -> None:
    _copy_package(ctx.target / ENVD_SITE.lstrip("/"), "envd")
    ctx.run([sys.executable, "-m", "compileall", "-q", "-j", "0", str(ctx.target / ENVD_SITE.lstrip("/"))])


def envd_launcher(python: str = "/usr/bin/python3", env: dict[str, str] | None = None) -> bytes:
    """The launcher script; ``python`` (shell words) runs envd, ``env`` is more of envd's environment
    (image templates: envd's own runtime)."""
    # The sandbox's first process (a few hundred KB of dash): restarts an envd that died, e.g. when the
    # sandbox's OOM chose it, with the state /init gave it (ENVD_STATE_FILE). An envd that never got
    # /init, or died 3 times in a row within a minute each, is not restarted: the launcher ends every
    # process of the sandbox (bwrap's init would wait for them), so the sandbox ends and the host
    # reports it (killed, reason "died").
    # With ENVD_FORKED_FD=R,W (the ns backend's zygote path) the first envd is forked into the sandbox
    # by the host from the template's envd zygote: the launcher opens pipe R, says it runs on pipe W, and
    # envd (the only writer of R) writes a line when it runs; R's end is its exit. No line = no envd
    # came (the zygote failed): start one here. ENVD_ZYGOTE: this is the zygote itself (host side).
    # The uptime is read with the shell's own read: a $(cut ...) was a fork and an exec per start.
    extra = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in (env or {}).items())
    script = f"""#!/bin/sh
export ENVD_SUDO_SOCKET={SUDO_SOCKET} PYTHONPATH={ENVD_SITE} ENVD_STATE_FILE={ENVD_STATE_FILE}
{extra}[ -n "$ENVD_ZYGOTE" ] && exec {python} -m pmoves_e2b.envd "$@"
quick=0
forked=$ENVD_FORKED_FD
unset ENVD_FORKED_FD
while :; do
    read -r up _ </proc/uptime
    started=${{up%%.*}}
    if [ -n "$forked" ]; then
        exec 3</proc/self/fd/${{forked%,*}}
        printf x >/proc/self/fd/${{forked#*,}}
        forked=
        if read -r _ <&3; then
            read -r _ <&3
            status=unknown code=1
        else
            exec 3<&-
            continue
        fi
        exec 3<&-
    else
        {python} -m pmoves_e2b.envd "$@"
        status=$? code=$?
    fi
    read -r up _ </proc/uptime
    if [ $((${{up%%.*}} - started)) -lt 60 ]; then quick=$((quick + 1)); else quick=1; fi
    if [ ! -s "$ENVD_STATE_FILE" ] || [ "$quick" -ge 3 ]; then
        echo "envd launcher: envd exited (status $status); not restarting it, the sandbox ends" >&2
        kill -KILL -1
        exit "$code"
    fi
    echo "envd launcher: envd exited (status $status); restarting it" >&2
done
"""
    return script.encode()


def _envd_launcher(ctx: BuildContext) -> None:
    _write(ctx.target, ENVD_BIN, envd_launcher(), mode=0o755)


def _spawn_helper(ctx: BuildContext) -> None:
    # sudo's command spawn in one exec instead of sh + setpriv (envd/spawn_helper.c); static, so it
    # runs on templates from any image.
    built = native.build(
        "pmoves-spawn", (PACKAGE_DIR / "envd/spawn_helper.c").read_bytes(), "", ("-O2", "-static", "-s")
    )
    if built is None:
        raise MissingHostTool(
            "envd's spawn helper could not be compiled (the warning above says why): apt-get install gcc libc6-dev"
        )
    _write(ctx.target, SPAWN_HELPER, built.read_bytes(), mode=0o755)


def _spawn_library(ctx: BuildContext) -> None:
    # The same in envd's process, without the helper's exec (envd/spawn_library.c): linked against
    # glibc, which envd always runs on (the template's python or envd's runtime, templates/runtime.py).
    built = native.build(
        "libpmoves-spawn", (PACKAGE_DIR / "envd/spawn_library.c").read_bytes(), ".so", ("-O2", "-shared", "-fPIC", "-s")
    )
    if built is None:
        raise MissingHostTool(
            "envd's spawn library could not be compiled (the warning above says why): apt-get install gcc libc6-dev"
        )
    _write(ctx.target, SPAWN_LIBRARY, built.read_bytes(), mode=0o644)


def _sudo_shim(ctx: BuildContext) -> None:
    # no_new_privs (bwrap) disables the setuid /usr/bin/sudo: this one asks envd (envd/sudo.py).
    _write(ctx.target, SUDO_SHIM, (PACKAGE_DIR / "envd/sudo_shim.py").read_bytes(), mode=0o755)


ENVD_LAYER = LayerSpec(
    name="envd",
    steps=(
        Step(
            "envd dependencies (wheels for python 3.11)",
            _envd_deps,
            " ".join(ENVD_REQUIREMENTS + TARGET_PLATFORMS),
            retries=NETWORK_RETRIES,
        ),
        Step("envd sources", _envd_sources, ENVD_SITE),
        Step("envd launcher", _envd_launcher, f"{ENVD_BIN} {SUDO_SOCKET} {ENVD_STATE_FILE} v5"),
        Step("sudo shim (runs commands through envd)", _sudo_shim, SUDO_SHIM),
        Step("spawn helper (sudo's commands start in one exec)", _spawn_helper, SPAWN_HELPER),
        Step("spawn library (envd's commands start with no exec but their own)", _spawn_library, SPAWN_LIBRARY),
    ),
    inputs=lambda host: _package_digest("envd"),
)


# ---- layer kernels (on os) ----------------------------------------------------------------

BASH_FAST = '''\
"""bash_kernel without pexpect's 50 ms delay before every send (3 s start -> 0.8 s, 110 -> 7 ms per cell)."""
import pexpect.spawnbase

_init = pexpect.spawnbase.SpawnBase.__init__


def _init_without_delay(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.delaybeforesend = None


pexpect.spawnbase.SpawnBase.__init__ = _init_without_delay

from bash_kernel.kernel import BashKernel  # noqa: E402
from ipykernel.kernelapp import IPKernelApp  # noqa: E402

IPKernelApp.launch_instance(kernel_class=BashKernel)
'''


def _kernel_apt(ctx: BuildContext) -> None:
    ctx.chroot(
        "apt-get update -q && apt-get install -y -q --no-install-recommends python3-venv r-base-core "
        "r-cran-irkernel && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin"
    )


def _venv(ctx: BuildContext) -> None:
    ctx.chroot(f"python3 -m venv {VENV} && {VENV}/bin/pip install -q -U pip")


def _pip_kernels(ctx: BuildContext) -> None:
    ctx.chroot(f"pip install -q {KERNEL_PACKAGES} {SERVER_PACKAGES}")


def _pip_data(ctx: BuildContext) -> None:
    ctx.chroot(f"pip install -q {DATA_PACKAGES}")


def _kernelspecs(ctx: BuildContext) -> None:
    ctx.chroot("python -m ipykernel install --sys-prefix && python -m bash_kernel.install --sys-prefix")
    bash_dir = ctx.target / VENV.lstrip("/") / "share/jupyter/kernels/bash"
    (bash_dir / "bash_fast.py").write_text(BASH_FAST)
    spec = json.loads((bash_dir / "kernel.json").read_text())
    spec["argv"] = [f"{VENV}/bin/python", f"{VENV}/share/jupyter/kernels/bash/bash_fast.py", "-f", "{connection_file}"]
    (bash_dir / "kernel.json").write_text(json.dumps(spec, indent=1))


def _deno(ctx: BuildContext) -> None:
    ctx.chroot(f"npm install -g --no-audit --no-fund deno@{DENO_VERSION} && npm cache clean --force")
    # SIGINT kills deno's kernel: interrupts must go as messages. NO_COLOR keeps text/plain clean.
    spec = {
        "argv": ["/usr/bin/deno", "jupyter", "--kernel", "--conn", "{connection_file}"],
        "display_name": "Deno (JavaScript, TypeScript)",
        "language": "typescript",
        "interrupt_mode": "message",
        "env": {"NO_COLOR": "1", "DENO_TLS_CA_STORE": "system"},
    }
    _write(ctx.target, "/usr/local/share/jupyter/kernels/deno/kernel.json", json.dumps(spec, indent=1).encode())


def _r_kernel(ctx: BuildContext) -> None:
    ctx.chroot('R -q -e \'IRkernel::installspec(user = FALSE, name = "ir", displayname = "R")\'')


def _java_kernel(ctx: BuildContext) -> None:
    # The JDK's postinst wants the man page dirs that dpkg's slim config leaves out.
    ctx.chroot(
        "mkdir -p /usr/share/man/man1 && apt-get update -q && apt-get install -y -q --no-install-recommends "
        f"{JAVA_APT} && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin "
        f"&& pip install -q jjava=={JJAVA_VERSION}"
    )


def _warm_caches(ctx: BuildContext) -> None:
    # matplotlib builds its font cache under $HOME on first import: do it once per user.
    warm = "MPLBACKEND=Agg python -c 'import matplotlib.pyplot'"
    ctx.chroot(
        f'{warm} && runuser -u {SANDBOX_USER} -- env HOME=/home/{SANDBOX_USER} PATH=$PATH bash -c "{warm}" '
        "&& rm -rf /root/.npm /root/.cache/pip /tmp/*"
    )


KERNELS_LAYER = LayerSpec(
    name="kernels",
    build_on=("os",),
    steps=(
        Step(
            "apt install python3-venv, R and IRkernel",
            _kernel_apt,
            "python3-venv r-base-core r-cran-irkernel",
            retries=NETWORK_RETRIES,
        ),
        Step("python venv /opt/venv", _venv, VENV, retries=NETWORK_RETRIES),
        Step(
            "pip install Jupyter kernels and server deps",
            _pip_kernels,
            KERNEL_PACKAGES + SERVER_PACKAGES,
            retries=NETWORK_RETRIES,
        ),
        Step("pip install the data stack", _pip_data, DATA_PACKAGES, retries=NETWORK_RETRIES),
        Step("kernelspecs python3 and bash (fast launcher)", _kernelspecs, BASH_FAST),
        Step(
            "Deno kernel (JavaScript, TypeScript) from npm",
            _deno,
            DENO_VERSION + " /usr/bin message NO_COLOR",
            retries=NETWORK_RETRIES,
        ),
        Step("IRkernel kernelspec", _r_kernel, "ir"),
        Step(
            "Java kernel (JJava on Debian's JDK)",
            _java_kernel,
            f"{JAVA_APT} jjava=={JJAVA_VERSION}",
            retries=NETWORK_RETRIES,
        ),
        Step("font caches, clean up", _warm_caches, "v1"),
    ),
)


# ---- layer interpreter --------------------------------------------------------------------


def _interpreter_sources(ctx: BuildContext) -> None:
    site = ctx.target / VENV_SITE.lstrip("/")
    _copy_package(site, "interpreter")
    ctx.run([sys.executable, "-m", "compileall", "-q", "-j", "0", str(site)])


INTERPRETER_LAYER = LayerSpec(
    name="interpreter",
    steps=(Step("interpreter server sources", _interpreter_sources, VENV_SITE),),
    inputs=lambda host: _package_digest("interpreter"),
)

# ---- layer desktop (on os) ----------------------------------------------------------------

# What the stock e2b-desktop SDK runs inside (e2b-wire-protocol.md §10), a text editor, a
# terminal, fonts and Debian's Chromium as the default browser.
DESKTOP_PACKAGES = (
    "xvfb xfce4 xfce4-terminal dbus-x11 x11-utils x11-xserver-utils xdotool scrot x11vnc net-tools "
    "libgtk-3-bin xdg-utils procps novnc websockify mousepad fonts-dejavu-core fonts-liberation2 chromium"
)
# Chromium runs as `user` under no_new_privs (its own sandbox cannot start; the sandbox is the
# isolation) and must not phone home (desktop-surf-mcp-nats.md §3).
CHROMIUM_FLAGS = (
    "--no-sandbox --test-type --disable-dev-shm-usage --no-first-run --no-default-browser-check "
    "--disable-background-networking --disable-component-update --disable-sync --disable-domain-reliability "
    "--disable-client-side-phishing-detection --metrics-recording-only "
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication,"
    "CertificateTransparencyComponentUpdater"
)
CHROMIUM_POLICY = {
    "MetricsReportingEnabled": False,
    "BrowserSignin": 0,
    "SyncDisabled": True,
    "SpellCheckServiceEnabled": False,
    "SafeBrowsingProtectionLevel": 0,
    "SearchSuggestEnabled": False,
    "DefaultBrowserSettingEnabled": False,
    "PromotionalTabsEnabled": False,
    "TranslateEnabled": False,
    "UrlKeyedAnonymizedDataCollectionEnabled": False,
}


def _desktop_apt(ctx: BuildContext) -> None:
    ctx.chroot(
        f"apt-get update -q && apt-get install -y -q --no-install-recommends {DESKTOP_PACKAGES} "
        "&& apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin"
    )


def _novnc_paths(ctx: BuildContext) -> None:
    # The SDK runs `cd /opt/noVNC/utils && ./novnc_proxy ... --web /opt/noVNC` and links vnc.html.
    ctx.chroot("ln -sfn /usr/share/novnc /opt/noVNC && ln -sf vnc.html /usr/share/novnc/index.html")


def _chromium_defaults(ctx: BuildContext) -> None:
    _write(ctx.target, "/etc/chromium.d/pmoves", f'export CHROMIUM_FLAGS="$CHROMIUM_FLAGS {CHROMIUM_FLAGS}"\n'.encode())
    _write(ctx.target, "/etc/chromium/policies/managed/pmoves.json", json.dumps(CHROMIUM_POLICY, indent=1).encode())
    helpers = b"WebBrowser=chromium\nTerminalEmulator=xfce4-terminal\n"
    _write(ctx.target, "/etc/xdg/xfce4/helpers.rc", helpers)
    mime = "".join(
        f"{kind}=chromium.desktop\n"
        for kind in ("x-scheme-handler/http", "x-scheme-handler/https", "text/html", "application/xhtml+xml")
    )
    _write(ctx.target, "/etc/xdg/mimeapps.list", b"[Default Applications]\n" + mime.encode())
    ctx.chroot("update-alternatives --set x-www-browser /usr/bin/chromium || true")


# XFCE set up for a desktop in a sandbox, which boots on demand on 2 shared cores: xfce4-session
# starts its clients by priority group, each group once the one before registered, so Debian's
# session (xfwm4, then xfsettingsd, the panel, Thunar's daemon, xfdesktop) spent ~0.8 s waiting
# before xfdesktop even started. Here one group starts them at once. Less to start, too: no
# Thunar daemon and no desktop file icons (xfdesktop's icons pull Thunar in over D-Bus and held
# its first draw back by ~0.5 s), no compositor (Xvfb has no GPU; every frame would be copied
# once more), and no panel plugins for what a sandbox has not got (sound, power, a tray, a
# notification daemon) or must not do (log out ends the desktop). Each plugin left out is a GTK
# process less.
XFCE_SESSION_CLIENTS = ("xfwm4", "xfsettingsd", "xfce4-panel", "xfdesktop")
XFCE_PANEL_DROPPED = ("systray", "pulseaudio", "power-manager-plugin", "notification-plugin", "actions")
XFCONF_DIR = "/etc/xdg/xfce4/xfconf/xfce-perchannel-xml"
PANEL_DEFAULTS = "/etc/xdg/xfce4/panel/default.xml"


def _xfconf(channel: str, props: str) -> bytes:
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<channel name="{channel}" version="1.0">\n{props}</channel>\n'.encode()


def _prop(name: str, kind: str, value: object) -> str:
    return f'<property name="{name}" type="{kind}" value="{value}"/>'


def _xfce_session_xml() -> bytes:
    clients = "".join(
        f'<property name="Client{i}_Command" type="array"><value type="string" value="{command}"/></property>'
        f"{_prop(f'Client{i}_Priority', 'int', 15)}{_prop(f'Client{i}_PerScreen', 'bool', 'false')}\n"
        for i, command in enumerate(XFCE_SESSION_CLIENTS)
    )
    return _xfconf(
        "xfce4-session",
        '<property name="general" type="empty">'
        f"{_prop('FailsafeSessionName', 'string', 'Failsafe')}{_prop('LockCommand', 'string', '')}</property>\n"
        '<property name="sessions" type="empty"><property name="Failsafe" type="empty">\n'
        f"{_prop('IsFailsafe', 'bool', 'true')}{_prop('Count', 'int', len(XFCE_SESSION_CLIENTS))}\n"
        f"{clients}</property></property>\n",
    )


def _slim_panel(xml: bytes) -> bytes:
    """Debian's panel defaults without the XFCE_PANEL_DROPPED plugins."""
    root = ET.fromstring(xml)  # noqa: S314 - the file Debian's xfce4-panel package just installed
    plugins = root.find("./property[@name='plugins']")
    if plugins is None:
        raise ValueError(f"{PANEL_DEFAULTS} has no plugins")
    dropped = set()
    for plugin in list(plugins):
        if plugin.get("value") in XFCE_PANEL_DROPPED:
            dropped.add(plugin.get("name", "").removeprefix("plugin-"))
            plugins.remove(plugin)
    for ids in root.iterfind(".//property[@name='plugin-ids']"):
        for value in list(ids):
            if value.get("value") in dropped:
                ids.remove(value)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root)


def _xfce_for_sandbox(ctx: BuildContext) -> None:
    _write(ctx.target, f"{XFCONF_DIR}/xfce4-session.xml", _xfce_session_xml())
    xfwm4 = f'<property name="general" type="empty">{_prop("use_compositing", "bool", "false")}</property>\n'
    _write(ctx.target, f"{XFCONF_DIR}/xfwm4.xml", _xfconf("xfwm4", xfwm4))
    icons = f'<property name="desktop-icons" type="empty">{_prop("style", "int", 0)}</property>\n'
    _write(ctx.target, f"{XFCONF_DIR}/xfce4-desktop.xml", _xfconf("xfce4-desktop", icons))
    panel = ctx.target / PANEL_DEFAULTS.lstrip("/")
    panel.write_bytes(_slim_panel(panel.read_bytes()))


DESKTOP_LAYER = LayerSpec(
    name="desktop",
    build_on=("os",),
    steps=(
        Step(
            "apt install Xvfb, XFCE, xdotool, x11vnc, noVNC, Chromium",
            _desktop_apt,
            DESKTOP_PACKAGES,
            retries=NETWORK_RETRIES,
        ),
        Step("noVNC at the SDK's path /opt/noVNC", _novnc_paths, "/opt/noVNC index.html v1"),
        Step(
            "Chromium: default browser, no phone-home",
            _chromium_defaults,
            CHROMIUM_FLAGS + json.dumps(CHROMIUM_POLICY) + " v1",
        ),
        Step(
            "XFCE for a sandbox: one session start group, no file icons, compositor or idle plugins",
            _xfce_for_sandbox,
            f"{XFCE_SESSION_CLIENTS} {XFCE_PANEL_DROPPED} icons=0 compositor=off v1",
        ),
    ),
)


LAYERS: dict[str, LayerSpec] = {
    spec.name: spec for spec in (OS_LAYER, ENVD_LAYER, KERNELS_LAYER, INTERPRETER_LAYER, DESKTOP_LAYER)
}

ENVD_CHECK = (
    f"test -x {ENVD_BIN} && PYTHONPATH={ENVD_SITE} python3 -c 'import pmoves_e2b.envd, uvicorn, connectrpc' "
    f"&& id -u {SANDBOX_USER} | grep -qx {SANDBOX_UID} && runuser -u {SANDBOX_USER} -- sudo -n true "
    "&& node --version && npm --version && git --version && curl --version"
)
KERNEL_NAMES = ("python3", "bash", "deno", "ir", "java")
DESKTOP_CHECK = (
    f"{ENVD_CHECK} && for t in Xvfb startxfce4 xdotool scrot x11vnc netstat xdpyinfo xrandr gtk-launch "
    "xdg-open pgrep chromium mousepad; do command -v $t >/dev/null; done && test -x /opt/noVNC/utils/novnc_proxy "
    "&& test -f /opt/noVNC/vnc.html"
)

# ---- desktop-warm: a desktop booted before anyone asks (E2B_DESKTOP_WARM) ------------------

# The stock SDK's boot (desktop_boot.py) run by the template's start command, so the warm pool
# keeps desktops whose XFCE is up and drawn. Xvfb's size is fixed: e2b-desktop takes a desktop
# from this template only for WARM_RESOLUTION.
DESKTOP_READY_PORT = 49982
# Answers one GET /health (the boot's ready check) and exits: nothing stays listening.
_READY_ONCE = (
    "import http.server as h\n"
    "class H(h.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        ok = self.path == '/health'\n"
    "        self.send_response(200 if ok else 404)\n"
    "        self.end_headers()\n"
    "        self.server.done = ok\n"
    "    def log_message(self, *args):\n"
    "        pass\n"
    f"s = h.HTTPServer(('0.0.0.0', {DESKTOP_READY_PORT}), H)\n"
    "s.done = False\n"
    "while not s.done:\n"
    "    s.handle_request()\n"
)
DESKTOP_BOOT = (
    f"export DISPLAY={DISPLAY} LANG=C.UTF-8; "
    f"{xvfb(*WARM_RESOLUTION)} & x=$!; "
    # A boot that fails never answers the ready check: the pool drops the sandbox at its ready timeout.
    f"{until(X_READY, X_START_S)} || exit 1; "
    "startxfce4 >/dev/null 2>&1 & "
    f"{SESSION_READY} || exit 1; "
    'printf %s "$READY" | python3 - ; '
    # This command lives as long as Xvfb, so e2b-desktop's watcher waits on it as on the SDK's Xvfb.
    "wait $x"
)

TEMPLATES: dict[str, TemplateSpec] = {
    "base": TemplateSpec(name="base", layers=("envd", "os"), check=ENVD_CHECK),
    "code-interpreter-v1": TemplateSpec(
        name="code-interpreter-v1",
        layers=("interpreter", "kernels", "envd", "os"),
        start_cmd=f"{VENV}/bin/python -m pmoves_e2b.interpreter --host 0.0.0.0 --port {INTERPRETER_PORT}",
        # Kernels run as root, as in E2B's template (%pip install into the venv, cwd="/root");
        # commands keep running as `user`.
        start_user="root",
        ready_port=INTERPRETER_PORT,
        check=f"{ENVD_CHECK} && {VENV}/bin/python -c 'import pmoves_e2b.interpreter' && jupyter kernelspec list "
        f"| awk '{{print $1}}' > /tmp/kernels && for k in {' '.join(KERNEL_NAMES)}; do grep -qx $k /tmp/kernels; done",
    ),
    # The stock e2b-desktop SDK starts Xvfb and XFCE itself (no start command); XFCE and
    # Chromium need more than a code sandbox.
    "desktop": TemplateSpec(
        name="desktop",
        layers=("desktop", "envd", "os"),
        memory_mb=4096,
        cpu_count=2,
        check=DESKTOP_CHECK,
    ),
    WARM_TEMPLATE: TemplateSpec(
        name=WARM_TEMPLATE,
        layers=("desktop", "envd", "os"),
        memory_mb=4096,
        cpu_count=2,
        start_cmd=f"READY={shlex.quote(_READY_ONCE)}; {DESKTOP_BOOT}",
        ready_port=DESKTOP_READY_PORT,
        check=DESKTOP_CHECK,
    ),
}


# ---- helpers ------------------------------------------------------------------------------


def _write(root: Path, path: str, content: bytes, mode: int = 0o644) -> None:
    dest = root / path.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(content)
    dest.chmod(mode)


def _copy_package(site: Path, subpackage: str) -> None:
    """``pmoves_e2b/__init__.py`` plus one in-sandbox subpackage, without caches."""
    dest = site / "pmoves_e2b"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(PACKAGE_DIR / "__init__.py", dest / "__init__.py")
    shutil.copytree(
        PACKAGE_DIR / subpackage,
        dest / subpackage,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.c"),  # the spawn helper is built from its .c
        dirs_exist_ok=True,
    )


def _package_digest(subpackage: str) -> bytes:
    return tree_digest(PACKAGE_DIR / subpackage) + (PACKAGE_DIR / "__init__.py").read_bytes()
