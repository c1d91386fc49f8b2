/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The datapath ABI: every map key and value, event record and numbered
 * table that the BPF programs share with user space, declared once.
 *
 * Python reads this very file through cffi (ciliate.datapath.abi), so it
 * stays in the subset both sides parse: fixed-width __uN fields, explicit
 * padding (no packed attribute), enums with explicit values, integer
 * #defines, comments. A trailing comment on an enumerator is its
 * human-readable text in `ciliate monitor` and the metrics tables.
 *
 * Numbers are never reused: a retired reason stays in the table, marked
 * unused. A layout change gets a new map name (ciliate_<thing>_v2).
 */
#ifndef CILIATE_ABI_H
#define CILIATE_ABI_H

#define CILIATE_EVENT_CAPTURE_LEN 64
#define CILIATE_METRICS_DIRECTIONS 2
#define CILIATE_METRICS_REASONS 256

/* Why a packet was dropped; 0 is not a drop. Codes start at 130 like
 * Cilium's so they never look like a kernel errno. */
enum ciliate_drop_reason {
	CILIATE_FORWARDED = 0,                  /* forwarded */
	CILIATE_FORWARDED_SOCKET = 1,           /* forwarded socket to socket (TCP between local pods) */
	CILIATE_DROP_INVALID_SMAC = 130,        /* source MAC is not the endpoint's */
	CILIATE_DROP_INVALID_SIP = 131,         /* source IP is not the endpoint's */
	CILIATE_DROP_TTL_EXCEEDED = 132,        /* TTL expired on the way to a pod */
	CILIATE_DROP_UNKNOWN_L3 = 133,          /* unsupported ethertype */
	CILIATE_DROP_TRUNCATED = 134,           /* packet shorter than its headers */
	CILIATE_DROP_INVALID_IP_HEADER = 135,   /* IPv4 header length or version invalid */
	CILIATE_DROP_UNKNOWN_ENDPOINT = 136,    /* destination in the node's pod CIDR has no endpoint */
	CILIATE_DROP_NO_ENDPOINT_FOR_IFINDEX = 137, /* packet on a pod veth with no endpoint record */
	CILIATE_DROP_INVALID_ARP = 138,         /* ARP that is not Ethernet/IPv4 */
	CILIATE_DROP_REDIRECT_FAILED = 139,     /* redirect helper refused the target */
};

/* Where a forwarded packet went (trace events). */
enum ciliate_trace_point {
	CILIATE_TRACE_TO_POD = 1,       /* redirected into a local pod */
	CILIATE_TRACE_TO_STACK = 2,     /* handed to the node's stack */
	CILIATE_TRACE_TO_REMOTE = 3,    /* handed to the stack toward the owning node */
	CILIATE_TRACE_ARP_REPLY = 4,    /* ARP reply sent back to the pod */
	CILIATE_TRACE_DELIVERED = 5,    /* delivered into the pod (to-container) */
};

/* Direction relative to the pod; indexes the metrics map. */
enum ciliate_direction {
	CILIATE_DIR_INGRESS = 0,        /* toward a pod */
	CILIATE_DIR_EGRESS = 1,         /* from a pod */
};

enum ciliate_event_type {
	CILIATE_EVENT_DROP = 1,
	CILIATE_EVENT_TRACE = 2,
};

/* Source files that can raise a drop; events carry the id and the line.
 * Each id maps to a file name: enumerator name lowercased, the last '_'
 * turned into '.', prefix dropped (CILIATE_SRC_BPF_LXC_C is bpf_lxc.c). */
enum ciliate_source {
	CILIATE_SRC_UNKNOWN = 0,
	CILIATE_SRC_BPF_LXC_C = 1,
	CILIATE_SRC_BPF_HOST_C = 2,
	CILIATE_SRC_BPF_UPLINK_C = 3,
	CILIATE_SRC_ETH_H = 4,
	CILIATE_SRC_IPV4_H = 5,
	CILIATE_SRC_ARP_H = 6,
	CILIATE_SRC_LXC_H = 7,
	CILIATE_SRC_FORWARD_H = 8,
};

/* ciliate_ipcache (LPM trie): prefix -> who owns it. */
struct ciliate_ipcache_key {
	__u32 prefixlen;        /* LPM trie keys start with the prefix length */
	__u32 addr;             /* IPv4, network byte order */
};

#define CILIATE_IPCACHE_F_LOCAL 1      /* a pod CIDR of this node */

struct ciliate_ipcache_value {
	__u32 identity;
	__u32 node_ip;          /* owner node, network byte order; 0 = this node */
	__u32 flags;            /* CILIATE_IPCACHE_F_* */
	__u32 pad;
};

/*
 * The value of both endpoint maps, which are arrays (a hash lookup costs
 * more than the rest of the fast path together):
 *   ciliate_ep_ip:  endpoint slot -> endpoint, where the slot is the pod
 *                   IP's position in the node's pod CIDRs (endpoint_slot());
 *   ciliate_ep_dev: host-side veth ifindex -> endpoint; the agent creates
 *                   pod veths with ifindexes below the map's size.
 * A slot whose ifindex is 0 is empty.
 */
struct ciliate_endpoint {
	__u32 ifindex;          /* host-side veth (lxc...); 0 = empty slot */
	__u32 ipv4;             /* pod IPv4, network byte order */
	__u32 identity;
	__u16 endpoint_id;
	__u16 flags;
	__u8 mac[6];            /* the pod's eth0 */
	__u8 node_mac[6];       /* the host-side veth: the pod's gateway MAC */
};

/* ciliate_sockhash: the TCP sockets of local pods talking to each other,
 * by their 4-tuple as the socket sees it. */
struct ciliate_sock_key {
	__u32 local_ip;         /* network byte order */
	__u32 remote_ip;        /* network byte order */
	__u32 local_port;       /* host byte order */
	__u32 remote_port;      /* host byte order */
};

/* ciliate_sock_state (socket storage): how a pod socket sends. */
#define CILIATE_SOCK_F_STACK 1  /* sticks to the TCP stack: its first bytes went that way */

struct ciliate_sock_state {
	__u32 flags;
	__u32 pad;
};

/* ciliate_metrics (per-CPU array): index reason * 2 + direction. */
struct ciliate_metrics_value {
	__u64 packets;
	__u64 bytes;
};

/* ciliate_config (array, one entry): knobs that change at run time. */
#define CILIATE_CONFIG_F_TRACE 1        /* send a trace event for every forwarded packet */

struct ciliate_runtime_config {
	__u32 flags;
	__u32 pad;
};

/* ciliate_events (ring buffer): one record per drop or trace. */
struct ciliate_event {
	__u8 type;              /* enum ciliate_event_type */
	__u8 reason;            /* drop reason or trace point */
	__u8 direction;         /* enum ciliate_direction */
	__u8 source;            /* enum ciliate_source of the drop site */
	__u16 line;             /* line of the drop site */
	__u16 cap_len;          /* bytes of the packet copied into data */
	__u32 ifindex;          /* device the program runs on */
	__u32 target_ifindex;   /* redirect target, 0 if none */
	__u32 orig_len;         /* packet length */
	__u32 pad;
	__u64 ktime_ns;
	__u8 data[64];          /* CILIATE_EVENT_CAPTURE_LEN: packet start */
};

#endif /* CILIATE_ABI_H */
