// SPDX-License-Identifier: GPL-2.0
/*
 * Measurements for the reapd kernel harness. The killer (this program) is
 * never the victim's parent: a separate parent process forks the victim
 * and waits for it, as a service manager would.
 *
 *   mrelease_bench pinned RUNS MIB READER
 *	READER is mem, cmdline, environ, pagemap, pagemap_scan, vm_readv or
 *	none. Per run: a thread of ours reads /proc/VICTIM/READER (vm_readv:
 *	process_vm_readv() of the victim; pagemap_scan: the PAGEMAP_SCAN
 *	ioctl on /proc/VICTIM/pagemap, its result vector on that page) into
 *	a userfaultfd-registered page and stalls in copy_to_user(); we kill
 *	the victim (MIB MiB of
 *	anonymous memory), wait for its exit on its pidfd, call
 *	process_mrelease(0) (the killer lost the race), wait until its parent
 *	has reaped it, and read AnonPages; then we let the reader go.
 *	Prints per run "PINNED reader=R run=I freed_kb=F after_resume_kb=A
 *	mrelease=RC ms=T" (T: kill to reaped by the parent) and a summary
 *	line "PINNEDSUM reader=R runs=N mib=M freed_all=K freed_kb_min=..
 *	freed_kb_med=.. freed_kb_max=.. ms_min=.. ms_med=.. ms_max=..", K being the runs in which at least
 *	3/4 of the victim's memory was freed while the reader was stalled.
 *
 *   mrelease_bench robust RUNS SEQ
 *	SEQ is reap (kill, then process_mrelease(0) at once) or kill (kill
 *	only). The victim holds a process-shared robust mutex in shared
 *	memory when it is killed. Once its parent has reaped it, the futex
 *	word must carry FUTEX_OWNER_DIED (set by the victim's exit path when
 *	it walks its robust list); if the list was reaped away first, it does
 *	not, and a waiter would never get EOWNERDEAD. Prints "ROBUST seq=S
 *	runs=N lost=L".
 *
 *   mrelease_bench runas UID CMD [ARGS]
 *	exec CMD with real, effective and saved uid and gid UID, no groups.
 *
 * Exit 0 when the measurement ran (whatever it measured), 1 on errors.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/fs.h>
#include <linux/futex.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
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
#include <time.h>
#include <unistd.h>

#ifndef __NR_process_mrelease
#define __NR_process_mrelease 448
#endif
#define TIMEOUT_MS 30000

static long page_size;

static __attribute__((noreturn)) void die(const char *what)
{
	fprintf(stderr, "mrelease_bench: %s: %s\n", what, strerror(errno));
	exit(1);
}

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static long anon_kb(void)
{
	char line[128];
	long kb = -1;
	FILE *f = fopen("/proc/meminfo", "r");

	while (f && fgets(line, sizeof(line), f))
		if (sscanf(line, "AnonPages: %ld kB", &kb) == 1)
			break;
	if (f)
		fclose(f);
	return kb;
}

struct victim {
	pid_t pid;	/* the victim */
	int pidfd;	/* the victim's pidfd */
	int parent;	/* pidfd of its parent, which exits 0 if it saw SIGKILL */
};

/*
 * Fork a parent that forks the victim and waits for it. The victim runs
 * @setup (may be NULL) after faulting in @len bytes, then waits for SIGKILL.
 */
static void spawn(struct victim *v, size_t len, void (*setup)(void))
{
	int pipefd[2];
	pid_t parent;

	if (pipe(pipefd))
		die("pipe");
	parent = fork();
	if (parent < 0)
		die("fork");
	if (parent == 0) {
		int status;
		pid_t pid = fork();

		if (pid == 0) {
			char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
				       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

			prctl(PR_SET_PDEATHSIG, SIGKILL);
			if (p == MAP_FAILED)
				_exit(2);
			memset(p, 0x5a, len);
			if (setup)
				setup();
			pid = getpid();
			if (write(pipefd[1], &pid, sizeof(pid)) != sizeof(pid))
				_exit(2);
			for (;;)
				pause();
		}
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (pid < 0 || waitpid(pid, &status, 0) != pid)
			_exit(1);
		_exit(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL ? 0 : 1);
	}
	close(pipefd[1]);
	if (read(pipefd[0], &v->pid, sizeof(v->pid)) != sizeof(v->pid))
		die("victim did not start");
	close(pipefd[0]);
	v->pidfd = syscall(SYS_pidfd_open, v->pid, 0);
	v->parent = syscall(SYS_pidfd_open, parent, 0);
	if (v->pidfd < 0 || v->parent < 0)
		die("pidfd_open");
}

static bool wait_exit(int pidfd)
{
	struct pollfd pfd = { .fd = pidfd, .events = POLLIN };

	return poll(&pfd, 1, TIMEOUT_MS) == 1;
}

/* Wait until the parent has reaped the victim; its exit status */
static int wait_parent(struct victim *v)
{
	siginfo_t info = {};

	if (waitid(P_PIDFD, v->parent, &info, WEXITED))
		die("waitid");
	close(v->parent);
	close(v->pidfd);
	return info.si_code == CLD_EXITED ? info.si_status : 128 + info.si_status;
}

static int mrelease(int pidfd)
{
	return syscall(__NR_process_mrelease, pidfd, 0) ? errno : 0;
}

struct reader {
	int fd;		/* the /proc file, or -1 for process_vm_readv() */
	pid_t pid;
	char *buf;
	off_t off;
	bool scan;	/* PAGEMAP_SCAN instead of read() */
};

static void *reader_thread(void *arg)
{
	struct reader *r = arg;
	struct iovec local = { r->buf, page_size }, remote = { r->buf, page_size };
	/* one page of the victim (mapped there from the fork), so one region */
	struct pm_scan_arg scan = {
		.size = sizeof(scan),
		.start = (unsigned long)r->buf,
		.end = (unsigned long)r->buf + page_size,
		.vec = (unsigned long)r->buf,
		.vec_len = page_size / sizeof(struct page_region),
		.return_mask = PAGE_IS_PRESENT,
	};
	long n;

	if (r->fd < 0)
		n = process_vm_readv(r->pid, &local, 1, &remote, 1, 0);
	else if (r->scan)
		n = ioctl(r->fd, PAGEMAP_SCAN, &scan);
	else
		n = pread(r->fd, r->buf, page_size, r->off);
	if (n < 0)
		perror("reader");
	return NULL;
}

static int cmp_long(const void *a, const void *b)
{
	long x = *(const long *)a, y = *(const long *)b;

	return (x > y) - (x < y);
}

static int pinned(int runs, long mib, const char *what)
{
	long freed[runs], us[runs], size_kb = mib << 10;
	int i, freed_all = 0;

	/* CONFIG_CROSS_MEMORY_ATTACH=n (tinyconfig): nothing to measure */
	if (!strcmp(what, "vm_readv") &&
	    process_vm_readv(getpid(), NULL, 0, NULL, 0, 0) < 0 && errno == ENOSYS) {
		printf("PINNEDSUM reader=%s unsupported\n", what);
		return 0;
	}

	for (i = 0; i < runs; i++) {
		struct uffdio_api api = { .api = UFFD_API };
		struct uffdio_register reg = {};
		struct uffdio_zeropage zero = {};
		struct pollfd pfd;
		struct uffd_msg msg;
		struct reader r = { .fd = -1 };
		bool stall = strcmp(what, "none");
		struct victim v;
		pthread_t thread;
		long before, after, resumed;
		double t0, t1;
		char path[64];
		int uffd, rc, status;

		uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
		if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api))
			die("userfaultfd");
		r.buf = mmap(NULL, page_size, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		reg.range.start = (unsigned long)r.buf;
		reg.range.len = page_size;
		reg.mode = UFFDIO_REGISTER_MODE_MISSING;
		if (r.buf == MAP_FAILED || ioctl(uffd, UFFDIO_REGISTER, &reg))
			die("UFFDIO_REGISTER");

		spawn(&v, mib << 20, NULL);
		r.pid = v.pid;
		r.scan = !strcmp(what, "pagemap_scan");
		if (stall && strcmp(what, "vm_readv")) {
			snprintf(path, sizeof(path), "/proc/%d/%s", v.pid,
				 r.scan ? "pagemap" : what);
			r.fd = open(path, O_RDONLY);
			if (r.fd < 0)
				die(path);
		}
		if (stall) {
			/* mem, pagemap: at an address the victim maps (from fork) */
			if (!strcmp(what, "mem"))
				r.off = (off_t)(unsigned long)r.buf;
			else if (!strcmp(what, "pagemap"))
				r.off = (unsigned long)r.buf / page_size * 8;
			if (pthread_create(&thread, NULL, reader_thread, &r))
				die("pthread_create");
			pfd = (struct pollfd){ .fd = uffd, .events = POLLIN };
			if (poll(&pfd, 1, TIMEOUT_MS) != 1 ||
			    read(uffd, &msg, sizeof(msg)) != sizeof(msg))
				die("reader did not stall on its buffer");
		}
		before = anon_kb();
		t0 = now_ms();
		syscall(SYS_pidfd_send_signal, v.pidfd, SIGKILL, NULL, 0);
		if (!wait_exit(v.pidfd))
			die("victim did not exit");
		rc = mrelease(v.pidfd);
		status = wait_parent(&v);
		t1 = now_ms();
		after = anon_kb();
		if (stall) {
			zero.range.start = (unsigned long)r.buf;
			zero.range.len = page_size;
			if (ioctl(uffd, UFFDIO_ZEROPAGE, &zero))
				die("UFFDIO_ZEROPAGE");
			pthread_join(thread, NULL);
			if (r.fd >= 0)
				close(r.fd);
		}
		resumed = anon_kb();
		close(uffd);
		munmap(r.buf, page_size);
		if (status)
			fprintf(stderr, "run %d: victim did not die by SIGKILL\n", i);
		freed[i] = before - after;
		us[i] = (long)((t1 - t0) * 1000);
		if (freed[i] >= size_kb * 3 / 4)
			freed_all++;
		printf("PINNED reader=%s run=%d freed_kb=%ld after_resume_kb=%ld mrelease=%s ms=%.1f\n",
		       what, i, freed[i], after - resumed, rc ? strerror(rc) : "0", t1 - t0);
	}
	qsort(freed, runs, sizeof(long), cmp_long);
	qsort(us, runs, sizeof(long), cmp_long);
	printf("PINNEDSUM reader=%s runs=%d mib=%ld freed_all=%d freed_kb_min=%ld freed_kb_med=%ld freed_kb_max=%ld ms_min=%.1f ms_med=%.1f ms_max=%.1f\n",
	       what, runs, mib, freed_all, freed[0], freed[runs / 2], freed[runs - 1],
	       us[0] / 1e3, us[runs / 2] / 1e3, us[runs - 1] / 1e3);
	return 0;
}

static pthread_mutex_t *robust_mutex;

static void lock_robust(void)
{
	if (pthread_mutex_lock(robust_mutex))
		_exit(3);
}

static int robust(int runs, const char *seq)
{
	bool reap = !strcmp(seq, "reap");
	int i, lost = 0;

	robust_mutex = mmap(NULL, page_size, PROT_READ | PROT_WRITE,
			    MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (robust_mutex == MAP_FAILED)
		die("mmap");
	for (i = 0; i < runs; i++) {
		pthread_mutexattr_t attr;
		struct victim v;
		unsigned int word;

		pthread_mutexattr_init(&attr);
		pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
		pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
		if (pthread_mutex_init(robust_mutex, &attr))
			die("pthread_mutex_init");
		spawn(&v, 1 << 20, lock_robust);
		syscall(SYS_pidfd_send_signal, v.pidfd, SIGKILL, NULL, 0);
		if (reap)
			mrelease(v.pidfd);
		if (wait_parent(&v))
			fprintf(stderr, "run %d: victim did not die by SIGKILL\n", i);
		/* glibc keeps the futex word first in a pthread_mutex_t */
		word = *(volatile unsigned int *)robust_mutex;
		if ((word & FUTEX_TID_MASK) == (unsigned int)v.pid &&
		    !(word & FUTEX_OWNER_DIED))
			lost++;
	}
	printf("ROBUST seq=%s runs=%d lost=%d\n", seq, runs, lost);
	return 0;
}

int main(int argc, char **argv)
{
	page_size = sysconf(_SC_PAGESIZE);
	if (argc >= 4 && !strcmp(argv[1], "runas")) {
		uid_t id = atoi(argv[2]);

		if (setgroups(0, NULL) || setresgid(id, id, id) || setresuid(id, id, id))
			die("setresuid");
		execv(argv[3], argv + 3);
		die(argv[3]);
	}
	if (argc == 5 && !strcmp(argv[1], "pinned"))
		return pinned(atoi(argv[2]), atol(argv[3]), argv[4]);
	if (argc == 4 && !strcmp(argv[1], "robust") &&
	    (!strcmp(argv[3], "reap") || !strcmp(argv[3], "kill")))
		return robust(atoi(argv[2]), argv[3]);
	fprintf(stderr, "usage: %s pinned RUNS MIB mem|cmdline|environ|pagemap|pagemap_scan|vm_readv|none\n"
		"       %s robust RUNS reap|kill\n"
		"       %s runas UID CMD [ARGS]\n", argv[0], argv[0], argv[0]);
	return 1;
}
