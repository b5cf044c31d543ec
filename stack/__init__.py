"""stack: the application above the services: the `mmserve` command, `mmserve up`, aggregated mode and flex replicas."""
