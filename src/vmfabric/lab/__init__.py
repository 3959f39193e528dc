"""The lab: hypervisor hosts and VMs built from network namespaces and a private Open vSwitch.

Everything it makes is named `vmf…`, recorded in `$VMFABRIC_STATE/lab/state.json` before or as
it is made, and removed by `lifecycle.down()` from that record alone.
"""
