"""vmmd: a micro-VMM daemon for Linux/KVM on x86-64 (Python control plane, C data plane)."""
