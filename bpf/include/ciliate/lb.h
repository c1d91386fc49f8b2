/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Service load balancing: the lookups both paths share (socket LB in
 * bpf_sock_lb.c, per-packet LB on the uplink). The layout of the maps is
 * in abi.h; picking a backend costs one lookup of the service, one of a
 * slot (or the Maglev table) and one of the backend, whatever the number
 * of services and backends.
 */
#ifndef CILIATE_LB_H
#define CILIATE_LB_H

#include "ciliate/common.h"
#include "maps.h"

#define IPPROTO_TCP 6
#define IPPROTO_UDP 17

/* The slot-0 entry of a frontend, as clients of `scope` see it: a service
 * with two scopes (a traffic policy of Local on one side only) keeps the
 * in-cluster backends under CILIATE_LB_SCOPE_INTERNAL. */
static __always_inline const struct ciliate_lb_service_value *
lb_lookup_service(struct ciliate_lb_service_key *key, __u8 scope)
{
	const struct ciliate_lb_service_value *svc;

	key->slot = 0;
	key->scope = CILIATE_LB_SCOPE_EXTERNAL;
	svc = bpf_map_lookup_elem(&ciliate_lb_service, key);
	if (!svc || scope == CILIATE_LB_SCOPE_EXTERNAL || !(svc->flags & CILIATE_LB_F_TWO_SCOPES))
		return svc;
	key->scope = CILIATE_LB_SCOPE_INTERNAL;
	return bpf_map_lookup_elem(&ciliate_lb_service, key);
}

static __always_inline const struct ciliate_lb_backend *lb_lookup_backend(__u32 id)
{
	return id ? bpf_map_lookup_elem(&ciliate_lb_backend, &id) : NULL;
}

/* The backend of slot `slot` (1..count) of the frontend in `key`. */
static __always_inline __u32 lb_slot_backend(struct ciliate_lb_service_key *key, __u16 slot)
{
	const struct ciliate_lb_service_value *entry;

	key->slot = slot;
	entry = bpf_map_lookup_elem(&ciliate_lb_service, key);
	key->slot = 0;
	return entry ? entry->backend_id : 0;
}

/* A random active backend (in-cluster clients). */
static __always_inline __u32 lb_pick_random(struct ciliate_lb_service_key *key,
					    const struct ciliate_lb_service_value *svc)
{
	if (!svc->count)
		return 0;
	return lb_slot_backend(key, (__u16)(bpf_get_prandom_u32() % svc->count) + 1);
}

static __always_inline __u64 lb_now_seconds(void)
{
	return bpf_ktime_get_ns() / 1000000000ULL;
}

/* The backend a client keeps, if it is still there and active and (for
 * ClientIP affinity) was used within `timeout` seconds (0: no limit). */
static __always_inline const struct ciliate_lb_backend *
lb_affinity_backend(const struct ciliate_lb_affinity_key *akey, __u32 timeout, __u32 *id)
{
	struct ciliate_lb_affinity_value *aff = bpf_map_lookup_elem(&ciliate_lb_affinity, akey);
	const struct ciliate_lb_backend *backend;
	__u64 now;

	if (!aff)
		return NULL;
	now = lb_now_seconds();
	if (timeout && aff->last_used + timeout < now)
		return NULL;
	backend = lb_lookup_backend(aff->backend_id);
	if (!backend || backend->state != CILIATE_LB_BACKEND_ACTIVE)
		return NULL;
	aff->last_used = now;
	*id = aff->backend_id;
	return backend;
}

static __always_inline void lb_affinity_keep(const struct ciliate_lb_affinity_key *akey, __u32 id)
{
	struct ciliate_lb_affinity_value value = {
		.last_used = lb_now_seconds(),
		.backend_id = id,
	};

	/* Full map: LRU evicts the oldest client. */
	bpf_map_update_elem(&ciliate_lb_affinity, akey, &value, BPF_ANY);
}

/* A backend for a new flow of `client` (kind CILIATE_LB_AFFINITY_*):
 * the kept one when the service has ClientIP affinity (or `sticky` asks
 * for it, for the sends of one UDP socket), else one `pick`ed by the
 * caller's rule. NULL: no active backend. */
static __always_inline const struct ciliate_lb_backend *
lb_select(struct ciliate_lb_service_key *key, const struct ciliate_lb_service_value *svc,
	  __u64 client, __u8 kind, __u32 maglev_hash, bool use_maglev, __u32 *id)
{
	struct ciliate_lb_affinity_key akey = {
		.client = client,
		.rev_nat_id = svc->rev_nat_id,
		.kind = kind,
	};
	bool keep = (svc->flags & CILIATE_LB_F_AFFINITY) || kind == CILIATE_LB_AFFINITY_SOCKET;
	const struct ciliate_lb_backend *backend;
	__u32 timeout = kind == CILIATE_LB_AFFINITY_SOCKET ? 0 : svc->affinity_timeout;

	if (!svc->count)
		return NULL;
	if (keep) {
		backend = lb_affinity_backend(&akey, timeout, id);
		if (backend)
			return backend;
	}
	if (use_maglev) {
		__u32 rev_nat = svc->rev_nat_id;
		const struct ciliate_lb_maglev *table = bpf_map_lookup_elem(&ciliate_lb_maglev, &rev_nat);

		if (!table)
			return NULL;
		*id = table->backend_ids[maglev_hash % CILIATE_LB_MAGLEV_SIZE];
	} else {
		*id = lb_pick_random(key, svc);
	}
	backend = lb_lookup_backend(*id);
	if (!backend)
		return NULL;
	if (keep)
		lb_affinity_keep(&akey, *id);
	return backend;
}

#endif /* CILIATE_LB_H */
