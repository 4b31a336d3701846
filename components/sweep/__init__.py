"""The sweep components: prepare the study, run a worker, pick the best settings."""
