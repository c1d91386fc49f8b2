/*
 * ciliate-cni: the CNI plugin executable the container runtime runs.
 *
 * It only relays. Every CNI semantic (validation, spec versions, result
 * formats, error codes) lives in the agent (ciliate.control.cni.handler);
 * this program exists because a Python interpreter alone takes longer to
 * start than the reference Go plugin takes for a whole ADD.
 *
 * One invocation:
 *
 *   1. read the netconf from stdin (at most 1 MiB) and the CNI_* variables;
 *   2. CNI_COMMAND=VERSION is answered here, without the agent;
 *   3. find the agent socket: the netconf's top-level "agentSocket" string,
 *      else DEFAULT_SOCKET (the agent's default, passed in by CMake);
 *   4. send one request over that UNIX socket
 *
 *        POST /v1/cni HTTP/1.1
 *        Host: ciliate-agent
 *        Content-Type: application/json
 *        Content-Length: N
 *        Connection: close
 *
 *        {"env": {"CNI_COMMAND": "...", ...}, "stdin": "<netconf as a JSON string>"}
 *
 *      ("env" holds the CNI_* variables that are set, empty ones included);
 *   5. the agent answers 200 with {"exit_code": <int>, "stdout": "<text>"}:
 *      write stdout verbatim and exit with exit_code. Any other status is
 *      CNI error 999 naming the status.
 *
 * When the agent is not reachable (connect fails with ENOENT or
 * ECONNREFUSED):
 *
 *   DEL     never fails: the request body above is written atomically to
 *           <dirname(socket)>/cni-del-queue/<CNI_CONTAINERID>-<CNI_IFNAME>.json
 *           for the agent to replay when it starts; nothing is printed.
 *   STATUS  CNI error 50 (plugin not available).
 *   others  CNI error 11 (try again later).
 *
 * except that a netconf whose cniVersion ciliate does not speak, or one
 * older than the command (CHECK: 0.4.0; GC, STATUS: 1.1.0), is CNI error 1
 * either way, as the agent would answer.
 *
 * Errors are CNI error JSON on stdout and exit status 1. The timeouts are
 * overall limits for connect + request + answer, per command (ADD, CHECK,
 * DEL 30 s; GC 120 s; STATUS 5 s); CILIATE_CNI_TIMEOUT_MS overrides them
 * (tests, debugging).
 *
 * The JSON scanner (json_* below) is deliberately small. It walks the
 * top-level object of the netconf for two string keys ("cniVersion",
 * "agentSocket") and the agent's answer for "exit_code" and "stdout". It
 * decodes strings fully (escapes, \u surrogate pairs to UTF-8) and skips
 * nested values by tracking strings and bracket depth without checking that
 * brackets pair up or that scalars are well formed: it does not validate
 * JSON, the agent does. When a key appears twice the last one wins, as in
 * Python's json module. A netconf the scanner cannot walk as an object is
 * reported here as a decoding error (code 6): without it there is no
 * telling which agent to ask.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* The default socket is DEFAULT_AGENT_SOCKET in control/cni/defaults.py;
 * CMake passes it, so the relay and the agent cannot disagree. */
#ifndef CILIATE_DEFAULT_AGENT_SOCKET
#error "define CILIATE_DEFAULT_AGENT_SOCKET (CMake reads it from control/cni/defaults.py)"
#endif
#define DEFAULT_SOCKET CILIATE_DEFAULT_AGENT_SOCKET
#define QUEUE_DIR_NAME "cni-del-queue"
#define LATEST_VERSION "1.1.0"
#define MAX_STDIN (1024 * 1024)
#define MAX_ANSWER (8 * 1024 * 1024)
/* Longest container ID that still makes a queue file name under NAME_MAX
 * (with "-", a 15-byte ifname, ".json" and the temporary name's decoration). */
#define MAX_QUEUED_CONTAINER_ID 200

/* CNI well-known error codes (SPEC.md, "Error codes"). */
enum {
	CNI_ERR_VERSION = 1,
	CNI_ERR_IO = 5,
	CNI_ERR_DECODE = 6,
	CNI_ERR_ENV = 4,
	CNI_ERR_NETCONF = 7,
	CNI_ERR_TRY_AGAIN = 11,
	CNI_ERR_NOT_AVAILABLE = 50,
	CNI_ERR_INTERNAL = 999,
};

/* Oldest first (COMMANDS[].since indexes it); the handler's list, which a
 * test compares. */
static const char *const SUPPORTED_VERSIONS[] = {"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"};
_Static_assert(sizeof(SUPPORTED_VERSIONS) / sizeof(SUPPORTED_VERSIONS[0]) == 5,
	       "the unreachable-agent message lists five versions");

static const char *const CNI_VARS[] = {
	"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH",
};

struct command {
	const char *name;
	int timeout_ms;
	size_t since; /* the first of SUPPORTED_VERSIONS that has the command */
};

static const struct command COMMANDS[] = {
	{"ADD", 30000, 0},    {"DEL", 30000, 0},    {"CHECK", 30000, 2},
	{"GC", 120000, 4},    {"STATUS", 5000, 4},  {"VERSION", 0, 0},
};

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* ------------------------------------------------------------------------ */
/* Growable byte buffers; every allocation failure ends the process.        */

struct buf {
	char *data;
	size_t len;
	size_t cap;
};

static void die_oom(void);

static void buf_reserve(struct buf *b, size_t extra)
{
	if (extra <= b->cap - b->len)
		return;
	if (extra > SIZE_MAX / 2 - b->len)
		die_oom();
	size_t cap = b->cap ? b->cap : 256;
	while (cap - b->len < extra)
		cap *= 2;
	char *data = realloc(b->data, cap);
	if (data == NULL)
		die_oom();
	b->data = data;
	b->cap = cap;
}

static void buf_add(struct buf *b, const void *data, size_t n)
{
	buf_reserve(b, n + 1);
	memcpy(b->data + b->len, data, n);
	b->len += n;
	b->data[b->len] = '\0'; /* always a C string too */
}

static void buf_str(struct buf *b, const char *s)
{
	buf_add(b, s, strlen(s));
}

static void buf_free(struct buf *b)
{
	free(b->data);
	b->data = NULL;
	b->len = b->cap = 0;
}

/* ------------------------------------------------------------------------ */
/* Output                                                                   */

static bool write_all(int fd, const char *data, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, data, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return false;
		}
		data += n;
		len -= (size_t)n;
	}
	return true;
}

/* Appends s (n bytes) as the inside of a JSON string. Bytes >= 0x80 are
 * copied: callers pass valid UTF-8 (see utf8_valid). */
static void json_escape(struct buf *out, const char *s, size_t n)
{
	static const char hex[] = "0123456789abcdef";
	size_t start = 0;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c >= 0x20 && c != '"' && c != '\\')
			continue;
		buf_add(out, s + start, i - start);
		start = i + 1;
		switch (c) {
		case '"': buf_add(out, "\\\"", 2); break;
		case '\\': buf_add(out, "\\\\", 2); break;
		case '\n': buf_add(out, "\\n", 2); break;
		case '\r': buf_add(out, "\\r", 2); break;
		case '\t': buf_add(out, "\\t", 2); break;
		case '\b': buf_add(out, "\\b", 2); break;
		case '\f': buf_add(out, "\\f", 2); break;
		default: {
			char u[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 0xf]};
			buf_add(out, u, sizeof(u));
		}
		}
	}
	buf_add(out, s + start, n - start);
}

/* The cniVersion that error and VERSION output carry: the netconf's when it
 * looks like a version (the spec: "the same value as provided by the
 * configuration", also one ciliate does not speak), else the latest. Set
 * once stdin has been scanned; the handler in the agent follows the same
 * rule (handler._echoed_version). */
static char g_version_given[24];
static const char *g_version = LATEST_VERSION;
/* The netconf's cniVersion among SUPPORTED_VERSIONS; -1: none ciliate speaks. */
static long g_version_index = -1;

static void cni_error(int code, const char *msg, const char *details)
{
	struct buf out = {0};
	char num[16];
	buf_str(&out, "{\"cniVersion\": \"");
	buf_str(&out, g_version);
	buf_str(&out, "\", \"code\": ");
	snprintf(num, sizeof(num), "%d", code);
	buf_str(&out, num);
	buf_str(&out, ", \"msg\": \"");
	json_escape(&out, msg, strlen(msg));
	buf_str(&out, "\"");
	if (details != NULL && details[0] != '\0') {
		buf_str(&out, ", \"details\": \"");
		json_escape(&out, details, strlen(details));
		buf_str(&out, "\"");
	}
	buf_str(&out, "}\n");
	(void)write_all(STDOUT_FILENO, out.data, out.len);
	buf_free(&out);
}

static void die_oom(void)
{
	static const char msg[] = "{\"cniVersion\": \"" LATEST_VERSION
				  "\", \"code\": 999, \"msg\": \"ciliate-cni: out of memory\"}\n";
	(void)write_all(STDOUT_FILENO, msg, sizeof(msg) - 1);
	_exit(1);
}

/* ------------------------------------------------------------------------ */
/* UTF-8                                                                    */

/* Strict UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF):
 * what Python's json module accepts. Returns the offset of the first bad
 * byte, or n when all is well. */
static size_t utf8_invalid_at(const unsigned char *s, size_t n)
{
	size_t i = 0;
	while (i < n) {
		unsigned char c = s[i];
		size_t len;
		unsigned char lo = 0x80, hi = 0xbf;
		if (c < 0x80) {
			i++;
			continue;
		} else if (c >= 0xc2 && c <= 0xdf) {
			len = 2;
		} else if (c >= 0xe0 && c <= 0xef) {
			len = 3;
			if (c == 0xe0)
				lo = 0xa0; /* overlong */
			else if (c == 0xed)
				hi = 0x9f; /* surrogates */
		} else if (c >= 0xf0 && c <= 0xf4) {
			len = 4;
			if (c == 0xf0)
				lo = 0x90; /* overlong */
			else if (c == 0xf4)
				hi = 0x8f; /* above U+10FFFF */
		} else {
			return i;
		}
		if (n - i < len)
			return i;
		if (s[i + 1] < lo || s[i + 1] > hi)
			return i;
		for (size_t k = 2; k < len; k++)
			if (s[i + k] < 0x80 || s[i + k] > 0xbf)
				return i;
		i += len;
	}
	return n;
}

static void utf8_put(struct buf *out, uint32_t cp)
{
	char b[4];
	size_t n;
	if (cp < 0x80) {
		b[0] = (char)cp;
		n = 1;
	} else if (cp < 0x800) {
		b[0] = (char)(0xc0 | (cp >> 6));
		b[1] = (char)(0x80 | (cp & 0x3f));
		n = 2;
	} else if (cp < 0x10000) {
		b[0] = (char)(0xe0 | (cp >> 12));
		b[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
		b[2] = (char)(0x80 | (cp & 0x3f));
		n = 3;
	} else {
		b[0] = (char)(0xf0 | (cp >> 18));
		b[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
		b[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
		b[3] = (char)(0x80 | (cp & 0x3f));
		n = 4;
	}
	buf_add(out, b, n);
}

/* ------------------------------------------------------------------------ */
/* The JSON scanner (see the limits in the header comment)                  */

struct scan {
	const char *p;
	const char *end;
};

static void json_ws(struct scan *s)
{
	while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
		s->p++;
}

/* At '"': moves past the closing quote. */
static bool json_skip_string(struct scan *s)
{
	for (s->p++; s->p < s->end; s->p++) {
		if (*s->p == '\\') {
			s->p++;
			if (s->p >= s->end)
				return false;
		} else if (*s->p == '"') {
			s->p++;
			return true;
		}
	}
	return false;
}

static bool json_hex4(struct scan *s, uint32_t *out)
{
	uint32_t v = 0;
	if (s->end - s->p < 4)
		return false;
	for (int i = 0; i < 4; i++) {
		char c = *s->p++;
		v <<= 4;
		if (c >= '0' && c <= '9')
			v |= (uint32_t)(c - '0');
		else if (c >= 'a' && c <= 'f')
			v |= (uint32_t)(c - 'a' + 10);
		else if (c >= 'A' && c <= 'F')
			v |= (uint32_t)(c - 'A' + 10);
		else
			return false;
	}
	*out = v;
	return true;
}

/* At '"': decodes the string into out (which may then hold NUL bytes). */
static bool json_string(struct scan *s, struct buf *out)
{
	out->len = 0;
	buf_reserve(out, 1);
	out->data[0] = '\0';
	s->p++;
	while (s->p < s->end) {
		const char *run = s->p;
		while (s->p < s->end && *s->p != '"' && *s->p != '\\' && (unsigned char)*s->p >= 0x20)
			s->p++;
		buf_add(out, run, (size_t)(s->p - run));
		if (s->p >= s->end || (unsigned char)*s->p < 0x20)
			return false;
		if (*s->p++ == '"')
			return true;
		if (s->p >= s->end)
			return false;
		char c = *s->p++;
		switch (c) {
		case '"': buf_add(out, "\"", 1); break;
		case '\\': buf_add(out, "\\", 1); break;
		case '/': buf_add(out, "/", 1); break;
		case 'b': buf_add(out, "\b", 1); break;
		case 'f': buf_add(out, "\f", 1); break;
		case 'n': buf_add(out, "\n", 1); break;
		case 'r': buf_add(out, "\r", 1); break;
		case 't': buf_add(out, "\t", 1); break;
		case 'u': {
			uint32_t cp, low;
			if (!json_hex4(s, &cp))
				return false;
			if (cp >= 0xdc00 && cp <= 0xdfff)
				return false; /* a lone low surrogate */
			if (cp >= 0xd800 && cp <= 0xdbff) {
				if (s->end - s->p < 2 || s->p[0] != '\\' || s->p[1] != 'u')
					return false;
				s->p += 2;
				if (!json_hex4(s, &low) || low < 0xdc00 || low > 0xdfff)
					return false;
				cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
			}
			utf8_put(out, cp);
			break;
		}
		default:
			return false;
		}
	}
	return false;
}

static bool json_is_delimiter(char c)
{
	return c == ',' || c == ':' || c == '{' || c == '}' || c == '[' || c == ']' || c == '"' ||
	       c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Skips one value: a string, a scalar, or a nested object/array (by depth). */
static bool json_skip_value(struct scan *s)
{
	size_t depth = 0;
	do {
		json_ws(s);
		if (s->p >= s->end)
			return false;
		char c = *s->p;
		if (c == '"') {
			if (!json_skip_string(s))
				return false;
		} else if (c == '{' || c == '[') {
			depth++;
			s->p++;
		} else if (c == '}' || c == ']') {
			if (depth == 0)
				return false;
			depth--;
			s->p++;
		} else if (c == ',' || c == ':') {
			if (depth == 0)
				return false;
			s->p++;
		} else {
			while (s->p < s->end && !json_is_delimiter(*s->p))
				s->p++;
		}
	} while (depth > 0);
	return true;
}

/* Walks the top-level object of json and sets found[i] to the start of the
 * value of keys[i] (its last occurrence), NULL when absent. Returns false,
 * with every found[i] NULL, when json is not an object the scanner can walk. */
static bool json_top_level(const char *json, size_t len, const char *const keys[], size_t nkeys,
			   const char *found[])
{
	struct scan s = {json, json + len};
	struct buf key = {0};
	bool ok = false;
	for (size_t i = 0; i < nkeys; i++)
		found[i] = NULL;
	json_ws(&s);
	if (s.p >= s.end || *s.p != '{')
		goto out;
	s.p++;
	json_ws(&s);
	if (s.p < s.end && *s.p == '}') {
		ok = true;
		goto out;
	}
	for (;;) {
		json_ws(&s);
		if (s.p >= s.end || *s.p != '"' || !json_string(&s, &key))
			goto out;
		json_ws(&s);
		if (s.p >= s.end || *s.p != ':')
			goto out;
		s.p++;
		json_ws(&s);
		for (size_t i = 0; i < nkeys; i++)
			if (key.len == strlen(keys[i]) && memcmp(key.data, keys[i], key.len) == 0)
				found[i] = s.p;
		if (!json_skip_value(&s))
			goto out;
		json_ws(&s);
		if (s.p >= s.end)
			goto out;
		if (*s.p == '}') {
			ok = true;
			goto out;
		}
		if (*s.p != ',')
			goto out;
		s.p++;
	}
out:
	buf_free(&key);
	if (!ok)
		for (size_t i = 0; i < nkeys; i++)
			found[i] = NULL;
	return ok;
}

/* The string value starting at value (inside json of length len). */
static bool json_string_at(const char *json, size_t len, const char *value, struct buf *out)
{
	struct scan s = {value, json + len};
	return value != NULL && *value == '"' && json_string(&s, out);
}

/* ------------------------------------------------------------------------ */
/* Input                                                                    */

struct input {
	struct buf stdin_data;
	const char *env[ARRAY_SIZE(CNI_VARS)]; /* NULL when unset */
	const struct command *command;
	struct buf socket_path;
	int timeout_ms;
};

static const char *env_value(const struct input *in, const char *name)
{
	for (size_t i = 0; i < ARRAY_SIZE(CNI_VARS); i++)
		if (strcmp(CNI_VARS[i], name) == 0)
			return in->env[i];
	return NULL;
}

/* Reads stdin fully; 0, or the CNI error code. */
static int read_stdin(struct buf *b)
{
	for (;;) {
		buf_reserve(b, 65536);
		size_t room = b->cap - b->len - 1;
		ssize_t n = read(STDIN_FILENO, b->data + b->len, room);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EBADF) /* no stdin at all: an empty netconf */
				break;
			char msg[128];
			snprintf(msg, sizeof(msg), "cannot read the netconf from stdin: %s", strerror(errno));
			cni_error(CNI_ERR_IO, msg, NULL);
			return CNI_ERR_IO;
		}
		if (n == 0)
			break;
		b->len += (size_t)n;
		if (b->len > MAX_STDIN) {
			cni_error(CNI_ERR_DECODE, "the netconf on stdin is larger than 1 MiB",
				  "ciliate-cni reads at most 1048576 bytes of network configuration");
			return CNI_ERR_DECODE;
		}
	}
	buf_reserve(b, 1);
	b->data[b->len] = '\0';
	return 0;
}

/* Up to four dot-separated numbers of 1-4 digits: a cniVersion worth
 * repeating to the runtime. */
static bool is_version_like(const char *v)
{
	int parts = 0, digits = 0;
	for (;; v++) {
		if (*v >= '0' && *v <= '9') {
			if (++digits > 4)
				return false;
		} else if (*v == '.' || *v == '\0') {
			if (digits == 0 || ++parts > 4)
				return false;
			if (*v == '\0')
				return true;
			digits = 0;
		} else {
			return false;
		}
	}
}

/* Container IDs as the CNI spec allows them: alphanumeric first, then
 * alphanumerics, '_', '.', '-'. */
static bool valid_container_id(const char *id)
{
	if (id == NULL || id[0] == '\0' || strlen(id) > MAX_QUEUED_CONTAINER_ID)
		return false;
	for (const char *p = id; *p; p++) {
		char c = *p;
		bool alnum = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
		if (!alnum && (p == id || (c != '_' && c != '.' && c != '-')))
			return false;
	}
	return true;
}

/* Interface names as the kernel (and the CNI spec) allows them. */
static bool valid_ifname(const char *name)
{
	size_t len = name ? strlen(name) : 0;
	if (len == 0 || len > 15 || strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
		return false;
	for (const char *p = name; *p; p++)
		if (*p == '/' || *p == ':' || *p == ' ' || (*p >= '\t' && *p <= '\r'))
			return false;
	return true;
}

/* ------------------------------------------------------------------------ */
/* The request body, shared by the relay and the DEL queue                  */

static void build_body(const struct input *in, struct buf *body)
{
	bool first = true;
	buf_reserve(body, in->stdin_data.len + 512);
	buf_str(body, "{\"env\": {");
	for (size_t i = 0; i < ARRAY_SIZE(CNI_VARS); i++) {
		if (in->env[i] == NULL)
			continue;
		buf_str(body, first ? "\"" : ", \"");
		buf_str(body, CNI_VARS[i]);
		buf_str(body, "\": \"");
		json_escape(body, in->env[i], strlen(in->env[i]));
		buf_str(body, "\"");
		first = false;
	}
	buf_str(body, "}, \"stdin\": \"");
	json_escape(body, in->stdin_data.data, in->stdin_data.len);
	buf_str(body, "\"}");
}

/* ------------------------------------------------------------------------ */
/* Talking to the agent                                                     */

static struct timespec g_deadline;

static void set_deadline(int timeout_ms)
{
	clock_gettime(CLOCK_MONOTONIC, &g_deadline);
	g_deadline.tv_sec += timeout_ms / 1000;
	g_deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
	if (g_deadline.tv_nsec >= 1000000000L) {
		g_deadline.tv_sec++;
		g_deadline.tv_nsec -= 1000000000L;
	}
}

static int remaining_ms(void)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	long long ms = (long long)(g_deadline.tv_sec - now.tv_sec) * 1000 +
		       (g_deadline.tv_nsec - now.tv_nsec) / 1000000;
	if (ms <= 0)
		return 0;
	return ms > INT_MAX ? INT_MAX : (int)ms;
}

/* 1 when fd is ready, 0 on timeout, -1 on error (errno set). */
static int wait_fd(int fd, short events)
{
	for (;;) {
		int ms = remaining_ms();
		if (ms == 0)
			return 0;
		struct pollfd pfd = {.fd = fd, .events = events};
		int n = poll(&pfd, 1, ms);
		if (n < 0 && errno == EINTR)
			continue;
		return n < 0 ? -1 : n > 0 ? 1 : 0;
	}
}

enum connect_result { CONNECTED, UNREACHABLE, CONNECT_FAILED };

static enum connect_result agent_connect(const char *path, int *fd_out, int *err)
{
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	size_t len = strlen(path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		*err = errno;
		return CONNECT_FAILED;
	}
	memcpy(addr.sun_path, path, len + 1); /* the length was checked with the netconf */
	/* A UNIX-socket connect blocks only while the listener's backlog is
	 * full; SO_SNDTIMEO bounds that wait. */
	int ms = remaining_ms();
	struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
	(void)setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	socklen_t addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len + 1);
	while (connect(fd, (struct sockaddr *)&addr, addrlen) < 0) {
		if (errno == EINTR)
			continue;
		*err = errno;
		close(fd);
		return (*err == ENOENT || *err == ECONNREFUSED) ? UNREACHABLE : CONNECT_FAILED;
	}
	*fd_out = fd;
	return CONNECTED;
}

/* 0, or an errno-like value (ETIMEDOUT on timeout). */
static int send_all(int fd, const char *data, size_t len)
{
	while (len > 0) {
		int ready = wait_fd(fd, POLLOUT);
		if (ready <= 0)
			return ready == 0 ? ETIMEDOUT : errno;
		ssize_t n = send(fd, data, len, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return errno;
		}
		data += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Case-insensitive search for a header line "name: value" in the header
 * block [start, end); returns the value (leading blanks skipped) or NULL. */
static const char *find_header(const char *start, const char *end, const char *name, size_t *vlen)
{
	size_t nlen = strlen(name);
	const char *line = start;
	while (line < end) {
		const char *eol = memchr(line, '\n', (size_t)(end - line));
		if (eol == NULL)
			eol = end;
		if ((size_t)(eol - line) > nlen && line[nlen] == ':' && strncasecmp(line, name, nlen) == 0) {
			const char *v = line + nlen + 1;
			while (v < eol && (*v == ' ' || *v == '\t'))
				v++;
			const char *vend = eol;
			while (vend > v && (vend[-1] == '\r' || vend[-1] == ' ' || vend[-1] == '\t'))
				vend--;
			*vlen = (size_t)(vend - v);
			return v;
		}
		line = eol + 1;
	}
	return NULL;
}

struct answer {
	int status;
	struct buf body;
};

enum parse_state { PARSE_INCOMPLETE, PARSE_DONE, PARSE_BAD };

/* Decodes a chunked body from [p, end) into out. */
static enum parse_state dechunk(const char *p, const char *end, struct buf *out)
{
	out->len = 0;
	for (;;) {
		const char *eol = memchr(p, '\n', (size_t)(end - p));
		if (eol == NULL)
			return PARSE_INCOMPLETE;
		size_t size = 0;
		const char *q = p;
		for (; q < eol; q++) {
			char c = *q;
			int digit = (c >= '0' && c <= '9')   ? c - '0'
				    : (c >= 'a' && c <= 'f') ? c - 'a' + 10
				    : (c >= 'A' && c <= 'F') ? c - 'A' + 10
							     : -1;
			if (digit < 0)
				break;
			if (size > MAX_ANSWER)
				return PARSE_BAD;
			size = size * 16 + (size_t)digit;
		}
		if (q == p || (*q != ';' && *q != '\r' && *q != ' ' && q != eol))
			return PARSE_BAD;
		p = eol + 1;
		if (size == 0)
			return PARSE_DONE; /* trailers, if any, are ignored */
		if ((size_t)(end - p) < size + 2)
			return PARSE_INCOMPLETE;
		buf_add(out, p, size);
		p += size;
		if (p[0] == '\r')
			p++;
		if (p >= end)
			return PARSE_INCOMPLETE;
		if (*p++ != '\n')
			return PARSE_BAD;
	}
}

/* Parses what has been received so far. With eof, a body without a length
 * runs to the end. */
static enum parse_state parse_answer(const struct buf *raw, bool eof, struct answer *a)
{
	const char *data = raw->data, *end = raw->data + raw->len;
	const char *hend = raw->len ? memmem(data, raw->len, "\r\n\r\n", 4) : NULL;
	if (hend == NULL)
		return eof ? PARSE_BAD : PARSE_INCOMPLETE;
	if (raw->len < 12 || memcmp(data, "HTTP/1.", 7) != 0 || data[8] != ' ')
		return PARSE_BAD;
	int status = 0;
	for (int i = 9; i < 12; i++) {
		if (data[i] < '0' || data[i] > '9')
			return PARSE_BAD;
		status = status * 10 + (data[i] - '0');
	}
	a->status = status;
	const char *body = hend + 4;
	size_t vlen;
	const char *te = find_header(data, hend + 2, "Transfer-Encoding", &vlen);
	if (te != NULL && vlen >= 7 && strncasecmp(te + vlen - 7, "chunked", 7) == 0) {
		enum parse_state st = dechunk(body, end, &a->body);
		return st == PARSE_INCOMPLETE && eof ? PARSE_BAD : st;
	}
	const char *cl = find_header(data, hend + 2, "Content-Length", &vlen);
	if (cl != NULL) {
		size_t want = 0;
		if (vlen == 0)
			return PARSE_BAD;
		for (size_t i = 0; i < vlen; i++) {
			if (cl[i] < '0' || cl[i] > '9' || want > MAX_ANSWER)
				return PARSE_BAD;
			want = want * 10 + (size_t)(cl[i] - '0');
		}
		if ((size_t)(end - body) < want)
			return eof ? PARSE_BAD : PARSE_INCOMPLETE;
		a->body.len = 0;
		buf_add(&a->body, body, want);
		return PARSE_DONE;
	}
	if (!eof)
		return PARSE_INCOMPLETE;
	a->body.len = 0;
	buf_add(&a->body, body, (size_t)(end - body));
	return PARSE_DONE;
}

/* Sends the request and reads the answer; 0 or a CNI error code (printed). */
static int exchange(int fd, const struct input *in, const struct buf *body, struct answer *a)
{
	char head[256];
	char msg[PATH_MAX + 256];
	int n = snprintf(head, sizeof(head),
			 "POST /v1/cni HTTP/1.1\r\n"
			 "Host: ciliate-agent\r\n"
			 "User-Agent: ciliate-cni\r\n"
			 "Content-Type: application/json\r\n"
			 "Content-Length: %zu\r\n"
			 "Connection: close\r\n\r\n",
			 body->len);
	int err = send_all(fd, head, (size_t)n);
	if (err == 0)
		err = send_all(fd, body->data, body->len);
	if (err != 0) {
		snprintf(msg, sizeof(msg), "could not send the %s request to the agent at %s: %s",
			 in->command->name, in->socket_path.data,
			 err == ETIMEDOUT ? "timed out" : strerror(err));
		cni_error(CNI_ERR_TRY_AGAIN, msg, NULL);
		return CNI_ERR_TRY_AGAIN;
	}

	struct buf raw = {0};
	enum parse_state st = PARSE_INCOMPLETE;
	int code = 0;
	while (st == PARSE_INCOMPLETE) {
		int ready = wait_fd(fd, POLLIN);
		if (ready <= 0) {
			snprintf(msg, sizeof(msg), "the agent at %s did not answer %s within %d ms%s%s",
				 in->socket_path.data, in->command->name, in->timeout_ms,
				 ready < 0 ? ": " : "", ready < 0 ? strerror(errno) : "");
			cni_error(CNI_ERR_TRY_AGAIN, msg, NULL);
			code = CNI_ERR_TRY_AGAIN;
			break;
		}
		buf_reserve(&raw, 65536);
		ssize_t got = recv(fd, raw.data + raw.len, raw.cap - raw.len - 1, MSG_DONTWAIT);
		if (got < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			if (errno != ECONNRESET) {
				snprintf(msg, sizeof(msg), "reading the answer of the agent at %s: %s",
					 in->socket_path.data, strerror(errno));
				cni_error(CNI_ERR_TRY_AGAIN, msg, NULL);
				code = CNI_ERR_TRY_AGAIN;
				break;
			}
			got = 0;
		}
		raw.len += (size_t)got;
		raw.data[raw.len] = '\0';
		if (raw.len > MAX_ANSWER) {
			snprintf(msg, sizeof(msg), "the answer of the agent at %s is larger than %d bytes",
				 in->socket_path.data, MAX_ANSWER);
			cni_error(CNI_ERR_INTERNAL, msg, NULL);
			code = CNI_ERR_INTERNAL;
			break;
		}
		st = parse_answer(&raw, got == 0, a);
		if (st == PARSE_BAD || (st == PARSE_INCOMPLETE && got == 0)) {
			if (raw.len == 0)
				snprintf(msg, sizeof(msg),
					 "the agent at %s closed the connection without answering %s",
					 in->socket_path.data, in->command->name);
			else
				snprintf(msg, sizeof(msg), "the agent at %s sent a malformed HTTP answer",
					 in->socket_path.data);
			/* Nothing arrived: the agent went away mid-request; the
			 * runtime's retry will find it back or queue the DEL. */
			code = raw.len == 0 ? CNI_ERR_TRY_AGAIN : CNI_ERR_INTERNAL;
			cni_error(code, msg, NULL);
			break;
		}
	}
	buf_free(&raw);
	return code;
}

/* Relays a 200 answer: {"exit_code": <int>, "stdout": "<text>"}. */
static int relay_answer(const struct input *in, const struct answer *a)
{
	char msg[PATH_MAX + 256];
	if (a->status != 200) {
		char details[512];
		size_t n = a->body.len < sizeof(details) - 1 ? a->body.len : sizeof(details) - 1;
		if (n > 0)
			memcpy(details, a->body.data, n);
		details[n] = '\0';
		/* The details are for people; keep them valid UTF-8 for the JSON. */
		n = utf8_invalid_at((const unsigned char *)details, n);
		details[n] = '\0';
		snprintf(msg, sizeof(msg), "the agent at %s answered %s with HTTP status %d",
			 in->socket_path.data, in->command->name, a->status);
		cni_error(CNI_ERR_INTERNAL, msg, details);
		return 1;
	}
	static const char *const keys[] = {"exit_code", "stdout"};
	const char *found[2];
	struct buf out = {0};
	long exit_code = -1;
	bool ok = json_top_level(a->body.data, a->body.len, keys, 2, found) && found[0] && found[1];
	if (ok) {
		char *endp;
		errno = 0;
		exit_code = strtol(found[0], &endp, 10);
		ok = errno == 0 && endp != found[0] && *found[0] != '+' && *found[0] != ' ' &&
		     (*endp == ',' || *endp == '}' || *endp == ' ' || *endp == '\t' ||
		      *endp == '\n' || *endp == '\r') &&
		     exit_code >= 0 && exit_code <= 255 &&
		     json_string_at(a->body.data, a->body.len, found[1], &out);
	}
	if (!ok) {
		snprintf(msg, sizeof(msg),
			 "the agent at %s sent an answer without an exit_code (0..255) and stdout",
			 in->socket_path.data);
		cni_error(CNI_ERR_INTERNAL, msg, NULL);
		buf_free(&out);
		return 1;
	}
	(void)write_all(STDOUT_FILENO, out.data, out.len); /* a closed stdout is the runtime's choice */
	buf_free(&out);
	return (int)exit_code;
}

/* ------------------------------------------------------------------------ */
/* The DEL queue                                                            */

static bool mkdir_parents(char *path)
{
	for (char *p = path + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		bool ok = mkdir(path, 0755) == 0 || errno == EEXIST;
		*p = '/';
		if (!ok)
			return false;
	}
	return mkdir(path, 0755) == 0 || errno == EEXIST;
}

/* Writes the request to the queue the agent replays at start. Never fails
 * the DEL: a runtime would retry it forever. */
static int queue_del(const struct input *in, const struct buf *body)
{
	const char *cid = env_value(in, "CNI_CONTAINERID");
	const char *ifname = env_value(in, "CNI_IFNAME");
	char msg[PATH_MAX + 256];
	if (!valid_container_id(cid) || !valid_ifname(ifname)) {
		snprintf(msg, sizeof(msg),
			 "the agent at %s is not reachable and DEL cannot be queued: CNI_CONTAINERID "
			 "(alphanumerics, then also _ . -; at most %d) and CNI_IFNAME (1-15 "
			 "characters, no / : or blanks) must be valid",
			 in->socket_path.data, MAX_QUEUED_CONTAINER_ID);
		cni_error(CNI_ERR_ENV, msg, NULL);
		return 1;
	}

	struct buf dir = {0}, path = {0}, tmp = {0};
	const char *sock = in->socket_path.data;
	const char *slash = strrchr(sock, '/');
	if (slash == NULL)
		buf_str(&dir, ".");
	else if (slash == sock)
		buf_str(&dir, "");
	else
		buf_add(&dir, sock, (size_t)(slash - sock));
	/* The parents (/run/ciliate) may not exist yet after a reboot: the DELs
	 * of the old pods arrive before the agent starts. */
	if (dir.len > 0 && !mkdir_parents(dir.data))
		goto fail;
	buf_str(&dir, "/" QUEUE_DIR_NAME);
	if (mkdir(dir.data, 0700) < 0 && errno != EEXIST)
		goto fail;

	char pid[32];
	snprintf(pid, sizeof(pid), ".%ld.tmp", (long)getpid());
	buf_str(&path, dir.data);
	buf_str(&path, "/");
	buf_str(&path, cid);
	buf_str(&path, "-");
	buf_str(&path, ifname);
	buf_str(&path, ".json");
	buf_str(&tmp, dir.data);
	buf_str(&tmp, "/.");
	buf_str(&tmp, cid);
	buf_str(&tmp, "-");
	buf_str(&tmp, ifname);
	buf_str(&tmp, pid);

	int fd = open(tmp.data, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd < 0)
		goto fail;
	bool ok = write_all(fd, body->data, body->len) && fsync(fd) == 0;
	ok = close(fd) == 0 && ok;
	if (!ok || rename(tmp.data, path.data) < 0) {
		int saved = errno;
		unlink(tmp.data);
		errno = saved;
		goto fail;
	}
	int dfd = open(dir.data, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd >= 0) {
		(void)fsync(dfd); /* the rename survives a crash */
		close(dfd);
	}
	buf_free(&dir);
	buf_free(&path);
	buf_free(&tmp);
	return 0;

fail:
	/* Still success for the runtime; stderr lands in its log. */
	fprintf(stderr, "ciliate-cni: agent at %s not reachable; could not queue DEL in %s: %s\n",
		sock, dir.data ? dir.data : ".", strerror(errno));
	buf_free(&dir);
	buf_free(&path);
	buf_free(&tmp);
	return 0;
}

/* ------------------------------------------------------------------------ */

static int cmd_version(void)
{
	struct buf out = {0};
	buf_str(&out, "{\"cniVersion\": \"");
	buf_str(&out, g_version);
	buf_str(&out, "\", \"supportedVersions\": [");
	for (size_t i = 0; i < ARRAY_SIZE(SUPPORTED_VERSIONS); i++) {
		buf_str(&out, i ? ", \"" : "\"");
		buf_str(&out, SUPPORTED_VERSIONS[i]);
		buf_str(&out, "\"");
	}
	buf_str(&out, "]}\n");
	bool ok = write_all(STDOUT_FILENO, out.data, out.len);
	buf_free(&out);
	return ok ? 0 : 1;
}

static int unreachable(const struct input *in, const struct buf *body, int err)
{
	char msg[PATH_MAX + 256];
	const char *cmd = in->command->name;
	if (strcmp(cmd, "DEL") == 0)
		return queue_del(in, body);
	/* What the agent would answer whether up or not: a version ciliate does
	 * not speak, or one without the command, is code 1 (as libcni's skel
	 * says before anything else), not "try again". */
	if (g_version_index < 0) {
		snprintf(msg, sizeof(msg),
			 "incompatible CNI version: the netconf's cniVersion is not one ciliate "
			 "supports (%s, %s, %s, %s, %s)",
			 SUPPORTED_VERSIONS[0], SUPPORTED_VERSIONS[1], SUPPORTED_VERSIONS[2],
			 SUPPORTED_VERSIONS[3], SUPPORTED_VERSIONS[4]);
		cni_error(CNI_ERR_VERSION, msg, NULL);
		return 1;
	}
	if ((size_t)g_version_index < in->command->since) {
		snprintf(msg, sizeof(msg),
			 "incompatible CNI version: cniVersion %s does not have %s (it came with %s); "
			 "raise the netconf's cniVersion",
			 g_version, cmd, SUPPORTED_VERSIONS[in->command->since]);
		cni_error(CNI_ERR_VERSION, msg, NULL);
		return 1;
	}
	snprintf(msg, sizeof(msg), "the agent at %s is not reachable (%s): start ciliate-agent",
		 in->socket_path.data, strerror(err));
	/* STATUS: "plugin not available"; ADD, CHECK, GC: the runtime retries. */
	cni_error(strcmp(cmd, "STATUS") == 0 ? CNI_ERR_NOT_AVAILABLE : CNI_ERR_TRY_AGAIN, msg, NULL);
	return 1;
}

static int run(struct input *in)
{
	char msg[PATH_MAX + 256];
	const char *command = getenv("CNI_COMMAND");

	for (size_t i = 0; i < ARRAY_SIZE(CNI_VARS); i++)
		in->env[i] = getenv(CNI_VARS[i]);

	/* VERSION reads stdin too, for the cniVersion to answer with, but not
	 * from a terminal: a person running the plugin by hand. */
	if (!(command != NULL && strcmp(command, "VERSION") == 0 && isatty(STDIN_FILENO))) {
		int code = read_stdin(&in->stdin_data);
		if (code != 0)
			return 1;
	}
	buf_reserve(&in->stdin_data, 1);
	in->stdin_data.data[in->stdin_data.len] = '\0';

	static const char *const keys[] = {"cniVersion", "agentSocket"};
	const char *found[2];
	struct buf version = {0};
	bool is_object = json_top_level(in->stdin_data.data, in->stdin_data.len, keys, 2, found);
	if (json_string_at(in->stdin_data.data, in->stdin_data.len, found[0], &version) &&
	    strlen(version.data) == version.len && version.len < sizeof(g_version_given) &&
	    is_version_like(version.data)) {
		memcpy(g_version_given, version.data, version.len + 1);
		g_version = g_version_given;
		for (size_t i = 0; i < ARRAY_SIZE(SUPPORTED_VERSIONS); i++)
			if (strcmp(g_version_given, SUPPORTED_VERSIONS[i]) == 0)
				g_version_index = (long)i;
	}
	buf_free(&version);

	if (command == NULL || command[0] == '\0') {
		cni_error(CNI_ERR_ENV, "CNI_COMMAND is not set",
			  "set CNI_COMMAND to ADD, DEL, CHECK, GC, STATUS or VERSION");
		return 1;
	}
	for (size_t i = 0; i < ARRAY_SIZE(COMMANDS); i++)
		if (strcmp(command, COMMANDS[i].name) == 0)
			in->command = &COMMANDS[i];
	if (in->command == NULL) {
		snprintf(msg, sizeof(msg),
			 "unknown CNI_COMMAND %.64s: expected ADD, DEL, CHECK, GC, STATUS or VERSION",
			 utf8_invalid_at((const unsigned char *)command, strlen(command)) == strlen(command)
				 ? command
				 : "(not UTF-8)");
		cni_error(CNI_ERR_ENV, msg, NULL);
		return 1;
	}
	if (strcmp(command, "VERSION") == 0)
		return cmd_version();

	size_t bad = utf8_invalid_at((const unsigned char *)in->stdin_data.data, in->stdin_data.len);
	if (bad != in->stdin_data.len) {
		snprintf(msg, sizeof(msg), "the netconf on stdin is not valid UTF-8 (byte %zu)", bad);
		cni_error(CNI_ERR_DECODE, msg, NULL);
		return 1;
	}
	for (size_t i = 0; i < ARRAY_SIZE(CNI_VARS); i++) {
		const char *v = in->env[i];
		if (v != NULL && utf8_invalid_at((const unsigned char *)v, strlen(v)) != strlen(v)) {
			snprintf(msg, sizeof(msg), "%s is not valid UTF-8", CNI_VARS[i]);
			cni_error(CNI_ERR_ENV, msg, NULL);
			return 1;
		}
	}

	/* Without a readable netconf there is no telling which agent to ask:
	 * say what is wrong rather than "agent unreachable" at the default. */
	if (!is_object) {
		cni_error(CNI_ERR_DECODE, "the netconf on stdin is not a JSON object",
			  "the runtime must pass the plugin's network configuration as JSON");
		return 1;
	}
	if (found[1] == NULL) {
		buf_str(&in->socket_path, DEFAULT_SOCKET);
	} else if (!json_string_at(in->stdin_data.data, in->stdin_data.len, found[1], &in->socket_path) ||
		   in->socket_path.len == 0 || strlen(in->socket_path.data) != in->socket_path.len ||
		   in->socket_path.len >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
		cni_error(CNI_ERR_NETCONF, "agentSocket in the netconf must be a socket path",
			  "a non-empty string of at most 107 bytes, e.g. \"" DEFAULT_SOCKET "\"");
		return 1;
	}

	const char *override = getenv("CILIATE_CNI_TIMEOUT_MS");
	in->timeout_ms = in->command->timeout_ms;
	if (override != NULL && override[0] != '\0') {
		char *endp;
		long ms = strtol(override, &endp, 10);
		if (*endp == '\0' && ms > 0 && ms <= 3600000)
			in->timeout_ms = (int)ms;
	}

	struct buf body = {0};
	build_body(in, &body);
	set_deadline(in->timeout_ms);

	int fd = -1, err = 0, rc;
	switch (agent_connect(in->socket_path.data, &fd, &err)) {
	case UNREACHABLE:
		rc = unreachable(in, &body, err);
		break;
	case CONNECT_FAILED:
		snprintf(msg, sizeof(msg), "cannot connect to the agent at %s: %s", in->socket_path.data,
			 err == EAGAIN ? "busy (timed out)" : strerror(err));
		cni_error(CNI_ERR_TRY_AGAIN, msg, NULL);
		rc = 1;
		break;
	default: {
		struct answer a = {0};
		rc = exchange(fd, in, &body, &a) == 0 ? relay_answer(in, &a) : 1;
		buf_free(&a.body);
		close(fd);
	}
	}
	buf_free(&body);
	return rc;
}

int main(void)
{
	struct input in = {0};
	signal(SIGPIPE, SIG_IGN);
	int rc = run(&in);
	buf_free(&in.stdin_data);
	buf_free(&in.socket_path);
	return rc;
}
