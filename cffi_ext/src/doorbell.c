/* Waiting for a mailbox doorbell without holding the GIL (firmware/mailboxes.py).
 *
 * The firmware's mailbox poller watches the request sequence register of every VM mailbox
 * (hostlib/mailbox.py, docs/mailbox.md). Spinning on them in Python holds the interpreter
 * lock between yields, so a worker thread waiting for it stalls, and each poll costs a few
 * microseconds of interpreter work on a CPU whose hyperthread sibling is the VM's side of
 * the round trip. cffi releases the GIL for the length of a call, so here the spin costs
 * the other threads nothing, and the x86 PAUSE hint tells the core to favour its sibling.
 */
#define _POSIX_C_SOURCE 199309L /* clock_gettime under -std=c11 */
#include <time.h>

#include "slicefab_fast.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SF_RELAX() _mm_pause()
#else
#define SF_RELAX() __asm__ __volatile__("" ::: "memory")
#endif

/* how many scans between two clock reads (a clock read costs ~25 ns, a scan of a few
 * registers less) */
#define SF_SCANS_PER_CLOCK 32u

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int sf_doorbell_wait(const uint64_t *const *words, const uint64_t *expected, uint32_t n,
                     uint64_t spin_ns)
{
    uint64_t deadline = 0;
    for (uint32_t scan = 0;; scan++) {
        for (uint32_t i = 0; i < n; i++) {
            const uint64_t *w = words[i];
            /* the VM stores the register with one aligned 8-byte store (x86 TSO): an
             * acquire load sees either the old or the new value, never a mix */
            if (w != NULL && __atomic_load_n(w, __ATOMIC_ACQUIRE) != expected[i])
                return (int)i;
        }
        if (scan % SF_SCANS_PER_CLOCK == 0) {
            uint64_t t = now_ns();
            if (scan == 0)
                deadline = t + spin_ns;
            if (t >= deadline)
                return -1;
        }
        SF_RELAX();
    }
}
