"""Access to a server inside a VM through two proxies (CN107273186A).

The host gateway and the guest proxy talk over one channel that is not the VM's network (a
virtio-serial port, a unix socket in the lab). `channel` is the wire format, `session` the
protocol state machine both sides share, `guest_proxy` the program that runs in the guest, and
`bundle` builds that program as one file. The protocol is described in docs/access-protocol.md.
"""
