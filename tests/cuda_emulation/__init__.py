"""The CUDA emulation used by tests/test_cuda_emulated.py (see csrc/cuda/README.md)."""
