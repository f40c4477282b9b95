// SPDX-License-Identifier: GPL-2.0
/*
 * Copyright 2022 Google LLC
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <asm-generic/unistd.h>
#include <linux/mman.h>
#include "vm_util.h"
#include "kselftest.h"

#define MB(x) (x << 20)
#define MAX_SIZE_MB 1024

static int alloc_noexit(unsigned long nr_pages, int pipefd)
{
	int ppid = getppid();
	int timeout = 10; /* 10sec timeout to get killed */
	unsigned long i;
	char *buf;

	buf = (char *)mmap(NULL, nr_pages * psize(), PROT_READ | PROT_WRITE,
			   MAP_PRIVATE | MAP_ANON, 0, 0);
	if (buf == MAP_FAILED)
		ksft_exit_fail_msg("mmap failed, halting the test: %s\n", strerror(errno));

	for (i = 0; i < nr_pages; i++)
		*((unsigned long *)(buf + (i * psize()))) = i;

	/* Signal the parent that the child is ready */
	if (write(pipefd, "", 1) < 0)
		ksft_exit_fail_msg("write: %s\n", strerror(errno));

	/* Wait to be killed (when reparenting happens) */
	while (getppid() == ppid && timeout > 0) {
		sleep(1);
		timeout--;
	}

	munmap(buf, nr_pages * psize());

	return (timeout > 0) ? KSFT_PASS : KSFT_FAIL;
}

/* The process_mrelease calls in this test are expected to fail */
static void run_negative_tests(int pidfd)
{
	/* Test invalid flags. Expect to fail with EINVAL error code. */
	if (!syscall(__NR_process_mrelease, pidfd, (unsigned int)-1) ||
			errno != EINVAL) {
		ksft_exit_fail_msg("process_mrelease with wrong flags: %s\n", strerror(errno));
	}
	/*
	 * Test reaping while process is alive with no pending SIGKILL.
	 * Expect to fail with EINVAL error code.
	 */
	if (!syscall(__NR_process_mrelease, pidfd, 0) || errno != EINVAL)
		ksft_exit_fail_msg("process_mrelease on a live process: %s\n", strerror(errno));
}

static int child_main(int pipefd[], size_t size)
{
	int res;

	/* Allocate and fault-in memory and wait to be killed */
	close(pipefd[0]);
	res = alloc_noexit(MB(size) / psize(), pipefd[1]);
	close(pipefd[1]);
	return res;
}

#define CHILD_MEM	(4UL << 20)
#define NR_CYCLES	100
#define VICTIM_UID	60001
#define OTHER_UID	60002

/* PROCESS_MRELEASE_REAP_KILL tests: this many results */
#define NR_REAP_KILL_TESTS	9

static long mrelease(int pidfd, unsigned int flags)
{
	return syscall(__NR_process_mrelease, pidfd, flags);
}

static int pidfd_open(pid_t pid)
{
	return syscall(__NR_pidfd_open, pid, 0);
}

static char *touch_mem(size_t len, unsigned char pattern)
{
	char *buf = mmap(NULL, len, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (buf == MAP_FAILED)
		return NULL;
	memset(buf, pattern, len);
	return buf;
}

static bool mem_is(const char *buf, size_t len, unsigned char pattern)
{
	size_t i;

	for (i = 0; i < len; i += 512)
		if ((unsigned char)buf[i] != pattern)
			return false;
	return true;
}

/*
 * A victim: optionally change uid, fault in memory, say "ready" on @ready,
 * then wait for a byte on @go. On receiving it, check that its memory is
 * intact and that it can still fault in new pages (MMF_UNSTABLE would turn
 * that into SIGBUS), and exit 0 if so.
 */
static void victim(uid_t uid, int ready, int go)
{
	char *old, *new;
	char c;

	if (uid && setresuid(uid, uid, uid))
		_exit(10);
	old = touch_mem(CHILD_MEM, 0x5a);
	if (!old)
		_exit(11);
	if (write(ready, "r", 1) != 1)
		_exit(12);
	if (read(go, &c, 1) != 1)
		_exit(13);
	new = touch_mem(CHILD_MEM, 0xa5);
	if (!new)
		_exit(14);
	if (!mem_is(old, CHILD_MEM, 0x5a) || !mem_is(new, CHILD_MEM, 0xa5))
		_exit(15);
	_exit(0);
}

struct victim_proc {
	pid_t pid;
	int pidfd;
	int go;		/* write end: let the victim check its memory */
};

static int start_victim(struct victim_proc *v, uid_t uid)
{
	int ready[2], go[2];
	char c;

	if (pipe(ready) || pipe(go))
		return -1;
	v->pid = fork();
	if (v->pid < 0)
		return -1;
	if (v->pid == 0) {
		close(ready[0]);
		close(go[1]);
		victim(uid, ready[1], go[0]);
	}
	close(ready[1]);
	close(go[0]);
	v->go = go[1];
	if (read(ready[0], &c, 1) != 1) {
		close(ready[0]);
		return -1;
	}
	close(ready[0]);
	v->pidfd = pidfd_open(v->pid);
	return v->pidfd < 0 ? -1 : 0;
}

static bool died_by_sigkill(pid_t pid)
{
	int status;

	if (waitpid(pid, &status, 0) != pid)
		return false;
	return WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
}

/* Let the victim check itself; true if it exited 0. */
static bool victim_intact(struct victim_proc *v)
{
	int status;

	if (write(v->go, "g", 1) != 1)
		return false;
	if (waitpid(v->pid, &status, 0) != v->pid)
		return false;
	return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

static void stop_victim(struct victim_proc *v)
{
	close(v->go);
	close(v->pidfd);
}

static void test_unknown_flags(void)
{
	struct victim_proc v;
	bool ok;

	if (start_victim(&v, 0))
		ksft_exit_fail_msg("start victim: %s\n", strerror(errno));
	ok = mrelease(v.pidfd, ~PROCESS_MRELEASE_REAP_KILL) == -1 &&
	     errno == EINVAL;
	ok = ok && mrelease(v.pidfd, 1U << 31) == -1 && errno == EINVAL;
	/* Unknown flags are rejected before the pidfd is looked at */
	ok = ok && mrelease(-1, 1U << 1) == -1 && errno == EINVAL;
	ksft_test_result(ok && victim_intact(&v),
			 "unknown flags: EINVAL, victim untouched\n");
	stop_victim(&v);
}

static void test_reap_kill(void)
{
	struct victim_proc v;
	long ret;
	int err;

	if (start_victim(&v, 0))
		ksft_exit_fail_msg("start victim: %s\n", strerror(errno));
	/* No kill(2) first: the flag does the kill */
	ret = mrelease(v.pidfd, PROCESS_MRELEASE_REAP_KILL);
	err = errno;
	ksft_test_result(ret == 0, "REAP_KILL of a live child: %s\n",
			 ret ? strerror(err) : "reaped");
	ksft_test_result(died_by_sigkill(v.pid), "child died by SIGKILL\n");
	stop_victim(&v);
}

/*
 * An unprivileged caller against another uid's process: EPERM, and the
 * victim is neither killed nor marked MMF_UNSTABLE.
 */
static void test_eperm(void)
{
	struct victim_proc v;
	int status;
	pid_t pid;

	if (geteuid() != 0) {
		ksft_test_result_skip("EPERM for another uid: needs root\n");
		return;
	}
	if (start_victim(&v, VICTIM_UID))
		ksft_exit_fail_msg("start victim: %s\n", strerror(errno));
	pid = fork();
	if (pid == 0) {
		if (setresuid(OTHER_UID, OTHER_UID, OTHER_UID))
			_exit(2);
		if (mrelease(v.pidfd, PROCESS_MRELEASE_REAP_KILL) == 0)
			_exit(3);
		_exit(errno == EPERM ? 0 : 4);
	}
	waitpid(pid, &status, 0);
	ksft_test_result(WIFEXITED(status) && WEXITSTATUS(status) == 0,
			 "other uid's process: EPERM (status %#x)\n", status);
	ksft_test_result(victim_intact(&v),
			 "EPERM victim alive, memory intact, can fault pages\n");
	stop_victim(&v);
}

struct pair {
	int ready;
	uid_t partner_uid;
};

#define PARTNER_STACK	(256 * 1024)
static char *partner_mem;
static struct pair pair_args;

/*
 * Runs in a CLONE_VM child of the shared-mm leader. It shares the leader's
 * memory, including libc's, but is a process of its own (exit_group() in
 * _exit() ends only it), with its own credentials.
 */
static int partner_fn(void *arg)
{
	struct pair *pa = arg;

	if (pa->partner_uid && setresuid(pa->partner_uid, pa->partner_uid,
					 pa->partner_uid))
		_exit(20);
	if (write(pa->ready, "p", 1) != 1)
		_exit(21);
	for (;;)
		pause();
	return 0;
}

/*
 * A leader that shares its mm with a CLONE_VM partner process. The
 * leader runs as @uid, the partner as @partner_uid. On "go", the leader
 * checks the shared memory, faults new pages and exits 0 if all is well;
 * the partner sleeps until it is killed.
 */
static void pair_leader(uid_t uid, uid_t partner_uid, int ready, int go)
{
	int pready[2];
	pid_t partner;
	char *stack;
	char c;

	partner_mem = touch_mem(CHILD_MEM, 0x5a);
	if (!partner_mem || pipe(pready))
		_exit(30);
	pair_args.ready = pready[1];
	pair_args.partner_uid = partner_uid;
	stack = malloc(PARTNER_STACK);
	if (!stack)
		_exit(30);
	partner = clone(partner_fn, stack + PARTNER_STACK, CLONE_VM | SIGCHLD,
			&pair_args);
	if (partner < 0)
		_exit(31);
	if (read(pready[0], &c, 1) != 1)
		_exit(32);
	if (uid && setresuid(uid, uid, uid))
		_exit(33);
	/* Tell the test the partner's pid, then wait */
	if (write(ready, &partner, sizeof(partner)) != sizeof(partner))
		_exit(34);
	if (read(go, &c, 1) != 1)
		_exit(35);
	if (!mem_is(partner_mem, CHILD_MEM, 0x5a) ||
	    !touch_mem(CHILD_MEM, 0xa5))
		_exit(36);
	_exit(0);
}

static int start_pair(uid_t uid, uid_t partner_uid, pid_t *leader,
		      pid_t *partner, int *gofd)
{
	int ready[2], go[2];

	if (pipe(ready) || pipe(go))
		return -1;
	*leader = fork();
	if (*leader < 0)
		return -1;
	if (*leader == 0) {
		close(ready[0]);
		close(go[1]);
		pair_leader(uid, partner_uid, ready[1], go[0]);
	}
	close(ready[1]);
	close(go[0]);
	*gofd = go[1];
	if (read(ready[0], partner, sizeof(*partner)) != sizeof(*partner))
		return -1;
	close(ready[0]);
	return 0;
}

static bool pid_alive(pid_t pid)
{
	char path[64];
	char state = 0;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/stat", pid);
	f = fopen(path, "r");
	if (!f)
		return false;
	if (fscanf(f, "%*d (%*[^)]) %c", &state) != 1)
		state = 0;
	fclose(f);
	return state && state != 'Z' && state != 'X';
}

static void test_shared_mm(void)
{
	pid_t leader, partner;
	int pidfd, gofd, status;
	bool ok;
	long ret;

	if (start_pair(0, 0, &leader, &partner, &gofd))
		ksft_exit_fail_msg("start CLONE_VM pair: %s\n", strerror(errno));
	pidfd = pidfd_open(leader);
	ret = mrelease(pidfd, PROCESS_MRELEASE_REAP_KILL);
	ok = ret == 0 && died_by_sigkill(leader);
	/* The partner is the leader's child: reparented to us or init */
	usleep(100000);
	ok = ok && !pid_alive(partner);
	ksft_test_result(ok, "shared mm (CLONE_VM pair): both killed, reaped\n");
	close(pidfd);
	close(gofd);

	if (geteuid() != 0) {
		ksft_test_result_skip("shared mm EPERM: needs root\n");
		return;
	}
	/* The partner runs as another uid: EPERM and nothing changes */
	if (start_pair(VICTIM_UID, OTHER_UID, &leader, &partner, &gofd))
		ksft_exit_fail_msg("start CLONE_VM pair: %s\n", strerror(errno));
	pidfd = pidfd_open(leader);
	if (fork() == 0) {
		if (setresuid(VICTIM_UID, VICTIM_UID, VICTIM_UID))
			_exit(2);
		if (mrelease(pidfd, PROCESS_MRELEASE_REAP_KILL) == 0)
			_exit(3);
		_exit(errno == EPERM ? 0 : 4);
	}
	wait(&status);
	ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
	ok = ok && pid_alive(partner);
	/* The leader checks its memory and that the partner is alive */
	ok = ok && write(gofd, "g", 1) == 1 &&
	     waitpid(leader, &status, 0) == leader &&
	     WIFEXITED(status) && WEXITSTATUS(status) == 0;
	ksft_test_result(ok, "shared mm, partner of another uid: EPERM, none killed\n");
	kill(partner, SIGKILL);
	close(pidfd);
	close(gofd);
}

/* Kill and reap fresh children @n times; count ESRCH. */
static void test_cycles(bool reap_kill, int n)
{
	int i, esrch = 0, other = 0, killed = 0;
	struct victim_proc v;
	long ret;

	for (i = 0; i < n; i++) {
		if (start_victim(&v, 0))
			ksft_exit_fail_msg("start victim: %s\n", strerror(errno));
		if (reap_kill) {
			ret = mrelease(v.pidfd, PROCESS_MRELEASE_REAP_KILL);
		} else {
			ret = syscall(__NR_pidfd_send_signal, v.pidfd, SIGKILL,
				      NULL, 0);
			if (!ret)
				ret = mrelease(v.pidfd, 0);
		}
		if (ret && errno == ESRCH)
			esrch++;
		else if (ret)
			other++;
		killed += died_by_sigkill(v.pid);
		stop_victim(&v);
	}
	ksft_test_result(!esrch && !other && killed == n,
			 "%s x%d: %d ESRCH, %d other errors, %d killed\n",
			 reap_kill ? "REAP_KILL" : "kill then process_mrelease",
			 n, esrch, other, killed);
}

static void run_reap_kill_tests(void)
{
	/* Probe: a known flag gets past the flags check to the bad fd */
	if (mrelease(-1, PROCESS_MRELEASE_REAP_KILL) == 0 || errno != EBADF) {
		ksft_test_result_skip("PROCESS_MRELEASE_REAP_KILL not supported: %s\n",
				      strerror(errno));
		return;
	}
	test_unknown_flags();
	test_reap_kill();
	test_eperm();
	test_shared_mm();
	test_cycles(true, NR_CYCLES);
	test_cycles(false, NR_CYCLES);
}

int main(void)
{
	int pipefd[2], pidfd;
	bool success, retry;
	size_t size;
	pid_t pid;
	char byte;
	int res;

	ksft_print_header();
	/* The REAP_KILL tests report one skip if the flag is not supported */
	if (mrelease(-1, PROCESS_MRELEASE_REAP_KILL) == -1 && errno == EBADF)
		ksft_set_plan(1 + NR_REAP_KILL_TESTS);
	else
		ksft_set_plan(2);

	/* Test a wrong pidfd */
	if (!syscall(__NR_process_mrelease, -1, 0) || errno != EBADF) {
		if (errno == ENOSYS) {
			ksft_test_result_skip("process_mrelease not implemented\n");
			ksft_finished();
		} else {
			ksft_exit_fail_msg("process_mrelease with wrong pidfd: %s",
					   strerror(errno));
		}
	}

	/* Start the test with 1MB child memory allocation */
	size = 1;
retry:
	/*
	 * Pipe for the child to signal when it's done allocating
	 * memory
	 */
	if (pipe(pipefd))
		ksft_exit_fail_msg("pipe: %s\n", strerror(errno));

	pid = fork();
	if (pid < 0) {
		close(pipefd[0]);
		close(pipefd[1]);
		ksft_exit_fail_msg("fork: %s\n", strerror(errno));
	}

	if (pid == 0) {
		/* Child main routine */
		res = child_main(pipefd, size);
		exit(res);
	}

	/*
	 * Parent main routine:
	 * Wait for the child to finish allocations, then kill and reap
	 */
	close(pipefd[1]);
	/* Block until the child is ready */
	res = read(pipefd[0], &byte, 1);
	close(pipefd[0]);
	if (res < 0) {
		if (!kill(pid, SIGKILL))
			waitpid(pid, NULL, 0);
		ksft_exit_fail_msg("read: %s\n", strerror(errno));
	}

	pidfd = syscall(__NR_pidfd_open, pid, 0);
	if (pidfd < 0) {
		if (!kill(pid, SIGKILL))
			waitpid(pid, NULL, 0);
		ksft_exit_fail_msg("pidfd_open: %s\n", strerror(errno));
	}

	/* Run negative tests which require a live child */
	run_negative_tests(pidfd);

	if (kill(pid, SIGKILL))
		ksft_exit_fail_msg("kill: %s\n", strerror(errno));

	success = (syscall(__NR_process_mrelease, pidfd, 0) == 0);
	if (!success) {
		/*
		 * If we failed to reap because the child exited too soon,
		 * before we could call process_mrelease. Double child's memory
		 * which causes it to spend more time on cleanup and increases
		 * our chances of reaping its memory before it exits.
		 * Retry until we succeed or reach MAX_SIZE_MB.
		 */
		if (errno == ESRCH) {
			retry = (size <= MAX_SIZE_MB);
		} else {
			waitpid(pid, NULL, 0);
			ksft_exit_fail_msg("process_mrelease: %s\n", strerror(errno));
		}
	}

	/* Cleanup to prevent zombies */
	if (waitpid(pid, NULL, 0) < 0)
		ksft_exit_fail_msg("waitpid: %s\n", strerror(errno));

	close(pidfd);

	if (!success) {
		if (retry) {
			size *= 2;
			goto retry;
		}
		ksft_exit_fail_msg("All process_mrelease attempts failed!\n");
	}

	ksft_test_result_pass("Success reaping a child with %zuMB of memory allocations\n",
			      size);

	run_reap_kill_tests();
	ksft_finished();
}
