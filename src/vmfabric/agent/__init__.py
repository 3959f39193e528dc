"""The host agent: keeps one hypervisor host in step with the controller's desired state."""
