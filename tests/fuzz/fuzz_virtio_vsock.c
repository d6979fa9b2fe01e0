/*
 * fuzz_virtio_vsock.c - virtio-vsock (virtio_vsock.c) driven by a hostile
 * guest and busy host sockets.
 *
 * Host side, made once per process in a fresh directory: the device's
 * listener "v.sock", and a host listener "v.sock_1000" (a guest connect to
 * port 1000 succeeds, any other is refused).  Feeds: the driver's set-up of
 * the three queues, guest ops (register accesses, notifies, RAM changes,
 * avail publishes, reset and init again), "backend readable" (the I/O
 * thread's call), host actions (OP_FRAME: a client connects and writes
 * "CONNECT <a>\n", or a host socket - a client or an accepted peer - writes
 * bytes or closes) and guest RAM (TX packets, RX buffers).
 *
 * Checks, after every op: the transport invariants (fuzz.h) and the
 * device's own: every connection's buffer within VMM_VSOCK_BUF, states
 * known, an fd for every connection that has a host side, the owed-RST
 * list within its bound, stream bytes to the guest never more than the
 * guest granted (per connection, tx_cnt - peer_fwd_cnt <= the largest
 * buf_alloc it ever said, as it may shrink it).  Guard pages catch any
 * access outside guest RAM; each input's sockets are all closed again.
 *
 * Input: setup (fuzz.h), u8 nops, nops x 8 bytes of ops, RAM image.
 */
#include "fuzz.h"	/* first: it defines _GNU_SOURCE (accept4) */

#include <fcntl.h>
#include <sys/un.h>

#include "virtio_vsock.h"

#define MAX_HOST 8

static char dir[64];
static int lis_fd = -1, dir_fd = -1, peer_lis = -1, home_fd = -1;

/* At exit: the sockets' files and the directory go (their fds close with us). */
static void host_cleanup(void)
{
	char p[96];
	snprintf(p, sizeof(p), "%s/v.sock", dir);
	unlink(p);
	snprintf(p, sizeof(p), "%s/v.sock_1000", dir);
	unlink(p);
	rmdir(dir);
}

static void host_init(void)
{
	if (lis_fd >= 0)
		return;
	strcpy(dir, "/tmp/vmmd-fuzz-vsock-XXXXXX");
	CHECK(mkdtemp(dir), "mkdtemp");
	atexit(host_cleanup);
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	snprintf(a.sun_path, sizeof(a.sun_path), "%s/v.sock", dir);
	lis_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	CHECK(bind(lis_fd, (struct sockaddr *)&a, sizeof(a)) == 0 && listen(lis_fd, 64) == 0, "lis");
	snprintf(a.sun_path, sizeof(a.sun_path), "%s/v.sock_1000", dir);
	peer_lis = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	CHECK(bind(peer_lis, (struct sockaddr *)&a, sizeof(a)) == 0 && listen(peer_lis, 300) == 0,
	      "peer listener");
	dir_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	home_fd = open(".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);	/* connects move the cwd */
	CHECK(dir_fd >= 0 && home_fd >= 0, "dirs");
}

struct host {
	int fd[MAX_HOST];
	int n;
};

static void host_add(struct host *h, int fd)
{
	if (h->n < MAX_HOST)
		h->fd[h->n++] = fd;
	else
		close(fd);
}

/* A host action: a new client with its CONNECT line (a picks the port:
 * mostly a few small ones, sometimes anything), or bytes / a close on one
 * of the host's sockets (peers the device connected to included). */
static void host_op(struct host *h, const struct op *o)
{
	int fd;
	while ((fd = accept4(peer_lis, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0)
		host_add(h, fd);
	if ((o->a & 3) == 0 || !h->n) {
		struct sockaddr_un a = { .sun_family = AF_UNIX };
		snprintf(a.sun_path, sizeof(a.sun_path), "%s/v.sock", dir);
		fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
			close(fd);
			return;
		}
		char line[32];
		int n = snprintf(line, sizeof(line), "CONNECT %u\n", (o->a & 4) ? o->val : o->val % 4);
		if (o->a & 8)
			n = (int)(o->off % (unsigned)n);	/* half a line, or none */
		if (send(fd, line, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
			/* the backlog took the connect: the line waits for the device */
		}
		host_add(h, fd);
		return;
	}
	int k = o->off % h->n;
	if ((o->a & 3) == 1) {
		close(h->fd[k]);
		h->fd[k] = h->fd[--h->n];
		return;
	}
	static uint8_t bytes[4096];
	memset(bytes, o->a, sizeof(bytes));
	if (send(h->fd[k], bytes, o->val % sizeof(bytes), MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
		/* full or gone: the host side is allowed to be either */
	}
	recv(h->fd[k], bytes, sizeof(bytes), MSG_DONTWAIT);	/* a slow reader, now and then */
}

static void check_vsock(const struct vmm_vsock *vs, uint32_t *granted)
{
	CHECK(vs->nrst >= 0 && vs->nrst <= VMM_VSOCK_MAX_RST, "%d RSTs owed", vs->nrst);
	for (int i = 0; i < VMM_VSOCK_MAX_CONNS; i++) {
		const struct vmm_vsock_conn *c = &vs->conn[i];
		CHECK(c->state >= 0 && c->state <= 4, "conn %d state %d", i, c->state);
		if (c->state == 0) {
			granted[i] = 0;
			continue;
		}
		CHECK(c->len <= VMM_VSOCK_BUF && c->head < VMM_VSOCK_BUF, "conn %d buffers %u", i,
		      c->len);
		CHECK(c->state == 4 || c->fd >= 0, "conn %d (state %d) without a host socket", i,
		      c->state);
		if (c->peer_buf_alloc > granted[i])
			granted[i] = c->peer_buf_alloc;
		CHECK(c->tx_cnt - c->peer_fwd_cnt <= granted[i], "conn %d: %u bytes in flight, %u granted",
		      i, c->tx_cnt - c->peer_fwd_cnt, granted[i]);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct input in = { data, size };
	struct setup s;
	struct host h = { .n = 0 };
	static uint32_t granted[VMM_VSOCK_MAX_CONNS];
	host_init();
	setup_parse(&in, &s);
	uint8_t nops = in_u8(&in) % MAX_OPS;
	struct input ops = in_sub(&in, (size_t)OP_BYTES * nops);
	struct vmm_mem *mem = ram_load(in);
	struct vmm_vsock *vs;
	CHECK(vmm_vsock_create(mem, 3, lis_fd, dir_fd, "v.sock", &vs) == 0, "create");
	struct vmm_virtio *v = &vs->transport;
	memset(granted, 0, sizeof(granted));

	if (s.flags & SETUP_INIT)
		driver_init(v, &s);
	while (ops.n) {
		struct op o = op_parse(&ops);
		if (!op_common(v, mem, &s, &o)) {
			if (o.kind == OP_FRAME)
				host_op(&h, &o);
			vmm_virtio_backend_ready(v);
		}
		check_transport(v, 0);
		check_vsock(vs, granted);
	}
	wr(v, R_QUEUE_NOTIFY, VMM_VSOCK_TXQ);
	vmm_virtio_backend_ready(v);
	check_transport(v, 0);
	check_vsock(vs, granted);

	debug_stats("virtio_vsock", v);
	vmm_virtio_free(v);
	int fd;
	while ((fd = accept4(peer_lis, NULL, NULL, SOCK_CLOEXEC)) >= 0)
		close(fd);
	while ((fd = accept4(lis_fd, NULL, NULL, SOCK_CLOEXEC)) >= 0)
		close(fd);	/* clients the device never took */
	for (int i = 0; i < h.n; i++)
		close(h.fd[i]);
	CHECK(fchdir(home_fd) == 0, "cwd back");
	return 0;
}
