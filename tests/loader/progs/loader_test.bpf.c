// SPDX-License-Identifier: GPL-2.0
/* Test program for ciliate.loader: one map of each kind the loader handles
 * specially and a tc classifier whose verdict depends on a .rodata global and
 * on a hash map entry. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#define ETH_HLEN 14

struct lpm_v4_key {
	__u32 prefixlen;
	__u8 addr[4];
};

/* A record sent to user space through the ring buffer; its BTF layout is
 * checked by the tests. */
struct flow_event {
	__u32 ifindex;
	__u32 len;
	__u8 key;
	__u8 rewritten;
	__u16 proto;
	__s32 verdict;
	__u64 seq;
	union {
		__u32 mark;
		__u8 mark_bytes[4];
	};
	char tag[6];
};

/* Local variable types are not emitted into BTF: anchor the record type. */
struct flow_event *flow_event_btf_anchor __attribute__((unused));

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} verdicts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 64);
	__type(key, struct lpm_v4_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} prefixes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} events SEC(".maps");

/* Pinned by name under the pin root given to BpfObject.open(pin_root=...). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} shared_cfg SEC(".maps");

/* .rodata: fixed at load time by BpfObject.set_rodata(). */
const volatile __u32 default_verdict = TC_ACT_OK;
const volatile __u8 rewrite_byte = 0xab;
const volatile char event_tag[6] = "ciliat";

/* .data / .bss: runtime knobs read and written through the map. */
__u32 rewrite_offset = 1;
__u64 event_seq = 0;

SEC("tc")
int classify(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u8 *pkt = data;
	__u32 zero = 0, key, off;
	__u32 *override;
	__u64 *count;
	__s32 verdict = default_verdict;
	struct flow_event *e;

	if (data + ETH_HLEN > data_end)
		return TC_ACT_SHOT;

	key = pkt[0];
	override = bpf_map_lookup_elem(&verdicts, &key);
	if (override)
		verdict = *override;

	count = bpf_map_lookup_elem(&counters, &zero);
	if (count)
		*count += 1;

	off = rewrite_offset;
	if (off < ETH_HLEN) {
		__u8 *target = pkt + (off & 0xf);

		if ((void *)(target + 1) <= data_end)
			*target = rewrite_byte;
	}

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (e) {
		e->ifindex = skb->ifindex;
		e->len = skb->len;
		e->key = key;
		e->rewritten = rewrite_byte;
		e->proto = skb->protocol;
		e->verdict = verdict;
		e->seq = __sync_fetch_and_add(&event_seq, 1);
		e->mark = skb->mark;
		__builtin_memcpy(e->tag, (const void *)event_tag, sizeof(e->tag));
		bpf_ringbuf_submit(e, 0);
	}
	return verdict;
}

char LICENSE[] SEC("license") = "GPL";
