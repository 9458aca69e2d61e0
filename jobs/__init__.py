"""The batch job system: manifests, sharding, Ray actors, output sinks and the `sdbatch` command."""
