"""Well-known paths shared by the daemon and its clients (a leaf module)."""

DEFAULT_SOCKET = "/run/vmmd/vmmd.sock"
