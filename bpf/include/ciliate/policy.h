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
 * again and, now denied, its entry goes with the packet. An ICMP error
 * related to a known connection passes as that connection's reply would
 * (policy_related()); the later fragments of a datagram are judged with
 * the ports of its first (conntrack.h).
 *
 * The common packet (TCP without FIN or RST, UDP, SCTP; unfragmented) of
 * a live, verified connection or of a new one takes a short path of its
 * own (ct_established()); everything else takes the full path. Its cost
 * is the figure to watch: `ciliate bench datapath`, established flow
 * against the same flow with enforcement off. What it keeps across the
 * conntrack set's lookup is what costs (clang spills it): it reads what
 * it can again after it, and builds the out-of-line paths' arguments only
 * on the way to them.
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
	__u32 revision;                                 /* its policy revision (0: none enforced) */
};

static __always_inline void policy_end_of(struct policy_end *end,
					  const struct ciliate_endpoint *ep, __u32 identity)
{
	end->ep = ep;
	end->state = policy_state(ep);
	end->identity = identity;
	end->revision = end->state ? end->state->revision : 0;
}

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

/* Two 32-bit values of a packet's ends as one word, the sender's low: how
 * an entry keeps the revisions and identities it verified. */
static __always_inline __u64 ct_pair(__u32 src, __u32 dst)
{
	return (__u64)dst << 32 | src;
}

/* Whether a connection was verified for its ends as they are now: the same
 * policy revisions and the same identities (a label change moves a pod to
 * another identity without touching the entries that name either), as a
 * packet from `src` to `dst` sees them; `reply`: it goes from the
 * connection's other end to its opener. */
static __always_inline bool ct_current(const struct ciliate_ct_entry *entry, __u64 revisions,
				       __u64 identities, bool reply)
{
	const __u64 *seen = reply ? (const __u64 *)entry->swapped :
				    (const __u64 *)&entry->orig_revision;

	return seen[0] == revisions && seen[1] == identities;
}

static __always_inline void ct_verified(struct ciliate_ct_entry *entry,
					const struct policy_end *opener,
					const struct policy_end *other)
{
	__u64 *seen = (__u64 *)&entry->orig_revision;
	__u64 *swapped = (__u64 *)entry->swapped;

	seen[0] = ct_pair(opener->revision, other->revision);
	seen[1] = ct_pair(opener->identity, other->identity);
	swapped[0] = ct_pair(other->revision, opener->revision);
	swapped[1] = ct_pair(other->identity, opener->identity);
}

/*
 * An ICMP error related to a live connection (conntrack.h) passes as the
 * connection's reply would: at once while the connection's verification
 * holds, else after the connection is judged again as its opener sent it
 * (and, denied, the connection ends). The error goes to the end that sent
 * the quoted packet (dst); it comes from the other end or from a router
 * on the way, and then the other end is taken as the entry last verified
 * it.
 */
static __always_inline int policy_related(struct ciliate_ct_entry *entry, bool quoted_reply,
					  const struct ct_packet *pkt, __u32 error_saddr,
					  const struct policy_end *src,
					  const struct policy_end *dst,
					  struct trace_info *trace)
{
	/* The quoted packet went from dst to the connection's other end: dst
	 * opened the connection unless the quoted packet was a reply. */
	bool dst_opened = !quoted_reply;
	const struct policy_end *opener, *other;
	struct policy_end peer = *src;
	int ret;

	if (error_saddr != (__u32)(pkt->tuple.addrs >> 32)) {
		/* From a router: the other end as the entry knows it. */
		peer.ep = NULL;
		peer.state = NULL;
		peer.revision = dst_opened ? entry->reply_revision : entry->orig_revision;
		peer.identity = dst_opened ? entry->reply_identity : entry->orig_identity;
	}
	/* The error goes from the other end to the opener when dst opened it. */
	if (ct_current(entry, ct_pair(peer.revision, dst->revision),
		       ct_pair(peer.identity, dst->identity), dst_opened))
		return TC_ACT_OK;
	opener = dst_opened ? dst : &peer;
	other = dst_opened ? &peer : dst;
	ret = policy_decide(opener, other, ct_protocol(&pkt->tuple),
			    quoted_reply ? ct_sport(&pkt->tuple) : ct_dport(&pkt->tuple), trace);
	if (IS_DROP(ret)) {
		/* No longer allowed: it ends here, as it would on a reply. */
		ct_delete(entry);
		return ret;
	}
	ct_verified(entry, opener, other);
	return TC_ACT_OK;
}

/*
 * What the out-of-line paths are given: the two ends as the caller knows
 * them. They look the ends' policy states up again (policy_ends_unpack())
 * rather than take them from the caller, so the established packet builds
 * nothing for them: these three stores happen only on the way to a call.
 */
struct policy_ends {
	const struct ciliate_endpoint *src;     /* a local endpoint, or NULL */
	const struct ciliate_endpoint *dst;
	__u64 identities;                       /* ct_pair(src identity, dst identity) */
};

static __always_inline void policy_ends_unpack(const struct policy_ends *in,
					       struct policy_end ends[2])
{
	policy_end_of(&ends[0], in->src, (__u32)in->identities);
	policy_end_of(&ends[1], in->dst, (__u32)(in->identities >> 32));
}

/*
 * Out of line (BPF-to-BPF calls): ct_open() and policy_full_path().
 * Inlined, their code made clang spill more across the whole program: in
 * bench datapath (paired A/B of objects in one process) the local
 * delivery path with no policy enforced runs ~12% faster with them out
 * of line, the established flow with policy ~7%. A first packet or a
 * packet of the full path pays one call (a few ns over ~100).
 */

/* A new connection of the common kind (TCP/UDP/SCTP, unfragmented, no FIN
 * or RST) whose tuple is in no way of its set: judged, and tracked if
 * allowed. */
static __attribute__((noinline)) int ct_open(struct __sk_buff *ctx, const struct iphdr *ip,
					     const struct policy_ends *in,
					     struct ciliate_ct_set *set, struct trace_info *trace)
{
	struct ciliate_ct_entry *entry;
	struct policy_end ends[2];
	struct ct_packet pkt;
	__u64 now = bpf_jiffies64();
	int ret;

	policy_ends_unpack(in, ends);
	/* Parsed again rather than handed over: the caller's registers stay
	 * its own (the established packet does not store its tuple). */
	ret = ct_parse(ctx, ip, &pkt);
	if (IS_DROP(ret))
		return ret;
	ret = policy_decide(&ends[0], &ends[1], pkt.protocol, ct_dport(&pkt.tuple), trace);
	if (IS_DROP(ret))
		return ret;
	entry = ct_victim(set, now);
	ct_init(entry, &pkt, now);
	ct_verified(entry, &ends[0], &ends[1]);
	ct_publish(entry, &pkt.tuple);
	if (trace_enabled())
		send_event(ctx, CILIATE_EVENT_POLICY, CILIATE_FORWARDED, trace->policy_dir, 0, 0,
			   trace);
	return TC_ACT_OK;
}

/* The identities of a packet's two ends as ct_pair() makes them: a local
 * endpoint's own, else `peer` (the end that is not a local endpoint). */
static __always_inline __u64 policy_identities(const struct ciliate_endpoint *src,
					       const struct ciliate_endpoint *dst, __u32 peer)
{
	return ct_pair(src ? src->identity : peer, dst ? dst->identity : peer);
}

static __always_inline void policy_ends_of(struct policy_ends *ends,
					   const struct ciliate_endpoint *src,
					   const struct ciliate_endpoint *dst, __u32 peer_identity)
{
	ends->src = src;
	ends->dst = dst;
	ends->identities = policy_identities(src, dst, peer_identity);
}

/* ct_established(): not a packet of its kind, the full path decides. */
#define CT_FULL_PATH 1000

/* A packet of a known connection on the fast path: TC_ACT_OK when the
 * entry is live, verified for its ends as they are now and the packet
 * leaves its state as it is (its flags already say what a reply would
 * add, nothing closes or reopens it), else CT_FULL_PATH. `reply` is a
 * constant at each call: the orientation costs no branch. */
static __always_inline int ct_established_on(struct ciliate_ct_entry *entry, bool reply,
					     __u64 revisions, __u64 identities)
{
	__u64 now = bpf_jiffies64();

	if (!ct_alive(entry, now) || ct_changes_state(entry, reply) ||
	    !ct_current(entry, revisions, identities, reply))
		return CT_FULL_PATH;
	ct_keep_alive(entry, now);
	return TC_ACT_OK;
}

/*
 * The fast path of policy_check(), for TCP, UDP and SCTP packets (not
 * fragments, not FIN or RST) from `src` to `dst`: a packet of a live
 * connection verified for its ends as they are now (their policy
 * `revisions` as ct_pair() makes them, and their identities) passes and
 * refreshes it; a packet whose tuple is in no way of its set opens a new
 * connection if policy allows (ct_open(): TC_ACT_OK or a policy drop).
 * Anything else (a stale verification, a dead or reopened entry, a first
 * reply, another kind of packet) is CT_FULL_PATH. Kept apart from the
 * full path on purpose: the established packet then runs a short,
 * self-contained sequence (bench datapath: ~0.1x of the local delivery
 * path less than one shared path), and a first packet does not parse and
 * hash twice.
 *
 * Clang treats the set's lookup as a call that clobbers r1-r5 (the
 * verifier inlines it, but after clang allocated registers), so what lives
 * across it is spilled: only the L4 header pointer and the revisions do.
 * The tuple is read from the packet again after it, the identities from
 * the endpoints, which the caller keeps anyway.
 */
static __always_inline int ct_established(struct __sk_buff *ctx, const struct iphdr *ip,
					  const struct ciliate_endpoint *src,
					  const struct ciliate_endpoint *dst, __u32 peer_identity,
					  __u64 revisions, struct trace_info *trace)
{
	void *data_end = (void *)(long)ctx->data_end;
	const __u8 *l4 = (const __u8 *)ip + ((ip->ihl & 0xf) << 2);
	struct ciliate_ct_entry *entry;
	struct ciliate_ct_set *set;
	__u8 protocol = ip->protocol;
	struct policy_ends ends;
	struct ct_tuple tuple;

	if (ip->frag_off & bpf_htons(CT_IP_MF | CT_IP_OFFSET))
		return CT_FULL_PATH;
	if (protocol == IPPROTO_TCP) {
		if ((void *)(l4 + 14) > data_end)
			return CT_FULL_PATH;
		/* FIN and RST move the connection's state: the full path,
		 * which opens a connection for them too when none is known. */
		if (l4[13] & (TCP_FLAG_FIN | TCP_FLAG_RST))
			return CT_FULL_PATH;
	} else if (protocol != IPPROTO_UDP && protocol != IPPROTO_SCTP) {
		return CT_FULL_PATH;
	}
	if ((void *)(l4 + 4) > data_end)
		return CT_FULL_PATH;
	set = ct_set_of(ct_tuple_of(ip, l4));
	if (!set)
		return CT_FULL_PATH;
	tuple = ct_tuple_of(ip, l4);
	entry = ct_find(set, tuple.addrs, tuple.l4);
	if (entry)
		return ct_established_on(entry, false, revisions,
					 policy_identities(src, dst, peer_identity));
	/* Not the opener's packet: a reply? The tuple is read again rather
	 * than kept, and the ways too (clang kept every way's key from the
	 * first search, spilled). */
	ct_barrier();
	tuple = ct_tuple_of(ip, l4);
	entry = ct_find(set, ct_reverse_addrs(tuple.addrs), ct_reverse_l4(tuple.l4));
	if (entry)
		return ct_established_on(entry, true, revisions,
					 policy_identities(src, dst, peer_identity));
	policy_ends_of(&ends, src, dst, peer_identity);
	return ct_open(ctx, ip, &ends, set, trace);
}

/*
 * The full path of policy_check(): any packet (ICMP, fragments, related
 * errors), a connection whose verification moved, a closing or reopened
 * one, a first reply, FIN and RST.
 */
static __attribute__((noinline)) int policy_full_path(struct __sk_buff *ctx,
						      const struct iphdr *ip,
						      const struct policy_ends *in,
						      struct trace_info *trace)
{
	struct policy_end ends[2];
	const struct policy_end *src_end = &ends[0], *dst_end = &ends[1];
	const struct policy_end *opener, *other;
	struct ciliate_ct_entry *entry;
	struct ciliate_ct_set *set;
	struct ct_packet pkt;
	bool reply = false;
	__u64 now;
	int ret;

	policy_ends_unpack(in, ends);
	ret = ct_parse(ctx, ip, &pkt);
	if (IS_DROP(ret))
		return ret;
	if (!pkt.trackable)
		return policy_decide(src_end, dst_end, pkt.protocol, ct_dport(&pkt.tuple), trace);

	set = ct_set_of(pkt.tuple);
	if (!set) /* unreachable (the index is in the array): judge it alone */
		return policy_decide(src_end, dst_end, pkt.protocol, ct_dport(&pkt.tuple), trace);
	entry = ct_lookup(set, &pkt.tuple, &reply);
	now = bpf_jiffies64();
	if (entry && ct_alive(entry, now)) {
		if (pkt.related)
			return policy_related(entry, reply, &pkt, ip->saddr, src_end, dst_end,
					      trace);
		if (!ct_reopens(entry, &pkt)) {
			if (!ct_current(entry, ct_pair(src_end->revision, dst_end->revision),
					ct_pair(src_end->identity, dst_end->identity), reply)) {
				/* Judged again as the opener sent it. */
				opener = reply ? dst_end : src_end;
				other = reply ? src_end : dst_end;
				ret = policy_decide(opener, other, pkt.protocol,
						    reply ? ct_sport(&pkt.tuple) : ct_dport(&pkt.tuple),
						    trace);
				if (IS_DROP(ret)) {
					/* No longer allowed: it ends here, from both sides. */
					ct_delete(entry);
					return ret;
				}
				ct_verified(entry, opener, other);
			}
			ct_refresh(entry, &pkt, reply, now);
			return TC_ACT_OK;
		}
	}
	/* An ICMP error about no live connection is an ICMP packet like any. */
	if (pkt.related)
		return policy_decide(src_end, dst_end, pkt.protocol, 0, trace);

	ret = policy_decide(src_end, dst_end, pkt.protocol, ct_dport(&pkt.tuple), trace);
	if (IS_DROP(ret))
		return ret;
	/* A tuple seen before (expired, or a TCP port reused right after
	 * close) takes its old way. */
	if (!entry)
		entry = ct_victim(set, now);
	ct_init(entry, &pkt, now);
	ct_verified(entry, src_end, dst_end);
	ct_publish(entry, &pkt.tuple);
	if (trace_enabled())
		send_event(ctx, CILIATE_EVENT_POLICY, CILIATE_FORWARDED, trace->policy_dir, 0, 0,
			   trace);
	return TC_ACT_OK;
}

/*
 * The policy stage of an IPv4 packet from `src` to `dst` (local endpoints
 * or NULL): TC_ACT_OK or a policy drop. A local endpoint's identity is its
 * own; `peer_identity` is the other end's when one end is not a local
 * endpoint. (The identities are read from the endpoints only once needed:
 * passed in, clang would load them before the lookups and spill them.)
 */
static __always_inline int policy_check(struct __sk_buff *ctx, const struct iphdr *ip,
					const struct ciliate_endpoint *src,
					const struct ciliate_endpoint *dst, __u32 peer_identity,
					struct trace_info *trace)
{
	const struct ciliate_policy_state *src_state = policy_state(src);
	const struct ciliate_policy_state *dst_state = policy_state(dst);
	struct policy_ends ends;
	__u64 revisions;
	int ret;

	/* No local end enforces anything: nothing to decide, nothing to track. */
	if (!src_state && !dst_state)
		return TC_ACT_OK;
	revisions = ct_pair(src_state ? src_state->revision : 0,
			    dst_state ? dst_state->revision : 0);
	ret = ct_established(ctx, ip, src, dst, peer_identity, revisions, trace);
	if (ret != CT_FULL_PATH)
		return ret;
	policy_ends_of(&ends, src, dst, peer_identity);
	return policy_full_path(ctx, ip, &ends, trace);
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
					const struct ciliate_endpoint *dst __attribute__((unused)),
					__u32 peer_identity __attribute__((unused)),
					struct trace_info *trace __attribute__((unused)))
{
	return TC_ACT_OK;
}

#endif /* CILIATE_FEATURE_POLICY */

#endif /* CILIATE_POLICY_H */
