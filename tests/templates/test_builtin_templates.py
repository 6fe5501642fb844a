"""The real templates, checked from inside their layered rootfs (overlay + chroot).

They are built in the shared templates dir (`make build-e2b` does it before the tests; here
the build is a no-op when nothing changed, and only the changed layers otherwise).
"""

from __future__ import annotations

import socket
import textwrap
from pathlib import Path

import pytest

from pmoves_e2b.sandbox.templates.builder import TemplateBuilder
from pmoves_e2b.sandbox.templates.definitions import KERNEL_NAMES
from pmoves_e2b.sandbox.templates.rootfs import mounts_under, run_in_layers
from pmoves_e2b.sandbox.templates.store import default_templates_dir, load_template

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def templates_dir() -> Path:
    root = default_templates_dir()
    builder = TemplateBuilder(root)
    for name in ("base", "code-interpreter-v1", "desktop"):
        builder.build(name)
    return root


def run(template: str, templates_dir: Path, command: str, timeout: float = 120) -> str:
    result = run_in_layers(command, load_template(template, templates_dir).layers, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    assert not mounts_under(Path("/tmp")) or all("pmoves-verify" not in m for m in mounts_under(Path("/tmp")))
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_base_has_user_1000_with_passwordless_sudo(templates_dir: Path) -> None:
    out = run(
        "base", templates_dir, "hostname e2b; getent passwd user; id -g user; runuser -u user -- sudo -n id -u 2>&1"
    )
    assert out.splitlines() == ["user:x:1000:1000::/home/user:/bin/bash", "1000", "0"]  # no resolve warning


def test_base_has_the_tools_users_expect(templates_dir: Path) -> None:
    out = run(
        "base",
        templates_dir,
        "python3 --version; python --version; node --version; npm --version; git --version; "
        "curl --version | head -1; ps --version; ip -V; cat /etc/hostname",
    )
    assert out.count("Python 3.11") == 2, out  # `python` too, as E2B's base (issue 12 item 9)
    for expected in ("Python 3.11", "v18.", "10.9.9", "git version", "curl 7", "procps-ng", "iproute2", "e2b"):
        assert expected in out


def test_base_trusts_the_hosts_ca_certificates(templates_dir: Path) -> None:
    host_certs = sorted(p.name for p in Path("/usr/local/share/ca-certificates").glob("*.crt"))
    out = run("base", templates_dir, "ls /usr/local/share/ca-certificates; ls /etc/ssl/certs | wc -l")
    assert out.split()[:-1] == host_certs


def test_the_login_shell_every_command_runs_in_starts_no_program_and_keeps_debians_path(templates_dir: Path) -> None:
    # The SDK runs each command as `bash -l -c ...`: a program the profile starts is paid by every
    # command (under gVisor ~8 ms each). `-x` traces each command the profile runs, `$(...)` included.
    trace = "bash -l -x -c 'echo PATH=$PATH' 2>&1"
    as_root = run("base", templates_dir, trace).splitlines()
    as_user = run("base", templates_dir, f"runuser -u user -- {trace}").splitlines()
    for lines in (as_root, as_user):
        started = [line for line in lines if line.lstrip("+ ").startswith(("id ", "mesg "))]
        assert not started, lines
    root_path = next(line for line in as_root if line.startswith("PATH="))
    user_path = next(line for line in as_user if line.startswith("PATH="))
    assert root_path == "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert user_path == "PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games"


def test_envd_starts_from_its_launcher_and_answers_http(templates_dir: Path) -> None:
    port = free_port()
    out = run(
        "base",
        templates_dir,
        textwrap.dedent(f"""\
        /opt/pmoves/bin/envd --host 127.0.0.1 --port {port} >/tmp/envd.log 2>&1 &
        for i in $(seq 100); do
          code=$(curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{port}/health || true)
          [ "$code" != 000 ] && break; sleep 0.1
        done
        echo "health $code"; kill %1
        """),
    )
    assert out.split()[-1] in ("200", "204"), out
    assert not Path("/dev/shm/pmoves-envd").exists()  # envd's state dir stayed in the rootfs's own /dev/shm


def test_code_interpreter_has_the_kernels_and_the_server(templates_dir: Path) -> None:
    image = load_template("code-interpreter-v1", templates_dir)
    assert image.ready_port == 49999 and "pmoves_e2b.interpreter" in image.start_cmd
    assert image.layers[-2:] == load_template("base", templates_dir).layers  # built on base
    out = run(
        "code-interpreter-v1",
        templates_dir,
        "jupyter kernelspec list; python -c 'import pmoves_e2b.interpreter, numpy, pandas, scipy, sklearn, "
        "matplotlib, seaborn, plotly, sympy, bs4, openpyxl, PIL, requests, orjson, nbformat, e2b_charts'",
    )
    kernels = {line.split()[0] for line in out.splitlines()[1:]}
    assert {"python3", "bash", "deno", "ir"} <= kernels


KERNEL_SMOKE = """
import queue
from jupyter_client.manager import start_new_kernel

cells = {"python3": "6*7", "bash": "echo $((6*7))", "deno": "const x: number = 6; x * 7", "ir": "cat(6*7)"}
for name, code in cells.items():
    km, kc = start_new_kernel(kernel_name=name, startup_timeout=120)
    try:
        texts = []
        msg_id = kc.execute(code, allow_stdin=False)
        idle = False
        while True:
            try:
                # Deno now and then publishes its result just after the idle status: drain a moment.
                msg = kc.get_iopub_msg(timeout=1 if idle else 60)
            except queue.Empty:
                break
            content = msg["content"]
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                texts.append(content["text"])
            elif msg["msg_type"] in ("execute_result", "display_data"):
                texts.append(content["data"].get("text/plain", ""))
            elif msg["msg_type"] == "error":
                texts.append(f"error {content['ename']}: {content['evalue']}")
            elif msg["msg_type"] == "status" and content["execution_state"] == "idle":
                idle = True
        reply = kc.get_shell_msg(timeout=60)["content"]
        if reply["status"] != "ok":
            texts.append(f"reply {reply}")
        print(name, "".join(texts).strip())
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
"""


def test_every_kernel_runs_a_cell_as_the_sandbox_user(templates_dir: Path) -> None:
    out = run(
        "code-interpreter-v1",
        templates_dir,
        f"cd /home/user && runuser -u user -- env HOME=/home/user PATH=$PATH python - <<'EOF'\n{KERNEL_SMOKE}\nEOF",
        timeout=300,
    )
    results = dict(line.split(" ", 1) for line in out.splitlines() if line.split(" ")[0] in KERNEL_NAMES)
    assert results == {"python3": "42", "bash": "42", "deno": "42", "ir": "42"}, out


def test_code_interpreter_start_cmd_serves_health_as_the_sandbox_user(templates_dir: Path) -> None:
    image = load_template("code-interpreter-v1", templates_dir)
    port = free_port()
    start = image.start_cmd.replace("--host 0.0.0.0", "--host 127.0.0.1").replace(
        f"--port {image.ready_port}", f"--port {port}"
    )
    assert str(port) in start
    out = run(
        "code-interpreter-v1",
        templates_dir,
        textwrap.dedent(f"""\
        cd {image.workdir}
        runuser -u {image.user} -- env HOME={image.workdir} PATH=$PATH {start} >/tmp/server.log 2>&1 &
        for i in $(seq 600); do
          code=$(curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{port}/health || true)
          [ "$code" = 200 ] && break; sleep 0.1
        done
        echo "health $code"; kill %1 || true; cat /tmp/server.log | tail -5 >&2
        """),
        timeout=180,
    )
    assert out.split()[-1] == "200", out


def test_the_sandbox_user_can_reach_the_registries_through_the_hosts_ca(templates_dir: Path) -> None:
    """pip, npm and curl inside the template trust what the host trusts (e.g. a TLS-inspecting proxy)."""
    out = run(
        "code-interpreter-v1",
        templates_dir,
        textwrap.dedent("""\
        cd /home/user && runuser -u user -- env HOME=/home/user PATH=$PATH bash -e <<'IN'
        pip download -q --no-deps -d /tmp/wheels six && ls /tmp/wheels
        npm view left-pad version
        curl -sS -o /dev/null -w 'curl %{http_code}\\n' https://pypi.org/simple/six/
        IN
        """),
        timeout=180,
    )
    lines = out.split()
    assert any(line.startswith("six-") for line in lines) and "1.3.0" in lines and "200" in lines, out


def test_desktop_has_what_the_stock_desktop_sdk_runs(templates_dir: Path) -> None:
    out = run(
        "desktop",
        templates_dir,
        "for t in Xvfb startxfce4 dbus-launch xdpyinfo xrandr xdotool scrot x11vnc netstat gtk-launch xdg-open "
        "pgrep pkill chromium mousepad xfce4-terminal; do command -v $t >/dev/null || echo missing $t; done; "
        "test -x /opt/noVNC/utils/novnc_proxy && test -f /opt/noVNC/vnc.html && echo novnc; "
        "readlink -f /etc/alternatives/x-www-browser; grep -c no-sandbox /etc/chromium.d/pmoves; "
        "grep -o MetricsReportingEnabled /etc/chromium/policies/managed/pmoves.json",
    )
    assert "missing" not in out, out
    assert out.split() == ["novnc", "/usr/bin/chromium", "1", "MetricsReportingEnabled"], out
    assert load_template("desktop", templates_dir).memory_mb == 4096


def test_desktop_xfce_starts_its_session_at_once_without_idle_parts(templates_dir: Path) -> None:
    """The XFCE of a desktop booted on demand: one session start group, nothing it does not need."""
    xfconf = "/etc/xdg/xfce4/xfconf/xfce-perchannel-xml"

    def count(pattern: str, path: str) -> str:
        return f"cat {path} 2>/dev/null | grep -cE '{pattern}'; "

    out = run(
        "desktop",
        templates_dir,
        "echo $("
        + count('Client[0-9]_Priority" type="int" value="15"', f"{xfconf}/xfce4-session.xml")
        + count('value="(Thunar|xfdesktop|xfce4-panel|xfwm4|xfsettingsd)"', f"{xfconf}/xfce4-session.xml")
        + count("Thunar", f"{xfconf}/xfce4-session.xml")
        + count('use_compositing" type="bool" value="false', f"{xfconf}/xfwm4.xml")
        + count('<property name="style" type="int" value="0"', f"{xfconf}/xfce4-desktop.xml")
        + count('value="(pulseaudio|actions|systray)"', "/etc/xdg/xfce4/panel/default.xml")
        + count('value="(applicationsmenu|tasklist|clock|launcher)"', "/etc/xdg/xfce4/panel/default.xml")
        + ")",
    )
    # Four clients of priority 15 (one start group), none of them Thunar's daemon; no compositor,
    # no desktop icons, no idle panel plugins; the menu, window list, clock and launchers stay.
    assert out.split()[:6] == ["4", "4", "0", "1", "1", "0"], out
    assert int(out.split()[6]) >= 7, out
