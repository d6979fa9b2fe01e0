/*
 * virtio_vsock.h - virtio-vsock (device id 19), stream sockets only, with
 * the host side on Unix sockets the way Firecracker does it:
 *
 *   host -> guest: a client connects to the listening socket (uds_path),
 *     writes "CONNECT <port>\n"; the guest gets a REQUEST from a fresh host
 *     port; on its RESPONSE the client reads "OK <host port>\n", then bytes.
 *   guest -> host: a REQUEST to CID 2 port P connects to the Unix socket
 *     "<uds_path>_<P>" (relative to the directory fd: see vmm_vsock_create).
 *
 * A host client has 2 s for its CONNECT line and the guest's answer to the
 * REQUEST (as Firecracker's connect timeout); then it is closed (and the
 * guest's half-made connection reset).
 *
 * Trust: every packet header, length and credit field comes from the guest.
 * A bad packet resets its connection (RST) and is counted (bad_packets); a
 * bad chain (outside RAM, wrong direction, too short) fails the device
 * (NEEDS_RESET), as for the other devices.  The host sockets are the host's
 * and may be slow or hostile too: a CONNECT line is bounded, every fd is
 * non-blocking.
 *
 * Memory: at most VMM_VSOCK_MAX_CONNS connections, each buffering at most
 * VMM_VSOCK_BUF bytes the guest sent and the host has not taken yet - the
 * credit (buf_alloc) we grant.  A slow host reader stops the guest's credit,
 * a slow guest reader (its credit used up, or no RX buffers) stops our
 * reading of the host socket: nothing grows without bound.
 *
 * The device's fds (listener, connections, a wake eventfd) sit in an epoll
 * set of its own, which is the transport's backend_fd: the I/O thread polls
 * that one fd and calls backend_ready.
 */
#ifndef VMM_VIRTIO_VSOCK_H
#define VMM_VIRTIO_VSOCK_H
#include "virtio_mmio.h"

#define VMM_VSOCK_RXQ 0
#define VMM_VSOCK_TXQ 1
#define VMM_VSOCK_EVQ 2
#define VMM_VSOCK_MAX_CONNS 256
#define VMM_VSOCK_BUF (256 * 1024)	/* our buf_alloc, per connection */
#define VMM_VSOCK_MAX_RST 64		/* RSTs owed for packets of no connection */
#define VMM_VSOCK_NAME_MAX 96		/* "<name>_<u32 port>" fits in sun_path */
#define VMM_VSOCK_LINE_MAX 24		/* "CONNECT 4294967295\n" and some */

struct vmm_vsock_conn {
	int state;			/* C_* in virtio_vsock.c; 0: slot free */
	int fd;				/* the host's stream socket */
	uint32_t host_port, guest_port;
	uint32_t ev;			/* epoll events registered; 0: not in the set */
	uint32_t pending;		/* control packets owed to the guest (P_*) */
	int rx_wait;			/* no RX buffer for our data: input stopped */
	int host_eof;			/* the host socket read 0 */
	uint32_t guest_shut;		/* SHUTDOWN flags the guest sent */
	/* guest -> host: the guest's bytes the host has not taken, a ring */
	uint8_t *buf;			/* VMM_VSOCK_BUF bytes, allocated on first need */
	uint32_t head, len;
	uint32_t fwd_cnt;		/* the guest's bytes handed to the host */
	uint32_t fwd_told;		/* fwd_cnt as our last packet told it */
	uint32_t rx_cnt;		/* the guest's bytes received */
	/* host -> guest, within the guest's credit */
	uint32_t peer_buf_alloc, peer_fwd_cnt;
	uint32_t tx_cnt;		/* bytes sent to the guest */
	char line[VMM_VSOCK_LINE_MAX];	/* the CONNECT line so far */
	int line_len;
	uint32_t age;			/* timer ticks spent waiting to be connected */
};

struct vmm_vsock {
	struct vmm_virtio transport;	/* first: the device is its transport */
	uint64_t guest_cid;
	int listen_fd, dir_fd;		/* the device's own duplicates */
	int ep_fd, wake_fd;		/* the transport's backend_fd is ep_fd */
	int timer_fd, timer_on;		/* ticks while host clients wait to connect */
	char name[VMM_VSOCK_NAME_MAX + 1];	/* uds_path's last component */
	uint32_t next_port;		/* host ports for host-initiated connections */
	int rx_wait;			/* some connection waits for RX buffers */
	int reset_event;		/* TRANSPORT_RESET owed to the guest */
	int nrst;
	struct { uint32_t src, dst; } rst[VMM_VSOCK_MAX_RST];
	struct vmm_vsock_conn conn[VMM_VSOCK_MAX_CONNS];
	struct vmm_chain chain;		/* scratch */
	struct iovec iov[VMM_CHAIN_MAX_SEGS];
};

/* listen_fd: a bound, listening SOCK_STREAM Unix socket; dir_fd: the
 * directory uds_path is in (O_DIRECTORY); name: uds_path's last component
 * (no '/', at most VMM_VSOCK_NAME_MAX bytes).  The device keeps duplicates
 * of both fds.  A guest connect runs on the calling thread (the I/O
 * thread): it unshares its fs attributes (CLONE_FS) and fchdir()s to
 * dir_fd, so that thread's working directory becomes dir_fd's. */
int vmm_vsock_create(const struct vmm_mem *mem, uint64_t guest_cid, int listen_fd, int dir_fd,
		     const char *name, struct vmm_vsock **out);
void vmm_vsock_destroy(struct vmm_vsock *vs);

#endif
