/* libpmoves-spawn.so: envd starts a command without exec'ing a helper first (envd/spawn.py).
 *
 * pmoves_spawn() does in envd's own process what the pmoves-spawn helper (spawn_helper.c) does
 * after an exec of its own: CPython's subprocess vforks only when no uid, gid or groups are given,
 * so a command as another user needed that helper, one exec more (~2 ms under gVisor's ptrace
 * platform, where every new program is a new address space). Here a clone(CLONE_VM | CLONE_VFORK)
 * child, on its own stack while envd's thread waits, does in this order: new session, fds 0-2 (and
 * the PTY as controlling terminal), cwd, join the cgroup2 group, raise oom_score_adj, take the
 * supplementary groups, gid and uid (real, effective and saved), close every other fd, reset the
 * signal handlers envd installed (and SIGPIPE, SIGXFSZ, which Python ignores), unblock signals,
 * and execve the first candidate path that runs.
 *
 * The child shares envd's memory until its execve, so it calls nothing that allocates or locks,
 * and takes the ids with raw syscalls: glibc's setuid family would signal envd's other threads (its
 * per-process credentials) from a child that is not one of them. Taking them marks the shared
 * memory non-dumpable, which the child undoes (envd's flag; the command's execve sets its own).
 * Every signal stays blocked until right before execve, and the handlers envd installed
 * (``to_default``) are reset first, so no handler of envd runs on its shared memory; only those,
 * not all 64 like CPython and glibc's posix_spawn (64 syscalls: ~1 ms under ptrace).
 *
 * A failure before the execve is reported, not turned into an exit status: ``error`` gets the step
 * and errno, the child is reaped, and -1 is returned (envd raises it as OSError, as Popen would).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHILD_STACK (32 * 1024)

enum { STEP_SETSID = 1, STEP_TTY, STEP_FDS, STEP_CWD, STEP_CGROUP, STEP_OOM, STEP_GROUPS, STEP_GID, STEP_UID, STEP_EXEC };

struct request {
    char *const *paths; /* execve candidates (PATH already searched by the caller), NULL-ended */
    char *const *argv;
    char *const *envp;
    const char *cwd; /* NULL: envd's */
    int fds[3];      /* become 0, 1, 2; each >= 3 */
    const char *cgroup_procs; /* NULL: none */
    const char *oom_score_adj; /* NULL: unchanged */
    int set_ids;
    long uid, gid;
    const gid_t *groups;
    int group_count;
    int controlling_tty;
    int dumpable; /* envd's, given back after the ids are taken */
    const int *to_default; /* signals envd handles or ignores, SIG_DFL for the command; 0-ended */
    sigset_t mask;      /* envd's mask, the command's from its execve */
    int *error;         /* [step, errno] */
};

static int write_text(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    size_t length = strlen(text);
    ssize_t done = write(fd, text, length);
    int saved = errno;
    close(fd);
    errno = saved;
    return done == (ssize_t)length ? 0 : -1;
}

static int fail(const struct request *r, int step) {
    r->error[0] = step;
    r->error[1] = errno ? errno : EINVAL;
    _exit(127);
}

static int child(void *arg) {
    const struct request *r = arg;
    if (setsid() < 0) return fail(r, STEP_SETSID);
    for (int i = 0; i < 3; i++)
        if (dup2(r->fds[i], i) < 0) return fail(r, STEP_FDS);
    if (r->controlling_tty && ioctl(0, TIOCSCTTY, 0) < 0) return fail(r, STEP_TTY);
    if (r->cwd && chdir(r->cwd) < 0) return fail(r, STEP_CWD);
    if (r->cgroup_procs && write_text(r->cgroup_procs, "0") < 0) return fail(r, STEP_CGROUP);
    if (r->oom_score_adj && write_text("/proc/self/oom_score_adj", r->oom_score_adj) < 0) return fail(r, STEP_OOM);
    if (r->set_ids) {
        if (syscall(SYS_setgroups, (size_t)r->group_count, r->groups) < 0) return fail(r, STEP_GROUPS);
        if (syscall(SYS_setresgid, r->gid, r->gid, r->gid) < 0) return fail(r, STEP_GID);
        if (syscall(SYS_setresuid, r->uid, r->uid, r->uid) < 0) return fail(r, STEP_UID);
        /* Taking other ids made the memory non-dumpable, and it is envd's: /proc/<envd> would be
         * the host's root's (which the ns tier does not map), not root's inside. */
        if (r->dumpable > 0) prctl(PR_SET_DUMPABLE, r->dumpable);
    }
    /* Every fd above 2: envd's are close-on-exec already, this is for one a library left open.
     * INT_MAX, not ~0U: gVisor of 2022 reads `last` as signed and refuses it. */
    syscall(SYS_close_range, 3, INT_MAX, 0);
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    for (const int *sig = r->to_default; *sig; sig++) sigaction(*sig, &dfl, NULL);
    sigprocmask(SIG_SETMASK, &r->mask, NULL);
    int first = 0;
    for (char *const *path = r->paths; *path; path++) {
        execve(*path, r->argv, r->envp);
        /* Like CPython's search: the first error that is not "no such file here" is the one told. */
        if (!first && errno != ENOENT && errno != ENOTDIR) first = errno;
    }
    if (first) errno = first;
    return fail(r, STEP_EXEC);
}

pid_t pmoves_spawn(char *const *paths, char *const *argv, char *const *envp, const char *cwd, int fd0, int fd1,
                   int fd2, const char *cgroup_procs, const char *oom_score_adj, int set_ids, long uid, long gid,
                   const gid_t *groups, int group_count, int controlling_tty, const int *to_default, int *error) {
    struct request r = {paths, argv, envp, cwd, {fd0, fd1, fd2}, cgroup_procs, oom_score_adj, set_ids, uid, gid,
                        groups, group_count, controlling_tty, 0, to_default, {{0}}, error};
    error[0] = error[1] = 0;
    if (fd0 < 3 || fd1 < 3 || fd2 < 3) {
        error[0] = STEP_FDS;
        error[1] = EBADF;
        return -1;
    }
    if (set_ids) r.dumpable = prctl(PR_GET_DUMPABLE);
    /* The child's stack, in this frame: this thread waits (CLONE_VFORK) until the child has exec'd or exited. */
    char stack[CHILD_STACK] __attribute__((aligned(16)));
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, &r.mask); /* per thread on Linux */
    pid_t pid = clone(child, stack + CHILD_STACK, CLONE_VM | CLONE_VFORK | SIGCHLD, &r);
    int saved = errno;
    sigprocmask(SIG_SETMASK, &r.mask, NULL);
    if (pid < 0) {
        error[0] = STEP_EXEC;
        error[1] = saved;
        return -1;
    }
    if (error[0]) {
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
        }
        return -1;
    }
    return pid;
}
