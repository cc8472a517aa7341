/* Device memory as free extents of granules, indexed twice: by start and by (size, start).
 *
 * The C twin of firmware/resources/memory.py (the reference, which documents the policy:
 * best fit, else the largest free extents first). The two indexes are treaps (randomised
 * balanced search trees) over one node pool, so every operation costs O(log n) expected in
 * the number of free extents, like the reference's sortedcontainers indexes. The priorities
 * come from a fixed-seed xorshift generator: runs are reproducible.
 */
#include <stdlib.h>
#include <string.h>

#include "sf_internal.h"

#define NIL (-1)

typedef struct {
    uint64_t key;
    uint32_t val;
    uint32_t pri;
    int32_t left, right;
} node;

typedef struct {
    int32_t root;
} treap;

struct sf_extents {
    uint32_t total;
    uint64_t free;
    uint32_t count; /* free extents */
    treap by_start; /* key start, val length */
    treap by_size;  /* key length << 32 | start */
    node *pool;
    int32_t cap, used, free_list;
    int32_t n_free_list; /* nodes on the free list, so reserve() is O(1) */
    uint32_t rng;
};

/* ---------------------------------------------------------------- treap over the pool */

static uint32_t next_pri(sf_extents *e) {
    uint32_t x = e->rng;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return e->rng = x;
}

/* a node from the free list or the pool's spare room, which reserve() made beforehand */
static int32_t node_new(sf_extents *e, uint64_t key, uint32_t val) {
    int32_t i;
    if (e->free_list != NIL) {
        i = e->free_list;
        e->free_list = e->pool[i].left;
        e->n_free_list--;
    } else {
        i = e->used++;
    }
    e->pool[i] = (node){key, val, next_pri(e), NIL, NIL};
    return i;
}

static void node_release(sf_extents *e, int32_t i) {
    e->pool[i].left = e->free_list;
    e->free_list = i;
    e->n_free_list++;
}

/* split t into keys < key (*l) and keys >= key (*r) */
static void split(node *P, int32_t t, uint64_t key, int32_t *l, int32_t *r) {
    if (t == NIL) {
        *l = *r = NIL;
    } else if (P[t].key < key) {
        split(P, P[t].right, key, &P[t].right, r);
        *l = t;
    } else {
        split(P, P[t].left, key, l, &P[t].left);
        *r = t;
    }
}

static int32_t merge(node *P, int32_t l, int32_t r) {
    if (l == NIL) return r;
    if (r == NIL) return l;
    if (P[l].pri > P[r].pri) {
        P[l].right = merge(P, P[l].right, r);
        return l;
    }
    P[r].left = merge(P, l, P[r].left);
    return r;
}

static void t_insert(node *P, treap *t, int32_t n) {
    int32_t l, r;
    split(P, t->root, P[n].key, &l, &r);
    t->root = merge(P, merge(P, l, n), r);
}

/* unlink the node with key from t; returns it or NIL */
static int32_t t_remove(node *P, int32_t *link, uint64_t key) {
    while (*link != NIL && P[*link].key != key)
        link = key < P[*link].key ? &P[*link].left : &P[*link].right;
    const int32_t n = *link;
    if (n != NIL) *link = merge(P, P[n].left, P[n].right);
    return n;
}

static int32_t t_find(const node *P, const treap *t, uint64_t key) {
    int32_t i = t->root;
    while (i != NIL && P[i].key != key) i = key < P[i].key ? P[i].left : P[i].right;
    return i;
}

/* greatest key <= key (inclusive) or < key (!inclusive) */
static int32_t t_floor(const node *P, const treap *t, uint64_t key, int inclusive) {
    int32_t i = t->root, best = NIL;
    while (i != NIL) {
        if (P[i].key < key || (inclusive && P[i].key == key)) {
            best = i;
            i = P[i].right;
        } else {
            i = P[i].left;
        }
    }
    return best;
}

/* smallest key >= key */
static int32_t t_ceil(const node *P, const treap *t, uint64_t key) {
    int32_t i = t->root, best = NIL;
    while (i != NIL) {
        if (P[i].key >= key) {
            best = i;
            i = P[i].left;
        } else {
            i = P[i].right;
        }
    }
    return best;
}

static int32_t t_max(const node *P, const treap *t) {
    int32_t i = t->root;
    if (i == NIL) return NIL;
    while (P[i].right != NIL) i = P[i].right;
    return i;
}

/* ---------------------------------------------------------------- the two indexes */

static uint64_t size_key(uint32_t length, uint32_t start) {
    return (uint64_t)length << 32 | start;
}

/* Pool nodes are reserved first (the pool grows only here), so that an operation never fails
 * half-way: a free extent is two nodes (one per index), and every mutation below adds at most
 * one free extent (two nodes) per extent it touches. */
static int reserve(sf_extents *e, int64_t nodes) {
    int64_t spare = (int64_t)e->cap - e->used + e->n_free_list;
    while (spare < nodes) {
        if (e->cap > INT32_MAX / 2) return 0;
        const int32_t cap = e->cap ? e->cap * 2 : 64;
        node *pool = realloc(e->pool, sizeof(node) * (size_t)cap);
        if (!pool) return 0;
        spare += cap - e->cap;
        e->pool = pool;
        e->cap = cap;
    }
    return 1;
}

static void ext_insert(sf_extents *e, uint32_t start, uint32_t length) {
    const int32_t a = node_new(e, start, length);
    t_insert(e->pool, &e->by_start, a);
    const int32_t b = node_new(e, size_key(length, start), 0);
    t_insert(e->pool, &e->by_size, b);
    e->count++;
}

static uint32_t ext_delete(sf_extents *e, uint32_t start) {
    const int32_t a = t_remove(e->pool, &e->by_start.root, start);
    const uint32_t length = e->pool[a].val;
    node_release(e, a);
    const int32_t b = t_remove(e->pool, &e->by_size.root, size_key(length, start));
    node_release(e, b);
    e->count--;
    return length;
}

/* start of the free extent that contains all of [start, end), or -1 */
static int64_t containing(const sf_extents *e, uint32_t start, uint64_t end) {
    const int32_t i = t_floor(e->pool, &e->by_start, start, 1);
    if (i == NIL || e->pool[i].key + e->pool[i].val < end) return -1;
    return (int64_t)e->pool[i].key;
}

/* true if any granule of [start, end) is free */
static int overlaps_free(const sf_extents *e, uint32_t start, uint64_t end) {
    const int32_t i = t_floor(e->pool, &e->by_start, (uint64_t)end, 0);
    return i != NIL && e->pool[i].key + e->pool[i].val > start;
}

static void take(sf_extents *e, uint32_t start, uint32_t length) {
    const uint32_t s = (uint32_t)containing(e, start, (uint64_t)start + length);
    const uint32_t len = ext_delete(e, s);
    if (start > s) ext_insert(e, s, start - s);
    const uint64_t tail = (uint64_t)s + len - ((uint64_t)start + length);
    if (tail > 0) ext_insert(e, start + length, (uint32_t)tail);
    e->free -= length;
}

static void give(sf_extents *e, uint32_t start, uint32_t length) {
    uint64_t s = start, end = (uint64_t)start + length;
    const int32_t before = t_floor(e->pool, &e->by_start, start, 0);
    if (before != NIL && e->pool[before].key + e->pool[before].val == start) {
        s = e->pool[before].key;
        ext_delete(e, (uint32_t)s);
    }
    const int32_t after = t_find(e->pool, &e->by_start, end);
    if (after != NIL) end += ext_delete(e, (uint32_t)end);
    ext_insert(e, (uint32_t)s, (uint32_t)(end - s));
    e->free += length;
}

/* ---------------------------------------------------------------- API */

void sf_extents_free(sf_extents *e) {
    if (!e) return;
    free(e->pool);
    free(e);
}

sf_extents *sf_extents_new(uint32_t total, sf_error *err) {
    if (total < 1 || total > SF_MAX_GRANULES) {
        sf_fail(err, SF_ERANGE, SF_F_LENGTH, -1, total, SF_MAX_GRANULES);
        return NULL;
    }
    sf_extents *e = calloc(1, sizeof *e);
    if (!e) {
        sf_fail(err, SF_ENOMEM, SF_F_NONE, -1, 0, 0);
        return NULL;
    }
    e->total = total;
    e->by_start.root = e->by_size.root = NIL;
    e->free_list = NIL;
    e->rng = 0x9E3779B9u;
    if (!reserve(e, 2)) {
        sf_extents_free(e);
        sf_fail(err, SF_ENOMEM, SF_F_NONE, -1, 0, 0);
        return NULL;
    }
    ext_insert(e, 0, total);
    e->free = total;
    sf_ok(err);
    return e;
}

uint64_t sf_extents_free_granules(const sf_extents *e) { return e ? e->free : 0; }
uint32_t sf_extents_count(const sf_extents *e) { return e ? e->count : 0; }

uint32_t sf_extents_largest(const sf_extents *e) {
    if (!e) return 0;
    const int32_t i = t_max(e->pool, &e->by_size);
    return i == NIL ? 0 : (uint32_t)(e->pool[i].key >> 32);
}

static void inorder(const node *P, int32_t i, sf_extent *out, uint32_t *n) {
    while (i != NIL) { /* recursion on the left, loop on the right */
        inorder(P, P[i].left, out, n);
        out[*n].start = (uint32_t)P[i].key;
        out[*n].length = P[i].val;
        (*n)++;
        i = P[i].right;
    }
}

int sf_extents_list(const sf_extents *e, sf_extent *out, uint32_t out_cap, uint32_t *n_out,
                    sf_error *err) {
    if (!e || !n_out || (!out && out_cap)) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (out_cap < e->count) return sf_fail(err, SF_EINVAL, SF_F_OUT_CAP, -1, out_cap, e->count);
    *n_out = 0;
    inorder(e->pool, e->by_start.root, out, n_out);
    return sf_ok(err);
}

static int check_extent(const sf_extents *e, uint32_t start, uint32_t length, int64_t index,
                        sf_error *err) {
    if (length < 1) return sf_fail(err, SF_ERANGE, SF_F_LENGTH, index, length, 1);
    if ((uint64_t)start + length > e->total)
        return sf_fail(err, SF_ERANGE, SF_F_START, index, (int64_t)start + length, e->total);
    return SF_OK;
}

int sf_extents_is_free(const sf_extents *e, uint32_t start, uint32_t length, int *out,
                       sf_error *err) {
    if (!e || !out) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    int rc = check_extent(e, start, length, -1, err);
    if (rc) return rc;
    *out = containing(e, start, (uint64_t)start + length) >= 0;
    return sf_ok(err);
}

int sf_extents_any_free(const sf_extents *e, uint32_t start, uint32_t length, int *out,
                        sf_error *err) {
    if (!e || !out) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    int rc = check_extent(e, start, length, -1, err);
    if (rc) return rc;
    *out = overlaps_free(e, start, (uint64_t)start + length);
    return sf_ok(err);
}

uint32_t sf_extents_free_at(const sf_extents *e, uint32_t start) {
    if (!e) return 0;
    const int32_t i = t_find(e->pool, &e->by_start, start);
    return i == NIL ? 0 : e->pool[i].val;
}

int sf_extents_allocate(sf_extents *e, uint32_t granules, int contiguous, uint32_t max_extents,
                        sf_extent *out, uint32_t out_cap, uint32_t *n_out, sf_error *err) {
    if (!e || !out || !n_out) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (granules < 1 || granules > e->total)
        return sf_fail(err, SF_ERANGE, SF_F_COUNT, -1, granules, e->total);
    if (max_extents < 1) return sf_fail(err, SF_ERANGE, SF_F_MAX_EXTENTS, -1, max_extents, 1);
    const uint32_t need_cap = max_extents < e->count ? max_extents : (e->count ? e->count : 1);
    if (out_cap < need_cap) return sf_fail(err, SF_EINVAL, SF_F_OUT_CAP, -1, out_cap, need_cap);

    const int32_t fit = t_ceil(e->pool, &e->by_size, size_key(granules, 0));
    uint32_t n = 0;
    if (fit != NIL) { /* best fit: smallest extent that holds it, lowest start on ties */
        out[n].start = (uint32_t)e->pool[fit].key;
        out[n].length = granules;
        n = 1;
    } else if (contiguous) {
        sf_fail(err, SF_ENOSPC, SF_F_COUNT, -1, granules, sf_extents_largest(e));
        if (err) err->extra = (int64_t)e->free;
        return SF_ENOSPC;
    } else if (granules > e->free) {
        return sf_fail(err, SF_ENOSPC, SF_F_COUNT, -1, granules, (int64_t)e->free);
    } else { /* largest first: sizes descending, starts ascending within one size */
        uint32_t remaining = granules;
        int32_t top = t_max(e->pool, &e->by_size);
        while (remaining > 0 && n < max_extents && top != NIL) {
            const uint32_t size = (uint32_t)(e->pool[top].key >> 32);
            for (int32_t i = t_ceil(e->pool, &e->by_size, size_key(size, 0));
                 i != NIL && (uint32_t)(e->pool[i].key >> 32) == size;
                 i = t_ceil(e->pool, &e->by_size, e->pool[i].key + 1)) {
                const uint32_t part = size < remaining ? size : remaining;
                out[n].start = (uint32_t)e->pool[i].key;
                out[n].length = part;
                n++;
                remaining -= part;
                if (remaining == 0 || n == max_extents) break;
            }
            top = t_floor(e->pool, &e->by_size, size_key(size, 0), 0);
        }
        if (remaining > 0) {
            sf_fail(err, SF_EFRAG, SF_F_MAX_EXTENTS, -1, granules, granules - remaining);
            if (err) err->extra = max_extents;
            return SF_EFRAG;
        }
    }
    /* each take splits one free extent into at most two: reserve the nodes first */
    if (!reserve(e, 2 * (int64_t)n)) return sf_fail(err, SF_ENOMEM, SF_F_NONE, -1, 0, 0);
    for (uint32_t i = 0; i < n; i++) take(e, out[i].start, out[i].length);
    /* sorted by start (insertion sort: n is at most max_extents and usually 1) */
    for (uint32_t i = 1; i < n; i++) {
        const sf_extent x = out[i];
        uint32_t j = i;
        for (; j > 0 && out[j - 1].start > x.start; j--) out[j] = out[j - 1];
        out[j] = x;
    }
    *n_out = n;
    return sf_ok(err);
}

static int ext_cmp(const void *a, const void *b) {
    const sf_extent *x = a, *y = b;
    return x->start < y->start ? -1 : (x->start > y->start);
}

/* Validate a list: each inside the device, none overlapping. *sorted is a copy sorted by
 * start (freed by the caller; NULL for an empty list). */
static int check_list(const sf_extents *e, const sf_extent *ext, uint32_t n, sf_extent **sorted,
                      sf_error *err) {
    *sorted = NULL;
    if (n && !ext) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    for (uint32_t i = 0; i < n; i++) {
        int rc = check_extent(e, ext[i].start, ext[i].length, i, err);
        if (rc) return rc;
    }
    if (!n) return SF_OK;
    sf_extent *s = malloc(sizeof(sf_extent) * n);
    if (!s) return sf_fail(err, SF_ENOMEM, SF_F_NONE, -1, 0, 0);
    memcpy(s, ext, sizeof(sf_extent) * n);
    qsort(s, n, sizeof(sf_extent), ext_cmp);
    for (uint32_t i = 1; i < n; i++)
        if (s[i].start < (uint64_t)s[i - 1].start + s[i - 1].length) {
            free(s);
            sf_fail(err, SF_EINVAL, SF_F_START, i - 1, 0, 0);
            if (err) err->extra = i; /* positions in address order */
            return SF_EINVAL;
        }
    *sorted = s;
    return SF_OK;
}

int sf_extents_take(sf_extents *e, const sf_extent *ext, uint32_t n, sf_error *err) {
    if (!e) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    sf_extent *s;
    int rc = check_list(e, ext, n, &s, err);
    if (rc) return rc;
    for (uint32_t i = 0; i < n; i++)
        if (containing(e, s[i].start, (uint64_t)s[i].start + s[i].length) < 0) {
            sf_fail(err, SF_ECONFLICT, SF_F_START, i, s[i].start, s[i].length);
            free(s);
            return SF_ECONFLICT;
        }
    if (!reserve(e, 2 * (int64_t)n)) {
        free(s);
        return sf_fail(err, SF_ENOMEM, SF_F_NONE, -1, 0, 0);
    }
    for (uint32_t i = 0; i < n; i++) take(e, s[i].start, s[i].length);
    free(s);
    return sf_ok(err);
}

int sf_extents_give(sf_extents *e, const sf_extent *ext, uint32_t n, sf_error *err) {
    if (!e) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    sf_extent *s;
    int rc = check_list(e, ext, n, &s, err);
    if (rc) return rc;
    for (uint32_t i = 0; i < n; i++)
        if (overlaps_free(e, s[i].start, (uint64_t)s[i].start + s[i].length)) {
            sf_fail(err, SF_ECONFLICT, SF_F_START, i, s[i].start, s[i].length);
            free(s);
            return SF_ECONFLICT;
        }
    if (!reserve(e, 2 * (int64_t)n)) { /* a give inserts one merged extent: two nodes */
        free(s);
        return sf_fail(err, SF_ENOMEM, SF_F_NONE, -1, 0, 0);
    }
    for (uint32_t i = 0; i < n; i++) give(e, s[i].start, s[i].length);
    free(s);
    return sf_ok(err);
}

int sf_extents_extend(sf_extents *e, uint32_t start, uint32_t length, uint32_t granules,
                      int *grown, sf_error *err) {
    if (!e || !grown) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    int rc = check_extent(e, start, length, -1, err);
    if (rc) return rc;
    if (granules < 1) return sf_fail(err, SF_ERANGE, SF_F_COUNT, -1, granules, 1);
    if (overlaps_free(e, start, (uint64_t)start + length))
        return sf_fail(err, SF_ECONFLICT, SF_F_START, -1, start, length);
    *grown = 0;
    const uint64_t end = (uint64_t)start + length;
    const int32_t next = end < e->total ? t_find(e->pool, &e->by_start, end) : NIL;
    if (next != NIL && e->pool[next].val >= granules) {
        if (!reserve(e, 2)) return sf_fail(err, SF_ENOMEM, SF_F_NONE, -1, 0, 0);
        take(e, (uint32_t)end, granules);
        *grown = 1;
    }
    return sf_ok(err);
}

/* ---------------------------------------------------------------- for alloc.c */

int sf_extents_reserve(sf_extents *e, int64_t nodes) { return reserve(e, nodes); }

int sf_extents_all_held(const sf_extents *e, const sf_extent *ext, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) {
        const uint64_t end = (uint64_t)ext[i].start + ext[i].length;
        if (ext[i].length < 1 || end > e->total || overlaps_free(e, ext[i].start, end)) return 0;
    }
    return 1;
}

void sf_extents_give_reserved(sf_extents *e, const sf_extent *ext, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) give(e, ext[i].start, ext[i].length);
}
uint32_t sf_extents_total(const sf_extents *e) { return e->total; }
