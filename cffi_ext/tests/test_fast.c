/* C tests of the fast path, built and run under ASan+UBSan by `make sanitize`.
 *
 * The Python differential tests (tests/test_fastpath_*.py) hold the C code to the Python
 * reference; these tests drive the C API directly, where Python cannot reach: NULL and
 * out-of-range arguments of every function (each must return an error code, never touch
 * memory it was not given), and long random runs checked against brute-force models
 * (a byte per core / lane / granule) so that the sanitizers see every code path.
 *
 * Output: one line per test, then "N passed, M failed". Exit status 1 on any failure.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "slicefab_fast.h"
#include "slicefab_xbar.h"

static int failures, checks;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        checks++;                                                                    \
        if (!(cond)) {                                                               \
            failures++;                                                              \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                            \
    } while (0)

static uint64_t rng_state = 0x853c49e6748fea9bull;
static uint32_t rnd(uint32_t n) { /* 0..n-1 (n >= 1), splitmix64 */
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (uint32_t)((z ^ (z >> 31)) % n);
}

/* ------------------------------------------------------------------ crossbar image */

static void test_xbar(void) {
    sf_error err;
    sf_xbar_params xb = {16, 16, 100000, 250, 64};
    sf_port_demand d[64];
    memset(d, 0, sizeof d);
    for (int p = 0; p < 64; p++) d[p].owner = -1;
    /* the worked example of tests/test_fabric_driver.py: 40 Gbit/s at 250 MHz */
    d[0] = (sf_port_demand){7, 7, 25000, 40000, 1u << 5};
    d[1] = d[0];
    d[2] = (sf_port_demand){9, 0, 0, 100000, 1};
    uint32_t img[64 * SF_SHADOW_REGS], cur[64 * SF_SHADOW_REGS];
    CHECK(sf_xbar_image(&xb, d, 16, img, 16 * SF_SHADOW_REGS, &err) == SF_OK);
    CHECK(img[0] == 0x3 && img[1] == 0);             /* PERM: ports 0 and 1 of VM 7 */
    CHECK(img[2] == 1 + 4 * 7 + 16);                 /* WEIGHT */
    CHECK(img[3] == 20u << 16);                      /* TB_RATE 20.0 bytes/cycle */
    CHECK(img[4] == ((20u * 1024) | SLICEFAB_XBAR__PORTX__TB_BURST__ENABLE_bm));
    CHECK(img[5] == 1u << 5);                        /* KEYS */
    CHECK(img[2 * 6 + 0] == 0x4 && img[2 * 6 + 3] == 50u << 16);
    CHECK(img[3 * 6 + 2] == SLICEFAB_XBAR__PORTX__WEIGHT__WEIGHT_reset); /* free port */

    /* diff: all unknown -> everything, in address order; all known and equal -> nothing */
    sf_reg_write w[64 * SF_SHADOW_REGS];
    uint32_t n = 0;
    uint8_t known[64 * SF_SHADOW_REGS];
    memset(known, 0, sizeof known);
    CHECK(sf_xbar_diff(img, known, img, 16, w, 96, &n, &err) == SF_OK && n == 96);
    for (uint32_t i = 1; i < n; i++) CHECK(w[i].addr > w[i - 1].addr);
    CHECK(w[0].addr == sf_xbar_shadow_addr(0, 0) && w[0].addr == 0x100);
    CHECK(sf_xbar_diff(img, NULL, img, 16, w, 96, &n, &err) == SF_OK && n == 0);
    memcpy(cur, img, sizeof(uint32_t) * 96);
    cur[7] ^= 1;
    CHECK(sf_xbar_reconfigure(&xb, d, 16, cur, NULL, img, 96, w, 96, &n, &err) == SF_OK);
    CHECK(n == 1 && w[0].addr == sf_xbar_shadow_addr(1, 1) && w[0].value == img[7]);

    /* every bad argument is an error code, never a crash */
    sf_xbar_params bad = xb;
    bad.n_ports = 0;
    CHECK(sf_xbar_image(&bad, d, 0, img, 0, &err) == SF_ERANGE && err.field == SF_F_N_PORTS);
    bad.n_ports = 65;
    CHECK(sf_xbar_image(&bad, d, 65, img, 390, &err) == SF_ERANGE);
    bad = xb, bad.n_keys = 17;
    CHECK(sf_xbar_image(&bad, d, 16, img, 96, &err) == SF_ERANGE && err.field == SF_F_N_KEYS);
    bad = xb, bad.port_mbps = 0;
    CHECK(sf_xbar_image(&bad, d, 16, img, 96, &err) == SF_ERANGE);
    bad = xb, bad.clock_mhz = 0;
    CHECK(sf_xbar_image(&bad, d, 16, img, 96, &err) == SF_ERANGE);
    bad = xb, bad.data_bytes = 256;
    CHECK(sf_xbar_image(&bad, d, 16, img, 96, &err) == SF_ERANGE);
    CHECK(sf_xbar_image(NULL, d, 16, img, 96, &err) == SF_EINVAL);
    CHECK(sf_xbar_image(&xb, NULL, 16, img, 96, &err) == SF_EINVAL);
    CHECK(sf_xbar_image(&xb, d, 15, img, 90, &err) == SF_EINVAL);
    CHECK(sf_xbar_image(&xb, d, 16, img, 95, &err) == SF_EINVAL && err.field == SF_F_IMAGE_LEN);
    CHECK(sf_xbar_image(&xb, d, 16, NULL, 96, &err) == SF_EINVAL);
    sf_port_demand keep = d[4];
    d[4] = (sf_port_demand){1, 8, 0, 0, 0};
    CHECK(sf_xbar_image(&xb, d, 16, img, 96, &err) == SF_ERANGE && err.field == SF_F_PRIORITY &&
          err.index == 4);
    d[4] = (sf_port_demand){1, 0, (uint64_t)SF_MAX_MBPS + 1, 0, 0};
    CHECK(sf_xbar_image(&xb, d, 16, img, 96, &err) == SF_ERANGE && err.field == SF_F_GUARANTEED);
    d[4] = (sf_port_demand){1, 0, 0, UINT64_MAX, 0};
    CHECK(sf_xbar_image(&xb, d, 16, img, 96, &err) == SF_ERANGE && err.field == SF_F_LIMIT);
    d[4] = (sf_port_demand){1, 0, 0, 0, 1u << 16};
    CHECK(sf_xbar_image(&xb, d, 16, img, 96, &err) == SF_ERANGE && err.field == SF_F_KEYS);
    d[4] = (sf_port_demand){-2, 0, 0, 0, 0};
    CHECK(sf_xbar_image(&xb, d, 16, img, 96, &err) == SF_ERANGE && err.field == SF_F_OWNER);
    d[4] = keep;
    CHECK(sf_xbar_diff(img, NULL, img, 16, w, 95, &n, &err) == SF_EINVAL);
    CHECK(sf_xbar_diff(img, NULL, img, 0, w, 96, &n, &err) == SF_ERANGE);
    CHECK(sf_xbar_diff(NULL, NULL, img, 16, w, 96, &n, &err) == SF_EINVAL);
    CHECK(sf_xbar_diff(img, NULL, img, 16, w, 96, NULL, &err) == SF_EINVAL);
    CHECK(sf_xbar_shadow_addr(64, 0) == 0 && sf_xbar_shadow_addr(0, 6) == 0);

    /* slice table -> demand: bounds per slice, sums bounded */
    sf_slice s[3] = {
        {1, 3, 10, 0, 2, 0x3},
        {1, 5, 20, 30, 4, 0x2},
        {2, 0, 0, 0, 0, (uint64_t)1 << 15},
    };
    sf_port_demand out[16];
    CHECK(sf_xbar_demand(&xb, s, 3, out, 16, &err) == SF_OK);
    CHECK(out[1].priority == 5 && out[1].guaranteed_mbps == 30 && out[1].limit_mbps == 100030);
    CHECK(out[1].keys == ((1u << 2) | (1u << 4)) && out[15].owner == 2 && out[3].owner == -1);
    s[2].ports = (uint64_t)1 << 16;
    CHECK(sf_xbar_demand(&xb, s, 3, out, 16, &err) == SF_ERANGE && err.field == SF_F_PORTS &&
          err.index == 2);
    s[2].ports = 1, s[2].key = 16;
    CHECK(sf_xbar_demand(&xb, s, 3, out, 16, &err) == SF_ERANGE && err.field == SF_F_KEY);
    s[2].key = 0, s[2].owner = -1;
    CHECK(sf_xbar_demand(&xb, s, 3, out, 16, &err) == SF_ERANGE && err.field == SF_F_OWNER);
    s[2].owner = 0, s[2].max_mbps = 100001;
    CHECK(sf_xbar_demand(&xb, s, 3, out, 16, &err) == SF_ERANGE && err.field == SF_F_MAX_BW);
    CHECK(sf_xbar_demand(&xb, NULL, 3, out, 16, &err) == SF_EINVAL);
    CHECK(sf_xbar_demand(&xb, s, 0, out, 15, &err) == SF_EINVAL);

    /* random demand tables on random crossbars: every image is encodable and diffs apply */
    for (int round = 0; round < 2000; round++) {
        sf_xbar_params r = {1 + rnd(64), 1 + rnd(16), 1 + rnd(5000000), 1 + rnd(5000), 1 + rnd(255)};
        for (uint32_t p = 0; p < r.n_ports; p++) {
            d[p].owner = (int64_t)rnd(6) - 1;
            d[p].priority = rnd(8);
            d[p].guaranteed_mbps = rnd(2) ? rnd(1000000) : (uint64_t)SF_MAX_MBPS;
            d[p].limit_mbps = rnd(2) ? rnd(1000000) : (uint64_t)SF_MAX_MBPS;
            d[p].keys = rnd(1u << r.n_keys);
        }
        const uint32_t regs = r.n_ports * SF_SHADOW_REGS;
        CHECK(sf_xbar_image(&r, d, r.n_ports, cur, regs, &err) == SF_OK);
        for (uint32_t i = 0; i < regs; i++) known[i] = (uint8_t)rnd(2);
        CHECK(sf_xbar_reconfigure(&r, d, r.n_ports, cur, known, img, regs, w, regs, &n, &err) ==
              SF_OK);
        uint32_t unknown = 0;
        for (uint32_t i = 0; i < regs; i++) unknown += !known[i];
        CHECK(n == unknown); /* same image: only the unknown registers are written */
        for (uint32_t p = 0; p < r.n_ports; p++) {
            const uint32_t *reg = &img[p * SF_SHADOW_REGS];
            CHECK(reg[2] >= 1 && reg[2] <= 255);
            if (d[p].owner >= 0) CHECK(reg[3] >= 1 && (reg[4] & 0xFFFFFF) >= 2 * r.data_bytes);
            CHECK(r.n_ports == 64 || ((reg[0] | (uint64_t)reg[1] << 32) >> r.n_ports) == 0);
        }
    }
    printf("xbar image: done\n");
}

/* ------------------------------------------------------------------ cores */

static void test_cores(void) {
    sf_error err;
    CHECK(sf_cores_new(NULL, 1, &err) == NULL && err.code == SF_ERANGE);
    uint32_t zero[2] = {4, 0};
    CHECK(sf_cores_new(zero, 2, &err) == NULL && err.index == 1);
    CHECK(sf_cores_new(zero, 0, &err) == NULL);

    for (int round = 0; round < 40; round++) {
        uint32_t n_clusters = 1 + rnd(12), sizes[12], total = 0;
        for (uint32_t k = 0; k < n_clusters; k++) total += sizes[k] = 1 + rnd(70);
        sf_cores *c = sf_cores_new(sizes, n_clusters, &err);
        CHECK(c != NULL && sf_cores_total(c) == total);
        uint8_t *model = calloc(total, 1); /* 1: held */
        uint32_t *out = malloc(sizeof(uint32_t) * total);
        for (int step = 0; step < 400; step++) {
            const uint32_t r = rnd(4), count = 1 + rnd(total);
            if (r == 0) {
                const int mode = (int)rnd(3);
                const int rc = sf_cores_allocate(c, count, mode, rnd(n_clusters + 1), out, count, &err);
                if (rc == SF_OK)
                    for (uint32_t i = 0; i < count; i++) {
                        CHECK(!model[out[i]]);
                        model[out[i]] = 1;
                        if (i) CHECK(out[i] > out[i - 1]);
                    }
                else
                    CHECK(rc == SF_ENOSPC || rc == SF_ERANGE);
            } else {
                uint32_t ids[6], k = 1 + rnd(6);
                for (uint32_t i = 0; i < k; i++) ids[i] = rnd(total + 2); /* some unknown */
                const int rc = (r == 1 ? sf_cores_take : sf_cores_give)(c, ids, k, &err);
                if (rc == SF_OK)
                    for (uint32_t i = 0; i < k; i++) model[ids[i]] = r == 1;
                else
                    CHECK(rc == SF_ERANGE || rc == SF_EINVAL || rc == SF_ECONFLICT);
            }
            uint32_t free_model = 0;
            for (uint32_t i = 0; i < total; i++) {
                int f = -1;
                CHECK(sf_cores_is_free(c, i, &f, &err) == SF_OK && f == !model[i]);
                free_model += !model[i];
            }
            CHECK(sf_cores_free_count(c) == free_model);
        }
        uint32_t n = 0, f = 0;
        CHECK(sf_cores_free_ids(c, out, total, &n, &err) == SF_OK && n == sf_cores_free_count(c));
        CHECK(sf_cores_free_ids(c, out, n ? n - 1 : 0, &n, &err) == (n ? SF_EINVAL : SF_OK));
        CHECK(sf_cores_cluster_free(c, n_clusters, &f, &err) == SF_ERANGE);
        CHECK(sf_cores_is_free(c, total, (int *)&f, &err) == SF_ERANGE);
        CHECK(sf_cores_allocate(c, 0, 0, 0, out, 1, &err) == SF_ERANGE);
        CHECK(sf_cores_allocate(c, 2, 0, 0, out, 1, &err) == SF_EINVAL);
        CHECK(sf_cores_allocate(c, 1, 7, 0, out, 1, &err) == SF_EINVAL);
        CHECK(sf_cores_allocate(c, 1, SF_CORES_IN_CLUSTER, n_clusters, out, 1, &err) == SF_ERANGE);
        CHECK(sf_cores_take(c, NULL, 2, &err) == SF_EINVAL);
        free(model);
        free(out);
        sf_cores_free(c);
    }
    sf_cores_free(NULL);
    printf("cores: done\n");
}

/* ------------------------------------------------------------------ lanes */

static void test_lanes(void) {
    sf_error err;
    uint32_t bad[2] = {8, 3};
    CHECK(sf_lanes_new(bad, 2, &err) == NULL && err.index == 1);
    CHECK(sf_lanes_new(bad, 0, &err) == NULL);
    for (int round = 0; round < 60; round++) {
        uint32_t n_ports = 1 + rnd(8), lanes[8], total = 0;
        for (uint32_t p = 0; p < n_ports; p++) total += lanes[p] = 1u << rnd(5);
        sf_lanes *l = sf_lanes_new(lanes, n_ports, &err);
        CHECK(l != NULL);
        uint8_t held[128] = {0};
        uint32_t exclude[4], n_ex = rnd(4);
        for (uint32_t i = 0; i < n_ex; i++) exclude[i] = rnd(total);
        for (int step = 0; step < 300; step++) {
            uint32_t port = 0, first = 0, w = 1u << rnd(6);
            const uint32_t r = rnd(3);
            if (r == 0) {
                const int rc = sf_lanes_allocate(l, w, (int32_t)rnd(n_ports + 1) - 1, exclude, n_ex,
                                                 &port, &first, &err);
                if (rc == SF_OK) {
                    for (uint32_t i = first; i < first + w; i++) {
                        CHECK(!held[i]);
                        held[i] = 1;
                        for (uint32_t j = 0; j < n_ex; j++) CHECK(exclude[j] != i);
                    }
                } else {
                    CHECK(rc == SF_ENOSPC || rc == SF_ERANGE);
                }
            } else {
                first = rnd(total + 1);
                port = rnd(n_ports + 1);
                const int rc = (r == 1 ? sf_lanes_take : sf_lanes_give)(l, port, first, w, &err);
                if (rc == SF_OK)
                    for (uint32_t i = first; i < first + w; i++) held[i] = r == 1;
                else
                    CHECK(rc == SF_ERANGE || rc == SF_EINVAL || rc == SF_ECONFLICT ||
                          rc == SF_ENOTHELD);
            }
            uint32_t free_model = 0;
            for (uint32_t i = 0; i < total; i++) {
                int h = -1;
                CHECK(sf_lanes_lane_held(l, i, &h, &err) == SF_OK && h == held[i]);
                free_model += !held[i];
            }
            CHECK(sf_lanes_free_total(l) == free_model);
        }
        uint32_t out = 0, w = 0;
        int flag = 0;
        CHECK(sf_lanes_port_free(l, n_ports, &out, &err) == SF_ERANGE);
        CHECK(sf_lanes_group_at(l, total, &w, &err) == SF_ERANGE);
        CHECK(sf_lanes_lane_held(l, total, &flag, &err) == SF_ERANGE);
        CHECK(sf_lanes_is_free(l, total, 1, &flag, &err) == SF_ERANGE);
        uint32_t far = total;
        CHECK(sf_lanes_allocate(l, 1, -1, &far, 1, &out, &w, &err) == SF_ERANGE);
        CHECK(sf_lanes_allocate(l, 1, -1, NULL, 1, &out, &w, &err) == SF_EINVAL);
        CHECK(sf_lanes_allocate(l, 3, -1, NULL, 0, &out, &w, &err) == SF_ERANGE);
        CHECK(sf_lanes_allocate(l, 1, -2, NULL, 0, &out, &w, &err) == SF_ERANGE);
        sf_lanes_free(l);
    }
    sf_lanes_free(NULL);
    printf("lanes: done\n");
}

/* ------------------------------------------------------------------ extents */

/* compare the allocator with a byte map: the free extents are exactly its free runs */
static void check_extents(sf_extents *e, const uint8_t *held, uint32_t total, sf_extent *buf) {
    sf_error err;
    uint32_t n = 0, k = 0, largest = 0;
    uint64_t free_total = 0;
    CHECK(sf_extents_list(e, buf, total, &n, &err) == SF_OK);
    CHECK(n == sf_extents_count(e));
    for (uint32_t i = 0; i < total;) {
        if (held[i]) {
            i++;
            continue;
        }
        uint32_t j = i;
        while (j < total && !held[j]) j++;
        CHECK(k < n && buf[k].start == i && buf[k].length == j - i);
        if (j - i > largest) largest = j - i;
        free_total += j - i;
        k++;
        i = j;
    }
    CHECK(k == n && sf_extents_free_granules(e) == free_total && sf_extents_largest(e) == largest);
}

static void test_extents(void) {
    sf_error err;
    CHECK(sf_extents_new(0, &err) == NULL && err.code == SF_ERANGE);
    CHECK(sf_extents_new(0x80000000u, &err) == NULL);
    for (int round = 0; round < 40; round++) {
        const uint32_t total = 1 + rnd(round < 30 ? 300 : 20000);
        sf_extents *e = sf_extents_new(total, &err);
        uint8_t *held = calloc(total, 1);
        sf_extent *buf = malloc(sizeof(sf_extent) * (total + 1));
        CHECK(e && held && buf);
        for (int step = 0; step < 600; step++) {
            const uint32_t r = rnd(5);
            uint32_t n = 0;
            if (r == 0) {
                const uint32_t g = 1 + rnd(total / 4 + 1), max = 1 + rnd(4);
                const int rc = sf_extents_allocate(e, g, (int)rnd(2), max, buf, total, &n, &err);
                if (rc == SF_OK) {
                    uint32_t sum = 0;
                    for (uint32_t i = 0; i < n; i++) {
                        for (uint32_t j = buf[i].start; j < buf[i].start + buf[i].length; j++) {
                            CHECK(!held[j]);
                            held[j] = 1;
                        }
                        sum += buf[i].length;
                        if (i) CHECK(buf[i].start > buf[i - 1].start);
                    }
                    CHECK(sum == g && n <= max);
                } else {
                    CHECK(rc == SF_ENOSPC || rc == SF_EFRAG || rc == SF_ERANGE);
                }
            } else if (r <= 2) {
                sf_extent x[2] = {{rnd(total + 1), 1 + rnd(8)}, {rnd(total), 1 + rnd(3)}};
                const uint32_t k = 1 + rnd(2);
                const int rc = (r == 1 ? sf_extents_take : sf_extents_give)(e, x, k, &err);
                if (rc == SF_OK)
                    for (uint32_t i = 0; i < k; i++)
                        for (uint32_t j = x[i].start; j < x[i].start + x[i].length; j++)
                            held[j] = r == 1;
                else
                    CHECK(rc == SF_ERANGE || rc == SF_EINVAL || rc == SF_ECONFLICT);
            } else if (r == 3) {
                const uint32_t s = rnd(total), len = 1 + rnd(total - s), grow = 1 + rnd(5);
                int grown = -1;
                const int rc = sf_extents_extend(e, s, len, grow, &grown, &err);
                if (rc == SF_OK && grown)
                    for (uint32_t j = s + len; j < s + len + grow; j++) {
                        CHECK(!held[j]);
                        held[j] = 1;
                    }
                else if (rc)
                    CHECK(rc == SF_ECONFLICT);
            } else {
                const uint32_t s = rnd(total), len = 1 + rnd(total - s);
                int f = -1, any = -1, expect = 1, expect_any = 0;
                for (uint32_t j = s; j < s + len; j++) expect &= !held[j], expect_any |= !held[j];
                CHECK(sf_extents_is_free(e, s, len, &f, &err) == SF_OK && f == expect);
                CHECK(sf_extents_any_free(e, s, len, &any, &err) == SF_OK && any == expect_any);
                uint32_t run = 0;
                if (!held[s] && (s == 0 || held[s - 1]))
                    while (s + run < total && !held[s + run]) run++;
                CHECK(sf_extents_free_at(e, s) == run);
            }
            check_extents(e, held, total, buf);
        }
        uint32_t n = 0;
        int flag = 0;
        sf_extent huge = {0xFFFFFFFFu, 0xFFFFFFFFu}, empty = {0, 0};
        CHECK(sf_extents_take(e, &huge, 1, &err) == SF_ERANGE); /* start+length overflows */
        CHECK(sf_extents_give(e, &empty, 1, &err) == SF_ERANGE);
        CHECK(sf_extents_take(e, NULL, 1, &err) == SF_EINVAL);
        CHECK(sf_extents_is_free(e, total, 1, &flag, &err) == SF_ERANGE);
        CHECK(sf_extents_any_free(e, 0xFFFFFFFFu, 2, &flag, &err) == SF_ERANGE);
        CHECK(sf_extents_extend(e, 0, 1, 0, &flag, &err) == SF_ERANGE || err.code == SF_ECONFLICT);
        CHECK(sf_extents_allocate(e, 0, 0, 1, buf, 1, &n, &err) == SF_ERANGE);
        CHECK(sf_extents_allocate(e, total + 1, 0, 1, buf, 1, &n, &err) == SF_ERANGE);
        CHECK(sf_extents_allocate(e, 1, 0, 0, buf, 1, &n, &err) == SF_ERANGE);
        CHECK(sf_extents_allocate(e, 1, 0, 1, NULL, 1, &n, &err) == SF_EINVAL);
        CHECK(sf_extents_list(e, buf, 0, &n, &err) == (sf_extents_count(e) ? SF_EINVAL : SF_OK));
        sf_extent overlap[2] = {{0, 2}, {1, 1}};
        CHECK(sf_extents_give(e, overlap, 2, &err) == SF_EINVAL || err.code == SF_ERANGE);
        free(held);
        free(buf);
        sf_extents_free(e);
    }
    sf_extents_free(NULL);
    printf("extents: done\n");
}

/* ------------------------------------------------------------------ the allocator's transaction */

typedef struct {
    uint32_t handle, key, cores, granules, lanes, priority, withdrawn;
    uint64_t ports, guaranteed, max_mbps;
} live_slice;

typedef struct {
    uint32_t cores, lanes, key_users, port_slices;
    uint64_t granules;
} totals;

static totals totals_of(sf_alloc *a, sf_cores *c, sf_lanes *l, sf_extents *e, uint32_t n_keys,
                        uint32_t n_ports) {
    totals t = {sf_cores_free_count(c), sf_lanes_free_total(l), 0, 0, sf_extents_free_granules(e)};
    sf_error err;
    for (uint32_t k = 0; k < n_keys; k++) {
        uint32_t owner = 0, users = 0;
        CHECK(sf_alloc_key(a, k, &owner, &users, &err) == SF_OK);
        CHECK((users == 0) == (owner == SF_NOBODY));
        t.key_users += users;
    }
    for (uint32_t p = 0; p < n_ports; p++) {
        sf_port_state st;
        CHECK(sf_alloc_port(a, p, &st, &err) == SF_OK);
        t.port_slices += st.slices;
    }
    return t;
}

static int popcount64(uint64_t x) { return __builtin_popcountll(x); }

static void test_alloc(void) {
    sf_error err;
    for (int round = 0; round < 40; round++) {
        uint32_t clusters[4], n_clusters = 1 + rnd(4), n_cores = 0;
        for (uint32_t i = 0; i < n_clusters; i++) n_cores += clusters[i] = 1 + rnd(8);
        uint32_t port_lanes[3], n_lane_ports = 1 + rnd(3), n_lanes = 0;
        for (uint32_t i = 0; i < n_lane_ports; i++) n_lanes += port_lanes[i] = 1u << rnd(4);
        const uint32_t granules = 8 + rnd(200), granule = 4096;
        sf_cores *c = sf_cores_new(clusters, n_clusters, &err);
        sf_lanes *l = sf_lanes_new(port_lanes, n_lane_ports, &err);
        sf_extents *e = sf_extents_new(granules, &err);
        CHECK(c && l && e);
        uint32_t endpoint[2] = {0, n_lanes - 1};
        sf_alloc_params p = {1 + rnd(16), 1 + rnd(64), 100, granule, (uint64_t)granules * granule,
                             1 + rnd(4), endpoint, 1 + rnd(2)};
        /* bad parameters are refused before anything is allocated */
        sf_alloc_params bad = p;
        bad.n_keys = 17;
        CHECK(sf_alloc_new(&bad, c, l, e, &err) == NULL && err.code == SF_ERANGE);
        bad = p;
        bad.n_ports = 65;
        CHECK(sf_alloc_new(&bad, c, l, e, &err) == NULL && err.field == SF_F_N_PORTS);
        bad = p;
        bad.memory_bytes += granule; /* not the extents allocator's size */
        CHECK(sf_alloc_new(&bad, c, l, e, &err) == NULL && err.field == SF_F_MEMORY);
        bad = p;
        endpoint[0] = n_lanes;
        CHECK(sf_alloc_new(&bad, c, l, e, &err) == NULL && err.field == SF_F_LANE);
        endpoint[0] = 0;
        CHECK(sf_alloc_new(&p, NULL, l, e, &err) == NULL && err.code == SF_EINVAL);
        CHECK(sf_alloc_new(NULL, c, l, e, &err) == NULL);
        sf_alloc *a = sf_alloc_new(&p, c, l, e, &err);
        CHECK(a != NULL);
        if (!a) continue;

        const uint32_t words = SF_GRANT_HEAD + n_cores + 2 * p.max_extents;
        uint32_t *out = calloc(words, sizeof(uint32_t));
        live_slice live[512];
        uint32_t n_live = 0;
        for (int step = 0; step < 500; step++) {
            const uint32_t r = rnd(8);
            const totals before = totals_of(a, c, l, e, p.n_keys, p.n_ports);
            if (r < 4 || !n_live) {
                const uint32_t flags = rnd(32), ports = rnd(4);
                const int64_t key = (int64_t)rnd(20) - 2, cores = (int64_t)rnd(6) - 1;
                int64_t bytes = ((int64_t)rnd(40) - 2) * granule;
                if (!rnd(10)) bytes += 1; /* not a whole granule */
                const int64_t width = rnd(8) ? 1 << rnd(5) : 3;
                const int64_t prio = (int64_t)rnd(9) - (rnd(20) == 0), g = rnd(60), mx = rnd(120);
                const int rc = sf_alloc_allocate_simple(a, rnd(5), key, ports, flags, cores, bytes,
                                                        width, prio, g, mx, out, words, &err);
                const totals after = totals_of(a, c, l, e, p.n_keys, p.n_ports);
                if (rc != SF_OK) {
                    CHECK(out[0] <= SF_STEP_LANES);
                    CHECK(rc == SF_EINVAL || rc == SF_ERANGE || rc == SF_ENOSPC ||
                          rc == SF_ECONFLICT || rc == SF_EFRAG);
                    CHECK(memcmp(&before, &after, sizeof before) == 0); /* all or nothing */
                    continue;
                }
                live_slice s = {out[SF_G_SLICE], out[SF_G_KEY], out[SF_G_N_CORES], 0,
                                out[SF_G_LANE_WIDTH], (uint32_t)prio, 0,
                                (uint64_t)out[SF_G_PORTS_HI] << 32 | out[SF_G_PORTS_LO],
                                (uint64_t)g, (uint64_t)mx};
                const uint32_t *x = out + SF_GRANT_HEAD + s.cores;
                for (uint32_t i = 0; i < out[SF_G_N_EXTENTS]; i++) s.granules += x[2 * i + 1];
                CHECK(s.cores == ((flags & SF_ASK_CORES) ? (uint32_t)cores : 0));
                CHECK(s.granules == ((flags & SF_ASK_MEMORY) ? (uint64_t)bytes / granule : 0));
                CHECK(s.lanes == ((flags & SF_ASK_LANES) ? (uint32_t)width : 0));
                CHECK(popcount64(s.ports) == (int)ports && s.key < p.n_keys);
                for (uint32_t i = 0; i < n_live; i++) CHECK(live[i].handle != s.handle);
                CHECK(after.cores + s.cores == before.cores);
                CHECK(after.granules + s.granules == before.granules);
                CHECK(after.lanes + s.lanes == before.lanes);
                CHECK(after.key_users == before.key_users + 1);
                CHECK(after.port_slices == before.port_slices + ports);
                if (n_live < 512) live[n_live++] = s;
            } else if (r < 5) { /* the manager's two-step free: quarantine the ports first */
                live_slice *s = &live[rnd(n_live)];
                if (s->withdrawn) continue;
                CHECK(sf_alloc_give_ports(a, s->ports, s->priority, (int64_t)s->guaranteed,
                                          (int64_t)s->max_mbps, s->key, 1, &err) == SF_OK);
                s->withdrawn = 1;
            } else {
                const uint32_t i = rnd(n_live);
                const live_slice s = live[i];
                uint32_t *rec = calloc(words, sizeof(uint32_t));
                CHECK(sf_alloc_record(a, s.handle, rec, words, &err) == SF_OK);
                CHECK(rec[SF_G_KEY] == s.key && rec[SF_G_N_CORES] == s.cores);
                CHECK(sf_alloc_record(a, s.handle, rec, words - 1, &err) == SF_EINVAL);
                free(rec);
                CHECK(sf_alloc_release(a, s.handle, (int)s.withdrawn, &err) == SF_OK);
                CHECK(sf_alloc_release(a, s.handle, 0, &err) == SF_EINVAL); /* twice */
                const totals after = totals_of(a, c, l, e, p.n_keys, p.n_ports);
                CHECK(after.cores == before.cores + s.cores);
                CHECK(after.granules == before.granules + s.granules);
                CHECK(after.lanes == before.lanes + s.lanes);
                CHECK(after.key_users + 1 == before.key_users);
                live[i] = live[--n_live];
            }
        }
        /* a unit freed behind the transaction's back: release refuses, changes nothing */
        for (uint32_t i = 0; i < n_live; i++)
            if (live[i].lanes) {
                uint32_t *rec = calloc(words, sizeof(uint32_t));
                CHECK(sf_alloc_record(a, live[i].handle, rec, words, &err) == SF_OK);
                CHECK(sf_lanes_give(l, rec[SF_G_LANE_PORT], rec[SF_G_LANE_FIRST],
                                    rec[SF_G_LANE_WIDTH], &err) == SF_OK);
                const totals before = totals_of(a, c, l, e, p.n_keys, p.n_ports);
                CHECK(sf_alloc_release(a, live[i].handle, (int)live[i].withdrawn, &err) ==
                      SF_ECONFLICT && err.field == SF_F_GROUP);
                const totals after = totals_of(a, c, l, e, p.n_keys, p.n_ports);
                CHECK(memcmp(&before, &after, sizeof before) == 0);
                CHECK(sf_lanes_take(l, rec[SF_G_LANE_PORT], rec[SF_G_LANE_FIRST],
                                    rec[SF_G_LANE_WIDTH], &err) == SF_OK);
                free(rec);
                break;
            }
        /* every other entry point refuses NULL and out-of-range arguments */
        sf_port_state st;
        sf_port_demand demand[64];
        uint64_t changed = 0;
        uint32_t owner = 0, users = 0, h = 0;
        sf_extent x = {0, 1};
        sf_request rq = {0};
        CHECK(sf_alloc_allocate(NULL, &rq, out, words, &err) == SF_EINVAL);
        CHECK(sf_alloc_allocate(a, NULL, out, words, &err) == SF_EINVAL);
        CHECK(sf_alloc_allocate(a, &rq, out, words - 1, &err) == SF_EINVAL);
        rq.lane_mode = 9;
        CHECK(sf_alloc_allocate(a, &rq, out, words, &err) == SF_EINVAL && out[0] == SF_STEP_SPEC);
        rq.lane_mode = SF_LANES_EXACT;
        rq.lane_width = 2;
        rq.lane_first = n_lanes - 1; /* runs past the last lane */
        CHECK(sf_alloc_allocate(a, &rq, out, words, &err) == SF_ERANGE && out[0] == SF_STEP_LANES);
        CHECK(sf_alloc_allocate_simple(a, SF_NOBODY, -1, 0, 0, 0, 0, 0, 0, 0, 0, out, words,
                                       &err) == SF_EINVAL);
        CHECK(sf_alloc_release(a, 1u << 30, 0, &err) == SF_EINVAL && err.field == SF_F_SLICE);
        CHECK(sf_alloc_forget(a, 1u << 30, &err) == SF_EINVAL);
        CHECK(sf_alloc_record(a, 0, NULL, words, &err) == SF_EINVAL);
        CHECK(sf_alloc_adopt(a, 0, p.n_keys, 0, 0, 0, 0, NULL, 0, NULL, 0, 0, 0, 0, &h, &err) ==
              SF_ERANGE);
        CHECK(sf_alloc_adopt(a, 0, 0, 0, 8, 0, 0, NULL, 0, NULL, 0, 0, 0, 0, &h, &err) == SF_ERANGE);
        CHECK(sf_alloc_adopt(a, 0, 0, 0, 0, 0, 0, NULL, 1, NULL, 0, 0, 0, 0, &h, &err) == SF_EINVAL);
        x.start = granules;
        CHECK(sf_alloc_adopt(a, 0, 0, 0, 0, 0, 0, NULL, 0, &x, 1, 0, 0, 0, &h, &err) == SF_ERANGE);
        CHECK(sf_alloc_adopt(a, 0, 0, 0, 0, 0, 0, NULL, 0, NULL, 0, 0, n_lanes, 1, &h, &err) ==
              SF_ERANGE);
        x.start = 0;
        CHECK(sf_alloc_adopt(a, 0, 0, 1, 0, 0, 0, NULL, 0, &x, 1, 0, 0, 0, &h, &err) == SF_OK);
        CHECK(sf_alloc_forget(a, h, &err) == SF_OK && sf_alloc_forget(a, h, &err) == SF_EINVAL);
        CHECK(sf_alloc_claim_key(a, 0, p.n_keys, &err) == SF_ERANGE);
        CHECK(sf_alloc_claim_key(a, SF_NOBODY, 0, &err) == SF_EINVAL);
        CHECK(sf_alloc_give_key(a, p.n_keys, &err) == SF_ERANGE);
        if (p.n_ports < 64)
            CHECK(sf_alloc_claim_ports(a, 0, ~(uint64_t)0, 0, 0, 0, 0, &err) == SF_ERANGE);
        CHECK(sf_alloc_claim_ports(a, 0, 1, 0, 101, 0, 0, &err) == SF_ERANGE);
        CHECK(sf_alloc_claim_ports(a, 0, 1, -1, 0, 0, 0, &err) == SF_ERANGE);
        CHECK(sf_alloc_give_ports(a, 1, 0, 0, 101, 0, 0, &err) == SF_ERANGE);
        CHECK(sf_alloc_key(a, p.n_keys, &owner, &users, &err) == SF_ERANGE);
        CHECK(sf_alloc_key(a, 0, NULL, &users, &err) == SF_EINVAL);
        CHECK(sf_alloc_set_key(a, p.n_keys, 0, 0, &err) == SF_ERANGE);
        CHECK(sf_alloc_port(a, p.n_ports, &st, &err) == SF_ERANGE);
        CHECK(sf_alloc_set_port(a, p.n_ports, &st, &err) == SF_ERANGE);
        CHECK(sf_alloc_demand(a, demand, p.n_ports - 1, &changed, &err) == SF_EINVAL);
        CHECK(sf_alloc_demand(a, demand, 64, NULL, &err) == SF_EINVAL);
        CHECK(sf_alloc_demand(a, demand, 64, &changed, &err) == SF_OK);
        /* release everything: every unit comes back */
        for (uint32_t i = 0; i < n_live; i++)
            CHECK(sf_alloc_release(a, live[i].handle, (int)live[i].withdrawn, &err) == SF_OK);
        const totals empty = totals_of(a, c, l, e, p.n_keys, p.n_ports);
        CHECK(empty.cores == n_cores && empty.granules == granules && empty.lanes == n_lanes);
        CHECK(empty.key_users == 0 && empty.port_slices == 0);
        free(out);
        sf_alloc_free(a);
        sf_cores_free(c);
        sf_lanes_free(l);
        sf_extents_free(e);
    }
    sf_alloc_free(NULL);
    printf("alloc: done\n");
}

int main(void) {
    void (*tests[])(void) = {test_xbar, test_cores, test_lanes, test_extents, test_alloc};
    const int n = (int)(sizeof tests / sizeof tests[0]);
    int failed = 0;
    for (int i = 0; i < n; i++) {
        const int before = failures;
        tests[i]();
        failed += failures > before;
    }
    printf("(%d checks, %d failed)\n", checks, failures);
    printf("%d passed, %d failed\n", n - failed, failed);
    return failed ? 1 : 0;
}
