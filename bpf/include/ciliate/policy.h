/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Network policy: whether a packet between two ends, either of which may
 * be a local endpoint, is allowed. Each local end's policy applies in its
 * direction (the sender's egress, the receiver's ingress); a direction
 * that no policy selects is not enforced (Kubernetes: a pod is isolated
 * only by a policy of that type) and the node itself (identity host) may
 * always reach its pods (kubelet probes).
 *
 * The decision for a new connection is at most two lookups per enforced
 * direction in ciliate_policy, an LPM trie (abi.h): the peer's identity
 * first, then identity 0 (any peer). User space (ciliate.datapath.policy)
 * writes every deny of "any peer" into each identity's entries too, and
 * drops allows that a shorter deny covers, so the first lookup that finds
 * an entry is the verdict and deny wins over allow. Packets of a known
 * connection skip the lookups (conntrack.h) until a local end's policy
 * revision moves; then the connection is judged again and, now denied, its
 * entry goes with the packet.
 *
 * Only built with [features] policy; without it policy_check() lets
 * everything pass and costs nothing.
 */
#ifndef CILIATE_POLICY_H
#define CILIATE_POLICY_H

#include "ciliate/common.h"
#include "maps.h"

#if CILIATE_FEATURE_POLICY
#include "ciliate/conntrack.h"
#include "ciliate/notify.h"

#define CILIATE_POLICY_ENFORCED (CILIATE_POLICY_INGRESS | CILIATE_POLICY_EGRESS)

/* The policy state of a local endpoint, NULL when there is none (no local
 * endpoint, or no policy ever written for it). */
static __always_inline const struct ciliate_policy_state *
policy_state(const struct ciliate_endpoint *ep)
{
	const struct ciliate_policy_state *state;
	__u32 id;

	if (!ep)
		return NULL;
	id = ep->endpoint_id;
	state = bpf_map_lookup_elem(&ciliate_policy_state, &id);
	return state && (state->flags & CILIATE_POLICY_ENFORCED) ? state : NULL;
}

/* Whether the endpoint's entries allow the peer (see the header comment). */
static __always_inline bool policy_lookup(const struct ciliate_policy_state *state,
					  __u16 endpoint_id, __u8 dir, __u32 peer,
					  __u8 protocol, __u16 dport)
{
	struct ciliate_policy_key key = {
		.prefixlen = CILIATE_POLICY_PREFIX_FULL,
		.identity = bpf_htonl(peer),
		.endpoint_id = bpf_htons(endpoint_id),
		.direction = dir | ((state->flags & CILIATE_POLICY_GENERATION) ?
				    CILIATE_POLICY_DIR_GENERATION : 0),
		.protocol = protocol,
		.dport = dport,
	};
	const struct ciliate_policy_value *entry;

	entry = bpf_map_lookup_elem(&ciliate_policy, &key);
	if (!entry) {
		key.identity = CILIATE_IDENTITY_ANY;
		entry = bpf_map_lookup_elem(&ciliate_policy, &key);
	}
	return entry && !(entry->flags & CILIATE_POLICY_F_DENY);
}

/*
 * A connection from `from` to `to` (local endpoints or NULL, with their
 * states and identities): the opener's egress, then the receiver's
 * ingress. Records what it decided in the trace for the exit's event.
 */
static __always_inline int policy_decide(const struct ciliate_endpoint *from,
					 const struct ciliate_policy_state *from_state,
					 __u32 from_identity,
					 const struct ciliate_endpoint *to,
					 const struct ciliate_policy_state *to_state,
					 __u32 to_identity, __u8 protocol, __u16 dport,
					 struct trace_info *trace)
{
	trace->policy = 1;
	trace->src_identity = from_identity;
	trace->dst_identity = to_identity;
	trace->protocol = protocol;
	trace->dport = bpf_ntohs(dport);
	if (from && from_state && (from_state->flags & CILIATE_POLICY_EGRESS)) {
		trace->policy_dir = CILIATE_DIR_EGRESS;
		if (!policy_lookup(from_state, from->endpoint_id, CILIATE_DIR_EGRESS, to_identity,
				   protocol, dport))
			goto denied;
	}
	if (to && to_state && (to_state->flags & CILIATE_POLICY_INGRESS) &&
	    from_identity != CILIATE_IDENTITY_HOST) {
		trace->policy_dir = CILIATE_DIR_INGRESS;
		if (!policy_lookup(to_state, to->endpoint_id, CILIATE_DIR_INGRESS, from_identity,
				   protocol, dport))
			goto denied;
	}
	return TC_ACT_OK;

denied:
	/* One drop site for both directions: the event's direction says which. */
	return DROP(CILIATE_DROP_POLICY_DENIED);
}

static __always_inline __u32 policy_revision(const struct ciliate_policy_state *state)
{
	return state ? state->revision : 0;
}

/*
 * The policy stage of an IPv4 packet from `src` to `dst` (local endpoints
 * or NULL) with the given identities: TC_ACT_OK or a policy drop.
 */
static __always_inline int policy_check(struct __sk_buff *ctx, const struct iphdr *ip,
					const struct ciliate_endpoint *src, __u32 src_identity,
					const struct ciliate_endpoint *dst, __u32 dst_identity,
					struct trace_info *trace)
{
	const struct ciliate_policy_state *src_state = policy_state(src);
	const struct ciliate_policy_state *dst_state = policy_state(dst);
	struct ciliate_ct_key key __attribute__((aligned(8))) = {};
	struct ciliate_ct_entry *entry;
	struct ciliate_ct_set *set;
	struct ct_packet pkt;
	bool from_hi, reply;
	__u64 now;
	int ret;

	/* No local end enforces anything: nothing to decide, nothing to track. */
	if (!src_state && !dst_state)
		return TC_ACT_OK;
	ret = ct_parse(ctx, ip, &pkt);
	if (IS_DROP(ret))
		return ret;
	if (!pkt.trackable)
		return policy_decide(src, src_state, src_identity, dst, dst_state, dst_identity,
				     pkt.protocol, pkt.dport, trace);

	ct_key(&pkt, &key, &from_hi);
	set = ct_set_of(&key);
	if (!set) /* unreachable (the index is masked to the array): judge it alone */
		return policy_decide(src, src_state, src_identity, dst, dst_state, dst_identity,
				     pkt.protocol, pkt.dport, trace);
	now = bpf_jiffies64();
	entry = ct_lookup(set, &key, now);
	if (entry && !ct_reopens(entry, &pkt)) {
		reply = from_hi != !!(entry->flags & CILIATE_CT_F_ORIG_HI);
		if (reply) {
			/* Judged again, if at all, as the opener sent it. */
			if (policy_revision(dst_state) != entry->orig_revision ||
			    policy_revision(src_state) != entry->reply_revision) {
				ret = policy_decide(dst, dst_state, dst_identity, src, src_state,
						    src_identity, pkt.protocol, pkt.sport, trace);
				if (IS_DROP(ret))
					goto denied;
				entry->orig_revision = policy_revision(dst_state);
				entry->reply_revision = policy_revision(src_state);
			}
		} else if (policy_revision(src_state) != entry->orig_revision ||
			   policy_revision(dst_state) != entry->reply_revision) {
			ret = policy_decide(src, src_state, src_identity, dst, dst_state,
					    dst_identity, pkt.protocol, pkt.dport, trace);
			if (IS_DROP(ret))
				goto denied;
			entry->orig_revision = policy_revision(src_state);
			entry->reply_revision = policy_revision(dst_state);
		}
		ct_refresh(entry, &pkt, reply, now);
		return TC_ACT_OK;
	}

	ret = policy_decide(src, src_state, src_identity, dst, dst_state, dst_identity,
			    pkt.protocol, pkt.dport, trace);
	if (IS_DROP(ret))
		return ret;
	/* A TCP port reused right after close takes its old entry's way. */
	ct_create(entry ? entry : ct_victim(set, &key, now), &key, &pkt, from_hi,
		  policy_revision(src_state), policy_revision(dst_state), now);
	if (trace_enabled())
		send_event(ctx, CILIATE_EVENT_POLICY, CILIATE_FORWARDED, trace->policy_dir, 0, 0,
			   trace);
	return TC_ACT_OK;

denied:
	/* The connection is no longer allowed: it ends here, from both sides. */
	ct_delete(entry);
	return ret;
}

#else /* CILIATE_FEATURE_POLICY */

static __always_inline int policy_check(struct __sk_buff *ctx __attribute__((unused)),
					const struct iphdr *ip __attribute__((unused)),
					const struct ciliate_endpoint *src __attribute__((unused)),
					__u32 src_identity __attribute__((unused)),
					const struct ciliate_endpoint *dst __attribute__((unused)),
					__u32 dst_identity __attribute__((unused)),
					struct trace_info *trace __attribute__((unused)))
{
	return TC_ACT_OK;
}

#endif /* CILIATE_FEATURE_POLICY */

#endif /* CILIATE_POLICY_H */
