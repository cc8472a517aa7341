/* Slicefab C fast path: the API that cffi_ext/build.py exposes to Python (firmware/fastpath.py).
 *
 * Everything between the "cdef-begin" and "cdef-end" markers is also handed to cffi's cdef(),
 * so this file is the one declaration of the API for both the C sources and Python. cdef()
 * does not run the preprocessor: only plain declarations and integer #defines go there.
 *
 * Conventions:
 *  - every function returns SF_OK (0) or a negative SF_E* status, and on failure fills the
 *    caller's sf_error: which field was bad, its value, the limit and the index of the
 *    offending element. Inputs are bounds-checked before anything is written; a call that
 *    fails leaves its state object exactly as it was.
 *  - state objects (sf_cores, sf_lanes, sf_extents) are opaque; *_new returns NULL only when
 *    memory runs out or a parameter is out of range (err says which).
 *  - register layout (addresses, field positions, reset values) comes only from the header
 *    generated from rtl/regmap/slicefab_xbar.rdl (slicefab_xbar.h).
 */
#ifndef SLICEFAB_FAST_H
#define SLICEFAB_FAST_H

#include <stdint.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cdef-begin */
#define SF_OK 0
#define SF_EINVAL -1
#define SF_ERANGE -2
#define SF_ENOSPC -3
#define SF_ECONFLICT -4
#define SF_ENOMEM -5
#define SF_EFRAG -6
#define SF_ENOTHELD -7

/* which input an sf_error names */
#define SF_F_NONE 0
#define SF_F_N_PORTS 1
#define SF_F_N_KEYS 2
#define SF_F_PORT_MBPS 3
#define SF_F_CLOCK_MHZ 4
#define SF_F_DATA_BYTES 5
#define SF_F_OWNER 6
#define SF_F_PRIORITY 7
#define SF_F_GUARANTEED 8
#define SF_F_LIMIT 9
#define SF_F_KEYS 10
#define SF_F_PORTS 11
#define SF_F_KEY 12
#define SF_F_IMAGE_LEN 13
#define SF_F_OUT_CAP 14
#define SF_F_COUNT 15
#define SF_F_CLUSTER 16
#define SF_F_CORE 17
#define SF_F_WIDTH 18
#define SF_F_LANE 19
#define SF_F_GROUP 20
#define SF_F_START 21
#define SF_F_LENGTH 22
#define SF_F_MAX_EXTENTS 23
#define SF_F_N_SLICES 24
#define SF_F_MAX_BW 25
#define SF_F_MEMORY 26
#define SF_F_SLICE 27

#define SF_SHADOW_REGS 6
#define SF_MAX_PORTS 64
#define SF_MAX_KEYS 16
#define SF_MAX_PRIORITY 7
#define SF_MAX_MBPS 1099511627776
#define SF_MAX_CLOCK_MHZ 1000000
#define SF_MAX_CLUSTERS 4096
#define SF_MAX_CORES 65536
#define SF_MAX_LANE_PORTS 256
#define SF_MAX_LANES 4096
#define SF_MAX_GRANULES 2147483647

typedef struct {
    int32_t code;     /* the status returned */
    int32_t field;    /* SF_F_* */
    int64_t index;    /* element of an array argument (port, slice, extent...), or -1 */
    int64_t value;    /* the offending value */
    int64_t limit;    /* the bound it broke (or a figure for an allocation failure) */
    int64_t extra;    /* a second figure (see each function) */
} sf_error;

/* ---- crossbar register image (firmware/fabric/image.py is the reference) ---- */

typedef struct {
    uint32_t n_ports;     /* 1..SF_MAX_PORTS */
    uint32_t n_keys;      /* 1..SF_MAX_KEYS */
    uint64_t port_mbps;   /* 1..SF_MAX_MBPS, capacity of one port */
    uint32_t clock_mhz;   /* 1..SF_MAX_CLOCK_MHZ */
    uint32_t data_bytes;  /* 1..255 bytes per flit */
} sf_xbar_params;

typedef struct {
    int64_t owner;            /* -1: nobody holds the port; else the holding VM's number >= 0 */
    uint32_t priority;        /* highest QoS priority on the port, 0..SF_MAX_PRIORITY */
    uint64_t guaranteed_mbps; /* sum of guaranteed bandwidth, 0..SF_MAX_MBPS */
    uint64_t limit_mbps;      /* sum of maximum bandwidth, 0..SF_MAX_MBPS */
    uint32_t keys;            /* protection keys as a bit mask below n_keys */
} sf_port_demand;

typedef struct {
    int64_t owner;            /* the VM's number >= 0 */
    uint32_t priority;        /* 0..SF_MAX_PRIORITY */
    uint64_t guaranteed_mbps; /* 0..port_mbps */
    uint64_t max_mbps;        /* 0 (the port's capacity) or 1..port_mbps */
    uint32_t key;             /* 0..n_keys-1 */
    uint64_t ports;           /* the slice's crossbar ports as a bit mask below n_ports */
} sf_slice;

typedef struct {
    uint32_t addr;   /* byte address on the register port */
    uint32_t value;
} sf_reg_write;

/* Per-port demand recomputed from a slice table (image.demand_from_slices). out has
 * n_out == xb->n_ports entries. Limits are checked per slice (err->index = the slice), and
 * the per-port sums must stay within SF_MAX_MBPS. */
int sf_xbar_demand(const sf_xbar_params *xb, const sf_slice *slices, uint32_t n_slices,
                   sf_port_demand *out, uint32_t n_out, sf_error *err);

/* The shadow registers of every port implied by the demand, SF_SHADOW_REGS words per port in
 * register-map order (PERM_LO, PERM_HI, WEIGHT, TB_RATE, TB_BURST, KEYS). image_len must be
 * n_demand * SF_SHADOW_REGS and n_demand == xb->n_ports. */
int sf_xbar_image(const sf_xbar_params *xb, const sf_port_demand *demand, uint32_t n_demand,
                  uint32_t *image, uint32_t image_len, sf_error *err);

/* The minimal write list from current to target, in address order (no commit). known may be
 * NULL (every current register known); a register whose known byte is 0 is always written.
 * out_cap must be at least n_ports * SF_SHADOW_REGS. */
int sf_xbar_diff(const uint32_t *current, const uint8_t *known, const uint32_t *target,
                 uint32_t n_ports, sf_reg_write *out, uint32_t out_cap, uint32_t *n_out,
                 sf_error *err);

/* sf_xbar_image then sf_xbar_diff against current/known, in one call. */
int sf_xbar_reconfigure(const sf_xbar_params *xb, const sf_port_demand *demand,
                        uint32_t n_demand, const uint32_t *current, const uint8_t *known,
                        uint32_t *target, uint32_t image_len, sf_reg_write *out,
                        uint32_t out_cap, uint32_t *n_out, sf_error *err);

/* Byte address of shadow register reg (0..SF_SHADOW_REGS-1) of port, from slicefab_xbar.h. */
uint32_t sf_xbar_shadow_addr(uint32_t port, uint32_t reg);

/* ---- cores: free-unit bitmaps per cluster (firmware/resources/cores.py) ---- */

typedef struct sf_cores sf_cores;

#define SF_CORES_PACK 0
#define SF_CORES_SAME_CLUSTER 1
#define SF_CORES_IN_CLUSTER 2

sf_cores *sf_cores_new(const uint32_t *cluster_sizes, uint32_t n_clusters, sf_error *err);
void sf_cores_free(sf_cores *c);
uint32_t sf_cores_total(const sf_cores *c);
uint32_t sf_cores_free_count(const sf_cores *c);
int sf_cores_cluster_free(const sf_cores *c, uint32_t cluster, uint32_t *out, sf_error *err);
int sf_cores_is_free(const sf_cores *c, uint32_t core, int *out, sf_error *err);
/* writes the free ids in increasing order; out_cap >= free count */
int sf_cores_free_ids(const sf_cores *c, uint32_t *out, uint32_t out_cap, uint32_t *n_out,
                      sf_error *err);
/* the policy of CoreAllocator.allocate; mode SF_CORES_*; cluster used by IN_CLUSTER.
 * SF_ENOSPC: err->limit = free cores available to the request (see cores.py),
 * err->extra = the cluster with the most free cores (SAME_CLUSTER). */
int sf_cores_allocate(sf_cores *c, uint32_t count, int mode, uint32_t cluster, uint32_t *out,
                      uint32_t out_cap, sf_error *err);
/* take/give exactly these ids (sorted or not). SF_EINVAL: unknown id or id given twice
 * (err->index = position); SF_ECONFLICT: a core already held (take) or free (give). */
int sf_cores_take(sf_cores *c, const uint32_t *ids, uint32_t n, sf_error *err);
int sf_cores_give(sf_cores *c, const uint32_t *ids, uint32_t n, sf_error *err);

/* ---- PCIe lanes: naturally aligned groups over ports (firmware/resources/lanes.py) ---- */

typedef struct sf_lanes sf_lanes;

sf_lanes *sf_lanes_new(const uint32_t *port_lanes, uint32_t n_ports, sf_error *err);
void sf_lanes_free(sf_lanes *l);
uint32_t sf_lanes_free_total(const sf_lanes *l);
int sf_lanes_port_free(const sf_lanes *l, uint32_t port, uint32_t *out, sf_error *err);
/* 1 if every lane of [first, first+width) is free; the group must lie on the device */
int sf_lanes_is_free(const sf_lanes *l, uint32_t first, uint32_t width, int *out, sf_error *err);
/* the policy of LaneAllocator.allocate. port < 0: every port. exclude: n_exclude global lane
 * indices (may be NULL). On success out_port and out_first name the group. SF_ENOSPC:
 * err->limit = widest free aligned group the same request could get (0 if none). */
int sf_lanes_allocate(sf_lanes *l, uint32_t width, int32_t port, const uint32_t *exclude,
                      uint32_t n_exclude, uint32_t *out_port, uint32_t *out_first,
                      sf_error *err);
/* take exactly this (validated) group; SF_ECONFLICT if a lane is held (err->value = lane) */
int sf_lanes_take(sf_lanes *l, uint32_t port, uint32_t first, uint32_t width, sf_error *err);
/* give back a group held exactly as such; SF_ENOTHELD if it is not (err->value = 1 when some
 * lane is free, 0 when its lanes belong to other groups) */
int sf_lanes_give(sf_lanes *l, uint32_t port, uint32_t first, uint32_t width, sf_error *err);
/* width of the group handed out at lane first (0: none starts there) */
int sf_lanes_group_at(const sf_lanes *l, uint32_t first, uint32_t *width, sf_error *err);
/* 1 if lane is held */
int sf_lanes_lane_held(const sf_lanes *l, uint32_t lane, int *out, sf_error *err);

/* ---- memory: free extents indexed by start and by size (firmware/resources/memory.py) ---- */

typedef struct sf_extents sf_extents;

typedef struct {
    uint32_t start;
    uint32_t length;
} sf_extent;

sf_extents *sf_extents_new(uint32_t total, sf_error *err);
void sf_extents_free(sf_extents *e);
uint64_t sf_extents_free_granules(const sf_extents *e);
uint32_t sf_extents_largest(const sf_extents *e);
uint32_t sf_extents_count(const sf_extents *e);
/* the free extents in address order; out_cap >= count */
int sf_extents_list(const sf_extents *e, sf_extent *out, uint32_t out_cap, uint32_t *n_out,
                    sf_error *err);
/* 1 if [start, start+length) is entirely free */
int sf_extents_is_free(const sf_extents *e, uint32_t start, uint32_t length, int *out,
                       sf_error *err);
/* 1 if any granule of [start, start+length) is free */
int sf_extents_any_free(const sf_extents *e, uint32_t start, uint32_t length, int *out,
                        sf_error *err);
/* length of the free extent starting exactly at start (0 if none) */
uint32_t sf_extents_free_at(const sf_extents *e, uint32_t start);
/* the policy of ExtentAllocator.allocate. out_cap >= max_extents. SF_ENOSPC (contiguous:
 * err->limit = largest free extent; else err->limit = free total), SF_EFRAG (err->limit =
 * what max_extents extents give). Extents come out sorted by start. */
int sf_extents_allocate(sf_extents *e, uint32_t granules, int contiguous, uint32_t max_extents,
                        sf_extent *out, uint32_t out_cap, uint32_t *n_out, sf_error *err);
/* take exactly these extents (all free, disjoint); SF_ECONFLICT: err->index = first busy one;
 * SF_EINVAL for overlapping inputs (err->index, err->extra = the two). */
int sf_extents_take(sf_extents *e, const sf_extent *ext, uint32_t n, sf_error *err);
/* give back (all held, disjoint); SF_ECONFLICT: err->index = first one partly free */
int sf_extents_give(sf_extents *e, const sf_extent *ext, uint32_t n, sf_error *err);
/* grow the held extent [start, start+length) in place by granules; *grown = 1 if done, 0 if
 * the granules after it are not all free (nothing changes). SF_ECONFLICT: part of it is free. */
int sf_extents_extend(sf_extents *e, uint32_t start, uint32_t length, uint32_t granules,
                      int *grown, sf_error *err);
/* ---- the allocator's transaction: a slice's key, crossbar ports, cores, memory and lanes
 *      taken or given back in one call (firmware/allocator.py is the reference) ---- */

typedef struct sf_alloc sf_alloc;

#define SF_NOBODY 4294967295  /* owner of a free key or port; VM numbers are below it */

/* what a slice's lanes request is (sf_request.lane_mode) */
#define SF_LANES_NONE 0
#define SF_LANES_SEARCH 1   /* any free aligned group, avoiding the endpoint lanes */
#define SF_LANES_EXACT 2    /* lane_port/lane_first; refused if it touches an endpoint lane */
#define SF_LANES_PINNED 3   /* lane_port/lane_first exactly (an endpoint's own group) */

/* sf_alloc_allocate_simple flags: which parts the slice asks for */
#define SF_ASK_CORES 1
#define SF_ASK_MEMORY 2
#define SF_ASK_LANES 4
#define SF_ASK_SAME_CLUSTER 8
#define SF_ASK_CONTIGUOUS 16

/* the step of a transaction that failed (out[0] on failure), in the reference's order */
#define SF_STEP_SPEC 0
#define SF_STEP_KEY 1
#define SF_STEP_PORTS 2
#define SF_STEP_CORES 3
#define SF_STEP_MEMORY 4
#define SF_STEP_LANES 5

typedef struct {
    uint32_t n_keys;            /* 1..SF_MAX_KEYS */
    uint32_t n_ports;           /* 1..SF_MAX_PORTS crossbar ports */
    uint64_t port_mbps;         /* 1..SF_MAX_MBPS */
    uint64_t granule_bytes;     /* >= 1 */
    uint64_t memory_bytes;      /* the device's memory; granules = memory_bytes / granule_bytes */
    uint32_t max_extents;       /* extents per slice, 1..65536 */
    const uint32_t *endpoint_lanes; /* lanes wired to endpoints (may be NULL when n is 0) */
    uint32_t n_endpoint_lanes;
} sf_alloc_params;

typedef struct {
    uint32_t owner;             /* the VM's number, < SF_NOBODY */
    int64_t key;                /* -1: the VM's lowest key, else the lowest free one */
    int64_t ports;              /* crossbar ports wanted, <= n_ports (<= 0: none) */
    int64_t priority;           /* 0..SF_MAX_PRIORITY */
    int64_t guaranteed_mbps;    /* 0..port_mbps */
    int64_t max_mbps;           /* 0 (the port's capacity) or 1..port_mbps */
    int32_t has_cores;
    int64_t cores;              /* count (>= 1) */
    int32_t same_cluster;
    const uint32_t *core_ids;   /* NULL, or `cores` pinned ids (validated by the caller) */
    int32_t has_memory;
    int64_t memory_bytes;       /* a multiple of granule_bytes, >= one granule */
    int32_t contiguous;
    int32_t lane_mode;          /* SF_LANES_* */
    int64_t lane_width;
    uint32_t lane_port, lane_first; /* EXACT and PINNED */
} sf_request;

/* What a transaction took, as sf_alloc_allocate and sf_alloc_record write it to out[]: a
 * head of SF_GRANT_HEAD words, then n_cores core ids (sorted as taken), then n_extents
 * (start, length) pairs (sorted by start). out_cap must be at least SF_GRANT_HEAD plus the
 * most cores the device has plus twice max_extents. On failure out[0] is the SF_STEP_*
 * that failed. */
#define SF_GRANT_HEAD 9
#define SF_G_SLICE 0        /* the record's handle */
#define SF_G_KEY 1
#define SF_G_PORTS_LO 2     /* the crossbar ports as a 64-bit mask, low word first */
#define SF_G_PORTS_HI 3
#define SF_G_LANE_PORT 4
#define SF_G_LANE_FIRST 5
#define SF_G_LANE_WIDTH 6   /* 0: no lanes */
#define SF_G_N_CORES 7
#define SF_G_N_EXTENTS 8

typedef struct {
    uint32_t owner;             /* SF_NOBODY: held by no VM */
    uint32_t slices;            /* slices in the image on the port */
    uint32_t quarantined;       /* withdrawn slices still holding it */
    uint64_t guaranteed_mbps;
    uint64_t limit_mbps;
    uint32_t priorities[8];     /* slices per priority */
    uint32_t keys[16];          /* slices per protection key (SF_MAX_KEYS) */
} sf_port_state;

/* cores, lanes and memory are the unit allocators the transaction draws from (the same ones
 * Python's CCoreAllocator & co. wrap); they must outlive the sf_alloc. */
sf_alloc *sf_alloc_new(const sf_alloc_params *p, sf_cores *cores, sf_lanes *lanes,
                       sf_extents *memory, sf_error *err);
void sf_alloc_free(sf_alloc *a);
/* Allocator.allocate: validate, then key, ports, cores, memory, lanes, all or nothing; on
 * success a record of the units is kept under out[SF_G_SLICE]. On failure out[0] names the
 * step, nothing changed, and err says why (SF_ENOSPC at PORTS: err->limit = ports found). */
int sf_alloc_allocate(sf_alloc *a, const sf_request *rq, uint32_t *out, uint32_t out_cap,
                      sf_error *err);
/* the same for a request without pinned units, its fields as arguments (flags SF_ASK_*) */
int sf_alloc_allocate_simple(sf_alloc *a, uint32_t owner, int64_t key, int64_t ports,
                             uint32_t flags, int64_t cores, int64_t memory_bytes,
                             int64_t lane_width, int64_t priority, int64_t guaranteed_mbps,
                             int64_t max_mbps, uint32_t *out, uint32_t out_cap,
                             sf_error *err);
/* give back every unit of the record and drop it; withdrawn: its ports were already taken
 * out of the totals (quarantined). All or nothing: SF_ECONFLICT (err->field CORE, START or
 * GROUP) if a unit is no longer held, SF_ENOMEM. */
int sf_alloc_release(sf_alloc *a, uint32_t slice, int withdrawn, sf_error *err);
/* keep a record of units taken through the primitives below (recovery, resize) */
int sf_alloc_adopt(sf_alloc *a, uint32_t owner, uint32_t key, uint64_t ports, uint32_t priority,
                   uint64_t guaranteed_mbps, uint64_t max_mbps, const uint32_t *cores,
                   uint32_t n_cores, const sf_extent *extents, uint32_t n_extents,
                   uint32_t lane_port, uint32_t lane_first, uint32_t lane_width,
                   uint32_t *slice, sf_error *err);
/* drop a record without giving anything back */
int sf_alloc_forget(sf_alloc *a, uint32_t slice, sf_error *err);
/* read a record (out[] as sf_alloc_allocate writes it) */
int sf_alloc_record(const sf_alloc *a, uint32_t slice, uint32_t *out, uint32_t out_cap,
                    sf_error *err);
/* the bookkeeping primitives (Allocator._claim_key & co.): claim checks everything first.
 * claim_ports: SF_ECONFLICT (err->index = a port held by another VM), SF_ENOSPC (err->index =
 * a port without the guaranteed headroom). give_ports with quarantine keeps the ports held. */
int sf_alloc_claim_key(sf_alloc *a, uint32_t owner, uint32_t key, sf_error *err);
int sf_alloc_give_key(sf_alloc *a, uint32_t key, sf_error *err);
int sf_alloc_claim_ports(sf_alloc *a, uint32_t owner, uint64_t ports, int64_t priority,
                         int64_t guaranteed_mbps, int64_t max_mbps, uint32_t key, sf_error *err);
int sf_alloc_give_ports(sf_alloc *a, uint64_t ports, int64_t priority, int64_t guaranteed_mbps,
                        int64_t max_mbps, uint32_t key, int quarantine, sf_error *err);
/* state views (and, for the invariant checker's tests, overwrites) */
int sf_alloc_key(const sf_alloc *a, uint32_t key, uint32_t *owner, uint32_t *users,
                 sf_error *err);
int sf_alloc_set_key(sf_alloc *a, uint32_t key, uint32_t owner, uint32_t users, sf_error *err);
int sf_alloc_port(const sf_alloc *a, uint32_t port, sf_port_state *out, sf_error *err);
int sf_alloc_set_port(sf_alloc *a, uint32_t port, const sf_port_state *in, sf_error *err);
/* every port's demand (as sf_xbar_demand computes it from a slice table); *changed = the
 * ports whose totals changed since the previous call */
int sf_alloc_demand(sf_alloc *a, sf_port_demand *out, uint32_t n_out, uint64_t *changed,
                    sf_error *err);
/* Mailbox doorbells (doorbell.c). Spin, without the GIL, until one of the n 64-bit words
 * differs from its expected value; words[i] may be NULL (skipped). Returns the index of the
 * first word seen changed, or -1 once spin_ns nanoseconds have passed (at least one scan is
 * made, also with spin_ns 0). The words are read with acquire loads. */
int sf_doorbell_wait(const uint64_t *const *words, const uint64_t *expected, uint32_t n,
                     uint64_t spin_ns);
/* cdef-end */

#ifdef __cplusplus
}
#endif

#endif /* SLICEFAB_FAST_H */
