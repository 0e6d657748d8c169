"""What vitasks measures about itself, and the yardsticks it measures against.

- :mod:`.throughput`: images/s, peak memory, FLOPs and their ratio to a matmul timed in the same
  run (``tools/benchmark.py``, ``vitasks benchmark``);
- :mod:`.machine`: the one reader of the CPU (name, ISA, native bf16) and of the load average;
- :mod:`.onnx_timing`: onnxruntime beside eager PyTorch, timed in alternation;
- :mod:`.token_tradeoff`: accuracy against speed of the token-reduction demos;
- :mod:`.gpu_check`: a GPU machine in one command (SDPA kernels, ops kernels, MFU);
- :mod:`.cnn_baseline`: the plain CNN the demos must reach.

Nothing is imported here, so importing one module (the engine reads :mod:`.machine`) loads
nothing else.
"""
