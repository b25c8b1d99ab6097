"""Hand-written kernels, each with its PyTorch twin in `cluster/model` as the reference: `gpu/`
holds the Triton kernels for NVIDIA GPUs (the CPU's C++ kernels are `cluster/native`)."""
