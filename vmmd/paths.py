"""Well-known paths and defaults shared by the daemon and its clients (a leaf module)."""

DEFAULT_SOCKET = "/run/vmmd/vmmd.sock"
DEFAULT_MAX_VMS = 1024  # VMs one daemon hosts unless --max-vms says otherwise
