"""Benchmarks: `python -m sct.bench NAME [options]`, one module per benchmark, each with `main(argv)` printing a table.

    jvp     backbones (forward, JVP, forward+backward: time, peak memory) and attention JVP kernels
"""
