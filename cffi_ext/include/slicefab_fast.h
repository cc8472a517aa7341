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
/* cdef-end */

#ifdef __cplusplus
}
#endif

#endif /* SLICEFAB_FAST_H */
