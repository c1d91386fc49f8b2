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
#include "ciliate/node_config.h"
#include "ciliate/eth.h"
#include "ciliate/ipv4.h"
#include "ciliate/notify.h"
#include "maps.h"

#define IPPROTO_TCP 6
#define IPPROTO_UDP 17

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10
#define TCP_FLAGS_OFF 13

/* Ticks per second, resolved by libbpf at load (/proc/config.gz): flow
 * deadlines are jiffies, as the conntrack's (bpf_jiffies64() is one load). */
extern const unsigned int CONFIG_HZ __kconfig;

/* The translation record is used through a ring buffer pointer only: this
 * anchor keeps its type in BTF (as node_config.h does for ciliate_event). */
const volatile struct ciliate_lb_event *const ciliate_btf_anchor_lb_event = 0;

/* A service translation for `ciliate monitor`, while tracing is on (the
 * gate of trace and policy records: one inlined array lookup otherwise). */
static __always_inline void lb_trace_xlate(__u32 ifindex, __u8 kind, __u8 dir,
					   const struct ciliate_lb_tuple *orig,
					   const struct ciliate_lb_tuple *xlated, __u16 rev_nat_id,
					   __u32 backend_id)
{
	struct ciliate_lb_event *ev;

	if (!trace_enabled())
		return;
	ev = bpf_ringbuf_reserve(&ciliate_events, sizeof(*ev), 0);
	if (!ev)
		return; /* ring full: the reader is behind */
	ev->type = CILIATE_EVENT_LB;
	ev->kind = kind;
	ev->direction = dir;
	ev->pad = 0;
	ev->rev_nat_id = rev_nat_id;
	ev->pad2 = 0;
	ev->ifindex = ifindex;
	ev->backend_id = backend_id;
	ev->orig = *orig;
	ev->xlated = *xlated;
	ev->ktime_ns = bpf_ktime_get_ns();
	bpf_ringbuf_submit(ev, 0);
}

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
	__u64 now = 0;

	if (!aff)
		return NULL;
	/* Without a time limit (a UDP socket's sends) the clock is not read
	 * and the entry not written: a hit costs the lookup alone. */
	if (timeout) {
		now = lb_now_seconds();
		if (aff->last_used + timeout < now)
			return NULL;
	}
	backend = lb_lookup_backend(aff->backend_id);
	if (!backend || backend->state != CILIATE_LB_BACKEND_ACTIVE)
		return NULL;
	if (timeout && aff->last_used != now)
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

		__u32 index = maglev_hash % CILIATE_LB_MAGLEV_SIZE;

		/* The verifier does not bound a modulo: an explicit check,
		 * behind a barrier so clang does not fold it away. */
		asm volatile("" : "+r"(index));
		if (!table || index >= CILIATE_LB_MAGLEV_SIZE)
			return NULL;
		*id = table->backend_ids[index];
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

/* ---- Per-packet load balancing (the uplink) ---- */

/* Not a service packet (or translated to a local pod): the caller goes on. */
#define CILIATE_LB_PASS 100

#define ETH_HLEN 14
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define TCP_CSUM_OFF 16
#define UDP_CSUM_OFF 6
#define AF_INET 2

/* A hash of a flow's tuple, the same on every node (no per-node seed):
 * Maglev then picks the same backend for the flow whichever node the
 * fabric sends it to. The finaliser of MurmurHash3. */
static __always_inline __u32 lb_tuple_hash(const struct ciliate_lb_tuple *t)
{
	__u32 h = t->saddr * 0xcc9e2d51;

	h ^= t->daddr * 0x1b873593;
	h ^= ((__u32)t->sport << 16 | t->dport) * 0x85ebca6b;
	h ^= t->protocol;
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* The tuple of a TCP or UDP packet; false for other protocols and for
 * fragments after the first (no ports: the stack gets them). */
static __always_inline bool lb_tuple(struct __sk_buff *ctx, const struct iphdr *ip,
				     struct ciliate_lb_tuple *t, __u32 *l4_off)
{
	__u16 ports[2];

	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return false;
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return false;
	*l4_off = ETH_HLEN + ip->ihl * 4;
	if (bpf_skb_load_bytes(ctx, *l4_off, ports, sizeof(ports)) < 0)
		return false;
	t->saddr = ip->saddr;
	t->daddr = ip->daddr;
	t->sport = ports[0];
	t->dport = ports[1];
	t->protocol = ip->protocol;
	return true;
}

/* The TCP flags of a packet (0 for UDP, or when they cannot be read). */
static __always_inline __u8 lb_tcp_flags(struct __sk_buff *ctx, __u32 l4_off, __u8 protocol)
{
	__u8 flags = 0;

	if (protocol == IPPROTO_TCP && bpf_skb_load_bytes(ctx, l4_off + TCP_FLAGS_OFF, &flags, 1) < 0)
		flags = 0;
	return flags;
}

/* ---- Uplink flows: state and lifetime (abi.h, ciliate_lb_flow) ---- */

/* Lifetime in jiffies, the conntrack's per protocol and state. */
static __always_inline __u64 lb_flow_lifetime(__u8 protocol, __u16 flags)
{
	__u64 seconds;

	if (protocol != IPPROTO_TCP)
		seconds = CILIATE_CT_LIFETIME_NONTCP;
	else if (flags & CILIATE_LB_FLOW_F_CLOSING)
		seconds = CILIATE_CT_LIFETIME_CLOSE;
	else if (flags & CILIATE_LB_FLOW_F_SEEN_REPLY)
		seconds = CILIATE_CT_LIFETIME_TCP;
	else
		seconds = CILIATE_CT_LIFETIME_SYN;
	return seconds * CONFIG_HZ;
}

/* A flow's state after a packet with `tcp_flags`, from the client or (reply) the backend. */
static __always_inline __u16 lb_flow_flags(__u16 flags, __u8 tcp_flags, bool reply)
{
	if (reply)
		flags |= CILIATE_LB_FLOW_F_SEEN_REPLY;
	if (tcp_flags & TCP_FLAG_FIN)
		flags |= reply ? CILIATE_LB_FLOW_F_FIN_REPLY : CILIATE_LB_FLOW_F_FIN_ORIG;
	if ((tcp_flags & TCP_FLAG_RST) ||
	    ((flags & CILIATE_LB_FLOW_F_FIN_ORIG) && (flags & CILIATE_LB_FLOW_F_FIN_REPLY)))
		flags |= CILIATE_LB_FLOW_F_CLOSING;
	return flags;
}

/* Account a packet to its flow, in place: its state, and its deadline
 * moved on. An unchanged state moves the deadline at most once a second:
 * a write per packet would bounce the entry between CPUs for nothing. */
static __always_inline void lb_flow_touch(struct ciliate_lb_flow *flow, __u8 protocol,
					  __u8 tcp_flags, bool reply, __u64 now)
{
	__u16 flags = lb_flow_flags(flow->flags, tcp_flags, reply);
	__u64 expires = now + lb_flow_lifetime(protocol, flags);

	if (flags != flow->flags) {
		flow->flags = flags;
		flow->expires = expires;
	} else if (expires > flow->expires + CONFIG_HZ) {
		flow->expires = expires;
	}
}

/* Whether a packet with `tcp_flags` finds its flow over: past its
 * deadline, or a new connection (a bare SYN) over a closing flow of the
 * same tuple (the client reused its port at once). */
static __always_inline bool lb_flow_over(const struct ciliate_lb_flow *flow, __u8 tcp_flags,
					 __u64 now)
{
	if (flow->expires < now)
		return true;
	return (flow->flags & CILIATE_LB_FLOW_F_CLOSING) &&
	       (tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

/* The tuple a flow arrived with, from its reply entry. */
static __always_inline void lb_rev_orig(const struct ciliate_lb_nat_rev *rev, __u8 protocol,
					struct ciliate_lb_tuple *orig)
{
	orig->saddr = rev->daddr;
	orig->daddr = rev->saddr;
	orig->sport = rev->dport;
	orig->dport = rev->sport;
	orig->protocol = protocol;
}

/* Whether the reply entry `rev` (of a reply to SNAT port `port`) belongs
 * to no live flow: its flow is gone, over, or has another port now. */
static __always_inline bool lb_rev_stale(const struct ciliate_lb_nat_rev *rev, __u8 protocol,
					 __u16 port, __u64 now)
{
	struct ciliate_lb_tuple orig = {};
	const struct ciliate_lb_flow *flow;

	lb_rev_orig(rev, protocol, &orig);
	flow = bpf_map_lookup_elem(&ciliate_lb_nat_fwd_v2, &orig);
	return !flow || flow->expires < now || flow->nat_port != port;
}

/* Free the reply entry of flow `t` that is over, if the entry is still
 * this flow's (its SNAT port may serve another flow by now). */
static __always_inline void lb_flow_forget(const struct ciliate_lb_tuple *t,
					   const struct ciliate_lb_flow *flow)
{
	const struct ciliate_lb_backend *backend = lb_lookup_backend(flow->backend_id);
	struct ciliate_lb_tuple reply = {};
	const struct ciliate_lb_nat_rev *rev;

	if (!backend)
		return; /* the backend is gone: its entries age out of the LRU */
	reply.saddr = backend->addr;
	reply.sport = backend->port;
	reply.protocol = t->protocol;
	if (flow->nat_port) {
		reply.daddr = node_ip;
		reply.dport = flow->nat_port;
	} else {
		reply.daddr = t->saddr;
		reply.dport = t->sport;
	}
	rev = bpf_map_lookup_elem(&ciliate_lb_nat_rev, &reply);
	if (rev && rev->daddr == t->saddr && rev->dport == t->sport && rev->saddr == t->daddr &&
	    rev->sport == t->dport)
		bpf_map_delete_elem(&ciliate_lb_nat_rev, &reply);
}

/* Rewrite one address (offset `off` in the IPv4 header) with both
 * checksums; the L4 one covers it through the pseudo-header. */
static __always_inline int lb_set_addr(struct __sk_buff *ctx, __u32 l4_off, __u8 protocol,
				       __u32 off, __u32 old, __u32 new)
{
	__u32 csum_off = l4_off + (protocol == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF);
	__u64 flags = BPF_F_PSEUDO_HDR | sizeof(new);

	if (old == new)
		return 0;
	if (protocol == IPPROTO_UDP)
		flags |= BPF_F_MARK_MANGLED_0; /* a UDP checksum of 0 means none: keep it so */
	if (bpf_l4_csum_replace(ctx, csum_off, old, new, flags) < 0 ||
	    bpf_l3_csum_replace(ctx, ETH_HLEN + offsetof(struct iphdr, check), old, new,
				sizeof(new)) < 0 ||
	    bpf_skb_store_bytes(ctx, ETH_HLEN + off, &new, sizeof(new), 0) < 0)
		return DROP(CILIATE_DROP_TRUNCATED);
	return 0;
}

/* Rewrite one port (`off` 0: source, 2: destination) and the L4 checksum. */
static __always_inline int lb_set_port(struct __sk_buff *ctx, __u32 l4_off, __u8 protocol,
				       __u32 off, __u16 old, __u16 new)
{
	__u32 csum_off = l4_off + (protocol == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF);
	__u64 flags = sizeof(new);

	if (old == new)
		return 0;
	if (protocol == IPPROTO_UDP)
		flags |= BPF_F_MARK_MANGLED_0;
	if (bpf_l4_csum_replace(ctx, csum_off, old, new, flags) < 0 ||
	    bpf_skb_store_bytes(ctx, l4_off + off, &new, sizeof(new), 0) < 0)
		return DROP(CILIATE_DROP_TRUNCATED);
	return 0;
}

/* Give the packet of tuple `t` the addresses and ports of `to`. */
static __always_inline int lb_rewrite(struct __sk_buff *ctx, __u32 l4_off,
				      const struct ciliate_lb_tuple *t,
				      const struct ciliate_lb_tuple *to)
{
	int ret;

	ret = lb_set_addr(ctx, l4_off, t->protocol, offsetof(struct iphdr, saddr), t->saddr,
			  to->saddr);
	if (!ret)
		ret = lb_set_addr(ctx, l4_off, t->protocol, offsetof(struct iphdr, daddr),
				  t->daddr, to->daddr);
	if (!ret)
		ret = lb_set_port(ctx, l4_off, t->protocol, 0, t->sport, to->sport);
	if (!ret)
		ret = lb_set_port(ctx, l4_off, t->protocol, 2, t->dport, to->dport);
	return ret;
}

/* Send a translated packet on its way past the stack: its source may be
 * this node's own address (a NodePort frontend, the SNAT address), which
 * the stack would drop as a martian when it comes in from a device. The
 * route and the neighbour come from the kernel's FIB. */
static __always_inline int lb_fib_redirect(struct __sk_buff *ctx, struct trace_info *trace)
{
	struct bpf_fib_lookup fib = {};
	struct ethhdr *eth;
	struct iphdr *ip;
	long ret;

	if (IS_DROP(eth_parse(ctx, &eth)) || IS_DROP(ipv4_parse(ctx, &ip)))
		return DROP(CILIATE_DROP_TRUNCATED);
	if (ip->ttl <= 1)
		return DROP(CILIATE_DROP_TTL_EXCEEDED);
	fib.family = AF_INET;
	fib.tos = ip->tos;
	fib.l4_protocol = ip->protocol;
	fib.tot_len = bpf_ntohs(ip->tot_len);
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	fib.ifindex = ctx->ifindex;
	/* Looked up as the router would forward it in from this device
	 * (forwarding must be on, as on any node). */
	ret = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	trace->point = CILIATE_TRACE_TO_REMOTE;
	trace->target_ifindex = fib.ifindex;
	if (ret == BPF_FIB_LKUP_RET_SUCCESS) {
		eth_set_addrs(eth, fib.dmac, fib.smac);
		ipv4_dec_ttl(ip);
		return bpf_redirect(fib.ifindex, 0);
	}
	if (ret == BPF_FIB_LKUP_RET_NO_NEIGH) {
		ipv4_dec_ttl(ip);
		return bpf_redirect_neigh(fib.ifindex, NULL, 0, 0);
	}
	return DROP(CILIATE_DROP_NO_ROUTE);
}

/* A reply of a translated flow, if `t` is one: it gets the frontend (and,
 * SNATed, the client) back, in place. CILIATE_LB_PASS: not such a reply. */
static __always_inline int lb_rev_nat_rewrite(struct __sk_buff *ctx, __u32 l4_off,
					      const struct ciliate_lb_tuple *t, __u8 dir)
{
	const struct ciliate_lb_nat_rev *rev = bpf_map_lookup_elem(&ciliate_lb_nat_rev, t);
	struct ciliate_lb_tuple orig = {};
	struct ciliate_lb_flow *flow;
	struct ciliate_lb_tuple to;
	int ret;

	if (!rev)
		return CILIATE_LB_PASS;
	to = *t;
	to.saddr = rev->saddr;
	to.sport = rev->sport;
	to.daddr = rev->daddr;
	to.dport = rev->dport;
	/* The flow learns the backend answered, or closed. */
	lb_rev_orig(rev, t->protocol, &orig);
	flow = bpf_map_lookup_elem(&ciliate_lb_nat_fwd_v2, &orig);
	if (flow)
		lb_flow_touch(flow, t->protocol, lb_tcp_flags(ctx, l4_off, t->protocol), true,
			      bpf_jiffies64());
	ret = lb_rewrite(ctx, l4_off, t, &to);
	if (IS_DROP(ret))
		return ret;
	metrics_count(CILIATE_FORWARDED_LB_REPLY, dir, ctx->len);
	lb_trace_xlate(ctx->ifindex, CILIATE_LB_XLATE_REPLY, dir, t, &to, 0,
		       flow ? flow->backend_id : 0);
	return 0;
}

/* A reply of a translated flow, if `t` is one: translated back, and out
 * past the stack. */
static __always_inline int lb_rev_nat(struct __sk_buff *ctx, __u32 l4_off,
				      const struct ciliate_lb_tuple *t, __u8 dir,
				      struct trace_info *trace)
{
	int ret = lb_rev_nat_rewrite(ctx, l4_off, t, dir);

	if (ret)
		return ret; /* not a reply (CILIATE_LB_PASS), or a drop */
	return lb_fib_redirect(ctx, trace);
}

/* Whether `addr` is this node's own (a hostNetwork backend listens there):
 * the stack delivers to it, no pod nor other node is involved. */
static __always_inline bool lb_is_host_addr(__u32 addr)
{
	return addr == node_ip || addr == router_ip;
}

/* A packet the node's own stack sends out of the uplink (tc egress): the
 * reply of a flow the uplink DNATed to a backend on this node's address
 * (a hostNetwork pod) gets the frontend back as its source. Only packets
 * from a node address are looked up: what the node forwards pays one
 * compare. 0: translated (the packet's pointers are stale);
 * CILIATE_LB_PASS: nothing to translate. */
static __always_inline int lb_rev_nat_from_host(struct __sk_buff *ctx, const struct iphdr *ip)
{
	struct ciliate_lb_tuple t = {};
	__u32 l4_off;

	if (!lb_is_host_addr(ip->saddr) || !lb_tuple(ctx, ip, &t, &l4_off))
		return CILIATE_LB_PASS;
	return lb_rev_nat_rewrite(ctx, l4_off, &t, CILIATE_DIR_EGRESS);
}

/* A reply from a local pod to a client outside, after its policy: the
 * reply of a flow the uplink translated to this pod gets the frontend as
 * its source. */
static __always_inline int lb_rev_nat_from_pod(struct __sk_buff *ctx, const struct iphdr *ip,
					       struct trace_info *trace)
{
	struct ciliate_lb_tuple t = {};
	__u32 l4_off;

	if (!lb_tuple(ctx, ip, &t, &l4_off))
		return CILIATE_LB_PASS;
	return lb_rev_nat(ctx, l4_off, &t, CILIATE_DIR_EGRESS, trace);
}

/* A free SNAT port for a flow to `backend` (tried from a hash of the flow,
 * a few ports on; a port whose flow is over counts as free), its reply
 * entry written; 0 if none was free. */
static __always_inline __u16 lb_snat_port(const struct ciliate_lb_tuple *orig,
					  const struct ciliate_lb_backend *backend,
					  __u32 hash, __u64 now)
{
	const __u32 range = CILIATE_LB_NAT_PORT_MAX - CILIATE_LB_NAT_PORT_MIN + 1;
	struct ciliate_lb_tuple reply = {
		.saddr = backend->addr,
		.daddr = node_ip,
		.sport = backend->port,
		.protocol = orig->protocol,
	};
	struct ciliate_lb_nat_rev rev = {
		.saddr = orig->daddr,
		.sport = orig->dport,
		.daddr = orig->saddr,
		.dport = orig->sport,
	};

#pragma unroll
	for (int i = 0; i < 8; i++) {
		__u16 port = bpf_htons((__u16)(CILIATE_LB_NAT_PORT_MIN + (hash + i * 7919) % range));

		const struct ciliate_lb_nat_rev *taken;

		reply.dport = port;
		if (!bpf_map_update_elem(&ciliate_lb_nat_rev, &reply, &rev, BPF_NOEXIST))
			return port;
		/* A port left by a flow that is over is free again. */
		taken = bpf_map_lookup_elem(&ciliate_lb_nat_rev, &reply);
		if (taken && lb_rev_stale(taken, orig->protocol, port, now) &&
		    !bpf_map_update_elem(&ciliate_lb_nat_rev, &reply, &rev, BPF_ANY))
			return port;
	}
	return 0;
}

#define ICMP_DEST_UNREACH 3
#define ICMP_PORT_UNREACH 3
#define ICMP_QUOTE_LEN 28       /* the offending IPv4 header (no options) and 8 bytes of it */

/* The one's complement sum of bpf_csum_diff() folded into a checksum. */
static __always_inline __u16 lb_csum_fold(__u32 csum)
{
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return (__u16)~csum;
}

struct lb_icmp_reply {
	struct iphdr ip;
	struct icmphdr icmp;
	__u8 quote[ICMP_QUOTE_LEN];
};

/* Answer a packet to a frontend with no active backend with an ICMP port
 * unreachable from the frontend, back out of the device it came in by (as
 * Cilium does): the client's connect() or send fails at once
 * (ECONNREFUSED) instead of waiting for a time-out. A header with options
 * is only dropped. Counted as the drop it stands for. */
static __always_inline int lb_icmp_unreachable(struct __sk_buff *ctx,
						const struct ciliate_lb_tuple *t)
{
	struct lb_icmp_reply reply = {};
	struct ethhdr eth;
	__u8 mac[ETH_ALEN];
	__u32 len = ETH_HLEN + sizeof(reply);
	__s64 csum;

	/* (Read from the packet again: the parsed pointers do not survive
	 * the helpers the caller ran.) */
	if (bpf_skb_load_bytes(ctx, 0, &eth, sizeof(eth)) < 0 ||
	    bpf_skb_load_bytes(ctx, ETH_HLEN, reply.quote, sizeof(reply.quote)) < 0 ||
	    (reply.quote[0] & 0xf) != 5)
		return DROP(CILIATE_DROP_NO_SERVICE_BACKEND);
	reply.ip.version = 4;
	reply.ip.ihl = 5;
	reply.ip.tot_len = bpf_htons(sizeof(reply));
	reply.ip.ttl = 64;
	reply.ip.protocol = 1; /* IPPROTO_ICMP */
	reply.ip.saddr = t->daddr;
	reply.ip.daddr = t->saddr;
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&reply.ip, sizeof(reply.ip), 0);
	if (csum < 0)
		return DROP(CILIATE_DROP_NO_SERVICE_BACKEND);
	reply.ip.check = lb_csum_fold((__u32)csum);
	reply.icmp.type = ICMP_DEST_UNREACH;
	reply.icmp.code = ICMP_PORT_UNREACH;
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&reply.icmp,
			     sizeof(reply.icmp) + sizeof(reply.quote), 0);
	if (csum < 0)
		return DROP(CILIATE_DROP_NO_SERVICE_BACKEND);
	reply.icmp.checksum = lb_csum_fold((__u32)csum);
	mac_copy(mac, eth.h_dest);
	mac_copy(eth.h_dest, eth.h_source);
	mac_copy(eth.h_source, mac);
	if (bpf_skb_change_tail(ctx, len, 0) < 0 ||
	    bpf_skb_store_bytes(ctx, 0, &eth, sizeof(eth), 0) < 0 ||
	    bpf_skb_store_bytes(ctx, ETH_HLEN, &reply, sizeof(reply), 0) < 0)
		return DROP(CILIATE_DROP_NO_SERVICE_BACKEND);
	metrics_count(CILIATE_DROP_NO_SERVICE_BACKEND, CILIATE_DIR_INGRESS, len);
	return bpf_redirect(ctx->ifindex, 0);
}

/*
 * NodePort, LoadBalancer and external IPs from outside, at the uplink:
 * the reply of a flow SNATed here goes back to its client; a packet to an
 * external frontend gets its flow's backend (kept per flow; a new flow
 * from Maglev, so any node picks the same one, or from ClientIP
 * affinity). A local backend: DNAT, and CILIATE_LB_PASS so the caller
 * delivers it into the pod (with the pod's policy, which sees the backend
 * and its port), or to the node's stack when the backend is the node's
 * own address (a hostNetwork pod). A remote one: DNAT and SNAT to this node, so its reply
 * comes back here, and out through the FIB. Anything else: PASS. A flow
 * lives as a conntrack entry does (lb_flow_touch): closed TCP briefly,
 * then its tuple and its SNAT port serve a new flow.
 */
static __always_inline int lb_nodeport(struct __sk_buff *ctx, const struct iphdr *ip,
				       struct trace_info *trace)
{
	const struct ciliate_lb_service_value *svc;
	const struct ciliate_lb_backend *backend = NULL;
	struct ciliate_lb_service_key key = {};
	struct ciliate_lb_flow *flow;
	struct ciliate_lb_flow fwd = {};
	struct ciliate_lb_tuple t = {};
	struct ciliate_lb_tuple to;
	__u32 l4_off, hash, id = 0;
	__u64 now;
	__u8 tcp_flags;
	int ret;

	/* A pod address is never a frontend nor the target of a translated
	 * reply: traffic between pods pays one range compare here. */
	if (endpoint_slot(ip->daddr, &l4_off))
		return CILIATE_LB_PASS;
	if (!lb_tuple(ctx, ip, &t, &l4_off))
		return CILIATE_LB_PASS;
	ret = lb_rev_nat(ctx, l4_off, &t, CILIATE_DIR_INGRESS, trace);
	if (ret != CILIATE_LB_PASS)
		return ret;
	key.addr = t.daddr;
	key.dport = t.dport;
	key.protocol = t.protocol;
	svc = lb_lookup_service(&key, CILIATE_LB_SCOPE_EXTERNAL);
	if (!svc || !(svc->flags & CILIATE_LB_F_EXTERNAL))
		return CILIATE_LB_PASS;

	now = bpf_jiffies64();
	tcp_flags = lb_tcp_flags(ctx, l4_off, t.protocol);
	flow = bpf_map_lookup_elem(&ciliate_lb_nat_fwd_v2, &t);
	if (flow) {
		backend = lb_lookup_backend(flow->backend_id);
		/* Over (or its backend gone): its reply entry goes, and the
		 * packet starts a new flow. */
		if (!backend || lb_flow_over(flow, tcp_flags, now)) {
			lb_flow_forget(&t, flow);
			backend = NULL;
		}
	}
	if (backend) {
		lb_flow_touch(flow, t.protocol, tcp_flags, false, now);
		fwd = *flow;
	} else {
		hash = lb_tuple_hash(&t);
		backend = lb_select(&key, svc, t.saddr, CILIATE_LB_AFFINITY_CLIENT_IP, hash, true,
				    &id);
		if (!backend)
			return lb_icmp_unreachable(ctx, &t);
		fwd.backend_id = id;
		/* A local pod, or this node itself (Cilium's "local backend is
		 * the host"): DNAT only, the reply translated back where it
		 * leaves (the pod's from_container, the uplink's to_netdev). */
		if (lookup_endpoint(backend->addr) || lb_is_host_addr(backend->addr)) {
			struct ciliate_lb_tuple reply = {
				.saddr = backend->addr,
				.daddr = t.saddr,
				.sport = backend->port,
				.dport = t.sport,
				.protocol = t.protocol,
			};
			struct ciliate_lb_nat_rev rev = {
				.saddr = t.daddr,
				.sport = t.dport,
				.daddr = t.saddr,
				.dport = t.sport,
			};

			bpf_map_update_elem(&ciliate_lb_nat_rev, &reply, &rev, BPF_ANY);
		} else {
			fwd.nat_port = lb_snat_port(&t, backend, hash, now);
			if (!fwd.nat_port)
				return DROP(CILIATE_DROP_NO_SERVICE_BACKEND);
		}
		fwd.flags = lb_flow_flags(0, tcp_flags, false);
		fwd.expires = now + lb_flow_lifetime(t.protocol, fwd.flags);
		bpf_map_update_elem(&ciliate_lb_nat_fwd_v2, &t, &fwd, BPF_ANY);
	}
	to = t;
	to.daddr = backend->addr;
	to.dport = backend->port;
	if (fwd.nat_port) {
		to.saddr = node_ip;
		to.sport = fwd.nat_port;
	}
	ret = lb_rewrite(ctx, l4_off, &t, &to);
	if (IS_DROP(ret))
		return ret;
	metrics_count(fwd.nat_port ? CILIATE_FORWARDED_LB_NODEPORT_REMOTE
				   : CILIATE_FORWARDED_LB_NODEPORT,
		      CILIATE_DIR_INGRESS, ctx->len);
	lb_trace_xlate(ctx->ifindex,
		       fwd.nat_port ? CILIATE_LB_XLATE_REMOTE : CILIATE_LB_XLATE_LOCAL,
		       CILIATE_DIR_INGRESS, &t, &to, svc->rev_nat_id, fwd.backend_id);
	return fwd.nat_port ? lb_fib_redirect(ctx, trace) : CILIATE_LB_PASS;
}

#endif /* CILIATE_LB_H */
