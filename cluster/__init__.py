"""Turns one YAML file into a running deployment: the validated config tree, the pool manager,
the `ray job submit` entry point, scaling, the `make run` demo and the local Ray environment.
May import every package except benchmarks and tests; only it reads the whole config tree."""
