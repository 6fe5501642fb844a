/* pmoves-spawn: how envd's Popen starts a command as another user, in one exec (envd/spawn.py):
 * sudo's commands; the process service's use the spawn library (spawn_library.c), with no exec of its own.
 *
 *   pmoves-spawn [--cgroup=DIR --oom-score-adj=N] [--uid=U --gid=G --groups=G1,G2,...] -- PROGRAM [ARG]...
 *
 * In this order: join the cgroup2 group DIR, raise the process's oom_score_adj to N, take the
 * supplementary groups, gid and uid (real, effective and saved), then execvp(PROGRAM) with the
 * PATH of the environment. Without it, envd runs `sh -c <join>` and util-linux setpriv before the
 * command: two more execs, ~1 ms on the ns tier and ~8 ms under gVisor's ptrace platform, where
 * every new program costs a new address space and its page faults. It is linked statically, so it
 * runs on any template (glibc, musl or no libc at all).
 *
 * Exit status when the command never starts: 127 when PROGRAM is not found, 126 for anything else
 * (bad arguments, joining the group, taking the ids, exec), with the reason on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_GROUPS 256

static int fail(const char *what, const char *detail) {
    fprintf(stderr, "pmoves-spawn: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    return 126;
}

/* A non-negative decimal id; -1 when `text` is not one. */
static long parse_id(const char *text) {
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || end == text || *end || value < 0 || value > (long)UINT_MAX - 1) return -1;
    return value;
}

static int write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t done = write(fd, text, strlen(text));
    int saved = errno;
    close(fd);
    errno = saved;
    return done == (ssize_t)strlen(text) ? 0 : -1;
}

int main(int argc, char **argv) {
    const char *cgroup = NULL, *oom = NULL, *groups = NULL;
    long uid = -1, gid = -1;
    int i = 1;
    for (; i < argc && strcmp(argv[i], "--") != 0; i++) {
        const char *arg = argv[i];
        if (!strncmp(arg, "--cgroup=", 9)) cgroup = arg + 9;
        else if (!strncmp(arg, "--oom-score-adj=", 16)) oom = arg + 16;
        else if (!strncmp(arg, "--uid=", 6)) { if ((uid = parse_id(arg + 6)) < 0) return fail("bad uid", arg + 6); }
        else if (!strncmp(arg, "--gid=", 6)) { if ((gid = parse_id(arg + 6)) < 0) return fail("bad gid", arg + 6); }
        else if (!strncmp(arg, "--groups=", 9)) groups = arg + 9;
        else return fail("unknown option", arg);
    }
    if (i + 1 >= argc) return fail("usage: pmoves-spawn [options] -- PROGRAM [ARG]...", NULL);
    if ((uid < 0) != (gid < 0) || (groups && uid < 0)) return fail("--uid, --gid and --groups go together", NULL);

    if (cgroup) {
        char path[PATH_MAX];
        if (snprintf(path, sizeof path, "%s/cgroup.procs", cgroup) >= (int)sizeof path) return fail("cgroup path too long", NULL);
        if (write_file(path, "0") < 0) return fail(path, strerror(errno));
    }
    if (oom && write_file("/proc/self/oom_score_adj", oom) < 0) return fail("oom_score_adj", strerror(errno));
    if (uid >= 0) {
        gid_t list[MAX_GROUPS];
        size_t count = 0;
        char *copy = strdup(groups ? groups : "");
        for (char *item = strtok(copy, ","); item; item = strtok(NULL, ",")) {
            long value = parse_id(item);
            if (value < 0 || count == MAX_GROUPS) return fail("bad --groups", groups);
            list[count++] = (gid_t)value;
        }
        if (setgroups(count, list) < 0) return fail("setgroups", strerror(errno));
        if (setresgid(gid, gid, gid) < 0) return fail("setresgid", strerror(errno));
        if (setresuid(uid, uid, uid) < 0) return fail("setresuid", strerror(errno));
    }
    execvp(argv[i + 1], argv + i + 1);
    int saved = errno;
    fprintf(stderr, "pmoves-spawn: %s: %s\n", argv[i + 1], strerror(saved));
    return saved == ENOENT ? 127 : 126;
}
