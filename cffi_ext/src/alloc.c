/* The allocator's transaction: one slice's protection key, crossbar ports, cores, memory
 * extents and lane group, taken (or given back) in one call, all or nothing.
 *
 * The C twin of the unit-taking part of firmware/allocator.py (the reference, which
 * documents the policy): validate the request against the device, then take the key (the
 * VM's lowest, else the lowest free one), the ports (the VM's own ports with headroom,
 * fewest slices first, then free ports, lowest index first), cores, memory and lanes, in that
 * order, so that the first step that fails is the one the reference reports. Cores, memory
 * and lanes come from the unit allocators of cores.c, extents.c and lanes.c (the same state
 * objects Python's CCoreAllocator & co. wrap). Key and port bookkeeping live here, with a
 * record per live slice of the units it holds, so a release is one call too.
 *
 * All or nothing: key, ports and lanes are searched without changing anything; cores and
 * memory are taken, and undone if a later step fails. The undo cannot fail: cores are a
 * bitmap, and the memory pool nodes a give-back needs are reserved before memory is taken.
 */
#include <stdlib.h>
#include <string.h>

#include "sf_internal.h"

_Static_assert(SF_MAX_KEYS == 16, "sf_port_state.keys has SF_MAX_KEYS entries");
_Static_assert(SF_MAX_PRIORITY == 7, "sf_port_state.priorities has 8 entries");
_Static_assert(SF_MAX_PORTS == 64, "port sets are 64-bit masks");

#define MAX_EXTENTS_PER_SLICE 65536u

typedef struct {
    uint32_t owner, key, priority;
    uint64_t ports, guaranteed, max_mbps;
    uint32_t n_cores, n_ext;
    uint32_t *cores; /* n_cores ids, sorted as taken */
    sf_extent *ext;  /* n_ext extents, sorted by start */
    uint32_t lane_port, lane_first, lane_width;
    uint32_t used;
    int64_t next_free; /* free list of unused records */
} record;

struct sf_alloc {
    sf_cores *cores;
    sf_lanes *lanes;
    sf_extents *mem;
    uint32_t n_keys, n_ports, max_extents;
    uint64_t port_mbps, granule, memory_bytes;
    uint32_t n_cores_total, max_cluster, widest, n_lanes;
    uint32_t key_owner[SF_MAX_KEYS];
    uint32_t key_users[SF_MAX_KEYS];
    sf_port_state port[SF_MAX_PORTS];
    uint64_t dirty;      /* ports whose totals changed since sf_alloc_demand */
    uint8_t *endpoint;   /* lane -> 1 if wired to an endpoint */
    uint32_t *exclude;   /* the same lanes as a sorted list, for sf_lanes_allocate */
    uint32_t n_exclude;
    record *rec;
    uint32_t n_rec, cap_rec;
    int64_t free_rec;
};

static uint64_t bit64(uint32_t i) { return (uint64_t)1 << i; }

static void port_reset(sf_port_state *p) {
    memset(p, 0, sizeof *p);
    p->owner = SF_NOBODY;
}

/* ---------------------------------------------------------------- records */

static void record_drop(sf_alloc *a, uint32_t h) {
    record *r = &a->rec[h];
    free(r->cores);
    free(r->ext);
    memset(r, 0, sizeof *r);
    r->next_free = a->free_rec;
    a->free_rec = h;
}

/* a free record with room for n_cores cores and n_ext extents, or -1 (out of memory) */
static int64_t record_new(sf_alloc *a, uint32_t n_cores, uint32_t n_ext) {
    if (a->free_rec < 0) {
        if (a->n_rec == a->cap_rec) {
            if (a->cap_rec > UINT32_MAX / 4) return -1;
            const uint32_t cap = a->cap_rec ? a->cap_rec * 2 : 64;
            record *rec = realloc(a->rec, sizeof(record) * cap);
            if (!rec) return -1;
            a->rec = rec;
            a->cap_rec = cap;
        }
        memset(&a->rec[a->n_rec], 0, sizeof(record));
        a->rec[a->n_rec].next_free = a->free_rec;
        a->free_rec = a->n_rec++;
    }
    const int64_t h = a->free_rec;
    record *r = &a->rec[h];
    uint32_t *cores = n_cores ? malloc(sizeof(uint32_t) * n_cores) : NULL;
    sf_extent *ext = n_ext ? malloc(sizeof(sf_extent) * n_ext) : NULL;
    if ((n_cores && !cores) || (n_ext && !ext)) {
        free(cores);
        free(ext);
        return -1;
    }
    a->free_rec = r->next_free;
    memset(r, 0, sizeof *r);
    r->cores = cores;
    r->ext = ext;
    r->used = 1;
    r->next_free = -1;
    return h;
}

static record *record_get(const sf_alloc *a, uint32_t h) {
    return h < a->n_rec && a->rec[h].used ? &a->rec[h] : NULL;
}

/* the words out[] needs for any record of this device */
static uint64_t grant_words(const sf_alloc *a) {
    return SF_GRANT_HEAD + (uint64_t)a->n_cores_total + 2 * (uint64_t)a->max_extents;
}

static void grant_from(const record *r, uint32_t h, uint32_t *out) {
    out[SF_G_SLICE] = h;
    out[SF_G_KEY] = r->key;
    out[SF_G_PORTS_LO] = (uint32_t)r->ports;
    out[SF_G_PORTS_HI] = (uint32_t)(r->ports >> 32);
    out[SF_G_LANE_PORT] = r->lane_port;
    out[SF_G_LANE_FIRST] = r->lane_first;
    out[SF_G_LANE_WIDTH] = r->lane_width;
    out[SF_G_N_CORES] = r->n_cores;
    out[SF_G_N_EXTENTS] = r->n_ext;
    uint32_t *w = out + SF_GRANT_HEAD;
    if (r->n_cores) memcpy(w, r->cores, sizeof(uint32_t) * r->n_cores);
    w += r->n_cores;
    for (uint32_t i = 0; i < r->n_ext; i++) {
        *w++ = r->ext[i].start;
        *w++ = r->ext[i].length;
    }
}

/* ---------------------------------------------------------------- new / free */

void sf_alloc_free(sf_alloc *a) {
    if (!a) return;
    for (uint32_t h = 0; h < a->n_rec; h++) {
        free(a->rec[h].cores);
        free(a->rec[h].ext);
    }
    free(a->rec);
    free(a->endpoint);
    free(a->exclude);
    free(a);
}

sf_alloc *sf_alloc_new(const sf_alloc_params *p, sf_cores *cores, sf_lanes *lanes,
                       sf_extents *memory, sf_error *err) {
    if (!p || !cores || !lanes || !memory || (p->n_endpoint_lanes && !p->endpoint_lanes)) {
        sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
        return NULL;
    }
    int rc = SF_OK;
    if (p->n_keys < 1 || p->n_keys > SF_MAX_KEYS)
        rc = sf_fail(err, SF_ERANGE, SF_F_N_KEYS, -1, p->n_keys, SF_MAX_KEYS);
    else if (p->n_ports < 1 || p->n_ports > SF_MAX_PORTS)
        rc = sf_fail(err, SF_ERANGE, SF_F_N_PORTS, -1, p->n_ports, SF_MAX_PORTS);
    else if (p->port_mbps < 1 || p->port_mbps > SF_MAX_MBPS)
        rc = sf_fail(err, SF_ERANGE, SF_F_PORT_MBPS, -1, (int64_t)p->port_mbps, SF_MAX_MBPS);
    else if (p->granule_bytes < 1 || p->granule_bytes > INT64_MAX ||
             p->memory_bytes > INT64_MAX ||
             p->memory_bytes / p->granule_bytes != sf_extents_total(memory))
        rc = sf_fail(err, SF_EINVAL, SF_F_MEMORY, -1, (int64_t)(p->memory_bytes >> 1),
                     sf_extents_total(memory));
    else if (p->max_extents < 1 || p->max_extents > MAX_EXTENTS_PER_SLICE)
        rc = sf_fail(err, SF_ERANGE, SF_F_MAX_EXTENTS, -1, p->max_extents, MAX_EXTENTS_PER_SLICE);
    const uint32_t n_lanes = sf_lanes_total(lanes);
    for (uint32_t i = 0; !rc && i < p->n_endpoint_lanes; i++)
        if (p->endpoint_lanes[i] >= n_lanes)
            rc = sf_fail(err, SF_ERANGE, SF_F_LANE, i, p->endpoint_lanes[i], n_lanes - 1);
    if (rc) return NULL;
    sf_alloc *a = calloc(1, sizeof *a);
    if (!a) {
        sf_fail(err, SF_ENOMEM, SF_F_NONE, -1, 0, 0);
        return NULL;
    }
    a->cores = cores;
    a->lanes = lanes;
    a->mem = memory;
    a->n_keys = p->n_keys;
    a->n_ports = p->n_ports;
    a->port_mbps = p->port_mbps;
    a->granule = p->granule_bytes;
    a->memory_bytes = p->memory_bytes;
    a->max_extents = p->max_extents;
    a->n_cores_total = sf_cores_total(cores);
    a->max_cluster = sf_cores_max_cluster(cores);
    a->widest = sf_lanes_widest(lanes);
    a->n_lanes = n_lanes;
    a->free_rec = -1;
    for (uint32_t k = 0; k < SF_MAX_KEYS; k++) a->key_owner[k] = SF_NOBODY;
    for (uint32_t i = 0; i < SF_MAX_PORTS; i++) port_reset(&a->port[i]);
    a->endpoint = calloc(n_lanes, 1);
    a->exclude = malloc(sizeof(uint32_t) * (n_lanes ? n_lanes : 1));
    if (!a->endpoint || !a->exclude) {
        sf_alloc_free(a);
        sf_fail(err, SF_ENOMEM, SF_F_NONE, -1, 0, 0);
        return NULL;
    }
    for (uint32_t i = 0; i < p->n_endpoint_lanes; i++) a->endpoint[p->endpoint_lanes[i]] = 1;
    for (uint32_t lane = 0; lane < n_lanes; lane++)
        if (a->endpoint[lane]) a->exclude[a->n_exclude++] = lane;
    sf_ok(err);
    return a;
}

/* ---------------------------------------------------------------- keys and ports */

static void claim_key(sf_alloc *a, uint32_t owner, uint32_t key) {
    a->key_owner[key] = owner;
    a->key_users[key]++;
}

static void give_key(sf_alloc *a, uint32_t key) {
    if (--a->key_users[key] == 0) a->key_owner[key] = SF_NOBODY;
}

static uint64_t limit_of(const sf_alloc *a, uint64_t max_mbps) {
    return max_mbps ? max_mbps : a->port_mbps;
}

static void claim_ports(sf_alloc *a, uint32_t owner, uint64_t ports, uint32_t priority,
                        uint64_t guaranteed, uint64_t limit, uint32_t key) {
    for (uint32_t p = 0; p < a->n_ports; p++) {
        if (!(ports & bit64(p))) continue;
        sf_port_state *st = &a->port[p];
        st->owner = owner;
        st->slices++;
        st->guaranteed_mbps += guaranteed;
        st->limit_mbps += limit;
        st->priorities[priority]++;
        st->keys[key]++;
    }
    a->dirty |= ports;
}

/* one slice less on each port; a port left empty is free, or stays held (quarantine) */
static void give_ports(sf_alloc *a, uint64_t ports, uint32_t priority, uint64_t guaranteed,
                       uint64_t limit, uint32_t key, int quarantine) {
    for (uint32_t p = 0; p < a->n_ports; p++) {
        if (!(ports & bit64(p))) continue;
        sf_port_state *st = &a->port[p];
        st->slices--;
        if (quarantine) st->quarantined++;
        if (st->slices == 0) {
            const uint32_t owner = st->owner, quarantined = st->quarantined;
            port_reset(st);
            if (quarantined) {
                st->owner = owner;
                st->quarantined = quarantined;
            }
            continue;
        }
        st->guaranteed_mbps -= guaranteed;
        st->limit_mbps -= limit;
        st->priorities[priority]--;
        st->keys[key]--;
    }
    a->dirty |= ports;
}

/* a withdrawn slice's ports leave quarantine */
static void unquarantine(sf_alloc *a, uint64_t ports) {
    for (uint32_t p = 0; p < a->n_ports; p++) {
        if (!(ports & bit64(p))) continue;
        sf_port_state *st = &a->port[p];
        if (--st->quarantined == 0 && st->slices == 0) port_reset(st);
    }
    a->dirty |= ports;
}

static int choose_key(const sf_alloc *a, const sf_request *rq, uint32_t *key, sf_error *err) {
    if (rq->key >= 0) {
        const uint32_t k = (uint32_t)rq->key, holder = a->key_owner[k];
        if (holder != SF_NOBODY && holder != rq->owner)
            return sf_fail(err, SF_ECONFLICT, SF_F_KEY, -1, k, 0);
        *key = k;
        return SF_OK;
    }
    for (uint32_t k = 0; k < a->n_keys; k++)
        if (a->key_owner[k] == rq->owner) {
            *key = k;
            return SF_OK;
        }
    for (uint32_t k = 0; k < a->n_keys; k++)
        if (a->key_owner[k] == SF_NOBODY) {
            *key = k;
            return SF_OK;
        }
    return sf_fail(err, SF_ENOSPC, SF_F_KEY, -1, 1, 0);
}

/* the VM's own ports with headroom (fewest slices first, lowest index on ties), then free
 * ports (lowest index first). SF_ENOSPC: err->limit = the ports found. */
static int choose_ports(const sf_alloc *a, uint32_t owner, int64_t count, uint64_t guaranteed,
                        uint64_t *ports, sf_error *err) {
    *ports = 0;
    if (count <= 0) return SF_OK;
    const uint64_t room = a->port_mbps - guaranteed;
    uint64_t mine[SF_MAX_PORTS];
    uint32_t n = 0;
    for (uint32_t p = 0; p < a->n_ports; p++) {
        const sf_port_state *st = &a->port[p];
        if (st->owner == owner && st->slices && st->guaranteed_mbps <= room)
            mine[n++] = (uint64_t)st->slices << 8 | p;
    }
    for (uint32_t i = 1; i < n; i++) { /* insertion sort by (slices, port): n <= 64 */
        const uint64_t x = mine[i];
        uint32_t j = i;
        for (; j > 0 && mine[j - 1] > x; j--) mine[j] = mine[j - 1];
        mine[j] = x;
    }
    int64_t got = 0;
    for (uint32_t i = 0; i < n && got < count; i++, got++) *ports |= bit64((uint32_t)(mine[i] & 0xFF));
    for (uint32_t p = 0; p < a->n_ports && got < count; p++)
        if (a->port[p].owner == SF_NOBODY) {
            *ports |= bit64(p);
            got++;
        }
    if (got < count) {
        *ports = 0;
        return sf_fail(err, SF_ENOSPC, SF_F_PORTS, -1, count, got);
    }
    return SF_OK;
}

/* ---------------------------------------------------------------- allocate */

/* Allocator.validate for a request whose pinned parts (core ids, explicit lanes) the caller
 * has validated: the same checks, in the same order. */
static int check_request(const sf_alloc *a, const sf_request *rq, sf_error *err) {
    if (rq->owner == SF_NOBODY) return sf_fail(err, SF_EINVAL, SF_F_OWNER, -1, rq->owner, 0);
    if (rq->has_cores) {
        if (rq->cores > (int64_t)a->n_cores_total)
            return sf_fail(err, SF_ERANGE, SF_F_COUNT, -1, rq->cores, a->n_cores_total);
        if (!rq->core_ids && rq->same_cluster && rq->cores > (int64_t)a->max_cluster)
            return sf_fail(err, SF_ERANGE, SF_F_COUNT, -1, rq->cores, a->max_cluster);
    }
    if (rq->has_memory) {
        if (rq->memory_bytes % (int64_t)a->granule)
            return sf_fail(err, SF_EINVAL, SF_F_MEMORY, -1, rq->memory_bytes, (int64_t)a->granule);
        if (rq->memory_bytes > (int64_t)a->memory_bytes)
            return sf_fail(err, SF_ERANGE, SF_F_MEMORY, -1, rq->memory_bytes,
                           (int64_t)a->memory_bytes);
    }
    if (rq->lane_mode < SF_LANES_NONE || rq->lane_mode > SF_LANES_PINNED)
        return sf_fail(err, SF_EINVAL, SF_F_GROUP, -1, rq->lane_mode, SF_LANES_PINNED);
    if (rq->lane_mode == SF_LANES_SEARCH && rq->lane_width > (int64_t)a->widest)
        return sf_fail(err, SF_ERANGE, SF_F_WIDTH, -1, rq->lane_width, a->widest);
    if (rq->key < -1 || rq->key >= (int64_t)a->n_keys)
        return sf_fail(err, SF_ERANGE, SF_F_KEY, -1, rq->key, a->n_keys - 1);
    if (rq->ports > (int64_t)a->n_ports)
        return sf_fail(err, SF_ERANGE, SF_F_PORTS, -1, rq->ports, a->n_ports);
    /* beyond what the reference checks here (SliceSpec.from_dict does): C indexes by them */
    if (rq->priority < 0 || rq->priority > SF_MAX_PRIORITY)
        return sf_fail(err, SF_ERANGE, SF_F_PRIORITY, -1, rq->priority, SF_MAX_PRIORITY);
    if (rq->guaranteed_mbps < 0 || (uint64_t)rq->guaranteed_mbps > a->port_mbps)
        return sf_fail(err, SF_ERANGE, SF_F_GUARANTEED, -1, rq->guaranteed_mbps,
                       (int64_t)a->port_mbps);
    if (rq->max_mbps < 0 || (uint64_t)rq->max_mbps > a->port_mbps)
        return sf_fail(err, SF_ERANGE, SF_F_MAX_BW, -1, rq->max_mbps, (int64_t)a->port_mbps);
    return SF_OK;
}

/* the lanes step: search, or take the named group */
static int take_lanes(sf_alloc *a, const sf_request *rq, uint32_t *port, uint32_t *first,
                      sf_error *err) {
    if (rq->lane_width < 1 || rq->lane_width > 16)
        return sf_fail(err, SF_ERANGE, SF_F_WIDTH, -1, rq->lane_width, 16);
    const uint32_t width = (uint32_t)rq->lane_width;
    if (rq->lane_mode == SF_LANES_SEARCH)
        return sf_lanes_allocate(a->lanes, width, -1, a->exclude, a->n_exclude, port, first, err);
    if (rq->lane_first >= a->n_lanes || (uint64_t)rq->lane_first + width > a->n_lanes)
        return sf_fail(err, SF_ERANGE, SF_F_LANE, -1, rq->lane_first, a->n_lanes - width);
    if (rq->lane_mode == SF_LANES_EXACT)
        for (uint32_t lane = rq->lane_first; lane < rq->lane_first + width; lane++)
            if (a->endpoint[lane]) return sf_fail(err, SF_ECONFLICT, SF_F_LANE, -1, lane, 0);
    int rc = sf_lanes_take(a->lanes, rq->lane_port, rq->lane_first, width, err);
    if (rc) return rc;
    *port = rq->lane_port;
    *first = rq->lane_first;
    return SF_OK;
}

int sf_alloc_allocate(sf_alloc *a, const sf_request *rq, uint32_t *out, uint32_t out_cap,
                      sf_error *err) {
    if (!a || !rq || !out || !out_cap) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    uint32_t *step = &out[0];
    *step = SF_STEP_SPEC;
    if (out_cap < grant_words(a))
        return sf_fail(err, SF_EINVAL, SF_F_OUT_CAP, -1, out_cap, (int64_t)grant_words(a));
    int rc = check_request(a, rq, err);
    if (rc) return rc;

    *step = SF_STEP_KEY;
    uint32_t key = 0;
    rc = choose_key(a, rq, &key, err);
    if (rc) return rc;

    *step = SF_STEP_PORTS;
    uint64_t ports = 0;
    rc = choose_ports(a, rq->owner, rq->ports, (uint64_t)rq->guaranteed_mbps, &ports, err);
    if (rc) return rc;

    *step = SF_STEP_CORES;
    uint32_t n_cores = 0;
    if (rq->has_cores) {
        if (rq->cores < 1) return sf_fail(err, SF_ERANGE, SF_F_COUNT, -1, rq->cores, 1);
        n_cores = (uint32_t)rq->cores; /* <= the device's cores (check_request) */
    }
    const int64_t h = record_new(a, n_cores, rq->has_memory ? a->max_extents : 0);
    if (h < 0) return sf_fail(err, SF_ENOMEM, SF_F_NONE, -1, 0, 0);
    record *r = &a->rec[h];
    if (rq->has_cores) {
        if (rq->core_ids) {
            rc = sf_cores_take(a->cores, rq->core_ids, n_cores, err);
            if (!rc) memcpy(r->cores, rq->core_ids, sizeof(uint32_t) * n_cores);
        } else {
            const int mode = rq->same_cluster ? SF_CORES_SAME_CLUSTER : SF_CORES_PACK;
            rc = sf_cores_allocate(a->cores, n_cores, mode, 0, r->cores, n_cores, err);
        }
        if (rc) {
            record_drop(a, (uint32_t)h);
            return rc;
        }
        r->n_cores = n_cores;
    }

    *step = SF_STEP_MEMORY;
    if (rq->has_memory) {
        if (rq->memory_bytes < (int64_t)a->granule) {
            rc = sf_fail(err, SF_ERANGE, SF_F_COUNT, -1, rq->memory_bytes / (int64_t)a->granule, 1);
        } else if (!sf_extents_reserve(a->mem, 4 * (int64_t)a->max_extents)) {
            /* nodes for the allocation and for giving it back if the lanes step fails */
            rc = sf_fail(err, SF_ENOMEM, SF_F_NONE, -1, 0, 0);
        } else {
            const uint64_t granules = (uint64_t)rq->memory_bytes / a->granule; /* <= total */
            rc = sf_extents_allocate(a->mem, (uint32_t)granules, rq->contiguous != 0,
                                     a->max_extents, r->ext, a->max_extents, &r->n_ext, err);
        }
        if (rc) {
            (void)sf_cores_give(a->cores, r->cores, r->n_cores, NULL);
            record_drop(a, (uint32_t)h);
            return rc;
        }
    }

    *step = SF_STEP_LANES;
    if (rq->lane_mode != SF_LANES_NONE) {
        rc = take_lanes(a, rq, &r->lane_port, &r->lane_first, err);
        if (rc) {
            sf_extents_give_reserved(a->mem, r->ext, r->n_ext);
            (void)sf_cores_give(a->cores, r->cores, r->n_cores, NULL);
            record_drop(a, (uint32_t)h);
            return rc;
        }
        r->lane_width = (uint32_t)rq->lane_width;
    }

    /* commit point: the key and the ports were checked above */
    r->owner = rq->owner;
    r->key = key;
    r->ports = ports;
    r->priority = (uint32_t)rq->priority;
    r->guaranteed = (uint64_t)rq->guaranteed_mbps;
    r->max_mbps = (uint64_t)rq->max_mbps;
    claim_key(a, rq->owner, key);
    claim_ports(a, rq->owner, ports, r->priority, r->guaranteed, limit_of(a, r->max_mbps), key);
    grant_from(r, (uint32_t)h, out);
    return sf_ok(err);
}

int sf_alloc_allocate_simple(sf_alloc *a, uint32_t owner, int64_t key, int64_t ports,
                             uint32_t flags, int64_t cores, int64_t memory_bytes,
                             int64_t lane_width, int64_t priority, int64_t guaranteed_mbps,
                             int64_t max_mbps, uint32_t *out, uint32_t out_cap,
                             sf_error *err) {
    const sf_request rq = {
        .owner = owner,
        .key = key,
        .ports = ports,
        .priority = priority,
        .guaranteed_mbps = guaranteed_mbps,
        .max_mbps = max_mbps,
        .has_cores = (flags & SF_ASK_CORES) != 0,
        .cores = cores,
        .same_cluster = (flags & SF_ASK_SAME_CLUSTER) != 0,
        .core_ids = NULL,
        .has_memory = (flags & SF_ASK_MEMORY) != 0,
        .memory_bytes = memory_bytes,
        .contiguous = (flags & SF_ASK_CONTIGUOUS) != 0,
        .lane_mode = (flags & SF_ASK_LANES) ? SF_LANES_SEARCH : SF_LANES_NONE,
        .lane_width = lane_width,
    };
    return sf_alloc_allocate(a, &rq, out, out_cap, err);
}

/* ---------------------------------------------------------------- release */

int sf_alloc_release(sf_alloc *a, uint32_t slice, int withdrawn, sf_error *err) {
    if (!a) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    record *r = record_get(a, slice);
    if (!r) return sf_fail(err, SF_EINVAL, SF_F_SLICE, -1, slice, a->n_rec);
    /* everything is checked before anything changes, in the reference's order */
    for (uint32_t i = 0; i < r->n_cores; i++) {
        int free_now = 0;
        if (sf_cores_is_free(a->cores, r->cores[i], &free_now, NULL) || free_now)
            return sf_fail(err, SF_ECONFLICT, SF_F_CORE, i, r->cores[i], 0);
    }
    if (!sf_extents_all_held(a->mem, r->ext, r->n_ext))
        return sf_fail(err, SF_ECONFLICT, SF_F_START, -1, r->n_ext ? r->ext[0].start : 0, 0);
    if (r->lane_width) {
        uint32_t width = 0;
        if (sf_lanes_group_at(a->lanes, r->lane_first, &width, NULL) || width != r->lane_width)
            return sf_fail(err, SF_ECONFLICT, SF_F_GROUP, -1, r->lane_first, r->lane_width);
    }
    for (uint32_t p = 0; p < a->n_ports; p++)
        if ((r->ports & bit64(p)) && !(withdrawn ? a->port[p].quarantined : a->port[p].slices))
            return sf_fail(err, SF_ECONFLICT, SF_F_PORTS, p, p, 0);
    if (!a->key_users[r->key]) return sf_fail(err, SF_ECONFLICT, SF_F_KEY, -1, r->key, 0);
    if (r->n_ext && !sf_extents_reserve(a->mem, 2 * (int64_t)r->n_ext))
        return sf_fail(err, SF_ENOMEM, SF_F_NONE, -1, 0, 0);
    /* nothing below can fail */
    if (withdrawn)
        unquarantine(a, r->ports);
    else
        give_ports(a, r->ports, r->priority, r->guaranteed, limit_of(a, r->max_mbps), r->key, 0);
    (void)sf_cores_give(a->cores, r->cores, r->n_cores, NULL);
    sf_extents_give_reserved(a->mem, r->ext, r->n_ext);
    if (r->lane_width)
        (void)sf_lanes_give(a->lanes, r->lane_port, r->lane_first, r->lane_width, NULL);
    give_key(a, r->key);
    record_drop(a, slice);
    return sf_ok(err);
}

/* ---------------------------------------------------------------- records for Python */

static int check_qos(const sf_alloc *a, int64_t priority, int64_t guaranteed, int64_t max_mbps,
                     sf_error *err) {
    if (priority < 0 || priority > SF_MAX_PRIORITY)
        return sf_fail(err, SF_ERANGE, SF_F_PRIORITY, -1, priority, SF_MAX_PRIORITY);
    if (guaranteed < 0 || (uint64_t)guaranteed > a->port_mbps)
        return sf_fail(err, SF_ERANGE, SF_F_GUARANTEED, -1, guaranteed, (int64_t)a->port_mbps);
    if (max_mbps < 0 || (uint64_t)max_mbps > a->port_mbps)
        return sf_fail(err, SF_ERANGE, SF_F_MAX_BW, -1, max_mbps, (int64_t)a->port_mbps);
    return SF_OK;
}

static int check_ports_mask(const sf_alloc *a, uint64_t ports, sf_error *err) {
    if (a->n_ports < 64 && ports >> a->n_ports)
        return sf_fail(err, SF_ERANGE, SF_F_PORTS, -1, (int64_t)(ports >> 1), a->n_ports);
    return SF_OK;
}

int sf_alloc_adopt(sf_alloc *a, uint32_t owner, uint32_t key, uint64_t ports, uint32_t priority,
                   uint64_t guaranteed_mbps, uint64_t max_mbps, const uint32_t *cores,
                   uint32_t n_cores, const sf_extent *extents, uint32_t n_extents,
                   uint32_t lane_port, uint32_t lane_first, uint32_t lane_width,
                   uint32_t *slice, sf_error *err) {
    if (!a || !slice || (n_cores && !cores) || (n_extents && !extents))
        return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (owner == SF_NOBODY) return sf_fail(err, SF_EINVAL, SF_F_OWNER, -1, owner, 0);
    if (key >= a->n_keys) return sf_fail(err, SF_ERANGE, SF_F_KEY, -1, key, a->n_keys - 1);
    int rc = check_ports_mask(a, ports, err);
    if (!rc && (guaranteed_mbps > INT64_MAX || max_mbps > INT64_MAX))
        rc = sf_fail(err, SF_ERANGE, SF_F_GUARANTEED, -1, -1, (int64_t)a->port_mbps);
    if (!rc) rc = check_qos(a, priority, (int64_t)guaranteed_mbps, (int64_t)max_mbps, err);
    if (rc) return rc;
    if (n_cores > a->n_cores_total)
        return sf_fail(err, SF_ERANGE, SF_F_COUNT, -1, n_cores, a->n_cores_total);
    for (uint32_t i = 0; i < n_cores; i++)
        if (cores[i] >= a->n_cores_total)
            return sf_fail(err, SF_ERANGE, SF_F_CORE, i, cores[i], a->n_cores_total - 1);
    const uint32_t total = sf_extents_total(a->mem);
    for (uint32_t i = 0; i < n_extents; i++)
        if (extents[i].length < 1 || (uint64_t)extents[i].start + extents[i].length > total)
            return sf_fail(err, SF_ERANGE, SF_F_START, i, extents[i].start, total);
    if (lane_width && (lane_width > 16 || lane_first >= a->n_lanes ||
                       (uint64_t)lane_first + lane_width > a->n_lanes))
        return sf_fail(err, SF_ERANGE, SF_F_LANE, -1, lane_first, a->n_lanes);
    const int64_t h = record_new(a, n_cores, n_extents);
    if (h < 0) return sf_fail(err, SF_ENOMEM, SF_F_NONE, -1, 0, 0);
    record *r = &a->rec[h];
    r->owner = owner;
    r->key = key;
    r->ports = ports;
    r->priority = priority;
    r->guaranteed = guaranteed_mbps;
    r->max_mbps = max_mbps;
    r->n_cores = n_cores;
    if (n_cores) memcpy(r->cores, cores, sizeof(uint32_t) * n_cores);
    r->n_ext = n_extents;
    if (n_extents) memcpy(r->ext, extents, sizeof(sf_extent) * n_extents);
    r->lane_port = lane_port;
    r->lane_first = lane_first;
    r->lane_width = lane_width;
    *slice = (uint32_t)h;
    return sf_ok(err);
}

int sf_alloc_forget(sf_alloc *a, uint32_t slice, sf_error *err) {
    if (!a) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (!record_get(a, slice)) return sf_fail(err, SF_EINVAL, SF_F_SLICE, -1, slice, a->n_rec);
    record_drop(a, slice);
    return sf_ok(err);
}

int sf_alloc_record(const sf_alloc *a, uint32_t slice, uint32_t *out, uint32_t out_cap,
                    sf_error *err) {
    if (!a || !out) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (out_cap < grant_words(a))
        return sf_fail(err, SF_EINVAL, SF_F_OUT_CAP, -1, out_cap, (int64_t)grant_words(a));
    const record *r = record_get(a, slice);
    if (!r) return sf_fail(err, SF_EINVAL, SF_F_SLICE, -1, slice, a->n_rec);
    grant_from(r, slice, out);
    return sf_ok(err);
}

/* ---------------------------------------------------------------- bookkeeping primitives */

int sf_alloc_claim_key(sf_alloc *a, uint32_t owner, uint32_t key, sf_error *err) {
    if (!a) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (owner == SF_NOBODY) return sf_fail(err, SF_EINVAL, SF_F_OWNER, -1, owner, 0);
    if (key >= a->n_keys) return sf_fail(err, SF_ERANGE, SF_F_KEY, -1, key, a->n_keys - 1);
    if (a->key_owner[key] != SF_NOBODY && a->key_owner[key] != owner)
        return sf_fail(err, SF_ECONFLICT, SF_F_KEY, -1, key, 0);
    claim_key(a, owner, key);
    return sf_ok(err);
}

int sf_alloc_give_key(sf_alloc *a, uint32_t key, sf_error *err) {
    if (!a) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (key >= a->n_keys) return sf_fail(err, SF_ERANGE, SF_F_KEY, -1, key, a->n_keys - 1);
    if (!a->key_users[key]) return sf_fail(err, SF_ECONFLICT, SF_F_KEY, -1, key, 0);
    give_key(a, key);
    return sf_ok(err);
}

int sf_alloc_claim_ports(sf_alloc *a, uint32_t owner, uint64_t ports, int64_t priority,
                         int64_t guaranteed_mbps, int64_t max_mbps, uint32_t key, sf_error *err) {
    if (!a) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (owner == SF_NOBODY) return sf_fail(err, SF_EINVAL, SF_F_OWNER, -1, owner, 0);
    if (key >= a->n_keys) return sf_fail(err, SF_ERANGE, SF_F_KEY, -1, key, a->n_keys - 1);
    int rc = check_ports_mask(a, ports, err);
    if (!rc) rc = check_qos(a, priority, guaranteed_mbps, max_mbps, err);
    if (rc) return rc;
    for (uint32_t p = 0; p < a->n_ports; p++)
        if ((ports & bit64(p)) && a->port[p].owner != SF_NOBODY && a->port[p].owner != owner)
            return sf_fail(err, SF_ECONFLICT, SF_F_PORTS, p, p, 0);
    for (uint32_t p = 0; p < a->n_ports; p++) {
        const uint64_t g = a->port[p].guaranteed_mbps;
        if ((ports & bit64(p)) && (g > a->port_mbps || (uint64_t)guaranteed_mbps > a->port_mbps - g))
            return sf_fail(err, SF_ENOSPC, SF_F_GUARANTEED, p, guaranteed_mbps,
                           g > a->port_mbps ? 0 : (int64_t)(a->port_mbps - g));
    }
    claim_ports(a, owner, ports, (uint32_t)priority, (uint64_t)guaranteed_mbps,
                limit_of(a, (uint64_t)max_mbps), key);
    return sf_ok(err);
}

int sf_alloc_give_ports(sf_alloc *a, uint64_t ports, int64_t priority, int64_t guaranteed_mbps,
                        int64_t max_mbps, uint32_t key, int quarantine, sf_error *err) {
    if (!a) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (key >= a->n_keys) return sf_fail(err, SF_ERANGE, SF_F_KEY, -1, key, a->n_keys - 1);
    int rc = check_ports_mask(a, ports, err);
    if (!rc) rc = check_qos(a, priority, guaranteed_mbps, max_mbps, err);
    if (rc) return rc;
    for (uint32_t p = 0; p < a->n_ports; p++)
        if ((ports & bit64(p)) && !a->port[p].slices)
            return sf_fail(err, SF_ECONFLICT, SF_F_PORTS, p, p, 0);
    give_ports(a, ports, (uint32_t)priority, (uint64_t)guaranteed_mbps,
               limit_of(a, (uint64_t)max_mbps), key, quarantine != 0);
    return sf_ok(err);
}

/* ---------------------------------------------------------------- views */

int sf_alloc_key(const sf_alloc *a, uint32_t key, uint32_t *owner, uint32_t *users,
                 sf_error *err) {
    if (!a || !owner || !users) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (key >= a->n_keys) return sf_fail(err, SF_ERANGE, SF_F_KEY, -1, key, a->n_keys - 1);
    *owner = a->key_owner[key];
    *users = a->key_users[key];
    return sf_ok(err);
}

int sf_alloc_set_key(sf_alloc *a, uint32_t key, uint32_t owner, uint32_t users, sf_error *err) {
    if (!a) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (key >= a->n_keys) return sf_fail(err, SF_ERANGE, SF_F_KEY, -1, key, a->n_keys - 1);
    a->key_owner[key] = owner;
    a->key_users[key] = users;
    return sf_ok(err);
}

int sf_alloc_port(const sf_alloc *a, uint32_t port, sf_port_state *out, sf_error *err) {
    if (!a || !out) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (port >= a->n_ports) return sf_fail(err, SF_ERANGE, SF_F_PORTS, -1, port, a->n_ports - 1);
    *out = a->port[port];
    return sf_ok(err);
}

int sf_alloc_set_port(sf_alloc *a, uint32_t port, const sf_port_state *in, sf_error *err) {
    if (!a || !in) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (port >= a->n_ports) return sf_fail(err, SF_ERANGE, SF_F_PORTS, -1, port, a->n_ports - 1);
    a->port[port] = *in; /* counts are unsigned and only counted: any value is safe */
    return sf_ok(err);
}

int sf_alloc_demand(sf_alloc *a, sf_port_demand *out, uint32_t n_out, uint64_t *changed,
                    sf_error *err) {
    if (!a || !out || !changed) return sf_fail(err, SF_EINVAL, SF_F_NONE, -1, 0, 0);
    if (n_out < a->n_ports) return sf_fail(err, SF_EINVAL, SF_F_OUT_CAP, -1, n_out, a->n_ports);
    for (uint32_t p = 0; p < a->n_ports; p++) {
        const sf_port_state *st = &a->port[p];
        sf_port_demand *d = &out[p];
        memset(d, 0, sizeof *d);
        d->owner = -1;
        if (!st->slices) continue; /* only quarantined slices, or none: reset configuration */
        d->owner = st->owner == SF_NOBODY ? -1 : (int64_t)st->owner;
        for (uint32_t prio = 0; prio <= SF_MAX_PRIORITY; prio++)
            if (st->priorities[prio]) d->priority = prio;
        d->guaranteed_mbps = st->guaranteed_mbps;
        d->limit_mbps = st->limit_mbps;
        for (uint32_t k = 0; k < a->n_keys; k++)
            if (st->keys[k]) d->keys |= 1u << k;
    }
    *changed = a->dirty;
    a->dirty = 0;
    return sf_ok(err);
}
