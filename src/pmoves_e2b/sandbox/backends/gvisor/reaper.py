"""A child subreaper per sandbox, so runsc's processes are reaped the moment they end.

``runsc run --detach`` (and ``restore --detach``) starts the sandbox's sentry and gofer and exits;
they are orphaned and re-parented to the nearest child subreaper, else to the host's pid 1, which
is the only one allowed to reap them. Until then they are zombies that still name the sandbox's
cgroups, and a pause or kill waits for them (a sandbox paused to disk holds no process). Systemd and
tini reap at once; this machine's pid 1 (a VM agent) ~1.5 s late, which was most of a pause.

The service itself cannot be that subreaper: every orphan of every tier (and anything they
daemonize) would become its zombie, and reaping them with ``waitpid(-1)`` would steal the exit
statuses of its asyncio and Popen children. So runsc runs under this small program instead (built
once per host, ``native.py``): it forks a daemon that is a subreaper (``PR_SET_CHILD_SUBREAPER``),
which runs the command, hands its exit status back through a pipe to the first process (which
exits with it: the caller sees runsc's status, as before), and then reaps every process of that
runsc tree as it ends, the stubs that outlive their sentry too. It leaves its session and process
group alone (the caller's ``start_new_session``), stays outside the sandbox's cgroups (the command
joins them, not it), holds no file of the sandbox (stdio on /dev/null, cwd /), ignores SIGHUP and
SIGPIPE, and exits once it has no child left. A service restart leaves it running (it is not the service's
child once the first process exited), so sandboxes re-adopted after a restart are still reaped at once.

Without a compiler the command runs as before and the host's init reaps (see ``wrap``).
"""

from __future__ import annotations

from pathlib import Path

from pmoves_e2b.sandbox import native

SOURCE = b"""
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int report[2];
    if (argc < 2 || pipe(report) != 0) return 125;
    pid_t daemon = fork();
    if (daemon < 0) return 125;
    if (daemon > 0) {  /* the caller's child: exits with the command's status */
        unsigned char status = 125;
        close(report[1]);
        if (read(report[0], &status, 1) != 1) status = 125;
        return status;
    }
    close(report[0]);
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0) _exit(125);
    pid_t command = fork();
    if (command < 0) _exit(125);
    if (command == 0) {
        close(report[1]);
        execvp(argv[1], argv + 1);
        _exit(127);
    }
    signal(SIGHUP, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);  /* a caller gone meanwhile: the reaping goes on */
    int null = open("/dev/null", O_RDWR);
    dup2(null, 0);
    dup2(null, 1);
    dup2(null, 2);
    if (null > 2) close(null);
    if (chdir("/") != 0) _exit(125);
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, 0);
        if (pid < 0) {
            if (errno == EINTR) continue;
            _exit(0);  /* ECHILD: the whole tree is gone */
        }
        if (pid == command) {
            unsigned char code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
            if (write(report[1], &code, 1) != 1) code = 0;
            close(report[1]);
        }
    }
}
"""


def built() -> Path | None:
    return native.build("runsc-reaper", SOURCE, "", ("-O2",))


def wrap(argv: list[str]) -> list[str]:
    """``argv`` run under a subreaper of its own; ``argv`` itself (init reaps) when none could be built."""
    program = built()
    return argv if program is None else [str(program), *argv]
