"""vmfabric: the network control plane of a KVM/libvirt cloud."""
