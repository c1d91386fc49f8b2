// SPDX-License-Identifier: GPL-2.0
/* A connect4 hook for the sock_addr attach tests: connect() to port 9
 * fails with EHOSTUNREACH (an errno the kernel itself would not give for
 * loopback), everything else proceeds. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define EHOSTUNREACH 113

SEC("cgroup/connect4")
int refuse_discard(struct bpf_sock_addr *ctx)
{
	if (ctx->user_port == bpf_htons(9)) {
		bpf_set_retval(-EHOSTUNREACH);
		return 0;
	}
	return 1;
}

SEC("tc")
int not_a_hook(struct __sk_buff *skb)
{
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
