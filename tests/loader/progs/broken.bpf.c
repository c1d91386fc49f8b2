// SPDX-License-Identifier: GPL-2.0
/* Deliberately rejected by the verifier: reads a packet byte without
 * checking it against data_end. The first program is fine, so the loader
 * must name the right one. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

SEC("tc")
int accept_all(struct __sk_buff *skb)
{
	return 0;
}

SEC("tc")
int bad_read(struct __sk_buff *skb)
{
	__u8 *pkt = (void *)(long)skb->data;

	return pkt[12] == 0x08 ? 2 : 0; /* BROKEN: no bounds check */
}

char LICENSE[] SEC("license") = "GPL";
