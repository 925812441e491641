"""Benchmarks: `python -m sct.bench NAME [options]`, one module per benchmark, each with `main(argv)` printing a table.

    sample  exported 1-/2-step samplers vs the teacher's ODE sampler (latency, images/s, ratios)
    jvp     backbones (forward, JVP, forward+backward: time, peak memory) and attention JVP kernels
"""
