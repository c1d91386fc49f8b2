/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Connection tracker: one ciliate_ct entry per connection, found from both
 * directions (the key orders the two ends, the entry remembers which end
 * opened it). Used by the policy stage only (policy.h): a packet of a
 * known, live connection skips the policy lookups, unless the policy of
 * one of its local ends changed since the connection was verified.
 *
 * Garbage collection: the map is an LRU hash, so a full table drops its
 * least recently used entries; an entry past its lifetime counts as absent
 * on lookup and is overwritten by the next new connection of that tuple;
 * user space removes expired entries (ciliate.datapath.conntrack.gc()).
 */
#ifndef CILIATE_CONNTRACK_H
#define CILIATE_CONNTRACK_H

#include "ciliate/common.h"
#include "maps.h"

#define IPPROTO_ICMP 1
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IPPROTO_SCTP 132

#define ICMP_ECHOREPLY 0
#define ICMP_ECHO 8

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

#define NSEC_PER_SEC 1000000000ULL

/* The packet as the tracker and the policy see it. */
struct ct_packet {
	__u32 saddr;            /* network byte order */
	__u32 daddr;
	__u16 sport;            /* network byte order; ICMP echo: id / 0 */
	__u16 dport;
	__u8 protocol;
	__u8 tcp_flags;
	bool trackable;         /* has a connection: TCP, UDP, SCTP, ICMP echo; first fragment */
};

/*
 * Ports and TCP flags of an IPv4 packet. A fragment other than the first
 * carries no L4 header: it is judged with port 0 (only entries for any
 * port match) and not tracked. ICMP echo is tracked by its id (as the
 * source port of a request, the destination port of a reply); other ICMP
 * types are judged with port 0 and not tracked.
 */
static __always_inline int ct_parse(struct __sk_buff *ctx, const struct iphdr *ip,
				    struct ct_packet *pkt)
{
	void *data_end = (void *)(long)ctx->data_end;
	/* ihl was checked by ipv4_parse(); the mask tells the verifier its range. */
	__u8 *l4 = (__u8 *)ip + ((ip->ihl & 0xf) << 2);

	pkt->saddr = ip->saddr;
	pkt->daddr = ip->daddr;
	pkt->sport = 0;
	pkt->dport = 0;
	pkt->protocol = ip->protocol;
	pkt->tcp_flags = 0;
	pkt->trackable = false;
	if (ip->frag_off & bpf_htons(0x1fff))
		return TC_ACT_OK;

	switch (ip->protocol) {
	case IPPROTO_TCP:
		if ((void *)(l4 + 14) > data_end)
			return DROP(CILIATE_DROP_TRUNCATED);
		pkt->tcp_flags = l4[13];
		/* fall through: the ports sit where UDP's do */
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		if ((void *)(l4 + 4) > data_end)
			return DROP(CILIATE_DROP_TRUNCATED);
		pkt->sport = *(__u16 *)l4;
		pkt->dport = *(__u16 *)(l4 + 2);
		pkt->trackable = true;
		return TC_ACT_OK;
	case IPPROTO_ICMP:
		if ((void *)(l4 + 6) > data_end)
			return DROP(CILIATE_DROP_TRUNCATED);
		if (l4[0] == ICMP_ECHO) {
			pkt->sport = *(__u16 *)(l4 + 4);
			pkt->trackable = true;
		} else if (l4[0] == ICMP_ECHOREPLY) {
			pkt->dport = *(__u16 *)(l4 + 4);
			pkt->trackable = true;
		}
		return TC_ACT_OK;
	default:
		return TC_ACT_OK;
	}
}

/* The key of the packet's connection: the two ends ordered (lower address,
 * then lower port, first); *from_hi says the packet was sent by the second. */
static __always_inline void ct_key(const struct ct_packet *pkt, struct ciliate_ct_key *key,
				   bool *from_hi)
{
	bool swap = pkt->saddr > pkt->daddr ||
		    (pkt->saddr == pkt->daddr && pkt->sport > pkt->dport);

	key->addr_lo = swap ? pkt->daddr : pkt->saddr;
	key->addr_hi = swap ? pkt->saddr : pkt->daddr;
	key->port_lo = swap ? pkt->dport : pkt->sport;
	key->port_hi = swap ? pkt->sport : pkt->dport;
	key->protocol = pkt->protocol;
	*from_hi = swap;
}

/* A live entry of the packet's connection, or NULL. */
static __always_inline struct ciliate_ct_entry *ct_lookup(const struct ciliate_ct_key *key,
							  __u64 now)
{
	struct ciliate_ct_entry *entry = bpf_map_lookup_elem(&ciliate_ct, key);

	return entry && entry->expires_ns > now ? entry : NULL;
}

/* Whether this TCP packet opens a new connection over a closing entry of
 * the same tuple (a port reused right after close). */
static __always_inline bool ct_reopens(const struct ciliate_ct_entry *entry,
				       const struct ct_packet *pkt)
{
	return pkt->protocol == IPPROTO_TCP && (entry->flags & CILIATE_CT_F_CLOSING) &&
	       (pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

static __always_inline __u64 ct_lifetime_ns(__u8 protocol, __u32 flags)
{
	if (protocol != IPPROTO_TCP)
		return CILIATE_CT_LIFETIME_NONTCP * NSEC_PER_SEC;
	if (flags & CILIATE_CT_F_CLOSING)
		return CILIATE_CT_LIFETIME_CLOSE * NSEC_PER_SEC;
	if (flags & CILIATE_CT_F_SEEN_REPLY)
		return CILIATE_CT_LIFETIME_TCP * NSEC_PER_SEC;
	return CILIATE_CT_LIFETIME_SYN * NSEC_PER_SEC;
}

static __always_inline __u32 ct_flags_after(__u32 flags, const struct ct_packet *pkt, bool reply)
{
	if (reply)
		flags |= CILIATE_CT_F_SEEN_REPLY;
	if (pkt->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
		flags |= CILIATE_CT_F_CLOSING;
	return flags;
}

/* A packet of a live connection: its state and lifetime move on. */
static __always_inline void ct_refresh(struct ciliate_ct_entry *entry, const struct ct_packet *pkt,
				       bool reply, __u64 now)
{
	__u32 flags = ct_flags_after(entry->flags, pkt, reply);

	/* Write the flags only when they change: most packets change nothing
	 * but the deadline. */
	if (flags != entry->flags)
		entry->flags = flags;
	entry->expires_ns = now + ct_lifetime_ns(pkt->protocol, flags);
}

/* Record a connection just allowed; a full table evicts its least
 * recently used entry, so the insert itself does not fail for space. */
static __always_inline void ct_create(const struct ciliate_ct_key *key, const struct ct_packet *pkt,
				      bool from_hi, __u32 orig_revision, __u32 reply_revision,
				      __u64 now)
{
	__u32 flags = ct_flags_after(from_hi ? CILIATE_CT_F_ORIG_HI : 0, pkt, false);
	struct ciliate_ct_entry entry = {
		.expires_ns = now + ct_lifetime_ns(pkt->protocol, flags),
		.orig_revision = orig_revision,
		.reply_revision = reply_revision,
		.flags = flags,
	};

	bpf_map_update_elem(&ciliate_ct, key, &entry, BPF_ANY);
}

#endif /* CILIATE_CONNTRACK_H */
