"""Benchmarks: `python bench/throughput.py` (training and inference against transformers + peft
+ bitsandbytes) and `python bench/kernels.py` (NF4 dequantisation bandwidth). See bench/README.md."""
