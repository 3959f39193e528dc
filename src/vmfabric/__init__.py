"""vmfabric: the network control plane of a KVM/libvirt cloud."""

__version__ = "0.1.0"
