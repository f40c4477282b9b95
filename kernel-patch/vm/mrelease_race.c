// SPDX-License-Identifier: GPL-2.0
/*
 * Race count for the reapd kernel harness: kill and reap N fresh children
 * and count how often the reap fails with ESRCH (the victim got past
 * exit_mm() first).
 *
 *   mrelease_race plain N     pidfd_send_signal(SIGKILL), process_mrelease(0)
 *   mrelease_race yield N     as plain, with sched_yield() between the two
 *                             calls (a killer that is preempted, or does any
 *                             work, between kill and reap)
 *   mrelease_race hold MB FILE  fault in MB MiB, create FILE, sleep forever
 *                               (a victim for the broker's end-to-end test)
 *
 * These count return codes only; how much memory comes back is what
 * mrelease_bench measures.
 *
 * Prints one line: RACE mode=M cycles=N reaped=R esrch=E other=O sigkilled=K
 * Exit 0 if every cycle ran (whatever the counts), 1 on setup errors.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef __NR_process_mrelease
#define __NR_process_mrelease 448
#endif
#define CHILD_MEM (1UL << 20)

int main(int argc, char **argv)
{
	int yield, n, i, reaped = 0, esrch = 0, other = 0, sigkilled = 0;

	if (argc == 4 && !strcmp(argv[1], "hold")) {
		size_t len = strtoul(argv[2], NULL, 0) << 20;
		char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		FILE *f;

		if (p == MAP_FAILED)
			return perror("mmap"), 1;
		memset(p, 0x5a, len);
		f = fopen(argv[3], "w");
		if (!f)
			return perror("ready file"), 1;
		fclose(f);
		for (;;)
			pause();
	}
	if (argc != 3 || (strcmp(argv[1], "plain") && strcmp(argv[1], "yield"))) {
		fprintf(stderr, "usage: %s plain|yield N\n", argv[0]);
		return 1;
	}
	yield = !strcmp(argv[1], "yield");
	n = atoi(argv[2]);

	for (i = 0; i < n; i++) {
		int ready[2], pidfd, status;
		long ret;
		pid_t pid;
		char c;

		if (pipe(ready))
			return perror("pipe"), 1;
		pid = fork();
		if (pid < 0)
			return perror("fork"), 1;
		if (pid == 0) {
			char *p = mmap(NULL, CHILD_MEM, PROT_READ | PROT_WRITE,
				       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (p == MAP_FAILED)
				_exit(2);
			memset(p, 1, CHILD_MEM);
			if (write(ready[1], "r", 1) != 1)
				_exit(3);
			for (;;)
				pause();
		}
		close(ready[1]);
		if (read(ready[0], &c, 1) != 1)
			return fprintf(stderr, "child not ready\n"), 1;
		close(ready[0]);
		pidfd = syscall(SYS_pidfd_open, pid, 0);
		if (pidfd < 0)
			return perror("pidfd_open"), 1;
		ret = syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, NULL, 0);
		if (ret)
			return perror("pidfd_send_signal"), 1;
		if (yield)
			sched_yield();
		ret = syscall(__NR_process_mrelease, pidfd, 0);
		if (!ret)
			reaped++;
		else if (errno == ESRCH)
			esrch++;
		else
			other++;
		if (ret && errno != ESRCH && other <= 3)
			fprintf(stderr, "cycle %d: %s\n", i, strerror(errno));
		if (waitpid(pid, &status, 0) != pid)
			return perror("waitpid"), 1;
		sigkilled += WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
		close(pidfd);
	}
	printf("RACE mode=%s cycles=%d reaped=%d esrch=%d other=%d sigkilled=%d\n",
	       argv[1], n, reaped, esrch, other, sigkilled);
	return 0;
}
