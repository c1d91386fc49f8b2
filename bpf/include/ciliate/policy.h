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
 * revision or an end's identity moves; then the connection is judged
 * again and, now denied, its entry goes with the packet.
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

/* Whether a policy is enforced on a local endpoint: callers that must
 * look up a peer's identity first (an ipcache lookup) skip it when not. */
static __always_inline bool policy_applies(const struct ciliate_endpoint *ep)
{
	return policy_state(ep) != NULL;
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

/* One end of a packet or connection as the policy sees it. */
struct policy_end {
	const struct ciliate_endpoint *ep;              /* a local endpoint, or NULL */
	const struct ciliate_policy_state *state;       /* its policy if enforced, or NULL */
	__u32 identity;
};

/*
 * A connection from `from` to `to`: the opener's egress, then the
 * receiver's ingress. Records what it decided in the trace for the exit's
 * event.
 */
static __always_inline int policy_decide(const struct policy_end *from,
					 const struct policy_end *to, __u8 protocol,
					 __u16 dport, struct trace_info *trace)
{
	trace->policy = 1;
	trace->src_identity = from->identity;
	trace->dst_identity = to->identity;
	trace->protocol = protocol;
	trace->dport = bpf_ntohs(dport);
	if (from->ep && from->state && (from->state->flags & CILIATE_POLICY_EGRESS)) {
		trace->policy_dir = CILIATE_DIR_EGRESS;
		if (!policy_lookup(from->state, from->ep->endpoint_id, CILIATE_DIR_EGRESS,
				   to->identity, protocol, dport))
			goto denied;
	}
	if (to->ep && to->state && (to->state->flags & CILIATE_POLICY_INGRESS) &&
	    from->identity != CILIATE_IDENTITY_HOST) {
		trace->policy_dir = CILIATE_DIR_INGRESS;
		if (!policy_lookup(to->state, to->ep->endpoint_id, CILIATE_DIR_INGRESS,
				   from->identity, protocol, dport))
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

/* Whether a connection was verified for its ends as they are now: the same
 * policy revisions and the same identities (a label change moves a pod to
 * another identity without touching the entries that name either). */
static __always_inline bool ct_current(const struct ciliate_ct_entry *entry,
				       const struct policy_end *opener,
				       const struct policy_end *other)
{
	return entry->orig_revision == policy_revision(opener->state) &&
	       entry->reply_revision == policy_revision(other->state) &&
	       entry->orig_identity == opener->identity &&
	       entry->reply_identity == other->identity;
}

static __always_inline void ct_verified(struct ciliate_ct_entry *entry,
					const struct policy_end *opener,
					const struct policy_end *other)
{
	entry->orig_revision = policy_revision(opener->state);
	entry->reply_revision = policy_revision(other->state);
	entry->orig_identity = opener->identity;
	entry->reply_identity = other->identity;
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
	struct policy_end src_end = { src, policy_state(src), src_identity };
	struct policy_end dst_end = { dst, policy_state(dst), dst_identity };
	struct ciliate_ct_key key __attribute__((aligned(8))) = {};
	const struct policy_end *opener, *other;
	struct ciliate_ct_entry *entry;
	struct ciliate_ct_set *set;
	struct ct_packet pkt;
	bool from_hi, reply;
	__u64 now;
	int ret;

	/* No local end enforces anything: nothing to decide, nothing to track. */
	if (!src_end.state && !dst_end.state)
		return TC_ACT_OK;
	ret = ct_parse(ctx, ip, &pkt);
	if (IS_DROP(ret))
		return ret;
	if (!pkt.trackable)
		return policy_decide(&src_end, &dst_end, pkt.protocol, pkt.dport, trace);

	ct_key(&pkt, &key, &from_hi);
	set = ct_set_of(&key);
	if (!set) /* unreachable (the index is masked to the array): judge it alone */
		return policy_decide(&src_end, &dst_end, pkt.protocol, pkt.dport, trace);
	now = bpf_jiffies64();
	entry = ct_lookup(set, &key, now);
	if (entry && !ct_reopens(entry, &pkt)) {
		reply = from_hi != !!(entry->flags & CILIATE_CT_F_ORIG_HI);
		opener = reply ? &dst_end : &src_end;
		other = reply ? &src_end : &dst_end;
		if (!ct_current(entry, opener, other)) {
			/* Judged again as the opener sent it. */
			ret = policy_decide(opener, other, pkt.protocol,
					    reply ? pkt.sport : pkt.dport, trace);
			if (IS_DROP(ret))
				goto denied;
			ct_verified(entry, opener, other);
		}
		ct_refresh(entry, &pkt, reply, now);
		return TC_ACT_OK;
	}

	ret = policy_decide(&src_end, &dst_end, pkt.protocol, pkt.dport, trace);
	if (IS_DROP(ret))
		return ret;
	/* A TCP port reused right after close takes its old entry's way. */
	if (!entry)
		entry = ct_victim(set, &key, now);
	ct_init(entry, &pkt, from_hi, now);
	ct_verified(entry, &src_end, &dst_end);
	ct_publish(entry, &key);
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

static __always_inline bool
policy_applies(const struct ciliate_endpoint *ep __attribute__((unused)))
{
	return false;
}

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
