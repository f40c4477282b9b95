// SPDX-License-Identifier: GPL-2.0-only
/*
 * Exec/exit race stress for the series' readers, run on the lockdep/KASAN
 * kernel (run.sh --debug). The readers now take mm_users per access on an
 * mm they hold only with mmgrab(), so the cases that matter are an mm whose
 * last user goes away between two accesses: the target execs (its old mm
 * loses its last user in exec_mmap()), exits, or is killed and reaped by
 * process_mrelease(), while readers are inside read().
 *
 *   exec_race stress ITERATIONS [SECONDS]
 *	Up to ITERATIONS iterations, and no new one after SECONDS (if given;
 *	TCG with KASAN and lockdep is slow). Per iteration: fork a target that execs itself EXECS times (every
 *	other exec from a second thread, so de_thread() and the leader
 *	switch run too), then exits; every third target is instead killed
 *	at a random point and process_mrelease()d. Meanwhile one thread
 *	each reads the target's /proc/PID/mem, writes it, reads environ,
 *	cmdline and pagemap, through a descriptor opened at the start of
 *	the iteration (the old mm after an exec) and through one opened
 *	fresh for every read; one issues the PAGEMAP_SCAN ioctl and one
 *	process_vm_readv(). A successful mem read must return the target's
 *	marker, a non-empty cmdline its name. Prints one "EXECRACE" line
 *	per reader with counts of reads with data, empty reads and errors,
 *	and a summary "EXECRACESUM iterations=N (those run) execs=E kills=K ...
 *	unexpected=U": U counts errors other than those an exited or
 *	execing target explains (ENOENT, ESRCH, EIO; EINTR for the ioctl;
 *	EFAULT for process_vm_readv() of an image that has not mapped the
 *	marker yet) and reads returning wrong data.
 *
 *   exec_race target N	(internal) exec self N more times, then exit
 *
 * Exit 0 when it ran and unexpected=0, 1 otherwise.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef __NR_process_mrelease
#define __NR_process_mrelease 448
#endif
#define EXECS 6
#define MARK 0xa5
#define CHUNK 4096

/*
 * Initialised data at the same address in every image of this static,
 * non-PIE binary: a mem read of it that succeeds sees MARK, whichever
 * image (or fork) it hit; mem writes store MARK again.
 */
static unsigned char marker[CHUNK] __attribute__((aligned(4096))) = {
	[0 ... CHUNK - 1] = MARK
};

enum kind { MEM, MEMW, ENVIRON, CMDLINE, PAGEMAP, SCAN, VMREADV, NKINDS };
static const char *const names[NKINDS] = {
	"mem", "mem_write", "environ", "cmdline", "pagemap", "pagemap_scan", "vm_readv"
};

struct counts {
	long data, empty, errors, unexpected;
	int first_errno;	/* first unexpected errno, for the report */
};

static _Atomic pid_t target;		/* current target, 0 between iterations */
static _Atomic unsigned int generation;	/* bumped per target */
static _Atomic bool stop;
static struct counts counts[NKINDS];
static char self[] = "/proc/self/exe";

static __attribute__((noreturn)) void die(const char *what)
{
	fprintf(stderr, "exec_race: %s: %s\n", what, strerror(errno));
	exit(1);
}

static char *target_argv[] = { "exec_race", "target", NULL, NULL };

static void *exec_thread(void *arg)
{
	(void)arg;
	execv(self, target_argv);
	_exit(3);
}

static __attribute__((noreturn)) void target_main(int left)
{
	char arg[16];
	pthread_t t;

	if (left <= 0) {
		/* some anonymous memory for exit_mmap() to free */
		char *p = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (p != MAP_FAILED)
			memset(p, 1, 1 << 20);
		_exit(0);
	}
	snprintf(arg, sizeof(arg), "%d", left - 1);
	target_argv[2] = arg;
	/* every other exec from a second thread: de_thread() kills the leader */
	if (left % 2 && !pthread_create(&t, NULL, exec_thread, NULL))
		for (;;)
			pause();
	execv(self, target_argv);
	_exit(3);
}

static const char *proc_file(enum kind k)
{
	switch (k) {
	case MEM:
	case MEMW:
		return "mem";
	case ENVIRON:
		return "environ";
	case CMDLINE:
		return "cmdline";
	default:
		return "pagemap";
	}
}

/* Errors an exited, execing or reaped target explains */
static bool expected_errno(enum kind k, int e)
{
	return e == ENOENT || e == ESRCH || e == EIO || (k == SCAN && e == EINTR) ||
	       /* the new image has not mapped the marker yet */
	       (k == VMREADV && e == EFAULT);
}

/* One access through @fd (or, for vm_readv, to @pid); -errno, or bytes */
static long access_once(enum kind k, int fd, pid_t pid, unsigned char *buf)
{
	struct iovec local = { buf, CHUNK }, remote = { marker, CHUNK };
	struct page_region regions[8];
	struct pm_scan_arg arg = {
		.size = sizeof(arg),
		.start = (unsigned long)marker,
		.end = (unsigned long)marker + CHUNK,
		.vec = (unsigned long)regions,
		.vec_len = 8,
		.return_mask = PAGE_IS_PRESENT,
	};
	long n;

	switch (k) {
	case MEM:
		n = pread(fd, buf, CHUNK, (off_t)(unsigned long)marker);
		break;
	case MEMW:
		memset(buf, MARK, CHUNK);
		n = pwrite(fd, buf, CHUNK, (off_t)(unsigned long)marker);
		break;
	case PAGEMAP:
		n = pread(fd, buf, 8 * 8, (unsigned long)marker / 4096 * 8);
		break;
	case SCAN:
		n = ioctl(fd, PAGEMAP_SCAN, &arg);
		break;
	case VMREADV:
		n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
		break;
	default:
		n = pread(fd, buf, CHUNK, 0);
		break;
	}
	return n < 0 ? -errno : n;
}

/* Wrong data from a successful read */
static bool bad_data(enum kind k, const unsigned char *buf, long n)
{
	long i;

	if (k == MEM || k == VMREADV) {
		for (i = 0; i < n; i++)
			if (buf[i] != MARK)
				return true;
	}
	/* a non-empty cmdline is "exec_race..." or the forked stressor's */
	if (k == CMDLINE && !memmem(buf, n, "exec_race", 9))
		return true;
	return false;
}

static void account(enum kind k, long n, const unsigned char *buf)
{
	struct counts *c = &counts[k];

	if (n > 0 && bad_data(k, buf, n)) {
		c->unexpected++;
		if (!c->first_errno)
			c->first_errno = -1;
	} else if (n > 0) {
		c->data++;
	} else if (n == 0) {
		c->empty++;
	} else {
		c->errors++;
		if (!expected_errno(k, -n)) {
			c->unexpected++;
			if (!c->first_errno)
				c->first_errno = -n;
		}
	}
}

static int open_proc(enum kind k, pid_t pid)
{
	char path[64];

	snprintf(path, sizeof(path), "/proc/%d/%s", pid, proc_file(k));
	return open(path, k == MEMW ? O_RDWR : O_RDONLY);
}

static void *reader(void *arg)
{
	enum kind k = (enum kind)(long)arg;
	unsigned char *buf = malloc(CHUNK);
	unsigned int gen = 0;
	int held = -1, fd;
	pid_t pid;

	if (!buf)
		die("malloc");
	while (!stop) {
		pid = target;
		if (!pid) {
			sched_yield();
			continue;
		}
		if (k == VMREADV) {
			account(k, access_once(k, -1, pid, buf), buf);
			continue;
		}
		/* the descriptor held across the target's execs and exit */
		if (gen != generation) {
			if (held >= 0)
				close(held);
			gen = generation;
			held = open_proc(k, pid);
			if (held < 0)
				account(k, -errno, buf);
		}
		if (held >= 0)
			account(k, access_once(k, held, pid, buf), buf);
		/* and one opened now, maybe mid-exec */
		fd = open_proc(k, pid);
		if (fd < 0) {
			account(k, -errno, buf);
			continue;
		}
		account(k, access_once(k, fd, pid, buf), buf);
		close(fd);
	}
	if (held >= 0)
		close(held);
	free(buf);
	return NULL;
}

static double since(const struct timespec *t0)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (t.tv_sec - t0->tv_sec) + (t.tv_nsec - t0->tv_nsec) / 1e9;
}

static int stress(long iterations, double max_secs)
{
	pthread_t threads[NKINDS];
	long i, kills = 0, reaped = 0, esrch = 0, unexpected = 0;
	struct timespec t0;
	unsigned int seed = 1;
	int k;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (k = 0; k < NKINDS; k++)
		if (pthread_create(&threads[k], NULL, reader, (void *)(long)k))
			die("pthread_create");
	for (i = 0; i < iterations && (max_secs <= 0 || since(&t0) < max_secs); i++) {
		bool kill_it = i % 3 == 2;
		char arg[16];
		int status, pidfd;
		pid_t pid;

		snprintf(arg, sizeof(arg), "%d", EXECS);
		pid = fork();
		if (pid < 0)
			die("fork");
		if (pid == 0)
			execl(self, "exec_race", "target", arg, (char *)NULL), _exit(3);
		target = pid;
		generation++;
		if (kill_it) {
			struct timespec d = { 0, rand_r(&seed) % 20000000 };

			pidfd = syscall(SYS_pidfd_open, pid, 0);
			if (pidfd < 0)
				die("pidfd_open");
			nanosleep(&d, NULL);
			syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, NULL, 0);
			kills++;
			if (!syscall(__NR_process_mrelease, pidfd, 0))
				reaped++;
			else if (errno == ESRCH)
				esrch++;
			else
				fprintf(stderr, "process_mrelease: %s\n", strerror(errno)), unexpected++;
			close(pidfd);
		}
		if (waitpid(pid, &status, 0) != pid)
			die("waitpid");
		if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0) &&
		    !(kill_it && WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)) {
			fprintf(stderr, "target %d: status 0x%x\n", pid, status);
			unexpected++;
		}
	}
	target = 0;
	stop = true;
	for (k = 0; k < NKINDS; k++)
		pthread_join(threads[k], NULL);
	for (k = 0; k < NKINDS; k++) {
		struct counts *c = &counts[k];

		printf("EXECRACE reader=%s data=%ld empty=%ld errors=%ld unexpected=%ld%s%s\n",
		       names[k], c->data, c->empty, c->errors, c->unexpected,
		       c->first_errno ? " first=" : "",
		       c->first_errno < 0 ? "wrong-data" :
		       c->first_errno ? strerror(c->first_errno) : "");
		unexpected += c->unexpected;
	}
	printf("EXECRACESUM iterations=%ld execs=%ld kills=%ld mrelease_reaped=%ld mrelease_esrch=%ld secs=%.1f unexpected=%ld\n",
	       i, i * EXECS, kills, reaped, esrch, since(&t0), unexpected);
	return unexpected ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "target"))
		target_main(atoi(argv[2]));
	if ((argc == 3 || argc == 4) && !strcmp(argv[1], "stress"))
		return stress(atol(argv[2]), argc == 4 ? atof(argv[3]) : 0);
	fprintf(stderr, "usage: %s stress ITERATIONS [SECONDS]\n", argv[0]);
	return 1;
}
