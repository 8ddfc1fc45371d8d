"""Jobs: the job file's schema, the assembly of a run, demo and serve, provisioning, progress."""
