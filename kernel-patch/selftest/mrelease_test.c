// SPDX-License-Identifier: GPL-2.0
/*
 * Copyright 2022 Google LLC
 *
 * process_mrelease() tests. Every case reports exactly one result, so the
 * plan holds whether the test runs as root or not and whatever the kernel
 * supports; a case whose precondition is missing is a SKIP with the reason.
 * All waits are on pidfds or pipes, none on time.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/userfaultfd.h>
#include "vm_util.h"
#include "kselftest.h"

#define MB(x) ((size_t)(x) << 20)
#define MAX_SIZE_MB 1024

#ifndef __NR_pidfd_send_signal
#define __NR_pidfd_send_signal 424
#endif
#ifndef __NR_pidfd_open
#define __NR_pidfd_open 434
#endif
#ifndef __NR_process_mrelease
#define __NR_process_mrelease 448
#endif
#ifndef P_PIDFD
#define P_PIDFD 3
#endif
#ifndef PIDFD_SELF_THREAD
#define PIDFD_SELF_THREAD		-10000
#define PIDFD_SELF_THREAD_GROUP		-10001
#endif
#define PF_KTHREAD 0x00200000

/* Upper bound for waiting on an event that is expected promptly */
#define EVENT_TIMEOUT_MS 30000

static int mrelease(int pidfd, unsigned int flags)
{
	return syscall(__NR_process_mrelease, pidfd, flags) ? -errno : 0;
}

static int pidfd_open(pid_t pid)
{
	return syscall(__NR_pidfd_open, pid, 0);
}

static int pidfd_kill(int pidfd)
{
	return syscall(__NR_pidfd_send_signal, pidfd, SIGKILL, NULL, 0);
}

static const char *err_name(int ret)
{
	switch (ret) {
	case 0:
		return "0";
	case -EINVAL:
		return "EINVAL";
	case -ESRCH:
		return "ESRCH";
	case -EBADF:
		return "EBADF";
	case -EPERM:
		return "EPERM";
	default:
		return strerror(-ret);
	}
}

/*
 * Syscalls for a child that shares its parent's mm (vfork, CLONE_VM): it
 * must not touch libc state such as errno, which lives in the TLS it shares
 * with its parent.
 */
static inline long raw_syscall3(long nr, long a, long b, long c)
{
#ifdef __x86_64__
	long ret;

	asm volatile ("syscall"
		      : "=a" (ret)
		      : "a" (nr), "D" (a), "S" (b), "d" (c)
		      : "rcx", "r11", "memory");
	return ret;
#else
	/* syscall(2) may write errno on failure, which these calls avoid */
	return syscall(nr, a, b, c);
#endif
}

static inline void raw_wait_for_kill(void)
{
	for (;;) {
#ifdef __NR_pause
		raw_syscall3(__NR_pause, 0, 0, 0);
#else
		syscall(__NR_ppoll, NULL, 0, NULL, NULL, 0);
#endif
	}
}

/* Wait for the process behind @pidfd to exit and collect its status */
static int wait_pidfd(int pidfd, int *status)
{
	siginfo_t info = {};

	if (waitid(P_PIDFD, pidfd, &info, WEXITED))
		return -errno;
	*status = info.si_code == CLD_EXITED ? info.si_status :
		  128 + info.si_status;
	return 0;
}

/* Has the process behind @pidfd exited? Waits up to @timeout_ms. */
static bool pidfd_exited(int pidfd, int timeout_ms)
{
	struct pollfd pfd = { .fd = pidfd, .events = POLLIN };

	return poll(&pfd, 1, timeout_ms) == 1;
}

static void fill(char *buf, size_t len)
{
	size_t i;

	for (i = 0; i < len; i += psize())
		*(unsigned long *)(buf + i) = i + 1;
}

static bool intact(const char *buf, size_t len)
{
	size_t i;

	for (i = 0; i < len; i += psize())
		if (*(const unsigned long *)(buf + i) != i + 1)
			return false;
	return true;
}

static char *alloc_filled(size_t len)
{
	char *buf = mmap(NULL, len, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (buf == MAP_FAILED)
		return NULL;
	fill(buf, len);
	return buf;
}

/* In a child: fault in @len bytes, report @pid on @fd, wait for SIGKILL */
static __noreturn void hold_and_wait(size_t len, int fd, pid_t pid)
{
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (!alloc_filled(len) || write(fd, &pid, sizeof(pid)) != sizeof(pid))
		_exit(1);
	for (;;)
		pause();
}

static int read_pid(int fd, pid_t *pid)
{
	ssize_t n = read(fd, pid, sizeof(*pid));

	return n == sizeof(*pid) ? 0 : -1;
}

/* Fork a child holding @len bytes; returns its pidfd, or -1 */
static int spawn_holder(size_t len)
{
	int pipefd[2], pidfd = -1;
	pid_t pid;

	if (pipe(pipefd))
		return -1;
	pid = fork();
	if (pid == 0) {
		close(pipefd[0]);
		hold_and_wait(len, pipefd[1], getpid());
	}
	close(pipefd[1]);
	if (pid > 0 && !read_pid(pipefd[0], &pid))
		pidfd = pidfd_open(pid);
	else if (pid > 0)
		waitpid(pid, NULL, 0);
	close(pipefd[0]);
	return pidfd;
}

static void kill_and_wait(int pidfd)
{
	int status;

	pidfd_kill(pidfd);
	wait_pidfd(pidfd, &status);
	close(pidfd);
}

/*
 * Fork a parent process that forks a child holding @len bytes and waits
 * for it, as a service manager would. The caller, which is not the
 * child's parent, gets the child's pidfd in *@victim; the parent exits 0
 * if the child died by SIGKILL, 1 otherwise.
 */
static int spawn_parent_and_victim(size_t len, int *victim, pid_t *victim_pid)
{
	int pipefd[2], pidfd = -1;
	pid_t parent, pid = 0;

	*victim = -1;
	if (pipe(pipefd))
		return -1;
	parent = fork();
	if (parent == 0) {
		int status;

		prctl(PR_SET_PDEATHSIG, SIGKILL);
		close(pipefd[0]);
		pid = fork();
		if (pid == 0)
			hold_and_wait(len, pipefd[1], getpid());
		close(pipefd[1]);
		if (pid < 0 || waitpid(pid, &status, 0) != pid)
			_exit(1);
		_exit(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL ? 0 : 1);
	}
	close(pipefd[1]);
	if (parent > 0) {
		pidfd = pidfd_open(parent);
		if (!read_pid(pipefd[0], &pid))
			*victim = pidfd_open(pid);
	}
	close(pipefd[0]);
	*victim_pid = pid;
	if (pidfd >= 0 && *victim < 0) {
		kill_and_wait(pidfd);
		pidfd = -1;
	}
	return pidfd;
}

static void test_invalid_args(void)
{
	int pidfd = spawn_holder(MB(1));
	int ret;

	if (pidfd < 0) {
		ksft_test_result_fail("invalid_args: spawn: %s\n", strerror(errno));
		return;
	}
	ret = mrelease(pidfd, (unsigned int)-1);
	if (ret != -EINVAL) {
		ksft_test_result_fail("invalid_args: unknown flags gave %s, not EINVAL\n",
				      err_name(ret));
		kill_and_wait(pidfd);
		return;
	}
	ret = mrelease(pidfd, 0);
	if (ret != -EINVAL)
		ksft_test_result_fail("invalid_args: live process gave %s, not EINVAL\n",
				      err_name(ret));
	else
		ksft_test_result_pass("invalid_args: EINVAL: unknown flags, live process\n");
	kill_and_wait(pidfd);
}

/* Kill and reap a child, doubling its size until the reap wins the race */
static void test_reap(void)
{
	int pidfd, ret, status;
	size_t size;

	for (size = 1; size <= MAX_SIZE_MB; size *= 2) {
		pidfd = spawn_holder(MB(size));
		if (pidfd < 0) {
			ksft_test_result_fail("reap: spawn: %s\n", strerror(errno));
			return;
		}
		if (pidfd_kill(pidfd)) {
			ksft_test_result_fail("reap: pidfd_send_signal: %s\n", strerror(errno));
			close(pidfd);
			return;
		}
		ret = mrelease(pidfd, 0);
		wait_pidfd(pidfd, &status);
		close(pidfd);
		if (!ret) {
			ksft_test_result_pass("reap: reaped a killed child with %zu MiB\n", size);
			return;
		}
		if (ret != -ESRCH) {
			ksft_test_result_fail("reap: %s\n", err_name(ret));
			return;
		}
	}
	ksft_test_result_fail("reap: every attempt up to %d MiB lost the race (ESRCH)\n",
			      MAX_SIZE_MB);
}

/* A live init is never reaped: it is not dying (and ignores SIGKILL) */
static void test_init(void)
{
	int pidfd = pidfd_open(1);
	int ret;

	if (pidfd < 0) {
		ksft_test_result_skip("init: pidfd_open(1): %s\n", strerror(errno));
		return;
	}
	ret = mrelease(pidfd, 0);
	close(pidfd);
	if (ret == -EINVAL)
		ksft_test_result_pass("init: EINVAL\n");
	else
		ksft_test_result_fail("init: %s, not EINVAL\n", err_name(ret));
}

/* A kernel thread has no mm of its own to reap */
static void test_kthread(void)
{
	unsigned long flags = 0;
	char buf[512], *p;
	int pidfd, ret;
	ssize_t n;
	int fd;

	fd = open("/proc/2/stat", O_RDONLY);
	n = fd < 0 ? -1 : read(fd, buf, sizeof(buf) - 1);
	if (fd >= 0)
		close(fd);
	p = n > 0 ? (buf[n] = 0, strrchr(buf, ')')) : NULL;
	/* flags is the 7th field after the comm */
	if (!p || sscanf(p, ") %*c %*d %*d %*d %*d %*d %lu", &flags) != 1 ||
	    !(flags & PF_KTHREAD)) {
		ksft_test_result_skip("kthread: pid 2 is not a visible kernel thread\n");
		return;
	}
	pidfd = pidfd_open(2);
	if (pidfd < 0) {
		ksft_test_result_skip("kthread: pidfd_open(2): %s\n", strerror(errno));
		return;
	}
	ret = mrelease(pidfd, 0);
	close(pidfd);
	if (ret == -ESRCH)
		ksft_test_result_pass("kthread: ESRCH\n");
	else
		ksft_test_result_fail("kthread: %s, not ESRCH\n", err_name(ret));
}

static void test_pidfd_self(void)
{
	int ret = mrelease(PIDFD_SELF_THREAD, 0);

	if (ret == -EBADF) {
		ksft_test_result_skip("pidfd_self: PIDFD_SELF not supported\n");
		return;
	}
	if (ret != -EINVAL) {
		ksft_test_result_fail("pidfd_self: PIDFD_SELF gave %s, not EINVAL\n",
				      err_name(ret));
		return;
	}
	ret = mrelease(PIDFD_SELF_THREAD_GROUP, 0);
	if (ret != -EINVAL)
		ksft_test_result_fail("pidfd_self: PIDFD_SELF_PROCESS gave %s, not EINVAL\n",
				      err_name(ret));
	else
		ksft_test_result_pass("pidfd_self: EINVAL for PIDFD_SELF and PIDFD_SELF_PROCESS\n");
}

/* An exited, not yet waited for, child: its memory is already gone */
static void test_zombie(void)
{
	siginfo_t info = {};
	int pidfd, ret;
	pid_t pid;

	pid = fork();
	if (pid == 0)
		_exit(alloc_filled(MB(1)) ? 0 : 1);
	pidfd = pid > 0 ? pidfd_open(pid) : -1;
	if (pidfd < 0 ||
	    waitid(P_PIDFD, pidfd, &info, WEXITED | WNOWAIT)) {
		ksft_test_result_fail("zombie: fork/pidfd/waitid: %s\n", strerror(errno));
		if (pid > 0)
			waitpid(pid, NULL, 0);
		return;
	}
	ret = mrelease(pidfd, 0);
	waitid(P_PIDFD, pidfd, &info, WEXITED);
	close(pidfd);
	if (ret == -ESRCH)
		ksft_test_result_pass("zombie: ESRCH\n");
	else
		ksft_test_result_fail("zombie: %s, not ESRCH\n", err_name(ret));
}

/* The killer is not the victim's parent, as for lmkd, oomd or reapd */
static void test_non_child(void)
{
	int parent, victim, ret, status;
	pid_t pid;

	parent = spawn_parent_and_victim(MB(16), &victim, &pid);
	if (parent < 0) {
		ksft_test_result_fail("non_child: spawn: %s\n", strerror(errno));
		return;
	}
	pidfd_kill(victim);
	ret = mrelease(victim, 0);
	close(victim);
	if (wait_pidfd(parent, &status))
		status = -1;
	close(parent);
	if (status != 0)
		ksft_test_result_fail("non_child: the victim did not die by SIGKILL\n");
	else if (ret && ret != -ESRCH)
		ksft_test_result_fail("non_child: %s\n", err_name(ret));
	else
		ksft_test_result_pass("non_child: victim killed, process_mrelease %s\n",
				      err_name(ret));
}

/*
 * A process in a new pid namespace that forks a member, reports both outer
 * pids on @fd (the member reads its own from /proc/self, which resolves in
 * the outer namespace's proc), and waits as the namespace's init.
 */
static __noreturn void pidns_child(int fd)
{
	pid_t init, member, pids[2];
	int pipefd[2], status;

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (unshare(CLONE_NEWPID) && unshare(CLONE_NEWUSER | CLONE_NEWPID))
		_exit(KSFT_SKIP);
	if (pipe(pipefd))
		_exit(1);
	init = fork();
	if (init == 0) {
		member = fork();
		if (member == 0) {
			char link[32] = "";

			if (readlink("/proc/self", link, sizeof(link) - 1) <= 0)
				_exit(1);
			hold_and_wait(MB(8), pipefd[1], atoi(link));
		}
		for (;;)
			pause();
	}
	if (init < 0 || read(pipefd[0], &pids[1], sizeof(pid_t)) != sizeof(pid_t))
		_exit(1);
	pids[0] = init;
	if (write(fd, pids, sizeof(pids)) != sizeof(pids))
		_exit(1);
	if (waitpid(init, &status, 0) != init)
		_exit(1);
	_exit(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL ? 0 : 1);
}

static void test_pid_ns(void)
{
	int pipefd[2], child, init = -1, member = -1, ret, status;
	pid_t pid, pids[2];

	if (pipe(pipefd)) {
		ksft_test_result_fail("pid_ns: pipe: %s\n", strerror(errno));
		return;
	}
	pid = fork();
	if (pid == 0) {
		close(pipefd[0]);
		pidns_child(pipefd[1]);
	}
	close(pipefd[1]);
	child = pid > 0 ? pidfd_open(pid) : -1;
	if (child < 0) {
		ksft_test_result_fail("pid_ns: fork: %s\n", strerror(errno));
		close(pipefd[0]);
		return;
	}
	if (read(pipefd[0], pids, sizeof(pids)) == sizeof(pids)) {
		init = pidfd_open(pids[0]);
		member = pidfd_open(pids[1]);
	}
	close(pipefd[0]);
	if (init < 0 || member < 0) {
		wait_pidfd(child, &status);
		close(child);
		if (status == KSFT_SKIP)
			ksft_test_result_skip("pid_ns: cannot create a pid namespace\n");
		else
			ksft_test_result_fail("pid_ns: setup failed (status %d)\n", status);
		return;
	}
	/* SIGKILL to a namespace init from outside kills the namespace */
	pidfd_kill(init);
	ret = mrelease(init, 0);
	if (wait_pidfd(child, &status))
		status = -1;
	if (status != 0)
		ksft_test_result_fail("pid_ns: the namespace init did not die by SIGKILL\n");
	else if (ret && ret != -ESRCH)
		ksft_test_result_fail("pid_ns: process_mrelease on the init: %s\n",
				      err_name(ret));
	else if (!pidfd_exited(member, 0))
		ksft_test_result_fail("pid_ns: a namespace member outlived its init\n");
	else
		ksft_test_result_pass("pid_ns: init killed, process_mrelease %s, members gone\n",
				      err_name(ret));
	close(init);
	close(member);
	close(child);
}

/*
 * A vfork child shares its parent's mm: killing the child must not reap
 * the memory its (live) parent uses.
 */
static void test_vfork(void)
{
	int pipefd[2], parent, victim = -1, ret = 0, status;
	pid_t pid;

	if (pipe(pipefd)) {
		ksft_test_result_fail("vfork: pipe: %s\n", strerror(errno));
		return;
	}
	pid = fork();
	if (pid == 0) {
		size_t len = MB(8);
		char *buf;

		prctl(PR_SET_PDEATHSIG, SIGKILL);
		close(pipefd[0]);
		buf = alloc_filled(len);
		if (!buf)
			_exit(2);
		if (vfork() == 0) {
			/* Our stack and mm are the parent's: raw syscalls only */
			long self = raw_syscall3(__NR_getpid, 0, 0, 0);

			raw_syscall3(__NR_write, pipefd[1], (long)&self, sizeof(pid_t));
			raw_wait_for_kill();
		}
		_exit(intact(buf, len) ? 0 : 1);
	}
	close(pipefd[1]);
	parent = pid > 0 ? pidfd_open(pid) : -1;
	if (parent >= 0 && !read_pid(pipefd[0], &pid))
		victim = pidfd_open(pid);
	close(pipefd[0]);
	if (victim < 0) {
		ksft_test_result_fail("vfork: setup: %s\n", strerror(errno));
		if (parent >= 0)
			kill_and_wait(parent);
		return;
	}
	pidfd_kill(victim);
	ret = mrelease(victim, 0);
	close(victim);
	if (wait_pidfd(parent, &status))
		status = -1;
	close(parent);
	if (status != 0)
		ksft_test_result_fail("vfork: the parent's memory was not intact (status %d)\n",
				      status);
	else if (ret != -EINVAL && ret != -ESRCH)
		ksft_test_result_fail("vfork: %s, not EINVAL or ESRCH\n", err_name(ret));
	else
		ksft_test_result_pass("vfork: %s, the parent's memory intact\n", err_name(ret));
}

struct clone_vm_args {
	char *buf;
	size_t len;
	int go;
};

/* CLONE_VM partner: wait for the go byte, then check the shared memory */
static int clone_vm_partner(void *arg)
{
	struct clone_vm_args *a = arg;
	char c;

	raw_syscall3(__NR_read, a->go, (long)&c, 1);
	raw_syscall3(__NR_exit, intact(a->buf, a->len) ? 0 : 1, 0, 0);
	return 0;
}

/*
 * A process whose mm another live process uses (CLONE_VM without
 * CLONE_THREAD) is not reaped when it alone is killed.
 */
static void test_clone_vm(void)
{
	int pidfd_pipe[2], go[2], victim, partner = -1, ret, status;
	pid_t pid, pids[2];

	if (pipe(pidfd_pipe) || pipe(go)) {
		ksft_test_result_fail("clone_vm: pipe: %s\n", strerror(errno));
		return;
	}
	pid = fork();
	if (pid == 0) {
		static struct clone_vm_args a;
		size_t stack_len = 64 << 10;
		char *stack;

		prctl(PR_SET_PDEATHSIG, SIGKILL);
		a.len = MB(8);
		a.buf = alloc_filled(a.len);
		a.go = go[0];
		stack = mmap(NULL, stack_len, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
		if (!a.buf || stack == MAP_FAILED)
			_exit(2);
		pids[0] = getpid();
		pids[1] = clone(clone_vm_partner, stack + stack_len,
				CLONE_VM | SIGCHLD, &a);
		if (pids[1] < 0 ||
		    write(pidfd_pipe[1], pids, sizeof(pids)) != sizeof(pids))
			_exit(2);
		for (;;)
			pause();
	}
	close(pidfd_pipe[1]);
	close(go[0]);
	victim = pid > 0 ? pidfd_open(pid) : -1;
	if (victim >= 0 && read(pidfd_pipe[0], pids, sizeof(pids)) == sizeof(pids))
		partner = pidfd_open(pids[1]);
	close(pidfd_pipe[0]);
	if (partner < 0) {
		ksft_test_result_fail("clone_vm: setup: %s\n", strerror(errno));
		if (victim >= 0)
			kill_and_wait(victim);
		close(go[1]);
		return;
	}
	pidfd_kill(victim);
	ret = mrelease(victim, 0);
	wait_pidfd(victim, &status);
	close(victim);
	/* We are a child subreaper: the orphaned partner is now our child */
	if (write(go[1], "", 1) != 1 || wait_pidfd(partner, &status))
		status = -1;
	close(go[1]);
	close(partner);
	if (status != 0)
		ksft_test_result_fail("clone_vm: the partner's memory was not intact (status %d)\n",
				      status);
	else if (ret != -EINVAL && ret != -ESRCH)
		ksft_test_result_fail("clone_vm: %s, not EINVAL or ESRCH\n", err_name(ret));
	else
		ksft_test_result_pass("clone_vm: %s, the CLONE_VM partner's memory intact\n",
				      err_name(ret));
}

static long meminfo_kb(const char *field)
{
	char line[128];
	long kb = -1;
	FILE *f = fopen("/proc/meminfo", "r");

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, field, strlen(field))) {
			kb = atol(line + strlen(field));
			break;
		}
	fclose(f);
	return kb;
}

/* How a pinned-mm case reads the victim's memory into its stalling page */
enum pin_reader {
	PIN_CMDLINE,	/* read() of /proc/PID/cmdline */
	PIN_SCAN,	/* the PAGEMAP_SCAN ioctl on /proc/PID/pagemap */
	PIN_VM_READV,	/* process_vm_readv() */
};

struct reader {
	enum pin_reader kind;
	int fd;		/* the /proc file; unused for process_vm_readv() */
	pid_t pid;
	char *buf;	/* one userfaultfd-registered page */
	int done;	/* pipe written once the call has returned */
	long ret;
	int err;
};

static void *reader_thread(void *arg)
{
	struct reader *r = arg;
	/* r->buf is mapped in the victim too: it forked after the mmap() */
	struct iovec local = { r->buf, psize() }, remote = { r->buf, psize() };
	/* One page, so one region: its copy to r->buf is what stalls */
	struct pm_scan_arg scan = {
		.size = sizeof(scan),
		.start = (unsigned long)r->buf,
		.end = (unsigned long)r->buf + psize(),
		.vec = (unsigned long)r->buf,
		.vec_len = psize() / sizeof(struct page_region),
		.return_mask = PAGE_IS_PRESENT,
	};

	switch (r->kind) {
	case PIN_CMDLINE:
		r->ret = read(r->fd, r->buf, psize());
		break;
	case PIN_SCAN:
		r->ret = ioctl(r->fd, PAGEMAP_SCAN, &scan);
		break;
	case PIN_VM_READV:
		r->ret = process_vm_readv(r->pid, &local, 1, &remote, 1, 0);
		break;
	}
	r->err = r->ret < 0 ? errno : 0;
	if (write(r->done, "", 1) != 1)
		r->err = errno;
	return NULL;
}

/*
 * A reader of the victim's memory stalled in its copy to userspace on a
 * userfaultfd page must not keep a killed victim's memory: once the
 * victim's parent has reaped it, the memory is freed although the reader
 * is still stalled. The killer (this process) is not the victim's parent.
 * Kernels where the reader pins mm_users across the copy keep the memory
 * until the reader resumes; that is reported as a skip naming the missing
 * fix, as is a kernel without the reader's interface (process_vm_readv()
 * not built in, no PAGEMAP_SCAN).
 */
static void test_pinned_reader(const char *name, enum pin_reader kind)
{
	struct uffdio_api api = { .api = UFFD_API };
	struct uffdio_zeropage zero = {};
	struct uffd_msg msg;
	struct reader r = { .kind = kind, .fd = -1 };
	struct pollfd pfd[2];
	long before, after, resumed, size_kb = MB(64) >> 10;
	int uffd, parent, victim, ret, status, done[2];
	pthread_t thread;
	char path[64];
	pid_t pid;

	uffd = syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (uffd < 0) {
		/* Kernel faults need CAP_SYS_PTRACE or unprivileged_userfaultfd */
		ksft_test_result_skip("%s: userfaultfd: %s\n", name, strerror(errno));
		return;
	}
	/* An empty call succeeds unless the syscall is not built in */
	if (kind == PIN_VM_READV && process_vm_readv(getpid(), NULL, 0, NULL, 0, 0)) {
		ksft_test_result_skip("%s: process_vm_readv: %s\n", name, strerror(errno));
		close(uffd);
		return;
	}
	r.buf = mmap(NULL, psize(), PROT_READ | PROT_WRITE,
		     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (ioctl(uffd, UFFDIO_API, &api) || r.buf == MAP_FAILED ||
	    uffd_register(uffd, r.buf, psize(), true, false, false)) {
		ksft_test_result_skip("%s: userfaultfd registration: %s\n", name,
				      strerror(errno));
		goto out_uffd;
	}
	if (pipe(done)) {
		ksft_test_result_fail("%s: pipe: %s\n", name, strerror(errno));
		goto out_uffd;
	}
	r.done = done[1];
	parent = spawn_parent_and_victim(MB(64), &victim, &pid);
	if (parent < 0) {
		ksft_test_result_fail("%s: spawn: %s\n", name, strerror(errno));
		goto out_pipe;
	}
	r.pid = pid;
	snprintf(path, sizeof(path), "/proc/%d/%s", pid,
		 kind == PIN_SCAN ? "pagemap" : "cmdline");
	if (kind != PIN_VM_READV)
		r.fd = open(path, O_RDONLY);
	if ((kind != PIN_VM_READV && r.fd < 0) ||
	    pthread_create(&thread, NULL, reader_thread, &r)) {
		ksft_test_result_fail("%s: %s: %s\n", name,
				      kind == PIN_VM_READV ? "pthread_create" : path,
				      strerror(errno));
		goto out_victim;
	}
	/* The reader stalls once its copy faults on our page, or it returns */
	pfd[0] = (struct pollfd){ .fd = uffd, .events = POLLIN };
	pfd[1] = (struct pollfd){ .fd = done[0], .events = POLLIN };
	if (poll(pfd, 2, EVENT_TIMEOUT_MS) < 1)
		ksft_exit_fail_msg("%s: the reader neither faulted nor returned\n", name);
	if (!(pfd[0].revents & POLLIN)) {
		pthread_join(thread, NULL);
		/* A kernel without PAGEMAP_SCAN */
		if (kind == PIN_SCAN && r.ret < 0 && r.err == ENOTTY)
			ksft_test_result_skip("%s: PAGEMAP_SCAN: %s\n", name,
					      strerror(r.err));
		else
			ksft_test_result_fail("%s: the reader returned %ld (%s) without faulting\n",
					      name, r.ret, strerror(r.err));
		goto out_victim;
	}
	if (read(uffd, &msg, sizeof(msg)) != sizeof(msg) ||
	    msg.event != UFFD_EVENT_PAGEFAULT)
		ksft_exit_fail_msg("%s: the reader did not fault on its buffer\n", name);
	before = meminfo_kb("AnonPages:");
	pidfd_kill(victim);
	/* The killer lost the race: the victim has passed exit_mm() */
	pidfd_exited(victim, EVENT_TIMEOUT_MS);
	ret = mrelease(victim, 0);
	if (wait_pidfd(parent, &status))
		status = -1;
	after = meminfo_kb("AnonPages:");

	zero.range.start = (unsigned long)r.buf;
	zero.range.len = psize();
	if (ioctl(uffd, UFFDIO_ZEROPAGE, &zero))
		ksft_exit_fail_msg("%s: UFFDIO_ZEROPAGE: %s\n", name, strerror(errno));
	pthread_join(thread, NULL);
	resumed = meminfo_kb("AnonPages:");

	ksft_print_msg("%s: AnonPages kB: %ld before, %ld stalled, %ld resumed\n",
		       name, before, after, resumed);
	ksft_print_msg("%s: process_mrelease after the exit: %s; the reader returned %ld\n",
		       name, err_name(ret), r.ret);
	if (status != 0)
		ksft_test_result_fail("%s: the victim did not die by SIGKILL\n", name);
	else if (before - after >= size_kb * 3 / 4)
		ksft_test_result_pass("%s: %ld kB freed while the reader was stalled\n",
				      name, before - after);
	else if (before - after < size_kb / 4 && after - resumed >= size_kb * 3 / 4)
		/* The kernel lacks the fix for this reader */
		ksft_test_result_skip("%s: a stalled reader pinned the memory\n", name);
	else
		ksft_test_result_fail("%s: %ld kB freed while stalled, %ld after\n",
				      name, before - after, after - resumed);
	close(victim);
	close(parent);
	goto out_reader;
out_victim:
	kill_and_wait(victim);
	kill_and_wait(parent);
out_reader:
	if (r.fd >= 0)
		close(r.fd);
out_pipe:
	close(done[0]);
	close(done[1]);
out_uffd:
	close(uffd);
	if (r.buf != MAP_FAILED)
		munmap(r.buf, psize());
}

/* The cmdline reader, which any user may run against any process */
static void test_pinned_mm(void)
{
	test_pinned_reader("pinned_mm", PIN_CMDLINE);
}

static void test_pinned_mm_scan(void)
{
	test_pinned_reader("pinned_mm_scan", PIN_SCAN);
}

static void test_pinned_mm_vm_readv(void)
{
	test_pinned_reader("pinned_mm_vm_readv", PIN_VM_READV);
}

static void (*const tests[])(void) = {
	test_invalid_args,
	test_reap,
	test_init,
	test_kthread,
	test_pidfd_self,
	test_zombie,
	test_non_child,
	test_pid_ns,
	test_vfork,
	test_clone_vm,
	test_pinned_mm,
	test_pinned_mm_scan,
	test_pinned_mm_vm_readv,
};

int main(void)
{
	unsigned int i;

	ksft_print_header();
	ksft_set_plan(ARRAY_SIZE(tests));

	/* Not implemented (or not EBADF for a bad fd): nothing to test */
	if (mrelease(-1, 0) != -EBADF)
		ksft_exit_skip("process_mrelease: %s\n", strerror(errno));
	/* Orphaned CLONE_VM partners become our children, to be waited for */
	if (prctl(PR_SET_CHILD_SUBREAPER, 1))
		ksft_exit_fail_msg("PR_SET_CHILD_SUBREAPER: %s\n", strerror(errno));

	for (i = 0; i < ARRAY_SIZE(tests); i++)
		tests[i]();

	ksft_finished();
}
