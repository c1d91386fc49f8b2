/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Connection tracker: one ciliate_ct entry per connection, found from both
 * directions (the key orders the two ends, the entry remembers which end
 * opened it). Used by the policy stage only (policy.h): a packet of a
 * known, live connection skips the policy lookups, unless the policy of
 * one of its local ends changed since the connection was verified.
 *
 * The table is set-associative (abi.h): a key hashes to a set of
 * CILIATE_CT_WAYS entries. Garbage collection is built in: an entry past
 * its lifetime counts as absent and its way is taken by the next new
 * connection of the set; with every way of the set alive, the one that
 * expires first gives way (the role LRU plays in a hash map). User space
 * frees expired ways too (ciliate.datapath.conntrack.gc()).
 *
 * Time is jiffies: bpf_jiffies64() is inlined into one load, where even
 * the coarse clock is a helper call (measured: 0.15x of the local
 * delivery path). Deadlines are in jiffies, lifetimes seconds * CONFIG_HZ
 * (read by libbpf from the kernel config); user space reads both from
 * /proc (ciliate.datapath.conntrack).
 *
 * Concurrency: ways are written in place by any CPU. A reader racing with
 * a writer of the same way may see a mix of old and new fields; the
 * writer stores the key last, after a compiler barrier, so a matching key
 * comes with its fields (the JIT keeps the store order, x86 does not
 * reorder stores), and a torn key matches nothing: the packet is judged as
 * a new connection.
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

/* Ticks per second, resolved by libbpf at load (/proc/config.gz). */
extern const unsigned int CONFIG_HZ __kconfig;

_Static_assert((CILIATE_SIZE_CT_SETS & (CILIATE_SIZE_CT_SETS - 1)) == 0,
	       "bpf/datapath.toml sizes.ct_sets must be a power of 2");

#define ct_barrier() asm volatile("" ::: "memory")

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

/* The set of a key: a multiplicative hash of the tuple (no seed: the
 * table outlives the agent that loads the programs). */
static __always_inline struct ciliate_ct_set *ct_set_of(const struct ciliate_ct_key *key)
{
	__u64 h = ((__u64)key->addr_lo << 32 | key->addr_hi) * 0x9e3779b97f4a7c15ULL;
	__u32 index;

	h ^= ((__u64)key->protocol << 32 | (__u32)key->port_lo << 16 | key->port_hi) *
	     0xc2b2ae3d27d4eb4fULL;
	index = (__u32)(h >> 32) & (CILIATE_SIZE_CT_SETS - 1);
	return bpf_map_lookup_elem(&ciliate_ct, &index);
}

/* Keys compare as two 64-bit words (the key is 16 bytes, 8-aligned in the
 * entry; callers keep theirs 8-aligned on the stack). */
static __always_inline bool ct_key_equal(const struct ciliate_ct_key *a,
					 const struct ciliate_ct_key *b)
{
	const __u64 *x = (const __u64 *)a;
	const __u64 *y = (const __u64 *)b;

	return ((x[0] ^ y[0]) | (x[1] ^ y[1])) == 0;
}

/* The live entry of the packet's connection in its set, or NULL. */
static __always_inline struct ciliate_ct_entry *ct_lookup(struct ciliate_ct_set *set,
							  const struct ciliate_ct_key *key,
							  __u64 now)
{
#pragma unroll
	for (int i = 0; i < CILIATE_CT_WAYS; i++) {
		struct ciliate_ct_entry *entry = &set->way[i];

		if (ct_key_equal(&entry->key, key))
			return entry->expires > now ? entry : NULL;
	}
	return NULL;
}

/* Forget a connection: its way is free again. */
static __always_inline void ct_delete(struct ciliate_ct_entry *entry)
{
	__u64 *words = (__u64 *)&entry->key;

	words[0] = 0;
	words[1] = 0;
}

/* Whether this TCP packet opens a new connection over a closing entry of
 * the same tuple (a port reused right after close). */
static __always_inline bool ct_reopens(const struct ciliate_ct_entry *entry,
				       const struct ct_packet *pkt)
{
	return pkt->protocol == IPPROTO_TCP && (entry->flags & CILIATE_CT_F_CLOSING) &&
	       (pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

/* Lifetime in jiffies. */
static __always_inline __u64 ct_lifetime(__u8 protocol, __u32 flags)
{
	__u64 seconds;

	if (protocol != IPPROTO_TCP)
		seconds = CILIATE_CT_LIFETIME_NONTCP;
	else if (flags & CILIATE_CT_F_CLOSING)
		seconds = CILIATE_CT_LIFETIME_CLOSE;
	else if (flags & CILIATE_CT_F_SEEN_REPLY)
		seconds = CILIATE_CT_LIFETIME_TCP;
	else
		seconds = CILIATE_CT_LIFETIME_SYN;
	return seconds * CONFIG_HZ;
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
	__u64 expires;

	/* Write only what changed: most packets change nothing but the
	 * deadline, and that only once per tick; a clean cache line stays
	 * shared between the CPUs of a flow's two directions. */
	if (flags != entry->flags) {
		entry->flags = flags;
		entry->lifetime = ct_lifetime(pkt->protocol, flags);
	}
	expires = now + entry->lifetime;
	if (expires != entry->expires)
		entry->expires = expires;
}

/* The way a new connection takes: the key's own (a dead entry of the same
 * tuple), else a free or expired way, else the way that expires first. */
static __always_inline struct ciliate_ct_entry *ct_victim(struct ciliate_ct_set *set,
							  const struct ciliate_ct_key *key,
							  __u64 now)
{
	struct ciliate_ct_entry *victim = &set->way[0];

#pragma unroll
	for (int i = 0; i < CILIATE_CT_WAYS; i++) {
		struct ciliate_ct_entry *entry = &set->way[i];

		if (ct_key_equal(&entry->key, key) || entry->expires <= now)
			return entry;
		if (entry->expires < victim->expires)
			victim = entry;
	}
	return victim;
}

/* A new connection in `entry` (a reopened connection's own way, or the
 * set's victim), all but its verification and its key: the caller sets
 * those, then publishes it with ct_publish(). */
static __always_inline void ct_init(struct ciliate_ct_entry *entry, const struct ct_packet *pkt,
				    bool from_hi, __u64 now)
{
	__u32 flags = ct_flags_after(from_hi ? CILIATE_CT_F_ORIG_HI : 0, pkt, false);

	entry->flags = flags;
	entry->lifetime = ct_lifetime(pkt->protocol, flags);
	entry->expires = now + entry->lifetime;
}

/* The key last, after the fields: see the concurrency note above. */
static __always_inline void ct_publish(struct ciliate_ct_entry *entry,
				       const struct ciliate_ct_key *key)
{
	const __u64 *src = (const __u64 *)key;
	__u64 *dst = (__u64 *)&entry->key;

	ct_barrier();
	dst[0] = src[0];
	dst[1] = src[1];
}

#endif /* CILIATE_CONNTRACK_H */
