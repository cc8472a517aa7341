/* Shared helpers of the fast-path sources (not part of the Python API). */
#ifndef SF_INTERNAL_H
#define SF_INTERNAL_H

#include "slicefab_fast.h"

/* Record why a call failed and return its status. err may be NULL (the C tests pass one
 * always; Python always passes one). */
static inline int sf_fail(sf_error *err, int code, int field, int64_t index, int64_t value,
                          int64_t limit) {
    if (err) {
        err->code = code;
        err->field = field;
        err->index = index;
        err->value = value;
        err->limit = limit;
        err->extra = 0;
    }
    return code;
}

static inline int sf_ok(sf_error *err) {
    if (err) {
        err->code = SF_OK;
        err->field = SF_F_NONE;
        err->index = -1;
        err->value = 0;
        err->limit = 0;
        err->extra = 0;
    }
    return SF_OK;
}

/* For the allocator's transaction (alloc.c): an extents operation that must not fail half-way
 * reserves its pool nodes first, then gives back without allocating. */
int sf_extents_reserve(sf_extents *e, int64_t nodes);
/* 1 if no granule of any of the n extents is free (each inside the device, length >= 1) */
int sf_extents_all_held(const sf_extents *e, const sf_extent *ext, uint32_t n);
/* give back n held, disjoint extents; 2 * n pool nodes must be reserved */
void sf_extents_give_reserved(sf_extents *e, const sf_extent *ext, uint32_t n);

/* figures the transaction validates requests against */
uint32_t sf_cores_max_cluster(const sf_cores *c);
uint32_t sf_lanes_widest(const sf_lanes *l);
uint32_t sf_lanes_total(const sf_lanes *l);
uint32_t sf_extents_total(const sf_extents *e);

#endif
