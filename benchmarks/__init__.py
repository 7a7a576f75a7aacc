"""Benchmarks: `python -m benchmarks.speed` (latency, throughput, cold start, memory, vs the old decoding)
and `python -m benchmarks.load` (the Gradio app under concurrent requests). Results go to benchmarks/results/."""
