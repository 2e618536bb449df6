"""botfleet provisioning: isolated databases and roles for many bots on one shared PostgreSQL."""
