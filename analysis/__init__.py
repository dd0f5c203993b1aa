"""Torch-free model and machine arithmetic: cost model, machine peaks, hardware profiles, bottleneck report.

Owns the roofline formulas and the ``python -m analysis.bottleneck`` CLI; torch only inside measuring functions.
May import only the standard library and third-party packages: never engine, cluster, router or workers.
"""
