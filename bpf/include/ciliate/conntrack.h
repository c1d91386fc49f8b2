/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Connection tracker: one ciliate_ct_v2 entry per connection, keyed by the
 * tuple of the packet that opened it and found from both directions (a
 * packet whose tuple matches the key reversed is a reply). Used by the
 * policy stage only (policy.h): a packet of a known, live connection skips
 * the policy lookups, unless the policy of one of its local ends changed
 * since the connection was verified. Besides its own packets, a
 * connection's ICMP errors (destination unreachable, time exceeded,
 * parameter problem quoting one of its packets) are RELATED to it, as in
 * Linux's and Cilium's trackers, and the later fragments of a fragmented
 * datagram are tracked with the ports of its first (ciliate_frag).
 *
 * The table is set-associative (abi.h): a tuple hashes to a set of
 * CILIATE_CT_WAYS entries, the same set from either direction (the hash is
 * symmetric). Garbage collection is built in: an entry past its lifetime
 * counts as absent and its way is taken by the next new connection of the
 * set; with every way of the set alive, the one that expires first gives
 * way (the role LRU plays in a hash map). User space frees expired ways
 * too (ciliate.datapath.conntrack.gc()).
 *
 * The established path is short on purpose (bench datapath): the tuple is
 * two 64-bit words loaded straight from the headers, one multiply finds the
 * set, and a way matches with two compares; the ways are searched for the
 * tuple first and for its reverse (a few shifts) only then, so the
 * opener's packets never make it; the verification stamp (both ends'
 * policy revisions and identities) is two 64-bit compares.
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
#define ICMP_DEST_UNREACH 3
#define ICMP_ECHO 8
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

/* iphdr.frag_off, host order: more fragments, fragment offset. */
#define CT_IP_MF 0x2000
#define CT_IP_OFFSET 0x1fff

/* Ticks per second, resolved by libbpf at load (/proc/config.gz). */
extern const unsigned int CONFIG_HZ __kconfig;

_Static_assert((CILIATE_SIZE_CT_SETS & (CILIATE_SIZE_CT_SETS - 1)) == 0 &&
		       CILIATE_SIZE_CT_SETS >= 2,
	       "bpf/datapath.toml sizes.ct_sets must be a power of 2, at least 2");
/* The tuple words mirror struct ciliate_ct_key in memory (little endian). */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "ct_tuple assumes little endian");

#define ct_barrier() asm volatile("" ::: "memory")

/*
 * A connection's key seen from one packet, as the two 64-bit words of
 * struct ciliate_ct_key: both addresses (as they sit in the IPv4 header)
 * and the ports with the protocol (as they sit in the L4 header).
 */
struct ct_tuple {
	__u64 addrs;            /* saddr | daddr << 32 */
	__u64 l4;               /* sport | dport << 16 | protocol << 32 */
};

static __always_inline __u16 ct_sport(const struct ct_tuple *t)
{
	return (__u16)t->l4;
}

static __always_inline __u16 ct_dport(const struct ct_tuple *t)
{
	return (__u16)(t->l4 >> 16);
}

static __always_inline __u8 ct_protocol(const struct ct_tuple *t)
{
	return (__u8)(t->l4 >> 32);
}

/* The other direction's addresses and ports: swapped halves. */
static __always_inline __u64 ct_reverse_addrs(__u64 addrs)
{
	return addrs << 32 | addrs >> 32;
}

static __always_inline __u64 ct_reverse_l4(__u64 l4)
{
	return (l4 & 0xffffffff00000000ULL) | (l4 & 0xffff) << 16 | ((l4 >> 16) & 0xffff);
}

/* The packet as the tracker and the policy see it. */
struct ct_packet {
	struct ct_tuple tuple;  /* its own; for a related ICMP error, the packet it quotes */
	__u8 protocol;          /* of the packet itself (ICMP for a related error) */
	__u8 tcp_flags;
	bool trackable;         /* tuple names a connection: TCP, UDP, SCTP, ICMP echo (fragments too) */
	bool related;           /* an ICMP error about the connection of tuple */
};

/* saddr and daddr, adjacent in the header, in one load. Written as the
 * instruction itself: clang would split a plain load in two (the header is
 * only 4-byte aligned; x86 takes it unaligned), and an opaque pointer cost
 * three instructions more. Volatile: each use loads again (after a map
 * lookup, a load is cheaper than keeping the value across it). The caller
 * has bounds-checked the header (the verifier holds it to that). */
static __always_inline __u64 ct_load_addrs(const struct iphdr *ip)
{
	__u64 addrs;

	asm volatile("%[addrs] = *(u64 *)(%[ip] + 12)" : [addrs] "=r"(addrs) : [ip] "r"(ip));
	return addrs;
}

/* The tuple of a TCP, UDP or SCTP packet whose ports the caller has
 * bounds-checked at `l4`. */
static __always_inline struct ct_tuple ct_tuple_of(const struct iphdr *ip, const __u8 *l4)
{
	struct ct_tuple t = {
		.addrs = ct_load_addrs(ip),
		.l4 = (__u64)ip->protocol << 32 | *(const __u32 *)l4,
	};

	return t;
}

/*
 * An ICMP error quoting the IPv4 header and first 8 bytes (RFC 792) of a
 * packet: related to that packet's connection. As Linux does
 * (nf_conntrack_inet_error), the error must go back to the quoted packet's
 * sender; the error may come from that packet's destination or from a
 * router on the way. Anything else (too short, a quoted later fragment,
 * another protocol) stays a plain ICMP packet, judged alone.
 */
static __always_inline int ct_parse_icmp_error(struct __sk_buff *ctx, const struct iphdr *ip,
					       const __u8 *icmp, struct ct_packet *pkt)
{
	void *data_end = (void *)(long)ctx->data_end;
	const struct iphdr *quoted = (const struct iphdr *)(icmp + 8);
	const __u8 *quoted_l4;
	__u64 l4;

	if ((void *)(quoted + 1) > data_end)
		return TC_ACT_OK;
	if (quoted->version != 4 || quoted->ihl < 5 ||
	    (quoted->frag_off & bpf_htons(CT_IP_OFFSET)) || quoted->saddr != ip->daddr)
		return TC_ACT_OK;
	quoted_l4 = (const __u8 *)quoted + ((quoted->ihl & 0xf) << 2);
	if ((void *)(quoted_l4 + 8) > data_end)
		return TC_ACT_OK;
	switch (quoted->protocol) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		l4 = *(const __u32 *)quoted_l4;
		break;
	case IPPROTO_ICMP:
		if (quoted_l4[0] == ICMP_ECHO)
			l4 = *(const __u16 *)(quoted_l4 + 4);
		else if (quoted_l4[0] == ICMP_ECHOREPLY)
			l4 = (__u32) * (const __u16 *)(quoted_l4 + 4) << 16;
		else
			return TC_ACT_OK;
		break;
	default:
		return TC_ACT_OK;
	}
	pkt->tuple.addrs = ct_load_addrs(quoted);
	pkt->tuple.l4 = (__u64)quoted->protocol << 32 | l4;
	pkt->trackable = true;
	pkt->related = true;
	return TC_ACT_OK;
}

/*
 * The L4 part of the tuple: ports (TCP, UDP, SCTP) or the ICMP echo id (as
 * the source port of a request, the destination port of a reply); other
 * ICMP types are judged with port 0 and not tracked, except errors that
 * quote a packet (ct_parse_icmp_error()).
 */
static __always_inline int ct_parse_l4(struct __sk_buff *ctx, const struct iphdr *ip,
				       const __u8 *l4, struct ct_packet *pkt)
{
	void *data_end = (void *)(long)ctx->data_end;

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
		pkt->tuple.l4 |= *(const __u32 *)l4;
		pkt->trackable = true;
		return TC_ACT_OK;
	case IPPROTO_ICMP:
		if ((void *)(l4 + 8) > data_end)
			return DROP(CILIATE_DROP_TRUNCATED);
		switch (l4[0]) {
		case ICMP_ECHO:
			pkt->tuple.l4 |= *(const __u16 *)(l4 + 4);
			pkt->trackable = true;
			return TC_ACT_OK;
		case ICMP_ECHOREPLY:
			pkt->tuple.l4 |= (__u32) * (const __u16 *)(l4 + 4) << 16;
			pkt->trackable = true;
			return TC_ACT_OK;
		case ICMP_DEST_UNREACH:
		case ICMP_TIME_EXCEEDED:
		case ICMP_PARAMETERPROB:
			return ct_parse_icmp_error(ctx, ip, l4, pkt);
		default:
			return TC_ACT_OK;
		}
	default:
		return TC_ACT_OK;
	}
}

/* The datagram a fragment belongs to (ciliate_frag). */
static __always_inline void ct_frag_key(const struct iphdr *ip, struct ciliate_frag_key *key)
{
	key->saddr = ip->saddr;
	key->daddr = ip->daddr;
	key->id = ip->id;
	key->protocol = ip->protocol;
	key->pad = 0;
}

/*
 * A fragment: the first carries the L4 header and records its ports for
 * the others; a later one takes the ports its first fragment recorded.
 * A later fragment whose first was never seen here (lost, reordered, or
 * the record pushed out of the LRU) carries no ports: it is judged with
 * port 0, as any untracked packet, so only rules for any port let it
 * pass. Fragments arrive here one by one: nothing is reassembled.
 */
static __always_inline int ct_parse_fragment(struct __sk_buff *ctx, const struct iphdr *ip,
					     const __u8 *l4, struct ct_packet *pkt)
{
	struct ciliate_frag_key key;
	struct ciliate_frag_ports *ports;
	struct ciliate_frag_ports first;
	int ret;

	ct_frag_key(ip, &key);
	if (ip->frag_off & bpf_htons(CT_IP_OFFSET)) {
		ports = bpf_map_lookup_elem(&ciliate_frag, &key);
		if (ports) {
			pkt->tuple.l4 |= (__u32)ports->dport << 16 | ports->sport;
			pkt->trackable = true;
		}
		return TC_ACT_OK;
	}
	ret = ct_parse_l4(ctx, ip, l4, pkt);
	if (IS_DROP(ret) || !pkt->trackable || pkt->related)
		return ret;
	first.sport = ct_sport(&pkt->tuple);
	first.dport = ct_dport(&pkt->tuple);
	/* A full LRU map makes room: the update fails only without memory,
	 * and then the later fragments are judged without ports. */
	bpf_map_update_elem(&ciliate_frag, &key, &first, BPF_ANY);
	return TC_ACT_OK;
}

/* The tuple, TCP flags and whether the packet belongs to a connection. */
static __always_inline int ct_parse(struct __sk_buff *ctx, const struct iphdr *ip,
				    struct ct_packet *pkt)
{
	/* ihl was checked by ipv4_parse(); the mask tells the verifier its range. */
	const __u8 *l4 = (const __u8 *)ip + ((ip->ihl & 0xf) << 2);

	pkt->tuple.addrs = ct_load_addrs(ip);
	pkt->tuple.l4 = (__u64)ip->protocol << 32;
	pkt->protocol = ip->protocol;
	pkt->tcp_flags = 0;
	pkt->trackable = false;
	pkt->related = false;
	if (ip->frag_off & bpf_htons(CT_IP_MF | CT_IP_OFFSET))
		return ct_parse_fragment(ctx, ip, l4, pkt);
	return ct_parse_l4(ctx, ip, l4, pkt);
}

/*
 * The set of a tuple: a multiplicative hash, symmetric in the two ends (so
 * a reply finds the set of its connection), its top bits the index. No
 * seed: the table outlives the agent that loads the programs.
 */
static __always_inline struct ciliate_ct_set *ct_set_of(struct ct_tuple t)
{
	__u64 addrs = (__u32)t.addrs ^ (__u32)(t.addrs >> 32);
	__u64 ports = ((__u32)t.l4 ^ ((__u32)t.l4 >> 16)) & 0xffff;
	__u64 h = (addrs << 32 | ports << 8 | ct_protocol(&t)) * 0x9e3779b97f4a7c15ULL;
	__u32 index = h >> (64 - __builtin_ctzll(CILIATE_SIZE_CT_SETS));

	return bpf_map_lookup_elem(&ciliate_ct_v2, &index);
}

/* The way whose key is exactly `key` (two words as struct ct_tuple), or
 * NULL. */
static __always_inline struct ciliate_ct_entry *ct_find(struct ciliate_ct_set *set, __u64 addrs,
							__u64 l4)
{
#pragma unroll
	for (int i = 0; i < CILIATE_CT_WAYS; i++) {
		const __u64 *key = (const __u64 *)&set->way[i].key;

		if (key[0] == addrs && key[1] == l4)
			return &set->way[i];
	}
	return NULL;
}

/* The way of the tuple's connection in its set (live or expired), or
 * NULL; *reply: the tuple is the key reversed (the packet goes from the
 * connection's other end to its opener). The ways are searched for the
 * tuple, then for its reverse, so the opener's packets never make the
 * reverse. A connection is opened only when neither orientation is in its
 * set; should both be (two CPUs opening it from both ends at once), each
 * direction finds its own. */
static __always_inline struct ciliate_ct_entry *ct_lookup(struct ciliate_ct_set *set,
							  const struct ct_tuple *t, bool *reply)
{
	struct ciliate_ct_entry *entry = ct_find(set, t->addrs, t->l4);

	*reply = false;
	if (entry)
		return entry;
	*reply = true;
	return ct_find(set, ct_reverse_addrs(t->addrs), ct_reverse_l4(t->l4));
}

static __always_inline bool ct_alive(const struct ciliate_ct_entry *entry, __u64 now)
{
	return entry->expires > now;
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
	return (entry->flags & CILIATE_CT_F_CLOSING) && pkt->protocol == IPPROTO_TCP &&
	       (pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

/* Whether a packet of a live connection moves its state by its direction
 * alone (a first reply; a closing entry, which a SYN may reopen). FIN and
 * RST the caller checks. */
static __always_inline bool ct_changes_state(const struct ciliate_ct_entry *entry, bool reply)
{
	__u32 want = reply ? CILIATE_CT_F_SEEN_REPLY : 0;

	return (entry->flags & (CILIATE_CT_F_CLOSING | want)) != want;
}

/* A packet that leaves the state as it is: only the deadline moves (its
 * store skipped when unchanged, see ct_refresh()). */
static __always_inline void ct_keep_alive(struct ciliate_ct_entry *entry, __u64 now)
{
	__u64 expires = now + entry->lifetime;

	if (expires != entry->expires)
		entry->expires = expires;
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

/* The way a new connection takes when its tuple has none: a free or
 * expired way, else the way that expires first. */
static __always_inline struct ciliate_ct_entry *ct_victim(struct ciliate_ct_set *set, __u64 now)
{
	struct ciliate_ct_entry *victim = &set->way[0];

#pragma unroll
	for (int i = 0; i < CILIATE_CT_WAYS; i++) {
		struct ciliate_ct_entry *entry = &set->way[i];

		if (entry->expires <= now)
			return entry;
		if (entry->expires < victim->expires)
			victim = entry;
	}
	return victim;
}

/* A new connection in `entry` (its tuple's own way, expired or reopened,
 * or the set's victim), all but its verification and its key: the caller
 * sets those, then publishes it with ct_publish(). */
static __always_inline void ct_init(struct ciliate_ct_entry *entry, const struct ct_packet *pkt,
				    __u64 now)
{
	__u32 flags = ct_flags_after(0, pkt, false);

	entry->flags = flags;
	entry->lifetime = ct_lifetime(pkt->protocol, flags);
	entry->expires = now + entry->lifetime;
}

/* The key last, after the fields: see the concurrency note above. */
static __always_inline void ct_publish(struct ciliate_ct_entry *entry, const struct ct_tuple *t)
{
	__u64 *key = (__u64 *)&entry->key;

	ct_barrier();
	key[0] = t->addrs;
	key[1] = t->l4;
}

#endif /* CILIATE_CONNTRACK_H */
