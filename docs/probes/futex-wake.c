// Cost of FUTEX_WAKE on the waker's side when the wakee sleeps, after the wakee slept G µs;
// the waker either spins or sleeps (nanosleep) during G. Build and run:
//   gcc -O2 -pthread docs/probes/futex-wake.c -o /tmp/futex-wake && /tmp/futex-wake
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
static _Atomic int word = 0;     // 0: wakee should sleep, 1: go
static _Atomic int asleep = 0;   // wakee about to sleep
static _Atomic int acked = 0;
static double now_us(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec / 1e3; }
static void *wakee(void *arg) {
  (void)arg;
  for (;;) {
    atomic_store(&asleep, 1);
    while (atomic_load(&word) == 0) syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
    atomic_store(&asleep, 0);
    atomic_store(&word, 0);
    atomic_store(&acked, 1);
  }
  return NULL;
}
static int cmp(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return x < y ? -1 : x > y; }
int main(void) {
  pthread_t t; pthread_create(&t, NULL, wakee, NULL);
  int gaps[] = {5, 20, 50, 100, 300, 1000, 5000};
  const int n = 400;
  double *s = malloc(sizeof(double) * n);
  for (int mode = 0; mode < 2; mode++) {
    for (unsigned g = 0; g < sizeof gaps / sizeof *gaps; g++) {
      for (int i = 0; i < n; i++) {
        while (!atomic_load(&asleep)) ;
        if (mode == 0) { double u = now_us() + gaps[g]; while (now_us() < u) ; }
        else { struct timespec ts = {0, gaps[g] * 1000L}; nanosleep(&ts, NULL); }
        double t0 = now_us();
        atomic_store(&word, 1);
        syscall(SYS_futex, &word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
        double t1 = now_us();
        s[i] = t1 - t0;
        while (!atomic_load(&acked)) ;
        atomic_store(&acked, 0);
      }
      qsort(s, n, sizeof(double), cmp);
      printf("%s gap %5d us: wake syscall median %.2f us, p90 %.2f\n", mode ? "waker slept" : "waker spun ", gaps[g], s[n / 2], s[n * 9 / 10]);
    }
  }
  return 0;
}
