"""Devices of a VM as the control plane sees them: slot allocation, host
resources (files, locks), the command-line words that announce them.  The
devices themselves run in C (native/virtio_*.c)."""
