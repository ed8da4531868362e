/* Tries, inside a task's container, what the seccomp filter must refuse and a
 * few things it must allow; prints one "name: ok" or "name: errno=N" line
 * each. Built static by tests/seccomp.rs (gcc -static). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void report(const char *what, long r, int err) {
    if (r < 0)
        printf("%s: errno=%d\n", what, err);
    else
        printf("%s: ok\n", what);
    fflush(stdout);
}

/* A process-creating call returned r: reap the child, or be the child. */
static void after_fork(const char *what, long r) {
    int err = errno;
    if (r == 0)
        _exit(0);
    if (r > 0)
        waitpid((pid_t)r, NULL, 0);
    report(what, r, err);
}

static void try_socket(const char *what, long family, long type, long proto) {
    long fd = syscall(SYS_socket, family, type, proto);
    int err = errno;
    if (fd >= 0)
        close((int)fd);
    report(what, fd, err);
}

struct clone_args_v0 {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
};

static void *thread_main(void *arg) { return arg; }

int main(void) {
    after_fork("clone_newuser_newnet", syscall(SYS_clone, CLONE_NEWUSER | CLONE_NEWNET | SIGCHLD, 0, 0, 0, 0));
    long r = unshare(CLONE_NEWUSER);
    report("unshare_newuser", r, errno);
    struct clone_args_v0 ca;
    memset(&ca, 0, sizeof ca);
    ca.exit_signal = SIGCHLD;
    after_fork("clone3", syscall(SYS_clone3, &ca, sizeof ca));
    unsigned char params[120];
    memset(params, 0, sizeof params);
    long fd = syscall(SYS_io_uring_setup, 4, params);
    int err = errno;
    if (fd >= 0)
        close((int)fd);
    report("io_uring_setup", fd, err);
    try_socket("netlink_netfilter", AF_NETLINK, SOCK_RAW, 12);
    try_socket("netlink_netfilter_highbits", (1L << 32) | AF_NETLINK, SOCK_RAW, 12);
    try_socket("vsock", 40, SOCK_STREAM, 0);
    r = ptrace(PTRACE_TRACEME, 0, NULL, NULL);
    report("ptrace", r, errno);
    /* Controls: what ordinary programs need. */
    after_fork("fork", fork());
    pthread_t t;
    int e = pthread_create(&t, NULL, thread_main, NULL);
    if (e == 0)
        pthread_join(t, NULL);
    report("thread", e == 0 ? 0 : -1, e);
    try_socket("inet", AF_INET, SOCK_DGRAM, 0);
    try_socket("unix", AF_UNIX, SOCK_STREAM, 0);
    try_socket("netlink_route", AF_NETLINK, SOCK_RAW, 0);
    printf("probe: done\n");
    return 0;
}
