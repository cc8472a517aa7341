/* Processing cores in clusters: one free-unit bitmap, per-cluster free counts.
 *
 * The C twin of firmware/resources/cores.py (the reference, which documents the policy:
 * best-fit cluster, else spill over clusters in decreasing free count, lowest ids first).
 */
#include <stdlib.h>
#include <string.h>

#include "sf_internal.h"

struct sf_cores {
    uint32_t n_clusters;
    uint32_t total;
    uint32_t free_total;
    uint32_t max_size;
    uint32_t *size;       /* cores per cluster */
    uint32_t *base;       /* first core id of each cluster */
    uint32_t *free;       /* free cores per cluster */
    uint32_t *cluster_of; /* core id -> cluster */
    uint64_t *free_bits;  /* bit set: core free */
    uint64_t *scratch;    /* duplicate detection; all zero between calls */
    uint64_t *order;      /* spill order scratch (n_clusters): (~free << 32 | cluster) */
    uint32_t words;
};

static int bit(const uint64_t *w, uint32_t i) { return (int)((w[i >> 6] >> (i & 63)) & 1); }
static void set_bit(uint64_t *w, uint32_t i) { w[i >> 6] |= (uint64_t)1 << (i & 63); }
static void clear_bit(uint64_t *w, uint32_t i) { w[i >> 6] &= ~((uint64_t)1 << (i & 63)); }

void sf_cores_free(sf_cores *c) {
    if (!c) return;
    free(c->size);
    free(c->base);
    free(c->free);
    free(c->cluster_of);
    free(c->free_bits);
    free(c->scratch);
    free(c->order);
    free(c);
}

sf_cores *sf_cores_new(const uint32_t *cluster_sizes, uint32_t n_clusters, sf_error *err) {
    if (!cluster_sizes || n_clusters < 1 || n_clusters > SF_MAX_CLUSTERS) {
        sf_fail(err, SF_ERANGE, SF_F_CLUSTER, -1, n_clusters, SF_MAX_CLUSTERS);
        return NULL;
    }
    uint64_t total = 0;
    for (uint32_t i = 0; i < n_clusters; i++) {
        if (cluster_sizes[i] < 1) {
            sf_fail(err, SF_ERANGE, SF_F_COUNT, i, cluster_sizes[i], 1);
            return NULL;
        }
        total += cluster_sizes[i];
        if (total > SF_MAX_CORES) {
            sf_fail(err, SF_ERANGE, SF_F_COUNT, i, (int64_t)total, SF_MAX_CORES);
            return NULL;
        }
    }
    sf_cores *c = calloc(1, sizeof *c);
    if (!c) {
        sf_fail(err, SF_ENOMEM, SF_F_NONE, -1, 0, 0);
        return NULL;
    }
    c->n_clusters = n_clusters;
    c->total = c->free_total = (uint32_t)total;
    c->words = (uint32_t)((total + 63) / 64);
    c->size = malloc(sizeof(uint32_t) * n_clusters);
    c->base = malloc(sizeof(uint32_t) * n_clusters);
    c->free = malloc(sizeof(uint32_t) * n_clusters);
    c->order = malloc(sizeof(uint64_t) * n_clusters);
    c->cluster_of = malloc(sizeof(uint32_t) * total);
    c->free_bits = calloc(c->words, sizeof(uint64_t));
    c->scratch = calloc(c->words, sizeof(uint64_t));
    if (!c->size || !c->base || !c->free || !c->order || !c->cluster_of || !c->free_bits ||
        !c->scratch) {
        sf_cores_free(c);
        sf_fail(err, SF_ENOMEM, SF_F_NONE, -1, 0, 0);
        return NULL;
    }
    uint32_t first = 0;
    for (uint32_t k = 0; k < n_clusters; k++) {
        c->size[k] = c->free[k] = cluster_sizes[k];
        c->base[k] = first;
        if (cluster_sizes[k] > c->max_size) c->max_size = cluster_sizes[k];
        for (uint32_t i = 0; i < cluster_sizes[k]; i++) {
            c->cluster_of[first + i] = k;
            set_bit(c->free_bits, first + i);
        }
        first += cluster_sizes[k];
    }
    sf_ok(err);
    return c;
}

uint32_t sf_cores_total(const sf_cores *c) { return c ? c->total : 0; }
uint32_t sf_cores_free_count(const sf_cores *c) { return c ? c->free_total : 0; }

int sf_cores_cluster_free(const sf_cores *c, uint32_t cluster, uint32_t *out, sf_error *err) {
    if (!c || !out) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (cluster >= c->n_clusters)
        return sf_fail(err, SF_ERANGE, SF_F_CLUSTER, -1, cluster, c->n_clusters - 1);
    *out = c->free[cluster];
    return sf_ok(err);
}

int sf_cores_is_free(const sf_cores *c, uint32_t core, int *out, sf_error *err) {
    if (!c || !out) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (core >= c->total) return sf_fail(err, SF_ERANGE, SF_F_CORE, -1, core, c->total - 1);
    *out = bit(c->free_bits, core);
    return sf_ok(err);
}

int sf_cores_free_ids(const sf_cores *c, uint32_t *out, uint32_t out_cap, uint32_t *n_out,
                      sf_error *err) {
    if (!c || !n_out || (!out && out_cap)) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (out_cap < c->free_total)
        return sf_fail(err, SF_EINVAL, SF_F_OUT_CAP, -1, out_cap, c->free_total);
    uint32_t n = 0;
    for (uint32_t w = 0; w < c->words; w++)
        for (uint64_t m = c->free_bits[w]; m; m &= m - 1)
            out[n++] = w * 64 + (uint32_t)__builtin_ctzll(m);
    *n_out = n;
    return sf_ok(err);
}

/* Take the count lowest free ids of cluster k (caller checked they exist). */
static uint32_t take_lowest(sf_cores *c, uint32_t k, uint32_t count, uint32_t *out) {
    uint32_t n = 0, i = c->base[k];
    const uint32_t end = c->base[k] + c->size[k];
    while (n < count && i < end) {
        const uint64_t word = c->free_bits[i >> 6] >> (i & 63);
        if (!word) { /* no free core in the rest of this word */
            i = (i | 63) + 1;
            continue;
        }
        i += (uint32_t)__builtin_ctzll(word);
        if (i >= end) break;
        clear_bit(c->free_bits, i);
        out[n++] = i++;
    }
    c->free[k] -= n;
    c->free_total -= n;
    return n;
}

static int u64_cmp(const void *a, const void *b) {
    const uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : (x > y);
}

static int u32_cmp(const void *a, const void *b) {
    const uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : (x > y);
}

int sf_cores_allocate(sf_cores *c, uint32_t count, int mode, uint32_t cluster, uint32_t *out,
                      uint32_t out_cap, sf_error *err) {
    if (!c || !out) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (count < 1) return sf_fail(err, SF_ERANGE, SF_F_COUNT, -1, count, 1);
    if (out_cap < count) return sf_fail(err, SF_EINVAL, SF_F_OUT_CAP, -1, out_cap, count);
    if (mode == SF_CORES_IN_CLUSTER) {
        if (cluster >= c->n_clusters)
            return sf_fail(err, SF_ERANGE, SF_F_CLUSTER, -1, cluster, c->n_clusters - 1);
        if (count > c->size[cluster])
            return sf_fail(err, SF_ERANGE, SF_F_COUNT, -1, count, c->size[cluster]);
        if (c->free[cluster] < count)
            return sf_fail(err, SF_ENOSPC, SF_F_COUNT, -1, count, c->free[cluster]);
        take_lowest(c, cluster, count, out);
        return sf_ok(err);
    }
    if (mode != SF_CORES_SAME_CLUSTER && mode != SF_CORES_PACK)
        return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, mode, 0);
    const uint32_t limit = mode == SF_CORES_SAME_CLUSTER ? c->max_size : c->total;
    if (count > limit) return sf_fail(err, SF_ERANGE, SF_F_COUNT, -1, count, limit);
    /* best fit: the fewest free cores that still hold count, lowest index on ties */
    int64_t best = -1;
    for (uint32_t k = 0; k < c->n_clusters; k++)
        if (c->free[k] >= count && (best < 0 || c->free[k] < c->free[best])) best = k;
    if (best >= 0) {
        take_lowest(c, (uint32_t)best, count, out);
        return sf_ok(err);
    }
    if (mode == SF_CORES_SAME_CLUSTER) {
        uint32_t most = 0, where = 0;
        for (uint32_t k = 0; k < c->n_clusters; k++)
            if (c->free[k] > most) most = c->free[k], where = k;
        sf_fail(err, SF_ENOSPC, SF_F_COUNT, -1, count, most);
        if (err) err->extra = where;
        return SF_ENOSPC;
    }
    if (c->free_total < count) return sf_fail(err, SF_ENOSPC, SF_F_COUNT, -1, count, c->free_total);
    /* spill order: more free cores first, lowest index on ties (one sort key, no context) */
    for (uint32_t k = 0; k < c->n_clusters; k++)
        c->order[k] = (uint64_t)(UINT32_MAX - c->free[k]) << 32 | k;
    qsort(c->order, c->n_clusters, sizeof(uint64_t), u64_cmp);
    uint32_t n = 0;
    for (uint32_t i = 0; i < c->n_clusters && n < count; i++) {
        const uint32_t k = (uint32_t)c->order[i];
        const uint32_t part = c->free[k] < count - n ? c->free[k] : count - n;
        n += take_lowest(c, k, part, out + n);
    }
    qsort(out, n, sizeof(uint32_t), u32_cmp);
    return sf_ok(err);
}

/* Validate an id list: known ids, none twice. Leaves scratch all zero. */
static int check_ids(sf_cores *c, const uint32_t *ids, uint32_t n, sf_error *err) {
    if (n && !ids) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    for (uint32_t i = 0; i < n; i++)
        if (ids[i] >= c->total) return sf_fail(err, SF_ERANGE, SF_F_CORE, i, ids[i], c->total - 1);
    int rc = SF_OK;
    uint32_t i = 0;
    for (; i < n; i++) {
        if (bit(c->scratch, ids[i])) {
            rc = sf_fail(err, SF_EINVAL, SF_F_CORE, i, ids[i], 0);
            break;
        }
        set_bit(c->scratch, ids[i]);
    }
    for (uint32_t j = 0; j < i; j++) clear_bit(c->scratch, ids[j]);
    return rc;
}

int sf_cores_take(sf_cores *c, const uint32_t *ids, uint32_t n, sf_error *err) {
    if (!c) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    int rc = check_ids(c, ids, n, err);
    if (rc) return rc;
    for (uint32_t i = 0; i < n; i++)
        if (!bit(c->free_bits, ids[i])) return sf_fail(err, SF_ECONFLICT, SF_F_CORE, i, ids[i], 0);
    for (uint32_t i = 0; i < n; i++) {
        clear_bit(c->free_bits, ids[i]);
        c->free[c->cluster_of[ids[i]]]--;
    }
    c->free_total -= n;
    return sf_ok(err);
}

int sf_cores_give(sf_cores *c, const uint32_t *ids, uint32_t n, sf_error *err) {
    if (!c) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    int rc = check_ids(c, ids, n, err);
    if (rc) return rc;
    for (uint32_t i = 0; i < n; i++)
        if (bit(c->free_bits, ids[i])) return sf_fail(err, SF_ECONFLICT, SF_F_CORE, i, ids[i], 0);
    for (uint32_t i = 0; i < n; i++) {
        set_bit(c->free_bits, ids[i]);
        c->free[c->cluster_of[ids[i]]]++;
    }
    c->free_total += n;
    return sf_ok(err);
}

uint32_t sf_cores_max_cluster(const sf_cores *c) { return c->max_size; }
