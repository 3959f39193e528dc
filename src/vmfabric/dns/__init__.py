"""The authoritative DNS server of the VM registrations (zones from `domain.dns_records`)."""
